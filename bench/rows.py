"""Every row the benchmark reports (id -> section and label), so that rows that never ran are reported too."""

from __future__ import annotations

import argparse
from typing import Any

from bench.inputs import N_MULTI, PRESETS, int_list, parse_size
from bench.measure import Row
from qwenvl_fast import captioning
from qwenvl_fast.core.api import ANSWER_BATCH_TOKENS


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
        "answers.folder_batched": ("answers", f"{folder}: batched ({captioning.CHUNK} images per run)"),
    }


def complete_rows(entry: dict[str, Any], args: argparse.Namespace, reason: str) -> None:
    """Add every row that was never reached as skipped, so the output always has the full set."""
    have = {r.id for r in entry["rows"]}
    for rid, (section, label) in row_labels(args).items():
        if rid not in have:
            entry["rows"].append(Row(rid, section, label, status="skipped", reason=reason))
