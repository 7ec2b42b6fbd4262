"""Prefix-KV reuse: the key/value cache of a prompt's common prefix, kept per loaded model.

The prefix is every token before the user's question text: the chat template's system turn and the user turn up
to and with the last ``<|vision_end|>`` (so all image tokens are in it). A new question about the same images with
the same system prompt has the same prefix, so its KV is taken from here and only the question is prefilled.

- Filled for free: the first question's ``generate`` returns its cache; the prefix's part of it (the first P
  positions of every layer; in a causal model they do not depend on what follows) is copied out and kept.
- Never mutated: each reuse builds a fresh ``DynamicCache`` from copies of the kept tensors, so a third question
  sees exactly what the second one saw.
- Multimodal rotary positions: text after the last image sits at ``index + rope_deltas`` where the delta depends
  only on the images before it, i.e. on the prefix; the delta is kept with the entry and put back on the model
  (``model.model.rope_deltas``) before a reuse, which is what ``generate`` reads when it continues from a cache.
- Only full-attention layers (``DynamicLayer``) can be cut at a token count; a cache with any other layer kind
  (sliding window, linear attention's recurrent and conv states in Qwen3.5) is never kept.
- Bounded in bytes (``QWENVL_FAST_PREFIX_CACHE_MB``, default 512), LRU, on the model's device.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..core.lru import ByteBudgetCache
from ..core.settings import env_mib

log = logging.getLogger("QwenVL-Fast")

DEFAULT_PREFIX_CACHE_MB = 512
PREFIX_CACHE_ENV = "QWENVL_FAST_PREFIX_CACHE_MB"


def prefix_cache_bytes() -> int:
    """The byte budget of one model's prefix cache (``QWENVL_FAST_PREFIX_CACHE_MB``; 0 turns reuse off)."""
    return env_mib(PREFIX_CACHE_ENV, DEFAULT_PREFIX_CACHE_MB)


def prefix_length(input_ids: torch.Tensor, vision_end_id: int) -> int:
    """Tokens up to and with the last ``<|vision_end|>`` of a one-row prompt; 0 when it has no image."""
    row = input_ids.reshape(-1)
    hits = (row == int(vision_end_id)).nonzero()
    return int(hits[-1].item()) + 1 if hits.numel() else 0


@dataclass
class PrefixEntry:
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), [1, heads, P, dim]
    rope_deltas: torch.Tensor
    tokens: int
    nbytes: int

    def new_cache(self) -> Any:
        """A fresh ``DynamicCache`` holding copies of this prefix (the entry itself is never handed out)."""
        from transformers.cache_utils import DynamicCache

        return DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in self.layers])


def snapshot(cache: Any, tokens: int, rope_deltas: torch.Tensor) -> PrefixEntry | None:
    """The first ``tokens`` positions of a generate call's cache, copied; None if it cannot be cut there."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or tokens <= 0:
        return None
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in layers:
        # exactly DynamicLayer: sliding windows forget, linear attention keeps states after the LAST token
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.dim() != 4:
            return None
        if layer.keys.shape[0] != 1 or layer.keys.shape[-2] < tokens:
            return None
        kept.append((layer.keys[:, :, :tokens, :].clone(), layer.values[:, :, :tokens, :].clone()))
    nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kept)
    deltas = rope_deltas.detach().clone()
    return PrefixEntry(kept, deltas, tokens, nbytes)


class PrefixCache(ByteBudgetCache[PrefixEntry]):
    """An LRU of prefix entries bounded in bytes (``core.lru.LRU``). Keys: (model identity, image keys, exact
    prefix token ids). Counts its hits and misses; the LRU counts evictions."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, sizeof=lambda entry: entry.nbytes)
        self._count_lock = threading.Lock()  # the LRU locks itself; the counters are ours
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(identity: str, image_keys: list[Any], prefix_ids: torch.Tensor) -> tuple:
        return (identity, tuple(str(k) for k in image_keys), tuple(int(t) for t in prefix_ids.reshape(-1).tolist()))

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: tuple) -> PrefixEntry | None:
        entry = self._lru.get(key)
        with self._count_lock:
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
        return entry

    def put(self, key: tuple, entry: PrefixEntry) -> bool:
        """Keep ``entry`` (evicting the least recently used); False if it alone exceeds the budget."""
        return self._lru.put(key, entry)

    def info(self) -> dict[str, Any]:
        return {"entries": len(self._lru), "bytes": self._lru.nbytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self._lru.evictions}
