"""Quality presets: how many visual tokens an image may cost.

A preset is a budget in visual tokens (one token = one ``factor x factor`` patch after the
2x2 merge), the same on every family; it is converted to pixels with the family's own
factor (28 for Qwen2/2.5-VL, 32 for Qwen3-VL and Qwen3.5), so "balanced" costs the same
number of tokens on all of them. The seed guide wrote its presets in 28x28 units, which
are exactly these token counts.

Presets are resolved per image on every call: nothing here is cached on the processor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .core.api import DEFAULT_QUALITY as DEFAULT_QUALITY  # the request's default lives with the request

# (min tokens, max tokens) per image.
PRESET_TOKEN_BUDGETS: dict[str, tuple[int, int]] = {
    "fast": (128, 256),
    "balanced": (256, 512),
    "high": (256, 768),
    "ultra": (256, 1024),
}
AUTO = "auto"
NATIVE = "native"
QUALITY_CHOICES: list[str] = [AUTO, NATIVE, "fast", "balanced", "high", "ultra"]

# transformers' smart_resize refuses aspect ratios above this.
MAX_ASPECT_RATIO = 200


class QualityError(ValueError):
    """An image or a preset that cannot be resolved; the message says what to change."""


@dataclass(frozen=True)
class Budget:
    """The pixel limits applied to one image and where they came from."""

    preset: str  # fast / balanced / high / ultra / native
    min_pixels: int
    max_pixels: int
    chosen_by_auto: bool = False
    detail_score: float | None = None  # the measure `auto` used, for the timing report

    @property
    def label(self) -> str:
        return f"auto->{self.preset}" if self.chosen_by_auto else self.preset


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen-VL resize rule: transformers' own ``smart_resize``, with errors that say what to do.

    Both sides become multiples of ``factor``; the area is kept within [min_pixels, max_pixels]. Called
    directly (not through the processor), so a cache hit predicts the grid from the original size alone.
    """
    if height <= 0 or width <= 0:
        raise QualityError(f"Image has an empty side ({height}x{width}); connect a non-empty image.")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise QualityError(
            f"Aspect ratio {max(height, width) / min(height, width):.0f}:1 is above {MAX_ASPECT_RATIO}:1 "
            "(pad the image with pad_to_max_aspect first)."
        )
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as transformers_smart_resize

    return transformers_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def validate_quality(quality: str) -> str:
    """Normalise a preset name (a hand-edited workflow may hold anything)."""
    name = str(quality).strip().lower()
    if name not in QUALITY_CHOICES:
        raise QualityError(f"Unknown image_quality '{quality}'. Choose one of: {', '.join(QUALITY_CHOICES)}.")
    return name


# One pixel of slack on each side of a preset's limits. smart_resize (ours and transformers') rescales
# with a float sqrt and then ceil()s (upscaling) or floor()s (downscaling) each side; when the exact
# side is a whole number of patches, the float lands a hair above or below it and the rounding adds or
# drops a whole row of patches. At the exact limits 'fast' on a 28-factor family gives 258 tokens for
# a 19x2432 image and 127 for 65x4160. Rounded areas are multiples of factor**2, so the slack changes
# no branch of smart_resize; it only moves those ties clear of the float error. With it, for every
# image whose aspect ratio is at most MAX_ASPECT_RATIO (pad_to_max_aspect first), lo <= tokens <= hi:
# upscaling gives ceil(a)*ceil(b) >= a*b = lo - 1/factor**2, downscaling floor(a)*floor(b) <= hi +
# 1/factor**2; the opposite bounds hold because hi >= 2*lo (one patch row lost or gained is at most
# half) and the budgets are large next to MAX_ASPECT_RATIO (the short side never collapses below one
# patch). The processor is given the same limits, so its grid still equals ours.
PIXEL_SLACK = 1


