"""The small-batch linear form on the CPU (engine/cpu_linear.py): the same product as ``F.linear`` for every shape,
chosen only where measured faster, and a batch through a real model answers as one by one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from conftest import TINY_FAMILIES, load_tiny, tiny_request
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.core.errors import QwenVLError
from qwenvl_fast.engine import cpu_linear
from qwenvl_fast.engine import model as engine

FAMILY = "tiny-qwen2.5-vl" if "tiny-qwen2.5-vl" in TINY_FAMILIES else TINY_FAMILIES[0]


@given(lead=st.lists(st.integers(1, 9), min_size=1, max_size=3), features=st.integers(1, 48),
       out=st.integers(1, 48), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_the_transposed_form_is_f_linear_for_every_shape(lead, features, out, bias, seed):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(features, out, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, features, generator=g))
        if bias:
            layer.bias.copy_(torch.randn(out, generator=g))
    x = torch.randn(*lead, features, generator=g)
    got = cpu_linear.small_batch_linear(layer, x)
    want = F.linear(x, layer.weight, layer.bias)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_row_and_a_prefill_keep_f_linear(monkeypatch):
    layer = nn.Linear(8, 4)
    forms = []
    real_mm, real_addmm = torch.mm, torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: forms.append("transposed") or real_addmm(*a, **k))
    monkeypatch.setattr(torch, "mm", lambda *a, **k: forms.append("transposed") or real_mm(*a, **k))
    for rows in (1, cpu_linear.SMALL_ROWS_MAX + 1, 512):
        cpu_linear.small_batch_linear(layer, torch.randn(rows, 8))
    assert forms == []
    for rows in (2, cpu_linear.SMALL_ROWS_MAX):
        cpu_linear.small_batch_linear(layer, torch.randn(rows, 8))
    assert forms == ["transposed", "transposed"]


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))


def test_the_probe_decides_and_the_setting_overrides(monkeypatch):
    monkeypatch.setattr(cpu_linear, "MIN_PROBE_WEIGHTS", 0)
    monkeypatch.delenv(cpu_linear.SETTING_ENV, raising=False)
    cpu = torch.device("cpu")
    monkeypatch.setattr(cpu_linear, "probe", lambda weight: (0.020, 0.006))  # 3.3x faster: on
    model = _model()
    assert "on for 2 layers" in cpu_linear.enable_small_batch_linear(model, cpu)
    assert all(cpu_linear.is_enabled(m) for m in model if isinstance(m, nn.Linear))
    monkeypatch.setattr(cpu_linear, "probe", lambda weight: (0.020, 0.018))  # a near-tie: off
    model = _model()
    assert "off" in cpu_linear.enable_small_batch_linear(model, cpu)
    assert not any(cpu_linear.is_enabled(m) for m in model)
    monkeypatch.setenv(cpu_linear.SETTING_ENV, "on")  # the setting wins over a probe that says off
    assert "on for 2 layers" in cpu_linear.enable_small_batch_linear(model, cpu)
    monkeypatch.setenv(cpu_linear.SETTING_ENV, "off")
    model = _model()
    assert "off" in cpu_linear.enable_small_batch_linear(model, cpu) and not any(
        cpu_linear.is_enabled(m) for m in model)
    monkeypatch.setenv(cpu_linear.SETTING_ENV, "fast please")
    with pytest.raises(QwenVLError, match=cpu_linear.SETTING_ENV):
        cpu_linear.enable_small_batch_linear(_model(), cpu)


def test_only_plain_fp32_layers_on_the_cpu_and_never_test_size_models(monkeypatch):
    monkeypatch.delenv(cpu_linear.SETTING_ENV, raising=False)
    model = _model()
    assert cpu_linear.enable_small_batch_linear(model, torch.device("cuda")) == ""  # another device: untouched
    assert "test-size model" in cpu_linear.enable_small_batch_linear(model, torch.device("cpu"))
    assert not any(cpu_linear.is_enabled(m) for m in model)
    half = _model().to(torch.bfloat16)
    assert cpu_linear.plain_fp32_linears(half) == []

    class Wrapped(nn.Linear):  # a subclass (quantized and hooked layers are): its own forward stays
        pass

    assert cpu_linear.plain_fp32_linears(nn.Sequential(Wrapped(4, 4))) == []


def test_the_real_probe_returns_two_positive_times():
    linear_s, transposed_s = cpu_linear.probe(torch.randn(64, 32), repeats=2)
    assert linear_s > 0 and transposed_s > 0


def test_a_batch_through_a_real_model_answers_as_one_by_one(models_dir, monkeypatch):
    """Batched answers (several rows per decode step: the transposed form) give the greedy tokens of one by one
    (one row: F.linear), on a real model class whose every linear layer was switched."""
    monkeypatch.setenv(cpu_linear.SETTING_ENV, "on")
    ql.MANAGER.release()
    try:
        model = load_tiny(models_dir, FAMILY)
        assert model.small_batch_linear.startswith("small-batch linear: on")
        g = torch.Generator().manual_seed(3)
        imgs = [torch.rand(90, 120, 3, generator=g) for _ in range(3)]
        each = dict(batch_mode=engine.BATCH_MODES[1], max_new_tokens=10, min_new_tokens=10, enable_image_cache=False)
        alone = [model.run(tiny_request([img], **each)).token_ids[0] for img in imgs]
        batched = model.run(tiny_request(imgs, **each))
        assert batched.token_ids == alone
    finally:
        ql.MANAGER.release()  # the next test loads the model as configured by default


def test_the_probe_times_an_mlp_sized_matrix_not_the_lm_head():
    layers = [nn.Linear(64, 64), nn.Linear(64, 256), nn.Linear(2, 1)]
    assert cpu_linear.probe_layer(layers) is layers[1]
    sizes = {id(m): m.weight.numel() for m in layers}
    cap = cpu_linear.MAX_PROBE_WEIGHTS
    try:
        cpu_linear.MAX_PROBE_WEIGHTS = 64 * 64  # the 64x256 one is now "an lm_head": too large to time
        assert cpu_linear.probe_layer(layers) is layers[0]
        cpu_linear.MAX_PROBE_WEIGHTS = 1  # nothing fits: the smallest
        assert cpu_linear.probe_layer(layers) is layers[2]
    finally:
        cpu_linear.MAX_PROBE_WEIGHTS = cap
    assert sizes == {id(m): m.weight.numel() for m in layers}
