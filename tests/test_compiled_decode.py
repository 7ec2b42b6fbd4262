"""Compiled decode (decode_compile.py): a static KV cache + torch.compile for the decode steps, on CUDA.

This machine has no GPU, so what is tested here is everything but the speed: on the CPU "auto" falls back with
exactly one log line per load and answers exactly as "off"; the static-cache path that CUDA would use (the same
kwargs, forced here without torch.compile, or compiled with Dynamo's "eager" backend, which traces but generates no
kernels) gives greedy tokens identical to the eager dynamic cache on tiny Qwen2.5-VL and Qwen3-VL in fp32, for
prompts of different lengths in one bucket (one cache, the same buffers, no recompile), for a reused prefix and for
a batch of left-padded rows; the bucket function; and a compile that fails falls back with one log line while the
answers stay correct.
"""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import TINY_FAMILIES, load_tiny, tiny_request
from qwenvl_fast.engine import decode_compile as dc
from qwenvl_fast.sources import tf_compat
from qwenvl_fast.vision.tower_compile import count_recompiles

FAMILIES = [f for f in ("tiny-qwen2.5-vl", "tiny-qwen3-vl") if f in TINY_FAMILIES]
# Two questions whose prompts differ in length but share the 256 bucket with 8 new tokens (checked below).
SHORT, LONG = "What is this?", "What is this? Answer briefly."
NEW = 8


def image(seed=0, h=40, w=60):
    return torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed))


def ask(model, imgs, question, **overrides):
    base = dict(prompt=question, max_new_tokens=NEW, min_new_tokens=NEW, monitor=True, enable_image_cache=False)
    base.update(overrides)
    return model.run(tiny_request(imgs, **base))


def decode_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "QwenVL-Fast" and "compiled decode" in r.getMessage()]


def force_static(model, compile_config=None):
    """What CUDA would use (static cache kwargs), forced on the CPU: without compile, or with the given config."""
    model.decode_compile.release()
    model.decode_compile = dc.DecodeCompile(model.model, "auto", model.device, force_static=True,
                                            compile_config=compile_config, context_length=model.context_length)
    return model.decode_compile


def filled(state):
    """Positions the static cache holds after a call: it was really decoded into (0 if generate ignored it)."""
    layer = state.cache.layers[0]
    return int(layer.cumulative_length) if layer.is_initialized else 0


def cpu_compile_config(backend="eager"):
    """A CompileConfig that transformers' generate honours on the CPU too (its test flag _compile_all_devices)."""
    from transformers import CompileConfig

    config = CompileConfig(backend=backend, mode=None)
    config._compile_all_devices = True
    return config


