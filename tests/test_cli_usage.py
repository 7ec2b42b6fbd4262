"""The command line as a newcomer meets it: `cli.py --help` shows both commands, and loading a model folder prints
the answer and the timing report without the libraries' progress bars."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY_FAMILIES

ROOT = Path(__file__).resolve().parents[1]
FAMILY = "tiny-qwen2.5-vl" if "tiny-qwen2.5-vl" in TINY_FAMILIES else TINY_FAMILIES[0]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TQDM_DISABLE": ""})


def test_help_usage_shows_caption_folder():
    done = cli("--help")
    assert done.returncode == 0
    usage = done.stdout.split("\n\n", 1)[0]
    assert usage.startswith("usage: cli.py [--model M]")
    assert "cli.py caption-folder FOLDER --model M" in usage


def test_loading_a_model_folder_prints_no_progress_bar(models_dir, tmp_path):
    done = cli("--model", str(models_dir / FAMILY), "--max-new-tokens", "4", "--quality", "fast", "--no-disk-cache")
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "--- answer 1: 4 new tokens" in done.stdout and "timings: total" in done.stdout
    assert "it/s]" not in out and "s/it]" not in out and "Loading weights" not in out, out
