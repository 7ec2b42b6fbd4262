"""The timing monitor: every tip rule fires when it should and only then, tips are shown once, stage
accounting on a real (tiny) run adds up, the JSON record round-trips, one summary line per run."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from qwenvl_fast import perf_monitor as pm

GiB = 2**30


def rec(**kw) -> pm.RunRecord:
    base = dict(model="m", family="qwen2_5_vl", device="cuda:0", dtype="bfloat16", attention="sdpa",
                quality="balanced")
    base.update(kw)
    return pm.RunRecord(**base)


def image(cache="miss", preset="ultra", tokens=1024):
    return {"index": 0, "size_in": [1024, 1024], "size_resized": [1024, 1024], "tokens": tokens,
            "preset": preset, "detail_score": None, "cache": cache}


# ---------------------------------------------------------------------------------------------
# Each rule: situations that trigger it and situations that do not
# ---------------------------------------------------------------------------------------------

def _slow(quality="ultra", encode=2.5, preprocess=0.0, images=None):
    images = [image()] if images is None else images
    return pm.TipContext(rec(quality=quality, stages={"encode": encode, "preprocess": preprocess}, images=images))


def _quant(quantization="4-bit", device="cuda:0", total=80 * GiB, bf16=7 * GiB):
    return pm.TipContext(rec(quantization=quantization, device=device), gpu_total_bytes=total, model_bf16_bytes=bf16)


def _decode(speed=5.0, expected=100.0, device="cuda:0", attention="eager"):
    return pm.TipContext(rec(decode_tokens_per_s=speed, device=device, attention=attention),
                         expected_decode_tokens_per_s=expected)


CASES = {
    pm.tip_slow_vision: (
        [_slow(), _slow("high"), _slow("native"), _slow(" Ultra "), _slow(encode=0.6, preprocess=0.6),
         _slow("auto", images=[image(preset="auto->ultra")]),
         _slow(encode=4.0, images=[image(), image(cache="memory"), image(cache="off")])],
        [_slow("balanced", images=[image(preset="balanced")]), _slow("fast", images=[image(preset="fast")]),
         _slow(encode=0.9), _slow(images=[]), _slow(encode=0.0, images=[image(cache="memory")]),
         _slow("auto", images=[image(preset="auto->fast")]),
         _slow(encode=1.9, images=[image(), image(cache="disk"), image()])],  # 0.95 s per missed image
    ),
    pm.tip_zero_hit_rate: (
        [pm.TipContext(rec(), runs_with_cache=pm.MIN_RUNS_FOR_HIT_RATE),
         pm.TipContext(rec(), runs_with_cache=50)],
        [pm.TipContext(rec(), runs_with_cache=pm.MIN_RUNS_FOR_HIT_RATE - 1),
         pm.TipContext(rec(), runs_with_cache=50, hits_with_cache=1), pm.TipContext(rec())],
    ),
    pm.tip_compile_unavailable: (
        [pm.TipContext(rec(), compile_requested=True, compile_unavailable_reason="no triton")],
        [pm.TipContext(rec(), compile_requested=False, compile_unavailable_reason="no triton"),
         pm.TipContext(rec(), compile_requested=True, compile_unavailable_reason=None),
         pm.TipContext(rec(), compile_requested=True, compile_unavailable_reason="")],
    ),
    pm.tip_reloaded_every_run: (
        [pm.TipContext(rec(keep_model_loaded=False), runs=3, loads=3),
         pm.TipContext(rec(keep_model_loaded=False), runs=10, loads=10)],
        [pm.TipContext(rec(keep_model_loaded=True), runs=3, loads=3),
         pm.TipContext(rec(keep_model_loaded=False), runs=2, loads=2),
         pm.TipContext(rec(keep_model_loaded=False), runs=3, loads=2)],
    ),
    pm.tip_quantized_but_fits: (
        [_quant(), _quant("8-bit"), _quant(device="cuda")],
        [_quant("none"), _quant(device="cpu"), _quant(device="mps"), _quant(bf16=70 * GiB), _quant(total=None),
         _quant(bf16=None)],
    ),
    pm.tip_slow_decode: (
        [_decode(), _decode(speed=24.9)],
        [_decode(attention="sdpa"), _decode(attention="flash_attention_2"), _decode(speed=25.0),
         _decode(expected=None), _decode(speed=None), _decode(device="cpu")],
    ),
}


def test_every_rule_has_cases():
    assert set(CASES) == set(pm.TIP_RULES)


@pytest.mark.parametrize("rule", pm.TIP_RULES, ids=lambda r: r.__name__)
def test_rule_triggers(rule):
    ids = set()
    for ctx in CASES[rule][0]:
        found = rule(ctx)
        assert found is not None, ctx
        tip_id, situation, text = found
        assert isinstance(situation, str) and text and "[QwenVL-Fast]" not in text
        ids.add(tip_id)
    assert len(ids) == 1


@pytest.mark.parametrize("rule", pm.TIP_RULES, ids=lambda r: r.__name__)
def test_rule_stays_quiet(rule):
    for ctx in CASES[rule][1]:
        assert rule(ctx) is None, ctx


def test_every_rule_through_the_book():
    """TipBook.tips runs every rule: one context per rule gives exactly that rule's text."""
    for rule, (hits, _) in CASES.items():
        book = pm.TipBook()
        assert book.tips(hits[0]) == [rule(hits[0])[2]]