def preset_pixels(preset: str, factor: int) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a named token budget for a family with this factor."""
    lo, hi = PRESET_TOKEN_BUDGETS[preset]
    return lo * factor * factor - PIXEL_SLACK, hi * factor * factor + PIXEL_SLACK


def detail_score(image_uint8_hwc: torch.Tensor) -> float:
    """A cheap measure of fine detail: mean absolute Laplacian of a small grey thumbnail.

    Text and fine texture keep a strong Laplacian after downscaling; flat regions and smooth
    gradients give almost none. Costs a few milliseconds for a 1024x1024 image, far below the
    encode it may save.
    """
    img = image_uint8_hwc
    h, w = int(img.shape[0]), int(img.shape[1])
    # Channel mean as a matrix-vector product: one BLAS pass, ~20x faster on the CPU than .mean(dim=-1)
    # (a reduction over a 3-wide innermost dim), which made this cost ~35 ms instead of ~2 ms at 1024x1024.
    rgb = img[..., :3].float()
    weights = torch.full((rgb.shape[-1],), 1.0 / (255.0 * rgb.shape[-1]), device=rgb.device)
    grey = (rgb @ weights)[None, None]
    longest = max(h, w)
    if longest > 256:
        scale = 256 / longest
        size = (max(3, round(h * scale)), max(3, round(w * scale)))
        grey = torch.nn.functional.interpolate(grey, size=size, mode="area")
    if grey.shape[-1] < 3 or grey.shape[-2] < 3:
        return 0.0
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=grey.device)[None, None]
    lap = torch.nn.functional.conv2d(grey, kernel)
    return float(lap.abs().mean())


# Thresholds on detail_score (Laplacian of a [0,1] thumbnail). Photos sit around 0.02-0.06,
# screenshots and documents with text above 0.08, flat or blurred graphics below 0.01.
AUTO_THRESHOLDS: list[tuple[float, str]] = [(0.01, "fast"), (0.04, "balanced"), (0.08, "high")]


def preset_for_score(score: float) -> str:
    for limit, preset in AUTO_THRESHOLDS:
        if score < limit:
            return preset
    return "ultra"


def resolve_budget(
    quality: str,
    factor: int,
    native_limits: tuple[int, int] | None = None,
    image_uint8_hwc: torch.Tensor | None = None,
    score: float | None = None,
) -> Budget:
    """The pixel budget for one image under ``quality``.

    ``native_limits`` are the processor's own (min_pixels, max_pixels), used by ``native``.
    ``auto`` needs the image's detail: its ``score`` when already measured, else the image to measure.
    """
    quality = validate_quality(quality)
    if quality == NATIVE:
        if native_limits is None:
            lo, hi = preset_pixels("ultra", factor)
        else:
            lo, hi = native_limits
        return Budget(NATIVE, int(lo), int(hi))
    if quality == AUTO:
        if score is None:
            if image_uint8_hwc is None:
                raise QualityError("image_quality 'auto' needs the image to measure")
            score = detail_score(image_uint8_hwc)
        preset = preset_for_score(score)
        lo, hi = preset_pixels(preset, factor)
        return Budget(preset, lo, hi, chosen_by_auto=True, detail_score=round(score, 5))
    lo, hi = preset_pixels(quality, factor)
    return Budget(quality, lo, hi)


def target_size(height: int, width: int, factor: int, budget: Budget) -> tuple[int, int]:
    """The resized (h, w) of an image under a budget."""
    return smart_resize(height, width, factor, budget.min_pixels, budget.max_pixels)


def visual_tokens(size: tuple[int, int], factor: int) -> int:
    """Visual tokens in the prompt for an image resized to ``size``."""
    return (size[0] // factor) * (size[1] // factor)


def padded_size(height: int, width: int, max_ratio: int = MAX_ASPECT_RATIO) -> tuple[int, int]:
    """The (h, w) that ``pad_to_max_aspect`` gives an image of this size (for size math without pixels)."""
    if height <= 0 or width <= 0 or max(height, width) <= max_ratio * min(height, width):
        return height, width
    if height < width:
        return -(-width // max_ratio), width
    return height, -(-height // max_ratio)


def pad_to_max_aspect(image_hwc: torch.Tensor, max_ratio: int = MAX_ASPECT_RATIO, fill: float = 1.0) -> torch.Tensor:
    """Pad a very long strip (e.g. 1x4000) with ``fill`` so its aspect ratio is within ``max_ratio``.

    transformers refuses ratios above 200:1; padding keeps every pixel of the strip and costs a
    few tokens, which is better than refusing the image or cropping text from it.
    """
    h, w = int(image_hwc.shape[0]), int(image_hwc.shape[1])
    new_h, new_w = padded_size(h, w, max_ratio)
    if (new_h, new_w) == (h, w):
        return image_hwc
    if h < w:
        pad = image_hwc.new_full((new_h - h, w, image_hwc.shape[2]), fill)
        top = (new_h - h) // 2
        return torch.cat([pad[:top], image_hwc, pad[top:]], dim=0)
    pad = image_hwc.new_full((h, new_w - w, image_hwc.shape[2]), fill)
    left = (new_w - w) // 2
    return torch.cat([pad[:, :left], image_hwc, pad[:, left:]], dim=1)
