"""From a ComfyUI IMAGE to the vision tower's input: split, canonicalise, budget, cache lookup, pixels.

Read in order: :func:`split_image_batch` (the node's tensor into images), :func:`canonicalize_image` (any
image into uint8 RGB), :func:`prepare_images` (digest, preset budget, size, grid and cache lookup per
image), :func:`pixel_values_for` (the misses into ``pixel_values`` on the model's device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import quality_presets as qp
from ..core.errors import QwenVLError
from ..embedding_cache import EmbeddingCache, ImageEmbedding, canonical_digest, entry_key
from ..perf_monitor import RunMonitor
from ..sources.tf_compat import processor_size_limits
from . import fast_preprocess


@dataclass(frozen=True)
class ImageSpec:
    """What the image pipeline needs to know about a loaded model."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    native_limits: tuple[int, int] | None
    device: torch.device
    pixel_dtype: torch.dtype
    weights_identity: str  # what in the cache key identifies the vision tower's weights
    image_processor: Any = None  # the model's own processor, for the "reference" preprocessing path

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def split_image_batch(image: torch.Tensor | None) -> list[torch.Tensor]:
    """ComfyUI IMAGE ``[B,H,W,C]`` (or a single ``[H,W,C]``) into a list of ``[H,W,C]`` tensors."""
    if image is None:
        return []
    if not isinstance(image, torch.Tensor):
        raise QwenVLError(f"image must be a ComfyUI IMAGE tensor, got {type(image).__name__}")
    if image.dim() == 3:
        return [image]
    if image.dim() == 4:
        return list(image.unbind(0))
    if image.dim() == 5:
        raise QwenVLError(
            f"Got a 5-D tensor {tuple(image.shape)} (a video or a batch of batches) where an IMAGE [B,H,W,C] is "
            "expected: flatten it to frames first (e.g. with a batch/list node)."
        )
    raise QwenVLError(f"image has shape {tuple(image.shape)}; expected [B,H,W,C].")

def canonicalize_image(image: torch.Tensor) -> torch.Tensor:
    """Any reasonable image tensor to uint8 RGB HWC on the CPU.

    1 channel: grey; 2: grey + alpha; 3: RGB; 4: RGBA. Alpha is composited onto white.
    Float values are clamped to [0, 1]; NaN/inf are an error (they mean a broken upstream node).
    A channels-first image (C in (1,3,4) first and not last) is transposed.
    """
    img = image.detach()
    if img.dim() != 3:
        raise QwenVLError(f"Each image must be [H,W,C]; got shape {tuple(img.shape)}.")
    if img.shape[-1] not in (1, 2, 3, 4) and img.shape[0] in (1, 2, 3, 4):
        img = img.permute(1, 2, 0)
    h, w, c = img.shape
    if h == 0 or w == 0:
        raise QwenVLError("Got an empty image (0 pixels); check the image loader upstream.")
    if c not in (1, 2, 3, 4):
        raise QwenVLError(f"Image has {c} channels; expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA).")
    img = img.to("cpu")
    if img.dtype == torch.uint8:
        f = img.float() / 255.0
    elif img.dtype.is_floating_point:
        f = img.float()
        if not torch.isfinite(f).all():
            raise QwenVLError("The image holds NaN or infinite values; the node upstream produced a broken image.")
        f = f.clamp(0.0, 1.0)
    elif img.dtype in (torch.int16, torch.int32, torch.int64, torch.uint16 if hasattr(torch, "uint16") else None):
        f = img.float().clamp(0, 255) / 255.0
    else:
        raise QwenVLError(f"Unsupported image dtype {img.dtype}.")
    if c == 1:
        rgb = f.expand(h, w, 3)
    elif c == 2:
        alpha = f[..., 1:2]
        rgb = (f[..., :1] * alpha + (1.0 - alpha)).expand(h, w, 3)
    elif c == 4:
        alpha = f[..., 3:4]
        rgb = f[..., :3] * alpha + (1.0 - alpha)
    else:
        rgb = f
    if img.dtype == torch.uint8 and c == 3:
        out = img.contiguous()
    else:
        out = (rgb * 255.0).round_().clamp_(0, 255).to(torch.uint8).contiguous()
    return qp.pad_to_max_aspect(out, fill=255)

