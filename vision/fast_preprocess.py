"""Qwen-VL image preprocessing on tensors, on the target device, without a PIL round trip.

ComfyUI hands us images that are already tensors. The stock path (tensor -> PIL -> processor on
the CPU -> float32 pixel_values -> device) converts twice, resizes on the CPU and uploads four bytes
per value. Here the uint8 pixels are uploaded once (pinned, asynchronous, on a side stream) and
resize, rescale, normalise and patch flattening run on the device with the same math as
transformers' torchvision-backed ``Qwen2VLImageProcessor`` (transformers 5.x), so the model sees
the values it was trained with.

This module is pure: no ComfyUI imports, nothing is allocated and CUDA is not touched at import
time (the side streams are created lazily, on first use).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import torch
from torchvision.transforms.v2 import functional as tvF

log = logging.getLogger("QwenVL-Fast")

__all__ = ["preprocess_images", "preprocess_video", "resize_uint8_fixed_point", "upload"]

ResizeMode = Literal["auto", "fixed_point", "torchvision"]

# The processor rescales by 1/255 and normalises in one fused step: (x - mean*255) / (std*255).
# We use the same constant so the float32 results are bit-identical where the resize is.
_RESCALE_FACTOR = 1.0 / 255.0

# One copy stream per CUDA device index, created on first use (never at import).
_side_streams: dict[int, torch.cuda.Stream] = {}


def _cuda_index(device: torch.device) -> int:
    """The concrete index of a CUDA device ("cuda" alone means the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The dedicated host-to-device copy stream of ``device``, so uploads overlap compute on the main stream."""
    index = _cuda_index(device)
    stream = _side_streams.get(index)
    if stream is None:
        stream = torch.cuda.Stream(device=index)
        _side_streams[index] = stream
    return stream


def upload(tensors: Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Move ``tensors`` to ``device``, asynchronously when the device is CUDA.

    CUDA: host tensors are pinned (a non_blocking copy from pageable memory is silently
    synchronous) and copied with ``non_blocking=True`` on a dedicated side stream. The current
    (consumer) stream is then made to wait on the side stream, so the data is synchronised exactly
    where it is used and the host never blocks. Each result is ``record_stream``-ed on the consumer
    stream: it was allocated on the side stream, and without this the caching allocator could hand
    its memory out again as soon as the Python object dies, while kernels on the consumer stream
    still read it. (The pinned host buffers are protected by torch itself: its pinned-memory
    allocator records an event for every asynchronous copy out of them.)

    CPU: a no-op for tensors already there (same objects, no copy). Tensors already on the target
    device are returned as they are. Nothing here reads a device value back to the host.
    """
    device = torch.device(device)
    tensors = list(tensors)
    if device.type != "cuda":
        return [t if t.device == device else t.to(device) for t in tensors]
    if not torch.cuda.is_available():
        raise RuntimeError(f"upload(): device {device} requested but CUDA is not available")

    index = _cuda_index(device)
    target = torch.device("cuda", index)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    host_slots = []
    for i, t in enumerate(tensors):
        if t.device == target:
            out[i] = t
        elif t.device.type == "cpu":
            host_slots.append(i)
        else:  # another GPU: a peer copy ordered on the current streams is fine and rare
            out[i] = t.to(target)
    if not host_slots:
        return out  # type: ignore[return-value]

    with torch.cuda.device(index):
        consumer = torch.cuda.current_stream(index)
        side = _side_stream(target)
        with torch.cuda.stream(side):
            for i in host_slots:
                t = tensors[i]
                pinned = t if t.is_pinned() else t.pin_memory()
                out[i] = pinned.to(target, non_blocking=True)
        consumer.wait_stream(side)
        for i in host_slots:
            out[i].record_stream(consumer)  # type: ignore[union-attr]
    return out  # type: ignore[return-value]


# --- Resize -------------------------------------------------------------------------------------------
# The processor resizes uint8 on the CPU, where torch runs a PIL-compatible fixed-point kernel: a
# horizontal then a vertical pass, int16 weights, int32 sums, and a clamp to 0..255 after EACH pass.
# On CUDA, torchvision instead resizes in float32 in one 2D pass and rounds once; on noisy or
# sharp-edged content that differs from the CPU result by up to ~24 levels (measured), because the
# intermediate clamp is missing. So on devices other than the CPU we replay the CPU kernel's
# integer arithmetic with ordinary tensor ops; it is bit-identical (checked against torchvision on
# the CPU, and it is what PIL, hence the Qwen training pipeline, computes).

_CUBIC_A = -0.5  # Keys' cubic with a = -0.5: torch's choice for antialiased bicubic, as in PIL
_CUBIC_SUPPORT = 2.0  # half the bicubic interpolation size (4 taps)


@lru_cache(maxsize=128)
def _fixed_point_weights(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tap indices [out, K] (int64), int16-valued weights [out, K] (int32) and their precision in bits.

    A vectorised transcription of torch's ``_compute_indices_int16_weights_aa`` (double precision,
    the same operation order, the same running sum) so that the quantised weights are identical.
    Host tensors, cached per (in, out): a few KB each.
    """
    scale = in_size / out_size
    support = _CUBIC_SUPPORT * scale if scale >= 1.0 else _CUBIC_SUPPORT
    taps = math.ceil(support) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    a = _CUBIC_A

    i = torch.arange(out_size, dtype=torch.float64)
    center = scale * (i + 0.5)
    xmin = torch.clamp((center - support + 0.5).trunc(), min=0).to(torch.int64)
    xsize = torch.clamp((center + support + 0.5).trunc(), max=in_size).to(torch.int64) - xmin
    j = torch.arange(taps, dtype=torch.int64)
    x = ((j[None, :] + xmin[:, None]).to(torch.float64) - center[:, None] + 0.5) * invscale
    x = x.abs()
    w = torch.where(
        x < 1.0,
        ((a + 2) * x - (a + 3)) * x * x + 1,
        torch.where(x < 2.0, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, torch.zeros_like(x)),
    )
    w = torch.where(j[None, :] < xsize[:, None], w, torch.zeros_like(w))
    total = torch.zeros(out_size, dtype=torch.float64)
    for k in range(taps):  # left-to-right running sum, like the C++ loop (torch.sum may reorder)
        total = total + w[:, k]
    w = torch.where(total[:, None] != 0.0, w / total[:, None], w)

    w_max = float(w.max())
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = w * float(1 << precision)
    w_int = torch.where(w < 0, (scaled - 0.5).trunc(), (scaled + 0.5).trunc()).to(torch.int32)
    idx = torch.clamp(xmin[:, None] + j[None, :], max=in_size - 1)  # padding taps have weight 0
    return idx, w_int, precision


def _fixed_point_pass(x: torch.Tensor, dim: int, out_size: int, idx: torch.Tensor, w: torch.Tensor,
                      precision: int) -> torch.Tensor:
    """One separable pass over ``dim`` of an int32 image batch; returns int32 values in 0..255."""
    shape = [1] * x.dim()
    shape[dim] = out_size
    acc = torch.full((), 1 << (precision - 1), dtype=torch.int32, device=x.device)  # the +0.5 of rounding
    for k in range(idx.shape[1]):
        acc = acc + x.index_select(dim, idx[:, k]) * w[:, k].view(shape)
    return acc.bitwise_right_shift_(precision).clamp_(0, 255)  # arithmetic shift = floor, as in C


def resize_uint8_fixed_point(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic antialiased resize of uint8 ``[..., C, H, W]`` to ``size``, bit-identical to torch's CPU kernel.

    Works on any device with plain tensor ops (index_select, integer multiply-add, shift); the
    weight tables are computed on the host, cached, and uploaded with :func:`upload`.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"resize_uint8_fixed_point expects uint8, got {images.dtype}")
    th, tw = int(size[0]), int(size[1])
    h, w = images.shape[-2], images.shape[-1]
    if (h, w) == (th, tw):
        return images
    # Horizontal first, like torch and PIL: the order matters because each pass rounds and clamps.
    passes = [(dim, out, _fixed_point_weights(src, out)) for dim, src, out in ((-1, w, tw), (-2, h, th)) if src != out]
    tables = upload([t for _, _, (idx, wt, _) in passes for t in (idx, wt)], images.device)
    x = images.to(torch.int32)
    for k, (dim, out, (_, _, precision)) in enumerate(passes):
        x = _fixed_point_pass(x, dim, out, tables[2 * k], tables[2 * k + 1], precision)
    return x.to(torch.uint8)


def _resize(batch: torch.Tensor, size: tuple[int, int], mode: ResizeMode) -> torch.Tensor:
    """Dispatch one uint8 [N, C, H, W] batch to the resize kernel that ``mode`` selects."""
    if mode == "fixed_point" or (mode == "auto" and batch.device.type != "cpu"):
        return resize_uint8_fixed_point(batch, size)
    # CPU (auto) or explicit "torchvision": exactly the call the processor makes.
    return tvF.resize(batch, list(size), interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)


def _normalisation(image_mean: Sequence[float], image_std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused rescale + normalise constants, built exactly like the processor's (float32 mean * 255), on the host."""
    mean = torch.tensor(list(image_mean), dtype=torch.float32) * (1.0 / _RESCALE_FACTOR)
    std = torch.tensor(list(image_std), dtype=torch.float32) * (1.0 / _RESCALE_FACTOR)
    if mean.numel() == 1:
        mean = mean.expand(3).clone()
    if std.numel() == 1:
        std = std.expand(3).clone()
    return mean, std


def _patchify(images: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N * grid_h * grid_w, C*T*P*P] in the processor's exact order.

    Patches are ordered merge-window by merge-window (the vision tower merges each
    ``merge_size x merge_size`` block into one token), each patch is channel-major, and the single
    frame is repeated ``temporal_patch_size`` times because the tower's first layer is a 3D conv.
    """
    n, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    patches = images.reshape(n, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    # [n, gh/m, gw/m, m, m, c, p, p]
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)
    patches = patches.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
    return patches.reshape(n * gh * gw, c * temporal_patch_size * patch_size * patch_size)


def _check_inputs(images: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]], factor: int) -> None:
    """Fail early with a message that names the image, rather than a reshape error deep in patchify."""
    if len(images) != len(sizes):
        raise ValueError(f"preprocess_images: {len(images)} images but {len(sizes)} sizes")
    for i, (img, size) in enumerate(zip(images, sizes)):
        if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[-1] != 3:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"image {i}: expected an HWC RGB tensor with 3 channels, got {shape}")
        if img.dtype != torch.uint8:
            raise TypeError(f"image {i}: expected uint8 pixels (0-255), got {img.dtype}; convert with "
                            "(x * 255).round().clamp(0, 255).to(torch.uint8) first")
        if img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"image {i}: empty image {tuple(img.shape)}")
        th, tw = int(size[0]), int(size[1])
        if th <= 0 or tw <= 0 or th % factor or tw % factor:
            raise ValueError(f"image {i}: target size {(th, tw)} is not a positive multiple of "
                             f"patch_size * merge_size = {factor} (compute it with smart_resize)")


def _resize_grouped(dev_images: list[torch.Tensor], targets: list[tuple[int, int]],
                    resize_mode: ResizeMode) -> tuple[list[torch.Tensor], int]:
    """Each HWC image resized to its target as CHW, batched by (source shape, target shape); and the group count.

    HWC -> CHW is a view; the processor makes it contiguous before resizing, and so do we, so the resize kernels
    see the same layout."""
    n = len(dev_images)
    resized: list[torch.Tensor | None] = [None] * n
    groups: dict[tuple[int, int, int, int], list[int]] = {}
    for i, img in enumerate(dev_images):
        groups.setdefault((img.shape[0], img.shape[1], *targets[i]), []).append(i)
    for (sh, sw, th, tw), idx in groups.items():
        batch = torch.stack([dev_images[i].permute(2, 0, 1) for i in idx]) if len(idx) > 1 \
            else dev_images[idx[0]].permute(2, 0, 1).unsqueeze(0)
        batch = batch.contiguous()
        if (sh, sw) != (th, tw):
            batch = _resize(batch, (th, tw), resize_mode)
        for j, i in enumerate(idx):
            resized[i] = batch[j]
    return resized, len(groups)  # type: ignore[return-value]


def _normalise_grouped(resized: list[torch.Tensor], targets: list[tuple[int, int]], mean: torch.Tensor,
                       std: torch.Tensor, dtype: torch.dtype,
                       patching: tuple[int, int, int]) -> tuple[list[torch.Tensor], int]:
    """Rescale + normalise + patchify, batched by target shape: each image's patches, and the group count.
    ``patching`` is (patch_size, merge_size, temporal_patch_size)."""
    patch_size, merge_size, temporal_patch_size = patching
    per_image: list[torch.Tensor | None] = [None] * len(resized)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(targets):
        groups.setdefault(t, []).append(i)
    for (th, tw), idx in groups.items():
        batch = torch.stack([resized[i] for i in idx]) if len(idx) > 1 else resized[idx[0]].unsqueeze(0)
        pixels = batch.to(torch.float32).sub_(mean).div_(std)
        if dtype != torch.float32:
            pixels = pixels.to(dtype)  # before patchify: the temporal copies are then made in the smaller dtype
        patches = _patchify(pixels, patch_size, merge_size, temporal_patch_size)
        per_patch = (th // patch_size) * (tw // patch_size)
        for j, i in enumerate(idx):
            per_image[i] = patches[j * per_patch:(j + 1) * per_patch]
    return per_image, len(groups)  # type: ignore[return-value]


def preprocess_images(
    images: list[torch.Tensor],
    sizes: list[tuple[int, int]],
    *,
    patch_size: int,
    merge_size: int,
    temporal_patch_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    resize_mode: ResizeMode = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn HWC uint8 RGB tensors into Qwen-VL ``(pixel_values, image_grid_thw)`` on ``device``.

    Same math as ``Qwen2VLImageProcessor`` (torchvision backend): bicubic antialiased resize of the
    uint8 CHW image to ``sizes[i]`` (skipped when already that size), rescale by 1/255, normalise
    with ``image_mean``/``image_std``, repeat the frame ``temporal_patch_size`` times and flatten
    patches in the processor's order.

    ``resize_mode``: "auto" (default) uses torchvision's native uint8 kernel on the CPU (the very
    call the processor makes) and :func:`resize_uint8_fixed_point` on other devices, so the result
    is bit-identical to the CPU processor everywhere. "torchvision" always calls
    ``tvF.resize`` (on CUDA that is a float32 resize, as the processor does when given
    ``device="cuda"``: one kernel, but pixels can differ by many levels on sharp content).
    "fixed_point" forces the integer emulation (for tests on the CPU).

    ``sizes`` are (height, width) targets, multiples of ``patch_size * merge_size`` (the caller ran
    ``smart_resize``). Images are uploaded as uint8 (4x less traffic than float32) and converted on
    the device. Images with the same source and target shape are resized in one call, and images
    with the same target shape are normalised and patchified together.

    Returns ``pixel_values`` [sum of patches, C*T*P*P] on ``device`` in ``dtype`` (normalised in
    float32 like the processor, then cast once) and ``image_grid_thw`` [n, 3] int64 on the host: the grid is
    needed by Python code (token counts, prompt building), and keeping it on the CPU avoids a
    device-to-host sync.
    """
    factor = patch_size * merge_size
    if resize_mode not in ("auto", "fixed_point", "torchvision"):
        raise ValueError(f"resize_mode must be 'auto', 'fixed_point' or 'torchvision', got {resize_mode!r}")
    _check_inputs(images, sizes, factor)
    device = torch.device(device)
    n = len(images)
    patch_dim = 3 * temporal_patch_size * patch_size * patch_size
    targets = [(int(h), int(w)) for h, w in sizes]
    grid_thw = torch.tensor([[1, h // patch_size, w // patch_size] for h, w in targets], dtype=torch.long)
    grid_thw = grid_thw.reshape(n, 3)
    if n == 0:
        return torch.empty(0, patch_dim, device=device, dtype=dtype), grid_thw

    mean, std = _normalisation(image_mean, image_std)
    *dev_images, mean, std = upload([*images, mean, std], device)
    mean, std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    resized, resize_groups = _resize_grouped(dev_images, targets, resize_mode)
    per_image, norm_groups = _normalise_grouped(resized, targets, mean, std, dtype,
                                                (patch_size, merge_size, temporal_patch_size))
    pixel_values = per_image[0] if n == 1 else torch.cat(per_image, dim=0)  # type: ignore[arg-type]
    log.debug("[QwenVL-Fast] preprocessed %d image(s) on %s: %d resize group(s), %d size group(s), %d patches",
              n, device, resize_groups, norm_groups, pixel_values.shape[0])
    return pixel_values, grid_thw


def preprocess_video(
    frames: list[torch.Tensor],
    size: tuple[int, int],
    *,
    patch_size: int,
    merge_size: int,
    temporal_patch_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    resize_mode: ResizeMode = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One clip of HWC uint8 RGB frames (all the same size) into ``(pixel_values_videos, video_grid_thw)``.

    Same math as ``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor`` (torchvision backend): every frame
    resized to ``size`` like an image, rescaled and normalised, the last frame repeated up to a multiple of
    ``temporal_patch_size``, and consecutive frames packed into one temporal patch (the tower's 3D conv
    sees frames 2k and 2k+1 together), in the processor's patch order.
    """
    factor = patch_size * merge_size
    if not frames:
        raise ValueError("preprocess_video: a clip needs at least one frame")
    _check_inputs(frames, [size] * len(frames), factor)
    if len({tuple(f.shape) for f in frames}) != 1:
        raise ValueError("preprocess_video: all frames of a clip must have the same size")
    device = torch.device(device)
    th, tw = int(size[0]), int(size[1])
    mean, std = _normalisation(image_mean, image_std)
    stacked = torch.stack(frames)  # one upload for the clip
    clip, mean, std = upload([stacked, mean, std], device)
    batch = clip.permute(0, 3, 1, 2).contiguous()  # [T, C, H, W]
    if tuple(batch.shape[-2:]) != (th, tw):
        batch = _resize(batch, (th, tw), resize_mode)
    pixels = batch.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    if dtype != torch.float32:
        pixels = pixels.to(dtype)
    if pad := -pixels.shape[0] % temporal_patch_size:
        pixels = torch.cat((pixels, pixels[-1:].expand(pad, -1, -1, -1)))
    t, c = pixels.shape[0], pixels.shape[1]
    gt, gh, gw = t // temporal_patch_size, th // patch_size, tw // patch_size
    patches = pixels.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                             gw // merge_size, merge_size, patch_size)
    # [gt, gh/m, gw/m, m, m, c, tps, p, p]: the processor's order
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = patches.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    return pixel_values, torch.tensor([[gt, gh, gw]], dtype=torch.long)
