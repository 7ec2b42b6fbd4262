"""What a folder holds after a Caption Folder run: the ``report`` (JSON) and ``report_image`` (a chart) outputs.

The report counts the run (files seen, captioned this run, skipped, failed) and describes every caption the
folder holds after it, the ones a run kept by skipping included: how often each tag occurs (a caption's
comma-separated items, compared as tag rules compare them: ``tag_rules.tag_key``) and how long captions are in
words. The chart shows the most frequent tags as bars and a histogram of caption lengths, drawn with Pillow (already
a dependency; nothing else is imported for it), as a ComfyUI IMAGE tensor ``[1, H, W, 3]`` float in [0, 1] or a
PNG file.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..core.errors import QwenVLError
from .tag_rules import split_items, tag_key

CHART_WIDTH = 768  # at least 512: readable on a Preview Image node at its default size
CHART_TOP_TAGS = 20
HISTOGRAM_BINS = 12
TAG_BAR_COLOR = (59, 125, 216)
HISTOGRAM_COLOR = (232, 134, 44)
_BACKGROUND = (255, 255, 255)
_INK = (33, 33, 33)
_GRID = (210, 210, 210)
_ROW = 22
_LABEL_WIDTH = 230
_MARGIN = 16
_HISTOGRAM_HEIGHT = 200


@dataclass
class FolderReport:
    """A run's counts and the folder's captions after it; ``as_dict`` is the ``report`` output's JSON."""

    files_seen: int = 0
    captioned: int = 0
    skipped: int = 0
    failed: int = 0
    tags: dict[str, int] = field(default_factory=dict)  # most frequent first, ties by tag
    lengths: list[int] = field(default_factory=list)  # words per caption, folder order

    def as_dict(self) -> dict[str, Any]:
        words = None
        if self.lengths:
            words = {"min": min(self.lengths), "median": statistics.median(self.lengths), "max": max(self.lengths)}
        return {"files_seen": self.files_seen, "captioned": self.captioned, "skipped": self.skipped,
                "failed": self.failed, "captions": len(self.lengths), "caption_words": words, "tags": self.tags}

    def summary(self) -> str:
        """One line for the CLI and the node's text: counts, length range and the top five tags."""
        line = (f"{self.files_seen} files: {self.captioned} captioned this run, {self.skipped} skipped, "
                f"{self.failed} failed; {len(self.lengths)} captions in the folder")
        if self.lengths:
            median = statistics.median(self.lengths)
            line += f", {min(self.lengths)}-{max(self.lengths)} words (median {median:g})"
        if self.tags:
            top = ", ".join(f"{tag} ({n})" for tag, n in list(self.tags.items())[:5])
            line += f"; top tags: {top}"
        return line


def status_kind(status: str) -> str:
    """``captioned``, ``skipped`` or ``failed`` for a Caption Folder result's status text."""
    if status.startswith(("written", "captioned")):
        return "captioned"
    if status.startswith("skipped"):
        return "skipped"
    return "failed"


def count_tags(captions: Iterable[str]) -> dict[str, int]:
    """How many captions hold each tag (once per caption), most frequent first, then alphabetically.

    Spellings that compare equal (``Red_Car``, ``red car``) count as one tag, shown as first met."""
    counts: dict[str, int] = {}
    shown: dict[str, str] = {}
    for caption in captions:
        seen_here = set()
        for item in split_items(caption):
            key = tag_key(item)
            if key in seen_here:
                continue
            seen_here.add(key)
            shown.setdefault(key, item)
            counts[key] = counts.get(key, 0) + 1
    order = sorted(counts, key=lambda k: (-counts[k], k))
    return {shown[k]: counts[k] for k in order}


def build_report(statuses: Sequence[str], captions: Sequence[str]) -> FolderReport:
    """The report of a run whose files ended with ``statuses`` (one per file seen) on a folder that now holds
    ``captions`` (the text of every caption file, skipped ones included)."""
    kinds = [status_kind(s) for s in statuses]
    return FolderReport(files_seen=len(statuses), captioned=kinds.count("captioned"),
                        skipped=kinds.count("skipped"), failed=kinds.count("failed"),
                        tags=count_tags(captions), lengths=[len(c.split()) for c in captions])


def folder_report(results: Sequence[Any], files: Sequence[Path], extension: str,
                  read: Callable[[Path], str] | None = None) -> FolderReport:
    """The report of a Caption Folder run: ``results`` (``CaptionResult``, one per file seen) and the caption of
    every file in ``files`` as the folder holds it now (read with ``commit.read_caption``: bounded, no link
    followed). A file whose caption was only returned (``captioned``: caption files off) counts with that caption;
    a missing, empty or unreadable caption file counts as none."""
    if read is None:
        from .commit import read_caption as read
    from .listing import caption_path

    returned = {r.path: r.caption for r in results if r.status == "captioned"}
    captions = []
    for f in files:
        if f in returned:
            captions.append(returned[f])
            continue
        try:
            text = read(caption_path(f, extension))
        except (OSError, QwenVLError):
            continue
        if text.strip():
            captions.append(text)
    return build_report([r.status for r in results], captions)


