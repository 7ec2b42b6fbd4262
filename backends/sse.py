"""Server-sent events: a streamed chat completion's lines and JSON events, bounded, with the server's bytes kept.

Invalid UTF-8 in an event survives as surrogate escapes (``raw_bytes`` gives the bytes back), so that a character
split across two events is decoded once, whole, by the reader's incremental decoder.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any, Protocol

from .api_key import redact
from .errors import AnswerError, clip, error_text

MAX_SSE_LINE_BYTES = 1 << 20  # one event is one token's JSON: a megabyte is already absurd


class _Readable(Protocol):
    def read1(self, n: int) -> bytes: ...


def raw_bytes(text: str) -> bytes:
    """A delta's bytes as the server sent them (invalid UTF-8 kept as surrogate escapes, see ``sse_events``)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate the server wrote as a JSON escape
        return text.encode("utf-8", "replace")


def sse_lines(resp: http.client.HTTPResponse | _Readable, limit: int) -> Iterator[bytes]:
    """The lines of a response body in linear time, none longer than ``limit`` bytes."""
    buffer = bytearray()
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            if buffer:
                yield bytes(buffer).strip()
            return
        scan = len(buffer)  # what is already buffered holds no newline: search only the new bytes
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", scan)) >= 0:
            yield bytes(buffer[start:end]).strip()
            start = scan = end + 1
        if start:
            del buffer[:start]
        if len(buffer) > limit:
            raise AnswerError(f"sent an event line longer than {limit >> 20} MiB")


def sse_events(resp: http.client.HTTPResponse | _Readable) -> Iterator[dict[str, Any] | None]:
    """The JSON events of a server-sent-events response; None for ``[DONE]`` (then it ends)."""
    for line in sse_lines(resp, MAX_SSE_LINE_BYTES):
        if not line.startswith(b"data:"):
            continue  # comments (keep-alives), event names, blank separators
        data = line[5:].strip()
        if data == b"[DONE]":
            yield None
            return
        try:
            event = json.loads(data.decode("utf-8", "surrogateescape"))
        except ValueError:
            raise AnswerError(f"sent an event that is not JSON "
                              f"({clip(redact(data.decode('utf-8', 'replace')), 80)})") from None
        if not isinstance(event, dict):
            raise AnswerError("sent an event that is not a JSON object")
        if event.get("error"):
            raise AnswerError(f"reported an error mid-answer: {redact(error_text(data))}")
        yield event
