"""Tests of the vLLM test infrastructure (tests/vllm_server.py) against a REAL vLLM server.

One server for the session (fixture ``vllm_server``): vLLM's CPU build from ``.ci/install_vllm.sh``
(its own venv, ``$QWENVL_FAST_VLLM_VENV``, default ``.ci-work/vllm-venv``), serving a tiny
random-weight Qwen2.5-VL written at test time. These are what the pack's OpenAI-compatible server
backend will rely on: the served name, images as base64 data URLs, fixed-length answers
(``ignore_eos``), the server's own image-token count, streaming, and aborting on disconnect.
The ``vllm``-marked tests skip (with the reason) without that venv; the helper's own lifecycle
tests at the end need no vLLM.

    .ci/install_vllm.sh && pytest -m vllm tests/test_vllm_server.py -rs
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import select
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_server import (  # noqa: F401 (vllm_server: the session fixture, used by name)
    INSTALL_MARKER,
    VllmServer,
    metric_value,
    vllm_missing_reason,
    vllm_server,
)

vllm = pytest.mark.vllm

FACTOR = 28  # Qwen2.5-VL: patch 14 x merge 2; one image token per 28x28 pixels


def png_data_url(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(width: int, height: int, text: str = "What is in this image?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(width, height)}},
                {"type": "text", "text": text},
            ],
        }
    ]


def open_stream(server: VllmServer, body: dict, timeout: float = 60.0):
    """POST a streamed chat completion; returns (connection, response) with the headers read."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    payload = {"model": server.served_name, "stream": True, **body}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(payload), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        text = resp.read().decode("utf-8", "replace")
        conn.close()
        raise AssertionError(f"HTTP {resp.status}: {text[:2000]}")
    return conn, resp


def sse_events(resp: http.client.HTTPResponse) -> Iterator[dict]:
    """The JSON payloads of a server-sent-event stream, until ``data: [DONE]``."""
    while True:
        line = resp.readline()
        if not line:
            raise AssertionError("stream ended without data: [DONE]")
        line = line.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments
        data = line.removeprefix(b"data:").strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


# ----------------------------------------------------------------- against a real server
@vllm
def test_models_lists_served_name(vllm_server: VllmServer) -> None:
    assert vllm_server.url == f"http://127.0.0.1:{vllm_server.port}/v1"
    assert vllm_server.served_name in vllm_server.models()


@vllm
def test_chat_with_image_gives_fixed_length_answer(vllm_server: VllmServer) -> None:
    answer = vllm_server.chat(image_message(224, 224), max_tokens=8, ignore_eos=True, temperature=0)
    choice = answer["choices"][0]
    assert answer["model"] == vllm_server.served_name
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 8
    # Greedy decoding of a fixed model is deterministic: the same request gives the same text.
    again = vllm_server.chat(image_message(224, 224), max_tokens=8, ignore_eos=True, temperature=0)
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]


