"""Image-embedding cache: what the language model needs to skip the vision tower.

Two tiers:
- memory: an LRU bounded in bytes, holding tensors on the model's device; cleared when the
  model is unloaded.
- disk: persistent across restarts and processes, bounded in bytes with LRU eviction
  (``diskcache``, which handles the index, eviction and cross-process locking with SQLite).
  Values are raw safetensors bytes: nothing is ever pickled or unpickled, and every entry is
  checked on read: a checksum of its tensor data and header bound to its own key, then key, format,
  shapes, rows against grid and merge size. A flipped byte, a truncated file or another key's entry is
  dropped and recomputed. A corrupt index (``cache.db``) is moved aside and the tier starts afresh. A
  locked database skips one read or write; only a real fault (read-only folder, full disk, no
  diskcache) turns the tier off.

Before either tier, ``DigestMemo`` maps an exact hash of an image tensor's raw bytes (xxh3_128) to
its canonical digest, so a repeated image skips canonicalisation and MD5.

This module imports nothing from ComfyUI: a host sets its cache folder with ``set_default_cache_root``.

The key covers everything that changes an embedding: the MD5 of the image's canonical bytes
(uint8 RGB with its shape), the model's identity and fingerprint, the dtype, the resolved
resize, the processor's normalisation and this module's format version. Two presets that land
on the same size share an entry; different models never do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import sqlite3
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("QwenVL-Fast")

# 2: entries carry a checksum (``CHECKSUM_FIELD``). The version is part of every key, so version-1 entries are
# never looked up again; they age out of the LRU.
CACHE_FORMAT_VERSION = 2
DEFAULT_MEMORY_BYTES = 1 << 30  # 1 GiB: about 250 balanced Qwen2.5-VL-3B images in bf16
DEFAULT_DISK_BYTES = 4 << 30  # 4 GiB
CACHE_DIR_ENV = "QWENVL_FAST_CACHE_DIR"


@dataclass
class ImageEmbedding:
    """One image's vision-tower output: merged embeddings, deepstack levels and its grid."""

    embeds: torch.Tensor  # [tokens, out_hidden]
    deepstack: list[torch.Tensor] = field(default_factory=list)  # each [tokens, out_hidden]
    grid: tuple[int, int, int] = (1, 1, 1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.embeds, *self.deepstack])

    def to(self, device: torch.device | str) -> ImageEmbedding:
        return ImageEmbedding(
            self.embeds.to(device, non_blocking=True),
            [t.to(device, non_blocking=True) for t in self.deepstack],
            self.grid,
        )


