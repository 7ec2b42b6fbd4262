"""One sampling mapping (core/sampling.py), two forms: transformers' generate arguments from a real tiny model's
``Generator.sampling_kwargs``, and the OpenAI body a real loopback server (tests/hostile_server.py) receives."""

from __future__ import annotations

import pytest
import torch
from hostile_server import HostileServer

from conftest import load_tiny
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.core.sampling import Sampling

FAMILY = "tiny-qwen2.5-vl"
BASE = dict(do_sample=False, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0, min_new_tokens=0,
            max_new_tokens=8, seed=7)
GREEDY_KWARGS = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
SAMPLED = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=50)

# (request settings, generate's arguments, the body's sampling fields): what the two mappings gave before there
# was one, plus the clamps a server refused before (top_p 0, min above max).
CASES = {
    "greedy": ({}, dict(max_new_tokens=8, min_new_tokens=0, **GREEDY_KWARGS),
               dict(max_tokens=8, seed=7, temperature=0.0)),
    "sampling at temperature 0 is greedy": (
        dict(do_sample=True, temperature=0.0), dict(max_new_tokens=8, min_new_tokens=0, **GREEDY_KWARGS),
        dict(max_tokens=8, seed=7, temperature=0.0)),
    "sampling": (
        dict(do_sample=True, repetition_penalty=1.1, min_new_tokens=2, seed=2**64 - 1),
        dict(max_new_tokens=8, min_new_tokens=2, **SAMPLED, repetition_penalty=1.1),
        dict(max_tokens=8, seed=2**63 - 1, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1,
             min_tokens=2)),
    "top_k 0": (
        dict(do_sample=True, top_k=0), dict(max_new_tokens=8, min_new_tokens=0, **{**SAMPLED, "top_k": 0}),
        dict(max_tokens=8, seed=7, temperature=0.7, top_p=0.9)),
    "penalty 1.0 is none": (
        dict(do_sample=True, repetition_penalty=1.0), dict(max_new_tokens=8, min_new_tokens=0, **SAMPLED),
        dict(max_tokens=8, seed=7, temperature=0.7, top_p=0.9, top_k=50)),
    "min equal to max": (
        dict(min_new_tokens=8), dict(max_new_tokens=8, min_new_tokens=8, **GREEDY_KWARGS),
        dict(max_tokens=8, seed=7, temperature=0.0, min_tokens=8, ignore_eos=True)),
    "min above max": (
        dict(min_new_tokens=12), dict(max_new_tokens=8, min_new_tokens=8, **GREEDY_KWARGS),
        dict(max_tokens=8, seed=7, temperature=0.0, min_tokens=8, ignore_eos=True)),
    "top_p 0 is clamped": (
        dict(do_sample=True, top_p=0.0), dict(max_new_tokens=8, min_new_tokens=0, **{**SAMPLED, "top_p": 1e-6}),
        dict(max_tokens=8, seed=7, temperature=0.7, top_p=1e-6, top_k=50)),
}
SAMPLING_FIELDS = {"max_tokens", "seed", "temperature", "top_p", "top_k", "repetition_penalty", "min_tokens",
                   "ignore_eos"}


def _request(**settings) -> ql.GenerationRequest:
    return ql.GenerationRequest(prompt="Describe.", monitor=False, **{**BASE, **settings})


@pytest.mark.parametrize("case", list(CASES))
def test_generate_arguments(case, models_dir):
    settings, kwargs, _ = CASES[case]
    model = load_tiny(models_dir, FAMILY)
    req = _request(**settings)
    assert model.generation.sampling_kwargs(req, 8) == kwargs
    assert torch.initial_seed() == req.seed % 2**63  # seeded for this call


def test_generate_arguments_follow_a_shortened_cap(models_dir):
    """The local engine shortens max_new_tokens to fit the context: min_new_tokens follows it down."""
    model = load_tiny(models_dir, FAMILY)
    kwargs = model.generation.sampling_kwargs(_request(min_new_tokens=8), 5)
    assert (kwargs["max_new_tokens"], kwargs["min_new_tokens"]) == (5, 5)


def test_the_server_body():
    with HostileServer() as srv:
        options = ql.LoadOptions(model="(served)", backend="server", server_url=srv.url)
        for case, (settings, _, fields) in CASES.items():
            result = ql.run_once(options, _request(**settings))
            assert result.texts[0], case
            body = srv.bodies[-1]
            assert {k: v for k, v in body.items() if k in SAMPLING_FIELDS} == fields, case
            assert body["stream"] is True and body["messages"][-1]["content"][-1]["text"] == "Describe."


def test_one_mapping_for_both():
    s = Sampling.from_request(_request(do_sample=True, top_p=1.5, repetition_penalty=-1.0, min_new_tokens=-3))
    assert (s.greedy, s.top_p, s.repetition_penalty, s.min_new_tokens, s.fixed_length) == (False, 1.0, 1e-3, 0,
                                                                                           False)
    assert Sampling.from_request(_request(min_new_tokens=20), max_new_tokens=4).min_new_tokens == 4
