"""The server backend against a misbehaving server (``tests/hostile_server.py``): real sockets, real HTTP.

Cancel tests are structural, not timed: the server stays silent far longer (``silence_s``) than the test's own
guard (``GUARD_S``) and ``server_timeout_s`` is 300 s, so only a working Cancel can end the request in time.
The seconds Cancel took are recorded as a property of the test, never asserted.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import traceback

import pytest
import torch
from hostile_server import NON_UTF8_TEXT, PLAIN_TEXT, REDIRECT_TO, TOKENS, HostileServer

from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.backends import api_key, sse, uploads
from qwenvl_fast.backends import openai_server as sb
from qwenvl_fast.perf_monitor import RunMonitor

GUARD_S = 20.0  # far below the server's silence (120 s) and the 300 s server_timeout_s
SECRET = "sk-hostile-SECRET-4242"


def _options(url: str, **extra) -> ql.LoadOptions:
    return ql.LoadOptions(model="(served)", backend="server", server_url=url, **extra)


def _images(n: int = 1, h: int = 64, w: int = 80, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(h, w, 3, generator=g) for _ in range(n)]


def _request(n: int = 1, **overrides) -> ql.GenerationRequest:
    base = dict(prompt="Describe.", images=_images(n), max_new_tokens=8, image_quality="fast", monitor=False,
                batch_mode=ql.BATCH_MODES[1])
    base.update(overrides)
    return ql.GenerationRequest(**base)


def _run(url: str, request: ql.GenerationRequest | None = None, **options) -> ql.GenerationResult:
    return ql.run_once(_options(url, **options), request or _request())


def _shown(exc: BaseException, caplog) -> str:
    """Everything a user or a log could see of a failure: the formatted chain, every link's args, the logs."""
    parts = traceback.format_exception(type(exc), exc, exc.__traceback__)
    link: BaseException | None = exc
    while link is not None:
        parts.append(repr(link.args))
        link = link.__cause__ or link.__context__
    parts.extend(r.getMessage() for r in caplog.records)
    return "".join(parts)


def _cancel(srv: HostileServer, record_property, answers: int = 1, call=None, arrived: int = 0,
            **options) -> BaseException:
    """Run in a thread, Cancel once the server stalls, and return what the run raised (it must end by itself).

    ``call(should_stop)`` replaces the default run (``run_once`` of ``answers`` answers) when given; Cancel
    waits until the server has received ``arrived`` requests (on a loaded machine a second one may lag)."""
    stop = threading.Event()
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            if call is not None:
                outcome["result"] = call(stop.is_set)
            else:
                outcome["result"] = _run(srv.url, _request(answers, should_stop=stop.is_set), server_timeout_s=300,
                                         **options)
        except BaseException as exc:
            outcome["error"] = exc
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=target, name="cancel-test", daemon=True)
    thread.start()
    assert srv.stalled.wait(GUARD_S), "the server never reached the phase under test"
    waited = time.monotonic() + GUARD_S
    while arrived and len(srv.requests) < arrived and time.monotonic() < waited:
        time.sleep(0.05)
    time.sleep(0.2)  # the client is now blocked in that phase
    cancelled = time.monotonic()
    stop.set()
    thread.join(GUARD_S)
    assert not thread.is_alive(), f"Cancel did not end the request within {GUARD_S}s (the server was silent)"
    record_property("seconds_from_cancel_to_interrupted", round(float(outcome["ended"]) - cancelled, 3))
    assert "error" in outcome, f"the run returned {outcome.get('result')} instead of being interrupted"
    return outcome["error"]  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ the API key
def test_key_is_not_sent_to_an_origin_only_the_workflow_names(monkeypatch):
    monkeypatch.setenv(api_key.API_KEY_ENV, SECRET)
    monkeypatch.delenv(api_key.API_KEY_ORIGINS_ENV, raising=False)
    with HostileServer() as srv:
        assert _run(srv.url).texts == ["".join(TOKENS)]
        assert [path for _, path, _ in srv.requests] == ["/v1/models", "/v1/chat/completions"]
        assert srv.authorizations() == [None, None]  # not even at load (/models)


@pytest.mark.parametrize("listed", ["{origin}", "HTTP://127.0.0.1:{port}/", "https://x.example, {origin}/v1"])
def test_key_is_sent_to_a_listed_origin(monkeypatch, listed):
    with HostileServer() as srv:
        monkeypatch.setenv(api_key.API_KEY_ENV, SECRET)
        monkeypatch.setenv(api_key.API_KEY_ORIGINS_ENV, listed.format(origin=srv.origin, port=srv.port))
        _run(srv.url)
        assert srv.authorizations() == [f"Bearer {SECRET}"] * 2