def canonical_digest(image_uint8_hwc: torch.Tensor) -> str:
    """MD5 of an image's canonical bytes (uint8 RGB, HWC) and its shape."""
    img = image_uint8_hwc
    if img.dtype != torch.uint8 or img.dim() != 3:
        raise ValueError("canonical_digest expects a uint8 HWC tensor")
    h, w, c = (int(s) for s in img.shape)
    digest = hashlib.md5(f"{h}x{w}x{c}:".encode(), usedforsecurity=False)
    digest.update(img.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


DIGEST_MEMO_ENTRIES = 4096  # keys and (digest, size) tuples, under 1 KiB each: a few MiB at most

_HASHER_LOCK = threading.Lock()
_HASHER: Callable[[Any], bytes] | None = None
RAW_HASH_NAME = ""  # which hash the digest memo uses, once resolved ("xxh3_128", or "sha1" without xxhash)


def _raw_hasher() -> Callable[[Any], bytes]:
    """The memo's hash of a tensor's raw bytes: xxh3_128, or hashlib's sha1 when xxhash is missing.

    xxh3_128 runs at memory speed (about 0.15 ms for a 12 MiB float image on a 2-core EPYC, where MD5
    takes 16 ms and sha1, the fastest hashlib hash there, 6.4 ms). It is not cryptographic: neither is
    the MD5 in the entry key, so the memo adds no new trust boundary. A per-process random seed means
    a collision computed offline for one seed does not carry over to a running process.
    """
    global _HASHER, RAW_HASH_NAME
    if _HASHER is None:
        with _HASHER_LOCK:
            if _HASHER is None:
                try:
                    import xxhash

                    seed = secrets.randbits(64)

                    def hasher(buf: Any) -> bytes:
                        return xxhash.xxh3_128_digest(buf, seed)

                    RAW_HASH_NAME = "xxh3_128"
                except ImportError:
                    log.info("[QwenVL-Fast] xxhash is not installed: the image digest memo falls back to "
                             "hashlib.sha1, tens of times slower (pip install xxhash)")

                    def hasher(buf: Any) -> bytes:
                        return hashlib.sha1(buf, usedforsecurity=False).digest()

                    RAW_HASH_NAME = "sha1"
                _HASHER = hasher
    return _HASHER


def tensor_memo_key(tensor: torch.Tensor) -> tuple | None:
    """An exact key for a tensor's values: dtype, shape and a hash of its bytes in logical order.

    Two tensors get the same key when they hold the same values, whatever the object, view, storage
    or strides: ComfyUI unbinds its IMAGE batch into new views on every call, and its tensors are
    inference tensors with no version counter, so nothing but the values can say "same image".
    A non-contiguous view is copied to a contiguous one first, so its bytes are hashed in logical order.
    A tensor on an accelerator is copied to the host once and hashed there: that copy is one PCIe
    transfer (~1 ms for a 12 MiB image), which canonicalising a new image does anyway, and torch has no
    exact on-device hash to use instead; falling back to no memo would pay canonicalize + MD5 every run.
    Returns None (no memo) for a tensor whose bytes cannot be read (meta, sparse, quantized).
    """
    try:
        t = tensor.detach()
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            return None
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.resolve_conj().resolve_neg()
        if not t.is_contiguous():
            t = t.contiguous()
        buf = t.reshape(-1).view(torch.uint8).numpy()
        return (str(tensor.dtype), tuple(int(s) for s in tensor.shape), _raw_hasher()(buf))
    except Exception as exc:  # an exotic tensor: no memo, never a failed run
        log.debug("[QwenVL-Fast] digest memo skipped for a %s tensor: %s", getattr(tensor, "dtype", "?"), exc)
        return None


class DigestMemo:
    """Remembers each image's canonical digest by an exact hash of its values, so a repeated image is
    canonicalised and MD5-hashed once.

    The key is ``tensor_memo_key``: dtype, shape and an xxh3_128 of the raw bytes. It hits for any
    tensor with the same values (a new view of the same storage, a copy, an inference tensor) and
    misses after any in-place change, however small. An LRU of at most ``max_entries`` entries; it
    holds keys and the caller's values only, never the tensors.
    """

    def __init__(self, max_entries: int = DIGEST_MEMO_ENTRIES) -> None:
        self.max_entries = max(1, int(max_entries))
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tensor: torch.Tensor) -> Any | None:
        key = tensor_memo_key(tensor)
        if key is None:
            return None
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, tensor: torch.Tensor, value: Any) -> None:
        key = tensor_memo_key(tensor)
        if key is None:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def entry_key(
    digest: str,
    model_fingerprint: str,
    dtype: torch.dtype | str,
    size: tuple[int, int],
    normalisation: tuple,
) -> str:
    """The cache key: everything that changes the embedding of this image."""
    parts = json.dumps(
        [CACHE_FORMAT_VERSION, digest, model_fingerprint, str(dtype), list(size), list(normalisation)],
        separators=(",", ":"),
    )
    return hashlib.md5(parts.encode(), usedforsecurity=False).hexdigest()


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


class MemoryTier:
    """An LRU of ImageEmbedding bounded in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self.bytes = 0
        self.evictions = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> ImageEmbedding | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, item: ImageEmbedding) -> None:
        size = item.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._items[key] = item
            self.bytes += size
            while self.bytes > self.max_bytes and self._items:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


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

    return BytesOnlyDisk


CACHE_SUBDIR = "qwenvl_fast_cache"  # the folder under the host's root
_host_cache_root: Path | None = None


def set_default_cache_root(path: str | Path | None) -> None:
    """The host's folder for the disk cache (ComfyUI: its user directory, or its temp directory on old
    versions); the cache lives in ``CACHE_SUBDIR`` under it. None forgets it. ``$QWENVL_FAST_CACHE_DIR``
    still wins. Takes effect for disk tiers created afterwards. This module imports nothing from the
    host: the host tells it where to go.
    """
    global _host_cache_root
    _host_cache_root = Path(path).expanduser() if path else None


def default_cache_dir() -> Path:
    """``$QWENVL_FAST_CACHE_DIR``, else the host's root (``set_default_cache_root``), else the user cache dir."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    if _host_cache_root is not None:
        return _host_cache_root / CACHE_SUBDIR
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "qwenvl-fast"
    home = Path.home()
    if home.exists():
        return home / ".cache" / "qwenvl-fast"
    return Path(tempfile.gettempdir()) / "qwenvl-fast"