# ---------------------------------------------------------------------------------------------
# TipBook: once per process unless the situation changes; history counters
# ---------------------------------------------------------------------------------------------

def test_tip_shown_once_until_situation_changes():
    book = pm.TipBook()
    assert len(book.tips(_slow("high"))) == 1
    assert book.tips(_slow("high")) == []
    assert book.tips(_slow("high", encode=9.0)) == []  # same situation, other numbers
    assert len(book.tips(_slow("ultra"))) == 1  # the quality changed
    assert book.tips(_slow("ultra")) == []
    assert book.tips(_slow(" ULTRA")) == []  # the same quality spelt differently
    assert len(book.tips(_slow("high"))) == 1  # changed back: a new situation again

    compile_ctx = pm.TipContext(rec(), compile_requested=True, compile_unavailable_reason="no triton")
    assert len(book.tips(compile_ctx)) == 1
    assert book.tips(compile_ctx) == []
    compile_ctx.compile_unavailable_reason = "CUDA capability 6.1 < 7.0"
    assert len(book.tips(compile_ctx)) == 1


def test_independent_tips_in_one_run():
    book = pm.TipBook()
    ctx = _slow("ultra")
    ctx.compile_requested, ctx.compile_unavailable_reason = True, "no triton"
    assert len(book.tips(ctx)) == 2
    assert book.tips(ctx) == []


def test_zero_hit_rate_after_min_runs_and_not_before():
    book = pm.TipBook()
    miss = rec(images=[image()], model_loaded_this_run=False)
    for n in range(1, pm.MIN_RUNS_FOR_HIT_RATE):
        book.observe(miss, cache_enabled=True)
        assert not [t for t in book.tips(book.context(miss)) if "never hit" in t], n
        book.observe(miss, cache_enabled=False)  # cache off: does not count
        book.observe(rec(images=[], model_loaded_this_run=False), cache_enabled=True)  # no image: does not count
    book.observe(miss, cache_enabled=True)
    assert book.runs_with_cache == pm.MIN_RUNS_FOR_HIT_RATE
    assert [t for t in book.tips(book.context(miss)) if "never hit" in t]
    book.observe(miss, cache_enabled=True)
    assert book.tips(book.context(miss)) == []  # shown once


def test_zero_hit_rate_silent_once_anything_hit():
    book = pm.TipBook()
    book.observe(rec(images=[image()]), cache_enabled=True)
    book.observe(rec(images=[image(cache="disk")]), cache_enabled=True)
    for _ in range(3 * pm.MIN_RUNS_FOR_HIT_RATE):
        book.observe(rec(images=[image()]), cache_enabled=True)
    assert book.hits_with_cache == 1
    assert pm.tip_zero_hit_rate(book.context(rec())) is None


def test_reload_every_run_counts_consecutive_loads():
    book = pm.TipBook()
    loaded = rec(model_loaded_this_run=True, keep_model_loaded=False)
    for _ in range(2):
        book.observe(loaded, cache_enabled=False)
        assert pm.tip_reloaded_every_run(book.context(loaded)) is None
    book.observe(rec(model_loaded_this_run=False, keep_model_loaded=False), cache_enabled=False)  # kept: resets
    for _ in range(2):
        book.observe(loaded, cache_enabled=False)
    assert pm.tip_reloaded_every_run(book.context(loaded)) is None
    book.observe(loaded, cache_enabled=False)
    assert pm.tip_reloaded_every_run(book.context(loaded)) is not None


