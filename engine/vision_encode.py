"""The vision side of the engine: a request's images and clips to embeddings, from the cache or the vision tower.

``VisionEncoder`` prepares the media (``vision/images.py``, ``vision/video.py``: sizes, cache keys, lookups),
encodes what the embedding cache did not have (images in one tower call, clips a few temporal patches per call
with Cancel and progress between calls) and stores the results. Its ``cache_key_extra`` keeps embeddings of towers
that do not give the same bits apart.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..core.api import GenerationRequest
from ..core.errors import QwenVLError
from ..embedding_cache import ImageEmbedding
from ..perf_monitor import RunMonitor
from ..sources import tf_compat
from ..sources.models import FamilyInfo
from ..vision.images import ImageSpec, PreparedImage, canonicalize_image, pixel_values_for, prepare_images
from ..vision.video import PreparedVideo, chunk_bounds, join_chunks, prepare_videos, video_pixel_values
from .interrupt import check_stop


def image_spec_for(processor: Any, family: FamilyInfo, device: torch.device, pixel_dtype: torch.dtype,
                   weights_identity: str) -> ImageSpec:
    """What the image pipeline needs of a loaded model: its geometry, normalisation and native pixel limits."""
    ip = processor.image_processor
    size = getattr(ip, "size", None) or {}
    lo = size.get("shortest_edge") or getattr(ip, "min_pixels", None)
    hi = size.get("longest_edge") or getattr(ip, "max_pixels", None)
    return ImageSpec(
        patch_size=family.patch_size, merge_size=family.merge_size,
        temporal_patch_size=family.temporal_patch_size,
        image_mean=tuple(float(v) for v in ip.image_mean), image_std=tuple(float(v) for v in ip.image_std),
        native_limits=(int(lo), int(hi)) if lo and hi else None, device=device, pixel_dtype=pixel_dtype,
        weights_identity=weights_identity, image_processor=ip,
    )


class VisionEncoder:
    """One loaded model's vision tower, between the request's media and the embedding cache."""

    def __init__(self, net: Any, family: FamilyInfo, config: Any, spec: ImageSpec, device: torch.device,
                 takes_cached_video: bool) -> None:
        self.net = net
        self.family = family
        self.config = config
        self.spec = spec
        self.device = device
        self.takes_cached_video = takes_cached_video  # this transformers takes mm_encoder_outputs
        self.compile_report: Any = None
        self.calls = 0  # vision-tower calls, for tests and the benchmark

    @property
    def visual(self) -> torch.nn.Module:
        return self.net.model.visual

    def close(self) -> None:
        self.net = None

    def set_compile(self, setting: str) -> None:
        from ..vision.tower_compile import compile_vision_tower

        self.compile_report = compile_vision_tower(self.net, setting, device=self.device)

    @property
    def cache_key_extra(self) -> str:
        """Compiled and eager towers agree to ~1e-7, not bit for bit: their embeddings are kept apart.

        The vision attention is not in the key: grouped SDPA (``vision/attention.py``) and transformers' own
        per-window SDPA loop give bit-identical embeddings (measured on the tiny Qwen2-VL, Qwen2.5-VL with its
        windowed attention, and Qwen3-VL with its deepstack levels, fp32 and bf16 on the CPU: max abs difference
        0.0; ``tests/test_engine.py`` asserts it), so an embedding cached under one serves the other.
        """
        report = self.compile_report
        return "|compiled" if report is not None and report.enabled else ""

    # -- encode -----------------------------------------------------------------------------------
    def encode(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> list[ImageEmbedding]:
        """Run the vision tower once over all images; split its output per image."""
        self.calls += 1
        grid_host = grid.to("cpu")
        out = self.visual(pixel_values, grid_thw=grid.to(self.device))
        embeds, deepstack = tf_compat.vision_outputs(out)
        merge2 = self.family.merge_size ** 2
        sizes = [int(t * h * w) // merge2 for t, h, w in grid_host.tolist()]
        per_embeds = torch.split(embeds, sizes)
        per_deep = [torch.split(level, sizes) for level in deepstack]
        return [ImageEmbedding(per_embeds[i], [lvl[i] for lvl in per_deep], (int(t), int(h), int(w)))
                for i, (t, h, w) in enumerate(grid_host.tolist())]

    # -- images -----------------------------------------------------------------------------------
    def prepare_images(self, images: list[torch.Tensor], req: GenerationRequest, cache: Any,
                       mon: RunMonitor) -> list[PreparedImage]:
        return prepare_images(images, req.image_quality, self.spec, cache, mon, self.cache_key_extra)

    def encode_image_misses(self, req: GenerationRequest, prepared: list[PreparedImage], cache: Any,
                            mon: RunMonitor) -> None:
        """Encode every image the cache did not have, in one vision-tower call, and store the results."""
        misses = [p for p in prepared if p.embedding is None]
        if not misses:
            return
        for m in misses:
            if m.canonical is None:
                m.canonical = canonicalize_image(req.images[m.index])
        check_stop(req, mon.record)  # before the vision tower: an interrupt must not cost a whole encode
        pixel_values, grid = pixel_values_for(misses, self.spec, req.preprocess, mon)
        with mon.stage("encode"), torch.inference_mode():
            t0 = time.perf_counter()
            encoded = self.encode(pixel_values, grid)
            if self.compile_report is not None and hasattr(self.compile_report, "note_call"):
                self.compile_report.note_call(time.perf_counter() - t0)
        del pixel_values
        for m, emb in zip(misses, encoded):
            if emb.grid != m.grid:
                raise QwenVLError(f"internal: grid {emb.grid} != predicted {m.grid}")
            m.embedding = emb
            m.tier = "miss" if cache is not None else "off"
            m.canonical = None
        if cache is not None:
            with mon.stage("cache"):
                for m in misses:
                    cache.put(m.key, m.embedding)

    # -- clips ------------------------------------------------------------------------------------
    def prepare_videos(self, req: GenerationRequest, cache: Any, mon: RunMonitor) -> list[PreparedVideo]:
        if not req.videos:
            return []
        if not self.takes_cached_video:
            raise QwenVLError("Video needs transformers 5.18 or newer (the version that takes cached video "
                              "embeddings): pip install -U transformers.")
        if getattr(self.config, "video_token_id", None) is None:
            raise QwenVLError(f"{self.family.name} has no video token in its config; it cannot take video.")
        return prepare_videos(req.videos, req.image_quality, req.max_frames, self.spec, cache, mon,
                              self.cache_key_extra)

    def encode_clip_misses(self, req: GenerationRequest, videos: list[PreparedVideo], cache: Any,
                           mon: RunMonitor) -> None:
        """Encode each clip the cache did not have, a few temporal patches per vision-tower call.

        Between calls the interrupt is honoured and progress reported (patches encoded of all clips' patches):
        a long clip is not one uninterruptible encode.
        """
        misses = [v for v in videos if v.embedding is None]
        if not misses:
            return
        total = sum(v.grid[0] for v in misses)
        done = 0
        for video in misses:
            check_stop(req, mon.record)
            pixel_values, grid = video_pixel_values(video, req.videos[video.index], self.spec, mon)
            t, h, w = (int(x) for x in grid[0].tolist())
            if (t, h, w) != video.grid:
                raise QwenVLError(f"internal: video grid {(t, h, w)} != predicted {video.grid}")
            parts: list[ImageEmbedding] = []
            for start, end in chunk_bounds(t):
                check_stop(req, mon.record)
                with mon.stage("encode"), torch.inference_mode():
                    chunk = torch.tensor([[end - start, h, w]], dtype=torch.long)
                    parts.extend(self.encode(pixel_values[start * h * w:end * h * w], chunk))
                done += end - start
                if req.on_progress is not None:
                    req.on_progress(done, total)
            del pixel_values
            video.embedding = join_chunks(parts, video.grid)
            video.tier = "miss" if cache is not None else "off"
            if cache is not None:
                with mon.stage("cache"):
                    cache.put(video.key, video.embedding)
