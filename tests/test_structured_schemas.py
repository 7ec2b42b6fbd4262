"""Structured output as a guarantee, over generated schemas (the README's feature list) and the edge cases of
issue 28: every answer validates in full, or the run is a clear error naming the reason.

Local runs use two tiny families and a copy of one whose generation_config.json names no stop token. The schema,
budget and answer checks here need no model; the model runs use random weights, so a valid answer can only come
from the constraint.
"""

from __future__ import annotations

import json
import re
import shutil

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from structured_strategies import as_text, schemas

from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.core import strict_json
from qwenvl_fast.engine import structured, structured_check
from qwenvl_fast.engine.structured import OutputSpec, parse_output_spec, validate_answer

FAMILIES = ["tiny-qwen2.5-vl", "tiny-qwen3.5", "no-stop-token"]
NO_STOP_FROM = "tiny-qwen2.5-vl"
BUDGET_REFUSAL = re.compile(r"max_new_tokens is (-?\d+)(?: but the shortest complete answer .* takes (\d+) tokens"
                            r"|: an answer of output_format)")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The two tiny families, and a copy of one whose generation config names no stop token (as some fine-tunes
    and merges ship): its tokenizer still has <|im_end|>."""
    from qwenvl_fast.sources import synthetic

    base = tmp_path_factory.mktemp("LLM-structured")
    for name in FAMILIES[:2]:
        synthetic.save_synthetic(f"synthetic:{name}", base / name)
    shutil.copytree(base / NO_STOP_FROM, base / "no-stop-token")
    config_path = base / "no-stop-token" / "generation_config.json"
    config = json.loads(config_path.read_text())
    config.pop("eos_token_id", None)
    config_path.write_text(json.dumps(config))
    return base


def _request(**overrides) -> ql.GenerationRequest:
    g = torch.Generator().manual_seed(overrides.pop("seed_image", 0))
    base = dict(prompt="Describe the image as JSON.", images=[torch.rand(48, 56, 3, generator=g)],
                max_new_tokens=96, image_quality="fast", monitor=False, output_format="json")
    base.update(overrides)
    return ql.GenerationRequest(**base)


def _strictly_valid(text: str, schema: dict) -> None:
    value = strict_json.loads(text)
    jsonschema.validate(value, schema)


def _run_or_reason(folder, request) -> tuple[str | None, str | None]:
    try:
        return ql.run_once(ql.LoadOptions(model=str(folder)), request).texts[0], None
    except ql.QwenVLError as exc:
        return None, str(exc)


# -- generated schemas on the local backend --------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=8, phases=[Phase.explicit, Phase.reuse, Phase.generate],  # each example runs a model:
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # no shrinking
@given(schema=schemas(), budget=st.integers(0, 160), sample=st.booleans(), seed=st.integers(0, 3))
def test_generated_schemas_validate_or_fail_clearly(folders, family, schema, budget, sample, seed):
    request = _request(json_schema=as_text(schema), max_new_tokens=budget, do_sample=sample, seed=seed)
    text, reason = _run_or_reason(folders / family, request)
    if reason is None:
        _strictly_valid(text, schema)
        return
    refused = BUDGET_REFUSAL.search(reason)
    assert refused, f"not a clear budget refusal: {reason}"
    assert int(refused.group(1)) == budget
    need = refused.group(2)
    if need is not None:  # the figure given is enough: at exactly that budget the answer is complete and valid
        assert int(need) > budget
        text, reason = _run_or_reason(folders / family, _request(json_schema=as_text(schema),
                                                                 max_new_tokens=int(need), seed=seed))
        assert reason is None, reason
        _strictly_valid(text, schema)
    else:
        assert budget < 1


@pytest.mark.parametrize("family", FAMILIES)
def test_tags_on_every_folder(folders, family):
    text, reason = _run_or_reason(folders / family, _request(output_format="tags", max_new_tokens=60))
    assert reason is None, reason
    assert structured.tags_match(text), text


# -- the schemas issue 28 found refused for a wrong reason ---------------------------------------------
COMMON = [
    {"type": "object", "properties": {"Caption": {"type": "string", "maxLength": 20}}, "required": ["Caption"]},
    {"type": "object", "properties": {"imageDescription": {"type": "string", "maxLength": 10}},
     "required": ["imageDescription"]},
    {"type": "object", "properties": {"answer": {"enum": ["Yes", "No"]}}, "required": ["answer"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["code"]},
]


@pytest.mark.parametrize("schema", COMMON, ids=["Caption", "camelCase", "enum-Yes-No", "pattern-A-Z"])
def test_common_schemas_work_at_a_small_budget(folders, schema):
    text, reason = _run_or_reason(folders / "tiny-qwen2.5-vl", _request(json_schema=json.dumps(schema),
                                                                         max_new_tokens=48))
    assert reason is None, reason
    _strictly_valid(text, schema)


def test_recursive_schema_figure_is_its_smallest_answer(folders):
    """{"kids":[]} is the smallest answer: the figure is its length in tokens plus the stop token, and that
    budget gives a valid answer while one less is refused."""
    schema = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}},
              "required": ["kids"]}
    folder = folders / "tiny-qwen2.5-vl"
    _, reason = _run_or_reason(folder, _request(json_schema=json.dumps(schema), max_new_tokens=2))
    need = int(BUDGET_REFUSAL.search(reason).group(2))
    model = ql.MANAGER.current
    smallest = len(model.processor.tokenizer.encode('{"kids":[]}', add_special_tokens=False)) + 1
    assert need <= smallest
    text, reason = _run_or_reason(folder, _request(json_schema=json.dumps(schema), max_new_tokens=need))
    assert reason is None, reason
    _strictly_valid(text, schema)
    _, reason = _run_or_reason(folder, _request(json_schema=json.dumps(schema), max_new_tokens=need - 1))
    assert reason and BUDGET_REFUSAL.search(reason)


@pytest.mark.parametrize("budget", [0, -1])
@pytest.mark.parametrize("backend", ["local", "server"])
def test_no_budget_is_refused_on_every_backend(folders, budget, backend):
    options = (ql.LoadOptions(model=str(folders / "tiny-qwen2.5-vl")) if backend == "local" else
               ql.LoadOptions(model="(served)", backend="server", server_url="http://127.0.0.1:9/v1"))
    for fmt in ("json", "tags"):
        with pytest.raises(ql.QwenVLError, match=f"max_new_tokens is {budget}: an answer of output_format {fmt}"):
            ql.run_once(options, _request(output_format=fmt, max_new_tokens=budget))
    assert ql.MANAGER.current is None  # refused before any model work


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "required": ["next"]}},
     "$ref": "#/$defs/n"},
    {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}, "minItems": 1}},
     "required": ["kids"]},
    {"type": "object", "properties": {"x": {"anyOf": [{"$ref": "#"}, {"$ref": "#/properties/x"}]}},
     "required": ["x"]},
])
def test_schema_with_no_finite_instance_is_a_clear_error(schema):
    with pytest.raises(ql.QwenVLError, match="no finite instance"):
        parse_output_spec("json", json.dumps(schema), need_grammar=True)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"$ref": "#"}}},
    {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}, "required": ["kids"]},
    {"type": "object", "properties": {"x": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["x"]},
])
def test_recursive_schemas_with_a_finite_instance_are_accepted(schema):
    assert structured_check.no_finite_instance(schema) is None
    parse_output_spec("json", json.dumps(schema), need_grammar=True)


# -- answers: strict JSON and the schema, for every backend's answers --------------------------------------
@pytest.mark.parametrize("text, words", [
    ('{"score": NaN}', "NaN is not JSON"),
    ('{"score": Infinity}', "Infinity is not JSON"),
    ('{"score": -Infinity}', "Infinity is not JSON"),
    ('{"score": 1e400}', "out of range"),
    ("[" * 100 + "]" * 100, "nested deeper"),
    ('{"score": ' + "1" * 100 + "}", "longer than"),
    ('{"score": 1', "not strict JSON"),
    ("", "not strict JSON"),
])
def test_answers_that_are_not_strict_json_are_refused(text, words):
    value, why = validate_answer(text, OutputSpec("json", {"type": ["object", "array"]}))
    assert value is None and words in why


@pytest.mark.parametrize("schema, text", [
    ({"type": "object", "properties": {"score": {"type": "integer"}}}, '{"score": "high"}'),
    ({"type": "object"}, "[1,2]"),
    ({"type": "object", "properties": {"c": {"enum": ["Yes", "No"]}}}, '{"c": "yes"}'),
    ({"type": "object", "additionalProperties": False, "patternProperties": {"^x": {"type": "integer"}}},
     '{"y": 1}'),
    ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}}, '{"xa": "s"}'),
])
def test_answers_against_the_schema_are_checked(schema, text):
    _, why = validate_answer(text, parse_output_spec("json", json.dumps(schema)))
    assert why and "does not match json_schema" in why


def test_a_schema_that_is_not_a_schema_is_refused():
    with pytest.raises(ql.QwenVLError, match="not a valid JSON Schema"):
        parse_output_spec("json", '{"type": "nope"}')
    with pytest.raises(ql.QwenVLError, match="not valid JSON"):
        parse_output_spec("json", '{"type": "object", "maximum": NaN}')


def test_normalized_answers_are_strict_json():
    text = structured.normalize_json('{"a": "x\ty", "b": 1.5}')
    assert strict_json.loads(text) == {"a": "x\ty", "b": 1.5}


# -- patterns: bounded time, and Cancel can interrupt ------------------------------------------------------
HOSTILE = "^(a|a?)+$"  # exponential backtracking in Python's re on "a" * n + "b"


def test_catastrophic_pattern_is_bounded_and_leaves_the_process_responsive(monkeypatch):
    """The bound is the mechanism, not a stopwatch: every match runs under the regex module's timeout with the GIL
    released (``concurrent``), and a match that hits it refuses the answer naming the pattern."""
    spec = parse_output_spec("json", json.dumps({"type": "object", "properties": {"s": {"pattern": HOSTILE}}}))
    answer = json.dumps({"s": "a" * 40 + "b"})
    import regex

    calls = []
    search = regex.search

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return search(*args, **kwargs)

    monkeypatch.setattr(regex, "search", spy)  # structured_check imports regex when it checks
    _, why = validate_answer(answer, spec)
    assert why is not None  # no match, or too long to check: either way not accepted
    assert calls and all(c.get("timeout") == structured_check.PATTERN_TIMEOUT_S and c.get("concurrent") is True
                         for c in calls), calls
    monkeypatch.setattr(structured_check, "PATTERN_TIMEOUT_S", 1e-9)  # every match now runs out of time
    _, why = validate_answer(answer, spec)
    assert why is not None and "took more than" in why and HOSTILE in why and "simplify the pattern" in why


def test_cancel_interrupts_the_pattern_check():
    spec = parse_output_spec("json", json.dumps({"type": "object", "properties": {"s": {"pattern": "^a+$"}}}))
    with pytest.raises(ql.GenerationInterrupted):
        validate_answer(json.dumps({"s": "aaa"}), spec, should_stop=lambda: True)


def test_a_pattern_that_does_not_compile_is_refused_before_any_model_work():
    with pytest.raises(ql.QwenVLError, match="not a valid regular expression|is not a 'regex'"):
        parse_output_spec("json", json.dumps({"type": "object", "properties": {"s": {"pattern": "(unclosed"}}}))


# -- GGUF needs nothing local ------------------------------------------------------------------------------
def test_gguf_and_server_need_no_local_grammar():
    assert not ql.needs_local_grammar(ql.LoadOptions(model="some/model-Q4_K_M.gguf"))
    assert not ql.needs_local_grammar(ql.LoadOptions(model="(served)", backend="server"))
    assert ql.needs_local_grammar(ql.LoadOptions(model="Qwen2.5-VL-3B-Instruct"))


def test_closing_path_uses_the_whole_vocabulary(folders):
    """Characters outside any fixed alphabet (capitals, other punctuation, another script) are reached through the
    real vocabulary's tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders / "tiny-qwen2.5-vl")
    schema = {"type": "object", "properties": {"K": {"const": "Zürich!"}, "Q": {"pattern": "^[A-Z]{2}$"}},
              "required": ["K", "Q"]}
    compiled = structured.CONSTRAINTS.get(tokenizer, len(tokenizer), {tokenizer.eos_token_id},
                                          parse_output_spec("json", json.dumps(schema), need_grammar=True))
    assert compiled.min_new_tokens is not None
