"""fast_preprocess against the real transformers Qwen-VL image processor (offline, synthetic processors).

Tolerance: on the CPU our pipeline runs the same uint8 resize kernel (or its bit-exact integer
replay, ``resize_mode="fixed_point"``, the path used on CUDA) and the same float32 fused
normalisation as the processor, and the measured difference is exactly 0. We still allow
ATOL = 1e-6 for float rounding noise only. A looser bound such as 0.02 would hide real bugs: one
uint8 level after normalisation is 1/(255*std) = 0.0146 for Qwen2.5-VL's CLIP std (0.0078 for
Qwen3-VL's 0.5), so an off-by-one resize, a missing clamp or a wrong rounding would pass it.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from qwenvl_fast.sources import synthetic
from qwenvl_fast.vision import fast_preprocess as fp

ATOL = 1e-6  # see module docstring: measured 0.0 on the CPU
FAMILIES = ["tiny-qwen2.5-vl", "tiny-qwen3-vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def image_processor(request):
    return synthetic.build_processor(synthetic.SYNTHETIC_PRESETS[request.param]).image_processor


def _kwargs(ip, device="cpu", **extra):
    return dict(patch_size=ip.patch_size, merge_size=ip.merge_size, temporal_patch_size=ip.temporal_patch_size,
                image_mean=ip.image_mean, image_std=ip.image_std, device=device, **extra)


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    """Random noise: the hardest content for a resize (every pass overshoots and clamps)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)


