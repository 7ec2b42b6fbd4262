"""The server backend (backend="server"): clear errors without a server here; the rest against a real vLLM.

The tests that need a server use ``tests/vllm_server.py``'s session fixture: vLLM's CPU build, installed by
``.ci/install_vllm.sh`` into its own venv, serving a tiny random-weight Qwen2.5-VL on 127.0.0.1. They skip
(with the reason) where that venv is absent.
"""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest
import torch

from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.backends import api_key
from qwenvl_fast.backends import openai_server as sb
from qwenvl_fast.backends.http_transport import Endpoint, request_headers
from vllm_server import vllm_server  # noqa: F401  (the session fixture: a real vLLM, or a skip)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def _options(url: str, **extra) -> ql.LoadOptions:
    return ql.LoadOptions(model="(served)", backend="server", server_url=url, **extra)


def _images(n: int, h: int = 200, w: int = 300, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(h, w, 3, generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------------- no server needed
def test_endpoint_parsing_and_refusals():
    assert Endpoint.parse("http://127.0.0.1:8000/v1").url == "http://127.0.0.1:8000/v1"
    assert Endpoint.parse("127.0.0.1:8000").url == "http://127.0.0.1:8000/v1"
    assert Endpoint.parse("https://example.org/").port == 443
    with pytest.raises(sb.ServerError, match="needs server_url"):
        Endpoint.parse("")
    with pytest.raises(sb.ServerError, match="must not carry credentials"):
        Endpoint.parse("http://user:secret@127.0.0.1:8000/v1")
    with pytest.raises(sb.ServerError, match="not an http"):
        Endpoint.parse("ftp://127.0.0.1/v1")
    for bad in ("http://127.0.0.1:99999/v1", "http://127.0.0.1:0/v1", "http://127.0.0.1:port/v1"):
        with pytest.raises(sb.ServerError, match="1 to 65535"):
            Endpoint.parse(bad)
    assert Endpoint.parse("http://[::1]:8000").url == "http://[::1]:8000/v1"


def test_server_down_names_the_url():
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    with pytest.raises(sb.ServerError) as err:
        ql.MANAGER.get(_options(url))
    assert url in str(err.value) and "Start it" in str(err.value)
    assert ql.MANAGER.current is None


def test_api_key_is_redacted_and_sent_only_to_listed_origins(monkeypatch):
    monkeypatch.setenv(api_key.API_KEY_ENV, "sk-do-not-show-0123")
    assert "sk-do-not-show-0123" not in api_key.redact("Bearer sk-do-not-show-0123 refused")
    listed = Endpoint.parse("https://API.example.com/v1")
    assert "Authorization" not in request_headers(listed)  # no origins listed: a workflow's URL alone gets no key
    monkeypatch.setenv(api_key.API_KEY_ORIGINS_ENV, " https://api.example.com:443/ , http://127.0.0.1:8000")
    assert request_headers(listed)["Authorization"] == "Bearer sk-do-not-show-0123"
    assert "Authorization" in request_headers(Endpoint.parse("127.0.0.1:8000"))
    for other in ("http://api.example.com/v1", "https://api.example.com:8443/v1", "http://localhost:8000/v1",
                  "http://127.0.0.1:8001/v1"):
        assert "Authorization" not in request_headers(Endpoint.parse(other)), other
    monkeypatch.delenv(api_key.API_KEY_ENV)
    assert "Authorization" not in request_headers(listed)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ql.QwenVLError, match="Unknown backend"):
        ql.load_model(ql.LoadOptions(model="x", backend="cloud"))


# ------------------------------------------------------------------------------------- against vLLM


def _metric(server, name: str) -> float:
    """Sum of a Prometheus metric's samples in the server's /metrics (0 when it is absent)."""
    total = 0.0
    for line in server.metrics_text().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] == name:
                total += float(value)
    return total


def prefix_cache_hits(server) -> float:
    return _metric(server, "vllm:prefix_cache_hits_total") + _metric(server, "vllm:prefix_cache_hits")


def running_requests(server) -> float:
    return _metric(server, "vllm:num_requests_running")


@pytest.fixture
def served(vllm_server):
    opts = _options(vllm_server.url, server_max_in_flight=4)
    yield opts
    ql.MANAGER.release()


def _run(opts, images, **req):
    base = dict(prompt="Describe.", images=images, max_new_tokens=8, min_new_tokens=8, image_quality="fast",
                batch_mode=ql.BATCH_MODES[1])
    base.update(req)
    return ql.run_once(opts, ql.GenerationRequest(**base))


def test_video_is_refused_with_the_fix_and_the_server_keeps_answering(served):
    from qwenvl_fast.core.api import VideoClip

    with pytest.raises(ql.QwenVLError, match="backend to 'local'"):
        _run(served, [], videos=[VideoClip(torch.rand(4, 64, 64, 3), 8.0)], batch_mode=ql.BATCH_MODES[0])
    assert _run(served, _images(1)).record.new_tokens == 8


def test_text_back_for_an_image(served):
    result = _run(served, _images(1))
    rec = result.record
    assert len(result.texts) == 1 and rec.new_tokens == 8, (result.texts, rec)
    assert rec.prompt_tokens > 0 and rec.images[0]["cache"] == "encoded"
    assert rec.server["url"] == served.server_url and rec.server["requests"] == 1
    assert {"upload", "prefill", "decode"} <= set(rec.stages)


