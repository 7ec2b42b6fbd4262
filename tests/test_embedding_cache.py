"""The embedding cache: identical text, no vision work on a hit, both tiers, broken entries, bounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_FAMILIES, load_tiny, tiny_request
from qwenvl_fast import embedding_cache as ec
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.vision import images as image_pipeline

load = load_tiny
request = tiny_request


def count_vision_calls(model):
    calls = []

    def hook(module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        calls.append(int(grid.shape[0]))

    handle = model.visual.register_forward_pre_hook(hook, with_kwargs=True)
    return calls, handle


def count_digests(monkeypatch) -> list[int]:
    """Counts how often the engine hashes an image (a one-element list, read after the runs)."""
    count = [0]
    real = image_pipeline.canonical_digest

    def counting(t):
        count[0] += 1
        return real(t)

    monkeypatch.setattr(image_pipeline, "canonical_digest", counting)
    return count


def images(n, seed=0, h=90, w=120):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(h, w, 3, generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_same_tokens_with_cache_off_miss_and_hit(models_dir, family):
    model = load(models_dir, family)
    imgs = images(2)
    off = model.run(request(imgs, enable_image_cache=False, preprocess="reference")).token_ids
    miss = model.run(request(imgs)).token_ids
    calls, handle = count_vision_calls(model)
    try:
        hit = model.run(request(imgs))
    finally:
        handle.remove()
    assert [i["cache"] for i in hit.record.images] == ["memory", "memory"]
    assert calls == [], "the vision tower ran on a cache hit"
    assert off == miss == hit.token_ids


def test_hit_runs_no_image_pipeline(models_dir, monkeypatch):
    """On a hit: no canonicalisation (memoised digest), no preprocessing, no vision tower."""
    model = load(models_dir, "tiny-qwen2.5-vl")
    imgs = images(1)
    model.run(request(imgs))
    from qwenvl_fast.vision import fast_preprocess

    def boom(*a, **k):
        raise AssertionError("image pipeline ran on a hit")

    monkeypatch.setattr(fast_preprocess, "preprocess_images", boom)
    monkeypatch.setattr(ql, "canonicalize_image", boom)
    monkeypatch.setattr(model.processor.image_processor, "__call__", boom)
    calls, handle = count_vision_calls(model)
    try:
        result = model.run(request(imgs))
    finally:
        handle.remove()
    assert calls == [] and result.record.images[0]["cache"] == "memory"


def test_partial_hits_encode_only_the_misses_in_one_call(models_dir):
    model = load(models_dir, "tiny-qwen3-vl")
    a, b, c = images(3, seed=3)
    model.run(request([a]))
    calls, handle = count_vision_calls(model)
    try:
        result = model.run(request([a, b, c]))
    finally:
        handle.remove()
    assert calls == [2], f"expected one encode call with the 2 misses, got {calls}"
    assert [i["cache"] for i in result.record.images] == ["memory", "miss", "miss"]
    fresh = model.run(request([a, b, c], enable_image_cache=False))
    assert fresh.token_ids == result.token_ids


def test_disk_tier_serves_a_new_cache_object(models_dir):
    model = load(models_dir, "tiny-qwen3-vl")
    imgs = images(1, seed=5)
    first = model.run(request(imgs))
    ec._CACHES.clear()  # as after a restart: the memory tier is gone, the folder stays
    calls, handle = count_vision_calls(model)
    try:
        second = model.run(request(imgs))
    finally:
        handle.remove()
    assert second.record.images[0]["cache"] == "disk"
    assert calls == []
    assert second.token_ids == first.token_ids


def test_disk_tier_survives_process_restart(models_dir, isolated_cache, tmp_path):
    img = tmp_path / "pic.png"
    from PIL import Image

    Image.new("RGB", (70, 50), (10, 200, 30)).save(img)
    cmd = [sys.executable, str(ROOT / "cli.py"), "--model", str(models_dir / "tiny-qwen2.5-vl"), "--image", str(img),
           "--max-new-tokens", "4", "--quality", "fast", "--json"]
    env = {**os.environ, "QWENVL_FAST_CACHE_DIR": str(isolated_cache)}
    runs = []
    for _ in range(2):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["timing"]["images"][0]["cache"] == "miss"
    assert runs[1]["timing"]["images"][0]["cache"] == "disk"
    assert runs[0]["texts"] == runs[1]["texts"]


def test_corrupt_and_foreign_disk_entries_are_recomputed(models_dir, isolated_cache):
    import diskcache

    model = load(models_dir, "tiny-qwen2.5-vl")
    imgs = images(1, seed=9)
    first = model.run(request(imgs))
    key = ql.get_cache().memory._lru._items.copy().popitem()[0]
    ec._CACHES.clear()
    raw = diskcache.Cache(str(isolated_cache))
    good = raw.get(key)
    for bad in (good[: len(good) // 2], b"garbage" * 10, ec.serialize_embedding("another-key", ec.deserialize_embedding(
            key, good))):
        raw.set(key, bad)
        ec._CACHES.clear()
        result = model.run(request(imgs))
        assert result.record.images[0]["cache"] == "miss"
        assert result.token_ids == first.token_ids
    # A pickled object written by someone else is never unpickled.
    raw.set(key, {"evil": "pickle"})
    ec._CACHES.clear()
    result = model.run(request(imgs))
    assert result.record.images[0]["cache"] == "miss" and result.token_ids == first.token_ids
    raw.close()


def test_read_only_cache_folder_still_runs(models_dir, tmp_path, monkeypatch, caplog):
    if os.geteuid() == 0:
        folder = tmp_path / "file-not-folder"
        folder.write_text("a file where the cache folder should be")  # root ignores permissions; a file blocks mkdir
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
    monkeypatch.setenv("QWENVL_FAST_CACHE_DIR", str(folder / "sub"))
    ec._CACHES.clear()
    model = load(models_dir, "tiny-qwen2.5-vl")
    with caplog.at_level("WARNING", logger="QwenVL-Fast"):
        a = model.run(request(images(1)))
        b = model.run(request(images(1)))
    assert a.token_ids == b.token_ids
    assert b.record.images[0]["cache"] == "memory"
    assert sum("disk embedding cache disabled" in r.message for r in caplog.records) == 1


def test_cache_folder_deleted_while_running(models_dir, isolated_cache):
    import shutil

    model = load(models_dir, "tiny-qwen2.5-vl")
    model.run(request(images(1, seed=1)))
    shutil.rmtree(isolated_cache)
    result = model.run(request(images(1, seed=2)))
    assert result.record.images[0]["cache"] == "miss"


def test_preset_change_applies_while_loaded(models_dir):
    model = load(models_dir, "tiny-qwen3-vl")
    img = [torch.rand(400, 600, 3)]
    fast = model.run(request(img, image_quality="fast")).record.images[0]
    ultra = model.run(request(img, image_quality="ultra")).record.images[0]
    assert fast["tokens"] <= 256 and ultra["tokens"] > 256
    assert fast["tokens"] < ultra["tokens"]


def test_presets_landing_on_same_size_share_an_entry(models_dir):
    model = load(models_dir, "tiny-qwen2.5-vl")
    img = [torch.rand(28 * 20, 28 * 20, 3)]  # 400 tokens: inside balanced, high and ultra unchanged
    r1 = model.run(request(img, image_quality="balanced")).record.images[0]
    r2 = model.run(request(img, image_quality="ultra")).record.images[0]
    assert r1["size_resized"] == r2["size_resized"] and r2["cache"] == "memory"


def test_different_models_never_share(models_dir):
    img = images(1, seed=11)
    a = load(models_dir, "tiny-qwen3-vl")
    a.run(request(img))
    b = load(models_dir, "tiny-qwen3-vl-moe")  # same vision config and factor, other weights
    assert b.run(request(img)).record.images[0]["cache"] == "miss"


def test_digest_is_memoised_per_tensor(models_dir, monkeypatch):
    model = load(models_dir, "tiny-qwen2.5-vl")
    count = count_digests(monkeypatch)
    img = images(1)
    model.run(request(img))
    model.run(request(img))
    assert count[0] == 1
    img[0].mul_(0.5)  # in-place change: the memo must not be trusted any more
    model.run(request(img))
    assert count[0] == 2


def test_memory_tier_is_bounded_in_bytes():
    tier = ec.MemoryTier(max_bytes=3 * 4 * 100)
    for i in range(5):
        tier.put(str(i), ec.ImageEmbedding(torch.zeros(100, 1), [], (1, 10, 10)))
    assert tier.bytes <= tier.max_bytes and len(tier) == 3 and tier.evictions == 2
    assert tier.get("0") is None and tier.get("4") is not None


def test_disk_tier_is_bounded_and_evicts(tmp_path):
    tier = ec.DiskTier(tmp_path / "d", max_bytes=200_000)
    for i in range(40):
        tier.put(f"k{i}", ec.ImageEmbedding(torch.rand(64, 64), [], (1, 16, 16)))  # ~16 KiB each
    assert tier.volume() <= 200_000
    assert 5 <= tier.count() < 40
    assert tier.get("k39") is not None and tier.get("k0") is None  # least recently used went first


def test_unload_clears_memory_tier(models_dir):
    model = load(models_dir, "tiny-qwen2.5-vl")
    model.run(request(images(1)))
    assert len(ql.get_cache().memory) == 1
    ql.MANAGER.release()
    assert len(ql.get_cache().memory) == 0


def test_two_processes_share_the_disk_cache(tmp_path):
    """Writers in two processes at once: every entry readable afterwards, none corrupt."""
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[3]); import pack_path; pack_path.import_pack()\n"
        "from qwenvl_fast import embedding_cache as ec\n"
        "t = ec.DiskTier(sys.argv[1], max_bytes=50_000_000)\n"
        "for i in range(60):\n"
        "    k = f'k{i % 20}'\n"
        "    t.put(k, ec.ImageEmbedding(torch.full((32, 16), float(i % 20)), [torch.ones(32, 16)], (1, 8, 16)))\n"
        "    got = t.get(k)\n"
        "    assert got is None or float(got.embeds[0, 0]) == float(i % 20), 'corrupt'\n"
        "print('done', sys.argv[2])\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "shared"), str(n), str(ROOT)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    tier = ec.DiskTier(tmp_path / "shared")
    for i in range(20):
        got = tier.get(f"k{i}")
        assert got is not None and float(got.embeds[0, 0]) == float(i)


def test_digest_memo_works_for_inference_tensors(models_dir, monkeypatch):
    """ComfyUI hands nodes inference-mode tensors (no version counter): the memo must still work."""
    model = load(models_dir, "tiny-qwen2.5-vl")
    count = count_digests(monkeypatch)
    with torch.inference_mode():
        img = [torch.rand(90, 120, 3)]
        first = model.run(request(img))
        second = model.run(request(img))
        assert count[0] == 1 and second.record.images[0]["cache"] == "memory"
        img[0].mul_(0.5)  # allowed on inference tensors inside inference mode
        third = model.run(request(img))
    assert count[0] == 2 and third.record.images[0]["cache"] == "miss"
    assert first.token_ids == second.token_ids
