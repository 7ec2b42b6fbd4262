"""``bench/cpu_linear.py``: every matrix and row count measured in both forms, each round's ratio reported with its
spread. No speed is asserted (a shared CPU proves nothing about speed)."""

from __future__ import annotations

import json
import subprocess
import sys

from bench_run import ROOT, positive


def test_every_cell_is_measured_in_both_forms_with_its_spread(tmp_path):
    js, md = tmp_path / "linear.json", tmp_path / "linear.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_linear.py"), "--rows", "1", "4", "--rounds", "2",
                           "--repeats", "1", "--json", str(js), "--markdown", str(md)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data, text = json.loads(js.read_text()), md.read_text()
    assert data["rounds"] == 2 and len(data["cells"]) == 4
    for name, by_rows in data["cells"].items():
        assert sorted(by_rows) == ["1", "4"], name
        for pairs in by_rows.values():
            assert len(pairs) == 2 and all(positive(t) for pair in pairs for t in pair)
    assert text in proc.stdout and "python bench/cpu_linear.py --rows 1 4 --rounds 2" in text
    assert text.count("| lm_head 2048->151936 |") == 2 and "x (" in text
