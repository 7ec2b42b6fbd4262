"""Variable-length attention for the vision towers without flash-attn.

Without flash-attn, transformers runs the Qwen vision towers' attention with one SDPA call per
window (Qwen2.5-VL: 16 windows per 1024-token image in 28 of 32 blocks) or per image, splitting
the sequence with ``cu_seqlens.tolist()``. Windows of the same length can go through one batched
SDPA call instead: the same arithmetic, a handful of kernel launches instead of hundreds.

transformers hands ``cu_seqlens`` to the attention function only when the attention
implementation's name contains "flash" (``is_flash_attention_requested``), so the function is
registered under such a name, and set on the vision config alone: the language model keeps its
own implementation.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("QwenVL-Fast")

IMPLEMENTATION_NAME = "qwenvl_fast_grouped_sdpa_flashless"  # "flash" in the name routes cu_seqlens to us


def grouped_varlen_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``query``/``key``/``value`` are ``[1, heads, seq, dim]``; returns ``[1, seq, heads, dim]`` like flash."""
    _, heads, seq, dim = query.shape
    if cu_seq_lens_q is None:
        lengths = [seq]
    else:
        lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()  # one host sync per block, as transformers
    out = torch.empty((1, seq, heads, dim), dtype=query.dtype, device=query.device)
    start = 0
    i = 0
    while i < len(lengths):
        length = int(lengths[i])
        j = i
        while j < len(lengths) and int(lengths[j]) == length:
            j += 1
        n = j - i
        if length > 0:
            span = slice(start, start + n * length)
            q, k, v = (t[0, :, span].reshape(heads, n, length, dim).transpose(0, 1) for t in (query, key, value))
            attn = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=is_causal)
            out[0, span] = attn.permute(0, 2, 1, 3).reshape(n * length, heads, dim)
        start += n * length
        i = j
    return out, None


def _register() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.utils.generic import is_flash_attention_requested  # noqa: F401  (5.x routing)
    except ImportError:
        return False
    AttentionInterface.register(IMPLEMENTATION_NAME, grouped_varlen_sdpa)
    return True


def enable_grouped_vision_attention(model: torch.nn.Module) -> bool:
    """Use grouped SDPA in the vision tower when it would otherwise loop over windows with SDPA."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    config = getattr(visual, "config", None)
    if config is None:
        return False
    current = getattr(config, "_attn_implementation", None)
    if current not in ("sdpa", IMPLEMENTATION_NAME):
        return False  # flash-attn already does varlen in one call; eager stays eager on request
    if not _register():
        return False
    config._attn_implementation = IMPLEMENTATION_NAME
    return True


def disable_grouped_vision_attention(model: torch.nn.Module) -> None:
    visual = getattr(getattr(model, "model", None), "visual", None)
    config = getattr(visual, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == IMPLEMENTATION_NAME:
        config._attn_implementation = "sdpa"
