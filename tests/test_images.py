"""vision/images.py: splitting a node's IMAGE, canonicalising, the digest helper and its memo, the cache keys of
prepare_images, the pixel values of the misses; and a new image is canonicalised and hashed once per run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_FAMILIES, load_tiny, tiny_request
from qwenvl_fast import embedding_cache as ec
from qwenvl_fast import quality_presets as qp
from qwenvl_fast.core.api import VideoClip
from qwenvl_fast.core.errors import QwenVLError
from qwenvl_fast.engine import vision_encode
from qwenvl_fast.perf_monitor import RunMonitor
from qwenvl_fast.sources import tf_compat
from qwenvl_fast.vision import images
from qwenvl_fast.vision import video as video_pipeline

FAMILY = "tiny-qwen2.5-vl"
needs_tiny = pytest.mark.skipif(FAMILY not in TINY_FAMILIES, reason="needs the tiny Qwen2.5-VL")


def rand_image(seed: int, h: int = 40, w: int = 60, c: int = 3) -> torch.Tensor:
    return torch.rand(h, w, c, generator=torch.Generator().manual_seed(seed))


def spec(identity: str = "weights-a") -> images.ImageSpec:
    return images.ImageSpec(patch_size=14, merge_size=2, temporal_patch_size=2, image_mean=(0.5, 0.5, 0.5),
                            image_std=(0.5, 0.5, 0.5), native_limits=None, device=torch.device("cpu"),
                            pixel_dtype=torch.float32, weights_identity=identity)


def quiet() -> RunMonitor:
    return RunMonitor(enabled=False)


# -- split_image_batch --------------------------------------------------------------------------------------------


def test_split_image_batch_shapes_and_views():
    assert images.split_image_batch(None) == []
    one = rand_image(0)
    assert images.split_image_batch(one)[0] is one
    batch = torch.stack([rand_image(1), rand_image(2)])
    parts = images.split_image_batch(batch)
    assert len(parts) == 2 and all(p.shape == (40, 60, 3) for p in parts)
    assert parts[1].untyped_storage().data_ptr() == batch.untyped_storage().data_ptr()  # views, no copies
    assert torch.equal(parts[1], batch[1])
    assert images.split_image_batch(torch.zeros(0, 8, 8, 3)) == []


@pytest.mark.parametrize("value, words", [
    (torch.zeros(2, 1, 8, 8, 3), "5-D"),
    (torch.zeros(8, 8), "expected [B,H,W,C]"),
    ([[0.0]], "must be a ComfyUI IMAGE tensor"),
])
def test_split_image_batch_refuses_what_is_not_an_image_batch(value, words):
    with pytest.raises(QwenVLError, match=words.replace("[", r"\[").replace("]", r"\]")):
        images.split_image_batch(value)


# -- canonicalize_image ---------------------------------------------------------------------------------------------


def test_canonicalize_channels_first_grey_and_grey_alpha():
    rgb = (rand_image(3) * 255).round().to(torch.uint8)
    assert torch.equal(images.canonicalize_image(rgb.permute(2, 0, 1)), rgb)  # CHW is turned to HWC
    grey = rand_image(4, c=1)
    out = images.canonicalize_image(grey)
    assert out.shape == (40, 60, 3) and out.dtype == torch.uint8
    assert torch.equal(out[..., 0], out[..., 2]) and torch.equal(out[..., 0], (grey[..., 0] * 255).round().byte())
    transparent = torch.stack([torch.zeros(40, 60), torch.zeros(40, 60)], -1)  # black, alpha 0: white
    assert bool((images.canonicalize_image(transparent) == 255).all())
    half = torch.stack([torch.zeros(40, 60), torch.full((40, 60), 0.5)], -1)  # black at half alpha: mid grey
    assert bool((images.canonicalize_image(half) == 128).all())


def test_canonicalize_clamps_floats_and_keeps_uint8_rgb_exactly():
    wild = rand_image(5) * 3 - 1  # values in [-1, 2)
    out = images.canonicalize_image(wild)
    assert torch.equal(out, (wild.clamp(0, 1) * 255).round().to(torch.uint8))
    u8 = (rand_image(6) * 255).to(torch.uint8)
    strided = u8.transpose(0, 1)  # not contiguous
    canon = images.canonicalize_image(strided)
    assert canon.is_contiguous() and torch.equal(canon, strided)


def test_canonicalize_pads_a_long_strip_with_white():
    strip = torch.zeros(1, 500, 3)
    out = images.canonicalize_image(strip)
    assert out.shape[1] == 500 and out.shape[0] == qp.padded_size(1, 500)[0] > 1
    black_rows = [r for r in range(out.shape[0]) if bool((out[r] == 0).all())]
    assert len(black_rows) == 1 and int((out == 255).all(-1).sum()) == (out.shape[0] - 1) * 500  # the rest: white


@pytest.mark.parametrize("value, words", [
    (torch.zeros(0, 5, 3), "empty image"),
    (torch.zeros(5, 5, 5), "5 channels"),
    (torch.full((4, 4, 3), float("nan")), "NaN"),
    (torch.zeros(4, 4, 3, dtype=torch.bool), "Unsupported image dtype"),
    (torch.zeros(4, 4), r"\[H,W,C\]"),
])
def test_canonicalize_refuses_broken_images(value, words):
    with pytest.raises(QwenVLError, match=words):
        images.canonicalize_image(value)


# -- image_identity and its memo ----------------------------------------------------------------------------------


def test_image_identity_new_then_remembered():
    memo = ec.DigestMemo()
    img = rand_image(7)
    first = images.image_identity(img, memo, want_score=False)
    assert first.canonical is not None and first.score is None
    assert first.digest == ec.canonical_digest(images.canonicalize_image(img)) and first.size_in == (40, 60)
    again = images.image_identity(img.clone(), memo, want_score=False)  # same values, another tensor
    assert again.canonical is None and (again.digest, again.size_in) == (first.digest, first.size_in)
    scored = images.image_identity(img, memo, want_score=True)  # the memo has no score yet: canonicalised once
    assert scored.canonical is not None and scored.score == pytest.approx(qp.detail_score(first.canonical))
    remembered = images.image_identity(img, memo, want_score=True)
    assert remembered.canonical is None and remembered.score == scored.score and len(memo) == 1
    img.mul_(0.5)  # in place: a new image to the memo
    changed = images.image_identity(img, memo, want_score=False)
    assert changed.canonical is not None and changed.digest != first.digest and len(memo) == 2


def test_image_identity_without_a_memo_needs_no_digest():
    ident = images.image_identity(rand_image(8), None, want_score=True)
    assert ident.digest == "" and ident.canonical is not None and ident.score is not None


def test_digest_memo_is_a_bounded_lru():
    memo = ec.DigestMemo(max_entries=2)
    a, b, c = rand_image(9), rand_image(10), rand_image(11)
    memo.put(a, "a")
    memo.put(b, "b")
    assert memo.get(a) == "a"  # a is now the most recent
    memo.put(c, "c")
    assert memo.get(b) is None and memo.get(a) == "a" and memo.get(c) == "c" and len(memo) == 2
    key = memo.key_of(a)
    assert memo.lookup(key) == "a" and memo.lookup(None) is None
    memo.store(None, "ignored")  # an unreadable tensor has no key: nothing kept
    assert len(memo) == 2
    memo.clear()
    assert len(memo) == 0


# -- prepare_images and pixel_values_for ---------------------------------------------------------------------------


def test_same_pixels_in_uint8_and_float_share_the_key():
    u8 = (rand_image(12, 90, 120) * 255).round().to(torch.uint8)
    as_float = u8.float() / 255.0
    cache = ec.EmbeddingCache(use_disk=False)
    a, b = images.prepare_images([u8, as_float], "fast", spec(), cache, quiet())
    assert a.digest == b.digest and a.key == b.key and a.size == b.size and a.grid == b.grid
    assert len(cache.digests) == 2  # two tensors with different bytes, one canonical image
    [other] = images.prepare_images([u8], "fast", spec("weights-b"), cache, quiet())
    assert other.digest == a.digest and other.key != a.key  # other tower weights: another entry
    [sharper] = images.prepare_images([u8], "high", spec(), cache, quiet())
    assert sharper.size != a.size and sharper.key != a.key


def test_prepare_images_sizes_grid_and_cache_tier():
    cache = ec.EmbeddingCache(use_disk=False)
    img = rand_image(13, 90, 120)
    [item] = images.prepare_images([img], "fast", spec(), cache, quiet())
    assert item.size[0] % 28 == 0 and item.size[1] % 28 == 0
    assert item.grid == (1, item.size[0] // 14, item.size[1] // 14) and item.tokens == item.grid[1] * item.grid[2]
    assert item.tier == "miss" and item.embedding is None and item.canonical is not None
    cache.put(item.key, ec.ImageEmbedding(torch.zeros(item.tokens // 4, 8), [], item.grid))
    [hit] = images.prepare_images([img], "fast", spec(), cache, quiet())
    assert hit.tier == "memory" and hit.embedding is not None and hit.canonical is None  # a hit: not canonicalised
    [off] = images.prepare_images([img], "fast", spec(), None, quiet())
    assert off.tier == "off" and off.digest == "" and off.canonical is not None


def test_pixel_values_for_shapes():
    imgs = [rand_image(14, 90, 120), rand_image(15, 60, 60)]
    prepared = images.prepare_images(imgs, "fast", spec(), None, quiet())
    pixel_values, grid = images.pixel_values_for(prepared, spec(), "fast", quiet())
    assert grid.tolist() == [list(p.grid) for p in prepared]
    patches = sum(p.tokens for p in prepared)
    assert tuple(pixel_values.shape) == (patches, 3 * 2 * 14 * 14) and pixel_values.dtype == torch.float32


@needs_tiny
def test_pixel_values_for_reference_matches_the_fast_path(models_dir):
    model_spec = load_tiny(models_dir, FAMILY, dtype="fp32").image_spec
    prepared = images.prepare_images([rand_image(16, 90, 120)], "fast", model_spec, None, quiet())
    fast, fast_grid = images.pixel_values_for(prepared, model_spec, "fast", quiet())
    ref, ref_grid = images.pixel_values_for(prepared, model_spec, "reference", quiet())
    assert fast_grid.tolist() == ref_grid.tolist() == [list(prepared[0].grid)]
    assert fast.shape == ref.shape
    assert torch.allclose(fast, ref, atol=0.05)  # resize kernels differ by a little, the layout not at all


# -- one new image: canonicalised once, hashed once -------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """Counts canonicalisations, canonical digests (MD5) and memo keys (hashes of the raw bytes) anywhere in the
    engine's image and video paths."""
    counts = {"canonicalize": 0, "digest": 0, "memo_key": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapper

    canon = counting("canonicalize", images.canonicalize_image)
    for module in (images, video_pipeline, vision_encode):
        monkeypatch.setattr(module, "canonicalize_image", canon)
    digest = counting("digest", ec.canonical_digest)
    monkeypatch.setattr(images, "canonical_digest", digest)
    monkeypatch.setattr(ec, "canonical_digest", digest)
    monkeypatch.setattr(ec, "tensor_memo_key", counting("memo_key", ec.tensor_memo_key))
    return counts


@needs_tiny
@pytest.mark.parametrize("quality", ["fast", "auto"])
@pytest.mark.parametrize("batch_mode", ["one prompt, all images", "one answer per image"])
def test_a_new_image_is_canonicalised_and_hashed_once(models_dir, counted, quality, batch_mode):
    model = load_tiny(models_dir, FAMILY)
    result = model.run(tiny_request([rand_image(17, 90, 120)], image_quality=quality, batch_mode=batch_mode,
                                    max_new_tokens=2, min_new_tokens=2))
    assert result.record.images[0]["cache"] == "miss"
    assert counted == {"canonicalize": 1, "digest": 1, "memo_key": 1}
    again = model.run(tiny_request([rand_image(17, 90, 120)], image_quality=quality, batch_mode=batch_mode,
                                   max_new_tokens=2, min_new_tokens=2))
    assert again.record.images[0]["cache"] == "memory"
    assert counted == {"canonicalize": 1, "digest": 1, "memo_key": 2}  # a repeat: its raw bytes hashed, no more


@pytest.mark.parametrize("quality", ["fast", "auto", "native"])
def test_a_new_upload_is_canonicalised_and_hashed_once(counted, quality):
    """The server backend's uploads go through the same digest helper: one of each per new image."""
    from qwenvl_fast.backends.uploads import Uploads
    from qwenvl_fast.perf_monitor import RunMonitor

    uploads = Uploads("png", factor=28)
    first = uploads.prepare([rand_image(23, 90, 120)], quality, RunMonitor(enabled=False))
    assert first[0]["record"]["cache"] == "encoded"
    assert counted == {"canonicalize": 1, "digest": 1, "memo_key": 1}
    again = uploads.prepare([rand_image(23, 90, 120)], quality, RunMonitor(enabled=False))
    assert again[0]["record"]["cache"] == "client-memo" and again[0]["url"] == first[0]["url"]
    assert counted == {"canonicalize": 1, "digest": 1, "memo_key": 2}


@needs_tiny
def test_a_new_image_through_the_node_is_hashed_once(models_dir, counted, monkeypatch):
    """The Run node splits its IMAGE batch into views (split_image_batch): still one of each per new image."""
    monkeypatch.setenv("QWENVL_FAST_MODELS_DIR", str(models_dir))
    from qwenvl_fast import nodes

    batch = torch.stack([rand_image(18, 90, 120), rand_image(19, 90, 120)])
    out = nodes.QwenVLFastRun().run(
        image=batch, model=FAMILY, quantization="none", attention_mode="auto", prompt="What is this?",
        system_prompt="", image_quality="auto", enable_image_cache=True, max_new_tokens=2, do_sample=False,
        temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0, seed=0, batch_mode="one prompt, all images",
        keep_model_loaded=True)["result"]
    assert [i["cache"] for i in json.loads(out[2])["images"]] == ["miss", "miss"]
    assert counted == {"canonicalize": 2, "digest": 2, "memo_key": 2}


@needs_tiny
@pytest.mark.skipif(tf_compat.transformers_version() < (5, 18), reason="video needs transformers >= 5.18")
def test_new_video_frames_are_canonicalised_and_hashed_once(models_dir, counted):
    model = load_tiny(models_dir, FAMILY)
    frames = torch.rand(4, 56, 84, 3, generator=torch.Generator().manual_seed(20))
    result = model.run(tiny_request([], videos=[VideoClip(frames, 2.0)], max_frames=4, max_new_tokens=2,
                                    min_new_tokens=2))
    assert result.record.videos[0]["cache"] == "miss"
    assert counted == {"canonicalize": 4, "digest": 4, "memo_key": 4}