def test_localhost_is_not_the_same_origin_as_127_0_0_1(monkeypatch):
    with HostileServer() as srv:
        monkeypatch.setenv(api_key.API_KEY_ENV, SECRET)
        monkeypatch.setenv(api_key.API_KEY_ORIGINS_ENV, f"http://localhost:{srv.port}")
        _run(srv.url)
        assert srv.authorizations() == [None, None]


@pytest.mark.parametrize("on", ["models", "chat"])
def test_redirect_is_an_error_naming_the_target_and_never_followed(monkeypatch, on):
    with HostileServer("redirect", on=on) as srv:
        monkeypatch.setenv(api_key.API_KEY_ENV, SECRET)
        monkeypatch.setenv(api_key.API_KEY_ORIGINS_ENV, srv.origin)
        with pytest.raises(sb.ServerError) as err:
            _run(srv.url, server_retries=0)
        message = str(err.value)
        assert "http://evil.example.test:8080" in message and "HTTP 302" in message, message
        assert "never followed" in message and srv.url in message and REDIRECT_TO not in message
        assert len(srv.requests) == (1 if on == "models" else 2)  # nothing went anywhere else


def test_401_from_an_unlisted_origin_names_the_variable_and_the_origin(monkeypatch):
    with HostileServer("unauthorized", on="models") as srv:
        monkeypatch.setenv(api_key.API_KEY_ENV, SECRET)
        monkeypatch.delenv(api_key.API_KEY_ORIGINS_ENV, raising=False)
        with pytest.raises(sb.ServerError) as err:
            _run(srv.url)
        assert f"add {srv.origin} to ${api_key.API_KEY_ORIGINS_ENV}" in str(err.value), str(err.value)
        monkeypatch.setenv(api_key.API_KEY_ORIGINS_ENV, srv.origin)
        with pytest.raises(sb.ServerError, match="refused the API key"):
            _run(srv.url)
        monkeypatch.delenv(api_key.API_KEY_ENV)
        with pytest.raises(sb.ServerError) as err:
            _run(srv.url)
        assert f"set ${api_key.API_KEY_ENV}" in str(err.value) and srv.origin in str(err.value)


@pytest.mark.parametrize("bad", ["\n", "\r", "\u20ac", "\x07", "\x7f"])
def test_key_with_a_character_no_header_can_carry_is_a_clear_error_that_never_shows_it(monkeypatch, caplog, bad):
    key = f"sk-hostile{bad}SECRET-4242"
    caplog.set_level(logging.DEBUG)
    with HostileServer() as srv:
        monkeypatch.setenv(api_key.API_KEY_ENV, key)
        monkeypatch.setenv(api_key.API_KEY_ORIGINS_ENV, srv.origin)
        with pytest.raises(sb.ServerError) as err:
            _run(srv.url)
        assert api_key.API_KEY_ENV in str(err.value) and "cannot be sent in an HTTP header" in str(err.value)
        shown = _shown(err.value, caplog)
        assert "SECRET-4242" not in shown and "sk-hostile" not in shown
        assert srv.requests == []  # refused before anything was sent


@pytest.mark.parametrize("on", ["models", "chat"])
def test_a_status_line_echoing_the_key_never_shows_it(monkeypatch, caplog, on):
    caplog.set_level(logging.DEBUG)
    with HostileServer("echo_auth_status", on=on) as srv:
        monkeypatch.setenv(api_key.API_KEY_ENV, SECRET)
        monkeypatch.setenv(api_key.API_KEY_ORIGINS_ENV, srv.origin)
        with pytest.raises(sb.ServerError) as err:
            _run(srv.url)
        assert "not an HTTP answer" in str(err.value) and srv.url in str(err.value)
        assert srv.authorizations()[-1] == f"Bearer {SECRET}"  # the server did have it to echo
        assert SECRET not in _shown(err.value, caplog)


# ------------------------------------------------------------------------------------------ Cancel
@pytest.mark.parametrize("mode", ["silent_after_connect", "silent_after_headers", "one_token_then_silence", "busy"])
def test_cancel_ends_a_silent_server_in_every_phase(mode, record_property):
    with HostileServer(mode) as srv:
        error = _cancel(srv, record_property)
        assert isinstance(error, ql.GenerationInterrupted), repr(error)


