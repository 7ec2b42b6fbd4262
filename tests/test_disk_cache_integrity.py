"""The disk tier on damaged real files: every entry carries a checksum bound to its key, so a flipped byte, a
truncated file or another image's entry is a miss (dropped, recomputed, same answer); a corrupt ``cache.db`` is
moved aside and the tier starts afresh; a folder that cannot work still turns the tier off with the right hint.

The pack's entries are stored the way these tests damage them: ``disk_min_file_size=0`` puts every value in its
own ``xx/yy/<hex>.val`` file beside ``cache.db`` (whose row holds the file name, not the bytes);
``test_real_entries_are_files_beside_the_index`` pins that down.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_tiny, tiny_request
from qwenvl_fast import embedding_cache as ec

FAMILY = "tiny-qwen2.5-vl"


def image(seed: int, h: int = 90, w: int = 120) -> torch.Tensor:
    return torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed))


def restart() -> None:
    """As after a restart: the process-wide caches (and their open index) are gone, the folder stays."""
    for cache in ec._CACHES.values():
        if cache.disk is not None:
            cache.disk.close()
    ec._CACHES.clear()


def run_one(models_dir, img: torch.Tensor):
    """One run of the tiny model on ``img``; its result and the image's cache key."""
    model = load_tiny(models_dir, FAMILY)
    before = set(ec.get_cache().memory._lru._items)
    result = model.run(tiny_request([img]))
    new = [k for k in ec.get_cache().memory._lru._items if k not in before]
    return result, (new[0] if new else None)


def entry_row(folder: Path, key: str) -> tuple[str | None, bytes | None]:
    con = sqlite3.connect(str(folder / "cache.db"))
    try:
        row = con.execute("SELECT filename, value FROM Cache WHERE key = ?", (key,)).fetchone()
    finally:
        con.close()
    return (None, None) if row is None else row


def entry_file(folder: Path, key: str) -> Path:
    filename, value = entry_row(folder, key)
    assert filename is not None and value is None, "the entry is not stored as a file"
    return folder / filename


def data_offset(blob: bytes) -> int:
    """Where the tensor data starts in a safetensors blob (after the 8-byte length and the header)."""
    return 8 + int.from_bytes(blob[:8], "little")


def small_item(value: float = 1.0) -> ec.ImageEmbedding:
    # grid (1, 8, 12) with merge size 2: 24 rows
    return ec.ImageEmbedding(torch.full((24, 16), value), [torch.full((24, 16), -value)], (1, 8, 12))


# -- how entries are stored --------------------------------------------------------------------------------


def test_real_entries_are_files_beside_the_index(models_dir, isolated_cache):
    result, key = run_one(models_dir, image(1))
    assert result.record.images[0]["cache"] == "miss" and key is not None
    path = entry_file(isolated_cache, key)
    assert path.is_file() and path.suffix == ".val" and path.parent.parent.parent == isolated_cache
    blob = path.read_bytes()
    meta = json.loads(blob[8:data_offset(blob)])["__metadata__"]
    assert meta["key"] == key and meta["format"] == str(ec.CACHE_FORMAT_VERSION)
    assert meta[ec.CHECKSUM_FIELD].split(":")[0] in ("xxh3_128", "blake2b_128")


# -- damaged entries through the real model -----------------------------------------------------------------


