#!/usr/bin/env python
"""Qwen-VL Fast benchmark: every speed claim of the seed guide, measured side by side in one run.

    python bench/benchmark.py --quick --json out.json                     # smoke run, tiny models, < 1 min
    python bench/benchmark.py --model synthetic:qwen2.5-vl-3b@1 --repeats 1 --multi-quality fast \
        --compile-quality fast --compile-budget 480 --markdown docs/benchmark-cpu.md   # ~9 min on 2 idle cores
    python bench/benchmark.py --model synthetic:qwen2.5-vl-3b --device cuda --dtype bf16 --time-budget 170
    python bench/benchmark.py --model synthetic:qwen3-vl-4b --device cuda --time-budget 170

``synthetic:`` models are the real transformers architectures with random weights: compute time does
not depend on weight values, so the timings are real (the text is not). ``@N`` shortens the language
model to N layers (CPU); the vision tower is never shortened.

What is measured (each section alternates its variants within every round, rotating the order from
round to round; a ratio is computed inside each round, then the median over rounds is reported):

1. single image: the reference path (how existing packs embed an image) and the pack path at each
   quality preset (fast tensor preprocessing + pinned upload + encode, a cache miss), and right after
   the ``balanced`` miss the memory-tier hits (with and without the digest memo);
2. hashing a float image with and without the digest memo;
3. multi-image: 4 images in one encode call vs one by one;
4. end-to-end generation with a fixed number of new tokens: reference vs pack (miss) vs pack (hit);
5. disk-tier hit in a fresh process (a child process loads the model and reads the disk cache the
   parent wrote; model load is not counted);
6. torch.compile of the vision tower on vs off (a child process, bounded by --compile-budget), when
   ``vision_compile.py`` is present;
7. answers after the first token (prefix reuse, batched answers, decode vs floor, Caption Folder);
8. video: a clip of random frames (a ComfyUI IMAGE batch) encoded through the video path against frames and
   preset (a cache miss), then the same clip again (a memory-tier hit: no vision tower).

Ratios divide process CPU time on a CPU device (other tenants of a shared machine stretch wall time, not
the CPU time of the same work) and synchronised wall time on CUDA; both times are reported. The reference
path is what other packs do: PIL conversion, the processor on the CPU at the ultra budget, a pageable
``.to(device)``, transformers' stock vision attention, no cache, one image at a time.

Outputs: markdown tables on stdout (and --markdown FILE), everything incl. raw samples in --json FILE.
Both files are rewritten after every section, so a run cut short still leaves its results;
``--render-json FILE`` re-renders the tables of a saved result. ``--time-budget`` skips (and marks) what
would start after it; the compile child is bounded by ``--compile-budget`` and killed with its workers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

PACK_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_ROOT))
import pack_path  # noqa: E402

pack_path.import_pack()
from qwenvl_fast import batch_caption, caches  # noqa: E402
from qwenvl_fast import quality_presets as qp  # noqa: E402
from qwenvl_fast import qwenvl_loader as ql  # noqa: E402
from qwenvl_fast.core.api import ANSWER_BATCH_TOKENS, VideoClip  # noqa: E402
from qwenvl_fast.embedding_cache import canonical_digest  # noqa: E402
from qwenvl_fast.engine.memory import (  # noqa: E402
    decode_bytes_per_token,
    device_memory_bandwidth,
)
from qwenvl_fast.perf_monitor import RunMonitor, sync_device  # noqa: E402
from qwenvl_fast.vision import fast_preprocess  # noqa: E402
from qwenvl_fast.vision.images import load_image_file, pixel_values_for  # noqa: E402
from qwenvl_fast.vision.video import chunk_bounds  # noqa: E402

log = logging.getLogger("QwenVL-Fast")

PRESETS = ["ultra", "high", "balanced", "fast"]
PROMPT = "Describe this image in detail."
CHILD_MARK = "BENCH_CHILD_RESULT "
SECTIONS = ["single", "hash", "multi", "attention", "e2e", "disk", "compile", "answers", "video"]
QUICK_MODELS = ["synthetic:tiny-qwen2.5-vl", "synthetic:tiny-qwen3-vl"]
CPU_MODEL = "synthetic:qwen2.5-vl-3b@1"
GPU_MODEL = "synthetic:qwen2.5-vl-3b"
N_MULTI = 4
CAPTION_PROMPT = "Write a concise caption for this image."  # the Caption Folder node's default
SYSTEM_PROMPT = "You are a helpful assistant."
# The seed guide's table (Qwen3-VL-4B, one 1024x1024 image), which was never measured.
SEED_CLAIMS = {"ultra": "~3.5 s, 1.0x", "high": "~2.2 s, 1.6x", "balanced": "~1.7 s, 2.1x", "fast": "~1.0 s, 3.5x",
               "cache": "~0.01 s, 350x", "compile": "~1.3 s, 2.7x"}


# ---------------------------------------------------------------------------------------------
# Small helpers: images, clocks, budget, statistics
# ---------------------------------------------------------------------------------------------


def make_image(size: int, seed: int = 0, k: int = 0) -> torch.Tensor:
    """A deterministic ComfyUI-style float image [H, W, 3] in [0, 1] (same bytes in every process).

    ``k`` is written into four pixels so that each k is a different image (a different cache key)
    with the same content statistics: every cache miss below is a genuine new image.
    """
    h = w = int(size)
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    base = torch.stack([x.expand(h, w), y.expand(h, w),
                        ((torch.sin(x * 40) * torch.cos(y * 25)) * 0.5 + 0.5).expand(h, w)], dim=-1)
    img = (0.8 * base + 0.2 * torch.rand((h, w, 3), generator=gen)).contiguous()
    for j in range(4):
        img[0, j, 0] = ((k >> (8 * j)) & 255) / 255.0
    return img


def write_image_folder(folder: Path, count: int, size: int, seed: int, first_k: int) -> list[Path]:
    """``count`` different PNG files (``make_image`` content, each its own cache key), as Caption Folder reads them."""
    import numpy as np
    from PIL import Image

    files = []
    for i in range(count):
        arr = (make_image(size, seed, first_k + i).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        path = folder / f"image_{i:03d}.png"
        Image.fromarray(arr).save(path)
        files.append(path)
    return files


def parse_size(text: str) -> tuple[int, int]:
    """``1280x720`` -> (width, height)."""
    w, h = (int(x) for x in str(text).lower().split("x"))
    return w, h


def int_list(text: str | list[int]) -> list[int]:
    """``2,16`` -> [2, 16]."""
    return [int(x) for x in str(text).split(",") if x.strip()] if not isinstance(text, list) else text


def make_clip_frames(count: int, width: int, height: int, seed: int) -> torch.Tensor:
    """``count`` random frames ``[T, H, W, 3]``, float32 in [0, 1]: a ComfyUI IMAGE batch as video loaders give."""
    return torch.rand((count, height, width, 3), generator=torch.Generator().manual_seed(seed))


def stamp_clip(frames: torch.Tensor, k: int) -> torch.Tensor:
    """A copy of ``frames`` with ``k`` written into four pixels of every frame: a new clip (every frame a new
    cache key and digest-memo entry) with the same content statistics."""
    out = frames.clone()
    for j in range(4):
        out[:, 0, j, 0] = ((k >> (8 * j)) & 255) / 255.0
    return out


@contextmanager
def count_generate_calls(model: Any) -> Iterator[list[int]]:
    """Counts ``model.generate`` calls inside the block (an instance wrapper, removed afterwards)."""
    calls = [0]
    had = "generate" in vars(model)
    inner = model.generate

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return inner(*args, **kwargs)

    model.generate = counting
    try:
        yield calls
    finally:
        if had:
            model.generate = inner
        else:
            del model.generate


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


def fmt_time(s: float | None) -> str:
    if s is None or not isinstance(s, (int, float)) or math.isnan(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def fmt_ratio(r: float | None) -> str:
    if r is None or not isinstance(r, (int, float)) or math.isnan(r):
        return "-"
    if r >= 100:
        return f"{r:.0f}x"
    if r >= 10:
        return f"{r:.1f}x"
    return f"{r:.2f}x"


def row_labels(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """Every row the benchmark reports: id -> (section, label). Rows that do not run are reported as skipped."""
    size, q, n = args.image_size, args.multi_quality, args.new_tokens
    rows = {"single.reference": ("single", "reference path: PIL + processor (CPU) + .to(device) + eager, ultra")}
    rows.update({f"single.{p}": ("single", f"pack path, `{p}` (cache miss)") for p in PRESETS})
    rows.update({
        "cache.memory_hit": ("cache", "`balanced` memory-tier hit (digest memo)"),
        "cache.memory_hit_rehash": ("cache", "`balanced` memory-tier hit (new tensor: re-hash)"),
        "cache.disk_hit": ("cache", "`balanced` disk-tier hit in a fresh process (memory tier empty)"),
        "hash.no_memo": ("hash", f"hash a {size}x{size} float image (canonicalize + MD5)"),
        "hash.memo": ("hash", "same pixels again in a new view (digest memo lookup: xxh3 of the bytes)"),
        "hash.detail_score": ("hash", f"`auto` preset's detail score of a {size}x{size} image"),
        "multi.one_by_one": ("multi", f"{N_MULTI} images, `{q}`, one by one ({N_MULTI} encode calls)"),
        "multi.batched": ("multi", f"{N_MULTI} images, `{q}`, batched (1 encode call)"),
        "attention.per_window": ("attention", "transformers' vision attention (one SDPA call per window)"),
        "attention.grouped": ("attention", "pack: grouped SDPA (equal windows batched)"),
        "e2e.reference": ("e2e", f"reference: processor (CPU, ultra) + generate, no cache, {n} new tokens"),
        "e2e.pack_miss": ("e2e", f"pack: `balanced`, cache miss, {n} new tokens"),
        "e2e.pack_hit": ("e2e", f"pack: `balanced`, cache hit (memory), {n} new tokens"),
        "compile.off": ("compile", f"vision tower eager (`{args.compile_quality}`, steady state)"),
        "compile.on": ("compile", f"vision tower torch.compile (`{args.compile_quality}`, steady state)"),
    })
    rows.update(answer_row_labels(args))
    rows.update(video_row_labels(args))
    return rows


def video_rows(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(preset, frames) of the video rows: `fast` at each --video-frames, then each --video-presets at
    --video-preset-frames."""
    rows = [("fast", int(f)) for f in int_list(args.video_frames)]
    rows += [(str(p), int(args.video_preset_frames)) for p in str(args.video_presets).split(",") if p.strip()]
    return list(dict.fromkeys(rows))


def video_source_frames(args: argparse.Namespace) -> int:
    """Frames in the benchmark's clip: twice the most sampled, so that every row samples evenly from it."""
    return 2 * max(f for _, f in video_rows(args))


