"""The whole report: markdown of every model, the JSON, both written after every section."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.fmt import fmt_time
from bench.measure import Row
from bench.report_image import model_markdown
from bench.report_sections import preprocess_markdown


def to_markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    """The whole report: the run's command and machine, then every model's tables, then the preprocessing table."""
    meta = result["meta"]
    mach = meta["machine"]
    hw = mach.get("gpu") and f"{mach['gpu']} ({mach.get('gpu_memory_gib')} GiB, CUDA {mach.get('cuda')})" or \
        f"CPU {mach['cpu']}, {mach['cpu_count']} cores ({mach['torch_threads']} torch threads)"
    lines = ["# Qwen-VL Fast benchmark", "", "```", meta["command"], "```", "",
             f"- machine: {hw}; load average at start {mach.get('load_average')}",
             f"- torch {mach['torch']}, transformers {mach['transformers']}, Python {mach['python']}",
             (f"- device {meta['device']}, dtype {meta['dtype']}, image {args.image_size}x{args.image_size}, "
              f"repeats {args.repeats} (multi-image {args.multi_repeats or args.repeats}), warm-up rounds "
              f"{args.warmup}, cache hits {args.hit_repeats} per round" if meta["models"] else
              f"- device {meta['device']}"),
             (f"- models: {', '.join(meta['models'])} (synthetic: real architecture, random weights; `@N` = N text "
              "layers, the vision tower is full size)" if meta["models"] else
              "- models: none (only the preprocessing section ran: it builds no model)"),
             f"- started {meta['started']}, took {fmt_time(meta.get('elapsed_s'))}"]
    if args.repeats < 3 and not args.quick and meta["models"]:
        lines.append(f"- note: {args.repeats} timed round(s) of each expensive row (a vision-tower variant costs "
                     "seconds to minutes here), so a 'median' is " + ("that one sample" if args.repeats == 1 else
                                                                     "the mean of the two samples")
                     + "; cheap rows (cache hits, hashes, "
                     f"disk hits) take {args.hit_repeats}+ samples per round. Raw samples are in the JSON.")
    for note in meta.get("notes", []):
        lines.append(f"- note: {note}")
    lines.append("")
    for entry in result["models"]:
        lines.append(model_markdown(entry, args))
        for note in entry.get("notes", []):
            lines.append(f"- note: {note}")
        lines.append("")
    if result.get("preprocess"):
        lines += preprocess_markdown(result["preprocess"], args)
    return "\n".join(lines)


def jsonable(result: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(result, default=lambda o: asdict(o) if isinstance(o, Row) else str(o)))
    return out


def write_outputs(result: dict[str, Any], args: argparse.Namespace, final: bool = False) -> str:
    md = to_markdown(result, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(jsonable(result), indent=1))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md)
    return md