# ---------------------------------------------------------------------------------------------
# RunMonitor, TokenTimer, RunRecord by hand
# ---------------------------------------------------------------------------------------------

def test_monitor_off_records_nothing():
    mon = pm.RunMonitor(enabled=False)
    with mon.stage("encode"):
        pass
    mon.add("decode", 1.0)
    mon.record.new_tokens = 8
    r = mon.finish()
    assert r.stages == {} and r.decode_tokens_per_s is None


def test_monitor_stages_accumulate():
    mon = pm.RunMonitor()
    for _ in range(2):
        with mon.stage("encode"):
            time.sleep(0.01)
    assert mon.record.stages["encode"] >= 0.02  # two 10 ms sleeps: a lower bound (no ceiling on a shared CPU)
    with pytest.raises(RuntimeError):
        with mon.stage("prefill"):
            raise RuntimeError("boom")
    assert "prefill" in mon.record.stages  # a failing stage is still charged


def test_decode_rate_counts_tokens_after_each_first_token():
    mon = pm.RunMonitor()
    for _ in range(3):  # three answers ("one answer per image"), 8 tokens each
        mon.add("prefill", 0.1)
        mon.add("decode", 0.7)
        mon.record.new_tokens += 8
    r = mon.finish()
    assert r.decode_tokens_per_s == pytest.approx(3 * 7 / 2.1)


def test_token_timer_splits_prefill_and_decode():
    seen = []
    timer = pm.TokenTimer(on_token=seen.append)
    timer.put(torch.zeros(1, 30, dtype=torch.long))  # the prompt
    time.sleep(0.01)
    for _ in range(4):
        timer.put(torch.zeros(1, dtype=torch.long))
        time.sleep(0.005)
    timer.end()
    assert timer.count == 4 and len(seen) == 4
    assert timer.prefill_s >= 0.01 and timer.decode_s >= 0.015


def test_record_json_round_trip_and_summary():
    r = rec(stages={"hash": 0.001, "encode": 0.5, "prefill": 0.2, "decode": 1.0}, total_s=1.8,
            images=[image(), image(cache="memory", preset="auto->fast", tokens=256)], prompt_tokens=1300,
            new_tokens=11, decode_tokens_per_s=10.0, cache_stats={"memory": {"entries": 2}}, tips=["a tip"],
            compile_warmup_s=3.5)
    text = r.to_json()
    assert json.loads(text)["stages"]["encode"] == 0.5
    assert pm.RunRecord.from_json(text) == r
    assert pm.RunRecord(**json.loads(text)) == r
    assert pm.RunRecord.from_json(json.dumps({**json.loads(text), "from_a_newer_version": 1})) == r
    line = r.summary()
    assert line.startswith("[QwenVL-Fast] m ") and "\n" not in line
    assert "2 image(s), 1280 visual tokens, cache 1/2 hit" in line and "10.0 tok/s" in line
    assert "INTERRUPTED" not in line and "INTERRUPTED" in rec(interrupted=True).summary()


def test_report_logs_summary_then_tips(caplog):
    caplog.set_level(logging.INFO, logger="QwenVL-Fast")
    r = rec(tips=["one", "two"])
    pm.report(r)
    messages = [x.getMessage() for x in caplog.records if x.name == "QwenVL-Fast"]
    assert messages == [r.summary(), "[QwenVL-Fast] TIP: one", "[QwenVL-Fast] TIP: two"]


# ---------------------------------------------------------------------------------------------
# A real run on a tiny model
# ---------------------------------------------------------------------------------------------

MISS_STAGES = {"hash", "transfer", "preprocess", "encode", "cache", "prompt", "prefill", "decode"}
HIT_STAGES = {"hash", "prompt", "prefill", "decode"}


def _request(images, **kw):
    from qwenvl_fast import qwenvl_loader as ql

    base = dict(prompt="What is this?", images=images, max_new_tokens=8, min_new_tokens=8, image_quality="fast")
    base.update(kw)
    return ql.GenerationRequest(**base)


def _summaries(caplog):
    return [x.getMessage() for x in caplog.records
            if x.name == "QwenVL-Fast" and x.getMessage().startswith("[QwenVL-Fast] ") and " total " in x.getMessage()]


