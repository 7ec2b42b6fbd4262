"""How a server's answer ended (GenerationResult.endings): only finish_reason "stop" is complete.

A scripted loopback server (tests/scripted_server.py) answers each finish_reason, a bare [DONE] and a dropped
stream over real HTTP; the property test feeds random event sequences to the real stream reader.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scripted_server import Reply, ScriptedServer, first_pixel

from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.backends import openai_server as sb
from qwenvl_fast.backends.faults import Faults
from qwenvl_fast.backends.http_transport import Endpoint
from qwenvl_fast.backends.streams import Stream, StreamRunner, ending_of_finish
from qwenvl_fast.core.api import ABORTED, CANCELLED, COMPLETE, CUT, FAILED, FILTERED, THINKING_OPEN
from qwenvl_fast.perf_monitor import RunRecord

WORDS = ["The", " cat", " sits", " on", " the", " mat", "."]


def _solid(level: int) -> torch.Tensor:
    return torch.full((32, 32, 3), level / 255.0)


def _request(n: int = 1, **overrides) -> ql.GenerationRequest:
    base = dict(prompt="Describe.", images=[_solid(i) for i in range(n)], max_new_tokens=16, image_quality="fast",
                monitor=True, batch_mode=ql.BATCH_MODES[1])
    base.update(overrides)
    return ql.GenerationRequest(**base)


def _serve(replies: list[Reply]) -> ScriptedServer:
    """A server answering image k (its solid level k) with ``replies[k]``."""
    return ScriptedServer(lambda _srv, body: replies[first_pixel(body)[0]]).start()


def _run(server: ScriptedServer, request: ql.GenerationRequest) -> ql.GenerationResult:
    options = ql.LoadOptions(model="(served)", backend="server", server_url=server.url, server_max_in_flight=2)
    return ql.run_once(options, request)


@pytest.mark.parametrize(("reply", "ending", "words"), [
    (Reply(WORDS), COMPLETE, None),
    (Reply(WORDS, finish_reason="length"), CUT, "was cut at max_new_tokens=16: raise max_new_tokens"),
    (Reply(WORDS, finish_reason="abort"), ABORTED, "finish_reason 'abort'"),
    (Reply(WORDS, finish_reason="content_filter"), FILTERED, "content filter"),
    (Reply(WORDS, finish_reason="tool_calls_or_whatever"), ABORTED, "finish_reason 'tool_calls_or_whatever'"),
    (Reply(WORDS, finish_reason=None), ABORTED, "[DONE] and no finish_reason"),
    (Reply(["<think>", "hmm"], finish_reason="length"), THINKING_OPEN, "still reasoning"),
])
def test_each_finish_reason_gives_its_ending_and_a_warning(reply, ending, words):
    server = _serve([reply])
    try:
        result = _run(server, _request())
    finally:
        server.stop()
    assert result.endings == [ending] and result.ending_of(0) == ending
    assert result.is_complete(0) == (ending == COMPLETE)
    record = RunRecord.from_json(result.record.to_json())  # the timing record carries it as JSON too
    assert record.endings == [ending]
    if words is None:
        assert result.texts == ["".join(WORDS)] and not record.warnings
    else:
        assert any(words in w for w in record.warnings), record.warnings
        assert ending.replace("_", " ") in record.summary_line()


def test_a_dropped_stream_raises_or_is_that_answers_aborted_error():
    replies = [Reply(WORDS), Reply(WORDS[:2], finish_reason=None, done=False), Reply(WORDS, finish_reason="length")]
    server = _serve(replies)
    try:
        with pytest.raises(sb.ServerError, match="was cut off"):
            _run(server, _request(3))  # never partial text as if it were an answer
        result = _run(server, _request(3, per_answer_errors=True))
    finally:
        server.stop()
    assert result.endings == [COMPLETE, ABORTED, CUT]
    assert [result.is_complete(i) for i in range(3)] == [True, False, False]
    assert result.texts[1] == "" and "cut off" in result.errors[1]
    warnings = result.record.warnings
    assert any(w.startswith("answer 2 of 3 was aborted by the server") for w in warnings), warnings
    assert "answer 3 of 3 was cut at max_new_tokens=16: raise max_new_tokens" in warnings


def test_the_readers_own_cap_cuts_even_when_the_server_then_says_stop():
    server = _serve([Reply(WORDS)])  # seven tokens, then "stop"
    try:
        cut = _run(server, _request(max_new_tokens=3))
        exact = _run(server, _request(max_new_tokens=len(WORDS)))  # the stop arrives right at the cap
    finally:
        server.stop()
    assert cut.endings == [CUT] and cut.texts == ["The cat sits"]
    assert exact.endings == [COMPLETE] and exact.texts == ["".join(WORDS)]


def test_a_json_answer_without_a_finish_reason_is_not_complete():
    assert ending_of_finish(None) == ABORTED and ending_of_finish("") == ABORTED
    assert ending_of_finish("stop") == COMPLETE and ending_of_finish("eos") == COMPLETE
    assert ending_of_finish("length") == CUT and ending_of_finish("content_filter") == FILTERED


# ------------------------------------------------------------------------------------------ property
class _Bytes:
    """A response body in pieces, as a socket hands it over."""

    def __init__(self, data: bytes, size: int) -> None:
        self.parts = [data[i:i + size] for i in range(0, len(data), size)] or [b""]

    def read1(self, _n: int) -> bytes:
        return self.parts.pop(0) if self.parts else b""


_REASONS = st.one_of(st.none(), st.sampled_from(["stop", "length", "abort", "content_filter", "eos", "other"]))
_PIECE = st.text(alphabet="abc ", min_size=1, max_size=3)


def _body(pieces: list[str], finish: str | None, after: list[str], usage: bool, done: bool, noise: bool) -> bytes:
    """A stream as servers send it: tokens, a finish chunk (when ``finish``), tokens a broken server sends after
    it, the usage chunk, [DONE]; ``noise``: keep-alive comments between events."""
    def data(obj: object) -> bytes:
        return (b": keep-alive\n\n" if noise else b"") + b"data: " + json.dumps(obj).encode() + b"\n\n"

    out = b"".join(data({"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}) for p in pieces)
    if finish is not None:
        out += data({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        out += b"".join(data({"choices": [{"index": 0, "delta": {"content": p}}]}) for p in after)
    if usage:
        out += data({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": len(pieces)}})
    return out + (b"data: [DONE]\n\n" if done else b"")


@settings(max_examples=300)
@given(pieces=st.lists(_PIECE, max_size=10), finish=_REASONS, after=st.lists(_PIECE, max_size=3),
       usage=st.booleans(), done=st.booleans(), noise=st.booleans(), cap=st.integers(1, 12), size=st.integers(1, 64))
def test_an_answer_is_complete_iff_the_server_said_stop_within_the_cap(pieces, finish, after, usage, done, noise,
                                                                        cap, size):
    endpoint = Endpoint.parse("http://127.0.0.1:9/v1")
    runner = StreamRunner(endpoint, Faults(endpoint), "m", 30.0, 0, 1, lambda _stop: [])
    stream = Stream(0, {}, max_new_tokens=cap)
    try:
        runner.read_stream(stream, _Bytes(_body(pieces, finish, after, usage, done, noise), size))
    except sb.ServerError as exc:  # ended before any finish, [DONE] or the cap
        assert "cut off" in str(exc) and stream.dropped
    if len(pieces) > cap:
        expected = CUT  # the reader stopped listening at the cap
    elif finish is not None:
        expected = ending_of_finish(finish)
    elif len(pieces) == cap:
        expected = CUT
    else:
        expected = ABORTED  # a bare [DONE], or a stream that closed: never complete
    assert stream.ending == expected, (pieces, finish, done, cap, stream.ending)
    assert (stream.ending == COMPLETE) == (finish in ("stop", "eos") and len(pieces) <= cap)
    if stream.ending != ABORTED:
        assert stream.text == "".join(pieces[:cap])  # nothing sent after the finish or past the cap is kept
    assert stream.ending != FAILED


@pytest.mark.parametrize("per_answer", [True, False])
def test_cancel_keeps_the_answers_the_server_had_ended_and_marks_the_rest_cancelled(per_answer):
    """Cancel mid-request: answers already ended keep their ending and text; the held ones are ``cancelled``, never
    their partial text. Without per-answer errors the whole call is interrupted, as before."""
    import threading

    hold = threading.Event()
    replies = [Reply(WORDS), Reply(WORDS, finish_reason="length"), Reply(WORDS[:2], hold=hold),
               Reply(WORDS, hold=hold)]
    server = _serve(replies)
    try:
        # Two in flight: bodies 3 and 4 are sent only once answers 1 and 2 have ended.
        request = _request(4, per_answer_errors=per_answer, should_stop=lambda: len(server.bodies) >= 4)
        if not per_answer:
            with pytest.raises(ql.GenerationInterrupted):
                _run(server, request)
            return
        result = _run(server, request)
    finally:
        hold.set()
        server.stop()
    assert result.endings == [COMPLETE, CUT, CANCELLED, CANCELLED]
    assert result.texts == ["".join(WORDS), "".join(WORDS), "", ""]
    assert result.errors[:2] == [None, None] and all("cancelled" in e for e in result.errors[2:])
    assert [result.is_complete(i) for i in range(4)] == [True, False, False, False]
    assert result.record.interrupted


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_a_reasoning_parsers_separate_field_is_the_thinking_and_reasoning_only_is_thinking_open(key):
    """vLLM with --reasoning-parser streams the reasoning apart from the answer: it is the answer's thinking, and an
    answer that only reasoned (stopped or cut) ended ``thinking_open``, never complete with an empty caption."""
    thought = ["Let me", " look", " closely."]
    replies = [Reply(WORDS, reasoning=thought, reasoning_key=key),
               Reply([], reasoning=thought, reasoning_key=key, finish_reason="length"),
               Reply([], reasoning=thought, reasoning_key=key)]
    server = _serve(replies)
    try:
        result = _run(server, _request(3, per_answer_errors=True))
    finally:
        server.stop()
    assert result.endings == [COMPLETE, THINKING_OPEN, THINKING_OPEN]
    assert result.texts == ["".join(WORDS), "", ""]
    assert result.thinking == ["Let me look closely."] * 3
    assert any("still reasoning" in w for w in result.record.warnings), result.record.warnings
