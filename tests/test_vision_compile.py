"""Vision-tower compilation: same outputs as eager, no recompile per image size, clean fallback, reversible.

The slow tests really compile (Inductor, CPU C++ backend) the tiniest synthetic towers. The
first compile costs about 25-35 s on a 2-core CPU with a cold Inductor cache, and much less
with a warm one. The fast tests check the decisions and the fallback without compiling.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from qwenvl_fast.sources import synthetic
from qwenvl_fast.vision import tower_compile as vc

LOGGER = "QwenVL-Fast"

# Image sizes as the quality presets produce them: token budgets (min, max visual tokens)
# applied to differently shaped images. Every one is a different num_patches and window layout.
PRESET_TOKENS = {"fast": (128, 256), "balanced": (256, 512), "high": (256, 768)}
IMAGES = [((1024, 1024), "fast"), ((1080, 1920), "fast"), ((1920, 1080), "balanced"),
          ((1000, 600), "balanced"), ((1024, 1024), "high")]

needs_compiler = pytest.mark.skipif(not vc.compiler_status(torch.device("cpu"))[0],
                                    reason="torch.compile needs a C++ compiler on this CPU")


def build(name: str):
    model, _, config = synthetic.build_synthetic(f"synthetic:{name}")
    return model, model.model.visual, config.vision_config


def grid_for(vision_config, image_hw: tuple[int, int], preset: str) -> tuple[int, int, int]:
    patch, merge = vision_config.patch_size, vision_config.spatial_merge_size
    lo, hi = PRESET_TOKENS[preset]
    factor = patch * merge
    h, w = smart_resize(image_hw[0], image_hw[1], factor=factor, min_pixels=lo * factor**2,
                        max_pixels=hi * factor**2)
    return 1, h // patch, w // patch


def inputs(vision_config, grids: list[tuple[int, int, int]], seed: int = 0):
    """pixel_values [num_patches, C*T*P*P] and grid_thw [n_images, 3], as the processor makes them."""
    width = 3 * vision_config.temporal_patch_size * vision_config.patch_size**2
    gen = torch.Generator().manual_seed(seed)
    patches = sum(t * h * w for t, h, w in grids)
    return torch.randn(patches, width, generator=gen), torch.tensor(grids)


def tower_outputs(visual, pixel_values, grid_thw) -> list[torch.Tensor]:
    out = visual(pixel_values, grid_thw=grid_thw)
    return [out.last_hidden_state, out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]


def our_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def assert_eager(visual) -> None:
    """No compiled call and no wrapped attention anywhere: the tower is exactly its eager self."""
    assert vc.compile_state(visual) is None
    for module in visual.modules():
        assert getattr(module, "_compiled_call_impl", None) is None
        assert "forward" not in module.__dict__


@pytest.fixture
def fresh_dynamo():
    """Compile counts depend on what Dynamo has cached for these classes: start and end empty."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# Fast: decisions, fallback, reversibility (nothing is actually compiled)