def _check_accounting(r, expected_stages):
    assert set(r.stages) == expected_stages
    assert all(v >= 0 for v in r.stages.values())
    # Structure, not shares: a wall-clock share of a 10 ms run does not hold on a shared 2-core machine.
    assert sum(r.stages.values()) <= r.total_s + 1e-6
    assert r.stages["decode"] > 0 and r.stages["prefill"] > 0
    assert r.new_tokens == 8
    assert r.decode_tokens_per_s == pytest.approx((r.new_tokens - 1) / r.stages["decode"])


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_stage_accounting_on_a_real_run(models_dir, family, monkeypatch, caplog):
    from qwenvl_fast import qwenvl_loader as ql

    monkeypatch.setattr(ql, "TIPS", pm.TipBook())
    caplog.set_level(logging.INFO, logger="QwenVL-Fast")
    options = ql.LoadOptions(model=str(models_dir / family))
    g = torch.Generator().manual_seed(0)
    first, second = torch.rand(90, 120, 3, generator=g), torch.rand(90, 120, 3, generator=g)

    cold = ql.run_once(options, _request([first])).record  # loads the model: "load" is a stage
    assert cold.model_loaded_this_run
    _check_accounting(cold, MISS_STAGES | {"load"})
    assert [i["cache"] for i in cold.images] == ["miss"]

    miss = ql.run_once(options, _request([second])).record
    _check_accounting(miss, MISS_STAGES)
    assert [i["cache"] for i in miss.images] == ["miss"]

    hit = ql.run_once(options, _request([second])).record
    _check_accounting(hit, HIT_STAGES)
    assert [i["cache"] for i in hit.images] == ["memory"]

    assert _summaries(caplog) == [cold.summary(), miss.summary(), hit.summary()]  # exactly one line per run
    for r in (cold, miss, hit):
        assert json.loads(json.dumps(r.as_dict())) == json.loads(r.to_json())  # all plain JSON, nothing str()-ed
        assert pm.RunRecord.from_json(r.to_json()) == r


def test_decode_rate_with_one_answer_per_image(models_dir):
    from qwenvl_fast import qwenvl_loader as ql

    options = ql.LoadOptions(model=str(models_dir / "tiny-qwen2.5-vl"))
    g = torch.Generator().manual_seed(3)
    req = _request([torch.rand(64, 64, 3, generator=g) for _ in range(2)], batch_mode=ql.BATCH_MODES[1])
    r = ql.run_once(options, req).record
    assert r.new_tokens == 16
    assert r.decode_tokens_per_s == pytest.approx(14 / r.stages["decode"])


def test_monitor_off_on_a_loaded_model(models_dir, monkeypatch, caplog):
    from qwenvl_fast import qwenvl_loader as ql

    monkeypatch.setattr(ql, "TIPS", pm.TipBook())
    options = ql.LoadOptions(model=str(models_dir / "tiny-qwen2.5-vl"))
    ql.MANAGER.get(options)
    caplog.set_level(logging.INFO, logger="QwenVL-Fast")
    result = ql.run_once(options, _request([torch.rand(64, 64, 3)], monitor=False))
    assert result.record.stages == {} and result.record.decode_tokens_per_s is None
    assert result.record.new_tokens == 8
    assert _summaries(caplog) == []


def test_monitor_off_when_the_run_loads_the_model(models_dir, monkeypatch):
    from qwenvl_fast import qwenvl_loader as ql

    monkeypatch.setattr(ql, "TIPS", pm.TipBook())
    options = ql.LoadOptions(model=str(models_dir / "tiny-qwen2.5-vl"))
    result = ql.run_once(options, _request([torch.rand(64, 64, 3)], monitor=False))
    assert result.record.model_loaded_this_run
    assert result.record.stages == {}


def test_decode_bytes_per_token_counts_the_language_model_only(models_dir):
    """The expected decode speed (a tip) divides bandwidth by what one step reads: not the vision tower, and of an
    untied input embedding nothing (one row)."""
    import torch

    from conftest import load_tiny
    from qwenvl_fast.engine import memory as engine

    model = load_tiny(models_dir, "tiny-qwen2.5-vl", dtype="fp32")
    net = model.model
    visual = sum(p.numel() * p.element_size() for p in model.visual.parameters())
    embed = net.get_input_embeddings().weight
    assert net.get_output_embeddings().weight is embed  # the tiny model ties them: the head is read
    assert engine.decode_bytes_per_token(model) == model.param_bytes() - visual
    head = net.get_output_embeddings()
    head.weight = torch.nn.Parameter(embed.detach().clone())  # untied: the input table is only looked up
    try:
        assert engine.decode_bytes_per_token(model) == (model.param_bytes() - visual
                                                        - embed.numel() * embed.element_size())
    finally:
        head.weight = embed
