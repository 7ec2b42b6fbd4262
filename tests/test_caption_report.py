"""The folder report (captioning/report.py): its JSON, its counts and the chart's pixels."""

import json

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qwenvl_fast.captioning import report as rep


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of True in a 1-D mask."""
    runs, start = [], None
    for i, v in enumerate(list(mask) + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _color_mask(pixels: np.ndarray, color) -> np.ndarray:
    return np.all(pixels == np.array(color, dtype=pixels.dtype), axis=-1)


def test_counts_tags_and_lengths_exactly():
    statuses = ["written", "written", "skipped", "skipped: past the limit of 2 files for this run",
                "error: cannot read image (x)", "captioned"]
    captions = ["a cat, Red_Car, a cat", "red car, a tree", "one two three four"]
    report = rep.build_report(statuses, captions)
    data = json.loads(json.dumps(report.as_dict()))
    assert data == {"files_seen": 6, "captioned": 3, "skipped": 2, "failed": 1, "captions": 3,
                    "caption_words": {"min": 4, "median": 4, "max": 5},
                    "tags": {"Red_Car": 2, "a cat": 1, "a tree": 1, "one two three four": 1}}
    assert report.summary().startswith("6 files: 3 captioned this run, 2 skipped, 1 failed; 3 captions")


def test_median_of_an_even_count_and_an_empty_folder():
    assert rep.build_report([], ["a", "a b c d"]).as_dict()["caption_words"] == {"min": 1, "median": 2.5, "max": 4}
    empty = rep.build_report(["error: x"], [])
    assert empty.as_dict()["caption_words"] is None and empty.as_dict()["tags"] == {}
    assert "failed" in empty.summary()


tags = st.sampled_from(["a", "b", "B", "c_d", "c d", "long tag here", ""])
caption_lists = st.lists(st.lists(tags, max_size=6).map(", ".join), max_size=10)


@settings(max_examples=100)
@given(caption_lists)
def test_each_tag_counts_once_per_caption(captions):
    counts = rep.count_tags(captions)
    per_caption = [{rep.tag_key(t) for t in rep.split_items(c)} for c in captions]
    assert sum(counts.values()) == sum(len(s) for s in per_caption)
    assert all(1 <= n <= len(captions) for n in counts.values())
    assert list(counts.values()) == sorted(counts.values(), reverse=True)


@settings(max_examples=100)
@given(st.lists(st.integers(0, 400), max_size=50), st.integers(1, 30))
def test_histogram_covers_every_length_once(lengths, bins):
    hist = rep.histogram(lengths, bins)
    assert sum(c for _, _, c in hist) == len(lengths)
    assert len(hist) <= bins
    for n in lengths:
        assert sum(1 for low, high, _ in hist if low <= n <= high) == 1


def test_chart_draws_one_bar_per_top_tag_and_the_histogram(tmp_path):
    captions = [f"tag{i % 25}, common" for i in range(60)] + ["x y z " * 10]
    report = rep.build_report(["written"] * len(captions), captions)
    image = rep.chart_tensor(report)
    assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3
    assert image.shape[2] >= 512 and 0.0 <= image.min() and image.max() <= 1.0
    pixels = (image[0].numpy() * 255).round().astype(np.uint8)
    bars = _color_mask(pixels, rep.TAG_BAR_COLOR)
    columns = np.nonzero(bars.any(axis=0))[0]
    rows = _runs(bars[:, columns[0]])
    assert len(rows) == rep.CHART_TOP_TAGS  # 27 tags, the top 20 drawn
    widths = [int(bars[(a + b) // 2].sum()) for a, b in rows]
    assert widths[0] == max(widths) and widths == sorted(widths, reverse=True)  # "common" (61) first, longest
    assert widths[0] > 5 * widths[-1]  # 61 captions against 2 or 3: visibly longer
    hist = _color_mask(pixels, rep.HISTOGRAM_COLOR)
    assert hist.sum() > 1000
    assert np.nonzero(hist.any(axis=1))[0].min() > rows[-1][1]  # below the tag bars
    path = rep.save_chart(report, tmp_path / "report.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (image.shape[2], image.shape[1])
        assert np.array_equal(np.asarray(png.convert("RGB")), pixels)


def test_chart_of_an_empty_folder_has_no_bars():
    pixels = np.asarray(rep.chart(rep.build_report([], [])))
    assert pixels.shape[1] >= 512
    assert not _color_mask(pixels, rep.TAG_BAR_COLOR).any()
    assert not _color_mask(pixels, rep.HISTOGRAM_COLOR).any()


def test_long_and_non_latin_tags_stay_inside_the_chart():
    report = rep.build_report(["written"], ["猫, " + "a very long tag " * 20])
    image = rep.chart(report)
    assert image.width == rep.CHART_WIDTH
    bars = _color_mask(np.asarray(image), rep.TAG_BAR_COLOR)
    assert bars.any() and bars[:, -rep._MARGIN:].sum() == 0  # no bar drawn into the right margin


def test_folder_report_reads_the_folder_safely(tmp_path):
    """Every file's caption as the folder holds it: one that is not UTF-8, a link, a folder, an empty file and a
    missing one count as none; a caption only returned (caption files off) counts as returned."""
    from qwenvl_fast.captioning import CaptionResult

    names = ["ok", "bad", "link", "dir", "empty", "missing", "returned"]
    files = [tmp_path / f"{n}.png" for n in names]
    (tmp_path / "ok.txt").write_text("a, b", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    outside = tmp_path.parent / "outside.txt"
    outside.write_text("secret, tags", encoding="utf-8")
    (tmp_path / "link.txt").symlink_to(outside)
    (tmp_path / "dir.txt").mkdir()
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    statuses = ["written", "skipped", "error: x", "error: y", "skipped", "error: z", "captioned"]
    results = [CaptionResult(f, "c, d" if s == "captioned" else "", s) for f, s in zip(files, statuses)]
    report = rep.folder_report(results, files, ".txt").as_dict()
    assert report["captions"] == 2 and report["tags"] == {"a": 1, "b": 1, "c": 1, "d": 1}
    assert (report["files_seen"], report["captioned"], report["skipped"], report["failed"]) == (7, 2, 2, 3)
