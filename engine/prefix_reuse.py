"""When one answer reuses or fills the prefix cache (``prefix_cache.py``), and what is kept after a call.

``reuse_off_reason`` says once per loaded model why it never reuses (the model family, the transformers
version); ``PrefixReuse.plan`` decides per answer (a one-row prompt with media, all of it cached by key), and
``PrefixReuse.keep`` cuts a finished call's cache back to the prefix.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..core.api import GenerationRequest
from ..sources import tf_compat
from .prefix_cache import PrefixCache, prefix_length, snapshot

log = logging.getLogger("QwenVL-Fast")


def reuse_off_reason(net: Any, config: Any, model_type: str, use_mm_encoder_outputs: bool) -> str:
    """Why this model never reuses a prompt prefix's KV; "" when it does."""
    if model_type.startswith("qwen3_5"):
        # Hybrid linear attention: its cache also holds recurrent and conv states taken after the LAST prompt
        # token, which cannot be cut back to the prefix by a token count; a separate prefix-only prefill would
        # chunk the recurrence differently, so the answers would not be exactly those without reuse.
        return "Qwen3.5 (linear-attention states are not prefix-sliceable)"
    if tf_compat.transformers_version() < (5, 18) or not use_mm_encoder_outputs:
        # Before 5.18 the cached embeddings reach the model through install_feature_override and a placeholder
        # pixel_values, and generate's continuation from a given cache (positions from the stored rope_deltas,
        # multimodal inputs dropped) is a different code path; reuse is only verified from 5.18 on (tested 5.24).
        return "transformers < 5.18"
    if not hasattr(net.model, "rope_deltas"):
        return "the model keeps no rope_deltas"
    if getattr(config, "vision_end_token_id", None) is None:
        return "no <|vision_end|> token id in the config"
    return ""


class PrefixReuse:
    """One loaded model's prefix cache and the rules for using it."""

    def __init__(self, cache: PrefixCache, off_reason: str, vision_end_id: int | None) -> None:
        self.cache = cache
        self.off_reason = off_reason
        self.vision_end_id = vision_end_id

    def plan(self, identity: str, req: GenerationRequest, inputs: dict[str, torch.Tensor],
             media: list[Any]) -> tuple[tuple, int] | None:
        """(key, prefix tokens) when this answer may reuse or fill the prefix cache, else None.

        ``identity``: the loaded model (``QwenVLModel.prefix_identity``); ``media``: the prompt's prepared images
        and clips, each with its cache key.
        """
        if (self.off_reason or not req.enable_image_cache or not media
                or not self.cache.enabled or any(not m.key for m in media)):
            return None
        ids = inputs["input_ids"]
        if int(ids.shape[0]) != 1:
            return None
        tokens = prefix_length(ids, int(self.vision_end_id))
        if tokens <= 0 or tokens >= int(ids.shape[1]):
            return None
        return PrefixCache.key(identity, [m.key for m in media], ids[0, :tokens]), tokens

    def keep(self, plan: tuple[tuple, int], cache: Any, rope_deltas: torch.Tensor | None) -> None:
        """Keep the first ``plan[1]`` positions of a finished generate call's cache for the next question."""
        if cache is None or rope_deltas is None:  # without them the question's positions are unknown
            return
        with torch.inference_mode():
            entry = snapshot(cache, plan[1], rope_deltas)
        if entry is None:
            log.debug("[QwenVL-Fast] this cache cannot be cut to its prefix; prefix reuse skipped")
        elif not self.cache.put(plan[0], entry):
            log.debug("[QwenVL-Fast] a prefix of %d bytes exceeds the prefix cache budget", entry.nbytes)