def video_row_labels(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """The rows of the 'video' section: one clip per (preset, frames), a cache miss then a memory hit."""
    w, h = parse_size(args.video_size)
    src = video_source_frames(args)
    return {f"video.{q}_{f}f": ("video", f"`{q}`, {f} frames sampled from a clip of {src} {w}x{h} frames: cache "
                                f"miss, then the same clip again (memory hit)") for q, f in video_rows(args)}


def answer_row_labels(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """The rows of the 'answers' section (prefix reuse, batched answers, decode vs floor, folder captioning)."""
    size, n = args.image_size, args.new_tokens
    k, t, q, a = args.answers_images, args.answers_new_tokens, args.answers_quality, args.answers_image_size
    f, fc = args.folder_images, args.folder_cache
    folder = f"Caption Folder, {f} {a}x{a} PNG files -> .txt, `{q}`, {t} new tokens, embeddings {fc}"
    return {
        "answers.prefix_reuse": ("answers", f"new question, seen {size}x{size} image, same system prompt: prefix KV "
                                 f"reused (`balanced`, {n} new tokens)"),
        "answers.prefix_no_reuse": ("answers", "new question, seen image, different system prompt: embedding-cache "
                                    "hit, prefix prefilled again"),
        "answers.each_one_by_one": ("answers", f"{k} images ({a}x{a}, `{q}`, embeddings cached), one answer each, "
                                    f"{t} new tokens: one by one (answer_batch_tokens=0)"),
        "answers.each_batched": ("answers", f"{k} images, one answer each: batched (answer_batch_tokens="
                                 f"{ANSWER_BATCH_TOKENS})"),
        "answers.decode_eager": ("answers", f"decode per token, eager (compile_decode=off), {t} new tokens"),
        "answers.decode_auto": ("answers", f"decode per token, compile_decode=auto, {t} new tokens"),
        "answers.folder_one_by_one": ("answers", f"{folder}: one by one"),
        "answers.folder_batched": ("answers", f"{folder}: batched ({batch_caption.CHUNK} images per run)"),
    }


def complete_rows(entry: dict[str, Any], args: argparse.Namespace, reason: str) -> None:
    """Add every row that was never reached as skipped, so the output always has the full set."""
    have = {r.id for r in entry["rows"]}
    for rid, (section, label) in row_labels(args).items():
        if rid not in have:
            entry["rows"].append(Row(rid, section, label, status="skipped", reason=reason))


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


# ---------------------------------------------------------------------------------------------
# Per-model measurements (main process)
# ---------------------------------------------------------------------------------------------


class ModelBench:
    def __init__(self, qm: ql.QwenVLModel, args: argparse.Namespace, budget: TimeBudget, result: dict[str, Any]):
        self.qm = qm
        self.args = args
        self.budget = budget
        self.result = result  # this model's entry in the JSON
        self.clock = Clock(qm.device)
        self.rows: dict[str, Row] = {}
        self.next_k = 1
        self.size = int(args.image_size)
        self.disk_image_k: int | None = None
        self.cache = ql.get_cache(True)
        self.basis = ratio_basis(qm.device)

    # -- plumbing --------------------------------------------------------------------------
    def ids(self, *rids: str) -> list[tuple[str, str, str]]:
        labels = row_labels(self.args)
        out = [(rid, *labels[rid]) for rid in rids]
        for rid, section, label in out:
            self.row(rid, section, label)
        return out

    def row(self, rid: str, section: str, label: str) -> Row:
        if rid not in self.rows:
            self.rows[rid] = Row(rid, section, label)
            self.result["rows"].append(self.rows[rid])
        return self.rows[rid]

    def new_image(self) -> tuple[int, torch.Tensor]:
        k = self.next_k
        self.next_k += 1
        return k, make_image(self.size, self.args.seed, k)

    def request(self, images: list[torch.Tensor], quality: str, cache: bool = True, new_tokens: int = 0):
        return ql.GenerationRequest(prompt=PROMPT, images=images, image_quality=quality, enable_image_cache=cache,
                                    disk_cache=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False, seed=0, monitor=True)

    def pack_run(self, images: list[torch.Tensor], quality: str, cache: bool = True, new_tokens: int = 0):
        """The engine's own path (``QwenVLModel.run``); with new_tokens=0 it stops after the prompt is built."""
        req = self.request(images, quality, cache, new_tokens)
        with self.clock.time() as t:
            res = self.qm.run(req)
        return t["wall"], res.record, t["cpu"]

    def rounds(self, section: str, n: int) -> Iterator[tuple[int, bool]]:
        """(round index, is_warmup) with the time budget applied before each round."""
        warm = int(self.args.warmup)
        last = 0.0
        for r in range(warm + n):
            if not self.budget.allows(last if r > 0 else 0.0):
                msg = f"{section}: stopped after {max(0, r - warm)} timed round(s): --time-budget reached"
                log.warning("[QwenVL-Fast] %s", msg)
                self.result["notes"].append(msg)
                return
            t0 = time.perf_counter()
            yield r, r < warm
            last = time.perf_counter() - t0

    def skip_section(self, ids_labels: list[tuple[str, str, str]], reason: str) -> None:
        for rid, section, label in ids_labels:
            row = self.row(rid, section, label)
            if not row.samples:
                row.status, row.reason = "skipped", reason

    def finish_rows(self, ids: list[str], why_empty: str) -> None:
        """Medians of the samples; a row with no samples is marked skipped."""
        for rid in ids:
            row = self.rows.get(rid)
            if row is None:
                continue
            if not any(row.samples.values()):
                if row.status == "ok":
                    row.status, row.reason = "skipped", why_empty
                continue
            for key, vals in row.samples.items():
                if vals:
                    row.metrics[key] = median(vals)
            row.info["rounds"] = max(len(v) for v in row.samples.values())

    @staticmethod
    def add(row: Row, **values: float) -> None:
        for k, v in values.items():
            row.samples.setdefault(k, []).append(float(v))

    def warm_start(self) -> None:
        """One small run so that thread pools, allocators and kernels are initialised before timing."""
        img = make_image(64, self.args.seed, 0)
        self.pack_run([img], "fast", cache=False)

    # -- reference path (how existing packs embed an image) ----------------------------------
    @contextmanager
    def stock_attention(self) -> Iterator[None]:
        """The reference runs transformers' own vision attention, as other packs do (not the pack's grouped SDPA)."""
        grouped = getattr(self.qm, "vision_attention", None) == "grouped sdpa"
        # The module the engine itself imported (a lookup by module name finds nothing once the pack is
        # imported as a package, and the reference would then silently keep the pack's grouped SDPA).
        va = ql.vision_attention if grouped else None
        if va is not None:
            va.disable_grouped_vision_attention(self.qm.model)
        try:
            yield
        finally:
            if va is not None:
                va.enable_grouped_vision_attention(self.qm.model)

    def reference_pixels(self, img: torch.Tensor, processor_call: bool = False, text: str | None = None):
        import numpy as np
        from PIL import Image

        lo, hi = qp.preset_pixels("ultra", self.qm.family.factor)
        pil = Image.fromarray(np.clip(255.0 * img.cpu().numpy(), 0, 255).astype(np.uint8))
        if processor_call:
            return self.qm.processor(text=[text], images=[pil], return_tensors="pt",
                                     size={"shortest_edge": lo, "longest_edge": hi})
        return self.qm.processor.image_processor(images=[pil], return_tensors="pt",
                                                 size={"shortest_edge": lo, "longest_edge": hi})

    def reference_embed(self, img: torch.Tensor) -> dict[str, float]:
        """PIL conversion + processor on the CPU at the ultra budget + pageable .to(device) + eager tower."""
        with self.clock.time() as t_pre:
            out = self.reference_pixels(img)
        pv, grid = out["pixel_values"], out["image_grid_thw"]
        with self.clock.time() as t_tr:
            pv = pv.to(self.qm.device)
            grid_dev = grid.to(self.qm.device)
        with self.stock_attention(), self.clock.time() as t_enc, torch.inference_mode():
            emb = self.qm.visual(pv, grid_thw=grid_dev)
        del emb, pv
        tokens = int(grid.prod(-1).sum()) // self.qm.family.merge_size ** 2
        enc = t_enc["wall"]  # synchronised wall time, like the engine's stage timer; CUDA-event time kept too
        extra = {"encode_gpu_s": t_enc["gpu"]} if "gpu" in t_enc else {}
        return dict(preprocess_s=t_pre["wall"], transfer_s=t_tr["wall"], encode_s=enc,
                    time_s=t_pre["wall"] + t_tr["wall"] + enc, cpu_s=t_pre["cpu"] + t_tr["cpu"] + t_enc["cpu"],
                    tokens=tokens, **extra)

    @staticmethod
    def pack_parts(rec) -> dict[str, float]:
        st = rec.stages
        hash_s, pre, tr, enc = (st.get(k, 0.0) for k in ("hash", "preprocess", "transfer", "encode"))
        return dict(hash_s=hash_s, preprocess_s=hash_s + pre, transfer_s=tr, encode_s=enc,
                    time_s=hash_s + pre + tr + enc, tokens=sum(i["tokens"] for i in rec.images))

    # -- section 1: one image, reference vs presets, cache hits ---------------------------------
    def section_single(self) -> None:
        ids = self.ids("single.reference", *[f"single.{p}" for p in PRESETS], "cache.memory_hit",
                       "cache.memory_hit_rehash")
        if not self.budget.allows():
            return self.skip_section(ids, "--time-budget reached")
        variants = ["reference", *PRESETS]
        hit_reps = int(self.args.hit_repeats)
        for r, warm in self.rounds("single image", int(self.args.repeats)):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            got: dict[str, dict[str, float]] = {}
            for v in order:
                k, img = self.new_image()
                if v == "reference":
                    got[v] = self.reference_embed(img)
                    log.info("[bench] round %d reference: %s (cpu %s)", r, fmt_time(got[v]["time_s"]),
                             fmt_time(got[v]["cpu_s"]))
                    continue
                wall, rec, cpu = self.pack_run([img], v, cache=True)
                if rec.images[0]["cache"] != "miss":
                    raise RuntimeError(f"expected a cache miss for a new image, got {rec.images[0]['cache']}")
                got[v] = {**self.pack_parts(rec), "run_s": wall, "cpu_s": cpu}
                log.info("[bench] round %d %s: %s (cpu %s, %d tokens)", r, v, fmt_time(got[v]["time_s"]),
                         fmt_time(cpu), got[v]["tokens"])
                if v == "balanced":
                    self.disk_image_k = k
                    hits: dict[str, list[float]] = {"hit": [], "rehash": [], "hit_cpu": [], "rehash_cpu": []}
                    for _ in range(hit_reps):
                        for kind in ("hit", "rehash"):
                            x = img if kind == "hit" else img.clone()  # a clone is unknown to the digest memo
                            gc.collect()  # keep a collector pause out of a millisecond-scale timing
                            w, rec_h, c = self.pack_run([x], v, cache=True)
                            if rec_h.images[0]["cache"] != "memory":
                                raise RuntimeError(f"expected a memory hit, got {rec_h.images[0]['cache']}")
                            hits[kind].append(w)
                            hits[f"{kind}_cpu"].append(c)
                    for kind in ("hit", "rehash"):
                        got[kind] = {"time_s": median(hits[kind]), "cpu_s": median(hits[f"{kind}_cpu"])}
            if warm:
                continue
            B = self.basis
            ultra = got["ultra"][B]
            ref = self.row("single.reference", "single", "")
            self.add(ref, **got["reference"])
            for p in PRESETS:
                row = self.rows[f"single.{p}"]
                self.add(row, **got[p], speedup_vs_ultra=ultra / got[p][B],
                         speedup_vs_reference=got["reference"][B] / got[p][B])
            miss = {"time_s": got["balanced"]["run_s"], "cpu_s": got["balanced"]["cpu_s"]}
            for kind, rid in (("hit", "cache.memory_hit"), ("rehash", "cache.memory_hit_rehash")):
                self.add(self.rows[rid], **got[kind], miss_s=miss["time_s"], miss_cpu_s=miss["cpu_s"],
                         miss_over_hit=miss[B] / got[kind][B])
        self.finish_rows([i for i, _, _ in ids], "no round finished within --time-budget")

    # -- section 2: hashing ----------------------------------------------------------------------
    def section_hash(self) -> None:
        ids = self.ids("hash.no_memo", "hash.memo", "hash.detail_score")
        if not self.budget.allows():
            return self.skip_section(ids, "--time-budget reached")
        img = make_image(self.size, self.args.seed, 0)
        memo = self.cache.digests
        reps = max(3, int(self.args.hit_repeats))
        for i in range(reps + 1):
            for v in (["no_memo", "memo"] if i % 2 == 0 else ["memo", "no_memo"]):
                # A new view of the same pixels on a repeat, as ComfyUI's batch unbind gives each run.
                x = img.clone() if v == "no_memo" else img[:]
                t0, c0 = time.perf_counter(), time.process_time()
                if v == "no_memo":
                    canonical = ql.canonicalize_image(x)
                    value = (canonical_digest(canonical), (int(canonical.shape[0]), int(canonical.shape[1])), None)
                    memo.put(img, value)  # what _prepare does: remember the digest for this tensor
                else:
                    value = memo.get(x)
                    if value is None:
                        raise RuntimeError("digest memo missed an unchanged tensor")
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if i > 0:  # the first pair warms up
                    self.add(self.rows[f"hash.{v}"], time_s=dt, cpu_s=dc)
            t0, c0 = time.perf_counter(), time.process_time()
            qp.detail_score(img)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i > 0:
                self.add(self.rows["hash.detail_score"], time_s=dt, cpu_s=dc)
        # The memo lookup takes microseconds, below the CPU clock's resolution: this ratio is in wall time.
        a, b = self.rows["hash.no_memo"].samples["time_s"], self.rows["hash.memo"].samples["time_s"]
        self.rows["hash.memo"].samples["no_memo_over_memo"] = [x / y for x, y in zip(a, b)]
        self.finish_rows([i for i, _, _ in ids], "not measured")

    # -- section 3: several images ---------------------------------------------------------------
    def section_multi(self) -> None:
        q = self.args.multi_quality
        ids = self.ids("multi.one_by_one", "multi.batched")
        if not self.budget.allows():
            return self.skip_section(ids, "--time-budget reached")
        variants = ["one_by_one", "batched"]
        for r, warm in self.rounds("multi-image", int(self.args.multi_repeats or self.args.repeats)):
            got: dict[str, dict[str, float]] = {}
            for v in (variants if r % 2 == 0 else variants[::-1]):
                imgs = [self.new_image()[1] for _ in range(N_MULTI)]
                calls = self.qm.vision_calls
                if v == "batched":
                    wall, rec, cpu = self.pack_run(imgs, q, cache=True)
                    parts = self.pack_parts(rec)
                    expected_calls = 1
                else:
                    wall, cpu, parts = 0.0, 0.0, {}
                    for img in imgs:
                        w, rec, c = self.pack_run([img], q, cache=True)
                        wall += w
                        cpu += c
                        for key, val in self.pack_parts(rec).items():
                            parts[key] = parts.get(key, 0.0) + val
                    expected_calls = N_MULTI
                if self.qm.vision_calls - calls != expected_calls:
                    raise RuntimeError(f"{v}: {self.qm.vision_calls - calls} encode calls, expected {expected_calls}")
                got[v] = dict(time_s=parts["time_s"], per_image_s=parts["time_s"] / N_MULTI,
                              encode_s=parts["encode_s"], run_s=wall, tokens=parts["tokens"], cpu_s=cpu,
                              per_image_cpu_s=cpu / N_MULTI)
                log.info("[bench] round %d %s: %s (cpu %s)", r, v, fmt_time(got[v]["time_s"]), fmt_time(cpu))
            if warm:
                continue
            base = got["one_by_one"][self.basis]
            for v in variants:
                self.add(self.rows[f"multi.{v}"], **got[v], speedup_vs_one_by_one=base / got[v][self.basis])
        self.finish_rows([i for i, _, _ in ids], "no round finished within --time-budget")

    # -- section: vision attention (transformers' per-window SDPA vs the pack's grouped SDPA) -------
    def section_attention(self) -> None:
        ids = self.ids("attention.per_window", "attention.grouped")
        if not self.budget.allows():
            return self.skip_section(ids, "--time-budget reached")
        if getattr(self.qm, "vision_attention", None) != "grouped sdpa":
            return self.skip_section(ids, f"grouped SDPA not in use (vision attention: {self.qm.vision_attention})")
        q = self.args.multi_quality
        img = make_image(self.size, self.args.seed, 99)
        canonical = ql.canonicalize_image(img)
        lo, hi = qp.preset_pixels(q, self.qm.family.factor)
        size = qp.smart_resize(int(canonical.shape[0]), int(canonical.shape[1]), self.qm.family.factor, lo, hi)
        pv, grid = fast_preprocess.preprocess_images(
            fast_preprocess.upload([canonical], self.qm.device), [size], patch_size=self.qm.family.patch_size,
            merge_size=self.qm.family.merge_size, temporal_patch_size=self.qm.family.temporal_patch_size,
            image_mean=self.qm.image_spec.image_mean, image_std=self.qm.image_spec.image_std, device=self.qm.device,
            dtype=self.qm.visual_dtype)
        grid_dev = grid.to(self.qm.device)
        outputs: dict[str, torch.Tensor] = {}
        for r, warm in self.rounds("vision attention", int(self.args.repeats)):
            got: dict[str, dict[str, float]] = {}
            for v in (["per_window", "grouped"] if r % 2 == 0 else ["grouped", "per_window"]):
                ctx = self.stock_attention() if v == "per_window" else contextlib.nullcontext()
                with ctx, self.clock.time() as t, torch.inference_mode():
                    out = self.qm.visual(pv, grid_thw=grid_dev)
                outputs[v] = (out.pooler_output if hasattr(out, "pooler_output") else out).float()
                got[v] = dict(time_s=t["wall"], cpu_s=t["cpu"])
            if warm:
                continue
            base = got["per_window"][self.basis]
            for v in ("per_window", "grouped"):
                self.add(self.rows[f"attention.{v}"], **got[v], speedup=base / got[v][self.basis])
        if outputs:
            diff = float((outputs["per_window"] - outputs["grouped"]).abs().max())
            self.rows["attention.grouped"].info["max_abs_diff"] = diff
        self.finish_rows([i for i, _, _ in ids], "no round finished within --time-budget")

    # -- section 4: end to end -------------------------------------------------------------------
    def reference_generate(self, img: torch.Tensor, n: int) -> dict[str, float]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        text = self.qm.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tok = self.qm.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with self.stock_attention(), self.clock.time() as t:
            inputs = self.reference_pixels(img, processor_call=True, text=text).to(self.qm.device)
            with torch.inference_mode():
                out = self.qm.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                             temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        new = int(out.shape[1] - inputs["input_ids"].shape[1])
        if new != n:
            raise RuntimeError(f"reference generate produced {new} tokens, expected {n}")
        return dict(time_s=t["wall"], cpu_s=t["cpu"], new_tokens=new, prompt_tokens=int(inputs["input_ids"].shape[1]))

    def section_e2e(self) -> None:
        n = int(self.args.new_tokens)
        ids = self.ids("e2e.reference", "e2e.pack_miss", "e2e.pack_hit")
        if not self.budget.allows():
            return self.skip_section(ids, "--time-budget reached")
        for r, warm in self.rounds("end-to-end", int(self.args.repeats)):
            got: dict[str, dict[str, float]] = {}
            _, img_ref = self.new_image()
            _, img = self.new_image()
            steps = ["reference", "pack"] if r % 2 == 0 else ["pack", "reference"]
            for v in steps:
                if v == "reference":
                    got["reference"] = self.reference_generate(img_ref, n)
                    continue
                for tier, name in (("miss", "pack_miss"), ("memory", "pack_hit")):
                    wall, rec, cpu = self.pack_run([img], "balanced", cache=True, new_tokens=n)
                    if rec.images[0]["cache"] != tier or rec.new_tokens != n:
                        raise RuntimeError(f"{name}: cache {rec.images[0]['cache']}, {rec.new_tokens} tokens")
                    st = rec.stages
                    got[name] = dict(time_s=wall, cpu_s=cpu, prefill_s=st.get("prefill", 0.0),
                                     decode_s=st.get("decode", 0.0),
                                     embed_s=sum(st.get(k, 0.0) for k in ("hash", "preprocess", "transfer",
                                                                          "encode")),
                                     new_tokens=rec.new_tokens, prompt_tokens=rec.prompt_tokens)
            log.info("[bench] round %d e2e: reference %s, miss %s, hit %s", r, fmt_time(got["reference"]["time_s"]),
                     fmt_time(got["pack_miss"]["time_s"]), fmt_time(got["pack_hit"]["time_s"]))
            if warm:
                continue
            B = self.basis
            ref = got["reference"][B]
            self.add(self.rows["e2e.reference"], **got["reference"])
            miss, hit = got["pack_miss"], got["pack_hit"]
            self.add(self.rows["e2e.pack_miss"], **miss, speedup_vs_reference=ref / miss[B])
            self.add(self.rows["e2e.pack_hit"], **hit, speedup_vs_reference=ref / hit[B],
                     speedup_vs_miss=miss[B] / hit[B])
        self.finish_rows([i for i, _, _ in ids], "no round finished within --time-budget")

    # -- section: answers (prefix-KV reuse, batched answers, decode vs the floor, folder captioning) ------
    def answer_request(self, images: list[torch.Tensor], prompt: str, *, system_prompt: str = "",
                       quality: str = "balanced", new_tokens: int | None = None, **extra: Any) -> ql.GenerationRequest:
        """A request with an exact answer length; memory-tier cache only (``disk_cache=False``)."""
        n = int(self.args.new_tokens if new_tokens is None else new_tokens)
        return ql.GenerationRequest(prompt=prompt, images=images, system_prompt=system_prompt, image_quality=quality,
                                    enable_image_cache=True, disk_cache=False, max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, seed=0, monitor=True, **extra)

    def timed_run(self, req: ql.GenerationRequest, qm: Any = None) -> tuple[dict[str, float], Any]:
        gc.collect()  # keep a collector pause out of the timing
        with self.clock.time() as t:
            res = (qm or self.qm).run(req)
        return t, res

    def section_answers(self) -> None:
        ids = self.ids(*answer_row_labels(self.args))
        if not self.budget.allows():
            return self.skip_section(ids, "--time-budget reached")
        a = self.args
        cache = ql.get_cache(False)  # what disk_cache=False requests use: every hit below is a memory hit
        folder = Path(tempfile.mkdtemp(prefix="qwenvl-bench-folder-"))
        self.answers_image: torch.Tensor | None = None
        try:
            files = write_image_folder(folder, int(a.folder_images), int(a.answers_image_size), a.seed, self.next_k)
            self.next_k += int(a.folder_images)
            parts = [(("answers.prefix_reuse", "answers.prefix_no_reuse"), self.answers_prefix),
                     (("answers.each_one_by_one", "answers.each_batched"), lambda: self.answers_each(files)),
                     (("answers.folder_one_by_one", "answers.folder_batched"),
                      lambda: self.answers_folder(folder, cache)),
                     (("answers.decode_eager", "answers.decode_auto"), self.answers_decode)]
            for rids, fn in parts:
                gpu_only_here = rids[0] == "answers.decode_eager" and self.qm.device.type != "cuda"  # skips at once
                if not self.budget.allows() and not gpu_only_here:
                    self.skip_section([i for i in ids if i[0] in rids], "--time-budget reached")
                    continue
                t0 = time.perf_counter()
                try:
                    fn()
                except Exception as exc:  # one part failing leaves the others measured
                    log.exception("[bench] answers: %s failed", rids[0])
                    for rid in rids:
                        self.rows[rid].status, self.rows[rid].reason = "failed", f"{type(exc).__name__}: {exc}"
                log.info("[bench] answers: %s took %.1f s", rids[0].split(".")[1].split("_")[0],
                         time.perf_counter() - t0)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.finish_rows([i for i, _, _ in ids], "no round finished within --time-budget")

    def answers_prefix(self) -> None:
        """(a) a new question with the same system prompt (prefix KV reused) vs (b) a system prompt never seen
        before: the image's embeddings are a memory hit, but its prefix (system turn + image tokens) is prefilled."""
        rids = ("answers.prefix_reuse", "answers.prefix_no_reuse")
        off = getattr(self.qm, "prefix_reuse_off_reason", "this engine has no prefix reuse")
        if off:
            return self.skip_section(self.ids(*rids), f"prefix reuse is off for this model: {off}")
        n = int(self.args.new_tokens)
        _, img = self.new_image()
        self.answers_image = img
        # Untimed: encodes the image (a miss) and keeps the prefix of SYSTEM_PROMPT + image.
        self.qm.run(self.answer_request([img], "Warm-up: what is this?", system_prompt=SYSTEM_PROMPT))
        for r, warm in self.rounds("answers: prefix reuse", int(self.args.repeats)):
            got: dict[str, dict[str, float]] = {}
            question = f"Question {r}: what is in this image?"
            for v in (["reuse", "no_reuse"] if r % 2 == 0 else ["no_reuse", "reuse"]):
                system = SYSTEM_PROMPT if v == "reuse" else f"System prompt number {r} of this benchmark."
                t, res = self.timed_run(self.answer_request([img], question, system_prompt=system))
                rec = res.record
                if rec.images[0]["cache"] != "memory" or rec.new_tokens != n:
                    raise RuntimeError(f"{v}: cache {rec.images[0]['cache']}, {rec.new_tokens} new tokens")
                if (rec.prefix_tokens_reused > 0) != (v == "reuse") or (v != "reuse" and not
                                                                         rec.prefix_tokens_prefilled):
                    raise RuntimeError(f"{v}: {rec.prefix_tokens_reused} prefix tokens reused, "
                                       f"{rec.prefix_tokens_prefilled} prefilled")
                st = rec.stages
                got[v] = dict(time_s=t["wall"], cpu_s=t["cpu"], prefill_s=st.get("prefill", 0.0),
                              decode_s=st.get("decode", 0.0), decode_per_token_s=st.get("decode", 0.0) / max(1, n - 1),
                              prompt_tokens=rec.prompt_tokens, prefix_tokens_reused=rec.prefix_tokens_reused,
                              prefix_tokens_prefilled=rec.prefix_tokens_prefilled, new_tokens=rec.new_tokens)
            log.info("[bench] round %d prefix: reuse %s (prefill %s), no reuse %s (prefill %s)", r,
                     fmt_time(got["reuse"]["time_s"]), fmt_time(got["reuse"]["prefill_s"]),
                     fmt_time(got["no_reuse"]["time_s"]), fmt_time(got["no_reuse"]["prefill_s"]))
            if warm:
                continue
            reuse, fresh = got["reuse"], got["no_reuse"]
            B = self.basis
            self.add(self.rows["answers.prefix_no_reuse"], **fresh)
            self.add(self.rows["answers.prefix_reuse"], **reuse, speedup_vs_no_reuse=fresh[B] / reuse[B],
                     wall_speedup_vs_no_reuse=fresh["time_s"] / reuse["time_s"],
                     prefill_speedup=fresh["prefill_s"] / reuse["prefill_s"])
        self.rows["answers.prefix_reuse"].info.update(self.decode_weights())

    def decode_weights(self) -> dict[str, float]:
        """What one decode step reads: the language model's weights (vision tower and input-embedding lookup
        left out; tied embeddings counted once, as the lm_head), and the lm_head alone timed on one token."""
        head_mod = self.qm.model.get_output_embeddings()
        head = head_mod.weight
        total = decode_bytes_per_token(self.qm)
        h = torch.randn(1, 1, int(head.shape[1]), dtype=head.dtype, device=head.device)
        times = []
        with torch.inference_mode():
            for _ in range(6):
                with self.clock.time() as t:
                    head_mod(h)
                times.append(t["wall"])
        return dict(weight_bytes_per_token=int(total), lm_head_bytes=int(head.numel() * head.element_size()),
                    vocab=int(head.shape[0]), lm_head_one_token_s=median(times[1:]))

    def answers_each(self, files: list[Path]) -> None:
        """N images, one answer each: one batched generate (default answer_batch_tokens) vs one by one (0)."""
        k, t, q = int(self.args.answers_images), int(self.args.answers_new_tokens), self.args.answers_quality
        imgs = [load_image_file(f) for f in files[:k]]
        if len(imgs) != k:
            raise RuntimeError(f"{len(imgs)} images for {k} answers (--folder-images < --answers-images)")
        budgets = {"one_by_one": 0, "batched": ANSWER_BATCH_TOKENS}

        def req(v: str) -> ql.GenerationRequest:
            return self.answer_request(imgs, CAPTION_PROMPT, quality=q, new_tokens=t, batch_mode=ql.BATCH_MODES[1],
                                       answer_batch_tokens=budgets[v])

        # Untimed: encodes the images once (both variants below are memory hits) and warms the batched shapes.
        self.qm.run(req("batched"))
        for r, warm in self.rounds("answers: one answer per image", int(self.args.repeats)):
            got: dict[str, dict[str, float]] = {}
            for v in (["one_by_one", "batched"] if r % 2 == 0 else ["batched", "one_by_one"]):
                calls = self.qm.vision_calls
                with count_generate_calls(self.qm.model) as gen_calls:
                    tm, res = self.timed_run(req(v))
                rec = res.record
                if (self.qm.vision_calls != calls or any(i["cache"] != "memory" for i in rec.images)
                        or rec.new_tokens != k * t or len(res.texts) != k):
                    raise RuntimeError(f"{v}: {self.qm.vision_calls - calls} encodes, tiers "
                                       f"{[i['cache'] for i in rec.images]}, {rec.new_tokens} tokens, "
                                       f"{len(res.texts)} answers")
                want = k if v == "one_by_one" else None
                if (want is not None and gen_calls[0] != want) or (want is None and k > 1 and gen_calls[0] >= k):
                    raise RuntimeError(f"{v}: {gen_calls[0]} generate calls for {k} answers")
                st = rec.stages
                got[v] = dict(time_s=tm["wall"], cpu_s=tm["cpu"], per_caption_s=tm["wall"] / k,
                              captions_per_s=k / tm["wall"], prefill_s=st.get("prefill", 0.0),
                              decode_s=st.get("decode", 0.0), new_tokens=rec.new_tokens,
                              prompt_tokens=rec.prompt_tokens, generate_calls=gen_calls[0])
            log.info("[bench] round %d one answer per image: one by one %s, batched %s", r,
                     fmt_time(got["one_by_one"]["time_s"]), fmt_time(got["batched"]["time_s"]))
            if warm:
                continue
            base = got["one_by_one"][self.basis]
            for v in budgets:
                self.add(self.rows[f"answers.each_{v}"], **got[v], speedup_vs_one_by_one=base / got[v][self.basis])

    def answers_folder(self, folder: Path, cache: Any) -> None:
        """Caption Folder end to end (read files, hash, embed or hit, answer, write .txt) through run_once."""
        f, t, q = int(self.args.folder_images), int(self.args.answers_new_tokens), self.args.answers_quality
        cold = self.args.folder_cache == "cold"
        budgets = {"one_by_one": 0, "batched": ANSWER_BATCH_TOKENS}
        manager = ql.ModelManager()
        manager.current = self.qm  # run_once reuses the loaded model (same options), as the node's handle does

        def empty_cache() -> None:
            cache.memory.clear()
            cache.digests.clear()

        def caption(budget: int) -> tuple[dict[str, float], int]:
            req = self.answer_request([], CAPTION_PROMPT, quality=q, new_tokens=t, answer_batch_tokens=budget)
            calls = self.qm.vision_calls
            gc.collect()
            with self.clock.time() as tm:
                results = batch_caption.caption_folder(self.qm.options, folder, req, write_txt=True, overwrite=True,
                                                       keep_model_loaded=True, manager=manager)
            bad = [f"{r.path.name}: {r.status}" for r in results if r.status != "written"]
            if len(results) != f or bad:
                raise RuntimeError(f"{len(results)} captions for {f} files; not written: {bad[:3]}")
            return tm, self.qm.vision_calls - calls

        try:
            empty_cache()
            tm, calls = caption(ANSWER_BATCH_TOKENS)  # the first pass: every image a miss (the warm-up)
            first = dict(first_pass_s=tm["wall"], first_pass_cpu_s=tm["cpu"], first_pass_vision_calls=calls)
            chunks = math.ceil(f / batch_caption.CHUNK)
            for r, warm in self.rounds("answers: caption folder", int(self.args.repeats)):
                got: dict[str, dict[str, float]] = {}
                for v in (["one_by_one", "batched"] if r % 2 == 0 else ["batched", "one_by_one"]):
                    if cold:
                        empty_cache()
                    tm, calls = caption(budgets[v])
                    if calls != (chunks if cold else 0):
                        raise RuntimeError(f"{v}: {calls} vision calls with {self.args.folder_cache} embeddings")
                    got[v] = dict(time_s=tm["wall"], cpu_s=tm["cpu"], captions_per_s=f / tm["wall"],
                                  per_caption_s=tm["wall"] / f)
                log.info("[bench] round %d caption folder: one by one %s, batched %s", r,
                         fmt_time(got["one_by_one"]["time_s"]), fmt_time(got["batched"]["time_s"]))
                if warm:
                    continue
                base = got["one_by_one"][self.basis]
                for v in budgets:
                    self.add(self.rows[f"answers.folder_{v}"], **got[v],
                             speedup_vs_one_by_one=base / got[v][self.basis])
            self.rows["answers.folder_batched"].info.update(first)
        finally:
            manager.current = None

    def answers_decode(self) -> None:
        """Decode time per token (one cached image, fixed length) against the weight-bandwidth floor (CUDA)."""
        rids = ("answers.decode_eager", "answers.decode_auto")
        if self.qm.device.type != "cuda":
            return self.skip_section(self.ids(*rids), "GPU only: decode per token against a CUDA device's weight-"
                                     f"bandwidth floor (this run: {self.qm.device.type})")
        has_compile = "compile_decode" in {fl.name for fl in dataclasses.fields(ql.LoadOptions)}
        modes = {"eager": "off", "auto": "auto"} if has_compile else {"eager": None}
        if not has_compile:
            self.skip_section(self.ids("answers.decode_auto"), "this build's LoadOptions has no compile_decode")
        t = int(self.args.answers_new_tokens)
        weights = self.decode_weights()
        bandwidth = device_memory_bandwidth(self.qm.device)
        floor = weights["weight_bytes_per_token"] / bandwidth if bandwidth else None
        models: dict[str, Any] = {}
        img = self.answers_image if self.answers_image is not None else self.new_image()[1]
        try:
            for v, mode in modes.items():
                if mode is None or getattr(self.qm.options, "compile_decode", None) == mode:
                    models[v] = self.qm
                else:
                    models[v] = ql.load_model(dataclasses.replace(self.qm.options, compile_decode=mode))

            def req(i: int) -> ql.GenerationRequest:
                return self.answer_request([img], f"Question {i}: describe this image in detail.", new_tokens=t)

            warmups: dict[str, list[float]] = {}
            for v, m in models.items():  # encode (once), compile, and a second prompt length
                for i in range(2):
                    tm, _ = self.timed_run(req(-1 - i), m)
                    warmups.setdefault(v, []).append(tm["wall"])
            for r, warm in self.rounds("answers: decode per token", int(self.args.repeats)):
                got: dict[str, dict[str, float]] = {}
                for v in (list(models) if r % 2 == 0 else list(models)[::-1]):
                    tm, res = self.timed_run(req(r), models[v])
                    rec = res.record
                    if rec.new_tokens != t:
                        raise RuntimeError(f"{v}: {rec.new_tokens} new tokens, expected {t}")
                    per = rec.stages.get("decode", 0.0) / max(1, t - 1)
                    got[v] = dict(time_s=tm["wall"], decode_s=rec.stages.get("decode", 0.0), decode_per_token_s=per,
                                  tokens_per_s=1.0 / per, **({"over_floor": per / floor} if floor else {}))
                log.info("[bench] round %d decode per token: %s", r,
                         ", ".join(f"{v} {fmt_time(g['decode_per_token_s'])}" for v, g in got.items()))
                if warm:
                    continue
                for v, g in got.items():
                    self.add(self.rows[f"answers.decode_{v}"], **g,
                             speedup_vs_eager=got["eager"]["decode_per_token_s"] / g["decode_per_token_s"])
            for v, m in models.items():
                self.rows[f"answers.decode_{v}"].info.update(
                    weights, floor_s=floor, bandwidth_bytes_per_s=bandwidth, warmup_s=warmups.get(v),
                    compile_decode=getattr(m.options, "compile_decode", None),
                    compile_state={k: str(val)[:200] for k, val in vars(m).items() if "compile" in k})
        finally:
            for m in models.values():
                if m is not self.qm:
                    m.close()
            ql.release_memory()

    # -- section: video (encode time against frames and preset; a repeated clip) -----------------
    def video_request(self, clip: VideoClip, quality: str, frames: int) -> ql.GenerationRequest:
        """One clip, one new token; memory-tier cache only (``disk_cache=False``): a repeat is a memory hit."""
        return ql.GenerationRequest(prompt="What happens in this video?", videos=[clip], max_frames=int(frames),
                                    image_quality=quality, enable_image_cache=True, disk_cache=False,
                                    max_new_tokens=1, min_new_tokens=1, do_sample=False, seed=0, monitor=True)

    @staticmethod
    def video_parts(rec) -> dict[str, float]:
        """Encode time of a clip = preprocess + transfer + vision tower, as the run record's stages give them."""
        st = rec.stages
        hash_s, pre, tr, enc = (st.get(k, 0.0) for k in ("hash", "preprocess", "transfer", "encode"))
        return dict(hash_s=hash_s, preprocess_s=pre, transfer_s=tr, tower_s=enc, encode_s=pre + tr + enc,
                    embed_s=hash_s + pre + tr + enc)

    def section_video(self) -> None:
        a = self.args
        specs = video_rows(a)
        rid_of = {spec: f"video.{spec[0]}_{spec[1]}f" for spec in specs}
        ids = self.ids(*rid_of.values())
        if not self.budget.allows():
            return self.skip_section(ids, "--time-budget reached")
        if not getattr(self.qm, "use_mm_encoder_outputs", False):
            return self.skip_section(ids, "video needs transformers 5.18 or newer (mm_encoder_outputs)")
        if getattr(self.qm.config, "video_token_id", None) is None:
            return self.skip_section(ids, f"{self.qm.family.name} has no video token")
        w, h = parse_size(a.video_size)
        src = video_source_frames(a)
        base = make_clip_frames(src, w, h, a.seed)
        tps = int(self.qm.family.temporal_patch_size)
        hit_reps = max(1, int(a.hit_repeats))
        # Untimed: the video path's first call (a 2-frame thumbnail clip), so that no row pays for initialisation.
        self.qm.run(self.video_request(VideoClip(make_clip_frames(2, 64, 64, a.seed + 1), 24.0), "fast", 2))
        for r, warm in self.rounds("video", int(a.repeats)):
            order = specs[r % len(specs):] + specs[:r % len(specs)]
            for quality, frames in order:
                k = self.next_k
                self.next_k += 1
                clip = VideoClip(stamp_clip(base, k), 24.0)
                calls = self.qm.vision_calls
                gc.collect()
                with self.clock.time() as t:
                    rec = self.qm.run(self.video_request(clip, quality, frames)).record
                v = rec.videos[0]
                miss_calls = self.qm.vision_calls - calls
                want = len(chunk_bounds(-(-int(v["frames"]) // tps)))
                if v["cache"] != "miss" or miss_calls != want or rec.new_tokens != 1:
                    raise RuntimeError(f"video {quality} x {frames}: cache {v['cache']}, {miss_calls} tower calls "
                                       f"(expected {want}), {rec.new_tokens} new tokens")
                parts = self.video_parts(rec)
                hits: dict[str, list[float]] = {"hit_s": [], "hit_run_s": [], "hit_cpu_s": []}
                calls = self.qm.vision_calls
                for _ in range(hit_reps):
                    gc.collect()  # keep a collector pause out of a millisecond-scale timing
                    with self.clock.time() as th:
                        rec_h = self.qm.run(self.video_request(clip, quality, frames)).record
                    if rec_h.videos[0]["cache"] != "memory" or rec_h.videos[0]["tokens"] != v["tokens"]:
                        raise RuntimeError(f"video {quality} x {frames}: repeat was {rec_h.videos[0]['cache']}")
                    hits["hit_s"].append(self.video_parts(rec_h)["embed_s"])
                    hits["hit_run_s"].append(th["wall"])
                    hits["hit_cpu_s"].append(th["cpu"])
                hit_calls = self.qm.vision_calls - calls
                if hit_calls:
                    raise RuntimeError(f"video {quality} x {frames}: {hit_calls} tower calls on memory hits")
                log.info("[bench] round %d video %s x %d: %d tokens (%d per frame pair), encode %s, hit %s", r,
                         quality, frames, v["tokens"], v["tokens_per_frame_pair"], fmt_time(parts["encode_s"]),
                         fmt_time(median(hits["hit_s"])))
                if warm:
                    continue
                row = self.rows[rid_of[(quality, frames)]]
                self.add(row, **parts, run_s=t["wall"], cpu_s=t["cpu"], frames=v["frames"],
                         source_frames=v["source_frames"], tokens=v["tokens"],
                         tokens_per_frame_pair=v["tokens_per_frame_pair"], budget_tokens=v["budget_tokens"],
                         per_frame_s=parts["encode_s"] / v["frames"], vision_calls=miss_calls,
                         hit_vision_calls=hit_calls, hit_count=hit_reps,
                         **{key: median(vals) for key, vals in hits.items()},
                         encode_over_hit=parts["encode_s"] / max(median(hits["hit_s"]), 1e-9))
                row.info.update(size_in=v["size_in"], size_resized=v["size_resized"], preset=v["preset"],
                                hit_s_all=row.info.get("hit_s_all", []) + [hits["hit_s"]])
        self.finish_rows([i for i, _, _ in ids], "no round finished within --time-budget")


# ---------------------------------------------------------------------------------------------
# Child processes: disk-tier hit in a fresh process, torch.compile on/off
# ---------------------------------------------------------------------------------------------


def child_disk(spec: dict[str, Any]) -> dict[str, Any]:
    """Fresh process: for each model, load it (not timed), then time hits that must come from the disk tier."""
    import diskcache  # noqa: F401  (imported before timing: the parent has it imported too)
    import safetensors.torch  # noqa: F401

    results = {}
    for job in spec["jobs"]:
        try:
            results[job["model"]] = _child_disk_job(job)
        except Exception as exc:
            log.exception("[bench] disk-hit child failed for %s", job["model"])
            results[job["model"]] = dict(error=f"{type(exc).__name__}: {exc}")
        caches._CACHES.clear()
        ql.release_memory()
    return results


def _child_setup(spec: dict[str, Any]):
    """A child process's model (load time measured apart), clock and test image."""
    t0 = time.perf_counter()
    qm = ql.load_model(ql.LoadOptions(model=spec["model"], dtype=spec["dtype"], device=spec["device"]))
    load_s = time.perf_counter() - t0
    return qm, load_s, Clock(qm.device), make_image(spec["size"], spec["seed"], spec["k"])


def _child_disk_job(spec: dict[str, Any]) -> dict[str, Any]:
    qm, load_s, clock, img = _child_setup(spec)
    cache = ql.get_cache(True)
    times, cpus, tiers = [], [], []
    for _ in range(int(spec["repeats"])):
        cache.memory.clear()  # every hit below reads the disk tier, as the first run after a restart does
        x = img.clone()  # a tensor the digest memo has never seen
        gc.collect()  # keep a collector pause out of a millisecond-scale timing
        req = ql.GenerationRequest(prompt=PROMPT, images=[x], image_quality=spec["quality"], max_new_tokens=0,
                                   enable_image_cache=True, disk_cache=True, monitor=True)
        with clock.time() as t:
            rec = qm.run(req).record
        times.append(t["wall"])
        cpus.append(t["cpu"])
        tiers.append(rec.images[0]["cache"])
    out = dict(times=times, cpu=cpus, tiers=tiers, load_s=load_s, vision_calls=qm.vision_calls)
    qm.close()
    return out


def child_compile(spec: dict[str, Any]) -> dict[str, Any]:
    """Encode one image eager vs compiled (steady state, alternated); warm-up reported separately."""
    qm, load_s, clock, img = _child_setup(spec)
    req = ql.GenerationRequest(prompt=PROMPT, images=[img], image_quality=spec["quality"], enable_image_cache=False)
    mon = RunMonitor(enabled=False)
    prepared = qm._prepare([img], req, None, mon)
    pv, grid = pixel_values_for(prepared, qm.image_spec, req.preprocess, mon)

    gpu_times: dict[str, list[float]] = {"eager": [], "compiled": []}
    cpu_times: dict[str, list[float]] = {"eager": [], "compiled": []}

    def encode(kind: str = ""):
        with clock.time() as t, torch.inference_mode():
            out = qm.encode(pv, grid)
        if kind and "gpu" in t:
            gpu_times[kind].append(t["gpu"])
        if kind:
            cpu_times[kind].append(t["cpu"])
        return t["wall"], out

    eager_first, ref_out = encode()
    with clock.time() as t:
        qm.set_compile("on")
    set_s = t["wall"]
    report = qm.compile_report
    if report is None or not getattr(report, "enabled", False):
        return dict(skipped=f"compile_vision_tower did not enable compile: {getattr(report, 'reason', report)}")
    warm1, _ = encode()
    warm2, out = encode()
    diff = float((out[0].embeds.float() - ref_out[0].embeds.float()).abs().max())
    stance = getattr(torch.compiler, "set_stance", None)
    eager, compiled = [], []
    for r in range(int(spec["repeats"])):
        for v in (["compiled", "eager"] if r % 2 == 0 else ["eager", "compiled"]):
            if v == "eager":
                if stance is None:
                    continue
                with torch.compiler.set_stance("force_eager"):
                    eager.append(encode("eager")[0])
            else:
                compiled.append(encode("compiled")[0])
    note = ""
    if stance is None:  # old torch: eager only measured before compiling
        eager = [eager_first]
        note = "eager measured once before compiling (torch.compiler.set_stance unavailable)"
    return dict(eager=eager, compiled=compiled, warmup=[warm1, warm2], set_compile_s=set_s, max_abs_diff=diff,
                load_s=load_s, eager_first=eager_first, note=note, gpu_event_s=gpu_times, cpu_s=cpu_times,
                report_warmup_s=getattr(report, "warmup_s", None))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (OSError, AttributeError):  # already gone, or no process groups (Windows)
        proc.kill()
    proc.wait()


def run_child(kind: str, spec: dict[str, Any], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-spec", json.dumps(spec)]
    log.info("[bench] child process (%s), timeout %.0f s", kind, timeout)
    # Its own session, so that a timeout kills the child and everything it started (compile workers).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise
    except BaseException:
        _kill_group(proc)
        raise
    for line in reversed(stdout.splitlines()):
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):])
    raise RuntimeError(f"child '{kind}' exited with {proc.returncode} and no result")


def child_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    spec = json.loads(args.child_spec)
    try:
        out = child_disk(spec) if args.child == "disk" else child_compile(spec)
    except Exception as exc:  # reported to the parent as a failed row
        log.exception("[bench] child failed")
        out = dict(error=f"{type(exc).__name__}: {exc}")
    print(CHILD_MARK + json.dumps(out), flush=True)
    return 0


def section_disk(jobs: list[tuple[dict[str, Any], dict[str, Any], dict[str, float] | None]], budget: TimeBudget,
                 env: dict[str, str], args: argparse.Namespace) -> None:
    """One fresh child process times the disk-tier hits of every model (jobs: entry, spec, parent miss time)."""
    rows = []
    labels = row_labels(args)
    for entry, spec, miss_s in jobs:
        row = Row("cache.disk_hit", *labels["cache.disk_hit"])
        entry["rows"].append(row)
        if spec.get("k") is None:
            row.status, row.reason = "skipped", "no balanced image was cached (single-image section did not run)"
        else:
            rows.append((row, spec, miss_s))
    if not rows:
        return

    def fail(status: str, reason: str) -> None:
        for row, _, _ in rows:
            row.status, row.reason = status, reason

    if not budget.allows():
        return fail("skipped", "--time-budget reached")
    try:
        outs = run_child("disk", {"jobs": [spec for _, spec, _ in rows]}, min(900.0, max(1.0, budget.left())), env)
    except subprocess.TimeoutExpired:
        return fail("skipped", "the child process did not finish within the time budget")
    except Exception as exc:
        return fail("failed", str(exc))
    if "error" in outs:
        return fail("failed", outs["error"])
    for row, spec, miss_s in rows:
        out = outs.get(spec["model"], {"error": "no result from the child"})
        if "error" in out:
            row.status, row.reason = "failed", out["error"]
            continue
        if any(t != "disk" for t in out["tiers"]) or out["vision_calls"]:
            row.status = "failed"
            row.reason = f"expected disk hits without encoding, got tiers {out['tiers']}, {out['vision_calls']} encodes"
            continue
        row.samples["time_s"], row.samples["cpu_s"] = out["times"], out["cpu"]
        row.metrics["first_s"], row.metrics["first_cpu_s"] = out["times"][0], out["cpu"][0]
        row.metrics["time_s"], row.metrics["cpu_s"] = median(out["times"]), median(out["cpu"])
        row.info.update(rounds=len(out["times"]), child_load_s=out["load_s"])
        if miss_s:
            B = ratio_basis(spec["device"] if spec["device"] != "auto" else ql.resolve_device("auto"))
            first = "first_cpu_s" if B == "cpu_s" else "first_s"
            row.metrics["miss_s"] = miss_s["time_s"]
            row.metrics["miss_over_hit"] = miss_s[B] / row.metrics[B]
            row.metrics["miss_over_first_hit"] = miss_s[B] / row.metrics[first]


def section_compile(rows: list[Row], spec: dict[str, Any], args: argparse.Namespace, budget: TimeBudget,
                    env: dict[str, str]) -> None:
    labels = row_labels(args)
    off = Row("compile.off", *labels["compile.off"])
    on = Row("compile.on", *labels["compile.on"])
    rows.extend([off, on])

    def skip(reason: str, status: str = "skipped") -> None:
        for r in (off, on):
            r.status, r.reason = status, reason

    if args.quick:
        return skip("--quick skips torch.compile")
    if "compile" in args.skip:
        return skip("--skip compile")
    if importlib.util.find_spec("vision_compile") is None:
        return skip("vision_compile.py is not in the pack yet")
    if args.compile_budget <= 0:
        return skip("--compile-budget 0")
    timeout = min(float(args.compile_budget), budget.left())
    if timeout <= 30:
        return skip("--time-budget reached (less than 30 s left for compile)")
    try:
        out = run_child("compile", spec, timeout, env)
    except subprocess.TimeoutExpired:
        return skip(f"compile + measurement did not finish within {timeout:.0f} s (--compile-budget/--time-budget)")
    except Exception as exc:
        return skip(str(exc), "failed")
    if "error" in out:
        return skip(out["error"], "failed")
    if "skipped" in out:
        return skip(out["skipped"])
    off.samples["time_s"], on.samples["time_s"] = out["eager"], out["compiled"]
    off.metrics["time_s"], on.metrics["time_s"] = median(out["eager"]), median(out["compiled"])
    cpu = out.get("cpu_s") or {}
    for row, kind in ((off, "eager"), (on, "compiled")):
        if cpu.get(kind):
            row.samples["cpu_s"] = cpu[kind]
            row.metrics["cpu_s"] = median(cpu[kind])
    B = ratio_basis(spec["device"] if spec["device"] != "auto" else ql.resolve_device("auto"))
    if B not in on.metrics or B not in off.metrics:
        B = "time_s"
    on.metrics["speedup_vs_eager"] = off.metrics[B] / on.metrics[B]
    on.metrics["warmup_first_s"], on.metrics["warmup_second_s"] = out["warmup"]
    on.info.update(max_abs_diff=out["max_abs_diff"], set_compile_s=out["set_compile_s"], note=out["note"],
                   report_warmup_s=out["report_warmup_s"], rounds=len(out["compiled"]))
    off.info.update(rounds=len(out["eager"]), note=out["note"])


# ---------------------------------------------------------------------------------------------
# Environment and output
# ---------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = dict(cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                                python=platform.python_version(), platform=platform.platform(),
                                torch=torch.__version__)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        info["transformers"] = "missing"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def row_map(model_entry: dict[str, Any]) -> dict[str, Row]:
    return {r.id: r for r in model_entry["rows"]}


def cell(row: Row | None, key: str, kind: str = "time") -> str:
    if row is None:
        return "-"
    if row.status != "ok":
        return f"{row.status}: {row.reason}" if kind == "status" else "-"
    v = row.metrics.get(key)
    if kind == "ratio":
        return fmt_ratio(v)
    if kind == "int":
        return "-" if v is None else f"{v:.0f}"
    return fmt_time(v)


def status_note(rows: list[Row | None]) -> list[str]:
    return [f"- {r.label}: **{r.status}** ({r.reason})" for r in rows if r is not None and r.status != "ok"]


def model_markdown(entry: dict[str, Any], args: argparse.Namespace) -> str:
    g = row_map(entry).get
    size = args.image_size
    basis = ratio_basis(entry.get("device") or "cpu")
    on_cpu = basis == "cpu_s"

    def cpu(r: Row | None, key: str = "cpu_s") -> str:
        """The CPU-time cell (CPU devices only)."""
        return f" {cell(r, key)} |" if on_cpu else ""

    cpu_head, cpu_rule = (" CPU time |", "---|") if on_cpu else ("", "")
    out = [f"## {entry['model']} ({entry.get('family', '?')}, {entry.get('device', '?')}, {entry.get('dtype', '?')})",
           ""]
    if entry.get("error"):
        out += [f"**failed:** {entry['error']}", ""]
    if entry.get("skipped"):
        out += [f"**skipped:** {entry['skipped']}", ""]
    out += [f"Model build {fmt_time(entry.get('load_s'))}. Rounds per row are in the JSON (`info.rounds`). "
            + ("Times are wall clock; **speedups are paired ratios of process CPU time** (all threads), which other "
               "tenants of a shared CPU hardly change, unlike wall time." if on_cpu else
               "Times are wall clock with the device synchronised; speedups are paired ratios of them."), ""]
    if args.only == ["answers"]:
        return "\n".join(out + answers_markdown(entry, args) + [""])
    if args.only == ["video"]:
        return "\n".join(out + video_markdown(entry, args) + [""])

    out += [f"### Single {size}x{size} image: embedding time by preset (pack path, cache miss)", "",
            f"| Configuration | Visual tokens | Embedding time |{cpu_head} Speedup | Seed guide claimed |",
            f"|---|---|---|{cpu_rule}---|---|"]
    for p in PRESETS:
        r = g(f"single.{p}")
        out.append(f"| `{p}` quality | {cell(r, 'tokens', 'int')} | {cell(r, 'time_s')} |{cpu(r)} "
                   f"{cell(r, 'speedup_vs_ultra', 'ratio')} | {SEED_CLAIMS[p]} |")
    hit = g("cache.memory_hit")
    out.append(f"| `balanced` + cache (repeat: memory hit) | {cell(g('single.balanced'), 'tokens', 'int')} | "
               f"{cell(hit, 'time_s')} |{cpu(hit)} {cell(hit, 'miss_over_hit', 'ratio')} vs miss | "
               f"{SEED_CLAIMS['cache']} |")
    con, bal, ultra = g("compile.on"), g("single.balanced"), g("single.ultra")
    if (con is not None and con.status == "ok" and bal is not None and bal.status == "ok"
            and args.compile_quality == "balanced"):
        t = bal.metrics["time_s"] - bal.metrics["encode_s"] + con.metrics["time_s"]
        sp = fmt_ratio(ultra.metrics["time_s"] / t) if ultra is not None and ultra.status == "ok" else "-"
        out.append(f"| `balanced` + torch.compile | {cell(bal, 'tokens', 'int')} | {fmt_time(t)} |"
                   f"{' - |' if on_cpu else ''} {sp} (wall, not paired) | {SEED_CLAIMS['compile']} |")
    else:
        why = cell(con, "", "status") if con is not None and con.status != "ok" else \
            f"see the compile table (`{args.compile_quality}`)"
        out.append(f"| `balanced` + torch.compile | - | - |{' - |' if on_cpu else ''} {why} | "
                   f"{SEED_CLAIMS['compile']} |")
    out += ["", "Speedup: ultra / preset, computed within each round, median over rounds. Embedding time = hash + "
            "preprocess + upload + vision tower, as the engine records them (CPU time: the whole call). The cache row "
            "is the whole pre-generation path on a hit (hash memo + lookup + prompt inputs) against the same path on "
            "the miss. The seed guide's numbers (Qwen3-VL-4B, never measured) are shown for comparison.", ""]
    out += status_note([g(f"single.{p}") for p in PRESETS] + [hit])

    out += ["", f"### Multi-image ({N_MULTI} images of {size}x{size}, `{args.multi_quality}`)", "",
            f"| Multi-image ({N_MULTI} images) | Total | Per image |{cpu_head} Speedup |",
            f"|---|---|---|{cpu_rule}---|"]
    for v in ("one_by_one", "batched"):
        r = g(f"multi.{v}")
        out.append(f"| {r.label if r else v} | {cell(r, 'time_s')} | {cell(r, 'per_image_s')} |{cpu(r)} "
                   f"{cell(r, 'speedup_vs_one_by_one', 'ratio')} |")
    out += ["", "Seed guide claimed (4 images, Qwen3-VL-4B): `ultra` ~14 s (~3.5 s per image), `balanced` ~6.8 s "
            "(~1.7 s per image). Here the same preset is compared batched vs one image per encode call.", ""]
    out += status_note([g("multi.one_by_one"), g("multi.batched")])

    out += ["", f"### Vision attention without flash-attn (one {size}x{size} image, `{args.multi_quality}`, "
            "encode only)", "",
            f"| Attention | Encode |{cpu_head} Speedup |", f"|---|---|{cpu_rule}---|"]
    for v in ("per_window", "grouped"):
        r = g(f"attention.{v}")
        out.append(f"| {r.label if r else v} | {cell(r, 'time_s')} |{cpu(r)} {cell(r, 'speedup', 'ratio')} |")
    grouped_row = g("attention.grouped")
    if grouped_row is not None and "max_abs_diff" in grouped_row.info:
        out += ["", f"Same inputs, alternated within each round; max |grouped - per-window| = "
                f"{grouped_row.info['max_abs_diff']:.1e}."]
    out += [""]
    out += status_note([g("attention.per_window"), grouped_row])

    out += ["", f"### Reference path vs pack path (one {size}x{size} image)", "",
            f"| Path | Visual tokens | Preprocess | Transfer | Encode | Total |{cpu_head} Speedup vs reference |",
            f"|---|---|---|---|---|---|{cpu_rule}---|"]
    ref = g("single.reference")
    out.append(f"| reference: PIL + processor (CPU) + pageable `.to()` + stock attention, ultra, no cache | "
               f"{cell(ref, 'tokens', 'int')} | {cell(ref, 'preprocess_s')} | {cell(ref, 'transfer_s')} | "
               f"{cell(ref, 'encode_s')} | {cell(ref, 'time_s')} |{cpu(ref)} 1.00x |")
    for p in ("ultra", "balanced"):
        r = g(f"single.{p}")
        out.append(f"| pack: tensor preprocess + pinned upload, `{p}` | {cell(r, 'tokens', 'int')} | "
                   f"{cell(r, 'preprocess_s')} | {cell(r, 'transfer_s')} | {cell(r, 'encode_s')} | "
                   f"{cell(r, 'time_s')} |{cpu(r)} {cell(r, 'speedup_vs_reference', 'ratio')} |")
    out += ["", "Pack preprocess includes canonicalisation and the MD5 of the image (cache key). Compile is "
            "measured separately below (the main process runs the tower eagerly).", ""]
    attn = entry.get("vision_attention")
    if attn and attn != entry.get("attention"):
        out += [f"The pack's vision attention here is `{attn}`; the reference runs transformers' stock attention "
                f"(`{entry.get('attention', 'sdpa')}`), as other packs do.", ""]
    miss_e2e = g("e2e.pack_miss")
    if bal is not None and bal.status == "ok" and miss_e2e is not None and miss_e2e.status == "ok":
        a, b = bal.metrics["time_s"], miss_e2e.metrics["embed_s"]
        line = (f"Noise check: the `balanced` miss was embedded twice, minutes apart, with identical work (above, "
                f"and in the end-to-end rows below): wall {fmt_time(a)} vs {fmt_time(b)} "
                f"({abs(a / b - 1) * 100:.0f}% apart)")
        hit_row = g("e2e.pack_hit")
        if on_cpu and hit_row is not None and hit_row.status == "ok":
            ca, cb = bal.metrics["cpu_s"], miss_e2e.metrics["cpu_s"] - hit_row.metrics["cpu_s"]
            line += (f"; CPU time {fmt_time(ca)} vs {fmt_time(cb)} (end-to-end miss minus hit) "
                     f"({abs(ca / cb - 1) * 100:.0f}% apart)")
        out += [line + ". Paired ratios (same round) are less exposed than rows measured far apart.", ""]
    out += status_note([ref])

    out += ["", "### Embedding cache", "", f"| Path | Time |{cpu_head} Miss / hit |", f"|---|---|{cpu_rule}---|"]
    miss = hit.m("miss_s") if hit is not None else None
    miss_cpu = hit.m("miss_cpu_s") if hit is not None else None
    out.append(f"| miss: hash + lookup + preprocess + encode + store + prompt inputs (`balanced`) | "
               f"{fmt_time(miss)} |{f' {fmt_time(miss_cpu)} |' if on_cpu else ''} 1x |")
    for rid in ("cache.memory_hit", "cache.memory_hit_rehash"):
        r = g(rid)
        out.append(f"| {r.label if r else rid} | {cell(r, 'time_s')} |{cpu(r)} {cell(r, 'miss_over_hit', 'ratio')} |")
    d = g("cache.disk_hit")
    out.append(f"| disk-tier hit, fresh process, first | {cell(d, 'first_s')} |{cpu(d, 'first_cpu_s')} "
               f"{cell(d, 'miss_over_first_hit', 'ratio')} |")
    out.append(f"| disk-tier hit, fresh process, median (memory tier cleared before each) | {cell(d, 'time_s')} |"
               f"{cpu(d)} {cell(d, 'miss_over_hit', 'ratio')} |")
    for rid in ("hash.no_memo", "hash.memo", "hash.detail_score"):
        r = g(rid)
        ratio = f"{cell(r, 'no_memo_over_memo', 'ratio')} (wall)" if rid == "hash.memo" else ""
        out.append(f"| {r.label if r else rid} | {cell(r, 'time_s')} |{cpu(r)} {ratio} |")
    out += ["", "Memory-hit ratios are paired within rounds; the disk hit runs in a child process, so its ratio is "
            "median miss / median hit. Model load in the child is not counted.", ""]
    out += status_note([g("cache.memory_hit"), g("cache.memory_hit_rehash"), d, g("hash.no_memo"), g("hash.memo"),
                            g("hash.detail_score")])

    n = args.new_tokens
    out += ["", f"### End-to-end generation (one {size}x{size} image, exactly {n} new tokens)", "",
            f"| Configuration | Total | Embedding | Prefill | Decode |{cpu_head} Speedup vs reference |",
            f"|---|---|---|---|---|{cpu_rule}---|"]
    for rid in ("e2e.reference", "e2e.pack_miss", "e2e.pack_hit"):
        r = g(rid)
        sp = "1.00x" if rid == "e2e.reference" and r is not None and r.status == "ok" else \
            cell(r, "speedup_vs_reference", "ratio")
        out.append(f"| {r.label if r else rid} | {cell(r, 'time_s')} | {cell(r, 'embed_s')} | "
                   f"{cell(r, 'prefill_s')} | {cell(r, 'decode_s')} |{cpu(r)} {sp} |")
    hit_e2e = g("e2e.pack_hit")
    out += ["", f"Pack hit vs pack miss: {cell(hit_e2e, 'speedup_vs_miss', 'ratio')}. The reference's stages are "
            "inside one `generate()` call and are not split."]
    e2e_ref = g("e2e.reference")
    if e2e_ref is not None and e2e_ref.status == "ok" and ref is not None and ref.status == "ok":
        gen = e2e_ref.metrics[basis] - ref.metrics[basis]
        if gen > 0:
            out[-1] += (f" Its prefill + decode is about {fmt_time(gen)} of {'CPU' if on_cpu else 'wall'} time (its "
                        "total minus the reference embedding measured in the single-image rows; not paired).")
    out.append("")
    out += status_note([e2e_ref, g("e2e.pack_miss"), hit_e2e])

    out += ["", f"### torch.compile of the vision tower (one {size}x{size} image at `{args.compile_quality}`, "
            "encode only)", "",
            f"| Configuration | Encode (steady state) |{cpu_head} Speedup | Warm-up (1st, 2nd call) |",
            f"|---|---|{cpu_rule}---|---|"]
    off, on = g("compile.off"), g("compile.on")
    if off is not None and off.status == "ok":
        out.append(f"| eager | {cell(off, 'time_s')} |{cpu(off)} 1.00x | - |")
    else:
        out.append(f"| eager | - |{' - |' if on_cpu else ''} - | {cell(off, '', 'status')} |")
    if on is not None and on.status == "ok":
        out.append(f"| compiled | {cell(on, 'time_s')} |{cpu(on)} {cell(on, 'speedup_vs_eager', 'ratio')} | "
                   f"{cell(on, 'warmup_first_s')}, {cell(on, 'warmup_second_s')} |")
        out += ["", f"Child process; eager and compiled alternate within each round (eager via "
                f"`torch.compiler.set_stance('force_eager')`); max |compiled - eager| = "
                f"{on.info.get('max_abs_diff', float('nan')):.1e}. {on.info.get('note') or ''}"]
    else:
        out.append(f"| compiled | - |{' - |' if on_cpu else ''} - | {cell(on, '', 'status')} |")
    out.append("")
    out += answers_markdown(entry, args)
    out += video_markdown(entry, args)
    return "\n".join(out)


def spread(row: Row | None, key: str, kind: str = "ratio") -> str:
    """A row's median with its spread over rounds: ``1.45x (1.40x-1.50x)``; '-' when not measured."""
    if row is None or row.status != "ok" or not row.samples.get(key):
        return "-"
    vals = row.samples[key]
    f = fmt_ratio if kind == "ratio" else fmt_time
    med = f(row.metrics.get(key, median(vals)))
    return f"{med} (1 round)" if len(vals) == 1 else f"{med} ({f(min(vals))}-{f(max(vals))})"


def fmt_bytes(n: float | None) -> str:
    if not isinstance(n, (int, float)) or n <= 0:
        return "-"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def answers_markdown(entry: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The 'answers' section: prefix reuse, N answers batched vs one by one, decode vs floor, folder captioning."""
    g = row_map(entry).get
    on_cpu = ratio_basis(entry.get("device") or "cpu") == "cpu_s"
    basis = "CPU time" if on_cpu else "wall time"
    cpu_head, cpu_rule = (" CPU time |", "---|") if on_cpu else ("", "")

    def cpu(r: Row | None) -> str:
        return f" {cell(r, 'cpu_s')} |" if on_cpu else ""

    rows = [g(rid) for rid in answer_row_labels(args)]
    rounds = max([int(r.info.get("rounds", 0)) for r in rows if r is not None] or [0])
    size, n, t = args.image_size, args.new_tokens, args.answers_new_tokens
    out = ["", "### Answers: prefix reuse, one answer per image batched, decode, folder captioning", "",
           f"Each pair alternates within every round (order rotated); a speedup is computed inside each round from "
           f"{basis} and shown as the median over rounds with its spread (min-max, {rounds} round(s)). "
           f"compile_decode of the loaded model: `{entry.get('compile_decode', 'n/a')}`.", ""]

    a, b = g("answers.prefix_reuse"), g("answers.prefix_no_reuse")
    out += [f"#### New question on a seen image ({size}x{size}, `balanced`, exactly {n} new tokens)", "",
            f"| Configuration | Total |{cpu_head} Prefill | Decode | Prompt tokens | Prefix tokens reused / "
            f"prefilled | Speedup end to end |",
            f"|---|---|{cpu_rule}---|---|---|---|---|"]
    for r, sp in ((a, spread(a, "speedup_vs_no_reuse")), (b, "1.00x" if b is not None and b.status == "ok" else "-")):
        out.append(f"| {r.label if r else '-'} | {cell(r, 'time_s')} |{cpu(r)} {cell(r, 'prefill_s')} | "
                   f"{cell(r, 'decode_s')} | {cell(r, 'prompt_tokens', 'int')} | "
                   f"{cell(r, 'prefix_tokens_reused', 'int')} / {cell(r, 'prefix_tokens_prefilled', 'int')} | {sp} |")
    if a is not None and a.status == "ok" and b is not None and b.status == "ok":
        am, bm, info = a.metrics, b.metrics, a.info
        per = am["decode_per_token_s"]
        out += ["", f"Prefill alone (wall time of the stage): {spread(a, 'prefill_speedup')}; end to end in wall "
                f"time: {spread(a, 'wall_speedup_vs_no_reuse')}."]
        if am["time_s"] > am["prefill_s"]:
            out.append(f"With (a) the prefix costs nothing more, so end to end is bounded by the rest: decode "
                       f"{fmt_time(am['decode_s'])} of (a)'s {fmt_time(am['time_s'])} total. Even a prefill of zero "
                       f"would make (b)/(a) at most {fmt_ratio(bm['time_s'] / (am['time_s'] - am['prefill_s']))} "
                       "(wall).")
        wb, hb, head_s = info.get("weight_bytes_per_token"), info.get("lm_head_bytes"), info.get("lm_head_one_token_s")
        if wb and hb and head_s:
            out.append(f"Decode takes {fmt_time(per)} per token (the {n - 1} after the first). Each step reads the "
                       f"language model's weights, {fmt_bytes(wb)} ({entry.get('dtype', '?')}), of which "
                       f"{fmt_bytes(hb)} ({hb / wb * 100:.0f}%) are the {info.get('vocab', '?')}-entry lm_head; that "
                       f"lm_head alone on one token takes {fmt_time(head_s)} here ({hb / head_s / 1e9:.1f} GB/s), "
                       f"{head_s / per * 100:.0f}% of a decode step. The whole step streams the weights at "
                       f"{wb / per / 1e9:.1f} GB/s.")
    out.append("")
    out += status_note([a, b])

    k = args.answers_images
    e1, e2 = g("answers.each_one_by_one"), g("answers.each_batched")
    out += ["", f"#### {k} images, one answer each ({args.answers_image_size}x{args.answers_image_size}, "
            f"`{args.answers_quality}`, exactly {t} new tokens, embeddings cached)", "",
            f"| Configuration | Total |{cpu_head} Per answer | Answers/s | generate calls | Speedup |",
            f"|---|---|{cpu_rule}---|---|---|---|"]
    for r in (e1, e2):
        sp = "1.00x" if r is e1 and r is not None and r.status == "ok" else spread(r, "speedup_vs_one_by_one")
        rate = "-" if r is None or r.m("captions_per_s") is None else f"{r.metrics['captions_per_s']:.2f}"
        out.append(f"| {r.label if r else '-'} | {cell(r, 'time_s')} |{cpu(r)} {cell(r, 'per_caption_s')} | "
                   f"{rate} | {cell(r, 'generate_calls', 'int')} | {sp} |")
    out.append("")
    out += status_note([e1, e2])

    d1, d2 = g("answers.decode_eager"), g("answers.decode_auto")
    out += ["", f"#### Decode per token against the weight-bandwidth floor (one image, exactly {t} new tokens)", "",
            "| Configuration | Decode per token | Tokens/s | Floor | x floor | Speedup vs eager |",
            "|---|---|---|---|---|---|"]
    eager_one = "1.00x" if d1 is not None and d1.status == "ok" else "-"
    for r in (d1, d2):
        floor = r.info.get("floor_s") if r is not None and r.status == "ok" else None
        tps = "-" if r is None or r.m("tokens_per_s") is None else f"{r.metrics['tokens_per_s']:.1f}"
        xf = "-" if r is None or r.m("over_floor") is None else f"{r.metrics['over_floor']:.2f}x"
        out.append(f"| {r.label if r else '-'} | {spread(r, 'decode_per_token_s', 'time')} | {tps} | "
                   f"{fmt_time(floor)} | {xf} | {spread(r, 'speedup_vs_eager') if r is d2 else eager_one} |")
    if d1 is not None and d1.status == "ok":
        i = d1.info
        bw = i.get("bandwidth_bytes_per_s")
        out += ["", f"Floor = {fmt_bytes(i.get('weight_bytes_per_token'))} of language-model weights read per token "
                f"/ {'-' if not bw else f'{bw / 1e12:.2f} TB/s'} peak memory bandwidth (device properties)."]
    out.append("")
    out += status_note([d1, d2])

    f1, f2 = g("answers.folder_one_by_one"), g("answers.folder_batched")
    out += ["", f"#### Caption Folder, {args.folder_images} image files end to end (files read, hashed, "
            f"{'encoded' if args.folder_cache == 'cold' else 'embeddings from the memory cache'}, answered, "
            f".txt written; `{args.answers_quality}`, exactly {t} new tokens)", "",
            f"| Configuration | Total |{cpu_head} Captions/s | Speedup |", f"|---|---|{cpu_rule}---|---|"]
    for r in (f1, f2):
        sp = "1.00x" if r is f1 and r is not None and r.status == "ok" else spread(r, "speedup_vs_one_by_one")
        rate = "-" if r is None or r.m("captions_per_s") is None else f"{r.metrics['captions_per_s']:.2f}"
        out.append(f"| {r.label if r else '-'} | {cell(r, 'time_s')} |{cpu(r)} {rate} | {sp} |")
    if f2 is not None and f2.status == "ok" and "first_pass_s" in f2.info:
        i = f2.info
        out += ["", f"First pass (every image a miss, batched; the warm-up, not paired): "
                f"{fmt_time(i['first_pass_s'])}, {args.folder_images / i['first_pass_s']:.2f} captions/s, "
                f"{i['first_pass_vision_calls']} vision-tower calls."]
    out.append("")
    out += status_note([f1, f2])
    return out


def video_markdown(entry: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The 'video' section: encode time of a clip against frames and preset, and the repeated clip."""
    g = row_map(entry).get
    on_cpu = ratio_basis(entry.get("device") or "cpu") == "cpu_s"
    w, h = parse_size(args.video_size)
    src = video_source_frames(args)
    rows = [g(rid) for rid in video_row_labels(args)]
    rounds = max([int(r.info.get("rounds", 0)) for r in rows if r is not None] or [0])
    cpu_head, cpu_rule = (" CPU time (whole miss call) |", "---|") if on_cpu else ("", "")
    out = ["", f"### Video: encode time against frames and preset (a clip of {src} random {w}x{h} frames, a "
           "float32 IMAGE batch; exactly 1 new token)", "",
           "Each row samples its frames evenly from a new clip (every frame a new cache key): the cache miss's "
           "encode time is preprocess + transfer + vision tower as the run record's stages give them (the tower "
           "runs four frame pairs per call); then the same clip again, a memory-tier hit (digest memo + lookup, no "
           f"tower call), {args.hit_repeats} time(s) per round. Median over rounds with the min-max "
           f"({rounds} round(s)); rows rotate their order from round to round.", "",
           f"| Preset | Frames | Frame size | Visual tokens | Tokens per frame pair | Encode (miss) | Per frame |"
           f"{cpu_head} Tower calls | Repeat (memory hit) |",
           f"|---|---|---|---|---|---|---|{cpu_rule}---|---|"]
    for (q, f), r in zip(video_rows(args), rows):
        size = "-"
        if r is not None and r.status == "ok" and r.info.get("size_resized"):
            rh, rw = r.info["size_resized"]
            size = f"{rw}x{rh}"
        cpu = f" {cell(r, 'cpu_s')} |" if on_cpu else ""
        out.append(f"| `{q}` | {f} | {size} | {cell(r, 'tokens', 'int')} | {cell(r, 'tokens_per_frame_pair', 'int')} "
                   f"| {spread(r, 'encode_s', 'time')} | {cell(r, 'per_frame_s')} |{cpu} "
                   f"{cell(r, 'vision_calls', 'int')} | {spread(r, 'hit_s', 'time')} |")
    out += ["", "Per frame = encode / frames sampled. The repeat's time is the embedding part of the call (hash "
            "stage: digest memo and cache lookup); the whole repeated call, with the prompt and a 1-token prefill, "
            "is `hit_run_s` in the JSON.", ""]
    out += status_note(rows)
    return out


def to_markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    meta = result["meta"]
    mach = meta["machine"]
    hw = mach.get("gpu") and f"{mach['gpu']} ({mach.get('gpu_memory_gib')} GiB, CUDA {mach.get('cuda')})" or \
        f"CPU {mach['cpu']}, {mach['cpu_count']} cores ({mach['torch_threads']} torch threads)"
    lines = ["# Qwen-VL Fast benchmark", "", "```", meta["command"], "```", "",
             f"- machine: {hw}; load average at start {mach.get('load_average')}",
             f"- torch {mach['torch']}, transformers {mach['transformers']}, Python {mach['python']}",
             f"- device {meta['device']}, dtype {meta['dtype']}, image {args.image_size}x{args.image_size}, "
             f"repeats {args.repeats} (multi-image {args.multi_repeats or args.repeats}), warm-up rounds "
             f"{args.warmup}, cache hits {args.hit_repeats} per round",
             f"- models: {', '.join(meta['models'])} (synthetic: real architecture, random weights; `@N` = N text "
             "layers, the vision tower is full size)",
             f"- started {meta['started']}, took {fmt_time(meta.get('elapsed_s'))}"]
    if args.repeats < 3 and not args.quick:
        lines.append(f"- note: {args.repeats} timed round(s) of each expensive row (a vision-tower variant costs "
                     "seconds to minutes here), so a 'median' is " + ("that one sample" if args.repeats == 1 else
                                                                     "the mean of the two samples")
                     + "; cheap rows (cache hits, hashes, "
                     f"disk hits) take {args.hit_repeats}+ samples per round. Raw samples are in the JSON.")
    for note in meta.get("notes", []):
        lines.append(f"- note: {note}")
    lines.append("")
    for entry in result["models"]:
        lines.append(model_markdown(entry, args))
        for note in entry.get("notes", []):
            lines.append(f"- note: {note}")
        lines.append("")
    return "\n".join(lines)


def jsonable(result: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(result, default=lambda o: asdict(o) if isinstance(o, Row) else str(o)))
    return out


def write_outputs(result: dict[str, Any], args: argparse.Namespace, final: bool = False) -> str:
    md = to_markdown(result, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(jsonable(result), indent=1))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md)
    return md


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Qwen-VL Fast benchmark (side by side, paired ratios, medians).")
    p.add_argument("--model", action="append", default=[],
                   help=f"model (repeatable); default {CPU_MODEL} on CPU, {GPU_MODEL} on CUDA, "
                        f"{' + '.join(QUICK_MODELS)} with --quick")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny models, 1 round, small images, no compile (checks the benchmark works)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds of the expensive sections (default: 1 quick, 2 CPU, 5 CUDA)")
    p.add_argument("--multi-repeats", type=int, default=None, help="rounds of the multi-image section (default "
                   "--repeats)")
    p.add_argument("--hit-repeats", type=int, default=None, help="cache hits / hashes timed per round (default: 3 "
                   "quick, 5 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds per section (default: 1 on "
                   "CUDA, 0 on CPU, where a small warm-up run is done instead)")
    p.add_argument("--device", default="auto", choices=ql.DEVICE_CHOICES)
    p.add_argument("--dtype", default="auto", choices=ql.DTYPE_CHOICES)
    p.add_argument("--image-size", type=int, default=None, help="square image side (default 1024; 256 with --quick)")
    p.add_argument("--multi-quality", default="balanced", choices=PRESETS, help="preset of the multi-image rows")
    p.add_argument("--new-tokens", type=int, default=16, help="exact number of new tokens in the end-to-end rows")
    p.add_argument("--seed", type=int, default=0, help="image content seed")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: sections/rounds that would start after this are skipped (marked in the output)")
    p.add_argument("--compile-quality", default="balanced", choices=PRESETS, help="preset of the compile rows")
    p.add_argument("--compile-budget", type=float, default=300.0,
                   help="seconds for the compile child process (compile + measurements); 0 skips compile")
    p.add_argument("--skip", action="append", default=[], choices=SECTIONS, help="skip a section (repeatable)")
    p.add_argument("--only", action="append", default=[], choices=SECTIONS,
                   help="run only this section (repeatable): every other one is skipped")
    p.add_argument("--answers-images", type=int, default=None,
                   help="answers section: images answered one each, batched vs one by one (default 8; 3 quick)")
    p.add_argument("--answers-new-tokens", type=int, default=None, help="answers section: exact new tokens per "
                   "answer of the batched, folder and decode rows (default 64 CUDA, 16 CPU, 4 quick)")
    p.add_argument("--answers-image-size", type=int, default=None, help="answers section: side of the images "
                   "answered one each and of the folder's files (default 1024 CUDA, 320 CPU, 64 quick)")
    p.add_argument("--answers-quality", default="fast", choices=PRESETS,
                   help="answers section: preset of the images answered one each and of the folder")
    p.add_argument("--folder-images", type=int, default=None, help="answers section: image files in the captioned "
                   "folder (default 16; 5 quick)")
    p.add_argument("--folder-cache", choices=["cold", "warm"], default=None,
                   help="answers section: the folder rows with an empty embedding cache before each pass (cold: "
                        "every image encoded, default on CUDA) or with the embeddings of the first pass (warm: "
                        "re-captioning, default on CPU, where the full-size vision tower takes seconds per image)")
    p.add_argument("--video-frames", default=None, help="video section: frames sampled in the `fast` rows, comma "
                   "separated (default 16,32,64 CUDA; 2,16 CPU, where the full tower costs about a minute per 1000 "
                   "visual tokens; 2,4 quick)")
    p.add_argument("--video-presets", default="balanced,high",
                   help="video section: presets compared at --video-preset-frames (comma separated)")
    p.add_argument("--video-preset-frames", type=int, default=None, help="video section: frames of the "
                   "--video-presets rows (default 32 CUDA, 2 CPU, 2 quick)")
    p.add_argument("--video-size", default=None, help="video section: frame size WxH (default 1280x720; 320x180 "
                   "quick)")
    p.add_argument("--json", help="write all results (with raw samples) to this JSON file")
    p.add_argument("--markdown", help="write the tables to this markdown file")
    p.add_argument("--render-json", metavar="FILE", help="measure nothing: re-render the tables of a saved --json "
                   "result (to stdout and --markdown)")
    p.add_argument("--child", choices=["disk", "compile"], help=argparse.SUPPRESS)
    p.add_argument("--child-spec", help=argparse.SUPPRESS)
    return p


def apply_defaults(args: argparse.Namespace, device: torch.device) -> None:
    cuda = device.type == "cuda"
    if not args.model:
        args.model = list(QUICK_MODELS) if args.quick else [GPU_MODEL if cuda else CPU_MODEL]
    if args.repeats is None:
        args.repeats = 1 if args.quick else (5 if cuda else 2)
    if args.hit_repeats is None:
        args.hit_repeats = 3 if args.quick else (20 if cuda else 5)
    if args.warmup is None:
        args.warmup = 1 if cuda else 0
    if args.image_size is None:
        args.image_size = 256 if args.quick else 1024
    if args.quick:
        args.compile_budget = 0
    if args.only:
        args.skip = sorted(set(args.skip) | {s for s in SECTIONS if s not in args.only})
    if args.answers_images is None:
        args.answers_images = 3 if args.quick else 8
    if args.answers_new_tokens is None:
        args.answers_new_tokens = 4 if args.quick else (64 if cuda else 16)
    if args.answers_image_size is None:
        args.answers_image_size = 64 if args.quick else (1024 if cuda else 320)
    if args.folder_images is None:
        args.folder_images = 5 if args.quick else 16
    if args.folder_cache is None:
        args.folder_cache = "cold" if cuda else "warm"
    if args.video_frames is None:
        args.video_frames = "2,4" if args.quick else ("16,32,64" if cuda else "2,16")
    if args.video_preset_frames is None:
        args.video_preset_frames = 2 if args.quick else (32 if cuda else 2)
    if args.video_size is None:
        args.video_size = "320x180" if args.quick else "1280x720"


def bench_model(name: str, args: argparse.Namespace, budget: TimeBudget, entry: dict[str, Any],
                save: Any) -> tuple[dict[str, Any], dict[str, float] | None]:
    """The in-process sections for one model; returns the disk-hit job for the child and the miss time."""
    t0 = time.perf_counter()
    qm = ql.load_model(ql.LoadOptions(model=name, dtype=args.dtype, device=args.device))
    entry.update(load_s=time.perf_counter() - t0, family=qm.family.name, device=str(qm.device),
                 dtype=str(qm.dtype).replace("torch.", ""), use_mm_encoder_outputs=qm.use_mm_encoder_outputs,
                 attention=qm.attention, vision_attention=getattr(qm, "vision_attention", qm.attention),
                 params=sum(p.numel() for p in qm.model.parameters()),
                 compile_decode=getattr(qm.options, "compile_decode", "n/a (not in this build)"),
                 vision_params=sum(p.numel() for p in qm.visual.parameters()))
    log.info("[bench] %s built in %.1f s (%s, %s)", name, entry["load_s"], entry["device"], entry["dtype"])
    bench = ModelBench(qm, args, budget, entry)
    miss_s = None
    try:
        bench.warm_start()
        for section, fn in (("single", bench.section_single), ("hash", bench.section_hash),
                            ("multi", bench.section_multi), ("attention", bench.section_attention),
                            ("e2e", bench.section_e2e), ("answers", bench.section_answers),
                            ("video", bench.section_video)):
            if section in args.skip:
                entry["notes"].append(f"section '{section}' skipped (--skip)")
                continue
            t = time.perf_counter()
            fn()
            log.info("[bench] %s: section '%s' took %.1f s", name, section, time.perf_counter() - t)
            save()
        hit = bench.rows.get("cache.memory_hit")
        if hit is not None and hit.status == "ok":
            miss_s = {"time_s": hit.metrics["miss_s"], "cpu_s": hit.metrics["miss_cpu_s"]}
    finally:
        spec_k = bench.disk_image_k
        qm.close()
        del qm, bench
        ql.release_memory()
    common = model_spec(name, args)
    return {**common, "k": spec_k, "repeats": max(5, 2 * int(args.hit_repeats))}, miss_s


def model_spec(name: str, args: argparse.Namespace) -> dict[str, Any]:
    return dict(model=name, dtype=args.dtype, device=args.device, size=int(args.image_size), seed=args.seed,
                quality="balanced")


def render_json(args: argparse.Namespace) -> int:
    """Tables from a saved result; the measuring run's options come from the command stored in it."""
    result = json.loads(Path(args.render_json).read_text())
    run_args = build_parser().parse_args(shlex.split(result["meta"]["command"])[2:])
    apply_defaults(run_args, torch.device(result["meta"]["device"]))
    for entry in result["models"]:
        entry["rows"] = [Row(**r) for r in entry["rows"]]
    result["meta"].setdefault("notes", []).append(
        f"tables re-rendered from the saved JSON (`python bench/benchmark.py --render-json {args.render_json}`): "
        "same measurements, current table layout")
    md = to_markdown(result, run_args)
    if args.markdown:
        Path(args.markdown).write_text(md)
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(args)
    if args.render_json:
        return render_json(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    device = ql.resolve_device(args.device)
    apply_defaults(args, device)
    budget = TimeBudget(args.time_budget)
    given = argv if argv is not None else sys.argv[1:]
    command = "python bench/benchmark.py " + " ".join(shlex.quote(a) for a in given)
    cache_dir = tempfile.mkdtemp(prefix="qwenvl-bench-cache-")
    os.environ["QWENVL_FAST_CACHE_DIR"] = cache_dir  # never touch the user's real cache
    caches._CACHES.clear()
    child_env = {**os.environ, "QWENVL_FAST_CACHE_DIR": cache_dir}
    result: dict[str, Any] = {
        "meta": dict(command=command, machine=machine_info(device), device=str(device), dtype=args.dtype,
                     quick=args.quick, models=args.model, repeats=args.repeats, hit_repeats=args.hit_repeats,
                     multi_repeats=args.multi_repeats or args.repeats, warmup=args.warmup,
                     image_size=args.image_size, new_tokens=args.new_tokens, time_budget=args.time_budget,
                     answers=dict(images=args.answers_images, new_tokens=args.answers_new_tokens,
                                  image_size=args.answers_image_size, quality=args.answers_quality,
                                  folder_images=args.folder_images, folder_cache=args.folder_cache),
                     video=dict(rows=[list(r) for r in video_rows(args)], size=args.video_size,
                                source_frames=video_source_frames(args), dtype="float32", new_tokens=1),
                     started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), notes=[]),
        "models": [],
    }
    if device.type == "cpu":
        result["meta"]["notes"].append(
            "CPU device: paired ratios use process CPU time (robust to other tenants); wall times depend on the "
            "machine's load at the moment they were taken.")

    def save() -> None:
        result["meta"]["elapsed_s"] = budget.elapsed()
        write_outputs(result, args)

    rc = 0
    disk_jobs = []
    try:
        for name in args.model:
            entry: dict[str, Any] = dict(model=name, rows=[], notes=[])
            result["models"].append(entry)
            if not budget.allows():
                entry["skipped"] = "--time-budget reached before this model"
                continue
            try:
                spec, miss_s = bench_model(name, args, budget, entry, save)
                disk_jobs.append((entry, spec, miss_s))
            except Exception as exc:
                log.exception("[bench] %s failed", name)
                entry["error"] = f"{type(exc).__name__}: {exc}"
                rc = 1
            save()
        if "disk" not in args.skip:
            section_disk(disk_jobs, budget, child_env, args)
            save()
        for entry in result["models"]:
            if entry.get("error") or entry.get("skipped"):
                continue
            spec = {**model_spec(entry["model"], args), "k": 0, "repeats": max(1, int(args.repeats)),
                    "quality": args.compile_quality}
            section_compile(entry["rows"], spec, args, budget, child_env)
            save()
    finally:
        for cache in caches._CACHES.values():
            if cache.disk is not None:
                cache.disk.close()
        caches._CACHES.clear()
        shutil.rmtree(cache_dir, ignore_errors=True)
    for entry in result["models"]:
        why = entry.get("skipped") or ("--time-budget reached" if budget.left() <= 0 else "not run")
        if entry.get("error"):
            why = f"not run: {entry['error']}"
        complete_rows(entry, args, why)
    result["meta"]["elapsed_s"] = budget.elapsed()
    md = write_outputs(result, args, final=True)
    print(md)
    return rc


if __name__ == "__main__":
    sys.exit(main())