def test_cancel_ends_a_connect_that_hangs(record_property):
    with HostileServer() as srv:
        ql.MANAGER.get(_options(srv.url, server_timeout_s=300))  # loaded; from now on nothing is accepted
        srv.mode = "no_accept"
        assert srv.stalled.wait(GUARD_S)  # the backlog is full before the run starts
        error = _cancel(srv, record_property)
        assert isinstance(error, ql.GenerationInterrupted), repr(error)
        assert [p for _, p, _ in srv.requests] == ["/v1/models"]


@pytest.mark.parametrize("mode", ["no_accept", "silent_after_connect", "silent_after_headers"])
def test_cancel_ends_the_models_call_at_load(mode, record_property):
    with HostileServer(mode, on="models") as srv:
        error = _cancel(srv, record_property)
        assert isinstance(error, ql.GenerationInterrupted), repr(error)
        assert ql.MANAGER.current is None


class _ComfyInterrupt(Exception):
    """Stands for ComfyUI's InterruptProcessingException (ComfyUI is absent in unit tests)."""


@pytest.mark.parametrize("host", ["comfyui", "none"])
@pytest.mark.parametrize("mode", ["no_accept", "silent_after_headers"])
def test_cancel_ends_a_load_model_nodes_models_call(mode, host, monkeypatch, record_property):
    from qwenvl_fast import nodes

    def comfy_raise_interrupt() -> None:
        raise _ComfyInterrupt  # what ComfyUI's throw_exception_if_processing_interrupted does after a Cancel

    if host == "comfyui":
        monkeypatch.setattr(nodes.comfy_glue, "raise_interrupt", comfy_raise_interrupt)
    with HostileServer(mode, on="models") as srv:

        def load(should_stop) -> object:
            monkeypatch.setattr(nodes.comfy_glue, "interrupted", should_stop)  # the node asks ComfyUI's flag
            return nodes.QwenVLFastLoadModel().load(True, model="(served)", backend="server", server_url=srv.url)

        error = _cancel(srv, record_property, call=load)
        assert [p for _, p, _ in srv.requests] == ([] if mode == "no_accept" else ["/v1/models"])
    if host == "comfyui":  # ComfyUI's own exception, so the run ends as interrupted, not failed
        assert isinstance(error, _ComfyInterrupt) and isinstance(error.__context__, ql.GenerationInterrupted)
    else:
        assert isinstance(error, ql.GenerationInterrupted), repr(error)
    assert ql.MANAGER.current is None


def test_cancel_of_several_in_flight_ends_them_all(record_property):
    with HostileServer("one_token_then_silence") as srv:
        error = _cancel(srv, record_property, answers=4, server_max_in_flight=2, arrived=1 + 2)
        assert isinstance(error, ql.GenerationInterrupted), repr(error)
        sent = [(path, headers.get("content-length")) for _, path, headers in srv.requests]
        assert len(sent) == 1 + 2, (sent, srv.events_sent)  # /models, the two in flight; the queued two never went


# ------------------------------------------------------------------------------------------ the deadline
@pytest.mark.parametrize("mode", ["trickle", "silent_after_headers", "silent_after_connect"])
def test_server_timeout_is_a_deadline_for_the_whole_request(mode):
    with HostileServer(mode) as srv:
        with pytest.raises(sb.ServerError) as err:
            _run(srv.url, server_timeout_s=0.5)
        message = str(err.value)
        assert "0.5s" in message and "server_timeout_s" in message and srv.url in message, message


def test_models_call_has_a_deadline_too():
    with HostileServer("trickle", on="models") as srv:
        with pytest.raises(sb.ServerError) as err:
            _run(srv.url, server_timeout_s=0.5)
        assert "/models" in str(err.value) and "server_timeout_s" in str(err.value)


# ------------------------------------------------------------------------------------------ what counts as an answer
@pytest.mark.parametrize("mode", ["no_finish", "no_finish_chunked"])
def test_a_stream_without_a_finish_is_an_error_never_partial_text(mode):
    with HostileServer(mode) as srv:
        with pytest.raises(sb.ServerError) as err:
            _run(srv.url)
        assert "was cut off" in str(err.value) and "after 3 tokens" in str(err.value), str(err.value)


