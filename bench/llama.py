"""GGUF through llama.cpp's llama-server (f16 and a quantized type) against the local transformers path.

The same synthetic model (random weights, real architecture: compute does not depend on weight values) runs three
ways in one process, in rotating order each round: the pack's local transformers path (``synthetic:<preset>``),
and the same weights converted with llama.cpp's converter to GGUF ``f16`` and ``q8_0``, each through the
llama-server the pack starts for a ``.gguf`` (``backends/llama_server.py``):

    python bench/llama.py --preset tiny-qwen2.5-vl-h64-d3 --repeats 5 --json docs/benchmark-llama-cpu.json

Per backend: one image answered (a new random image each time: no embedding cache, no server prompt cache), its
encode, prefill and decode per token; then Caption Folder on a folder of new images, captions per second.
Answers have a fixed length (``min_new_tokens = max_new_tokens``, ``ignore_eos`` on the server). Needs the
llama-server of ``.ci/install_llama_server.sh`` (or ``$QWENVL_FAST_LLAMA_SERVER``) and llama.cpp's source
(``tests/llama_fixture.py`` builds and caches the GGUF files).

What each column is. Local: ``encode`` is the vision tower, ``prefill`` the language model's prompt pass (first
token), ``decode/token`` the rest. llama-server: ``encode+prefill`` is the server's own "prompt eval time" from its
log (llama.cpp encodes the image inside prompt processing; it does not report the two apart), ``decode/token``
its "eval time" per token; ``TTFT`` (time to first token, client side: upload, queue, encode, prefill) is shown
for all three.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # llama_fixture: the converter and the llama-server the tests use
import pack_path  # noqa: E402

pack_path.import_pack()
import torch  # noqa: E402

import llama_fixture  # noqa: E402
from bench.inputs import cut_by_design  # noqa: E402
from bench.server import write_images  # noqa: E402 (the server benchmark's noise images)
from qwenvl_fast import qwenvl_loader as ql  # noqa: E402
from qwenvl_fast.captioning import caption_folder  # noqa: E402

_PROMPT_EVAL = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
_EVAL = re.compile(r"\beval time =\s*([\d.]+) ms /\s*(\d+) tokens")


def server_timings(log_path: Path, since: int) -> tuple[float, float]:
    """(prompt eval s, eval s per token) of the last request in llama-server's log after byte ``since``."""
    with open(log_path, "rb") as f:
        f.seek(since)
        text = f.read().decode("utf-8", "replace")
    prompt = _PROMPT_EVAL.findall(text)
    evals = _EVAL.findall(text)
    if not prompt or not evals:
        raise RuntimeError(f"no timing lines in {log_path} after byte {since}")
    ms, tokens = evals[-1]
    return float(prompt[-1][0]) / 1000, float(ms) / 1000 / max(1, int(tokens))


def one_image(name: str, options: ql.LoadOptions, seed: int, args: argparse.Namespace) -> dict[str, float]:
    image = torch.from_numpy(__import__("numpy").random.default_rng(seed).random(
        (args.size[0], args.size[1], 3), dtype="float32"))
    request = ql.GenerationRequest(prompt="Describe the image.", images=[image], image_quality=args.quality,
                                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   enable_image_cache=False, disk_cache=False, monitor=True)
    model, _ = ql.MANAGER.get(options)
    log_path = getattr(getattr(model, "process", None), "log_path", None)
    since = log_path.stat().st_size if log_path else 0
    rec = ql.run_once(options, request).record
    st = rec.stages
    decoded = max(1, rec.new_tokens - 1)
    row = {"prompt_tokens": rec.prompt_tokens, "new_tokens": rec.new_tokens}
    if log_path:
        row["encode_prefill_s"], row["decode_per_token_s"] = server_timings(log_path, since)
        row["ttft_s"] = st.get("upload", 0.0) + st.get("prefill", 0.0)
    else:
        row["encode_s"] = st.get("encode", 0.0)
        row["prefill_s"] = st.get("prefill", 0.0)
        row["encode_prefill_s"] = row["encode_s"] + row["prefill_s"]
        row["decode_per_token_s"] = st.get("decode", 0.0) / decoded
        row["ttft_s"] = sum(v for k, v in st.items() if k not in ("decode", "load"))
    return row


