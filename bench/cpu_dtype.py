"""CPU dtype rows (issue 30): fp32 against ``dtype=auto`` (and forced bf16) through the pack, with llama.cpp's
llama-server on the same synthetic weights (GGUF f16 and q8_0) as the CPU reference, in one run.

    python bench/cpu_dtype.py --json docs/benchmark-cpu-dtype.json --markdown docs/benchmark-cpu-dtype.md

What runs, per model (the real-size Qwen2.5-VL-3B and Qwen3-VL-4B vision towers, random weights; the language model
shortened to ``--text-layers`` layers on this 2-core CPU; compute time does not depend on weight values):

1. the machine: CPU model, the flags that matter (avx2, fma, avx512f, avx512_bf16, amx_bf16), whether bf16 is native;
2. the probe ``dtype=auto`` runs on a native-bf16 CPU (``engine/cpu_dtype.py``), here run whatever the CPU: each
   part's matmuls at the model's dims, fp32 against bf16 (best of ``--probe-repeats``, process CPU time is not used:
   the probe is what auto would see);
3. one image answered through the pack (``bench/llama.py``'s ``one_image``: a new random image each time, no cache,
   ``min_new_tokens = max_new_tokens``): encode (vision tower), prefill, decode per token, for each local variant
   (fp32, auto, bf16 forced, and int8 dynamic quantization of the text body and ``lm_head`` by ``torch.ao``) and
   each llama-server GGUF type. Each variant runs ``--runs`` times back to back after one load (the spread is their
   min-max); llama-server gets one untimed warm-up answer first, as in bench/llama.py.

Times are wall-clock (llama-server reports its own); the machine's 1-minute load average is recorded beside each
variant, since other tenants of a shared machine stretch wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import pack_path  # noqa: E402

pack_path.import_pack()
import torch  # noqa: E402

import llama_fixture  # noqa: E402
from bench.llama import one_image  # noqa: E402
from qwenvl_fast import qwenvl_loader as ql  # noqa: E402
from qwenvl_fast.engine import cpu_dtype as cd  # noqa: E402
from qwenvl_fast.sources import synthetic  # noqa: E402

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
INT8 = "transformers fp32, text int8 (torch.ao dynamic)"
STAGES = ("encode_s", "prefill_s", "encode_prefill_s", "decode_per_token_s", "cpu_s")


def machine() -> dict:
    flags = cd.cpu_flags()
    native, why = cd.native_bf16()
    return {"cpu": cd.cpu_model_name(), "flags": {f: f in flags for f in FLAGS}, "native_bf16": native,
            "why": why, "cpus": os.cpu_count(), "physical_cores": cd.physical_cores(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform()}


def probe_rows(preset: str, repeats: int, row_divisor: int = 1) -> dict:
    """The probe's shapes at the model's dims; ``row_divisor`` shrinks the many-row matmuls (tower, prefill) so that
    a CPU where bf16 is emulated (15x slower than fp32 here) finishes in seconds; the ratio is what is read."""
    parsed, layers = synthetic.parse_synthetic_name(preset)
    config = synthetic.build_config(parsed, layers)
    shapes = {part: [(max(1, rows // row_divisor) if rows > 1 else rows, inner, cols, count)
                     for rows, inner, cols, count in s] for part, s in cd.probe_shapes(config).items()}
    timings = cd.probe(shapes, repeats)
    return {"shapes": shapes, "timings": timings,
            "would_choose": cd.choose(True, "if bf16 were native", timings).summary()}


def _int8_text(model) -> None:
    """int8 dynamic quantization (int8 weights, activations quantized per call) of the text body and lm_head."""
    from torch.ao.quantization import quantize_dynamic

    net = model.model
    quantize_dynamic(net.model.language_model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    net.lm_head = quantize_dynamic(torch.nn.Sequential(net.lm_head), {torch.nn.Linear}, dtype=torch.qint8)[0]


def local_variant(name: str, options: ql.LoadOptions, args, seed: int, prepare=None) -> dict:
    model, _ = ql.MANAGER.get(options)
    if prepare is not None:
        prepare(model)
    rows = []
    for i in range(args.runs):
        load, cpu0 = os.getloadavg()[0], time.process_time()
        row = one_image(name, options, seed + i, args)
        row["cpu_s"] = time.process_time() - cpu0  # this process's CPU time for the whole answer
        row["load_avg_1m"] = load
        rows.append(row)
    ran = getattr(model, "dtype_summary", "") or {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(model.dtype, "?")
    if prepare is _int8_text:
        ran = "tower fp32, text and lm_head int8 (dynamic)"
    return {"name": name, "ran": ran, "rows": rows}


def gguf_variant(name: str, path: Path, args, seed: int) -> dict:
    options = ql.LoadOptions(model=str(path), server_max_in_flight=1)
    one_image(name, options, seed + 100, args)  # untimed: the server's start and first-call costs
    rows = []
    for i in range(args.runs):
        load = os.getloadavg()[0]
        row = one_image(name, options, seed + i, args)
        row["load_avg_1m"] = load
        rows.append(row)
    ql.MANAGER.release()
    return {"name": name, "ran": path.name, "rows": rows}


def model_section(preset: str, args) -> dict:
    base = f"synthetic:{preset}"
    out: dict = {"preset": preset, "variants": [], "skipped": []}
    t0 = time.perf_counter()
    fp32 = ql.LoadOptions(model=base, device="cpu", dtype="fp32")
    # int8 last, on the fp32 model already loaded (quantized in place: no second load of the same weights)
    local = [("auto", "transformers auto", ql.LoadOptions(model=base, device="cpu", dtype="auto"), None),
             ("bf16", "transformers bf16 (forced)", ql.LoadOptions(model=base, device="cpu", dtype="bf16"), None),
             ("fp32", "transformers fp32", fp32, None),
             ("int8", INT8, fp32, _int8_text)]
    for tag, name, options, prepare in local:
        if tag in args.variants:
            out["variants"].append(local_variant(name, options, args, 1000, prepare))
            _save(args, out)
    ql.MANAGER.release()
    reason = llama_fixture.llama_missing_reason()
    if reason or args.no_gguf:
        out["skipped"].append(f"llama-server: {reason or '--no-gguf'}")
    else:
        os.environ.setdefault("QWENVL_FAST_LLAMA_SERVER", str(llama_fixture.llama_server_path()))
        llama_fixture.GGUF_CACHE = args.gguf_cache
        root = llama_fixture.gguf_models_root(("f16", args.quant), preset)
        folder = root / llama_fixture.MODEL_FOLDER
        for t in ("f16", args.quant):
            out["variants"].append(gguf_variant(f"llama-server GGUF {t}", folder / f"model-{t}.gguf", args, 1000))
            _save(args, out)
    out["seconds"] = time.perf_counter() - t0
    return out


_RESULT: dict = {}


def _save(args, section: dict | None = None) -> None:
    if section is not None:
        _RESULT.setdefault("models", {})[section["preset"]] = section
    if args.json:
        args.json.write_text(json.dumps(_RESULT, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(render(_RESULT))


def _med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def _cell(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows if key in r]
    if not vals:
        return "-"
    return f"{statistics.median(vals) * 1000:.0f} ({min(vals) * 1000:.0f}-{max(vals) * 1000:.0f})"


def render(result: dict) -> str:
    m = result.get("machine", {})
    a = result.get("args", {})
    lines = ["# CPU dtype benchmark (issue 30)", "",
             f"Machine: {m.get('cpu')}, {m.get('cpus')} CPUs ({m.get('physical_cores')} physical cores), torch "
             f"{m.get('torch')}, {m.get('threads')} threads; flags: "
             + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in m.get("flags", {}).items())
             + f". {m.get('why')}.", "",
             f"Command: `{result.get('command')}`", "",
             f"One {a.get('size')} image at `{a.get('quality')}`, {a.get('new_tokens')} new tokens (fixed), "
             f"{a.get('runs')} runs per variant back to back after one load: median (min-max), ms, wall clock "
             "(the last column: this process's CPU time for the whole answer, which other tenants do not stretch). "
             f"Language model shortened to {a.get('text_layers')} layers; the vision towers are the real size. "
             "llama-server's encode+prefill is its own \"prompt eval time\" (it does not report encode apart).", ""]
    for preset, probe in result.get("probe", {}).items():
        lines.append(f"Probe at {preset}'s dims (what `auto` measures on a native-bf16 CPU; best of "
                     f"{a.get('probe_repeats')}; rows of the tower and prefill matmuls divided by "
                     f"{a.get('probe_row_divisor')}; shapes in the JSON): " + "; ".join(
                         f"{part} fp32 {t['fp32'] * 1000:.0f} ms, bf16 {t['bf16'] * 1000:.0f} ms "
                         f"(bf16/fp32 {t['bf16'] / t['fp32']:.2f})" for part, t in probe["timings"].items())
                     + f". With native bf16 these figures would give: {probe['would_choose']}.")
        lines.append("")
    for preset, sec in result.get("models", {}).items():
        lines += [f"## synthetic:{preset}", "",
                  "| variant | ran in | visual+prompt tokens | encode | prefill | encode+prefill | decode/token "
                  "| CPU time per answer (local) | load avg |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for v in sec["variants"]:
            rows = v["rows"]
            lines.append(f"| {v['name']} | {v['ran']} | {rows[0]['prompt_tokens'] if rows else '-'} | "
                         + " | ".join(_cell(rows, k) for k in STAGES)
                         + f" | {statistics.median(r['load_avg_1m'] for r in rows):.1f} |")
        lines += [""] + _ratios(sec) + [""]
        for s in sec.get("skipped", []):
            lines.append(f"Not run: {s}")
    return "\n".join(lines) + "\n"


def _ratios(sec: dict) -> list[str]:
    by = {v["name"]: v["rows"] for v in sec["variants"]}
    out = []

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in by and b in by and _med(by[a], key) and _med(by[b], key):
            return _med(by[a], key) / _med(by[b], key)
        return None

    enc = ratio("transformers fp32", "transformers auto", "encode_s")
    if enc is not None:
        out.append(f"- encode, fp32 / auto: {enc:.2f}x (target >= 2.5x on a native-bf16 CPU)")
    bf = ratio("transformers fp32", "transformers bf16 (forced)", "encode_s")
    if bf is not None:
        out.append(f"- encode, fp32 / bf16 forced: {bf:.2f}x")
    for ref in ("llama-server GGUF f16",):
        d = ratio("transformers auto", ref, "decode_per_token_s")
        if d is not None:
            out.append(f"- decode per token, auto / {ref}: {d:.2f}x (target <= 1.5x)")
    for other in [n for n in by if n.startswith("llama-server") and n != "llama-server GGUF f16"]:
        d = ratio("transformers auto", other, "decode_per_token_s")
        if d is not None:
            out.append(f"- decode per token, auto / {other}: {d:.2f}x")
    q = ratio("transformers fp32", INT8, "decode_per_token_s")
    if q is not None:
        out.append(f"- decode per token, fp32 / int8 dynamic: {q:.2f}x (int8 is kept only if this is above 1)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["qwen2.5-vl-3b", "qwen3-vl-4b"])
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["fp32", "auto", "bf16", "int8"],
                        help="local variants; drop bf16 where bf16 is emulated (the probe shows by how much)")
    parser.add_argument("--quant", default="q8_0")
    parser.add_argument("--quality", default="fast")
    parser.add_argument("--size", type=int, nargs=2, default=(336, 336), metavar=("H", "W"))
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--probe-repeats", type=int, default=2)
    parser.add_argument("--probe-row-divisor", type=int, default=1,
                        help="divide the probe's row counts (tower 1024, prefill 512) by this")
    parser.add_argument("--no-gguf", action="store_true")
    parser.add_argument("--gguf-cache", type=Path, default=llama_fixture.GGUF_CACHE)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    args.size = list(args.size)
    _RESULT.update({"command": "python bench/cpu_dtype.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "machine": machine(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(args).items()}, "probe": {}})
    for preset in args.presets:
        _RESULT["probe"][preset] = probe_rows(f"synthetic:{preset}@{args.text_layers}", args.probe_repeats,
                                              args.probe_row_divisor)
        _save(args)
    for preset in args.presets:
        section = model_section(f"{preset}@{args.text_layers}", args)
        _save(args, section)
        print(render(_RESULT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
