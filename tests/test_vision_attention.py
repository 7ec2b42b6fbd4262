"""Grouped SDPA for the vision towers: identical results to transformers' per-window loop, and really used."""

import pytest
import torch

from conftest import TINY_FAMILIES
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.vision import attention as va


def request(images, **kw):
    return ql.GenerationRequest(prompt="What is this?", images=images, max_new_tokens=8, min_new_tokens=8,
                                image_quality="fast", enable_image_cache=False, monitor=False, **kw)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_grouped_attention_same_tokens_and_features(models_dir, family, monkeypatch):
    model, _ = ql.MANAGER.get(ql.LoadOptions(model=str(models_dir / family)))
    if not model.vision_attention == "grouped sdpa":
        pytest.skip("this transformers routes no cu_seqlens to custom attention (4.x)")
    images = [torch.rand(300, 400, 3), torch.rand(300, 400, 3), torch.rand(150, 500, 3)]  # equal and unequal sizes
    calls = [0]
    real = va.grouped_varlen_sdpa

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(va.IMPLEMENTATION_NAME, counting)
    try:
        grouped = model.run(request(images))
    finally:
        AttentionInterface.register(va.IMPLEMENTATION_NAME, real)
    assert calls[0] == len(model.visual.blocks)
    va.disable_grouped_vision_attention(model.model)
    try:
        per_window = model.run(request(images))
    finally:
        va.enable_grouped_vision_attention(model.model)
    assert grouped.token_ids == per_window.token_ids


def test_grouped_sdpa_equals_per_window_sdpa():
    torch.manual_seed(0)
    heads, dim = 4, 16
    lengths = [64, 64, 64, 40, 64, 16, 16]
    total = sum(lengths)
    q, k, v = (torch.randn(1, heads, total, dim) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out, _ = va.grouped_varlen_sdpa(None, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu, scaling=dim ** -0.5)
    pieces = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                                                scale=dim ** -0.5)
        pieces.append(ref.transpose(1, 2))
    expected = torch.cat(pieces, dim=1)
    assert out.shape == (1, total, heads, dim)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_not_used_with_eager_attention(models_dir):
    model, _ = ql.MANAGER.get(ql.LoadOptions(model=str(models_dir / "tiny-qwen2.5-vl"), attention_mode="eager"))
    assert model.vision_attention == "eager"
    assert model.visual.config._attn_implementation == "eager"