def test_cheaper_preset_lowers_the_prompt_tokens_the_server_counts(served):
    image = _images(1, 900, 1200, seed=1)
    fast = _run(served, image, image_quality="fast").record
    high = _run(served, image, image_quality="high").record
    assert fast.prompt_tokens < high.prompt_tokens, (fast.prompt_tokens, high.prompt_tokens)
    assert fast.images[0]["upload_bytes"] < high.images[0]["upload_bytes"]


def test_same_image_twice_reuses_the_upload_and_the_servers_cache(served, vllm_server):
    image = _images(1, seed=2)
    first = _run(served, image).record
    before = prefix_cache_hits(vllm_server)
    second = _run(served, image, prompt="Describe.").record
    assert second.images[0]["cache"] == "client-memo"
    after = prefix_cache_hits(vllm_server)
    assert after > before, f"the server's prefix cache was not hit again ({before} -> {after})"
    assert first.prompt_tokens == second.prompt_tokens


def test_one_answer_per_image_in_input_order_with_several_in_flight(served):
    # Growing images cost growing prompts: the server's own token counts tell which answer is which.
    images = [_images(1, 100 + 60 * i, 150 + 90 * i, seed=3 + i)[0] for i in range(6)]
    together = _run(served, images, image_quality="native").record
    assert together.server["in_flight"] == 4 and together.server["requests"] == 6
    counts = together.server["prompt_tokens"]
    alone = [_run(served, [img], image_quality="native").record.prompt_tokens for img in images]
    assert counts == alone, "answers came back out of input order"
    assert counts == sorted(counts) and len(set(counts)) == 6, counts


def test_cancel_aborts_the_servers_request(served, vllm_server):
    steps: list[int] = []

    def stop() -> bool:
        return len(steps) > 0 and steps[-1] >= 3

    # Long enough (the server's context is 4096) that a starved client thread still sees it running.
    req = ql.GenerationRequest(prompt="Go on.", images=_images(1, seed=4), max_new_tokens=3800,
                               min_new_tokens=3800, image_quality="fast", should_stop=stop,
                               on_progress=lambda done, total: steps.append(done))
    with pytest.raises(ql.GenerationInterrupted):
        ql.run_once(served, req)
    assert steps and steps[-1] < 3800
    deadline = time.monotonic() + 20
    while running_requests(vllm_server) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_requests(vllm_server) == 0, vllm_server.log_tail()


def test_wrong_model_name_lists_the_served_ones(vllm_server):
    with pytest.raises(sb.ServerError) as err:
        ql.MANAGER.get(_options(vllm_server.url, server_model="no-such-model"))
    assert "no-such-model" in str(err.value) and vllm_server.served_name in str(err.value)


def test_timeout_is_a_clear_error(vllm_server):
    opts = _options(vllm_server.url, server_timeout_s=0.001, server_retries=0)
    with pytest.raises(sb.ServerError) as err:
        _run(opts, _images(1, seed=5))
    message = str(err.value)
    # The deadline's own words (the URL is in every error): its seconds and the setting to raise.
    assert "within the 0.001s deadline" in message and "raise server_timeout_s" in message, message
    assert vllm_server.url in message, message
    ql.MANAGER.release()


def test_api_key_never_shows(vllm_server, monkeypatch, caplog):
    secret = "sk-qwenvl-test-secret-42"
    monkeypatch.setenv(api_key.API_KEY_ENV, secret)
    caplog.set_level(logging.DEBUG)
    opts = _options(vllm_server.url)
    result = _run(opts, _images(1, seed=6))
    shown = [result.record.to_json(), json.dumps(result.texts)]
    with pytest.raises(sb.ServerError) as err:
        ql.MANAGER.get(_options(vllm_server.url, server_model="missing"))
    shown.append(str(err.value))
    shown.extend(r.getMessage() for r in caplog.records)
    assert not [s for s in shown if secret in s]
    ql.MANAGER.release()


def test_nodes_run_with_the_server_backend(vllm_server, monkeypatch):
    from qwenvl_fast import nodes

    out = nodes.QwenVLFastRun().run(
        model="(served)", quantization="none", attention_mode="auto", prompt="Caption.", system_prompt="",
        image_quality="fast", enable_image_cache=True, max_new_tokens=6, do_sample=False, temperature=0.7,
        top_p=0.9, top_k=50, repetition_penalty=1.0, seed=0, batch_mode=ql.BATCH_MODES[1],
        keep_model_loaded=True, image=torch.stack(_images(2, seed=7)), backend="server",
        server_url=vllm_server.url)
    texts, _, timing = out["result"]
    assert len(texts) == 2 and json.loads(timing)["server"]["requests"] == 2
    ql.MANAGER.release()


def test_prompt_too_long_says_what_to_do(served):
    with pytest.raises(sb.ServerError) as err:
        _run(served, _images(1, seed=8), max_new_tokens=8000, min_new_tokens=0)
    message = str(err.value)
    assert "too long" in message and "image_quality" in message, message


def test_tips_for_a_slow_server_and_too_few_in_flight(vllm_server):
    model, _ = ql.MANAGER.get(_options(vllm_server.url, server_max_in_flight=1))
    result = _run(model.options, _images(3, seed=9))
    tips = " ".join(result.record.tips)
    assert "server_max_in_flight" in tips, result.record.tips
    slow = ql.RunMonitor().record
    slow.decode_tokens_per_s = 1.5
    assert any("tokens/s" in t for t in model.tips(slow))
    ql.MANAGER.release()
