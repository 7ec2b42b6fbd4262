"""engine/cpu_dtype.py: dtype=auto on a CPU, per part, by measurement.

The decision is tested with injected probe results (the real probe runs too, on tiny shapes, with no wall-clock
assertion). The mixed-dtype model (tower bf16, text fp32) is the real tiny model through the real loader: only
"does this CPU compute bf16 natively" and the probe's timings are injected, since this CI CPU (AVX2) has no bf16.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_FAMILIES, load_tiny, tiny_request
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.engine import cpu_dtype as cd

BF16, FP32 = torch.bfloat16, torch.float32
CPUINFO_AMX = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n"
CPUINFO_ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 fma\n"

timing = st.floats(min_value=1e-6, max_value=10.0, allow_nan=False)
timings_st = st.fixed_dictionaries({p: st.fixed_dictionaries({"fp32": timing, "bf16": timing}) for p in cd.PARTS})


# -- what the CPU is --------------------------------------------------------------------------------
def test_cpuinfo_is_read_for_the_model_and_flags():
    assert cd.cpu_model_name(CPUINFO_AMX) == "Intel(R) Xeon(R) Platinum 8480+"
    assert "amx_bf16" in cd.cpu_flags(CPUINFO_AMX)
    assert cd.native_bf16(cd.cpu_flags(CPUINFO_AMX)) == (True, "native bf16 (amx_bf16)")
    native, why = cd.native_bf16(cd.cpu_flags(CPUINFO_ZEN3), torch_says=True)
    assert not native and "no native bf16" in why  # the flags win over oneDNN's "supported" (it emulates)
    assert cd.native_bf16({"avx512_bf16", "avx512f"})[0]


def test_without_cpuinfo_torchs_report_decides():
    assert cd.native_bf16(set(), torch_says=True)[0]
    assert not cd.native_bf16(set(), torch_says=False)[0]


def test_this_cpu_is_judged_by_its_flags():
    flags = cd.cpu_flags()
    native, _ = cd.native_bf16()
    assert native == any(f in flags for f in cd.NATIVE_BF16_FLAGS) or not flags


# -- the decision -----------------------------------------------------------------------------------
@settings(max_examples=60)
@given(timings_st, st.booleans())
def test_bf16_only_where_native_and_clearly_faster(timings, native):
    parts = cd.choose(native, "why", timings)
    for part in cd.PARTS:
        t = timings[part]
        expected = BF16 if native and t["bf16"] <= cd.BF16_MARGIN * t["fp32"] else FP32
        assert getattr(parts, part) is expected
    if not native:
        assert parts.summary() == "fp32"


def test_the_issue_measurement_gives_tower_bf16_text_fp32():
    """The figures measured on an AMX CPU (issue 30): the tower wins in bf16, one lm_head token loses."""
    timings = {"tower": {"fp32": 0.533, "bf16": 0.163}, "text": {"fp32": 1.0, "bf16": 1.2},
               "lm_head": {"fp32": 0.150, "bf16": 0.205}}
    parts = cd.choose(True, "native bf16 (amx_bf16)", timings)
    assert parts.summary() == "tower bf16, text fp32, lm_head fp32"
    assert "tower bf16/fp32 0.31" in parts.why


def test_missing_or_broken_timings_keep_fp32():
    assert cd.choose(True, "x", None).summary() == "fp32"
    assert cd.choose(True, "x", {"tower": {"fp32": 0.0, "bf16": 0.0}}).summary() == "fp32"


# -- the probe and its cache ------------------------------------------------------------------------
def test_real_probe_runs_on_tiny_shapes():
    shapes = {"tower": [(8, 16, 24, 1)], "text": [(4, 16, 32, 1), (1, 16, 32, 3)], "lm_head": [(1, 16, 40, 1)]}
    out = cd.probe(shapes, repeats=1)
    assert set(out) == set(shapes)
    assert all(t[d] > 0 for t in out.values() for d in ("fp32", "bf16"))


def test_probe_shapes_follow_the_model_dims():
    from qwenvl_fast.sources import synthetic

    config = synthetic.build_config(synthetic.SYNTHETIC_PRESETS["qwen2.5-vl-3b"], 1)  # published dims, no weights
    shapes = cd.probe_shapes(config)
    assert shapes["tower"] == [(cd.TOWER_ROWS, 1280, 3420, 1)]
    assert shapes["text"] == [(cd.TEXT_PREFILL_ROWS, 2048, 11008, 1), (1, 2048, 11008, cd.TEXT_DECODE_STEPS)]
    assert shapes["lm_head"] == [(1, 2048, cd.LM_HEAD_COLUMNS_CAP, 1)]


def test_probe_runs_once_per_cpu_and_shapes(tmp_path):
    calls = []

    def fake(shapes):
        calls.append(shapes)
        return {p: {"fp32": 1.0, "bf16": 0.5} for p in shapes}

    shapes = {"tower": [(8, 16, 24, 1)]}
    first = cd.cached_probe(shapes, tmp_path, fake)
    assert cd.cached_probe(shapes, tmp_path, fake) == first and len(calls) == 1
    cd.cached_probe({"tower": [(8, 16, 32, 1)]}, tmp_path, fake)  # other shapes: measured again
    assert len(calls) == 2
    stored = json.loads((tmp_path / cd.PROBE_FILE).read_text())
    assert len(stored) == 2 and all(cd.cpu_model_name() in k for k in stored)
    (tmp_path / cd.PROBE_FILE).write_text("{not json")  # a broken file is measured over, not trusted
    assert cd.cached_probe(shapes, tmp_path, fake) == first and len(calls) == 3


# -- threads --------------------------------------------------------------------------------------
def test_threads_go_to_physical_cores_unless_chosen(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        monkeypatch.setattr(cd, "_THREADS_AT_IMPORT", before)
        target = 1 if before != 1 else 2
        assert cd.set_cpu_threads(cores=target).startswith(f"{target} threads (physical cores")
        assert torch.get_num_threads() == target
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert cd.set_cpu_threads(cores=target) == f"{before} threads (OMP_NUM_THREADS is set)"
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(cd, "_THREADS_AT_IMPORT", before + 5)  # someone called set_num_threads since
        assert cd.set_cpu_threads(cores=target) == f"{before} threads (set by the host)"
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


# -- through the loader -----------------------------------------------------------------------------
def _pretend_native(monkeypatch, timings):
    monkeypatch.setattr(cd, "native_bf16", lambda *a, **k: (True, "native bf16 (injected)"))
    monkeypatch.setattr(cd, "probe", lambda shapes, *a, **k: timings)
    monkeypatch.setattr(cd, "set_cpu_threads", lambda *a, **k: "threads untouched (test)")


TOWER_ONLY = {"tower": {"fp32": 1.0, "bf16": 0.3}, "text": {"fp32": 1.0, "bf16": 1.1},
              "lm_head": {"fp32": 1.0, "bf16": 1.4}}


def test_auto_on_this_cpu_without_native_bf16_is_fp32(models_dir):
    if cd.native_bf16()[0]:
        pytest.skip("this CPU computes bf16 natively")
    model = load_tiny(models_dir, "tiny-qwen2.5-vl", dtype="auto")
    assert model.dtype is FP32 and model.visual_dtype is FP32
    assert model.run(tiny_request([torch.rand(64, 64, 3)], monitor=True)).record.dtype == "fp32"


@pytest.mark.parametrize("family", [f for f in ("tiny-qwen2.5-vl", "tiny-qwen3-vl") if f in TINY_FAMILIES])
def test_mixed_model_generates_and_says_so(models_dir, monkeypatch, family):
    _pretend_native(monkeypatch, TOWER_ONLY)
    model = load_tiny(models_dir, family, dtype="auto")
    assert model.visual_dtype is BF16
    assert next(model.model.model.language_model.parameters()).dtype is FP32
    assert model.model.lm_head.weight.dtype is FP32
    result = model.run(tiny_request([torch.rand(80, 100, 3), torch.rand(64, 64, 3)], monitor=True))
    assert len(result.token_ids[0]) == 8
    assert result.record.dtype == "tower bf16, text fp32, lm_head fp32"
    assert "tower bf16, text fp32, lm_head fp32" in result.record.summary_line()
    hit = model.run(tiny_request([torch.rand(80, 100, 3)], monitor=True))  # cached bf16 embeddings too
    assert len(hit.token_ids[0]) == 8


@pytest.mark.parametrize("family", [f for f in ("tiny-qwen2.5-vl", "tiny-qwen3-vl") if f in TINY_FAMILIES])
def test_lm_head_apart_from_the_text_body_generates(models_dir, monkeypatch, family):
    """The other boundary: a bf16 lm_head after an fp32 body (tied embeddings are untied for it)."""
    _pretend_native(monkeypatch, {p: {"fp32": 1.0, "bf16": 0.5 if p == "lm_head" else 2.0} for p in cd.PARTS})
    model = load_tiny(models_dir, family, dtype="auto")
    assert model.model.lm_head.weight.dtype is BF16
    assert model.model.model.language_model.get_input_embeddings().weight.dtype is FP32
    result = model.run(tiny_request([torch.rand(64, 64, 3)], monitor=True))
    assert len(result.token_ids[0]) == 8 and result.record.dtype == "tower fp32, text fp32, lm_head bf16"


# bf16 keeps 8 significant bits: torch.testing's own bf16 tolerance is rtol 1.6e-2. Two random tower blocks and
# the merger compound it; the bound is 5e-2 on the embeddings' relative error (measured here: 0.57e-2 on both).
BF16_EMBEDDING_RTOL = 5e-2


@pytest.mark.parametrize("family", [f for f in ("tiny-qwen2.5-vl", "tiny-qwen3-vl") if f in TINY_FAMILIES])
def test_bf16_tower_stays_within_tolerance_of_fp32(models_dir, monkeypatch, family):
    from qwenvl_fast.perf_monitor import RunMonitor
    from qwenvl_fast.vision.images import canonicalize_image, pixel_values_for

    img = [torch.rand(120, 160, 3)]

    def embeds(model):
        req = ql.GenerationRequest(prompt="x", images=img, image_quality="fast")
        prepared = model._prepare(img, req, None, RunMonitor(enabled=False))
        for p in prepared:
            p.canonical = canonicalize_image(img[p.index])
        pv, grid = pixel_values_for(prepared, model.image_spec, "fast", RunMonitor(enabled=False))
        with torch.inference_mode():
            return [e.embeds.float() for e in model.encode(pv, grid)]

    ref = embeds(load_tiny(models_dir, family, dtype="fp32"))
    _pretend_native(monkeypatch, TOWER_ONLY)
    mixed = embeds(load_tiny(models_dir, family, dtype="auto"))
    for a, b in zip(mixed, ref, strict=True):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < BF16_EMBEDDING_RTOL, f"relative error {rel:.4f}"
        assert rel > 0  # really computed in bf16
