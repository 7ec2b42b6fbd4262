"""Quality presets: the resize rule equals transformers', token budgets hold for every size, the engine's
prompt carries exactly the predicted image tokens, ``auto``/``native``/unknown names, extreme strips."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as tf_smart_resize

from conftest import TINY_FAMILIES
from qwenvl_fast import quality_presets as qp

FACTORS = (28, 32)  # Qwen2/2.5-VL; Qwen3-VL/3.5
PRESETS = tuple(qp.PRESET_TOKEN_BUDGETS)
MAX_SIDE = 20000


def tokens_of(size, factor):
    return qp.visual_tokens(size, factor)


# Sizes: any rectangle up to 8k, plus strips from square to far beyond 200:1 (padded first).
square_ish = st.tuples(st.integers(1, 8192), st.integers(1, 8192))


@st.composite
def strips(draw):
    short = draw(st.integers(1, 300))
    ratio = draw(st.floats(1.0, 20000.0, allow_nan=False))
    long = max(1, min(MAX_SIDE, math.ceil(short * ratio)))
    return (short, long) if draw(st.booleans()) else (long, short)


sizes = st.one_of(square_ish, strips())
EDGE_SIZES = [(1, 1), (27, 27), (1, 4000), (4000, 1), (20000, 20), (20, 20000), (8192, 8192), (1, 200), (1, 201),
              (19, 2432), (65, 4160), (28, 28), (56, 11200)]


def with_examples(fn):
    for size in EDGE_SIZES:
        fn = example(size)(fn)
    return fn


# ---------------------------------------------------------------------------------------------
# Pure size math (hypothesis)
# ---------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@with_examples
@given(sizes)
def test_smart_resize_equals_transformers(size):
    """Same result as transformers wherever it accepts the size; the same refusal (>200:1) where it does not."""
    h, w = size
    for factor in FACTORS:
        limits = [qp.preset_pixels(p, factor) for p in PRESETS]
        limits += [(lo * factor**2, hi * factor**2) for lo, hi in qp.PRESET_TOKEN_BUDGETS.values()]  # exact
        limits.append((4 * factor**2, 16384 * factor**2))  # the processors' own defaults (native)
        for lo, hi in limits:
            try:
                expected = tf_smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
            except ValueError:
                assert max(h, w) > qp.MAX_ASPECT_RATIO * min(h, w)
                with pytest.raises(qp.QualityError, match="pad_to_max_aspect"):
                    qp.smart_resize(h, w, factor, lo, hi)
                expected = None
            if expected is not None:
                assert qp.smart_resize(h, w, factor, lo, hi) == expected
            ph, pw = qp.padded_size(h, w)  # what the engine feeds after canonicalize_image
            assert qp.smart_resize(ph, pw, factor, lo, hi) == tf_smart_resize(ph, pw, factor, lo, hi)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@with_examples
@given(sizes)
def test_tokens_within_preset_budget(size):
    """After padding to <= 200:1, every preset's token count lies within [min, max] budget, for any size.

    The exact guarantee (see the comment at ``quality_presets.PIXEL_SLACK``): no exception for thin
    images is needed, because padding bounds the aspect ratio at 200 and every preset has max >= 2*min
    and max well above 200; the one-pixel slack takes care of the float ties in sqrt/ceil/floor.
    """
    ph, pw = qp.padded_size(*size)
    assert max(ph, pw) <= qp.MAX_ASPECT_RATIO * min(ph, pw)
    for factor in FACTORS:
        for preset, (lo, hi) in qp.PRESET_TOKEN_BUDGETS.items():
            budget = qp.resolve_budget(preset, factor)
            rh, rw = qp.target_size(ph, pw, factor, budget)
            assert rh % factor == 0 and rw % factor == 0 and rh >= factor and rw >= factor
            assert lo <= tokens_of((rh, rw), factor) <= hi, (size, factor, preset, (rh, rw))


def _exact_ties(token_count, n_max):
    """Sizes (h, w) at which the rescaled side is a whole number k of patches: h*T = w*k**2."""
    out = []
    for k in range(1, int(math.isqrt(qp.MAX_ASPECT_RATIO * token_count)) + 2):
        step = k * k // math.gcd(token_count, k * k)
        for h in range(step, n_max + 1, step):
            w = h * token_count // (k * k)
            if 1 <= w <= n_max and max(h, w) <= qp.MAX_ASPECT_RATIO * min(h, w):
                out += [(h, w), (w, h)]
    return out


def test_tokens_within_budget_at_every_float_tie():
    """Random sizes almost never hit the float ties; enumerate all of them up to 8192 px a side."""
    checked = 0
    for factor in FACTORS:
        for preset, (lo, hi) in qp.PRESET_TOKEN_BUDGETS.items():
            mn, mx = qp.preset_pixels(preset, factor)
            for h, w in {s for t in (lo, hi) for s in _exact_ties(t, 8192)}:
                size = qp.smart_resize(h, w, factor, mn, mx)
                assert lo <= tokens_of(size, factor) <= hi, (h, w, factor, preset, size)
                checked += 1
    assert checked > 1000


def test_exact_limits_would_break_the_budget():
    """Why the slack exists: at the exact limits transformers itself overshoots/undershoots 'fast' on 28."""
    f, (lo, hi) = 28, qp.PRESET_TOKEN_BUDGETS["fast"]
    assert tokens_of(tf_smart_resize(19, 2432, f, lo * f * f, hi * f * f), f) == 258
    assert tokens_of(tf_smart_resize(65, 4160, f, lo * f * f, hi * f * f), f) == 127
    mn, mx = qp.preset_pixels("fast", f)
    for h, w in [(19, 2432), (65, 4160)]:
        assert qp.smart_resize(h, w, f, mn, mx) == tf_smart_resize(h, w, f, mn, mx)
        assert lo <= tokens_of(qp.smart_resize(h, w, f, mn, mx), f) <= hi


def test_seed_guide_table():
    """The worked examples in the reference notes."""
    for factor, side in [(28, {"fast": 448, "balanced": 616, "high": 756, "ultra": 896}),
                         (32, {"fast": 512, "balanced": 704, "high": 864, "ultra": 1024})]:
        for preset, px in side.items():
            assert qp.target_size(1024, 1024, factor, qp.resolve_budget(preset, factor)) == (px, px)
    for factor in FACTORS:
        got = {p: tokens_of(qp.target_size(1080, 1920, factor, qp.resolve_budget(p, factor)), factor) for p in PRESETS}
        assert got == {"fast": 252, "balanced": 480, "high": 720, "ultra": 1008}


@settings(max_examples=100, deadline=None)
@with_examples
@given(sizes)
def test_padded_size_matches_pad_to_max_aspect(size):
    """padded_size is pad_to_max_aspect's shape (checked on meta tensors: no pixels allocated)."""
    padded = qp.pad_to_max_aspect(torch.empty((*size, 3), device="meta"))
    assert tuple(padded.shape[:2]) == qp.padded_size(*size)


