"""From a ComfyUI IMAGE to the vision tower's input: split, canonicalise, budget, cache lookup, pixels.

Read in order: :func:`split_image_batch` (the node's tensor into images), :func:`canonicalize_image` (any
image into uint8 RGB), :func:`image_identity` (digest, size and detail score, through the digest memo),
:func:`prepare_images` (preset budget, size, grid and cache lookup per image), :func:`pixel_values_for` (the
misses into ``pixel_values`` on the model's device).

:func:`load_image_file` reads an image file for Caption Folder and the CLI (ComfyUI's own loader is not
ours): pixel limit before decoding, EXIF orientation, 16-bit and float images at their true values.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .. import quality_presets as qp
from ..core.errors import QwenVLError
from ..embedding_cache import DigestMemo, EmbeddingCache, ImageEmbedding, canonical_digest, entry_key
from ..perf_monitor import RunMonitor
from ..sources.tf_compat import processor_size_limits
from . import fast_preprocess

log = logging.getLogger("QwenVL-Fast")

MAX_IMAGE_PIXELS_ENV = "QWENVL_FAST_MAX_IMAGE_PIXELS"
# Pillow's own decompression-bomb threshold (its Image.MAX_IMAGE_PIXELS, 1024**3 // 4 // 3): 8192x8192 (67 Mpx)
# passes, 12000x12000 (144 Mpx) does not. At the limit an 8-bit RGB file is 268 MB as the uint8 tensor this loader
# returns (about 2.5 times that while decoding); the models never see more than a few megapixels anyway (the
# presets downscale), so a larger file only costs memory. A PNG of a few hundred KB can be this big.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
_JPEG_DRAFT_SCALES = (2, 4, 8)  # the reductions libjpeg decodes to directly


class ImageTooLargeError(QwenVLError):
    """An image file or video frame over the pixel limit, refused before it was decoded."""


def max_image_pixels() -> int:
    """The pixel limit for image files and video frames: ``$QWENVL_FAST_MAX_IMAGE_PIXELS`` or the default.

    0 means no limit. A value that is not a whole number is an error (a typo must not silently lift the limit).
    """
    raw = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw.replace(",", "").replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        raise QwenVLError(f"{MAX_IMAGE_PIXELS_ENV}={raw!r} is not a pixel count: set it to a whole number such as "
                          f"150000000, or 0 for no limit.")
    return value


def _too_large(name: str, width: int, height: int, limit: int, what: str) -> ImageTooLargeError:
    pixels = width * height
    return ImageTooLargeError(
        f"'{name}' is {width}x{height} ({pixels / 1e6:.1f} megapixels), over the limit for {what} of {limit:,} "
        f"pixels; it was not decoded (that would take at least {pixels * 3 / 2**30:.1f} GiB). Downscale the "
        f"file, or set {MAX_IMAGE_PIXELS_ENV} to a larger pixel count (0 for no limit)."
    )


def check_pixel_limit(name: str, width: int, height: int, limit: int | None = None, what: str = "an image") -> None:
    """Raise :class:`ImageTooLargeError` when ``width x height`` is over ``limit`` (None: ``max_image_pixels()``)."""
    limit = max_image_pixels() if limit is None else int(limit)
    if limit > 0 and int(width) * int(height) > limit:
        raise _too_large(name, int(width), int(height), limit, what)


def load_image_file(path: str | Path, max_pixels: int | None = None) -> torch.Tensor:
    """An image file as an HWC tensor the pipeline takes as is: the smallest one that keeps its values.

    - 8-bit images (the usual JPEG, PNG, WebP, GIF...): uint8 RGB ``[H,W,3]``, a quarter of float32, and exactly
      what :func:`canonicalize_image` would make of them (so the same cache key and the same answer).
      Transparency (RGBA, LA, a palette's transparent index, PA) is composited onto white here, with
      :func:`canonicalize_image`'s own arithmetic.
    - 16-bit grey (``I;16*``, and ``I`` from 16-bit PNGs on older Pillow): float32 ``[H,W,1]``, value / 65535.
    - 32-bit integer: float32 ``[H,W,1]`` over the type's range; float (``F``): float32 clamped to [0, 1].

    The pixel count is read from the header (``Image.open`` is lazy) and checked against ``max_pixels``
    (None: :func:`max_image_pixels`; 0: no limit) before anything is decoded. A JPEG over the limit is decoded
    reduced by libjpeg (1/2, 1/4 or 1/8, via ``draft``) to fit; any other file over it is refused with
    :class:`ImageTooLargeError`. EXIF orientation is applied. A multi-frame file (GIF, APNG, TIFF pages) gives
    its first frame.
    """
    from PIL import Image, JpegImagePlugin, UnidentifiedImageError

    path = Path(path)
    name = path.name
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    with warnings.catch_warnings():
        # Our own limit is checked below; Pillow's warning would only repeat it (its hard limit still applies).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"'{name}' was refused by Pillow before decoding: {exc}. Downscale the file.") \
                from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise QwenVLError(f"Cannot read the image '{name}': {exc}") from exc
    with im:
        width, height = im.size
        if limit > 0 and width * height > limit:
            if not isinstance(im, JpegImagePlugin.JpegImageFile):
                raise _too_large(name, width, height, limit, "an image file")
            scale = next((s for s in _JPEG_DRAFT_SCALES if math.ceil(width / s) * math.ceil(height / s) <= limit),
                         None)
            if scale is not None:
                im.draft(im.mode, (width // scale, height // scale))
            if im.size[0] * im.size[1] > limit:
                raise _too_large(name, width, height, limit, "an image file, even decoded at 1/8 size")
            log.info("[QwenVL-Fast] %s is %dx%d, over the limit of %s pixels: decoded at %dx%d (1/%d)",
                     name, width, height, f"{limit:,}", im.size[0], im.size[1], width // im.size[0])
        try:
            im.load()
            return _image_to_tensor(_exif_transposed(im), name)
        except QwenVLError:
            raise
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or damaged data (PIL raises all three)
            raise QwenVLError(f"Cannot decode the image '{name}': {exc}") from exc


def _exif_transposed(im: Any) -> Any:
    from PIL import ImageOps

    try:
        ImageOps.exif_transpose(im, in_place=True)  # no copy of a large image just to rotate it
        return im
    except TypeError:  # Pillow < 9.4: no in_place
        return ImageOps.exif_transpose(im)


def _image_to_tensor(im: Any, name: str) -> torch.Tensor:
    mode = im.mode
    if mode.startswith("I;16"):
        grey = np.asarray(im).astype(np.float32) / np.float32(65535.0)  # handles I;16B's big-endian dtype
        return torch.from_numpy(grey)[..., None]
    if mode == "I":
        values = np.asarray(im)
        grey = np.clip(values.astype(np.float64) / _int_image_scale(im, values), 0.0, 1.0).astype(np.float32)
        return torch.from_numpy(grey)[..., None]
    if mode == "F":
        grey = np.array(im, dtype=np.float32)
        if not np.isfinite(grey).all():
            raise QwenVLError(f"The float image '{name}' holds NaN or infinite values; export it with finite values.")
        return torch.from_numpy(np.clip(grey, 0.0, 1.0, out=grey))[..., None]
    bands = im.getbands()
    if "A" in bands or "a" in bands or "transparency" in im.info:  # RGBA, LA, PA, RGBa, La; P or L/RGB + tRNS
        rgba = im.convert("RGBA")  # a palette's or a colour's transparency becomes an alpha channel here
        return _composite_on_white(_uint8_array(rgba))
    if mode in ("L", "1"):  # grey to RGB here: Pillow's RGB holds 4 bytes a pixel
        grey = _uint8_array(im if mode == "L" else im.convert("L"))
        return grey.expand(-1, -1, 3).contiguous()
    return _uint8_array(im if mode == "RGB" else im.convert("RGB"))


def _int_image_scale(im: Any, values: np.ndarray) -> float:
    """The full-scale value of a 32-bit-container ("I") image: from the file's bit depth when it says, else
    65535 when the values fit 16 bits (16-bit PNGs opened as "I" by older Pillow), else the int32 range."""
    tags = getattr(im, "tag_v2", None)  # TIFF: BitsPerSample (258), SampleFormat (339: 2 is signed)
    if tags is not None and 258 in tags:
        bits, sample_format = (int(v[0] if isinstance(v, tuple) else v) for v in (tags[258], tags.get(339, 1)))
        if bits >= 32:
            return 2.0**31 - 1 if sample_format == 2 else 2.0**32 - 1
        return 2.0**bits - 1
    if im.format == "PNG":  # PNG has no 32-bit samples: an "I" PNG is 16-bit
        return 65535.0
    if values.size and values.min() >= 0 and values.max() <= 65535:
        return 65535.0
    return 2.0**31 - 1


def _uint8_array(im: Any) -> torch.Tensor:
    """A uint8 image's pixels as a tensor that owns its memory (Pillow's array view is read-only)."""
    width, height = im.size
    channels = len(im.getbands())
    raw = im.tobytes()
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, channels)
    return torch.from_numpy(arr.copy())


def _composite_on_white(rgba: torch.Tensor) -> torch.Tensor:
    """uint8 RGBA ``[H,W,4]`` onto white, as uint8 RGB: :func:`canonicalize_image`'s arithmetic, bit for bit.

    In blocks of rows, so a large image never has a float32 copy of itself (16 bytes a pixel) at once.
    """
    h, w, _ = rgba.shape
    if bool((rgba[..., 3] == 255).all()):
        return rgba[..., :3].contiguous()
    out = torch.empty((h, w, 3), dtype=torch.uint8)
    rows = max(1, (1 << 22) // max(w, 1))  # about 4 Mpx (64 MiB of float32) per block
    for top in range(0, h, rows):
        f = rgba[top:top + rows].float() / 255.0
        alpha = f[..., 3:4]
        rgb = f[..., :3] * alpha + (1.0 - alpha)
        out[top:top + rows] = (rgb * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return out


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


class ImageIdentity(NamedTuple):
    """What identifies an image to the caches: its canonical digest, its canonical size (h, w), its detail
    score (None unless asked for or remembered) and, when this call had to make it, its canonical tensor."""

    digest: str
    size_in: tuple[int, int]
    score: float | None
    canonical: torch.Tensor | None


def image_identity(image: torch.Tensor, memo: DigestMemo | None, *, want_score: bool) -> ImageIdentity:
    """The image's digest, size and (with ``want_score``) detail score, from the memo when it has them.

    A new image is canonicalised once, MD5-hashed once and its memo key (a hash of its raw bytes) computed
    once, for the lookup and the store after it. A remembered image is neither canonicalised nor MD5-hashed,
    unless a score is wanted that the memo does not hold yet; the score is then remembered too. Without a
    memo (the cache is off) nothing needs the digest: it is "" and the image is only canonicalised.
    """
    key = memo.key_of(image) if memo is not None else None
    seen = memo.lookup(key) if memo is not None else None
    canonical = None
    if seen is None:
        canonical = canonicalize_image(image)
        digest = canonical_digest(canonical) if memo is not None else ""
        seen = (digest, (int(canonical.shape[0]), int(canonical.shape[1])), None)
    digest, size_in, score = seen
    if want_score and score is None:
        if canonical is None:
            canonical = canonicalize_image(image)
        score = qp.detail_score(canonical)
    if memo is not None and canonical is not None:  # a new image, or its detail score is new
        memo.store(key, (digest, size_in, score))
    return ImageIdentity(digest, tuple(size_in), score, canonical)


def prepare_images(images: list[torch.Tensor], quality: str, spec: ImageSpec, cache: EmbeddingCache | None,
                   mon: RunMonitor, key_extra: str = "") -> list[PreparedImage]:
    """Digest, budget, size, grid and cache key of each image; the cached embedding where there is one."""
    prepared: list[PreparedImage] = []
    quality = qp.validate_quality(quality)
    memo = cache.digests if cache is not None else None
    with mon.stage("hash"):
        for i, image in enumerate(images):
            ident = image_identity(image, memo, want_score=quality == qp.AUTO)
            budget = qp.resolve_budget(quality, spec.factor, spec.native_limits, ident.canonical, score=ident.score)
            size = qp.target_size(ident.size_in[0], ident.size_in[1], spec.factor, budget)
            grid = (1, size[0] // spec.patch_size, size[1] // spec.patch_size)
            key = entry_key(ident.digest, spec.weights_identity + key_extra, spec.pixel_dtype, size,
                            (spec.image_mean, spec.image_std))
            item = PreparedImage(i, ident.digest, ident.size_in, budget, size, grid, key, ident.canonical)
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
