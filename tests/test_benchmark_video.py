"""The benchmark's 'video' section in --quick mode on a tiny model: every row is measured through the video
path and rendered.

No speed is asserted (a tiny model on a shared CPU proves nothing about speed): times must be finite and
positive, and the counts each row stands for must hold: frames sampled, visual tokens (frame pairs x tokens per
pair, within the preset's clip budget unless one pair per frame is the floor), one cache miss then memory hits,
and vision-tower calls (one per four frame pairs on the miss, none on a hit).
"""

import math

import pytest
import torch

from bench_run import positive, rerender, run_quick

MODEL = "synthetic:tiny-qwen2.5-vl"
ROWS = {("fast", 2), ("fast", 4), ("balanced", 2), ("high", 2)}  # the --quick grid, written out here
TIMES = ["encode_s", "tower_s", "preprocess_s", "hash_s", "per_frame_s", "run_s", "cpu_s", "hit_s", "hit_run_s"]


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    data, md, js, _ = run_quick(tmp_path_factory.mktemp("bench-video"), "--only", "video", "--model", MODEL,
                                timeout=300)
    return data, md, js


def test_video_rows_count_frames_tokens_cache_and_tower_calls(video_run):
    data, _, _ = video_run
    meta, (entry,) = data["meta"], data["models"]
    assert not entry.get("error"), entry.get("error")
    rows = {r["id"]: r for r in entry["rows"] if r["section"] == "video"}
    assert set(rows) == {f"video.{q}_{f}f" for q, f in ROWS}
    src = meta["video"]["source_frames"]
    budgets = {"fast": 1024, "balanced": 2048, "high": 4096}  # video.VIDEO_CLIP_TOKENS
    for (q, f) in ROWS:
        row = rows[f"video.{q}_{f}f"]
        assert row["status"] == "ok", f"{row['id']}: {row['status']} ({row['reason']})"
        m = row["metrics"]
        for key in TIMES:
            assert positive(m.get(key)), f"{row['id']}.{key} = {m.get(key)}"
        assert m["frames"] == f and m["source_frames"] == src == 2 * 4
        pairs = math.ceil(f / 2)
        assert m["tokens"] == pairs * m["tokens_per_frame_pair"] > 0
        assert m["budget_tokens"] == budgets[q] and m["tokens"] <= m["budget_tokens"]
        assert m["vision_calls"] == math.ceil(pairs / 4)  # the miss: four frame pairs per tower call
        assert m["hit_vision_calls"] == 0 and m["hit_count"] == meta["hit_repeats"]  # the repeats: memory hits
        assert m["encode_s"] == pytest.approx(m["preprocess_s"] + m["transfer_s"] + m["tower_s"])
        assert m["per_frame_s"] == pytest.approx(m["encode_s"] / f)
        assert row["info"]["rounds"] == 1 and row["info"]["preset"] == q
    fast2, fast4 = rows["video.fast_2f"]["metrics"], rows["video.fast_4f"]["metrics"]
    # within the per-frame cap, twice the frames is twice the tokens at the same size per frame pair
    assert fast4["tokens"] == 2 * fast2["tokens"] and fast4["tokens_per_frame_pair"] == fast2["tokens_per_frame_pair"]
    assert rows["video.balanced_2f"]["metrics"]["tokens"] >= fast2["tokens"]
    others = [r for r in entry["rows"] if r["section"] != "video"]
    assert others and all(r["status"] == "skipped" for r in others)


def test_video_table_renders_and_rerenders(video_run, tmp_path):
    data, md, js = video_run
    for text in ("### Video: encode time against frames and preset", "| Preset | Frames | Frame size |",
                 "python bench/benchmark.py --quick --only video", "(1 round)", "Tower calls"):
        assert text in md, text
    assert "### Single" not in md and "### Answers" not in md
    again = rerender(js, tmp_path / "again.md", timeout=120)
    row = {r["id"]: r for r in data["models"][0]["rows"]}["video.fast_4f"]
    assert "| `fast` | 4 | " in again and f"| {row['metrics']['tokens']:.0f} |" in again


def test_video_defaults_per_device():
    from bench.cli import apply_defaults, build_parser
    from bench.inputs import SECTIONS
    from bench.rows import video_row_labels, video_rows

    for device, quick, want in (("cpu", False, [("fast", 2), ("fast", 16), ("balanced", 2), ("high", 2)]),
                                ("cuda", False, [("fast", 16), ("fast", 32), ("fast", 64), ("balanced", 32),
                                                 ("high", 32)]),
                                ("cpu", True, [("fast", 2), ("fast", 4), ("balanced", 2), ("high", 2)])):
        args = build_parser().parse_args(["--only", "video"] + (["--quick"] if quick else []))
        apply_defaults(args, torch.device(device))
        assert video_rows(args) == want
        assert set(args.skip) == set(SECTIONS) - {"video"}
        assert set(video_row_labels(args)) == {f"video.{q}_{f}f" for q, f in want}
