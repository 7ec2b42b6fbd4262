"""The benchmark's 'preprocess' section (ours against transformers' image processor, no model) in --quick mode.

No speed is asserted (a shared CPU proves nothing about speed): every row must be measured with positive, finite
times and ratios, carry its exactness check (max |ours - theirs| of pixel_values, identical grids), and render.
On a CPU both sides run torchvision's own uint8 resize kernel, so there the values must be bit-identical.
Also: nothing in the pack imports the bench package.
"""

import ast

import pytest

from bench_run import ROOT, positive, rerender, run_quick

CASES = [(g, p, s) for g in ("qwen2.5-vl", "qwen3-vl") for p in ("balanced", "high") for s in ("320x240", "640x480")]
TIMES = ["ours_s", "theirs_s", "ours_cpu_s", "theirs_cpu_s", "speedup", "wall_speedup"]


@pytest.fixture(scope="module")
def preprocess_run(tmp_path_factory):
    data, md, js, stdout = run_quick(tmp_path_factory.mktemp("bench-preprocess"), "--only", "preprocess",
                                     timeout=300)
    return data, md, js, stdout


def test_preprocess_rows_are_measured_and_checked(preprocess_run):
    data, _, _, _ = preprocess_run
    assert data["models"] == [] and data["meta"]["models"] == []  # no model is built for this section
    section = data["preprocess"]
    rows = {r["id"]: r for r in section["rows"]}
    assert set(rows) == {f"preprocess.{g}.{p}.{s}" for g, p, s in CASES}
    for rid, row in rows.items():
        assert row["status"] == "ok", f"{rid}: {row['status']} ({row['reason']})"
        for key in TIMES:
            assert positive(row["metrics"].get(key)), f"{rid}.{key} = {row['metrics'].get(key)}"
            assert len(row["samples"][key]) == row["info"]["rounds"] == data["meta"]["preprocess"]["repeats"]
        m = row["metrics"]
        # the ratio is taken inside each round: theirs / ours of one round, not of the medians
        s = row["samples"]
        want = [t / o for t, o in zip(s["theirs_s"], s["ours_s"])]
        assert s["wall_speedup"] == pytest.approx(want)
        assert min(s["speedup"]) <= m["speedup"] <= max(s["speedup"])
        info = row["info"]
        assert info["grid_equal"] is True, rid
        assert isinstance(info["max_abs_diff"], float) and info["max_abs_diff"] >= 0
        if section["device"] == "cpu":
            assert info["bit_exact"] is True and info["max_abs_diff"] == 0.0, rid
        # the grid holds the resized image's patches; tokens = patches / merge_size**2 (merge 2 in both)
        t, gh, gw = info["grid_thw"]
        assert t == 1 and info["patches"] == gh * gw and info["tokens"] * 4 == info["patches"]
    # the two geometries resize the same image differently (14- vs 16-pixel patches)
    assert rows["preprocess.qwen2.5-vl.high.640x480"]["info"]["size_resized"] != \
        rows["preprocess.qwen3-vl.high.640x480"]["info"]["size_resized"]


def test_preprocess_table_renders_and_rerenders(preprocess_run, tmp_path):
    data, md, js, stdout = preprocess_run
    for text in (md, stdout):
        assert "### Preprocessing: ours against transformers'" in text
        assert "| Geometry | Preset | Image | Resized (tokens) | Ours | transformers' | Ours faster by |" in text
        assert "pixel_values, ours vs theirs | grid_thw |" in text
        assert "python bench/benchmark.py --quick --only preprocess" in text
    assert "### Single" not in md and "### Video" not in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| qwen")]
    assert len(lines) == len(CASES)
    for ln in lines:
        assert ("bit-exact" in ln or "max abs diff" in ln) and "identical" in ln, ln
    again = rerender(js, tmp_path / "again.md")
    assert [ln for ln in again.splitlines() if ln.startswith("| qwen")] == lines


def test_the_pack_never_imports_the_bench_package():
    """bench/ measures the pack from outside: no module of the pack may import it."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("bench", "tests", "docs") or any(p.startswith(".") for p in rel.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # `from bench...`, `from .bench ...`, `from . import bench`
                names = [node.module or ""] + ([a.name for a in node.names] if node.level and not node.module else [])
            else:
                continue
            if any(n == "bench" or n.startswith("bench.") for n in names):
                offenders.append(f"{rel}: line {node.lineno}")
    assert not offenders, offenders
