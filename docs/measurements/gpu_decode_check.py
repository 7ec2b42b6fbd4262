"""Per-token decode of the full-size Qwen2.5-VL-3B language model (synthetic: 36 layers, bf16, random weights) with
compile_decode "off" (eager, dynamic cache) vs "auto" (static cache + torch.compile / CUDA graphs), against the
weight-bandwidth floor: the bytes of weights one decode step reads / the GPU's memory bandwidth (issue 12 item 3's
goal: within 2x of that floor).

    .venv/bin/python docs/measurements/gpu_decode_check.py [--model synthetic:qwen2.5-vl-3b] [--new-tokens 128]
                                                         [--runs 3] [--bandwidth-gbs N]

Needs CUDA; on a machine without it, it says so and exits 0 (``--device cpu`` runs the same code on the CPU, as a
smoke test of this script only: there compile_decode "auto" falls back to eager and no floor is computed).
A random-weight model's compute time does not depend on its weight values; every answer is forced to the same
length (min_new_tokens = max_new_tokens).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
import pack_path  # noqa: E402

# Nominal HBM bandwidths (GB/s), used only when the device properties lack the memory clock / bus width.
NOMINAL_GBS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "A100-SXM4-80GB": 2039.0,
               "A100-SXM4-40GB": 1555.0, "L40S": 864.0, "RTX 4090": 1008.0}


def bandwidth_bytes_per_s(torch, device, override_gbs: float | None) -> tuple[float | None, str]:
    if override_gbs:
        return override_gbs * 1e9, "--bandwidth-gbs"
    from qwenvl_fast.engine.memory import device_memory_bandwidth

    from_props = device_memory_bandwidth(device)
    if from_props:
        return from_props, "device properties (memory clock x bus width x 2)"
    props = torch.cuda.get_device_properties(device)
    for name, gbs in NOMINAL_GBS.items():
        if name in props.name:
            return gbs * 1e9, f"nominal for {name}"
    return None, "unknown (pass --bandwidth-gbs)"


def weight_bytes_per_token(model) -> tuple[int, int]:
    """(bytes of weights one decode step reads, vision tower bytes left out): engine.decode_bytes_per_token."""
    from qwenvl_fast.engine.memory import decode_bytes_per_token

    return decode_bytes_per_token(model), sum(p.numel() * p.element_size() for p in model.visual.parameters())


def print_summary(results: dict[str, float], tokens: dict[str, list[int]], floor_ms: float | None,
                  dtype: object) -> None:
    """The two settings side by side, against the bandwidth floor, and whether their greedy tokens agree."""
    off, auto = results["off"], results["auto"]
    print(f"\nsummary: off {off:.2f} ms/token, auto {auto:.2f} ms/token, speed-up {off / auto:.2f}x")
    if floor_ms:
        verdict = "within" if auto <= 2 * floor_ms else "NOT within"
        print(f"floor {floor_ms:.2f} ms/token: auto is {auto / floor_ms:.2f}x the floor ({verdict} the 2x goal), "
              f"off {off / floor_ms:.2f}x")
    same = sum(1 for a, b in zip(tokens["off"], tokens["auto"]) if a == b)
    first_diff = next((k for k, (a, b) in enumerate(zip(tokens["off"], tokens["auto"])) if a != b), None)
    print(f"greedy tokens off vs auto ({dtype}, first measured run): {same}/{len(tokens['off'])} equal"
          + (f", first difference at token {first_diff}" if first_diff is not None else ", identical"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:qwen2.5-vl-3b")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bandwidth-gbs", type=float, default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_decode_check: needs a CUDA GPU (this machine has none); nothing measured.")
        return 0
    pack_path.import_pack()
    import transformers

    from qwenvl_fast import qwenvl_loader as ql
    from qwenvl_fast.vision.tower_compile import count_recompiles

    device = torch.device(args.device)
    name = torch.cuda.get_device_properties(device).name if device.type == "cuda" else "CPU (smoke test)"
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}")
    img = torch.rand(448, 448, 3, generator=torch.Generator().manual_seed(0))

    def request(question: str) -> ql.GenerationRequest:
        return ql.GenerationRequest(prompt=question, images=[img], image_quality="fast", max_new_tokens=args.new_tokens,
                                    min_new_tokens=args.new_tokens, disk_cache=False, monitor=True)

    results: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    floor_ms = None
    weights = 0
    for setting in ("off", "auto"):
        ql.MANAGER.release()
        t0 = time.perf_counter()
        model, _ = ql.MANAGER.get(ql.LoadOptions(model=args.model, dtype="bf16" if device.type == "cuda" else "fp32",
                                                 device=args.device, compile_decode=setting))
        print(f"\ncompile_decode={setting}: loaded in {time.perf_counter() - t0:.1f}s, "
              f"decode {model.decode_compile.status}")
        if not weights:
            weights, visual = weight_bytes_per_token(model)
            bandwidth, source = (bandwidth_bytes_per_s(torch, device, args.bandwidth_gbs) if device.type == "cuda"
                                 else (None, "not measured on the CPU"))
            print(f"weights read per decode step: {weights / 1e9:.3f} GB (vision tower {visual / 1e9:.3f} GB not "
                  f"counted); bandwidth {'%.0f GB/s' % (bandwidth / 1e9) if bandwidth else '?'} from {source}")
            if bandwidth:
                floor_ms = weights / bandwidth * 1000
                print(f"bandwidth floor: {floor_ms:.2f} ms/token")
        t0 = time.perf_counter()
        warm = model.run(request("Warm up: describe this image."))  # compiles and records CUDA graphs under auto
        print(f"warm-up run {time.perf_counter() - t0:.1f}s, record decode_compile={warm.record.decode_compile!r}")
        per_token = []
        for i in range(args.runs):
            with count_recompiles() as counter:
                # a different question each run: another prompt length in the same cache bucket
                result = model.run(request(f"Question {i}: what is in this picture?" + " Please." * i))
            rec = result.record
            decoded = rec.new_tokens - 1  # the first new token is the prefill's
            ms = rec.stages["decode"] / decoded * 1000
            per_token.append(ms)
            print(f"  run {i}: prompt {rec.prompt_tokens} tokens, {rec.new_tokens} new, decode {ms:.2f} ms/token, "
                  f"prefill {rec.stages['prefill'] * 1000:.1f} ms, decode_compile={rec.decode_compile!r}, "
                  f"frames compiled {counter.frames}, recompiles {counter.recompiles}")
            if i == 0:
                tokens[setting] = result.token_ids[0]
        results[setting] = statistics.median(per_token)
        print(f"  median {results[setting]:.2f} ms/token ({1000 / results[setting]:.1f} tok/s)"
              + (f", {results[setting] / floor_ms:.2f}x the floor" if floor_ms else ""))
    ql.MANAGER.release()

    print_summary(results, tokens, floor_ms, model.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