@vllm
def test_prompt_tokens_count_the_image_tokens(vllm_server: VllmServer) -> None:
    """The server's own processor counts image tokens: one per 28x28 pixels for Qwen2.5-VL."""

    def prompt_tokens(side: int) -> int:
        answer = vllm_server.chat(image_message(side, side), max_tokens=1, temperature=0)
        return answer["usage"]["prompt_tokens"]

    big, small = prompt_tokens(224), prompt_tokens(112)
    assert small < big
    assert big - small == (224 // FACTOR) ** 2 - (112 // FACTOR) ** 2  # 64 - 16 image tokens


@vllm
def test_streaming_yields_chunks(vllm_server: VllmServer) -> None:
    body = {
        "messages": image_message(112, 112),
        "max_tokens": 8,
        "ignore_eos": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    conn, resp = open_stream(vllm_server, body)
    try:
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        events = list(sse_events(resp))
    finally:
        conn.close()
    chunks = [e for e in events if e.get("choices")]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert isinstance(text, str)
    content_chunks = [c for c in chunks if c["choices"][0]["delta"].get("content") is not None]
    assert len(content_chunks) >= 2  # arrives in pieces, not in one block
    usage = [e["usage"] for e in events if e.get("usage")]
    assert usage and usage[-1]["completion_tokens"] == 8


@vllm
def test_closing_a_stream_aborts_the_request(vllm_server: VllmServer) -> None:
    """A client that hangs up stops the generation: the server never finishes the answer."""
    max_tokens = 4000  # near max-model-len: about 9 s of decoding on 2 idle cores, to be cut short

    def finished_by_length(metrics: str) -> float:
        return metric_value(metrics, "vllm:request_success_total", {"finished_reason": "length"})

    before = vllm_server.metrics_text()
    body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": max_tokens, "ignore_eos": True}
    conn, resp = open_stream(vllm_server, body)
    try:
        events = sse_events(resp)
        for _ in range(5):
            next(events)
        running = vllm_server.metric("vllm:num_requests_running")
    finally:
        conn.close()
    closed = time.monotonic()
    assert running == 1, f"the streamed request was not running ({running})"
    # Either way the request ends (aborted, or by length after about 9 s); what tells the two apart is below,
    # in the server's own counters, not in how long it took. The bound only keeps a hung server from hanging CI.
    hang_guard = time.monotonic() + 600
    while vllm_server.metric("vllm:num_requests_running") != 0:
        assert time.monotonic() < hang_guard, f"the request neither ended nor aborted:\n{vllm_server.log_tail()}"
        time.sleep(0.05)
    stopped_after = time.monotonic() - closed
    after = vllm_server.metrics_text()
    generated = metric_value(after, "vllm:generation_tokens_total") - metric_value(
        before, "vllm:generation_tokens_total"
    )
    assert finished_by_length(after) == finished_by_length(before), "the request ran to max_tokens: not aborted"
    assert 0 < generated < max_tokens, f"{generated} tokens; stopped {stopped_after:.2f} s after the client left"
    print(f"aborted after {generated:.0f} of {max_tokens} tokens, idle {stopped_after:.2f} s after the client left")


@vllm
def test_server_health_and_log(vllm_server: VllmServer) -> None:
    assert vllm_server.alive() and vllm_server.healthy()
    assert vllm_server.start_seconds is not None and vllm_server.start_seconds > 0
    assert "Starting vLLM server" in vllm_server.log_tail(10**7)
    print(f"vLLM answered /health {vllm_server.start_seconds:.1f} s after launch (-rP shows this)")


# ----------------------------------------------------------------- the helper itself (no vLLM needed)
def fake_venv(root: Path, script: str, complete: bool = True) -> Path:
    """A venv whose bin/python is a shell script standing in for vLLM."""
    venv = root / "fake-venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\n" + script)
    python.chmod(0o755)
    if complete:
        (venv / INSTALL_MARKER).write_text("fake\n")
    return venv


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")  # a zombie waiting for init to reap it has already exited


def test_missing_reason_names_the_install_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENVL_FAST_VLLM_VENV", str(tmp_path / "nowhere"))
    reason = vllm_missing_reason()
    assert reason is not None and "install_vllm.sh" in reason and "nowhere" in reason
    half = fake_venv(tmp_path, "exit 0\n", complete=False)
    assert "incomplete" in (vllm_missing_reason(half) or "")
    assert vllm_missing_reason(fake_venv(tmp_path / "b", "exit 0\n")) is None


def test_start_raises_with_the_log_tail_when_the_server_dies(tmp_path: Path) -> None:
    venv = fake_venv(tmp_path, 'echo "fake vllm refuses: $*"\nexit 3\n')
    server = VllmServer(tmp_path / "model", venv=venv, log_path=tmp_path / "server.log")
    with pytest.raises(RuntimeError, match=r"exited with code 3(.|\n)*fake vllm refuses: -m vllm.entrypoints"):
        server.start(timeout=30)
    assert not server.alive()


def test_timeout_stops_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    venv = fake_venv(tmp_path, f'sleep 300 &\necho $! > "{pid_file}"\nwait\n')
    server = VllmServer(tmp_path / "model", venv=venv, log_path=tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="did not answer /health within"):
        server.start(timeout=2)
    assert server.proc is None
    child = int(pid_file.read_text())
    # stop() SIGKILLs the whole process group; the child then exits once the signal is delivered. Wait for that
    # exit as an event (a pidfd becomes readable when the process exits); a child that stop() missed would
    # sleep on for 300 s, far past the bound, which only keeps a broken stop() from hanging CI.
    try:
        pidfd = os.pidfd_open(child)
    except ProcessLookupError:
        pidfd = None  # already gone and reaped
    if pidfd is not None:
        try:
            readable, _, _ = select.select([pidfd], [], [], 120)
        finally:
            os.close(pidfd)
        assert readable, f"the server's child {child} outlived stop()"
    assert process_gone(child)
    server.stop()  # a second stop is harmless
