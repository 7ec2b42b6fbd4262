"""Measuring: the clock (wall, CPU and CUDA-event time), the time budget, medians and the result row."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from qwenvl_fast.perf_monitor import sync_device


class Clock:
    """Wall time of a region, synchronising the device on both sides (CUDA events recorded too), and the
    process CPU time (all threads), which other tenants of a shared CPU machine barely disturb."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda" and torch.cuda.is_available()

    def sync(self) -> None:
        sync_device(self.device)

    @contextmanager
    def time(self) -> Iterator[dict[str, float]]:
        res: dict[str, float] = {}
        start = end = None
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield res
        finally:
            if end is not None:
                end.record()
            self.sync()
            res["wall"] = time.perf_counter() - t0
            res["cpu"] = time.process_time() - c0  # all threads of this process
            if start is not None and end is not None:
                res["gpu"] = start.elapsed_time(end) / 1000.0


def ratio_basis(device: torch.device | str) -> str:
    """What the paired ratios divide: process CPU time on a CPU device (other tenants of a shared machine
    stretch wall time, hardly the CPU time of the same work), synchronised wall time on an accelerator."""
    return "cpu_s" if torch.device(device).type == "cpu" else "time_s"


class TimeBudget:
    """``--time-budget``: sections and rounds that would start after it are skipped, cleanly."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, estimate: float = 0.0) -> bool:
        return self.left() > estimate


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")

@dataclass
class Row:
    """One result line. ``metrics`` are medians (seconds, tokens, ratios); ``samples`` the raw values."""

    id: str
    section: str
    label: str
    status: str = "ok"  # ok / skipped / failed
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def m(self, key: str) -> float | None:
        return self.metrics.get(key) if self.status == "ok" else None