@pytest.mark.parametrize("where", ["first_data_byte", "middle_data_byte", "last_byte", "header_byte"])
def test_a_flipped_byte_is_a_miss_and_the_answer_is_unchanged(models_dir, isolated_cache, where, caplog):
    img = image(2)
    first, key = run_one(models_dir, img)
    path = entry_file(isolated_cache, key)
    blob = bytearray(path.read_bytes())
    start = data_offset(blob)
    pos = {"first_data_byte": start, "middle_data_byte": (start + len(blob)) // 2, "last_byte": len(blob) - 1,
           "header_byte": 8 + blob[8:start].index(b'"grid"') + 3}[where]  # a letter of the word "grid"
    blob[pos] ^= 0x01
    path.write_bytes(bytes(blob))
    restart()
    with caplog.at_level(logging.DEBUG, logger="QwenVL-Fast"):
        second, _ = run_one(models_dir, img)
    assert second.record.images[0]["cache"] == "miss"
    assert second.token_ids == first.token_ids
    cache = ec.get_cache()
    assert cache.stats.corrupt_entries == 1 and cache.stats.disk_hits == 0
    assert not path.exists(), "the damaged entry's file was not deleted"
    notes = [r for r in caplog.records if "damaged disk-cache entry" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno <= logging.INFO and notes[0].getMessage().startswith("[QwenVL-Fast]")
    # The miss wrote a good entry again: the next process is served from disk, same tokens.
    assert entry_file(isolated_cache, key) != path
    restart()
    third, _ = run_one(models_dir, img)
    assert third.record.images[0]["cache"] == "disk" and third.token_ids == first.token_ids


def test_swapped_entries_are_misses_and_each_image_keeps_its_answer(models_dir, isolated_cache):
    a, b = image(3), image(4, h=100, w=100)
    first_a, key_a = run_one(models_dir, a)
    first_b, key_b = run_one(models_dir, b)
    assert first_a.token_ids != first_b.token_ids or key_a != key_b
    path_a, path_b = entry_file(isolated_cache, key_a), entry_file(isolated_cache, key_b)
    blob_a, blob_b = path_a.read_bytes(), path_b.read_bytes()
    path_a.write_bytes(blob_b)
    path_b.write_bytes(blob_a)
    restart()
    again_a, _ = run_one(models_dir, a)
    again_b, _ = run_one(models_dir, b)
    assert [again_a.record.images[0]["cache"], again_b.record.images[0]["cache"]] == ["miss", "miss"]
    assert again_a.token_ids == first_a.token_ids and again_b.token_ids == first_b.token_ids
    assert ec.get_cache().stats.corrupt_entries == 2


def test_another_entry_relabelled_with_this_key_is_a_miss(models_dir, isolated_cache):
    """B's intact bytes with A's key written into its metadata: only the checksum (bound to B's key) tells."""
    a, b = image(5), image(6, h=100, w=100)
    first_a, key_a = run_one(models_dir, a)
    _, key_b = run_one(models_dir, b)
    path_a = entry_file(isolated_cache, key_a)
    blob_b = entry_file(isolated_cache, key_b).read_bytes()
    assert len(key_a) == len(key_b)  # same length: offsets and header length stay valid
    forged = blob_b.replace(key_b.encode(), key_a.encode())
    assert forged != blob_b and len(forged) == len(blob_b)
    with pytest.raises(ValueError, match="checksum"):
        ec.deserialize_embedding(key_a, forged)
    path_a.write_bytes(forged)
    restart()
    again, _ = run_one(models_dir, a)
    assert again.record.images[0]["cache"] == "miss" and again.token_ids == first_a.token_ids
    assert ec.get_cache().stats.corrupt_entries == 1


@pytest.mark.parametrize("keep", [0, 7, "header", "half", -1])
def test_a_truncated_entry_file_is_a_miss(models_dir, isolated_cache, keep):
    img = image(7)
    first, key = run_one(models_dir, img)
    path = entry_file(isolated_cache, key)
    blob = path.read_bytes()
    cut = {"header": data_offset(blob), "half": len(blob) // 2}.get(keep, keep)
    path.write_bytes(blob[:cut])
    restart()
    second, _ = run_one(models_dir, img)
    assert second.record.images[0]["cache"] == "miss" and second.token_ids == first.token_ids
    assert ec.get_cache().stats.corrupt_entries == 1 and not path.exists()
    restart()
    assert run_one(models_dir, img)[0].record.images[0]["cache"] == "disk"


# -- damaged entries at the tier: every byte, old formats, checksum algorithms -------------------------------


def test_every_single_byte_flip_of_an_entry_is_refused():
    blob = ec.serialize_embedding("k", small_item())
    assert ec.deserialize_embedding("k", blob, require_checksum=True).grid == (1, 8, 12)
    accepted = []
    for pos in range(len(blob)):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        try:
            ec.deserialize_embedding("k", bytes(bad), require_checksum=True)
        except Exception:
            continue
        accepted.append(pos)
    assert accepted == [], f"flips accepted at byte offsets {accepted[:10]} of {len(blob)}"


def test_old_format_and_unchecked_entries_are_misses_that_get_deleted(tmp_path):
    import diskcache
    from safetensors.torch import save

    tier = ec.DiskTier(tmp_path / "d")
    tier.put("warm", small_item(2.0))
    v1_meta = {"key": "old", "format": "1", "grid": "[1, 8, 12]", "merge": "2", "deepstack_levels": "1"}
    unchecked = {**v1_meta, "key": "bare", "format": str(ec.CACHE_FORMAT_VERSION)}
    tensors = {"embeds": torch.ones(24, 16), "deepstack.0": torch.ones(24, 16)}
    raw = diskcache.Cache(str(tmp_path / "d"), disk_min_file_size=0)
    try:
        raw.set("old", save(tensors, metadata=v1_meta))
        raw.set("bare", save(tensors, metadata=unchecked))
        stats = ec.CacheStats()
        assert tier.get("old", stats) is None and tier.get("bare", stats) is None
        assert stats.corrupt_entries == 2
        assert raw.get("old") is None and raw.get("bare") is None
    finally:
        raw.close()
    assert float(tier.get("warm").embeds[0, 0]) == 2.0
    tier.close()


def test_entries_written_without_xxhash_read_back_with_it_and_the_reverse_is_a_miss(tmp_path, monkeypatch):
    pytest.importorskip("xxhash")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "xxhash", None)  # import xxhash raises ImportError
        slow = ec.serialize_embedding("k", small_item())
    assert json.loads(slow[8:data_offset(slow)])["__metadata__"][ec.CHECKSUM_FIELD].startswith("blake2b_128:")
    assert ec.deserialize_embedding("k", slow, require_checksum=True).grid == (1, 8, 12)
    fast = ec.serialize_embedding("k", small_item())
    assert json.loads(fast[8:data_offset(fast)])["__metadata__"][ec.CHECKSUM_FIELD].startswith("xxh3_128:")
    tier = ec.DiskTier(tmp_path / "d")
    tier.put("k", small_item(3.0))
    monkeypatch.setitem(sys.modules, "xxhash", None)
    stats = ec.CacheStats()
    assert tier.get("k", stats) is None and stats.corrupt_entries == 1  # cannot be checked here: a miss
    tier.put("k", small_item(3.0))
    assert float(tier.get("k").embeds[0, 0]) == 3.0
    tier.close()


# -- a corrupt index -------------------------------------------------------------------------------------------


def _damage_index(index: Path, how: str) -> None:
    data = index.read_bytes()
    if how == "garbage":
        index.write_bytes(bytes((i * 37 + 11) % 256 for i in range(len(data))))
    elif how == "truncated":
        index.write_bytes(data[: len(data) // 2])
    elif how == "header_overwritten":
        index.write_bytes(b"this is not SQLite" + b"\0" * 82 + data[100:])
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["garbage", "truncated", "header_overwritten"])
def test_a_corrupt_index_is_moved_aside_and_the_tier_starts_afresh(models_dir, isolated_cache, how, caplog):
    img = image(8)
    first, key = run_one(models_dir, img)
    old_file = entry_file(isolated_cache, key)
    restart()
    _damage_index(isolated_cache / "cache.db", how)
    with caplog.at_level(logging.WARNING, logger="QwenVL-Fast"):
        second, _ = run_one(models_dir, img)
    assert second.record.images[0]["cache"] == "miss" and second.token_ids == first.token_ids
    moved = sorted(isolated_cache.glob("cache.db.corrupt-*"))
    assert [p.name for p in moved if not p.name.endswith(("-wal", "-shm"))] == [moved[0].name]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(moved[0]) in warnings[0] and "corrupt" in warnings[0] and "disabled" not in warnings[0]
    assert not old_file.exists(), "an entry file of the old index was left behind, outside any bound"
    info = ec.get_cache().info()
    assert info["disk_enabled"] and info["disk_index_resets"] == 1 and info["disk_entries"] == 1
    restart()
    third, _ = run_one(models_dir, img)
    assert third.record.images[0]["cache"] == "disk" and third.token_ids == first.token_ids


def test_a_corrupt_index_with_its_wal_is_moved_aside_whole(tmp_path, caplog):
    folder = tmp_path / "d"
    tier = ec.DiskTier(folder)
    tier.put("a", small_item(1.0))
    tier.close()
    (folder / "cache.db").write_bytes(b"garbage " * 4096)
    (folder / "cache.db-wal").write_bytes(b"old log " * 64)
    (folder / "cache.db-shm").write_bytes(b"\0" * 32768)
    fresh = ec.DiskTier(folder)
    with caplog.at_level(logging.WARNING, logger="QwenVL-Fast"):
        assert fresh.get("a") is None
    assert fresh.available and fresh.index_resets == 1
    [moved] = [p for p in folder.glob("cache.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert moved.read_bytes() == b"garbage " * 4096
    assert (folder / f"{moved.name}-wal").read_bytes() == b"old log " * 64
    assert (folder / f"{moved.name}-shm").exists()
    fresh.put("b", small_item(2.0))
    assert float(fresh.get("b").embeds[0, 0]) == 2.0
    assert sum("corrupt" in r.getMessage() for r in caplog.records) == 1
    fresh.close()


def test_an_index_corrupted_while_open_is_reset_on_the_next_read(tmp_path, monkeypatch, caplog):
    """The file is damaged under an open tier. SQLite serves what its page cache holds until it reads a damaged
    page, so when it notices is up to SQLite: here the read that notices is the next one (its error injected,
    the damage real, so the tier's own quick_check must confirm it before the index is moved)."""
    import diskcache

    folder = tmp_path / "d"
    tier = ec.DiskTier(folder)
    tier.put("a", small_item(1.0))
    assert tier.get("a") is not None
    con = sqlite3.connect(str(folder / "cache.db"))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything into cache.db, so the damage cannot hide in the log
    con.close()
    with open(folder / "cache.db", "r+b") as f:  # in place, under the tier's open connection
        size = f.seek(0, 2)
        f.seek(0)
        f.write(b"\xff" * size)
    real_get = diskcache.Cache.get
    calls = []

    def get_that_reads_the_damage(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.DatabaseError("file is not a database")
        return real_get(self, *args, **kwargs)

    monkeypatch.setattr(diskcache.Cache, "get", get_that_reads_the_damage)
    with caplog.at_level(logging.WARNING, logger="QwenVL-Fast"):
        assert tier.get("a") is None
        tier.put("b", small_item(2.0))
    assert tier.available and tier.index_resets == 1
    assert float(tier.get("b").embeds[0, 0]) == 2.0 and tier.get("a") is None
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    tier.close()


def test_an_error_that_only_looks_like_corruption_keeps_the_index(tmp_path, monkeypatch, caplog):
    """SQLite's own quick_check passes: the file is kept, the tier is turned off as for any real fault."""
    import diskcache

    folder = tmp_path / "d"
    tier = ec.DiskTier(folder)
    tier.put("a", small_item())

    def malformed(*args, **kwargs):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(diskcache.Cache, "get", malformed)
    with caplog.at_level(logging.WARNING, logger="QwenVL-Fast"):
        assert tier.get("a") is None
    assert not tier.available and tier.index_resets == 0
    assert (folder / "cache.db").exists() and not list(folder.glob("cache.db.corrupt-*"))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "disabled" in warning and "writable" not in warning


def test_a_corrupt_index_that_cannot_be_moved_disables_the_tier(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "d"
    first = ec.DiskTier(folder)
    first.put("a", small_item())
    first.close()
    (folder / "cache.db").write_bytes(b"garbage " * 4096)

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(ec.os, "replace", refuse)
    tier = ec.DiskTier(folder)
    with caplog.at_level(logging.WARNING, logger="QwenVL-Fast"):
        assert tier.get("a") is None
        tier.put("b", small_item())
    assert not tier.available and tier.index_resets == 0
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "disabled" in warning and "not a database" in warning


# -- a folder that cannot work: the right hint -----------------------------------------------------------------


def test_a_folder_that_cannot_be_created_asks_for_a_writable_folder(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache folder should be")  # root ignores permissions; a file blocks mkdir
    tier = ec.DiskTier(blocker / "sub")
    with caplog.at_level(logging.WARNING, logger="QwenVL-Fast"):
        assert tier.get("k") is None
        tier.put("k", small_item())
    assert not tier.available
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "disabled" in warning and f"Set {ec.CACHE_DIR_ENV} to a writable folder" in warning
    assert not list(tmp_path.glob("**/cache.db.corrupt-*"))


def test_without_diskcache_the_hint_is_to_install_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "diskcache", None)
    tier = ec.DiskTier(tmp_path / "d")
    with caplog.at_level(logging.WARNING, logger="QwenVL-Fast"):
        assert tier.get("k") is None
    assert not tier.available
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "pip install diskcache" in warning and "writable" not in warning
