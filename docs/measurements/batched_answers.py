"""8 images x 64 new tokens, one size: batched (one generate) vs one by one (answer_batch_tokens=0)."""
import logging, sys, time, pathlib, tempfile
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
import pack_path
pack_path.import_pack()
import torch
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.engine import model as engine
from qwenvl_fast.sources import synthetic

torch.manual_seed(0)
imgs = [torch.rand(90, 120, 3) for _ in range(8)]
base = pathlib.Path(tempfile.mkdtemp())

def req(budget):
    return ql.GenerationRequest(prompt="Describe.", images=imgs, batch_mode=engine.BATCH_MODES[1], image_quality="fast",
                                max_new_tokens=64, min_new_tokens=64, monitor=False, answer_batch_tokens=budget)

for name in sys.argv[1:]:
    if name.startswith("tiny"):
        synthetic.save_synthetic(f"synthetic:{name}", base / name)
        opts = ql.LoadOptions(model=str(base / name))
    else:
        opts = ql.LoadOptions(model=name)
    model, _ = ql.MANAGER.get(opts)
    model.run(req(engine.ANSWER_BATCH_TOKENS))  # warm-up, fills the embedding cache: both timings below are hits
    times = {}
    for label, budget in [("one by one", 0), ("batched", engine.ANSWER_BATCH_TOKENS),
                          ("one by one", 0), ("batched", engine.ANSWER_BATCH_TOKENS)]:
        t0 = time.perf_counter()
        out = model.run(req(budget))
        dt = time.perf_counter() - t0
        times.setdefault(label, []).append(dt)
        assert sum(len(i) for i in out.token_ids) == 8 * 64
    one, bat = min(times["one by one"]), min(times["batched"])
    print(f"{name} ({model.dtype}, {torch.get_num_threads()} threads): one by one {one:.2f}s, batched {bat:.2f}s, "
          f"one-by-one/batched = {one / bat:.2f}x  (all runs: {times})", flush=True)
    ql.MANAGER.release()