# ------------------------------------------------------------------------------------- the chart
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's own scalable font: no file on disk needed
    except (TypeError, OSError):  # an old Pillow or one without FreeType: its bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def histogram(lengths: Sequence[int], bins: int = HISTOGRAM_BINS) -> list[tuple[int, int, int]]:
    """(low, high, count) per bin of whole-word lengths, covering min..max inclusive in equal integer steps."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    step = max(1, -(-(high - low + 1) // bins))
    edges = list(range(low, high + 1, step))
    counts = [0] * len(edges)
    for n in lengths:
        counts[(n - low) // step] += 1
    return [(e, min(e + step - 1, high), c) for e, c in zip(edges, counts)]


def _draw_tags(draw: ImageDraw.ImageDraw, report: FolderReport, top: int, font) -> int:
    """The tag bars from ``top``; returns the y below them."""
    tags = list(report.tags.items())[:CHART_TOP_TAGS]
    draw.text((_MARGIN, top), f"Most frequent tags (top {len(tags)} of {len(report.tags)})", fill=_INK, font=font)
    top += _ROW + 4
    if not tags:
        draw.text((_MARGIN, top), "no captions in the folder", fill=_INK, font=font)
        return top + _ROW
    most = tags[0][1]
    bar_left = _MARGIN + _LABEL_WIDTH + 8
    bar_span = CHART_WIDTH - bar_left - _MARGIN - 48  # room for the count after the longest bar
    for tag, n in tags:
        label = _fit(draw, tag, font, _LABEL_WIDTH)
        draw.text((_MARGIN + _LABEL_WIDTH - draw.textlength(label, font=font), top + 3), label, fill=_INK, font=font)
        length = max(2, round(bar_span * n / most))
        draw.rectangle([bar_left, top + 3, bar_left + length, top + _ROW - 3], fill=TAG_BAR_COLOR)
        draw.text((bar_left + length + 6, top + 3), str(n), fill=_INK, font=font)
        top += _ROW
    return top


def _draw_histogram(draw: ImageDraw.ImageDraw, report: FolderReport, top: int, font) -> int:
    """The caption-length histogram from ``top``; returns the y below it."""
    draw.text((_MARGIN, top), "Caption length (words): captions per length", fill=_INK, font=font)
    top += _ROW + 4
    bins = histogram(report.lengths)
    if not bins:
        draw.text((_MARGIN, top), "no captions in the folder", fill=_INK, font=font)
        return top + _ROW
    most = max(c for _, _, c in bins)
    left, right = _MARGIN + 40, CHART_WIDTH - _MARGIN
    base = top + _HISTOGRAM_HEIGHT
    draw.line([left, top, left, base], fill=_GRID)
    draw.line([left, base, right, base], fill=_GRID)
    draw.text((_MARGIN, top), str(most), fill=_INK, font=font)
    draw.text((_MARGIN, base - 14), "0", fill=_INK, font=font)
    width = (right - left) / len(bins)
    for i, (low, high, count) in enumerate(bins):
        x0, x1 = left + i * width + 2, left + (i + 1) * width - 2
        if count:
            draw.rectangle([x0, base - max(2, round(_HISTOGRAM_HEIGHT * count / most)), x1, base - 1],
                           fill=HISTOGRAM_COLOR)
        label = str(low) if low == high else f"{low}-{high}"
        label = _fit(draw, label, font, int(width))
        draw.text((x0 + (x1 - x0 - draw.textlength(label, font=font)) / 2, base + 4), label, fill=_INK, font=font)
    return base + _ROW + 4


def chart(report: FolderReport) -> Image.Image:
    """The report as a picture ``CHART_WIDTH`` pixels wide: a title line, the top tags as bars, the histogram."""
    font, title_font = _font(13), _font(16)
    rows = min(len(report.tags), CHART_TOP_TAGS) or 1
    height = _MARGIN + 30 + (_ROW + 4 + rows * _ROW) + 20 + (_ROW + 4 + _HISTOGRAM_HEIGHT + _ROW + 4) + _MARGIN
    image = Image.new("RGB", (CHART_WIDTH, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    title = (f"{report.files_seen} files: {report.captioned} captioned, {report.skipped} skipped, "
             f"{report.failed} failed; {len(report.lengths)} captions")
    draw.text((_MARGIN, _MARGIN), _fit(draw, title, title_font, CHART_WIDTH - 2 * _MARGIN), fill=_INK,
              font=title_font)
    y = _draw_tags(draw, report, _MARGIN + 30, font)
    _draw_histogram(draw, report, y + 20, font)
    return image


def chart_tensor(report: FolderReport):
    """The chart as a ComfyUI IMAGE: a float32 tensor ``[1, H, W, 3]`` in [0, 1]."""
    import numpy as np
    import torch

    pixels = np.asarray(chart(report), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).unsqueeze(0)


def save_chart(report: FolderReport, path: str | Path) -> Path:
    """Write the chart as a PNG at ``path`` (its folder must exist); returns the path."""
    path = Path(path)
    chart(report).save(path, format="PNG")
    return path