def test_a_plain_json_answer_is_one_completion():
    with HostileServer("plain_json") as srv:
        result = _run(srv.url, _request(monitor=True))
        assert result.texts == [PLAIN_TEXT]
        assert result.record.prompt_tokens == 11 and result.record.new_tokens == 2
        assert result.record.server["finish_reasons"] == ["stop"]


@pytest.mark.parametrize(("mode", "words"), [("invalid_json", "invalid JSON"),
                                             ("json_not_completion", "not a chat completion")])
def test_json_that_is_not_a_completion_is_a_clear_error(mode, words):
    with HostileServer(mode) as srv:
        with pytest.raises(sb.ServerError) as err:
            _run(srv.url)
        assert words in str(err.value) and srv.url in str(err.value)


def test_invalid_utf8_is_replaced_and_no_token_is_dropped():
    with HostileServer("non_utf8") as srv:
        result = _run(srv.url)
        assert result.texts == [NON_UTF8_TEXT]
        assert result.record.new_tokens == 3


def test_an_endless_stream_is_read_up_to_max_new_tokens():
    with HostileServer("endless_stream") as srv:
        result = _run(srv.url, _request(max_new_tokens=8, monitor=True))
        assert result.texts == ["more" * 8]
        assert result.record.new_tokens == 8 and result.record.server["finish_reasons"] == ["length"]
        deadline = time.monotonic() + GUARD_S
        while not srv.events_sent and time.monotonic() < deadline:
            time.sleep(0.05)
        # The server stopped because the client hung up, not because it ran out of events to send.
        assert srv.events_sent and srv.events_sent[0] < srv.max_events


def test_a_huge_event_line_is_refused_at_the_bound():
    with HostileServer("huge_line") as srv:
        with pytest.raises(sb.ServerError) as err:
            _run(srv.url)
        assert str(err.value) == f"The server at {srv.url} sent an event line longer than 1 MiB"


def test_event_lines_split_anywhere_are_read_whole():
    events = b"".join(b'data: {"n": %d}\r\n\r\n' % i for i in range(2000)) + b"data: [DONE]"

    class Pieces:
        def __init__(self, data: bytes, size: int) -> None:
            self.parts = [data[i:i + size] for i in range(0, len(data), size)]

        def read1(self, _n: int) -> bytes:
            return self.parts.pop(0) if self.parts else b""

    for size in (1, 7, 4096):
        got = list(sse.sse_events(Pieces(events, size)))
        assert [e["n"] for e in got[:-1]] == list(range(2000)) and got[-1] is None


# ------------------------------------------------------------------------------------------ /models
def test_a_huge_model_list_makes_a_short_error():
    with HostileServer("huge_models", models_count=300_000) as srv:
        for wanted, words in (("not-served", "… and 299980 more"), ("", "serves 300000 models")):
            with pytest.raises(sb.ServerError) as err:
                _run(srv.url, server_model=wanted)
            assert words in str(err.value) and len(str(err.value)) < 3000, len(str(err.value))


def test_a_never_ending_models_body_is_read_up_to_a_bound():
    with HostileServer("endless_models") as srv:
        with pytest.raises(sb.ServerError, match="sent more than 16 MiB"):
            _run(srv.url)


@pytest.mark.parametrize(("patch", "merge"), [(50000, 2), (0, 2), (-14, 2), (16, 3), (16, 0), ("16", 2),
                                              (True, 2), (14.0, 2)])
def test_a_patch_geometry_no_qwen_model_has_is_refused(patch, merge):
    with HostileServer("bad_patch", patch_size=patch, merge_size=merge) as srv:
        with pytest.raises(sb.ServerError) as err:
            _run(srv.url)
        assert "patch_size" in str(err.value) and srv.url in str(err.value) and "14 or 16" in str(err.value)


@pytest.mark.parametrize("patch", [14, 16])
def test_a_qwen_patch_geometry_is_taken(patch):
    with HostileServer("bad_patch", patch_size=patch, merge_size=2) as srv:
        model, _ = ql.MANAGER.get(_options(srv.url))
        assert (model.patch_size, model.merge_size) == (patch, 2)


@pytest.mark.parametrize(("mode", "words"), [("models_not_json", "did not answer JSON"),
                                             ("id_not_string", "id is not a name (12345)"),
                                             ("data_not_list", "did not list models")])