# --------------------------------------------------------------------------------------------
def test_compiler_status_cpu(monkeypatch):
    monkeypatch.setattr(vc.shutil, "which", lambda name, *a, **k: None)
    ok, reason = vc.compiler_status(torch.device("cpu"))
    assert not ok
    assert "C++ compiler" in reason
    monkeypatch.setattr(vc.shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    ok, reason = vc.compiler_status("cpu")
    assert ok, reason


def test_compiler_status_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vc.compiler_status("cuda") == (False, "CUDA is not available")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    missing = "Triton is not installed (pip install triton)"
    monkeypatch.setattr(vc, "_triton_status", lambda: (False, missing))
    assert vc.compiler_status("cuda") == (False, missing)

    monkeypatch.setattr(vc, "_triton_status", lambda: (True, "Triton 3.0"))
    ok, reason = vc.compiler_status("cuda:0")
    assert ok and "8.0" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    ok, reason = vc.compiler_status("cuda:0")
    assert not ok and "6.1" in reason and "7.0" in reason


def test_triton_missing_names_the_windows_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setattr(vc.sys, "platform", "win32")
    ok, reason = vc._triton_status()
    assert not ok
    assert reason == "Triton is not installed (no Triton on Windows: pip install triton-windows)"


def test_off_and_auto_on_cpu_do_nothing(caplog):
    model, visual, _ = build("tiny-qwen2.5-vl")
    keys = list(model.state_dict())
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        off = vc.compile_vision_tower(model, "off")
        auto = vc.compile_vision_tower(model, "auto")  # the device comes from the weights: CPU
    assert not off.enabled and off.mode == "eager"
    assert not auto.enabled and "CUDA" in auto.reason
    assert our_records(caplog) == []
    assert_eager(visual)
    assert list(model.state_dict()) == keys


def test_on_without_compiler_falls_back_with_one_log_line(monkeypatch, caplog):
    model, visual, vcfg = build("tiny-qwen2.5-vl")
    pixel_values, grid = inputs(vcfg, [(1, 16, 16)])
    with torch.no_grad():
        before = tower_outputs(visual, pixel_values, grid)
    monkeypatch.setattr(vc.shutil, "which", lambda name, *a, **k: None)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        report = vc.compile_vision_tower(model, "on")
    assert not report.enabled and report.mode == "eager"
    assert "C++ compiler" in report.reason
    records = our_records(caplog)
    assert len(records) == 1
    assert records[0].getMessage().startswith("[QwenVL-Fast] ") and "C++ compiler" in records[0].getMessage()
    assert_eager(visual)
    with torch.no_grad(), vc.count_recompiles() as counter:
        after = tower_outputs(visual, pixel_values, grid)
    assert counter.frames == 0
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def _failing_compile(*args, **kwargs):
    def compiled(*a, **k):
        raise RuntimeError("inductor exploded\nsecond line of the traceback text")

    return compiled


def test_lazy_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    """Compiling happens at the first call; a failure there must not reach the caller."""
    model, visual, vcfg = build("tiny-qwen3-vl")
    pixel_values, grid = inputs(vcfg, [(1, 16, 16)])
    with torch.no_grad():
        before = tower_outputs(visual, pixel_values, grid)
    monkeypatch.setattr(vc, "compiler_status", lambda device: (True, "test"))
    monkeypatch.setattr(torch, "compile", _failing_compile)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = vc.compile_vision_tower(model, "on")
        assert report.enabled
        caplog.clear()
        with torch.no_grad():
            after = tower_outputs(visual, pixel_values, grid)
            again = tower_outputs(visual, pixel_values, grid)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(a, b) for a, b in zip(before, again))
    assert not report.enabled and report.mode == "eager"
    assert "inductor exploded" in report.reason and "second line" not in report.reason
    records = our_records(caplog)
    assert len(records) == 1 and "inductor exploded" in records[0].getMessage()
    assert_eager(visual)


def test_bad_input_raises_the_eager_error_and_keeps_compilation(monkeypatch):
    model, visual, vcfg = build("tiny-qwen2.5-vl")
    monkeypatch.setattr(vc, "compiler_status", lambda device: (True, "test"))
    monkeypatch.setattr(torch, "compile", _failing_compile)
    report = vc.compile_vision_tower(model, "on")
    pixel_values, _ = inputs(vcfg, [(1, 16, 16)])
    with pytest.raises(RuntimeError) as info, torch.no_grad():
        visual.blocks[0](pixel_values, cu_seqlens=torch.tensor([0, 256], dtype=torch.int32),
                         position_embeddings=None)  # wrong width and no rotary tables
    assert "inductor exploded" not in str(info.value)
    assert report.enabled and vc.compile_state(model) is report


def test_compile_is_idempotent_and_uncompile_restores(monkeypatch):
    model, visual, _ = build("tiny-qwen3-vl")
    blocks = list(visual.blocks)
    keys = list(model.state_dict())
    monkeypatch.setattr(vc, "compiler_status", lambda device: (True, "test"))

    report = vc.compile_vision_tower(model, "on")  # lazy: compiles nothing until the first call
    expected = len(visual.blocks) + 1 + len(visual.deepstack_merger_list)
    assert report.enabled and report.compiled_modules == expected
    wrapped = [m._compiled_call_impl for m in visual.modules() if m._compiled_call_impl is not None]
    attn_forward = visual.blocks[0].attn.__dict__["forward"]
    assert len(wrapped) == expected

    assert vc.compile_vision_tower(model, "auto") is report  # second call: no double wrap
    assert vc.compile_vision_tower(model, "on") is report
    assert [m._compiled_call_impl for m in visual.modules() if m._compiled_call_impl is not None] == wrapped
    assert visual.blocks[0].attn.__dict__["forward"] is attn_forward
    assert list(model.state_dict()) == keys  # modules were not replaced (no `_orig_mod.` keys)

    assert vc.uncompile_vision_tower(model) is True
    assert not report.enabled and report.mode == "eager"
    assert_eager(visual)
    assert list(visual.blocks) == blocks and list(model.state_dict()) == keys
    assert vc.uncompile_vision_tower(model) is False

    # "off" on a compiled tower restores it too, so changing the setting of a loaded model takes effect.
    vc.compile_vision_tower(model, "on")
    assert vc.compile_state(model) is not None
    assert not vc.compile_vision_tower(model, "off").enabled
    assert_eager(visual)