def merge_size_of(rows: int, grid: tuple[int, ...]) -> int:
    """The spatial merge size that makes ``rows * merge**2 == t*h*w``; ValueError when none does."""
    if len(grid) != 3 or any(int(v) <= 0 for v in grid) or rows <= 0:
        raise ValueError(f"bad grid {tuple(grid)} or row count {rows}")
    cells = math.prod(int(v) for v in grid)
    merge = math.isqrt(cells // rows) if cells % rows == 0 else 0
    if merge <= 0 or rows * merge * merge != cells:
        raise ValueError(f"{rows} rows do not fit grid {tuple(grid)} for any merge size")
    return merge


CHECKSUM_FIELD = "checksum"  # in the safetensors metadata: "<algorithm>:<hex digest>"
_CHECKSUM_DOMAIN = b"qwenvl-fast embedding entry\0"


def _new_checksum(algorithm: str) -> Any:
    """An incremental hasher for an entry checksum; ValueError for an algorithm this install cannot compute."""
    if algorithm == "xxh3_128":
        try:
            import xxhash
        except ImportError as exc:
            raise ValueError("entry checksum is xxh3_128 and xxhash is not installed") from exc
        return xxhash.xxh3_128()  # unseeded: the value must be the same in every process
    if algorithm == "blake2b_128":
        return hashlib.blake2b(digest_size=16)
    raise ValueError(f"unknown entry checksum {algorithm!r}")


def _checksum_algorithm() -> str:
    """xxh3_128 when xxhash is installed (memory speed: a 16 MiB entry in about 1 ms), else blake2b_128.

    The checksum guards against damage (a flipped bit, a torn write, another key's bytes), not against an
    attacker who can write the cache folder: such a person can write any entry with a valid checksum anyway.
    """
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "blake2b_128"
    return "xxh3_128"


def _split_entry(blob: bytes | memoryview) -> tuple[dict, memoryview]:
    """A safetensors blob's parsed header and its data section (no copy); ValueError when truncated."""
    if len(blob) < 8:
        raise ValueError("truncated entry")
    (header_len,) = struct.unpack("<Q", bytes(blob[:8]))
    if header_len <= 0 or 8 + header_len > len(blob):
        raise ValueError("truncated header")
    try:
        header = json.loads(bytes(blob[8:8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError("unreadable header (not an object)")
    return header, memoryview(blob)[8 + header_len:]


def entry_checksum(key: str, header: dict, data: bytes | memoryview, algorithm: str) -> str:
    """``"<algorithm>:<hex>"`` over the key, the header (without its checksum) and the tensor data.

    Binding the key means another key's intact entry, moved under this key, fails the check; hashing the
    header too means a changed shape, dtype, offset, grid or merge size fails it, not only a changed value.
    The header is hashed in a canonical form (sorted keys, no spaces), so its padding does not matter.
    """
    meta = dict(header.get("__metadata__") or {})
    meta.pop(CHECKSUM_FIELD, None)
    canonical = json.dumps({**header, "__metadata__": meta}, sort_keys=True, separators=(",", ":"))
    h = _new_checksum(algorithm)
    for part in (_CHECKSUM_DOMAIN, key.encode(), b"\0", canonical.encode(), b"\0", data):
        h.update(part)
    return f"{algorithm}:{h.hexdigest()}"


def serialize_embedding(key: str, item: ImageEmbedding) -> bytes:
    """Raw safetensors bytes with the key, format, grid, merge size and checksum; ValueError if rows and grid
    disagree."""
    from safetensors.torch import save

    if item.embeds.dim() != 2:
        raise ValueError("embeds must be [tokens, hidden]")

    tensors = {"embeds": item.embeds.detach().contiguous().cpu()}
    for i, level in enumerate(item.deepstack):
        tensors[f"deepstack.{i}"] = level.detach().contiguous().cpu()
    meta = {
        "key": key,
        "format": str(CACHE_FORMAT_VERSION),
        "grid": json.dumps(list(item.grid)),
        "merge": str(merge_size_of(int(item.embeds.shape[0]), tuple(item.grid))),
        "deepstack_levels": str(len(item.deepstack)),
    }
    # Saved twice: the checksum covers the header that safetensors writes (offsets, dtypes, shapes), which
    # only exists once saved. A put happens after a vision-tower run, so the second copy is noise.
    header, data = _split_entry(save(tensors, metadata=meta))
    meta[CHECKSUM_FIELD] = entry_checksum(key, header, data, _checksum_algorithm())
    return save(tensors, metadata=meta)


def deserialize_embedding(key: str, blob: bytes, require_checksum: bool = False) -> ImageEmbedding:
    """Parse and check an entry; raises ValueError for anything that is not exactly ours.

    A checksum, when the entry has one, must match. ``require_checksum`` (the disk tier's reads) also refuses
    an entry without one; entries forged in tests and hand-made tools can leave it out.
    """
    from safetensors.torch import load

    header, data = _split_entry(blob)
    meta = header.get("__metadata__") or {}
    if meta.get("key") != key or meta.get("format") != str(CACHE_FORMAT_VERSION):
        raise ValueError("foreign entry (key or format mismatch)")
    stored = meta.get(CHECKSUM_FIELD)
    if stored is None:
        if require_checksum:
            raise ValueError("entry has no checksum")
    elif not isinstance(stored, str) or ":" not in stored:
        raise ValueError("malformed checksum")
    elif entry_checksum(key, header, data, stored.split(":", 1)[0]) != stored:
        raise ValueError("checksum mismatch (the entry's bytes changed after it was written)")
    tensors = load(blob)
    grid = tuple(int(v) for v in json.loads(meta["grid"]))
    levels = int(meta["deepstack_levels"])
    embeds = tensors["embeds"]
    deepstack = [tensors[f"deepstack.{i}"] for i in range(levels)]
    if len(grid) != 3 or embeds.dim() != 2 or any(d.shape != embeds.shape for d in deepstack):
        raise ValueError("inconsistent shapes")
    rows = int(embeds.shape[0])
    if "merge" in meta:
        merge = int(meta["merge"])
        if merge <= 0 or min(grid) <= 0 or rows * merge * merge != math.prod(grid):
            raise ValueError(f"{rows} rows do not match grid {grid} with merge size {merge}")
    else:  # written before the merge size was stored: some integer merge size must fit
        merge_size_of(rows, grid)
    return ImageEmbedding(embeds, deepstack, grid)  # type: ignore[arg-type]


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
        return None

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
        cache, self._cache = self._cache, None
        if cache is not None:
            try:
                cache.close()
            except Exception:
                pass
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

    def _disable(self, why: str, exc: BaseException | None = None) -> None:
        if self._failed is None:
            log.warning("[QwenVL-Fast] disk embedding cache disabled for this session (%s); runs continue "
                        "without it. %s", why, _disable_hint(exc))
        self._failed = why
        cache, self._cache = self._cache, None
        if cache is not None:
            try:
                cache.close()
            except Exception:
                pass

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


class EmbeddingCache:
    """The two tiers together, with hit/miss accounting."""

    def __init__(
        self,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        disk_bytes: int = DEFAULT_DISK_BYTES,
        disk_dir: str | Path | None = None,
        use_disk: bool = True,
    ) -> None:
        self.memory = MemoryTier(memory_bytes)
        self.disk: DiskTier | None = DiskTier(disk_dir, disk_bytes) if use_disk else None
        self.stats = CacheStats()
        self.digests = DigestMemo()

    def get(self, key: str, device: torch.device | str) -> tuple[ImageEmbedding | None, str]:
        """Returns (entry, tier) where tier is 'memory', 'disk' or 'miss'."""
        item = self.memory.get(key)
        if item is not None:
            self.stats.memory_hits += 1
            return item, "memory"
        if self.disk is not None:
            item = self.disk.get(key, self.stats)
            if item is not None:
                item = item.to(device)
                self.memory.put(key, item)
                self.stats.disk_hits += 1
                return item, "disk"
        self.stats.misses += 1
        return None, "miss"

    def put(self, key: str, item: ImageEmbedding) -> None:
        self.memory.put(key, item)
        if self.disk is not None:
            self.disk.put(key, item, self.stats)

    def clear(self, memory: bool = True, disk: bool = False) -> None:
        if memory:
            self.memory.clear()
        if disk and self.disk is not None:
            self.disk.clear()

    def info(self) -> dict[str, Any]:
        stats = self.stats.as_dict()
        stats["memory_evictions"] = self.memory.evictions
        return {
            **stats,
            "memory_entries": len(self.memory),
            "memory_bytes": self.memory.bytes,
            "memory_limit_bytes": self.memory.max_bytes,
            "disk_enabled": bool(self.disk is not None and self.disk.available),
            "disk_dir": str(self.disk.directory) if self.disk is not None else None,
            "disk_entries": self.disk.count() if self.disk is not None else 0,
            "disk_bytes": self.disk.volume() if self.disk is not None else 0,
            "disk_limit_bytes": self.disk.max_bytes if self.disk is not None else 0,
            "disk_index_resets": self.disk.index_resets if self.disk is not None else 0,
        }