def _reference(ip, images: list[torch.Tensor], min_pixels: int, max_pixels: int):
    out = ip(images=images, size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
             input_data_format="channels_last", return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.dtype == ref.dtype
    diff = (ours.float() - ref.float()).abs()
    assert diff.max().item() <= ATOL, f"max abs diff {diff.max().item()}"
    assert diff.mean().item() <= ATOL / 10, f"mean abs diff {diff.mean().item()}"


# (h, w, min_pixels, max_pixels) in units of factor**2 (factor = patch * merge), so each family lands
# on its own grid: odd sizes, a tiny image upscaled, an image already at its target, a large downscale.
CASES = {
    "odd-37x211": (37, 211, 4, 64),
    "tiny-2x3-upscale": (2, 3, 16, 64),
    "at-target-4x6-factors": (None, None, 4, 64),
    "downscale-1000x700": (1000, 700, 4, 256),
}


@pytest.mark.parametrize("resize_mode", ["auto", "fixed_point"])
@pytest.mark.parametrize("case", list(CASES))
def test_single_image_matches_processor(image_processor, case, resize_mode):
    ip = image_processor
    factor = ip.patch_size * ip.merge_size
    h, w, lo, hi = CASES[case]
    if h is None:
        h, w = 4 * factor, 6 * factor
    min_pixels, max_pixels = lo * factor * factor, hi * factor * factor
    target = smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    img = _image(h, w, seed=h * 1000 + w)

    ref_pv, ref_grid = _reference(ip, [img], min_pixels, max_pixels)
    pv, grid = fp.preprocess_images([img], [target], **_kwargs(ip, resize_mode=resize_mode))

    assert grid.device.type == "cpu" and grid.dtype == torch.long
    assert grid.tolist() == ref_grid.tolist() == [[1, target[0] // ip.patch_size, target[1] // ip.patch_size]]
    _assert_close(pv, ref_pv)


def test_resize_skipped_at_target_and_used_otherwise(image_processor, monkeypatch):
    ip = image_processor
    factor = ip.patch_size * ip.merge_size
    calls = []
    real = fp._resize
    monkeypatch.setattr(fp, "_resize", lambda b, s, m: calls.append((tuple(b.shape), s)) or real(b, s, m))
    at_target = _image(2 * factor, 3 * factor, seed=1)
    fp.preprocess_images([at_target], [(2 * factor, 3 * factor)], **_kwargs(ip))
    assert calls == []
    fp.preprocess_images([at_target], [(3 * factor, 3 * factor)], **_kwargs(ip))
    assert calls == [((1, 3, 2 * factor, 3 * factor), (3 * factor, 3 * factor))]


def test_batch_is_concatenation_of_singles_and_matches_processor(image_processor, monkeypatch):
    ip = image_processor
    factor = ip.patch_size * ip.merge_size
    min_pixels, max_pixels = 4 * factor * factor, 64 * factor * factor
    # Two images share a source shape (one resize call), two different sources share a target
    # (normalised together), one is at its target already, and the order is interleaved.
    shapes = [(37, 211), (150, 100), (37, 211), (152, 101), (4 * factor, 5 * factor), (150, 100)]
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    targets = [smart_resize(h, w, factor, min_pixels, max_pixels) for h, w in shapes]
    assert targets[1] == targets[3] and len(set(targets)) < len(targets)  # the grouping is exercised

    singles = [fp.preprocess_images([im], [t], **_kwargs(ip)) for im, t in zip(images, targets)]
    calls = []
    real = fp._resize
    monkeypatch.setattr(fp, "_resize", lambda b, s, m: calls.append(tuple(b.shape)) or real(b, s, m))
    pv, grid = fp.preprocess_images(images, targets, **_kwargs(ip))

    assert torch.equal(pv, torch.cat([s[0] for s in singles]))
    assert torch.equal(grid, torch.cat([s[1] for s in singles]))
    assert grid.tolist() == [[1, h // ip.patch_size, w // ip.patch_size] for h, w in targets]
    assert sorted(c[0] for c in calls) == [1, 2, 2]  # 37x211, 150x100 twice each; 152x101 once; one skip

    ref_pv, ref_grid = _reference(ip, images, min_pixels, max_pixels)
    assert torch.equal(grid, ref_grid)
    _assert_close(pv, ref_pv)


def test_dtype_is_float32_result_cast(image_processor):
    ip = image_processor
    factor = ip.patch_size * ip.merge_size
    img = _image(50, 90, seed=7)
    size = [(2 * factor, 3 * factor)]
    pv32, _ = fp.preprocess_images([img], size, **_kwargs(ip))
    pv16, _ = fp.preprocess_images([img], size, **_kwargs(ip, dtype=torch.bfloat16))
    assert pv16.dtype == torch.bfloat16
    assert torch.equal(pv16, pv32.to(torch.bfloat16))


@pytest.mark.parametrize("hw_out", [(5, 7, 56, 84), (333, 517, 96, 160), (1200, 90, 224, 28), (64, 64, 64, 128)])
def test_fixed_point_resize_is_bit_exact_with_torch_cpu_kernel(hw_out):
    from torchvision.transforms.v2 import functional as tvF

    h, w, th, tw = hw_out
    x = _image(h, w, seed=h + w).permute(2, 0, 1).unsqueeze(0).contiguous()
    expected = tvF.resize(x, [th, tw], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(fp.resize_uint8_fixed_point(x, (th, tw)), expected)
    # The plain float resize (what torchvision does on CUDA) is not: this is why the integer path exists.
    flt = torch.nn.functional.interpolate(x.float(), size=[th, tw], mode="bicubic", antialias=True)
    if (h, w) != (64, 64):  # a pure 2x upscale of the height only is smooth enough to agree
        assert not torch.equal(flt.clamp(0, 255).round().to(torch.uint8), expected)


def test_empty_and_invalid_inputs():
    kw = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5] * 3,
          "image_std": [0.5] * 3, "device": "cpu"}
    pv, grid = fp.preprocess_images([], [], **kw)
    assert pv.shape == (0, 3 * 2 * 14 * 14) and grid.shape == (0, 3)
    img = _image(30, 30, seed=0)
    with pytest.raises(ValueError, match="multiple"):
        fp.preprocess_images([img], [(30, 30)], **kw)
    with pytest.raises(TypeError, match="uint8"):
        fp.preprocess_images([img.float() / 255], [(28, 28)], **kw)
    with pytest.raises(ValueError, match="3 channels"):
        fp.preprocess_images([img.permute(2, 0, 1)], [(28, 28)], **kw)
    with pytest.raises(ValueError, match="sizes"):
        fp.preprocess_images([img, img], [(28, 28)], **kw)
    with pytest.raises(ValueError, match="resize_mode"):
        fp.preprocess_images([img], [(28, 28)], resize_mode="pil", **kw)


def test_upload_cpu_is_a_no_op():
    tensors = [_image(4, 5, seed=0), torch.randn(3, 2), torch.arange(6).view(2, 3).t()]  # incl. a non-contiguous
    out = fp.upload(tensors, "cpu")
    assert len(out) == len(tensors)
    for a, b in zip(out, tensors):
        assert a is b  # no copy at all
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_upload_and_preprocess_on_cuda(image_processor):
    ip = image_processor
    factor = ip.patch_size * ip.merge_size
    host = [_image(37, 211, seed=3), torch.arange(12, dtype=torch.float32).view(3, 4).t()]
    out = fp.upload(host, "cuda")
    assert all(t.device.type == "cuda" for t in out)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(out, host))
    assert fp.upload(out, "cuda")[0] is out[0]  # already there: untouched

    shapes = [(37, 211), (1000, 700), (2, 3), (4 * factor, 6 * factor), (37, 211)]
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    min_pixels, max_pixels = 4 * factor * factor, 256 * factor * factor
    targets = [smart_resize(h, w, factor, min_pixels, max_pixels) for h, w in shapes]
    ref_pv, ref_grid = _reference(ip, images, min_pixels, max_pixels)
    pv, grid = fp.preprocess_images(images, targets, **_kwargs(ip, device="cuda"))
    assert pv.device.type == "cuda" and grid.device.type == "cpu"
    assert torch.equal(grid, ref_grid)
    _assert_close(pv.cpu(), ref_pv)  # the integer resize makes CUDA bit-identical to the CPU processor
    pv_tv, _ = fp.preprocess_images(images, targets, **_kwargs(ip, device="cuda", resize_mode="torchvision"))
    assert pv_tv.shape == ref_pv.shape  # float resize: close but not identical on noise
