"""The pack's two dependency lists (requirements.txt for ComfyUI-Manager and pip, pyproject.toml for the registry)
name the same packages with the same floors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]


def _requirement_set(lines: list[str]) -> set[str]:
    out = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(re.sub(r"\s+", "", line).lower())
    return out


def test_requirements_and_pyproject_agree():
    requirements = _requirement_set((ROOT / "requirements.txt").read_text().splitlines())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_set(project["dependencies"])
    assert requirements == declared, (
        f"only in requirements.txt: {sorted(requirements - declared)}; only in pyproject.toml: "
        f"{sorted(declared - requirements)}")


def test_requirements_never_list_torch_or_torchvision():
    """README: requirements.txt never lists torch or torchvision, so pip cannot replace ComfyUI's CUDA build (nor may
    the registry's list)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for source, lines in [("requirements.txt", (ROOT / "requirements.txt").read_text().splitlines()),
                          ("pyproject.toml", project["dependencies"])]:
        names = {re.split(r"[<>=!~\[; ]", item, maxsplit=1)[0] for item in _requirement_set(lines)}
        assert not names & {"torch", "torchvision", "torchaudio"}, f"{source} lists {names & {'torch', 'torchvision'}}"
