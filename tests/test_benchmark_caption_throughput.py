"""``bench/caption_throughput.py --quick``: Caption Folder one by one, batched and against a real vLLM, measured.

No speed is asserted (a tiny model on a shared CPU proves nothing about speed): every row must exist, be measured
through the path it names (the number of run_once calls it stands for), with finite positive numbers and its
stages; the server row runs against the session's vLLM where its venv is installed, and is otherwise skipped with
the reason.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench_run import ROOT, positive
from vllm_server import DEFAULT_SERVED_NAME, vllm_missing_reason, vllm_server  # noqa: F401 (the fixture)

IMAGES = 8  # --quick


@pytest.fixture(scope="module")
def throughput(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("bench-caption")
    js, md = out / "caption.json", out / "caption.md"
    server_args = []
    if vllm_missing_reason() is None:
        server = request.getfixturevalue("vllm_server")
        server_args = ["--server-url", server.url, "--server-model", DEFAULT_SERVED_NAME]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "caption_throughput.py"), "--quick", "--rounds", "2",
                           "--json", str(js), "--markdown", str(md), *server_args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(js.read_text()), md.read_text(), proc.stdout, bool(server_args)


def test_local_rows_are_measured_through_their_paths(throughput):
    data, _, _, _ = throughput
    rows = data["rows"]
    assert data["meta"]["images"] == IMAGES and data["meta"]["rounds"] == 2
    runs = {"one_by_one": IMAGES, "batched": math.ceil(IMAGES / data["meta"]["chunk"])}
    for rid, want in runs.items():
        row = rows[rid]
        assert row["status"] == "ok", (rid, row["reason"])
        assert len(row["passes"]) == 2
        m = row["metrics"]
        for key in ("wall_s", "cpu_s", "captions_per_s", "run_total_s", "captions_per_s_min", "captions_per_s_max"):
            assert positive(m[key]), (rid, key, m[key])
        assert m["runs"] == want, (rid, m["runs"])
        assert m["new_tokens"] == IMAGES * data["meta"]["new_tokens"]
        assert m["visual_tokens"] > 0 and m["outside_s"] >= 0
        for stage in ("hash", "preprocess", "encode", "prefill", "decode"):
            assert positive(m["stages"].get(stage)), (rid, stage, m["stages"])
        assert m["captions_per_s_min"] <= m["captions_per_s"] <= m["captions_per_s_max"]
    # the paired ratios: one per round, against (a) itself 1.0
    assert data["ratios"]["one_by_one"] == [1.0, 1.0]
    assert len(data["ratios"]["batched"]) == 2 and all(positive(r) for r in data["ratios"]["batched"])


def test_server_row_against_vllm_or_skipped_with_the_reason(throughput):
    data, md, _, with_server = throughput
    row = data["rows"]["server"]
    if not with_server:
        assert row["status"] == "skipped" and "vLLM" in row["reason"], row
        assert "skipped: vLLM" in md
        return
    # (c) one shared prompt and (d) a prompt per image ({name}) go in the same chunks: each answer its own prompt.
    for rid in ("server", "server_per_image"):
        row = data["rows"][rid]
        assert row["status"] == "ok", (rid, row["reason"])
        m = row["metrics"]
        assert positive(m["captions_per_s"]) and positive(m["wall_s"])
        assert m["runs"] == math.ceil(IMAGES / (2 * data["meta"]["in_flight"])), (rid, m["runs"])
        assert m["new_tokens"] == IMAGES * data["meta"]["new_tokens"]
        for stage in ("hash", "preprocess", "upload", "prefill"):
            assert positive(m["stages"].get(stage)), (rid, stage, m["stages"])
        assert len(data["ratios"][rid]) == 2 and all(positive(r) for r in data["ratios"][rid])
    pairs = data["ratios"]["per_image_vs_shared"]
    assert len(pairs) == 2 and all(positive(r) for r in pairs)
    assert "Per-image prompts vs one shared prompt" in md


def test_tables_render_with_the_command_and_the_spread(throughput):
    _, md, stdout, _ = throughput
    assert md in stdout
    for text in ("python bench/caption_throughput.py --quick --rounds 2", "| Row | Captions/s (min-max) |",
                 "(a) local, one by one", "(b) local, batched", "(c) server backend", "(d) server backend",
                 "Where the time goes", "| encode |", "outside run_once", "1.00x (1.00x-1.00x)"):
        assert text in md, text