def test_report_separates_warmup_from_steady_state():
    report = vc.CompileReport(enabled=True, mode="regional", reason="", _awaiting_warmup=True)
    report.note_call(30.0)
    report.note_call(0.2)
    report.note_call(0.4, vc.CompileCounter(frames=2, recompiles=1))
    report.note_call(0.4)
    assert report.warmup_s == 30.0
    assert report.steady_calls == 2 and report.steady_mean_s == pytest.approx(0.3)
    assert report.compile_calls == 1 and report.recompiles == 1
    eager = vc.CompileReport(enabled=False, mode="eager", reason="off")
    eager.note_call(0.5)
    assert eager.warmup_s is None and eager.steady_calls == 1


# --------------------------------------------------------------------------------------------
# Slow: real compilation
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_compiled_tower_matches_eager(name, fresh_dynamo):
    """Inductor fuses and reorders fp32 arithmetic (norm reductions, activations), so outputs
    differ from eager only by rounding: about 5e-8 on these towers, whose activations are O(1).
    1e-4 leaves a wide margin over that and is still far below the O(0.1-1) error that a skipped,
    duplicated or mis-wired block would cause. The Qwen3-VL deepstack features are compared too."""
    model, visual, vcfg = build(name)
    cases = [
        inputs(vcfg, [grid_for(vcfg, (1024, 1024), "fast")], seed=1),
        inputs(vcfg, [grid_for(vcfg, (1080, 1920), "fast"), (1, 8, 12)], seed=2),  # two images in one call
    ]
    with torch.no_grad():
        expected = [tower_outputs(visual, px, grid) for px, grid in cases]
    report = vc.compile_vision_tower(model, "on")
    assert report.enabled, report.reason
    with torch.no_grad(), vc.count_recompiles() as first:
        got = [tower_outputs(visual, px, grid) for px, grid in cases]
    assert report.enabled, report.reason  # no lazy fallback to eager happened
    assert first.frames > 0  # the compiled regions really ran
    if name == "tiny-qwen3-vl":
        assert len(expected[0]) == 2 + len(visual.deepstack_merger_list) >= 3
    for exp, out in zip(expected, got):
        assert len(exp) == len(out)
        for e, o in zip(exp, out):
            assert e.shape == o.shape
            torch.testing.assert_close(o, e, atol=1e-4, rtol=0)

    vc.uncompile_vision_tower(model)
    assert_eager(visual)
    with torch.no_grad(), vc.count_recompiles() as after:
        eager_again = tower_outputs(visual, *cases[0])
    assert after.frames == 0
    assert all(torch.equal(a, b) for a, b in zip(expected[0], eager_again))


@pytest.mark.slow
@needs_compiler
def test_recompiles_do_not_grow_with_image_sizes(fresh_dynamo):
    """Qwen2.5-VL (window attention: the number of windows changes with the size) over 5 sizes."""
    model, visual, vcfg = build("tiny-qwen2.5-vl")
    grids = [grid_for(vcfg, hw, preset) for hw, preset in IMAGES]
    assert len({g[1] * g[2] for g in grids}) == len(grids)  # every call is a new num_patches
    report = vc.compile_vision_tower(model, "on")
    counts = []
    with torch.inference_mode():  # as the loader calls the tower
        for i, grid in enumerate(grids):
            pixel_values, grid_thw = inputs(vcfg, [grid], seed=i)
            with report.measure() as counter:
                visual(pixel_values, grid_thw=grid_thw)
            counts.append(counter)
    assert report.enabled, report.reason
    # First call: 4 frames are compiled (the block's GradientCheckpointingLayer.__call__, its
    # forward, the resume function after the eager attention, and the merger), each recompiled at
    # most once (under no_grad, the first block's input is a view and later blocks' are not).
    assert counts[0].frames > 0
    assert counts[0].recompiles <= 4, counts[0].reasons
    # Later sizes: nothing at all is compiled.
    for counter in counts[1:]:
        assert counter.frames == 0 and counter.recompiles == 0, counter.reasons
    assert report.recompiles == counts[0].recompiles
    assert report.warmup_s is not None and report.steady_calls == len(grids) - 1