def folder_rate(options: ql.LoadOptions, seed: int, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_images(folder, args.images, tuple(args.size), seed)
        request = ql.GenerationRequest(prompt="Write a short caption.", image_quality=args.quality,
                                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                       enable_image_cache=False, disk_cache=False, monitor=False)
        t0 = time.perf_counter()
        results = caption_folder(options, folder, request, write_txt=False)
        elapsed = time.perf_counter() - t0
    # A synthetic model's tokens are mostly outside its tiny tokenizer, so an answer may decode to no text ("empty
    # answer"): its tokens were still generated and timed.
    if not all(r.status == "captioned" or "empty answer" in r.status or cut_by_design(r.status) for r in results):
        raise RuntimeError(f"not every image was captioned: {[r.status for r in results]}")
    return args.images / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=llama_fixture.GGUF_PRESET)
    parser.add_argument("--quant", default="q8_0", help="the quantized GGUF type beside f16 (convert's --outtype)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--quality", default="fast")
    parser.add_argument("--size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    reason = llama_fixture.llama_missing_reason()
    if reason:
        raise SystemExit(reason)
    os.environ.setdefault("QWENVL_FAST_LLAMA_SERVER", str(llama_fixture.llama_server_path()))
    root = llama_fixture.gguf_models_root(("f16", args.quant), args.preset)
    folder = root / llama_fixture.MODEL_FOLDER
    backends = {
        "transformers (local, fp32)": ql.LoadOptions(model=f"synthetic:{args.preset}", device="cpu"),
        "llama-server GGUF f16": ql.LoadOptions(model=str(folder / "model-f16.gguf"),
                                                server_max_in_flight=args.in_flight),
        f"llama-server GGUF {args.quant}": ql.LoadOptions(model=str(folder / f"model-{args.quant}.gguf"),
                                                         server_max_in_flight=args.in_flight),
    }
    names = list(backends)
    singles: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            one_image(name, backends[name], 3000 + r, args)  # after the switch: load and first-call costs untimed
            singles[name].append(one_image(name, backends[name], 1000 + r, args))
            rates[name].append(folder_rate(backends[name], 2000 + r, args))
    ql.MANAGER.release()

    def med(name: str, key: str) -> str:
        vals = [row[key] for row in singles[name] if key in row]
        if not vals:
            return "-"
        return f"{statistics.median(vals) * 1000:.1f} ({min(vals) * 1000:.1f}-{max(vals) * 1000:.1f})"

    print(f"Synthetic {args.preset} (random weights), one {args.size[0]}x{args.size[1]} image at `{args.quality}`, "
          f"{args.new_tokens} new tokens (fixed); Caption Folder {args.images} images, {args.in_flight} in flight "
          f"for llama-server; {args.repeats} rounds, median (min-max); ms unless said")
    print("| backend | prompt tokens | encode | prefill | encode+prefill | decode/token | TTFT (client) "
          "| captions/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        rate = rates[name]
        print(f"| {name} | {singles[name][0]['prompt_tokens']} | {med(name, 'encode_s')} | {med(name, 'prefill_s')} "
              f"| {med(name, 'encode_prefill_s')} | {med(name, 'decode_per_token_s')} | {med(name, 'ttft_s')} "
              f"| {statistics.median(rate):.2f} ({min(rate):.2f}-{max(rate):.2f}) |")
    base = names[0]
    for name in names[1:]:
        ratio = [a / b for a, b in zip(rates[name], rates[base])]
        print(f"captions/s, {name} / {base}: paired median {statistics.median(ratio):.2f}x "
              f"(range {min(ratio):.2f}-{max(ratio):.2f}x over {len(ratio)} rounds)")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "single_image": singles, "captions_per_s": rates}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
