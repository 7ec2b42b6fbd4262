"""Generated schemas (tests/structured_strategies.py) against a REAL llama-server (the pack's own, for a .gguf) and a
REAL vLLM, with random budgets: every answer validates in full (strict JSON and the schema), or the run is a clear
error naming the reason (a budget of 0, an answer cut at max_new_tokens). A handful of examples each: one server
per session (a vLLM start costs minutes on 2 cores); both skip, with the reason, where the server is not built.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from structured_strategies import as_text, schemas

from llama_fixture import MODEL_FOLDER, gguf_root  # noqa: F401 (fixture)
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.core import strict_json
from vllm_server import vllm_server  # noqa: F401  (the session fixture: a real vLLM, or a skip)

FEW = settings(max_examples=4, phases=[Phase.explicit, Phase.reuse, Phase.generate],
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _request(schema: dict, budget: int, seed: int) -> ql.GenerationRequest:
    image = torch.rand(120, 160, 3, generator=torch.Generator().manual_seed(seed))
    # Sampled over the whole vocabulary: greedy decoding of random tied weights keeps picking whitespace.
    return ql.GenerationRequest(prompt="Describe the image as JSON.", images=[image], max_new_tokens=budget,
                                do_sample=True, temperature=1.0, top_p=1.0, top_k=0, seed=seed, monitor=False,
                                output_format="json", json_schema=as_text(schema))


def _validates_or_clear_error(options: ql.LoadOptions, schema: dict, budget: int, seed: int,
                              manager: ql.ModelManager | None = None) -> None:
    try:
        result = ql.run_once(options, _request(schema, budget, seed), manager=manager)
    except ql.QwenVLError as exc:
        message = str(exc)
        # The answer cut or invalid, no budget, or the server refusing the schema with its reason (llama-server
        # 0.3.x: HTTP 400 "unsupported $ref #" for a schema that refers to its own root; vLLM 0.32's xgrammar: "The
        # provided JSON schema contains features not supported by xgrammar", as an error event mid-answer).
        refused = "schema" in message and ("HTTP 400" in message or "not supported" in message)
        assert "is not valid json: the answer" in message or f"max_new_tokens is {budget}:" in message or refused, \
            message
        return
    jsonschema.validate(strict_json.loads(result.texts[0]), schema)


@pytest.fixture(scope="module")
def llama_manager(gguf_root, tmp_path_factory):  # noqa: F811
    import os

    previous = os.environ.get("QWENVL_FAST_MODELS_DIR")
    os.environ["QWENVL_FAST_MODELS_DIR"] = str(gguf_root)
    manager = ql.ModelManager()
    try:
        yield manager
    finally:
        manager.release()
        if previous is None:
            os.environ.pop("QWENVL_FAST_MODELS_DIR", None)
        else:
            os.environ["QWENVL_FAST_MODELS_DIR"] = previous


@FEW
@given(schema=schemas(), budget=st.integers(0, 200), seed=st.integers(0, 5))
def test_llama_server_generated_schemas(llama_manager, schema, budget, seed):
    options = ql.LoadOptions(model=f"{MODEL_FOLDER}/model-f16.gguf")
    assert not ql.needs_local_grammar(options)
    _validates_or_clear_error(options, schema, budget, seed, llama_manager)


@FEW
@given(schema=schemas(), budget=st.integers(0, 200), seed=st.integers(0, 5))
def test_vllm_generated_schemas(vllm_server, schema, budget, seed):  # noqa: F811
    options = ql.LoadOptions(model="(served)", backend="server", server_url=vllm_server.url)
    _validates_or_clear_error(options, schema, budget, seed)
    ql.MANAGER.release()


def test_generated_schemas_are_valid_schemas():
    """The strategy itself: every schema it builds passes the meta-schema and has a finite instance."""
    @settings(max_examples=50)
    @given(schema=schemas())
    def check(schema):
        jsonschema.validators.validator_for(schema).check_schema(schema)
        ql.spec_of(ql.GenerationRequest(prompt="", output_format="json", json_schema=json.dumps(schema)))

    check()
