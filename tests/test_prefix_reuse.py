"""Prefix-KV reuse (prefix_cache.py): a new question about the same images with the same system prompt reuses the
key/value cache of the prompt's prefix; greedy answers are token for token those without reuse, for a second and
a third question, with 1 and 2 images; a different system prompt, different images or a different model do not
reuse; the kept prefix is never mutated; Qwen3.5 and the image-cache-off path never reuse."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_FAMILIES, load_tiny, tiny_request
from qwenvl_fast.engine import model as engine
from qwenvl_fast.engine import prefix_cache
from qwenvl_fast.sources import tf_compat

REUSE_OK = tf_compat.transformers_version() >= (5, 18)
needs_reuse = pytest.mark.skipif(not REUSE_OK, reason="prefix reuse is off before transformers 5.18")
FAMILIES = [f for f in ("tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-qwen2-vl", "tiny-qwen3-vl-moe")
            if f in TINY_FAMILIES]
QUESTIONS = ["What is this?", "Describe the colours in this picture, in detail please.", "Count the shapes."]


def images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(h, w, 3, generator=g) for h, w in sizes]


def ask(model, imgs, question, **overrides):
    base = dict(prompt=question, max_new_tokens=12, min_new_tokens=12, monitor=True)
    base.update(overrides)
    return model.run(tiny_request(imgs, **base))


def reference(model, imgs, question, **overrides):
    """The answer without reuse (and without any cache): what a reused prefix must reproduce."""
    return ask(model, imgs, question, enable_image_cache=False, **overrides).token_ids


def kept_tensors(model):
    return [t.clone() for entry in model.prefix_cache._lru._items.values() for kv in entry.layers for t in kv]


@needs_reuse
@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_reused_prefix_gives_identical_greedy_answers(models_dir, family, count):
    model = load_tiny(models_dir, family)
    assert model.prefix_reuse_off_reason == ""
    imgs = images([(90, 120), (64, 96)][:count], seed=count)
    refs = [reference(model, imgs, q) for q in QUESTIONS]
    assert len(model.prefix_cache) == 0  # the image-cache-off path keeps nothing
    first = ask(model, imgs, QUESTIONS[0])
    assert first.token_ids == refs[0]
    assert first.record.prefix_tokens_reused == 0 and first.record.prefix_tokens_prefilled > 0
    prefix = first.record.prefix_tokens_prefilled
    assert prefix < first.record.prompt_tokens
    assert len(model.prefix_cache) == 1
    kept = kept_tensors(model)
    for q, ref in zip(QUESTIONS[1:], refs[1:]):  # a second and a third question: reused, identical
        result = ask(model, imgs, q)
        assert result.token_ids == ref, f"{family}: reuse changed the answer to {q!r}"
        assert result.record.prefix_tokens_reused == prefix
        assert result.record.prefix_tokens_prefilled == 0
        # the kept prefix is exactly what it was: a reuse works on a copy
        assert all(torch.equal(a, b) for a, b in zip(kept, kept_tensors(model)))
    again = ask(model, imgs, QUESTIONS[0])  # the first question again, from the cache
    assert again.token_ids == refs[0] and again.record.prefix_tokens_reused == prefix
    assert model.prefix_cache.info()["hits"] == 3


@needs_reuse
@pytest.mark.parametrize("family", FAMILIES[:2])
def test_what_does_not_reuse(models_dir, family, monkeypatch):
    """A different system prompt, different images, the image cache off or a different model: no reuse."""
    model = load_tiny(models_dir, family)
    img_a, img_b = images([(90, 120), (90, 120)], seed=3)
    ask(model, [img_a], QUESTIONS[0], system_prompt="You are terse.")
    assert len(model.prefix_cache) == 1
    other_system = ask(model, [img_a], QUESTIONS[1], system_prompt="You are verbose.")
    assert other_system.record.prefix_tokens_reused == 0 and other_system.record.prefix_tokens_prefilled > 0
    assert other_system.token_ids == reference(model, [img_a], QUESTIONS[1], system_prompt="You are verbose.")
    other_image = ask(model, [img_b], QUESTIONS[1], system_prompt="You are terse.")
    assert other_image.record.prefix_tokens_reused == 0
    two = ask(model, [img_a, img_b], QUESTIONS[1], system_prompt="You are terse.")  # a and b: a new prefix
    assert two.record.prefix_tokens_reused == 0
    assert len(model.prefix_cache) == 4
    off = ask(model, [img_a], QUESTIONS[1], system_prompt="You are terse.", enable_image_cache=False)
    assert off.record.prefix_tokens_reused == 0 and off.record.prefix_tokens_prefilled == 0
    # the embedding-cache-off path is today's: no cache handed to generate, no dict asked back
    seen = []
    real = model.model.generate

    def watching(**kwargs):
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(model.model, "generate", watching)
    ask(model, [img_a], QUESTIONS[2], system_prompt="You are terse.", enable_image_cache=False)
    assert not {"cache", "past_key_values", "return_dict_in_generate"} & set(seen[-1])
    monkeypatch.undo()
    # another model: its own (empty) prefix cache, even for the same prompt and image
    other_family = next(f for f in FAMILIES if f != family)
    other = load_tiny(models_dir, other_family)  # the manager releases the first model
    assert len(model.prefix_cache) == 0  # released with its model
    result = other.run(tiny_request([img_a], prompt=QUESTIONS[1], system_prompt="You are terse.", monitor=True))
    assert result.record.prefix_tokens_reused == 0


@needs_reuse
def test_budget_evicts_and_oom_drops(models_dir, monkeypatch):
    family = FAMILIES[0]
    model = load_tiny(models_dir, family)
    imgs = images([(90, 120)] * 3, seed=5)
    ask(model, [imgs[0]], QUESTIONS[0])
    one = model.prefix_cache.nbytes
    assert one > 0
    model.prefix_cache.max_bytes = int(one * 1.5)  # room for one entry
    ask(model, [imgs[1]], QUESTIONS[0])
    assert len(model.prefix_cache) == 1 and model.prefix_cache.info()["evictions"] == 1
    assert ask(model, [imgs[1]], QUESTIONS[1]).record.prefix_tokens_reused > 0  # the newest stayed
    assert ask(model, [imgs[0]], QUESTIONS[1]).record.prefix_tokens_reused == 0  # the oldest went
    model.prefix_cache.max_bytes = one - 1  # an entry over the budget is not kept
    model.prefix_cache.clear()
    ask(model, [imgs[2]], QUESTIONS[0])
    assert len(model.prefix_cache) == 0

    model.prefix_cache.max_bytes = one * 4
    ask(model, [imgs[2]], QUESTIONS[0])
    assert len(model.prefix_cache) == 1

    def out_of_memory(**kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(model.model, "generate", out_of_memory)
    with pytest.raises(engine.QwenVLError, match="Out of memory"):
        ask(model, [imgs[2]], QUESTIONS[1])
    assert len(model.prefix_cache) == 0  # memory pressure drops the kept prefixes


@pytest.mark.skipif("tiny-qwen3.5" not in TINY_FAMILIES, reason="Qwen3.5 needs transformers 5.x")
def test_qwen35_never_reuses(models_dir):
    """Qwen3.5's hybrid linear attention keeps recurrent and conv states taken after the LAST prompt token: they
    cannot be cut back to the prefix, so reuse is off for the family (and the answers are today's)."""
    model = load_tiny(models_dir, "tiny-qwen3.5")
    assert "Qwen3.5" in model.prefix_reuse_off_reason
    img = images([(90, 120)], seed=7)
    for q in QUESTIONS[:2]:
        result = ask(model, img, q)
        assert result.record.prefix_tokens_reused == 0 and result.record.prefix_tokens_prefilled == 0
        assert result.token_ids == reference(model, img, q)
    assert len(model.prefix_cache) == 0


@pytest.mark.skipif(REUSE_OK, reason="this transformers reuses prefixes")
@pytest.mark.parametrize("family", FAMILIES[:1])
def test_old_transformers_never_reuses(models_dir, family):
    model = load_tiny(models_dir, family)
    assert model.prefix_reuse_off_reason
    img = images([(90, 120)])
    ask(model, img, QUESTIONS[0])
    assert ask(model, img, QUESTIONS[1]).record.prefix_tokens_reused == 0


@needs_reuse
def test_batched_answers_do_not_reuse(models_dir):
    """One answer per image (several images) is the batched path: no prefix reuse there."""
    model = load_tiny(models_dir, FAMILIES[0])
    imgs = images([(90, 120)] * 2, seed=9)
    for q in QUESTIONS[:2]:
        result = ask(model, imgs, q, batch_mode=engine.BATCH_MODES[1])
        assert result.record.prefix_tokens_reused == 0 and result.record.prefix_tokens_prefilled == 0
    assert len(model.prefix_cache) == 0


def test_prefix_helpers():
    ids = torch.tensor([[1, 2, 9, 5, 5, 9, 7, 8]])
    assert prefix_cache.prefix_length(ids, 9) == 6
    assert prefix_cache.prefix_length(ids, 42) == 0
    key = prefix_cache.PrefixCache.key("model", ["img"], ids[0, :6])
    assert key != prefix_cache.PrefixCache.key("model", ["img2"], ids[0, :6])
    assert key != prefix_cache.PrefixCache.key("model2", ["img"], ids[0, :6])
    assert key != prefix_cache.PrefixCache.key("model", ["img"], ids[0, :5])


def test_budget_setting(monkeypatch):
    monkeypatch.delenv("QWENVL_FAST_PREFIX_CACHE_MB", raising=False)
    assert prefix_cache.prefix_cache_bytes() == 512 << 20
    monkeypatch.setenv("QWENVL_FAST_PREFIX_CACHE_MB", "0")
    assert prefix_cache.prefix_cache_bytes() == 0
    monkeypatch.setenv("QWENVL_FAST_PREFIX_CACHE_MB", "nonsense")
    with pytest.raises(engine.QwenVLError, match=r"PREFIX_CACHE_MB must be a number \(it is 'nonsense'\)"):
        prefix_cache.prefix_cache_bytes()
