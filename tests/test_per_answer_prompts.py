"""Per-answer prompts (``GenerationRequest.prompts``): every image asks its own question, at full speed.

On a server they go ``server_max_in_flight`` requests at a time (seen from the server: requests overlap); on the
local engine answers with different prompts share one batched ``generate`` and equal the one-by-one answers; the
GGUF backend (a real llama-server) sends each its own prompt.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from scripted_server import Reply, ScriptedServer, _Handler, first_pixel, prompt_of

from conftest import load_tiny, tiny_request
from llama_fixture import MODEL_FOLDER, gguf_root  # noqa: F401 (fixture)
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.core.api import BATCH_MODES
from qwenvl_fast.core.errors import QwenVLError

EACH = BATCH_MODES[1]


def _solid(value: int) -> torch.Tensor:
    return torch.full((64, 64, 3), value / 255.0)


class Overlap:
    """Counts the chat requests in flight at the server and holds each until ``target`` are in flight together
    (or 5 s passed, a failure bound): concurrency observed server-side, ``most`` at once."""

    def __init__(self, target: int) -> None:
        self.target, self.now, self.most = target, 0, 0
        self.cond = threading.Condition()

    def handler(self):
        overlap = self

        class Counting(_Handler):
            def do_POST(self) -> None:
                with overlap.cond:
                    overlap.now += 1
                    overlap.most = max(overlap.most, overlap.now)
                    overlap.cond.notify_all()
                    overlap.cond.wait_for(lambda: overlap.now >= overlap.target, timeout=5.0)
                try:
                    super().do_POST()
                finally:
                    with overlap.cond:
                        overlap.now -= 1

        return Counting


def _echo(server: ScriptedServer, body: dict) -> Reply:
    return Reply([f"{prompt_of(body)}|{first_pixel(body)[0]}"])


@pytest.fixture
def overlap_server():
    servers = []

    def start(target: int) -> tuple[ScriptedServer, Overlap]:
        script = Overlap(target)
        server = ScriptedServer(_echo)
        server.RequestHandlerClass = script.handler()
        servers.append(server.start())
        return server, script

    yield start
    for server in servers:
        server.stop()


def _server_options(url: str, in_flight: int) -> ql.LoadOptions:
    return ql.LoadOptions(model="(served)", backend="server", server_url=url, server_max_in_flight=in_flight)


def test_server_sends_each_prompt_in_flight_together(overlap_server):
    server, script = overlap_server(4)
    manager = ql.ModelManager()
    prompts = [f"describe {i}" for i in range(8)]
    request = ql.GenerationRequest(prompt="unused", prompts=prompts, images=[_solid(10 * i) for i in range(8)],
                                   batch_mode=EACH, monitor=False, max_new_tokens=8)
    result = ql.run_once(_server_options(server.url, 4), request, manager=manager)
    assert result.texts == [f"describe {i}|{10 * i}" for i in range(8)]  # each answer its own prompt and image
    assert script.most == 4  # overlapped up to server_max_in_flight, never more
    assert sorted(prompt_of(b) for b in server.bodies) == sorted(prompts)
    manager.release()


def test_one_shared_prompt_is_unchanged(overlap_server):
    server, script = overlap_server(3)
    manager = ql.ModelManager()
    request = ql.GenerationRequest(prompt="same", images=[_solid(i) for i in range(3)], batch_mode=EACH,
                                   monitor=False)
    result = ql.run_once(_server_options(server.url, 3), request, manager=manager)
    assert result.texts == [f"same|{i}" for i in range(3)] and script.most == 3
    manager.release()


def test_one_image_with_its_own_prompt(overlap_server):
    server, _ = overlap_server(1)
    manager = ql.ModelManager()
    request = ql.GenerationRequest(prompt="unused", prompts=["only this"], images=[_solid(7)], batch_mode=EACH,
                                   monitor=False)
    assert ql.run_once(_server_options(server.url, 2), request, manager=manager).texts == ["only this|7"]
    manager.release()


@pytest.mark.parametrize("kind", ["count", "mode"])
def test_prompts_that_do_not_fit_the_images_are_refused_with_the_fix(overlap_server, kind):
    server, _ = overlap_server(1)
    manager = ql.ModelManager()
    images = [_solid(1), _solid(2)]
    request = ql.GenerationRequest(prompt="p", prompts=["a"] if kind == "count" else ["a", "b"], images=images,
                                   batch_mode=EACH if kind == "count" else BATCH_MODES[0], monitor=False)
    with pytest.raises(QwenVLError, match="one prompt per image"):
        ql.run_once(_server_options(server.url, 2), request, manager=manager)
    assert server.bodies == []  # refused before anything was sent
    manager.release()


def _watch_generate(model, monkeypatch) -> list[int]:
    rows: list[int] = []
    real = model.model.generate

    def counting(**kwargs):
        rows.append(int(kwargs["input_ids"].shape[0]))
        return real(**kwargs)

    monkeypatch.setattr(model.model, "generate", counting)
    return rows


def test_local_batch_answers_each_prompt_as_one_by_one(models_dir, monkeypatch):
    """Different prompts in one batched generate: each row's greedy tokens are exactly its one-by-one tokens."""
    model = load_tiny(models_dir, "tiny-qwen2.5-vl", dtype="fp32")
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(90, 120, 3, generator=g) for _ in range(3)]
    prompts = ["What is this?", "Name the colours in this picture, please.", "What is this?"]
    common = dict(batch_mode=EACH, max_new_tokens=10, min_new_tokens=10, enable_image_cache=False)
    alone = [model.run(tiny_request([img], prompt=p, **common)).token_ids[0] for img, p in zip(images, prompts)]
    calls = _watch_generate(model, monkeypatch)
    batched = model.run(tiny_request(images, prompt="unused", prompts=prompts, **common))
    assert calls == [3], f"expected one generate call with 3 rows, got {calls}"
    assert batched.token_ids == alone
    shared = model.run(tiny_request(images, prompt=prompts[1], **common))  # the prompt matters: not all ignored
    assert shared.record.prompt_tokens > batched.record.prompt_tokens


def test_gguf_sends_each_answer_its_own_prompt(gguf_root: Path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("QWENVL_FAST_MODELS_DIR", str(gguf_root))
    manager = ql.ModelManager()
    try:
        short, long = "Describe.", "Describe the image in a few words, then list every colour you can see."
        request = ql.GenerationRequest(prompt="unused", prompts=[short, long, short],
                                       images=[torch.rand(64, 64, 3) for _ in range(3)], batch_mode=EACH,
                                       max_new_tokens=2, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                       monitor=False)
        result = ql.run_once(ql.LoadOptions(model=f"{MODEL_FOLDER}/model-f16.gguf"), request, manager=manager)
        counted = result.record.server["prompt_tokens"]  # the server's own count, per answer
        assert counted[0] == counted[2] < counted[1], counted
    finally:
        manager.release()
