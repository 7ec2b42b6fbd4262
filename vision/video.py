"""Video through the model's own video path: frames in, one clip's ``video_grid_thw`` embedding out.

A clip is never fed as separate images (the model would then see unrelated pictures, not time): its frames
are sampled evenly to at most ``max_frames``, resized to one size that the quality preset allows for the
WHOLE clip, packed two by two into temporal patches, and encoded once; the prompt carries the family's own
placeholders (one run of ``<|video_pad|>`` for Qwen2/2.5-VL, whose rotary positions advance with
``second_per_grid_ts``; a timestamp and a ``<|vision_start|>...<|vision_end|>`` span per temporal patch for
Qwen3-VL and Qwen3.5).

Read in order: :func:`as_clip` (a node's input into a :class:`VideoClip`), :func:`sample_indices`,
:func:`clip_budget`, :func:`prepare_videos` (sampling, digest, size, grid and cache lookup per clip),
:func:`video_pixel_values`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .. import quality_presets as qp
from ..core.api import DEFAULT_VIDEO_FPS, VideoClip
from ..core.errors import QwenVLError
from ..embedding_cache import EmbeddingCache, ImageEmbedding, entry_key
from ..perf_monitor import RunMonitor
from . import fast_preprocess
from .images import (
    ImageSpec,
    ImageTooLargeError,
    canonicalize_image,
    check_pixel_limit,
    image_identity,
    max_image_pixels,
)

log = logging.getLogger("QwenVL-Fast")

# Visual tokens (after the 2x2 merge) a whole clip may cost, per preset. One temporal patch (2 frames) of a
# frame with h x w tokens costs h * w tokens, so "balanced" gives 8 temporal patches (16 frames) 256 tokens each,
# the size of a "fast" image. "native" follows qwen-vl-utils, the models' reference pipeline: 24576 tokens per
# clip and 128-768 per frame. "auto" measures detail per image; a clip uses "balanced".
VIDEO_CLIP_TOKENS: dict[str, int] = {"fast": 1024, "balanced": 2048, "high": 4096, "ultra": 8192, "native": 24576}
NATIVE_FRAME_TOKENS = (128, 768)
# Below this a frame is a thumbnail of a few patches; more frames than the budget allows at this size cost more
# than the budget (the run record says so), rather than frames too small to show anything.
MIN_FRAME_TOKENS = 16
# Temporal patches per vision-tower call: the tower attends within a frame only (its cu_seqlens split per
# temporal patch), so a clip encoded in chunks equals the clip encoded at once; between chunks an interrupt is
# honoured and progress reported.
ENCODE_CHUNK_PATCHES = 4
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")


def as_clip(video: Any, fps: float | None = None, max_frames: int | None = None) -> VideoClip | None:
    """A node's video input into a clip: an IMAGE batch ``[T,H,W,C]``, a ComfyUI VIDEO, or a clip.

    A VIDEO backed by a file (``get_stream_source``) is decoded here, only the ``max_frames`` sampled frames:
    its ``get_components`` would decode every frame to float32 first (a minute of 1080p is about 45 GB).
    """
    if video is None:
        return None
    if isinstance(video, VideoClip):
        return video
    if max_frames and hasattr(video, "get_stream_source"):
        try:
            return load_video_file(video.get_stream_source(), int(max_frames))
        except ImageTooLargeError:
            raise  # ComfyUI's own decoding would cost what the limit is there to prevent
        except QwenVLError as exc:  # a stream PyAV cannot read here: ComfyUI's own decoding
            log.warning("[QwenVL-Fast] %s; decoding the whole VIDEO instead", exc)
    if hasattr(video, "get_components"):  # ComfyUI's VIDEO (comfy_api VideoInput): frames + frame rate
        components = video.get_components()
        rate = getattr(components, "frame_rate", None)
        frames = components.images
        return VideoClip(frames, float(rate) if rate else float(fps or DEFAULT_VIDEO_FPS))
    if not isinstance(video, torch.Tensor):
        raise QwenVLError(f"video must be an IMAGE batch of frames or a VIDEO, got {type(video).__name__}.")
    if video.dim() == 3:
        video = video.unsqueeze(0)
    if video.dim() != 4:
        raise QwenVLError(f"video has shape {tuple(video.shape)}; expected frames as an IMAGE batch [T,H,W,C].")
    return VideoClip(video, float(fps or DEFAULT_VIDEO_FPS))


def sample_indices(total: int, max_frames: int, temporal_patch_size: int) -> list[int]:
    """Evenly spaced frame indices, as many as allowed and a multiple of the temporal patch.

    The spacing is the Qwen video processors' own (``arange(0, total, total / n)``). A clip shorter than one
    temporal patch keeps all its frames (the last is repeated when patched, as the processor does).
    """
    if total <= 0:
        raise QwenVLError("The video has no frames; check the loader upstream.")
    if max_frames <= 0:
        raise QwenVLError(f"max_frames is {max_frames}; it must be at least 1.")
    n = min(total, max_frames)
    if n >= temporal_patch_size:
        n -= n % temporal_patch_size
    else:
        n = min(total, temporal_patch_size)
    return torch.arange(0, total, total / n).int()[:n].tolist()


def clip_budget(quality: str, factor: int, temporal_patches: int) -> tuple[qp.Budget, int]:
    """Per-frame pixel limits for a clip of this many temporal patches, and the clip's token budget."""
    preset = qp.validate_quality(quality)
    if preset == qp.AUTO:
        preset = qp.DEFAULT_QUALITY
    clip_tokens = VIDEO_CLIP_TOKENS[preset]
    frame_lo, frame_hi = NATIVE_FRAME_TOKENS if preset == qp.NATIVE else qp.PRESET_TOKEN_BUDGETS[preset]
    hi = max(MIN_FRAME_TOKENS, min(frame_hi, clip_tokens // max(temporal_patches, 1)))
    lo = max(1, min(frame_lo, hi // 2))  # hi >= 2 * lo keeps smart_resize inside [lo, hi] (quality_presets.py)
    budget = qp.Budget(preset, lo * factor * factor - qp.PIXEL_SLACK, hi * factor * factor + qp.PIXEL_SLACK)
    return budget, clip_tokens


def timestamps(indices: list[int], fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch: the mean of its first and last frame's time (Qwen3-VL's rule)."""
    padded = list(indices)
    while len(padded) % temporal_patch_size:
        padded.append(padded[-1])
    times = [i / fps for i in padded]
    return [(times[k] + times[k + temporal_patch_size - 1]) / 2 for k in range(0, len(times), temporal_patch_size)]


@dataclass
class PreparedVideo:
    index: int
    indices: list[int]
    total_frames: int
    fps: float
    digest: str
    size_in: tuple[int, int]
    budget: qp.Budget
    clip_tokens: int
    size: tuple[int, int]
    grid: tuple[int, int, int]
    key: str
    frames: list[torch.Tensor | None] | None = None  # canonical sampled frames (None: not made yet), until encoded
    embedding: ImageEmbedding | None = None
    tier: str = "off"
    temporal_patch_size: int = 2
    times: list[float] = field(default_factory=list)
    picked: list[int] = field(default_factory=list)  # the sampled frames' indices in the clip's tensor

    @property
    def tokens(self) -> int:
        """Patches before the merge (like PreparedImage.tokens)."""
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def second_per_grid(self) -> float:
        """Seconds one temporal patch spans in the source (Qwen2.5-VL's ``second_per_grid_ts``)."""
        sampled_fps = len(self.indices) / self.total_frames * self.fps
        return self.temporal_patch_size / sampled_fps


def _clip_digest(frame_digests: list[str], indices: list[int], total: int, fps: float) -> str:
    text = f"video|{total}|{fps!r}|{indices}|{'|'.join(frame_digests)}"
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def prepare_videos(clips: list[VideoClip], quality: str, max_frames: int, spec: ImageSpec,
                   cache: EmbeddingCache | None, mon: RunMonitor, key_extra: str = "") -> list[PreparedVideo]:
    """Sampling, digest, per-frame size, grid and cache key of each clip; the cached embedding where there is one.

    The key covers the sampled frames' content (each frame's digest, in order), the sampling (indices, source
    frame count and rate) and the size, on top of what keys an image (tower weights, dtype, normalisation).
    """
    prepared: list[PreparedVideo] = []
    tps = spec.temporal_patch_size
    for v, clip in enumerate(clips):
        frames = clip.frames
        if not isinstance(frames, torch.Tensor) or frames.dim() != 4:
            raise QwenVLError("Each video must be frames [T,H,W,C].")
        fps = float(clip.fps)
        if not math.isfinite(fps) or fps <= 0:
            raise QwenVLError(f"video_fps is {clip.fps}; give the source frame rate (e.g. 24 or 30).")
        with mon.stage("hash"):
            picked = sample_indices(int(frames.shape[0]), int(max_frames), tps)
            total = clip.source_total or int(frames.shape[0])
            source = [clip.source_indices[i] for i in picked] if clip.source_indices is not None else picked
            # The digest memo (keyed by each frame tensor's bytes) spares a repeated clip the canonicalisation and
            # MD5 of every frame; a clip the cache will encode gets its canonical frames in `video_pixel_values`.
            memo = cache.digests if cache is not None else None
            idents = [image_identity(frames[i], memo, want_score=False) for i in picked]
            canonical: list[torch.Tensor | None] = [ident.canonical for ident in idents]
            digests = [ident.digest for ident in idents]
            sizes = {ident.size_in for ident in idents}
            if len(sizes) != 1:
                raise QwenVLError("The video's frames differ in size; resize them to one size first.")
            digest = _clip_digest(digests, source, total, fps) if cache is not None else ""
            size_in = sizes.pop()
            patches_t = -(-len(picked) // tps)
            budget, clip_tokens = clip_budget(quality, spec.factor, patches_t)
            size = qp.target_size(size_in[0], size_in[1], spec.factor, budget)
            grid = (patches_t, size[0] // spec.patch_size, size[1] // spec.patch_size)
            key = entry_key(digest, spec.weights_identity + key_extra, spec.pixel_dtype, size,
                            (spec.image_mean, spec.image_std, "video", tps))
            item = PreparedVideo(v, source, total, fps, digest, size_in, budget, clip_tokens, size, grid, key,
                                 canonical, temporal_patch_size=tps, times=timestamps(source, fps, tps),
                                 picked=picked)
            if cache is not None:
                item.embedding, item.tier = cache.get(key, spec.device)
                if item.embedding is not None:
                    item.frames = None
        prepared.append(item)
    return prepared


def video_pixel_values(video: PreparedVideo, clip: VideoClip, spec: ImageSpec,
                       mon: RunMonitor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip's ``pixel_values_videos`` on the model's device, and its grid."""
    frames = video.frames or [None] * len(video.picked)
    canonical = [f if f is not None else canonicalize_image(clip.frames[i]) for f, i in zip(frames, video.picked)]
    video.frames = None
    with mon.stage("preprocess"):
        return fast_preprocess.preprocess_video(
            canonical, video.size, patch_size=spec.patch_size, merge_size=spec.merge_size,
            temporal_patch_size=spec.temporal_patch_size, image_mean=spec.image_mean, image_std=spec.image_std,
            device=spec.device, dtype=spec.pixel_dtype,
        )


def chunk_bounds(temporal_patches: int, chunk: int = ENCODE_CHUNK_PATCHES) -> list[tuple[int, int]]:
    """[start, end) temporal patches of each vision-tower call."""
    chunk = max(int(chunk), 1)
    return [(s, min(s + chunk, temporal_patches)) for s in range(0, temporal_patches, chunk)]


def join_chunks(parts: list[ImageEmbedding], grid: tuple[int, int, int]) -> ImageEmbedding:
    """One clip's embedding from its chunks' (in temporal order)."""
    embeds = torch.cat([p.embeds for p in parts]) if len(parts) > 1 else parts[0].embeds
    levels = len(parts[0].deepstack)
    deep = [torch.cat([p.deepstack[i] for p in parts]) if len(parts) > 1 else parts[0].deepstack[i]
            for i in range(levels)]
    return ImageEmbedding(embeds, deep, grid)


def load_video_file(source: str | Path | BinaryIO, max_frames: int, temporal_patch_size: int = 2,
                    max_pixels: int | None = None) -> VideoClip:
    """The evenly sampled frames of a video file or stream (uint8 ``[T,H,W,3]``), their positions and frame rate.

    Only the sampled frames are converted to pixels; decoding stops after the last one. PyAV (FFmpeg) decodes.
    A stream whose frame size is over ``max_pixels`` (None: ``images.max_image_pixels()``, the image files'
    limit; 0: none) is refused before any frame is decoded: FFmpeg also opens a still image (a 12000x12000 PNG
    renamed ``.mp4`` is one 144-megapixel frame).
    """
    name = Path(source).name if isinstance(source, (str, Path)) else str(getattr(source, "name", "the video stream"))
    try:
        import av
    except ImportError as exc:
        raise QwenVLError("Reading video files needs PyAV: pip install av (ComfyUI itself ships it).") from exc
    try:
        container = av.open(str(source) if isinstance(source, (str, Path)) else source)
    except (OSError, getattr(av, "FFmpegError", OSError)) as exc:
        raise QwenVLError(f"Cannot open the video '{name}': {exc} (the file may be empty, cut off or not a "
                          "video).") from exc
    with container:
        if not container.streams.video:
            raise QwenVLError(f"'{name}' has no video stream (an empty or audio-only file?).")
        stream = container.streams.video[0]
        limit = max_image_pixels() if max_pixels is None else int(max_pixels)
        # The header's size, before the packet count below (which reads the whole file) and any decoding.
        check_pixel_limit(name, stream.codec_context.width, stream.codec_context.height, limit, "a video frame")
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 24.0
        try:
            frames, seen, total = _sampled_frames(container, stream, name, limit, max_frames, temporal_patch_size,
                                                  _frame_limit(stream, max_frames, temporal_patch_size))
        except getattr(av, "FFmpegError", OSError) as exc:  # FFmpeg's own words ("Operation not permitted")
            raise QwenVLError(f"Cannot decode the video '{name}' ({exc}): it may be empty or cut off; export it "
                              "again.") from None
    if not frames:
        raise QwenVLError(f"'{name}' has no decodable frames: it may be empty or cut off; export it again.")
    return VideoClip(torch.from_numpy(np.stack(frames)), fps, source_indices=seen, source_total=max(total, 1))


def _sampled_frames(container, stream, name: str, limit: int, max_frames: int, temporal_patch_size: int,
                    frame_pixels: int) -> tuple[list[np.ndarray], list[int], int]:
    """The sampled frames (each at most ``frame_pixels``), their indices and the stream's frame count."""
    total = int(stream.frames or 0)
    if total <= 0:  # containers that do not record it: count the packets (no decoding)
        total = sum(1 for packet in container.demux(stream) if packet.size)
        if total == 0:  # nothing to sample, and seeking an empty stream is an FFmpeg error
            raise QwenVLError(f"'{name}' has no video frames (0 frames): it may be empty or cut off; export it "
                              "again.")
        container.seek(0)
    wanted = sample_indices(total, max_frames, temporal_patch_size)
    frames, seen, decoded = _decode_frames(container, stream, wanted, name, limit, frame_pixels)
    if 0 < decoded <= wanted[-1]:
        # The stream ended before the count its container claims (a cut-off download or recording): sampled
        # and timed as the frames it has, as if its header had said so, or the clip's timestamps and
        # second_per_grid_ts would stretch it by claimed / decoded.
        log.info("[QwenVL-Fast] '%s' claims %d frames but %d decode; sampling those %d", name, total, decoded,
                 decoded)
        total = decoded
        frames, seen = _resample(container, stream, sample_indices(total, max_frames, temporal_patch_size),
                                 (frames, seen), name, limit, frame_pixels)
    return frames, seen, total


def _frame_limit(stream, max_frames: int, temporal_patch_size: int) -> int:
    """The most pixels a sampled frame is kept at: twice the largest frame any preset makes of a clip of that many
    frames (Qwen3's 32-pixel factor), so a long 4K clip is not held at full resolution (768 frames ~ 19 GB)."""
    count = int(stream.frames or 0) or max_frames
    patches = -(-min(max(count, 1), max_frames) // temporal_patch_size)
    largest = max(clip_budget(preset, 32, patches)[0].max_pixels for preset in VIDEO_CLIP_TOKENS)
    return 2 * largest


def _decode_frames(container, stream, wanted: list[int], name: str = "the video", limit: int = 0,
                   frame_pixels: int = 0) -> tuple[list[np.ndarray], list[int], int]:
    """The ``wanted`` frames that decode (RGB, each downscaled to at most ``frame_pixels`` as it is decoded; 0: as
    they are), their indices, and how many frames were decoded: fewer than ``max(wanted) + 1`` only when the
    stream ended first, and then exactly the stream's real frame count."""
    targets = set(wanted)
    last = max(wanted)
    frames, seen = [], []
    decoded = 0
    for i, frame in enumerate(container.decode(stream)):
        decoded = i + 1
        if i in targets:
            # A stream may change size midway, past what its header said: checked before the RGB copy.
            check_pixel_limit(name, frame.width, frame.height, limit, "a video frame")
            frames.append(_rgb(frame, frame_pixels))
            seen.append(i)
        if i >= last:
            break
    return frames, seen, decoded


def _rgb(frame, frame_pixels: int) -> np.ndarray:
    """A decoded frame as RGB, area-downscaled (aspect kept) when it is over ``frame_pixels`` (0: never)."""
    width, height = int(frame.width), int(frame.height)
    if frame_pixels <= 0 or width * height <= frame_pixels:
        return frame.to_ndarray(format="rgb24")
    scale = math.sqrt(frame_pixels / (width * height))
    size = {"width": max(1, int(width * scale)), "height": max(1, int(height * scale))}
    return frame.to_ndarray(format="rgb24", interpolation="AREA", **size)


def _resample(container, stream, wanted: list[int], have: tuple[list[np.ndarray], list[int]], name: str,
              limit: int, frame_pixels: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """The ``wanted`` frames, decoded again from the start; ``have`` (right in time, only fewer frames) when they
    already are those frames or the stream cannot seek back."""
    if have[1] == wanted:
        return have
    import av

    try:
        container.seek(0)
        frames, seen, _ = _decode_frames(container, stream, wanted, name, limit, frame_pixels)
    except (OSError, ValueError, getattr(av, "FFmpegError", OSError)) as exc:
        log.debug("[QwenVL-Fast] '%s' could not be decoded again (%s): keeping %d frames", name, exc, len(have[0]))
        return have
    return (frames, seen) if seen == wanted else have
