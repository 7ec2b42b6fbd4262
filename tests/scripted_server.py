"""An OpenAI-compatible server on 127.0.0.1 whose answers a test scripts: for Caption Folder and the CLI through
the real server backend, with captions a test can predict exactly.

``ScriptedServer(reply)`` calls ``reply(server, body)`` for each chat request (``body`` is the request's JSON)
and streams what it returns: a ``Reply`` (pieces of text, one event each, then a finish with its
``finish_reason`` and ``[DONE]``, or either left out; or pieces then an in-band error event). ``/v1/models``
lists one model with a 14-pixel patch. The server records every request body in ``bodies``; tests may hang
their own attributes on it. For misbehaving servers see ``hostile_server.py``.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    pieces: list[str] = field(default_factory=list)
    error: str | None = None  # after the pieces, an in-band error event instead of a finish
    completion_tokens: int = 3
    finish_reason: str | None = "stop"  # None: no finish chunk (a bare [DONE], or a dropped stream)
    done: bool = True  # end with "data: [DONE]"; False with no finish_reason: the stream just closes
    reasoning: list[str] = field(default_factory=list)  # sent first, apart from the answer (a reasoning parser)
    reasoning_key: str = "reasoning_content"  # vLLM's name; newer vLLM says "reasoning"
    hold: threading.Event | None = None  # the answer starts only once this is set (or after HOLD_LIMIT_S)


def first_pixel(body: dict[str, Any]) -> tuple[int, int, int]:
    """The RGB of the first uploaded image's top-left pixel (solid test images keep their colour exactly)."""
    from PIL import Image

    url = next(p["image_url"]["url"] for p in body["messages"][-1]["content"] if p["type"] == "image_url")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        return tuple(im.convert("RGB").getpixel((0, 0)))


def prompt_of(body: dict[str, Any]) -> str:
    return "".join(p["text"] for p in body["messages"][-1]["content"] if p["type"] == "text")


def image_count(body: dict[str, Any]) -> int:
    return sum(p["type"] == "image_url" for p in body["messages"][-1]["content"])


HOLD_LIMIT_S = 30.0  # a held answer never outlives its test by much


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def log_message(self, *args: Any) -> None:  # keep pytest's output clean
        pass

    def do_GET(self) -> None:
        if not self.path.endswith("/models"):
            self.send_error(404)
            return
        body = json.dumps({"object": "list", "data": [{"id": self.server.model, "patch_size": 14}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.bodies.append(body)
            reply = self.server.reply(self.server, body)
        if self.server.delay:
            time.sleep(self.server.delay)
        if reply.hold is not None:
            reply.hold.wait(HOLD_LIMIT_S)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def event(obj: object) -> None:
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        for piece in reply.reasoning:
            event({"choices": [{"index": 0, "delta": {reply.reasoning_key: piece}}]})
        for piece in reply.pieces:
            event({"choices": [{"index": 0, "delta": {"content": piece}}]})
        if reply.error is not None:
            event({"error": {"message": reply.error, "code": 500}})
            return
        if reply.finish_reason is not None:
            event({"choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}],
                   "usage": {"prompt_tokens": 10, "completion_tokens": reply.completion_tokens}})
        if reply.done:
            self.wfile.write(b"data: [DONE]\n\n")


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, reply: Callable[[ScriptedServer, dict[str, Any]], Reply], model: str = "m") -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.reply = reply
        self.model = model
        self.bodies: list[dict[str, Any]] = []
        self.delay = 0.0
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def start(self) -> ScriptedServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
