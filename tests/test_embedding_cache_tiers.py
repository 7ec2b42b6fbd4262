"""Embedding cache internals on real tensors and real files: the exact digest memo, the disk tier's
row-count check and busy database handling, and where the cache folder goes without ComfyUI."""

from __future__ import annotations

import gc
import json
import logging
import sqlite3
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch

from qwenvl_fast import embedding_cache as ec
from qwenvl_fast.cache import location

# -- digest memo ---------------------------------------------------------------------------------


def comfy_batch(b: int = 2, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE batch: [B,H,W,C] float32 in [0,1], made under inference mode like ComfyUI's."""
    with torch.inference_mode():
        return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_memo_hits_a_new_view_of_the_same_storage():
    batch = torch.rand(2, 32, 48, 3)
    memo = ec.DigestMemo()
    first = batch.unbind(0)[0]
    memo.put(first, ("digest-0", (32, 48)))
    again = batch.unbind(0)[0]  # a new view object each call, as in the engine
    assert again is not first
    assert memo.get(again) == ("digest-0", (32, 48))
    assert memo.get(batch.unbind(0)[1]) is None  # the other image of the batch
    assert memo.get(batch[0].clone()) == ("digest-0", (32, 48))  # same values, other storage


def test_memo_hits_for_inference_tensors_inside_and_outside_inference_mode():
    batch = comfy_batch()
    assert batch.is_inference()
    memo = ec.DigestMemo()
    memo.put(batch.unbind(0)[1], "v")
    assert memo.get(batch.unbind(0)[1]) == "v"
    with torch.inference_mode():
        assert memo.get(batch.unbind(0)[1]) == "v"


def _sampled_by_old_memo(numel: int, index: int) -> bool:
    """Whether the previous memo's strided sample (about 4,096 values) looked at this element."""
    return index % max(1, numel // 4096) == 0


@pytest.mark.parametrize("where", ["last", "skipped_by_a_strided_sample", "first"])
def test_memo_misses_after_a_single_element_edit(where):
    batch = comfy_batch(b=1, h=64, w=64)
    numel = batch[0].numel()
    index = {"last": numel - 1, "skipped_by_a_strided_sample": 1, "first": 0}[where]
    if where != "first":
        assert not _sampled_by_old_memo(numel, index)
    memo = ec.DigestMemo()
    image = batch.unbind(0)[0]
    memo.put(image, "before")
    with torch.inference_mode():
        flat = batch.view(-1)
        old = flat[index].clone()
        flat[index] = torch.nextafter(old, torch.tensor(2.0))  # the smallest possible change
    assert memo.get(image) is None  # the very same tensor object
    assert memo.get(batch.unbind(0)[0]) is None  # a new view of it
    with torch.inference_mode():
        flat[index] = old
    assert memo.get(batch.unbind(0)[0]) == "before"  # exact both ways: restored values hit again


def test_memo_hashes_non_contiguous_views_in_logical_order():
    base = torch.rand(20, 30, 3)
    view = base.transpose(0, 1)  # [30, 20, 3], not contiguous
    assert not view.is_contiguous()
    memo = ec.DigestMemo()
    memo.put(view, "transposed")
    assert ec.tensor_memo_key(view) == ec.tensor_memo_key(view.contiguous())
    assert memo.get(view.contiguous()) == "transposed"
    assert memo.get(base.transpose(0, 1)) == "transposed"
    # Same storage bytes, same shape, other logical values: must not hit.
    assert memo.get(base.reshape(30, 20, 3)) is None
    cropped = base[::2, 1:, :]  # strided crop
    memo.put(cropped, "crop")
    assert memo.get(base[::2, 1:, :].contiguous()) == "crop"
    base[18, 29, 2] += 0.5  # inside the crop, at its last element
    assert memo.get(base[::2, 1:, :]) is None


def test_memo_key_covers_dtype_and_shape():
    t = torch.rand(8, 8, 3)
    memo = ec.DigestMemo()
    memo.put(t, "float")
    assert memo.get(t.view(torch.int32)) is None  # same bytes, other dtype
    assert memo.get(t.reshape(8, 4, 6)) is None  # same bytes, other shape
    assert memo.get(t) == "float"


def test_memo_is_bounded_and_holds_no_tensor():
    memo = ec.DigestMemo(max_entries=3)
    tensors = [torch.full((4, 4, 3), float(i)) for i in range(5)]
    for i, t in enumerate(tensors):
        memo.put(t, i)
    assert len(memo) == 3
    assert memo.get(tensors[0]) is None and memo.get(tensors[1]) is None
    assert [memo.get(t) for t in tensors[2:]] == [2, 3, 4]
    memo.get(tensors[2])  # recently used: survives the next insert
    memo.put(torch.full((4, 4, 3), 9.0), 9)
    assert memo.get(tensors[2]) == 2 and memo.get(tensors[3]) is None
    big = torch.rand(256, 256, 3)
    ref = weakref.ref(big)
    memo.put(big, "big")
    del big
    gc.collect()
    assert ref() is None, "the memo kept an image tensor alive"


def test_memo_falls_back_to_hashlib_without_xxhash(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "xxhash", None)  # import xxhash now raises ImportError
    monkeypatch.setattr(ec, "_HASHER", None)
    monkeypatch.setattr(ec, "RAW_HASH_NAME", "")
    batch = comfy_batch()
    memo = ec.DigestMemo()
    with caplog.at_level(logging.INFO, logger="QwenVL-Fast"):
        memo.put(batch.unbind(0)[0], "v")
        assert memo.get(batch.unbind(0)[0]) == "v"
        assert memo.get(batch.unbind(0)[1]) is None
    assert ec.RAW_HASH_NAME == "sha1"
    notes = [r for r in caplog.records if "xxhash is not installed" in r.getMessage()]
    assert len(notes) == 1 and notes[0].getMessage().startswith("[QwenVL-Fast]")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memo_hits_for_cuda_views():
    batch = torch.rand(2, 64, 64, 3, device="cuda")
    memo = ec.DigestMemo()
    memo.put(batch.unbind(0)[0], "gpu")
    assert memo.get(batch.unbind(0)[0]) == "gpu"
    assert memo.get(batch[0].cpu()) == "gpu"
    batch[0, -1, -1, -1] += 0.25
    assert memo.get(batch.unbind(0)[0]) is None


# -- disk tier: row count against grid -------------------------------------------------------------


def good_item(seed: float = 1.0) -> ec.ImageEmbedding:
    # grid (1, 8, 12) with merge size 2: 1*8*12 / 4 = 24 rows
    return ec.ImageEmbedding(torch.full((24, 16), seed), [torch.ones(24, 16)], (1, 8, 12))


def forged_blob(key: str, rows: int, grid: tuple[int, int, int], merge: int | None) -> bytes:
    """An entry that is ours in every way (key, format, shapes) except possibly its row count."""
    from safetensors.torch import save

    meta = {"key": key, "format": str(ec.CACHE_FORMAT_VERSION), "grid": json.dumps(list(grid)),
            "deepstack_levels": "1"}
    if merge is not None:
        meta["merge"] = str(merge)
    return save({"embeds": torch.rand(rows, 16), "deepstack.0": torch.rand(rows, 16)}, metadata=meta)


def test_serialized_entries_store_their_merge_size_and_round_trip():
    blob = ec.serialize_embedding("k", good_item())
    header_len = int.from_bytes(blob[:8], "little")
    assert json.loads(blob[8:8 + header_len])["__metadata__"]["merge"] == "2"
    back = ec.deserialize_embedding("k", blob)
    assert back.grid == (1, 8, 12) and back.embeds.shape == (24, 16)
    # An entry written before the merge size was stored still loads when some merge size fits.
    assert ec.deserialize_embedding("k", forged_blob("k", 24, (1, 8, 12), None)).embeds.shape == (24, 16)


@pytest.mark.parametrize("rows, merge", [(23, 2), (25, 2), (96, 2), (23, None), (24, 1)],
                         ids=["one-short", "one-over", "merge-1-rows-under-merge-2", "legacy-fits-nothing",
                              "stored-merge-disagrees"])
def test_disk_entry_with_wrong_row_count_is_dropped_and_the_tier_stays_usable(tmp_path, rows, merge):
    import diskcache

    cache = ec.EmbeddingCache(disk_dir=tmp_path / "d")
    cache.put("good", good_item(3.0))
    raw = diskcache.Cache(str(tmp_path / "d"))
    try:
        raw.set("bad", forged_blob("bad", rows, (1, 8, 12), merge))
        with pytest.raises(ValueError):
            ec.deserialize_embedding("bad", raw.get("bad"))
        got, tier = cache.get("bad", "cpu")
        assert got is None and tier == "miss"
        assert cache.stats.corrupt_entries == 1 and cache.stats.misses == 1
        assert raw.get("bad") is None, "the corrupt entry was not dropped"
    finally:
        raw.close()
    assert cache.disk is not None and cache.disk.available
    cache.memory.clear()
    got, tier = cache.get("good", "cpu")
    assert tier == "disk" and float(got.embeds[0, 0]) == 3.0
    cache.put("later", good_item(4.0))
    cache.memory.clear()
    assert cache.get("later", "cpu")[1] == "disk"
    cache.disk.close()


def test_an_item_whose_rows_fit_no_grid_is_not_written(tmp_path):
    tier = ec.DiskTier(tmp_path / "d")
    tier.put("odd", ec.ImageEmbedding(torch.rand(23, 16), [], (1, 8, 12)))
    assert tier.available and tier.count() == 0 and tier.get("odd") is None
    tier.put("good", good_item())
    assert tier.get("good") is not None
    tier.close()


# -- disk tier: a busy database is not a broken one -----------------------------------------------


def test_a_really_locked_database_skips_reads_and_writes_and_keeps_the_tier(tmp_path, caplog):
    folder = tmp_path / "d"
    tier = ec.DiskTier(folder, timeout=0.2)
    tier.put("k0", good_item(5.0))
    assert tier.get("k0") is not None
    holder = sqlite3.connect(str(folder / "cache.db"), timeout=0.2, isolation_level=None)
    stats = ec.CacheStats()
    try:
        holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
        with caplog.at_level(logging.DEBUG, logger="QwenVL-Fast"):
            assert tier.get("k0", stats) is None  # the LRU read needs a write lock: skipped, a miss
            tier.put("k1", good_item(6.0), stats)  # skipped
            assert tier.get("k1", stats) is None
        assert tier.available, "a locked database switched the disk tier off"
        assert tier.busy == 3 and stats.disk_errors == 3
        info = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert len(info) == 1 and "busy" in info[0].getMessage()
        assert not any("disabled" in r.getMessage() for r in caplog.records)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    got = tier.get("k0")
    assert got is not None and float(got.embeds[0, 0]) == 5.0
    tier.put("k1", good_item(6.0))
    assert float(tier.get("k1").embeds[0, 0]) == 6.0
    tier.close()


@pytest.mark.parametrize("error", ["operational", "timeout"])
def test_database_is_locked_from_diskcache_leaves_the_tier_on(tmp_path, monkeypatch, error):
    import diskcache

    def locked(*args, **kwargs):
        if error == "timeout":
            raise diskcache.Timeout
        raise sqlite3.OperationalError("database is locked")

    cache = ec.EmbeddingCache(disk_dir=tmp_path / "d")
    cache.put("a", good_item(1.0))
    with monkeypatch.context() as m:
        m.setattr(diskcache.Cache, "get", locked)
        m.setattr(diskcache.Cache, "set", locked)
        cache.memory.clear()
        assert cache.get("a", "cpu") == (None, "miss")
        cache.put("b", good_item(2.0))
        assert cache.disk.available
        assert cache.stats.disk_errors == 2
    cache.memory.clear()
    assert cache.get("a", "cpu")[1] == "disk"
    assert cache.get("b", "cpu")[1] == "miss"  # its write was skipped, not queued
    cache.put("b", good_item(2.0))
    cache.memory.clear()
    assert cache.get("b", "cpu")[1] == "disk"
    assert cache.info()["disk_enabled"] is True
    cache.disk.close()


def test_a_real_database_fault_still_disables_the_tier(tmp_path, monkeypatch, caplog):
    import diskcache

    def broken(*args, **kwargs):
        raise sqlite3.DatabaseError("database disk image is malformed")

    tier = ec.DiskTier(tmp_path / "d")
    tier.put("a", good_item())
    monkeypatch.setattr(diskcache.Cache, "get", broken)
    with caplog.at_level(logging.WARNING, logger="QwenVL-Fast"):
        assert tier.get("a") is None
    assert not tier.available
    assert sum("disk embedding cache disabled" in r.getMessage() for r in caplog.records) == 1


def test_disk_tier_has_no_dead_lock_attribute(tmp_path):
    assert not hasattr(ec.DiskTier(tmp_path / "d"), "_lock")


# -- cache folder: the host says where, the engine imports no ComfyUI ----------------------------


@pytest.fixture
def no_host_root(monkeypatch):
    monkeypatch.setattr(location, "_host_cache_root", None)  # restored after the test
    monkeypatch.delenv(ec.CACHE_DIR_ENV, raising=False)


def test_host_root_is_used_and_the_env_var_wins(tmp_path, monkeypatch, no_host_root):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ec.default_cache_dir() == tmp_path / "xdg" / "qwenvl-fast"
    ec.set_default_cache_root(tmp_path / "comfy-user")
    assert ec.default_cache_dir() == tmp_path / "comfy-user" / "qwenvl_fast_cache"
    tier = ec.DiskTier()
    tier.put("k", good_item())
    assert (tmp_path / "comfy-user" / "qwenvl_fast_cache" / "cache.db").exists()
    tier.close()
    ec.set_default_cache_root(str(tmp_path / "as-str"))
    assert ec.default_cache_dir() == tmp_path / "as-str" / "qwenvl_fast_cache"
    monkeypatch.setenv(ec.CACHE_DIR_ENV, str(tmp_path / "env"))
    assert ec.default_cache_dir() == tmp_path / "env"
    assert ec.DiskTier().directory == tmp_path / "env"
    monkeypatch.delenv(ec.CACHE_DIR_ENV)
    ec.set_default_cache_root(None)
    assert ec.default_cache_dir() == tmp_path / "xdg" / "qwenvl-fast"


def test_default_cache_dir_is_platformdirs_user_cache_dir(tmp_path, monkeypatch, no_host_root):
    """With neither the env var nor a host root: platformdirs' user cache folder, which on Linux honours
    XDG_CACHE_HOME and else is ~/.cache (the old code used ~/.cache on macOS and Windows too)."""
    import platformdirs

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ec.default_cache_dir() == tmp_path / "xdg" / "qwenvl-fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = Path(platformdirs.user_cache_dir("qwenvl-fast", appauthor=False))
    assert ec.default_cache_dir() == expected
    if sys.platform.startswith("linux"):
        assert expected == tmp_path / "home" / ".cache" / "qwenvl-fast"
    assert not (tmp_path / "home").exists()  # asking for the folder creates nothing


def test_without_platformdirs_the_cache_still_has_a_folder(tmp_path, monkeypatch, no_host_root):
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # import platformdirs raises ImportError
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ec.default_cache_dir() == tmp_path / "home" / ".cache" / "qwenvl-fast"


def test_default_cache_dir_imports_no_comfyui_module(tmp_path, monkeypatch, no_host_root):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    touched = []
    fake = types.ModuleType("folder_paths")

    def user_dir():
        touched.append("get_user_directory")
        return str(tmp_path / "comfy")

    fake.get_user_directory = user_dir  # type: ignore[attr-defined]
    fake.get_temp_directory = user_dir  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    assert ec.default_cache_dir() == tmp_path / "xdg" / "qwenvl-fast"
    assert touched == []
