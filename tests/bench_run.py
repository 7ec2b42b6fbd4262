"""Running benchmark.py from the tests: one quick section (or all) into JSON + markdown, and re-rendering them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python bench/benchmark.py *args`` in the repository; fails the test with its stderr when it fails."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "benchmark.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_quick(out: Path, *args: str, timeout: float = 600) -> tuple[dict, str, Path, str]:
    """``bench/benchmark.py --quick *args`` writing into ``out``: (JSON data, markdown, JSON path, stdout)."""
    js, md = out / "bench.json", out / "bench.md"
    proc = bench("--quick", *args, "--json", str(js), "--markdown", str(md), timeout=timeout)
    return json.loads(js.read_text()), md.read_text(), js, proc.stdout


def rerender(js: Path, out: Path, timeout: float = 300) -> str:
    """The markdown that ``--render-json`` makes again from a run's JSON."""
    bench("--render-json", str(js), "--markdown", str(out), timeout=timeout)
    return out.read_text()
