#!/usr/bin/env python
"""F.linear against the small-batch form ``W @ x^T`` (engine/cpu_linear.py) on the CPU, side by side in one run.

    python bench/cpu_linear.py --json docs/benchmark-cpu-linear.json --markdown docs/benchmark-cpu-linear.md

The matrices are Qwen2.5-VL-3B's language-model shapes (attention 2048x2048, MLP 2048x11008 and 11008x2048, the
``lm_head`` 2048x151,936), fp32, random; rows are the answers decoded together (1 = one by one; 64 and 256 are
prefill-sized). Each cell is the best of ``--repeats`` calls, the two forms interleaved call by call, over
``--rounds`` rounds; the ratio (F.linear / W @ x^T) is taken within each round and reported as the median with its
min-max. ``bytes/s`` is the weight matrix's size over the time: what a one-pass-over-the-weights kernel reaches.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository root on sys.path, not bench/ (see benchmark.py)
    HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, str(HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402

import bench  # noqa: E402, F401  (the pack as qwenvl_fast)
from bench.cli import machine_info  # noqa: E402
from qwenvl_fast.engine import cpu_linear  # noqa: E402  (its probe: the same timing the load does)

SHAPES = {"q/o proj 2048x2048": (2048, 2048), "mlp up/gate 2048->11008": (11008, 2048),
          "mlp down 11008->2048": (2048, 11008), "lm_head 2048->151936": (151936, 2048)}
ROWS = (1, 2, 4, 8, 16, 64, 256)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cells: dict[str, dict[str, list[list[float]]]] = {}
    with torch.inference_mode():
        for name, (out, features) in SHAPES.items():
            weight = torch.randn(out, features)
            for rows in args.rows:
                pairs = [cpu_linear.probe(weight, rows, args.repeats) for _ in range(args.rounds)]
                cells.setdefault(name, {})[str(rows)] = [list(p) for p in pairs]
                ratios = [a / b for a, b in pairs]
                print(f"{name:26s} rows {rows:4d}: F.linear {statistics.median(p[0] for p in pairs) * 1e3:8.2f} ms"
                      f"  W@x^T {statistics.median(p[1] for p in pairs) * 1e3:8.2f} ms  ratio "
                      f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})", flush=True)
            del weight
    return dict(machine=machine_info(torch.device("cpu")), rounds=args.rounds, repeats=args.repeats, cells=cells)


def to_markdown(result: dict, command: str) -> str:
    m = result["machine"]
    lines = ["# F.linear against W @ x^T on the CPU (fp32)", "", "```", command, "```", "",
             f"- machine: CPU {m['cpu']}, {m['cpu_count']} cores ({m['torch_threads']} torch threads), load average "
             f"at start {m.get('load_average')}; torch {m['torch']}",
             f"- best of {result['repeats']} calls per cell, the forms interleaved; {result['rounds']} rounds; "
             "ratio = F.linear / W @ x^T within each round, median (min-max)", "",
             "| Matrix | Rows | F.linear | W @ x^T | Ratio | F.linear GB/s | W @ x^T GB/s |",
             "|---|---|---|---|---|---|---|"]
    for name, by_rows in result["cells"].items():
        out, features = SHAPES[name]
        size = out * features * 4
        for rows, pairs in by_rows.items():
            a = statistics.median(p[0] for p in pairs)
            b = statistics.median(p[1] for p in pairs)
            ratios = [p[0] / p[1] for p in pairs]
            lines.append(f"| {name} | {rows} | {a * 1e3:.2f} ms | {b * 1e3:.2f} ms | "
                         f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                         f"{size / a / 1e9:.1f} | {size / b / 1e9:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    command = "python bench/cpu_linear.py " + " ".join(shlex.quote(a) for a in given)
    result = run(args)
    result["command"] = command
    md = to_markdown(result, command)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
