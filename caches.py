"""The process-wide embedding caches: one per disk setting and folder, emptied when the model goes."""

from __future__ import annotations

import os

from .embedding_cache import EmbeddingCache

_CACHES: dict[tuple, EmbeddingCache] = {}


def get_cache(use_disk: bool = True) -> EmbeddingCache:
    """The process-wide embedding cache (one per disk setting and folder)."""
    disk_dir = os.environ.get("QWENVL_FAST_CACHE_DIR", "")
    key = (use_disk, disk_dir)
    if key not in _CACHES:
        mem = int(os.environ.get("QWENVL_FAST_CACHE_MEMORY_MB", "1024")) << 20
        disk = int(os.environ.get("QWENVL_FAST_CACHE_DISK_MB", "4096")) << 20
        _CACHES[key] = EmbeddingCache(memory_bytes=mem, disk_bytes=disk, use_disk=use_disk)
    return _CACHES[key]


def clear_memory_caches() -> None:
    for cache in _CACHES.values():
        cache.clear(memory=True)
