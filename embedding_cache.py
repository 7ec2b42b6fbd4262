"""Image-embedding cache: what the language model needs to skip the vision tower.

Two tiers:
- memory: an LRU bounded in bytes, holding tensors on the model's device; cleared when the
  model is unloaded.
- disk: persistent across restarts and processes, bounded in bytes with LRU eviction
  (``diskcache``, which handles the index, eviction and cross-process locking with SQLite).
  Values are raw safetensors bytes: nothing is ever pickled or unpickled, and every entry is
  checked on read; a truncated, corrupt or foreign entry is dropped and recomputed.

The key covers everything that changes an embedding: the MD5 of the image's canonical bytes
(uint8 RGB with its shape), the model's identity and fingerprint, the dtype, the resolved
resize, the processor's normalisation and this module's format version. Two presets that land
on the same size share an entry; different models never do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("QwenVL-Fast")

CACHE_FORMAT_VERSION = 1
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


class DigestMemo:
    """Remembers digests per tensor object, so an unchanged upstream image is hashed once.

    ComfyUI hands the very same tensor to a node when its upstream node's output is cached.
    An entry is valid while the object is alive and unmodified (same ``_version``, storage
    pointer, shape and strides); it is dropped when the tensor is garbage-collected.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[tuple, Any]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _signature(t: torch.Tensor) -> tuple:
        if t.is_inference():
            # ComfyUI runs nodes under inference_mode, whose tensors keep no version counter: a strided
            # sample of the values stands in for it, so an in-place edit upstream is still noticed.
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            version: object = ("sample", float(flat[::step].double().sum()))
        else:
            version = t._version
        return (version, t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype), str(t.device))

    def get(self, tensor: torch.Tensor) -> Any | None:
        with self._lock:
            found = self._entries.get(id(tensor))
        if found is not None and found[0] == self._signature(tensor):
            return found[1]
        return None

    def put(self, tensor: torch.Tensor, value: Any) -> None:
        key = id(tensor)
        with self._lock:
            is_new = key not in self._entries
            self._entries[key] = (self._signature(tensor), value)
        if is_new:
            weakref.finalize(tensor, self._drop, key)

    def _drop(self, key: int) -> None:
        with self._lock:
            self._entries.pop(key, None)

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


def default_cache_dir() -> Path:
    """``$QWENVL_FAST_CACHE_DIR``, else ComfyUI's user (or temp) directory, else the user cache dir."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    try:
        import folder_paths  # type: ignore[import-not-found]

        base = None
        if hasattr(folder_paths, "get_user_directory"):
            base = folder_paths.get_user_directory()
        elif hasattr(folder_paths, "get_temp_directory"):
            base = folder_paths.get_temp_directory()
        if base:
            return Path(base) / "qwenvl_fast_cache"
    except ImportError:
        pass
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "qwenvl-fast"
    home = Path.home()
    if home.exists():
        return home / ".cache" / "qwenvl-fast"
    return Path(tempfile.gettempdir()) / "qwenvl-fast"


def serialize_embedding(key: str, item: ImageEmbedding) -> bytes:
    from safetensors.torch import save

    tensors = {"embeds": item.embeds.detach().contiguous().cpu()}
    for i, level in enumerate(item.deepstack):
        tensors[f"deepstack.{i}"] = level.detach().contiguous().cpu()
    meta = {
        "key": key,
        "format": str(CACHE_FORMAT_VERSION),
        "grid": json.dumps(list(item.grid)),
        "deepstack_levels": str(len(item.deepstack)),
    }
    return save(tensors, metadata=meta)


def deserialize_embedding(key: str, blob: bytes) -> ImageEmbedding:
    """Parse and check an entry; raises ValueError for anything that is not exactly ours."""
    from safetensors.torch import load

    if len(blob) < 8:
        raise ValueError("truncated entry")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len <= 0 or 8 + header_len > len(blob):
        raise ValueError("truncated header")
    header = json.loads(blob[8:8 + header_len])
    meta = header.get("__metadata__") or {}
    if meta.get("key") != key or meta.get("format") != str(CACHE_FORMAT_VERSION):
        raise ValueError("foreign entry (key or format mismatch)")
    tensors = load(blob)
    grid = tuple(int(v) for v in json.loads(meta["grid"]))
    levels = int(meta["deepstack_levels"])
    embeds = tensors["embeds"]
    deepstack = [tensors[f"deepstack.{i}"] for i in range(levels)]
    if len(grid) != 3 or embeds.dim() != 2 or any(d.shape != embeds.shape for d in deepstack):
        raise ValueError("inconsistent shapes")
    return ImageEmbedding(embeds, deepstack, grid)  # type: ignore[arg-type]


class DiskTier:
    """Persistent tier. Any I/O fault disables it for the process with one warning; runs continue."""

    def __init__(self, directory: str | Path | None = None, max_bytes: int = DEFAULT_DISK_BYTES) -> None:
        self.directory = Path(directory) if directory else default_cache_dir()
        self.max_bytes = int(max_bytes)
        self._cache = None
        self._failed: str | None = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self._failed is None

    def _open(self):
        if self._cache is None and self._failed is None:
            try:
                import diskcache

                self.directory.mkdir(parents=True, exist_ok=True)
                self._cache = diskcache.Cache(
                    str(self.directory),
                    size_limit=self.max_bytes,
                    eviction_policy="least-recently-used",
                    disk=_bytes_only_disk_class(),
                    timeout=10,
                    disk_min_file_size=0,  # every entry is its own file: volume accounting stays exact
                )
            except Exception as exc:  # read-only folder, no diskcache, broken database
                self._disable(f"cannot open {self.directory}: {exc}")
        return self._cache

    def _disable(self, why: str) -> None:
        if self._failed is None:
            log.warning("[QwenVL-Fast] disk embedding cache disabled for this session (%s); runs continue "
                        "without it. Set %s to a writable folder to re-enable.", why, CACHE_DIR_ENV)
        self._failed = why
        cache, self._cache = self._cache, None
        if cache is not None:
            try:
                cache.close()
            except Exception:
                pass

    def get(self, key: str, stats: CacheStats | None = None) -> ImageEmbedding | None:
        cache = self._open()
        if cache is None:
            return None
        try:
            blob = cache.get(key, default=None)
        except ValueError:  # a pickled value written by someone else: never loaded
            blob = b""
        except Exception as exc:
            if not self.directory.exists():
                self._cache = None  # folder deleted while running: recreate on the next write
                return None
            self._disable(f"read failed: {exc}")
            return None
        if blob is None:
            return None
        try:
            return deserialize_embedding(key, blob)
        except Exception as exc:
            log.warning("[QwenVL-Fast] discarded a corrupt disk-cache entry (%s); it will be recomputed", exc)
            if stats is not None:
                stats.corrupt_entries += 1
            try:
                cache.delete(key)
            except Exception:
                pass
            return None

    def put(self, key: str, item: ImageEmbedding) -> None:
        cache = self._open()
        if cache is None:
            return
        try:
            cache.set(key, serialize_embedding(key, item))
        except Exception as exc:
            if not self.directory.exists():
                # Deleted while running: start again in a fresh folder rather than give up.
                self._cache = None
                try:
                    self._open()
                    if self._cache is not None:
                        self._cache.set(key, serialize_embedding(key, item))
                        return
                except Exception:
                    pass
            self._disable(f"write failed: {exc}")

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
            self.disk.put(key, item)

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
        }
