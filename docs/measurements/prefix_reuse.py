"""(a) a new question on a cached image with prefix reuse vs (b) an embedding-cache hit that cannot reuse the prefix."""
import sys, time, statistics, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2])); import pack_path; pack_path.import_pack()
from qwenvl_fast import qwenvl_loader as ql
name = sys.argv[1] if len(sys.argv) > 1 else "synthetic:qwen3-vl-4b@2"
torch.set_num_threads(2)
t0 = time.perf_counter()
model, _ = ql.MANAGER.get(ql.LoadOptions(model=name, dtype="fp32"))
print(f"model {name}: built in {time.perf_counter() - t0:.1f}s, threads {torch.get_num_threads()}")
img = torch.rand(1024, 1024, 3, generator=torch.Generator().manual_seed(0))
def req(q, sys_prompt):
    return ql.GenerationRequest(prompt=q, images=[img], system_prompt=sys_prompt, image_quality="balanced",
                                max_new_tokens=16, min_new_tokens=16, disk_cache=False, monitor=True)
model.run(req("Warm up: what is this?", "You are a helpful assistant."))  # encode once, keep the prefix
a, b = [], []
for i in range(3):
    ra = model.run(req(f"Question {i}: describe the image.", "You are a helpful assistant."))
    rb = model.run(req(f"Question {i}: describe the image.", f"System prompt number {i}."))
    assert ra.record.images[0]["cache"] == "memory" and rb.record.images[0]["cache"] == "memory"
    a.append(ra.record); b.append(rb.record)
    print(f"run {i}: (a) reuse total {ra.record.total_s:.3f}s prefill {ra.record.stages['prefill']:.3f}s "
          f"reused {ra.record.prefix_tokens_reused} prompt {ra.record.prompt_tokens} | (b) no reuse total "
          f"{rb.record.total_s:.3f}s prefill {rb.record.stages['prefill']:.3f}s reused {rb.record.prefix_tokens_reused} "
          f"prefilled-prefix {rb.record.prefix_tokens_prefilled} prompt {rb.record.prompt_tokens}")
ta = statistics.median(r.total_s for r in a); tb = statistics.median(r.total_s for r in b)
pa = statistics.median(r.stages["prefill"] for r in a); pb = statistics.median(r.stages["prefill"] for r in b)
print(f"median total: (a) reuse {ta:.3f}s vs (b) embedding hit, no reuse {tb:.3f}s -> {tb / ta:.2f}x")
print(f"median prefill: (a) {pa:.3f}s vs (b) {pb:.3f}s -> {pb / pa:.2f}x; decode (a) "
      f"{statistics.median(r.stages['decode'] for r in a):.3f}s (b) {statistics.median(r.stages['decode'] for r in b):.3f}s")
print("stages (a):", {k: round(v, 4) for k, v in a[-1].stages.items()})
print("stages (b):", {k: round(v, 4) for k, v in b[-1].stages.items()})
print("prefix cache:", model.prefix_cache.info())