def test_pad_to_max_aspect_keeps_pixels_and_fills():
    strip = torch.zeros(1, 4000, 3, dtype=torch.uint8)
    padded = qp.pad_to_max_aspect(strip, fill=255)
    assert padded.shape == (20, 4000, 3)
    rows = (padded == 0).all(dim=-1).all(dim=-1)
    assert rows.sum() == 1 and (padded[~rows] == 255).all()
    tall = torch.rand(20000, 20, 3)
    assert qp.pad_to_max_aspect(tall).shape == (20000, 100, 3)
    ok = torch.rand(10, 2000, 3)
    assert qp.pad_to_max_aspect(ok) is ok


# ---------------------------------------------------------------------------------------------
# Names, auto, native
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sharp", "", "ultra+", "fastest"])
def test_unknown_preset_names_the_choices(name):
    with pytest.raises(qp.QualityError) as info:
        qp.resolve_budget(name, 28)
    for choice in qp.QUALITY_CHOICES:
        assert choice in str(info.value)


def test_preset_names_are_normalised():
    assert qp.resolve_budget(" Balanced ", 32) == qp.resolve_budget("balanced", 32)


def test_native_uses_given_limits():
    b = qp.resolve_budget("native", 28, native_limits=(3136, 12845056))
    assert (b.min_pixels, b.max_pixels, b.preset, b.chosen_by_auto) == (3136, 12845056, "native", False)


