"""Formatting numbers and cells of the tables: times, ratios, bytes, a median with its spread over rounds."""

from __future__ import annotations

import argparse
import math
from typing import Any

from bench.measure import Row, median, ratio_basis


def fmt_time(s: float | None) -> str:
    if s is None or not isinstance(s, (int, float)) or math.isnan(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def fmt_ratio(r: float | None) -> str:
    if r is None or not isinstance(r, (int, float)) or math.isnan(r):
        return "-"
    if r >= 100:
        return f"{r:.0f}x"
    if r >= 10:
        return f"{r:.1f}x"
    return f"{r:.2f}x"

def row_map(model_entry: dict[str, Any]) -> dict[str, Row]:
    return {r.id: r for r in model_entry["rows"]}


def cell(row: Row | None, key: str, kind: str = "time") -> str:
    if row is None:
        return "-"
    if row.status != "ok":
        return f"{row.status}: {row.reason}" if kind == "status" else "-"
    v = row.metrics.get(key)
    if kind == "ratio":
        return fmt_ratio(v)
    if kind == "int":
        return "-" if v is None else f"{v:.0f}"
    return fmt_time(v)


def status_note(rows: list[Row | None]) -> list[str]:
    return [f"- {r.label}: **{r.status}** ({r.reason})" for r in rows if r is not None and r.status != "ok"]

def spread(row: Row | None, key: str, kind: str = "ratio") -> str:
    """A row's median with its spread over rounds: ``1.45x (1.40x-1.50x)``; '-' when not measured."""
    if row is None or row.status != "ok" or not row.samples.get(key):
        return "-"
    vals = row.samples[key]
    f = fmt_ratio if kind == "ratio" else fmt_time
    med = f(row.metrics.get(key, median(vals)))
    return f"{med} (1 round)" if len(vals) == 1 else f"{med} ({f(min(vals))}-{f(max(vals))})"


def fmt_bytes(n: float | None) -> str:
    if not isinstance(n, (int, float)) or n <= 0:
        return "-"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


class View:
    """What every table of one model needs: its rows, the run's options, and whether CPU time is shown."""

    def __init__(self, entry: dict[str, Any], args: argparse.Namespace) -> None:
        self.entry = entry
        self.g = row_map(entry).get
        self.args = args
        self.size = args.image_size
        self.basis = ratio_basis(entry.get("device") or "cpu")
        self.on_cpu = self.basis == "cpu_s"
        self.cpu_head, self.cpu_rule = (" CPU time |", "---|") if self.on_cpu else ("", "")

    def cpu(self, r: Row | None, key: str = "cpu_s") -> str:
        """The CPU-time cell (CPU devices only)."""
        return f" {cell(r, key)} |" if self.on_cpu else ""
