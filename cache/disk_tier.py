"""The embedding cache's disk tier: persistent across restarts and processes, bounded in bytes with LRU eviction.

``diskcache`` handles the index, eviction and cross-process locking with SQLite. Values are the raw safetensors
bytes of ``entry_format``: nothing is ever pickled or unpickled, and a damaged entry is dropped and recomputed.
A corrupt index (``cache.db``) is moved aside and the tier starts afresh. A locked database skips one read or
write; only a real fault (read-only folder, full disk, no diskcache) turns the tier off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .entry_format import ImageEmbedding, deserialize_embedding, serialize_embedding
from .location import CACHE_DIR_ENV, default_cache_dir

log = logging.getLogger("QwenVL-Fast")

DEFAULT_DISK_BYTES = 4 << 30  # 4 GiB
ORPHAN_AGE_S = 3600.0  # an unlisted entry file older than this is no write in flight: swept at open


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    memory_evictions: int = 0
    disk_errors: int = 0
    corrupt_entries: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)



def _bytes_only_disk_class():
    """A diskcache Disk that stores and returns raw bytes only and refuses to unpickle."""
    import diskcache

    class BytesOnlyDisk(diskcache.Disk):
        def store(self, value, read, key=diskcache.core.UNKNOWN):
            if not isinstance(value, bytes):
                raise TypeError("the embedding disk cache stores raw bytes only")
            return super().store(value, read, key=key)

        def fetch(self, mode, filename, value, read):
            if mode == diskcache.core.MODE_PICKLE:
                raise ValueError("refusing to unpickle a foreign disk-cache entry")
            return super().fetch(mode, filename, value, read)

        def _write(self, full_path, iterator, mode, encoding=None):
            # A write that fails (a full disk) leaves no partial .val file that the index does not list: nothing
            # would ever evict it. A file that was there before (another writer's) is never removed.
            existed = os.path.lexists(full_path)
            try:
                return super()._write(full_path, iterator, mode, encoding)
            except BaseException:
                if not existed:
                    with contextlib.suppress(OSError):
                        os.remove(full_path)
                raise

    return BytesOnlyDisk



def _is_busy(exc: BaseException) -> bool:
    """SQLite's "database is locked" (another process or thread is writing), raw or as diskcache's Timeout.

    It passes: the operation is skipped, not the tier. Anything else (cannot open, corrupt database,
    disk full, I/O error) is a real failure.
    """
    if isinstance(exc, sqlite3.OperationalError):
        return "locked" in str(exc).lower() or "busy" in str(exc).lower()
    try:
        import diskcache
    except ImportError:
        return False
    return isinstance(exc, diskcache.Timeout)


_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_CORRUPT_PHRASES = ("file is not a database", "database disk image is malformed", "malformed database")
INDEX_FILE = "cache.db"  # diskcache's SQLite index in the cache folder


def _is_corrupt_index_error(exc: BaseException) -> bool:
    """SQLite saying the index file itself is damaged ("file is not a database", "... is malformed")."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None and (code & 0xFF) in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return True
    return any(phrase in str(exc).lower() for phrase in _CORRUPT_PHRASES)


def _is_entry_file(path: Path, root: Path) -> bool:
    """diskcache's value-file layout, ``xx/yy/<28 hex>.val``: the only files a reset may delete."""
    parts = path.relative_to(root).parts
    hexdigits = set("0123456789abcdef")
    return (len(parts) == 3 and parts[2].endswith(".val") and len(parts[2]) == 32
            and all(len(p) == 2 and set(p) <= hexdigits for p in parts[:2]) and set(parts[2][:-4]) <= hexdigits)


def _disable_hint(exc: BaseException | None) -> str:
    """What the user can do about a disk tier that could not work."""
    if isinstance(exc, ImportError):
        return "Install diskcache (pip install diskcache) to enable it."
    text = str(exc).lower() if exc is not None else ""
    errno_ = getattr(exc, "errno", None)
    if errno_ == 28 or "disk is full" in text or "no space" in text:
        return f"Free some disk space, or set {CACHE_DIR_ENV} to a folder on another disk, to re-enable."
    if (isinstance(exc, (PermissionError, FileExistsError, NotADirectoryError)) or errno_ in (1, 13, 30)
            or "readonly" in text or "read-only" in text or "unable to open database file" in text):
        return f"Set {CACHE_DIR_ENV} to a writable folder to re-enable."
    return f"Check the folder's disk, or set {CACHE_DIR_ENV} to another folder, to re-enable."