@pytest.fixture
def fresh_dynamo():
    """Compiled-code caches start and end empty (Dynamo's recompile limit is per code object, process-wide)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- (c) the bucket function -----------------------------------------------------------------------------
def test_cache_bucket():
    assert dc.cache_bucket(1) == dc.BUCKET_MIN == 256
    assert dc.cache_bucket(256) == 256
    assert dc.cache_bucket(257) == 512
    assert dc.cache_bucket(1000) == dc.cache_bucket(1024) == 1024
    assert dc.cache_bucket(1025) == 2048
    assert {dc.cache_bucket(n) for n in range(257, 513)} == {512}  # every length in (256, 512]: one cache size
    assert dc.cache_bucket(3000, context_length=4096) == 4096
    assert dc.cache_bucket(300, context_length=400) == 400  # capped at the context...
    assert dc.cache_bucket(500, context_length=400) == 500  # ...never below what the call needs
    sizes = [dc.cache_bucket(n) for n in range(1, 32769)]
    assert sizes == sorted(sizes) and all(s >= n for n, s in zip(range(1, 32769), sizes))
    assert len(set(sizes)) == 8  # 256 ... 32768: at most 8 compiled shapes for a 32k context


# -- the decision, without a GPU ---------------------------------------------------------------------------
def test_support_reasons(models_dir):
    cuda = torch.device("cuda")  # only the decision: nothing is moved or run on it
    model = load_tiny(models_dir, "tiny-qwen2.5-vl", compile_decode="off")
    assert dc.support_reason(model.model, torch.device("cpu")).startswith("needs CUDA")
    assert dc.support_reason(model.model, cuda, check_compiler=False) == ""
    assert "bitsandbytes" in dc.support_reason(model.model, cuda, quantization="4-bit", check_compiler=False)
    assert "Qwen3.5" in dc.support_reason(model.model, cuda, model_type="qwen3_5", check_compiler=False)
    if "tiny-qwen3.5" in TINY_FAMILIES:
        hybrid = load_tiny(models_dir, "tiny-qwen3.5", compile_decode="off")
        # found from its cache layers too, not only from the family's name
        assert "not plain full attention" in dc.support_reason(hybrid.model, cuda, check_compiler=False)


# -- (a) CPU fallback under auto ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_auto_falls_back_with_one_log_line(models_dir, family, caplog):
    caplog.set_level(logging.INFO, logger="QwenVL-Fast")
    model = load_tiny(models_dir, family)  # compile_decode defaults to "auto"
    assert model.options.compile_decode == "auto"
    lines = decode_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("[QwenVL-Fast] compiled decode off: needs CUDA"), lines
    assert not model.decode_compile.enabled and model.decode_compile.cache is None
    auto = [ask(model, [image()], q) for q in (SHORT, LONG)]
    assert auto[0].record.decode_compile == "off (needs CUDA (device is cpu))"
    assert '"decode_compile": "off (needs CUDA' in auto[0].record.to_json()
    assert model.decode_compile.cache is None  # nothing static was made
    assert len(decode_lines(caplog)) == 1  # runs do not log it again
    from qwenvl_fast import qwenvl_loader as ql

    ql.MANAGER.release()
    caplog.clear()
    off = load_tiny(models_dir, family, compile_decode="off")
    assert decode_lines(caplog) == []  # chosen off: nothing to say
    answers = [ask(off, [image()], q) for q in (SHORT, LONG)]
    assert [a.token_ids for a in answers] == [a.token_ids for a in auto]
    assert answers[0].record.decode_compile == "off (off)"


# -- (b) the static-cache path gives the eager tokens ----------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_matches_eager_and_shares_one_bucket(models_dir, family):
    model = load_tiny(models_dir, family, dtype="fp32")
    img = image(1)
    refs = [ask(model, [img], q) for q in (SHORT, LONG)]
    lengths = [r.record.prompt_tokens for r in refs]
    assert lengths[0] != lengths[1]
    assert dc.cache_bucket(lengths[0] + NEW) == dc.cache_bucket(lengths[1] + NEW) == 256, lengths
    state = force_static(model)
    seen = []
    for q, ref in zip((SHORT, LONG), refs):
        result = ask(model, [img], q)
        assert result.token_ids == ref.token_ids, f"{family}: static cache changed the answer to {q!r}"
        assert result.record.decode_compile == "off (static cache without compile)"
        cache = state.cache
        assert type(cache).__name__ == "StaticCache" and state._cache_key == (1, 256)
        assert {layer.max_cache_len for layer in cache.layers} == {256}
        assert filled(state) == result.record.prompt_tokens + NEW - 1  # the last new token is never fed back
        seen.append((id(cache), cache.layers[0].keys.data_ptr()))
    assert seen[0] == seen[1]  # the same cache object and buffers for both lengths: reset, not reallocated


@pytest.mark.skipif(tf_compat.transformers_version() < (5, 18), reason="prefix reuse is off before 5.18")
@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_with_prefix_reuse(models_dir, family):
    """Filling the prefix cache from a static cache, and a reused prefix copied into it: the eager tokens."""
    model = load_tiny(models_dir, family, dtype="fp32")
    img = image(2)
    refs = [ask(model, [img], q).token_ids for q in (SHORT, LONG, "Colours?")]
    force_static(model)
    first = ask(model, [img], SHORT, enable_image_cache=True)
    assert first.token_ids == refs[0] and first.record.prefix_tokens_prefilled > 0
    assert len(model.prefix_cache) == 1  # the prefix was kept from the static cache
    for q, ref in zip((LONG, "Colours?"), refs[1:]):
        result = ask(model, [img], q, enable_image_cache=True)
        assert result.record.prefix_tokens_reused == first.record.prefix_tokens_prefilled
        assert result.record.decode_compile == "off (static cache without compile)"  # static, not bypassed
        assert result.token_ids == ref, f"{family}: reused prefix in a static cache changed {q!r}"
        assert filled(model.decode_compile) == result.record.prompt_tokens + NEW - 1


def test_static_cache_batched_rows(models_dir):
    """One answer per image, left-padded rows in one generate: the static cache gives the eager batch's tokens."""
    model = load_tiny(models_dir, FAMILIES[0], dtype="fp32")
    imgs = [image(3, 40, 60), image(4, 64, 96), image(5, 32, 32)]
    mode = "one answer per image"
    ref = ask(model, imgs, SHORT, batch_mode=mode)
    state = force_static(model)
    result = ask(model, imgs, SHORT, batch_mode=mode)
    assert state._cache_key[0] == 3 and filled(state) > 0  # one generate call for the three rows, on the cache
    assert result.token_ids == ref.token_ids


# -- compiled (Dynamo's eager backend on the CPU): no recompile per prompt length ------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_decode_does_not_recompile_per_prompt_length(models_dir, family, fresh_dynamo):
    model = load_tiny(models_dir, family, dtype="fp32")
    img = image(6)
    refs = [ask(model, [img], q).token_ids for q in (SHORT, LONG)]
    state = force_static(model, cpu_compile_config("eager"))
    with count_recompiles() as first:
        a = ask(model, [img], SHORT)
    assert a.token_ids == refs[0] and a.record.decode_compile == "on"
    assert first.frames >= 1  # decode really went through torch.compile
    with count_recompiles() as second:
        b = ask(model, [img], LONG)  # a longer prompt, same bucket
    assert b.token_ids == refs[1]
    assert second.frames == 0 and second.recompiles == 0, second.reasons
    assert not state.failed


# -- (d) a compile that fails: one log line, eager decode, correct answers ----------------------------------
def _failing_backend(gm, example_inputs):
    raise RuntimeError("test: this compiler always fails")


@pytest.mark.parametrize("family", FAMILIES)
def test_failing_compile_falls_back(models_dir, family, caplog, fresh_dynamo):
    caplog.set_level(logging.INFO, logger="QwenVL-Fast")
    model = load_tiny(models_dir, family, dtype="fp32")
    img = image(7)
    refs = [ask(model, [img], q).token_ids for q in (SHORT, LONG)]
    state = force_static(model, cpu_compile_config(_failing_backend))
    assert "get_compiled_call" in model.model.__dict__
    caplog.clear()
    first = ask(model, [img], SHORT)
    assert first.token_ids == refs[0]
    failed = [m for m in decode_lines(caplog) if "failed" in m]
    assert len(failed) == 1 and "this compiler always fails" in failed[0], failed
    assert state.failed and first.record.decode_compile.startswith("off (compile failed: ")
    assert "get_compiled_call" not in model.model.__dict__  # the model is back to transformers' own method
    second = ask(model, [img], LONG)  # still static cache, eager; no second log line
    assert second.token_ids == refs[1]
    assert len([m for m in decode_lines(caplog) if "failed" in m]) == 1
