"""Structured output on the server backend: the standard request fields, and a REAL vLLM constraining answers.

The vLLM cases use ``tests/vllm_server.py``'s session fixture (one server for the whole session; they skip with
the reason without ``$QWENVL_FAST_VLLM_VENV``). The served tiny Qwen2.5-VL has random weights: a valid answer can
only come from the server's constraint.
"""

from __future__ import annotations

import json

import pytest
import torch
from structured_cases import SCHEMA, SCHEMA_TEXT

from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.backends.streams import chat_body
from qwenvl_fast.captioning import METADATA_NAME, CaptionOptions, caption_folder
from qwenvl_fast.engine import structured
from vllm_server import vllm_server  # noqa: F401  (the session fixture: a real vLLM, or a skip)

jsonschema = pytest.importorskip("jsonschema")

def _request(images, **overrides) -> ql.GenerationRequest:
    base = dict(prompt="Describe the image as JSON.", images=images, max_new_tokens=96, image_quality="fast",
                output_format="json", json_schema=SCHEMA_TEXT, batch_mode=ql.BATCH_MODES[1])
    base.update(overrides)
    return ql.GenerationRequest(**base)


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(120 + 16 * i, 160, 3, generator=g) for i in range(n)]


def test_request_bodies_are_the_standard_fields():
    body = chat_body(_request([], min_new_tokens=8), "m", [])
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": SCHEMA, "strict": True}}
    assert "structured_outputs" not in body  # the standard field only
    assert "min_tokens" not in body and "ignore_eos" not in body  # the grammar decides the end
    tags = chat_body(_request([], output_format="tags"), "m", [])
    assert tags["structured_outputs"] == {"regex": structured.TAGS_REGEX} and "response_format" not in tags
    text = chat_body(_request([], output_format="text"), "m", [])
    assert "response_format" not in text and "structured_outputs" not in text
    empty = chat_body(_request([], json_schema=""), "m", [])
    assert empty["response_format"]["json_schema"]["schema"] == {"type": "object"}


def test_server_backend_refuses_a_broken_schema_before_connecting():
    opts = ql.LoadOptions(model="(served)", backend="server", server_url="http://127.0.0.1:9/v1")
    with pytest.raises(ql.QwenVLError, match="json_schema is not valid JSON"):
        ql.run_once(opts, _request([], json_schema="{oops"))


@pytest.fixture
def served(vllm_server):
    yield ql.LoadOptions(model="(served)", backend="server", server_url=vllm_server.url, server_max_in_flight=4)
    ql.MANAGER.release()


def test_vllm_json_answers_validate(served):
    result = ql.run_once(served, _request(_images(3)))
    assert len(result.texts) == 3
    for text in result.texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert result.record.output_format == "json"
    assert result.record.structured == {"server_field": "response_format"}
    assert all(text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
               for text in result.texts)  # compact


def test_vllm_without_the_constraint_gives_no_valid_json(served):
    result = ql.run_once(served, _request(_images(2), output_format="text", max_new_tokens=48))
    for text in result.texts:
        with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(text), SCHEMA)


def test_vllm_tags_match_the_grammar(served):
    result = ql.run_once(served, _request(_images(2, seed=1), output_format="tags", max_new_tokens=64))
    for text in result.texts:
        assert structured.tags_match(text), text


def test_vllm_answer_cut_by_max_new_tokens_is_a_clear_error(served):
    with pytest.raises(ql.QwenVLError, match="not valid json: the answer is not JSON"):
        ql.run_once(served, _request(_images(1), max_new_tokens=4))


def test_vllm_caption_folder_json_field(served, tmp_path):
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (120, 100 + 20 * i), (30, 60 * i, 90)).save(folder / f"a{i}.png")
    results = caption_folder(served, folder, _request([]), caption=CaptionOptions(write_jsonl=True,
                                                                                 json_field="mood"))
    assert [r.status for r in results] == ["written", "written"], results
    rows = [json.loads(line) for line in (folder / METADATA_NAME).read_text().splitlines()]
    for r, row in zip(results, rows):
        jsonschema.validate(row["json"], SCHEMA)
        assert r.caption == row["text"] == row["json"]["mood"] in SCHEMA["properties"]["mood"]["enum"]
