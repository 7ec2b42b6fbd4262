"""Image-embedding cache: what the language model needs to skip the vision tower.

Two tiers:
- memory: an LRU bounded in bytes (``core.lru.LRU``), holding tensors on the model's device; cleared when the
  model is unloaded.
- disk: persistent across restarts and processes, bounded in bytes with LRU eviction (``cache/disk_tier.py``,
  on ``diskcache``). Values are raw safetensors bytes, checksummed and checked on read (``cache/entry_format.py``).

Before either tier, ``DigestMemo`` maps an exact hash of an image tensor's raw bytes (xxh3_128) to
its canonical digest, so a repeated image skips canonicalisation and MD5.

This module imports nothing from ComfyUI: a host sets its cache folder with ``set_default_cache_root``.
It is the cache's public face: ``get_cache`` gives the process-wide caches, and the parts in ``cache/`` are
re-exported here.

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
import secrets
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch

from .cache.disk_tier import DEFAULT_DISK_BYTES, INDEX_FILE, CacheStats, DiskTier
from .cache.entry_format import (
    CACHE_FORMAT_VERSION,
    CHECKSUM_FIELD,
    ImageEmbedding,
    deserialize_embedding,
    entry_checksum,
    merge_size_of,
    serialize_embedding,
)
from .cache.location import CACHE_DIR_ENV, CACHE_SUBDIR, default_cache_dir, set_default_cache_root
from .core.lru import LRU, ByteBudgetCache
from .core.settings import env_mib

__all__ = [
    "CACHE_DIR_ENV", "CACHE_FORMAT_VERSION", "CACHE_SUBDIR", "CHECKSUM_FIELD", "DEFAULT_DISK_BYTES",
    "DEFAULT_MEMORY_BYTES", "INDEX_FILE", "CacheStats", "DigestMemo", "DiskTier", "EmbeddingCache", "ImageEmbedding",
    "MemoryTier", "canonical_digest", "clear_memory_caches", "default_cache_dir", "deserialize_embedding",
    "entry_checksum", "entry_key", "get_cache", "merge_size_of", "serialize_embedding", "set_default_cache_root",
    "tensor_memo_key",
]

log = logging.getLogger("QwenVL-Fast")

DEFAULT_MEMORY_BYTES = 1 << 30  # 1 GiB: about 250 balanced Qwen2.5-VL-3B images in bf16


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

    ``key_of`` / ``lookup`` / ``store`` let a caller hash a tensor once for a lookup and the store after it
    (``vision.images.image_identity``); ``get`` / ``put`` hash it on every call.
    """

    def __init__(self, max_entries: int = DIGEST_MEMO_ENTRIES) -> None:
        self._lru: LRU[Any] = LRU(max_entries=max_entries)

    @property
    def max_entries(self) -> int:
        return int(self._lru.max_entries or 1)

    @staticmethod
    def key_of(tensor: torch.Tensor) -> tuple | None:
        """The memo key of ``tensor`` (``tensor_memo_key``); None when its bytes cannot be read."""
        return tensor_memo_key(tensor)

    def lookup(self, key: Hashable | None) -> Any | None:
        return None if key is None else self._lru.get(key)

    def store(self, key: Hashable | None, value: Any) -> None:
        if key is not None:
            self._lru.put(key, value)

    def get(self, tensor: torch.Tensor) -> Any | None:
        return self.lookup(tensor_memo_key(tensor))

    def put(self, tensor: torch.Tensor, value: Any) -> None:
        self.store(tensor_memo_key(tensor), value)

    def clear(self) -> None:
        self._lru.clear()

    def __len__(self) -> int:
        return len(self._lru)


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



class MemoryTier(ByteBudgetCache[ImageEmbedding]):
    """An LRU of ImageEmbedding bounded in bytes; an entry larger than the whole budget is not kept."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        super().__init__(max_bytes, sizeof=lambda item: item.nbytes)

    def get(self, key: str) -> ImageEmbedding | None:
        return self._lru.get(key)

    def put(self, key: str, item: ImageEmbedding) -> None:
        self._lru.put(key, item)

    @property
    def bytes(self) -> int:
        return self.nbytes


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


# The process-wide caches: one per disk setting and folder, their memory tiers emptied when the model goes.
CACHE_MEMORY_ENV = "QWENVL_FAST_CACHE_MEMORY_MB"
CACHE_DISK_ENV = "QWENVL_FAST_CACHE_DISK_MB"
_CACHES: dict[tuple, EmbeddingCache] = {}


def get_cache(use_disk: bool = True) -> EmbeddingCache:
    """The process-wide embedding cache (one per disk setting and folder)."""
    disk_dir = os.environ.get(CACHE_DIR_ENV, "")
    key = (use_disk, disk_dir)
    if key not in _CACHES:
        mem = env_mib(CACHE_MEMORY_ENV, 1024)
        disk = env_mib(CACHE_DISK_ENV, 4096)
        _CACHES[key] = EmbeddingCache(memory_bytes=mem, disk_bytes=disk, use_disk=use_disk)
    return _CACHES[key]


def clear_memory_caches() -> None:
    """Empty every process-wide cache's memory tier (its tensors live on the model's device)."""
    for cache in _CACHES.values():
        cache.clear(memory=True)


def cache_summary_line(figures: dict[str, Any]) -> str:
    """Cache Info's figures in one line for the node ("12 hits (10 memory, 2 disk) · 3 misses · ...")."""
    hits = int(figures.get("memory_hits", 0)) + int(figures.get("disk_hits", 0))
    parts = [f"{hits} hits ({figures.get('memory_hits', 0)} memory, {figures.get('disk_hits', 0)} disk)",
             f"{figures.get('misses', 0)} misses",
             f"memory {figures.get('memory_entries', 0)} entries, {_mib(figures.get('memory_bytes', 0))}"]
    if figures.get("disk_enabled"):
        parts.append(f"disk {figures.get('disk_entries', 0)} entries, {_mib(figures.get('disk_bytes', 0))}")
    else:
        parts.append("disk off")
    return " · ".join(parts)


def _mib(count: Any) -> str:
    return f"{int(count or 0) / 2**20:.1f} MiB"