def test_a_models_answer_that_is_not_a_model_list_is_a_clear_error(mode, words):
    with HostileServer(mode) as srv:
        with pytest.raises(sb.ServerError) as err:
            _run(srv.url)
        assert words in str(err.value) and srv.url in str(err.value), str(err.value)


def test_a_port_out_of_range_is_a_server_error():
    for url in ("http://127.0.0.1:99999/v1", "http://127.0.0.1:0/v1"):
        with pytest.raises(sb.ServerError, match="1 to 65535"):
            ql.MANAGER.get(_options(url))


# ------------------------------------------------------------------------------------------ the upload memo
def test_the_upload_memo_is_bounded_in_bytes(monkeypatch):
    with HostileServer() as srv:
        default = sb.ServerModel(_options(srv.url))
        assert default.uploads.memo.max_bytes == 64 << 20  # the bound a model gets unless told otherwise
        monkeypatch.setattr(uploads, "UPLOAD_MEMO_BYTES", 600_000)  # read when a model loads
        model = sb.ServerModel(_options(srv.url))
        images = _images(6, 256, 256, seed=1)  # noise: each PNG upload is about 260 KB of base64
        for i, image in enumerate(images):
            model.prepare_uploads([image], "native", RunMonitor(enabled=False))
            assert 0 < model.upload_memo_bytes() <= 600_000, (i, model.upload_memo_bytes())
        assert model.uploads.memo.evictions > 0  # the bound was reached, not just respected by chance
        again = model.prepare_uploads(images[-1:], "native", RunMonitor(enabled=False))
        assert again[0]["record"]["cache"] == "client-memo"  # the newest stays
        monkeypatch.setattr(uploads, "UPLOAD_MEMO_BYTES", 100_000)  # smaller than one upload: never memoised
        small = sb.ServerModel(_options(srv.url))
        big = _images(1, 256, 256, seed=2)
        for _ in range(2):
            out = small.prepare_uploads(big, "native", RunMonitor(enabled=False))
            assert out[0]["record"]["cache"] == "encoded" and small.upload_memo_bytes() == 0
        assert out[0]["record"]["upload_bytes"] > 100_000


# ------------------------------------------------------------------------------------------ per-answer errors
@pytest.mark.parametrize(("mode", "words", "timeout"), [("http_400", "HTTP 400", 300),
                                                        ("no_finish", "was cut off", 300),
                                                        ("invalid_json", "invalid JSON", 300),
                                                        ("one_token_then_silence", "server_timeout_s", 1.5)])
def test_one_answer_failing_on_its_own_is_reported_at_its_index(mode, words, timeout):
    with HostileServer(mode, only={1}) as srv:
        request = _request(3, per_answer_errors=True)
        result = _run(srv.url, request, server_max_in_flight=1, server_timeout_s=timeout)
        full = "".join(TOKENS)
        assert result.texts == [full, "", full]
        assert result.errors[0] is None and result.errors[2] is None
        assert words in result.errors[1] and srv.url in result.errors[1], result.errors[1]
    with HostileServer(mode, only={1}) as srv:
        with pytest.raises(sb.ServerError, match=words):  # without per-answer errors the first one raises
            _run(srv.url, _request(3), server_max_in_flight=1, server_timeout_s=timeout)


def test_a_fault_that_hits_every_answer_still_raises_with_per_answer_errors(monkeypatch):
    monkeypatch.delenv(api_key.API_KEY_ENV, raising=False)
    with HostileServer("unauthorized", only={1}) as srv:
        with pytest.raises(sb.ServerError, match="asks for an API key"):
            _run(srv.url, _request(3, per_answer_errors=True), server_max_in_flight=1)


def test_cancel_ends_a_stalled_tls_handshake(record_property):
    class Stalled:  # what _cancel needs of a server: it accepts, then says nothing (the client waits in TLS)
        listener = socket.create_server(("127.0.0.1", 0))
        url = f"https://127.0.0.1:{listener.getsockname()[1]}/v1"
        stalled = threading.Event()
        held: list[socket.socket] = []

    def accept() -> None:
        Stalled.listener.settimeout(GUARD_S)  # bounded: one connection, or nothing within the guard
        try:
            Stalled.held.append(Stalled.listener.accept()[0])
            Stalled.stalled.set()
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        error = _cancel(Stalled, record_property)  # type: ignore[arg-type]
        assert isinstance(error, ql.GenerationInterrupted), repr(error)
    finally:
        for sock in [*Stalled.held, Stalled.listener]:
            sock.close()
        thread.join(5)