def _flat(h=1024, w=1024):
    return torch.full((h, w, 3), 180, dtype=torch.uint8)


def _noise(h=1024, w=1024, seed=0):
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _stripes(h=1024, w=1024, period=8):
    col = ((torch.arange(w) // (period // 2)) % 2 * 255).to(torch.uint8)
    return col[None, :, None].expand(h, w, 3).contiguous()


def _text_like(h=1024, w=1024, seed=0):
    """Dark 'glyphs' (short random vertical/horizontal strokes) on white lines, like a scanned page."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((h, w, 3), 255, dtype=torch.uint8)
    for top in range(8, h - 16, 20):
        x = 8
        while x < w - 12:
            glyph = (torch.rand(12, 8, generator=g) < 0.35)
            img[top:top + 12, x:x + 8][glyph] = 20
            x += 18 if float(torch.rand(1, generator=g)) < 0.15 else 10  # a word gap now and then
    return img


def test_auto_picks_fewer_tokens_for_flat_images():
    factor = 32
    flat = qp.resolve_budget("auto", factor, image_uint8_hwc=_flat())
    assert flat.chosen_by_auto and flat.label == f"auto->{flat.preset}"
    for detailed in (_noise(), _stripes(), _text_like()):
        rich = qp.resolve_budget("auto", factor, image_uint8_hwc=detailed)
        t_flat = tokens_of(qp.target_size(1024, 1024, factor, flat), factor)
        t_rich = tokens_of(qp.target_size(1024, 1024, factor, rich), factor)
        assert t_flat < t_rich, (flat, rich)
        assert rich.detail_score > flat.detail_score


def test_auto_without_image_is_an_error():
    with pytest.raises(qp.QualityError, match="auto"):
        qp.resolve_budget("auto", 28)


def test_detail_score_on_tiny_and_8k_strip_images():
    assert qp.detail_score(_flat(1, 1)) == 0.0
    assert qp.detail_score(_noise(2, 2)) == 0.0  # below the 3x3 kernel: nothing to measure
    assert qp.detail_score(_noise(20, 4000)) > 0.0


# ---------------------------------------------------------------------------------------------
# The engine's prompt (tiny real models)
# ---------------------------------------------------------------------------------------------

ENGINE_SIZES = [(1, 1), (27, 27), (33, 500), (480, 640), (1, 4000), (20000, 20)]


def _load(models_dir, family):
    from qwenvl_fast import qwenvl_loader as ql

    model, _ = ql.MANAGER.get(ql.LoadOptions(model=str(models_dir / family)))
    return model


def _prepare(model, image, quality):
    from qwenvl_fast import perf_monitor as pm
    from qwenvl_fast import qwenvl_loader as ql

    req = ql.GenerationRequest(prompt="Describe.", images=[image], image_quality=quality, monitor=False)
    prepared = model._prepare([image], req, None, pm.RunMonitor(enabled=False))
    inputs = model.build_inputs(req.prompt, req.system_prompt, prepared)
    return prepared[0], inputs


def _chat_text(model):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    return model.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_engine_prompt_has_predicted_image_tokens(models_dir, family):
    """Image-pad tokens in the engine's prompt == smart_resize's prediction == the processor's own grid."""
    model = _load(models_dir, family)
    factor = model.family.factor
    merge2 = model.family.merge_size ** 2
    text = _chat_text(model)
    g = torch.Generator().manual_seed(0)
    for h, w in ENGINE_SIZES:
        image = torch.rand(h, w, 3, generator=g)
        ph, pw = qp.padded_size(h, w)
        for preset, (lo, hi) in qp.PRESET_TOKEN_BUDGETS.items():
            item, inputs = _prepare(model, image, preset)
            mn, mx = qp.preset_pixels(preset, factor)
            predicted = tokens_of(qp.smart_resize(ph, pw, factor, mn, mx), factor)
            pads = int((inputs["input_ids"] == model.prompts.image_token_id).sum())
            assert item.size_in == (ph, pw)
            assert pads == predicted and lo <= pads <= hi, (family, (h, w), preset)
            assert tuple(inputs["image_grid_thw"][0].tolist()) == item.grid

            pil = Image.fromarray(item.canonical.numpy())
            size = {"shortest_edge": mn, "longest_edge": mx}
            full = model.processor(text=[text], images=[pil], return_tensors="pt", size=size)
            grid = full["image_grid_thw"]
            assert tuple(grid[0].tolist()) == item.grid and int(grid.prod()) // merge2 == pads
            assert torch.equal(full["input_ids"], inputs["input_ids"]), (family, (h, w), preset)


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_engine_native_uses_processor_limits(models_dir, family):
    model = _load(models_dir, family)
    size = model.processor.image_processor.size
    assert model.image_spec.native_limits == (int(size["shortest_edge"]), int(size["longest_edge"]))
    image = torch.rand(300, 500, 3, generator=torch.Generator().manual_seed(1))
    item, inputs = _prepare(model, image, "native")
    assert (item.budget.min_pixels, item.budget.max_pixels) == model.image_spec.native_limits
    pil = Image.fromarray(item.canonical.numpy())
    grid = model.processor.image_processor(images=[pil], return_tensors="pt")["image_grid_thw"]  # its defaults
    assert tuple(grid[0].tolist()) == item.grid
    image_tokens = int((inputs["input_ids"] == model.prompts.image_token_id).sum())
    assert image_tokens == item.tokens // model.family.merge_size ** 2


@pytest.mark.parametrize("family", ["tiny-qwen2-vl", "tiny-qwen3.5"])
def test_engine_auto_flat_vs_detailed(models_dir, family):
    model = _load(models_dir, family)
    flat, _ = _prepare(model, _flat().float() / 255, "auto")
    rich, _ = _prepare(model, _text_like().float() / 255, "auto")
    assert flat.budget.chosen_by_auto and rich.budget.chosen_by_auto
    assert flat.tokens < rich.tokens, (flat.budget, rich.budget)


def test_engine_rejects_unknown_preset(models_dir):
    from qwenvl_fast import qwenvl_loader as ql

    model = _load(models_dir, "tiny-qwen2.5-vl")
    req = ql.GenerationRequest(prompt="x", images=[torch.rand(32, 32, 3)], image_quality="turbo", monitor=False)
    with pytest.raises(qp.QualityError, match="balanced"):
        model.run(req)


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_engine_runs_extreme_strips(models_dir, family):
    """1x4000 and 20000x20 float images run end to end: padded to 200:1, tokens within the budget."""
    from qwenvl_fast import qwenvl_loader as ql

    model = _load(models_dir, family)
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(1, 4000, 3, generator=g), torch.rand(20000, 20, 3, generator=g)]
    for preset in ("fast", "ultra"):
        lo, hi = qp.PRESET_TOKEN_BUDGETS[preset]
        req = ql.GenerationRequest(prompt="Read it.", images=images, image_quality=preset, max_new_tokens=2,
                                   enable_image_cache=False, monitor=False)
        result = model.run(req)
        got = result.record.images
        assert [tuple(i["size_in"]) for i in got] == [(20, 4000), (20000, 100)]
        for info in got:
            assert lo <= info["tokens"] <= hi, info
        assert len(result.token_ids[0]) == 2
