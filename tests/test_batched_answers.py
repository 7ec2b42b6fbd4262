"""One answer per image, generated in one batched ``generate`` call: the same answers as one by one, each row
stopping on its own EOS, Cancel, progress, the timing record, seeded sampling and the token budget."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_FAMILIES, load_tiny, tiny_request
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.engine import model as engine

FAMILIES = [f for f in ("tiny-qwen2.5-vl", "tiny-qwen3-vl") if f in TINY_FAMILIES]
EACH = engine.BATCH_MODES[1]


def images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(h, w, 3, generator=g) for h, w in sizes]


def watch_generate(model, monkeypatch) -> list[tuple[int, int]]:
    """The (rows, prompt width) of every ``generate`` call the engine makes."""
    calls: list[tuple[int, int]] = []
    real = model.model.generate

    def counting(**kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return real(**kwargs)

    monkeypatch.setattr(model.model, "generate", counting)
    return calls


def each(imgs, **overrides):
    base = dict(batch_mode=EACH, max_new_tokens=12, min_new_tokens=12, enable_image_cache=False)
    base.update(overrides)
    return tiny_request(imgs, **base)


def one_by_one(model, imgs, **overrides):
    """Every image alone, in its own request: the reference a batch must reproduce."""
    results = [model.run(each([img], **overrides)) for img in imgs]
    return [r.token_ids[0] for r in results], [r.texts[0] for r in results]


SAME = [(90, 120)] * 3
MIXED = [(100, 300), (32, 32), (40, 400)]  # 280, 256, 306 visual tokens at 'balanced': left padding


@pytest.mark.parametrize("family", FAMILIES)
def test_same_size_batch_equals_one_by_one(models_dir, family, monkeypatch):
    """Equal prompts (no padding): greedy texts and token ids are the one-by-one ones, from ONE generate call."""
    model = load_tiny(models_dir, family)
    imgs = images(SAME)
    ids, texts = one_by_one(model, imgs)
    calls = watch_generate(model, monkeypatch)
    batched = model.run(each(imgs))
    assert [c[0] for c in calls] == [3], f"expected one generate call with 3 rows, got {calls}"
    assert batched.token_ids == ids
    assert batched.texts == texts
    assert all(len(row) == 12 for row in batched.token_ids)
    forced = model.run(each(imgs, answer_batch_tokens=0))  # budget 0: one generate per image
    assert [c[0] for c in calls[1:]] == [1, 1, 1]
    assert forced.token_ids == ids and forced.texts == texts


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_one_by_one(models_dir, family, monkeypatch):
    """Different sizes, so different prompt lengths and left padding: every row's tokens are still exactly its
    one-by-one tokens. This holds in fp32 on the CPU because the padding is masked out of attention (its weights
    are exactly 0), the multimodal rotary positions of a row are computed on its unpadded tokens (get_rope_index
    with the attention mask, rope deltas per row) and the cached embeddings land on each row's own image tokens.
    On a GPU in bf16 the batched matmuls may round differently and greedy answers can drift after many tokens."""
    model = load_tiny(models_dir, family)
    imgs = images(MIXED, seed=1)
    ids, texts = one_by_one(model, imgs, image_quality="balanced")
    calls = watch_generate(model, monkeypatch)
    batched = model.run(each(imgs, image_quality="balanced"))
    lengths = [r["tokens"] for r in batched.record.images]
    assert len(set(lengths)) == 3, f"the images should cost different token counts, got {lengths}"
    assert len(calls) == 1 and calls[0][0] == 3
    assert batched.token_ids == ids
    assert batched.texts == texts


@pytest.mark.parametrize("family", FAMILIES)
def test_early_eos_row_has_no_padding(models_dir, family, monkeypatch):
    """A row that ends early keeps its tokens up to and with its own EOS, like one by one, no padding after it;
    the other rows go on. EOS is forced deterministically: greedy answers of the random tiny model are fixed, so a
    token that row 0 emits at step 3 and row 1 never emits is declared the EOS for this test."""
    model = load_tiny(models_dir, family)
    imgs = images(MIXED[:2], seed=2)
    full, _ = one_by_one(model, imgs, min_new_tokens=0, image_quality="balanced")
    candidates = [t for k, t in enumerate(full[0][:8]) if k >= 2 and t not in full[0][:k] and t not in full[1]]
    if not candidates:
        pytest.skip("no token separates the two greedy answers of this random model")
    eos = candidates[0]
    cut = full[0].index(eos) + 1
    monkeypatch.setattr(model.model.generation_config, "eos_token_id", eos)
    ids, texts = one_by_one(model, imgs, min_new_tokens=0, image_quality="balanced")
    assert ids[0] == full[0][:cut] and ids[1] == full[1]
    assert cut < len(full[1]), "row 0 must end before row 1 for padding to follow its EOS"
    calls = watch_generate(model, monkeypatch)
    batched = model.run(each(imgs, min_new_tokens=0, image_quality="balanced", monitor=True))
    assert len(calls) == 1 and calls[0][0] == 2
    assert batched.token_ids == ids, "the early row carries padding, or a row did not stop on its own"
    assert batched.token_ids[0][-1] == eos and model.tokenizer.pad_token_id not in batched.token_ids[0]
    assert batched.texts == texts
    assert batched.record.new_tokens == cut + len(full[1])  # real tokens, not the padding after an EOS


@pytest.mark.parametrize("family", FAMILIES)
def test_cancel_mid_batch(models_dir, family, monkeypatch):
    model = load_tiny(models_dir, family)
    steps: list[tuple[int, int]] = []
    calls = watch_generate(model, monkeypatch)
    req = each(images(SAME), max_new_tokens=40, min_new_tokens=40, on_progress=lambda s, t: steps.append((s, t)),
               should_stop=lambda: len(steps) >= 5)
    with pytest.raises(ql.GenerationInterrupted):
        model.run(req)
    assert len(calls) == 1 and calls[0][0] == 3, "the cancel should come inside the one batched call"
    assert 5 <= len(steps) <= 6 and steps[-1][0] < 3 * 40, "Cancel was not checked per step"


@pytest.mark.parametrize("family", FAMILIES)
def test_progress_and_record(models_dir, family, monkeypatch):
    """Progress moves per row and step, never back, to the total of all answers; the record counts real tokens."""
    model = load_tiny(models_dir, family)
    imgs = images(SAME)
    steps: list[tuple[int, int]] = []
    texts: list[str] = []
    calls = watch_generate(model, monkeypatch)
    result = model.run(each(imgs, max_new_tokens=20, min_new_tokens=20, monitor=True,
                            on_progress=lambda s, t: steps.append((s, t)), on_text=texts.append))
    assert len(calls) == 1 and calls[0][0] == 3
    assert {t for _, t in steps} == {60}
    done = [s for s, _ in steps]
    assert done == sorted(done) and done[-1] == 60
    assert done[:20] == [3 * k for k in range(1, 21)]  # each step, each of the 3 rows one token further
    assert len(texts) == 3 and texts[-1] == "\n\n".join(model.prompts.decode_answer(torch.tensor(ids))
                                                        for ids in result.token_ids)
    rec = result.record
    alone = model.run(each(imgs[:1], max_new_tokens=20, min_new_tokens=20, monitor=True)).record
    assert rec.prompt_tokens == 3 * alone.prompt_tokens  # no padding counted
    assert rec.new_tokens == 60
    assert rec.stages["prefill"] > 0 and rec.stages["decode"] > 0
    # each row's first token comes from the one prefill: 57 tokens were decoded
    assert rec.decode_tokens_per_s == pytest.approx(57 / rec.stages["decode"])


def test_sampling_is_seeded_run_to_run(models_dir, monkeypatch):
    """Batched sampling: the same seed gives the same answers run to run (the rows share one random stream, so a
    row's sampled answer depends on its batchmates and is not its one-by-one answer; see engine.py)."""
    model = load_tiny(models_dir, FAMILIES[0])
    imgs = images(SAME)
    calls = watch_generate(model, monkeypatch)
    kw = dict(do_sample=True, temperature=1.5, top_k=0, top_p=1.0)
    a = model.run(each(imgs, seed=7, **kw))
    b = model.run(each(imgs, seed=7, **kw))
    c = model.run(each(imgs, seed=8, **kw))
    assert [n for n, _ in calls] == [3, 3, 3]
    assert a.token_ids == b.token_ids and a.texts == b.texts
    assert a.token_ids != c.token_ids


def test_token_budget_splits_the_batch(models_dir, monkeypatch):
    model = load_tiny(models_dir, FAMILIES[0])
    imgs = images(SAME * 2)[:5]
    ids, texts = one_by_one(model, imgs)
    calls = watch_generate(model, monkeypatch)
    width = model.run(each(imgs[:1])).record.prompt_tokens
    calls.clear()
    steps: list[int] = []
    result = model.run(each(imgs, answer_batch_tokens=2 * (width + 12), on_progress=lambda s, t: steps.append(s)))
    assert [n for n, _ in calls] == [2, 2, 1]
    assert result.token_ids == ids and result.texts == texts
    assert steps == sorted(steps) and steps[-1] == 5 * 12


def test_answer_chunks_and_cut_at_eos():
    assert engine.answer_chunks([10, 10, 10], 6, 48) == [[0, 1, 2]]
    assert engine.answer_chunks([10, 10, 10], 6, 47) == [[0, 1], [2]]
    assert engine.answer_chunks([10, 30, 10], 10, 80) == [[0, 1], [2]]  # the longest prompt sets the width
    assert engine.answer_chunks([100, 5], 10, 50) == [[0], [1]]  # over the budget alone: alone
    assert engine.answer_chunks([5, 5], 10, 0) == [[0], [1]]
    assert engine.cut_at_eos([1, 2, 9, 0, 0], {9}) == [1, 2, 9]
    assert engine.cut_at_eos([1, 2, 3], {9}) == [1, 2, 3]
    assert engine.cut_at_eos([1, 2, 3], set()) == [1, 2, 3]


def test_out_of_memory_in_a_batch_answers_one_by_one(models_dir, monkeypatch):
    """A batch that does not fit is answered one image at a time, as before batching, with the same answers."""
    model = load_tiny(models_dir, FAMILIES[0])
    imgs = images(SAME)
    ids, texts = one_by_one(model, imgs)
    real = model.model.generate
    calls: list[int] = []

    def small_memory(**kwargs):
        calls.append(int(kwargs["input_ids"].shape[0]))
        if kwargs["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(**kwargs)

    monkeypatch.setattr(model.model, "generate", small_memory)
    result = model.run(each(imgs, monitor=True))
    assert calls == [3, 1, 1, 1]
    assert result.token_ids == ids and result.texts == texts
    assert result.record.new_tokens == 36