@dataclass
class PreparedImage:
    index: int
    digest: str
    size_in: tuple[int, int]
    budget: qp.Budget
    size: tuple[int, int]
    grid: tuple[int, int, int]
    key: str
    canonical: torch.Tensor | None = None
    embedding: ImageEmbedding | None = None
    tier: str = "off"

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def prepare_images(images: list[torch.Tensor], quality: str, spec: ImageSpec, cache: EmbeddingCache | None,
                   mon: RunMonitor, key_extra: str = "") -> list[PreparedImage]:
    """Digest, budget, size, grid and cache key of each image; the cached embedding where there is one."""
    prepared: list[PreparedImage] = []
    quality = qp.validate_quality(quality)
    with mon.stage("hash"):
        for i, image in enumerate(images):
            # The memo (exact: keyed by the tensor's bytes) remembers digest, size and detail score of an image
            # seen before, so a repeat is neither canonicalised nor hashed again, not even under `auto`.
            memo = cache.digests.get(image) if cache is not None else None
            canonical = None
            if memo is None:
                canonical = canonicalize_image(image)
                digest = canonical_digest(canonical) if cache is not None else ""
                memo = (digest, (int(canonical.shape[0]), int(canonical.shape[1])), None)
            digest, size_in, score = memo
            if quality == qp.AUTO and score is None:
                if canonical is None:
                    canonical = canonicalize_image(image)
                score = qp.detail_score(canonical)
            if cache is not None and canonical is not None:  # a new image, or its detail score is new
                cache.digests.put(image, (digest, size_in, score))
            budget = qp.resolve_budget(quality, spec.factor, spec.native_limits, canonical, score=score)
            size = qp.target_size(size_in[0], size_in[1], spec.factor, budget)
            grid = (1, size[0] // spec.patch_size, size[1] // spec.patch_size)
            key = entry_key(digest, spec.weights_identity + key_extra, spec.pixel_dtype, size,
                            (spec.image_mean, spec.image_std))
            item = PreparedImage(i, digest, size_in, budget, size, grid, key, canonical)
            if cache is not None:
                item.embedding, item.tier = cache.get(key, spec.device)
            prepared.append(item)
    return prepared


def pixel_values_for(misses: list[PreparedImage], spec: ImageSpec, preprocess: str,
                     mon: RunMonitor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values`` and grid of the images to encode: tensor-native on the device, or the processor."""
    if preprocess == "reference":
        from PIL import Image

        with mon.stage("preprocess"):
            pix, grids = [], []
            for m in misses:
                limits = processor_size_limits(m.budget.min_pixels, m.budget.max_pixels)
                out = spec.image_processor(images=[Image.fromarray(m.canonical.numpy())], return_tensors="pt",
                                           **limits)
                pix.append(out["pixel_values"])
                grids.append(out["image_grid_thw"])
            pixel_values, grid = torch.cat(pix), torch.cat(grids)
        with mon.stage("transfer"):
            pixel_values = pixel_values.to(spec.device, spec.pixel_dtype)
        return pixel_values, grid
    with mon.stage("transfer"):
        uploaded = fast_preprocess.upload([m.canonical for m in misses], spec.device)
    with mon.stage("preprocess"):
        pixel_values, grid = fast_preprocess.preprocess_images(
            uploaded, [m.size for m in misses], patch_size=spec.patch_size, merge_size=spec.merge_size,
            temporal_patch_size=spec.temporal_patch_size, image_mean=spec.image_mean, image_std=spec.image_std,
            device=spec.device, dtype=spec.pixel_dtype,
        )
    return pixel_values, grid