class DiskTier:
    """Persistent tier. A real I/O fault disables it for the process with one warning; runs continue.

    A busy database ("database is locked": another process writing) only skips that read or write. A corrupt
    index (``cache.db`` that SQLite calls "not a database" or "malformed", and that fails its own
    ``quick_check``) is moved aside once per tier, with its -wal and -shm, and the tier starts afresh.
    """

    def __init__(self, directory: str | Path | None = None, max_bytes: int = DEFAULT_DISK_BYTES,
                 timeout: float = 10.0) -> None:
        self.directory = Path(directory) if directory else default_cache_dir()
        self.max_bytes = int(max_bytes)
        self.timeout = float(timeout)  # SQLite's busy timeout, seconds
        self.busy = 0  # reads and writes skipped because the database was locked
        self.corrupt = 0  # entries dropped because a check failed (checksum, key, format, shapes)
        self.index_resets = 0  # corrupt indexes moved aside (at most one per tier)
        self._cache = None
        self._failed: str | None = None

    @property
    def available(self) -> bool:
        return self._failed is None

    def _new_cache(self):
        import diskcache

        self.directory.mkdir(parents=True, exist_ok=True)
        return diskcache.Cache(
            str(self.directory),
            size_limit=self.max_bytes,
            eviction_policy="least-recently-used",
            disk=_bytes_only_disk_class(),
            timeout=self.timeout,
            disk_min_file_size=0,  # every entry is its own file: volume accounting stays exact
        )

    def _open(self):
        if self._cache is None and self._failed is None:
            failure = self._try_open()
            # Outside the except block, so the half-opened diskcache (held by the traceback) is gone before the
            # index is renamed: Windows cannot rename an open file.
            if failure is not None and self._reset_corrupt_index(failure):
                failure = self._try_open()
            if failure is not None and not self._busy(failure, "open", None):
                self._disable(f"cannot open {self.directory}: {failure}", failure)
        return self._cache

    def _try_open(self) -> BaseException | None:
        try:
            self._cache = self._new_cache()
        except Exception as exc:  # read-only folder, no diskcache, corrupt index
            return _without_traceback(exc)
        self._sweep_orphans()
        return None

    def _sweep_orphans(self) -> int:
        """Remove entry files the index does not list (left by a process that died or failed mid-write), once
        they are older than ``ORPHAN_AGE_S``: a file younger than that may be another process's write in flight."""
        try:
            listed = {Path(row[0]).as_posix()
                      for row in self._cache._sql("SELECT filename FROM Cache WHERE filename IS NOT NULL")}
        except Exception as exc:  # a busy or odd index: sweep another time
            log.debug("[QwenVL-Fast] disk-cache orphan sweep skipped: %s", exc)
            return 0
        removed, cutoff = 0, time.time() - ORPHAN_AGE_S
        for path in self.directory.glob("??/??/*.val"):
            name = path.relative_to(self.directory).as_posix()
            try:
                if name not in listed and _is_entry_file(path, self.directory) and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                pass
        if removed:
            log.info("[QwenVL-Fast] removed %d disk-cache files no index entry listed (left by a failed write)",
                     removed)
        return removed

    def _index_fails_its_check(self) -> bool:
        """Whether SQLite itself finds ``cache.db`` damaged (``PRAGMA quick_check`` fails or cannot run).

        Asked before moving the index aside, so that an error that only looks like corruption (an I/O fault,
        a bug) never costs the user their cache.
        """
        index = self.directory / INDEX_FILE
        if not index.is_file():
            return False
        try:
            con = sqlite3.connect(str(index), timeout=self.timeout)
            try:
                rows = con.execute("PRAGMA quick_check").fetchall()
            finally:
                con.close()
        except sqlite3.DatabaseError as exc:
            return _is_corrupt_index_error(exc)
        return rows != [("ok",)]

    def _reset_corrupt_index(self, exc: BaseException) -> bool:
        """Move a corrupt index aside and drop the entry files it listed; True when the tier may start afresh."""
        if self.index_resets or not _is_corrupt_index_error(exc) or not self._index_fails_its_check():
            return False
        self._close_cache()
        index = self.directory / INDEX_FILE
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = index.with_name(f"{INDEX_FILE}.corrupt-{stamp}")
        n = 1
        while moved.exists():
            moved = index.with_name(f"{INDEX_FILE}.corrupt-{stamp}-{n}")
            n += 1
        started = time.time()
        try:
            os.replace(index, moved)
            # The write-ahead log belongs to the old file: left in place, SQLite would replay it into the new one.
            for suffix in ("-wal", "-shm"):
                side = index.with_name(INDEX_FILE + suffix)
                if side.exists():
                    os.replace(side, moved.with_name(moved.name + suffix))
        except OSError as err:
            log.debug("[QwenVL-Fast] could not move the corrupt disk-cache index aside: %s", err)
            return False
        self.index_resets += 1
        removed = self._remove_unlisted_entry_files(before=started)
        log.warning("[QwenVL-Fast] the disk embedding cache's index %s was corrupt (%s); moved it to %s and "
                    "started a fresh cache in the same folder (%d entry files it listed removed; their "
                    "embeddings are recomputed when next needed)", index, exc, moved, removed)
        return True

    def _remove_unlisted_entry_files(self, before: float) -> int:
        """Entry files of the moved index: nothing lists them any more, so nothing would ever evict them.

        Only diskcache's own ``xx/yy/<hex>.val`` files older than the reset go, so a file that another process
        wrote into a fresh index meanwhile stays.
        """
        removed = 0
        for path in self.directory.glob("??/??/*.val"):
            try:
                if _is_entry_file(path, self.directory) and path.stat().st_mtime < before:
                    path.unlink()
                    removed += 1
            except OSError:
                pass
        hexdigits = set("0123456789abcdef")
        subdirs = [d for d in self.directory.glob("??/??") if set(d.parent.name + d.name) <= hexdigits]
        subdirs += [d for d in self.directory.glob("??") if set(d.name) <= hexdigits]
        for sub in subdirs:  # deepest first
            try:
                sub.rmdir()  # only succeeds when empty
            except OSError:
                pass
        return removed

    def _busy(self, exc: BaseException, what: str, stats: CacheStats | None) -> bool:
        """True (and counted, logged once) when ``exc`` is a locked database: skip, keep the tier on."""
        if not _is_busy(exc):
            return False
        self.busy += 1
        if stats is not None:
            stats.disk_errors += 1
        level = logging.INFO if self.busy == 1 else logging.DEBUG
        log.log(level, "[QwenVL-Fast] disk embedding cache busy (%s: %s); %s skipped, the tier stays on",
                what, str(exc) or type(exc).__name__, what)
        return True

    def _close_cache(self) -> None:
        """Drop the open diskcache (a fault path: its close may fail too, and must not hide the first fault)."""
        cache, self._cache = self._cache, None
        if cache is not None:
            with contextlib.suppress(Exception):
                cache.close()

    def _disable(self, why: str, exc: BaseException | None = None) -> None:
        if self._failed is None:
            log.warning("[QwenVL-Fast] disk embedding cache disabled for this session (%s); runs continue "
                        "without it. %s", why, _disable_hint(exc))
        self._failed = why
        self._close_cache()

    def _fault(self, exc: BaseException, what: str, stats: CacheStats | None) -> bool:
        """A read or write failed: skip it when busy, start afresh when the folder is gone or the index is
        corrupt, else disable. True when the tier starts afresh (a write may retry once).
        """
        if self._busy(exc, what, stats):
            return False
        if stats is not None:
            stats.disk_errors += 1
        if not self.directory.exists():
            self._cache = None  # folder deleted while running: recreated on the next open
            return True
        if self._reset_corrupt_index(exc):
            return True
        self._disable(f"{what} failed: {exc}", exc)
        return False

    def get(self, key: str, stats: CacheStats | None = None) -> ImageEmbedding | None:
        cache = self._open()
        if cache is None:
            return None
        failure: BaseException | None = None
        try:
            blob = cache.get(key, default=None)
        except ValueError:  # a pickled value written by someone else: never loaded
            blob = b""
        except Exception as exc:
            failure = _without_traceback(exc)
        if failure is not None:
            self._fault(failure, "read", stats)
            return None
        if blob is None:
            return None
        try:
            return deserialize_embedding(key, blob, require_checksum=True)
        except Exception as exc:
            self.corrupt += 1
            # Expected after a crash or a bad disk sector, and handled: recomputed and written again.
            level = logging.INFO if self.corrupt == 1 else logging.DEBUG
            log.log(level, "[QwenVL-Fast] dropped a damaged disk-cache entry (%s); it will be recomputed", exc)
            if stats is not None:
                stats.corrupt_entries += 1
            try:
                cache.delete(key)
            except Exception:
                pass
            return None

    def put(self, key: str, item: ImageEmbedding, stats: CacheStats | None = None) -> None:
        cache = self._open()
        if cache is None:
            return
        try:
            blob = serialize_embedding(key, item)
        except ValueError as exc:  # rows that fit no grid: an engine bug, never written
            log.warning("[QwenVL-Fast] embedding not written to the disk cache: %s", exc)
            return
        failure: BaseException | None = None
        try:
            cache.set(key, blob)
            return
        except Exception as exc:
            failure = _without_traceback(exc)
        if not self._fault(failure, "write", stats):
            return
        cache = self._open()  # a fresh index (reset) or a recreated folder: one more try
        if cache is None:
            return
        try:
            cache.set(key, blob)
        except Exception as exc:
            failure = _without_traceback(exc)
            if not self._busy(failure, "write", stats):
                self._disable(f"write failed: {failure}", failure)

    def volume(self) -> int:
        cache = self._open()
        if cache is None:
            return 0
        try:
            return int(cache.volume())
        except Exception:
            return 0

    def count(self) -> int:
        cache = self._open()
        if cache is None:
            return 0
        try:
            return len(cache)
        except Exception:
            return 0

    def clear(self) -> None:
        cache = self._open()
        if cache is not None:
            try:
                cache.clear()
            except Exception as exc:
                log.warning("[QwenVL-Fast] could not clear the disk cache: %s", exc)

    def close(self) -> None:
        if self._cache is not None:
            try:
                self._cache.close()
            finally:
                self._cache = None


def _without_traceback(exc: BaseException) -> BaseException:
    """The exception without its traceback, whose frames would keep a half-opened diskcache (and its open
    SQLite file) alive."""
    exc.__traceback__ = None
    exc.__context__ = None
    return exc
