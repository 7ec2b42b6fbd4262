"""A misbehaving OpenAI-compatible HTTP server on 127.0.0.1, for tests of the server backend's edges.

Use it as a context manager; it listens on a free port, records what it received, and stops by itself after
``lifetime_s`` even if nobody stops it::

    with HostileServer(mode="silent_after_headers") as srv:
        srv.url          # "http://127.0.0.1:PORT/v1", a server_url
        srv.origin       # "http://127.0.0.1:PORT", for $QWENVL_FAST_API_KEY_ORIGINS
        srv.requests     # [(method, path, headers)], headers a dict with lower-case names, in arrival order
        srv.bodies       # the chat requests' JSON bodies, in arrival order
        srv.stalled      # a threading.Event, set once it starts withholding (silence, full backlog, 503, trickle)
        srv.mode = "ok"  # modes may change while it runs (requests read it when they arrive); no_accept is final

Or standalone, for a real ComfyUI to be pointed at (serves until killed; ``--port 0`` picks one and prints it)::

    python tests/hostile_server.py --mode silent_after_headers --port 8000 [--on all] [--only 1,3]

``/v1/models`` lists one model (``MODEL``) and ``/v1/chat/completions`` streams ``TOKENS`` (cut at the request's
``max_tokens``) unless the mode says otherwise. A mode applies where ``on`` says: "chat" (the default for the
chat modes), "models" (the default for the models modes) or "all"; ``only`` limits a chat mode to the chat
requests with those arrival indices (0-based), the others answered normally. The modes (``MODES``):

- ``ok``: a well-behaved server.
- ``no_accept``: the listening socket's backlog is full and nothing is accepted: connecting hangs.
- ``silent_after_connect``: reads the request, never answers.
- ``silent_after_headers``: sends 200 and the event-stream headers, then nothing.
- ``one_token_then_silence``: one token, then nothing.
- ``trickle``: a valid answer, one byte every ``trickle_s`` seconds, never finishing.
- ``endless_stream``: tokens as fast as it can, never a finish (stops at ``max_events`` or when the client goes).
- ``huge_line``: one ``data:`` line of ``huge_line_bytes`` bytes.
- ``no_finish``: a few tokens, then the connection closes mid-stream (no finish_reason, no [DONE]).
- ``no_finish_chunked``: a few tokens, then a clean end of the chunked body, still without a finish.
- ``plain_json``: a 200 ``application/json`` non-streamed chat completion (``PLAIN_TEXT``).
- ``invalid_json``: a 200 ``application/json`` body that is not JSON.
- ``json_not_completion``: a 200 ``application/json`` body that is JSON but not a completion.
- ``non_utf8``: tokens with invalid UTF-8 and a character split across two events and two TCP writes;
  the right text is ``NON_UTF8_TEXT``.
- ``redirect``: 302 to ``REDIRECT_TO``.
- ``unauthorized``: 401.
- ``echo_auth_status``: a status line made of the Authorization header it received (a malformed status line).
- ``http_400``: 400 with an error message.
- ``busy``: 503 with ``Retry-After: 30``, always.
- ``huge_models``: ``/models`` lists ``models_count`` models.
- ``endless_models``: a ``/models`` body that never ends.
- ``models_not_json``, ``id_not_string``, ``data_not_list``: ``/models`` answers that are not a model list.
- ``bad_patch``: ``/models`` reports ``patch_size`` (and ``spatial_merge_size``) as given.

Every loop here is bounded in count and time; the server stops after ``lifetime_s`` (None: never, standalone).
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import threading
import time
from typing import Any

MODEL = "hostile-qwen2.5-vl"
TOKENS = ["Hello", " from", " a", " hostile", " server", "."]
PLAIN_TEXT = "Hello plain"
NON_UTF8_TEXT = "café x\ufffdy"
REDIRECT_TO = "http://evil.example.test:8080/v1/chat/completions"
MODELS_MODES = {"huge_models", "endless_models", "models_not_json", "id_not_string", "data_not_list", "bad_patch"}
CHAT_MODES = {"ok", "no_accept", "silent_after_connect", "silent_after_headers", "one_token_then_silence",
              "trickle", "endless_stream", "huge_line", "no_finish", "no_finish_chunked", "plain_json",
              "invalid_json", "json_not_completion", "non_utf8", "redirect", "unauthorized", "echo_auth_status",
              "http_400", "busy"}
MODES = sorted(CHAT_MODES | MODELS_MODES)
_MAX_HEADER_BYTES = 64 << 10
_MAX_BODY_BYTES = 256 << 20
_IO_TIMEOUT_S = 10.0


class _Gone(Exception):
    """The client went away (or the server is stopping)."""


class HostileServer:
    """An OpenAI-compatible server that misbehaves as ``mode`` says (see the module's docstring)."""

    def __init__(self, mode: str = "ok", *, port: int = 0, on: str | None = None, only: set[int] | None = None,
                 models_count: int = 300_000, patch_size: Any = 50000, merge_size: Any = 2,
                 silence_s: float = 120.0, trickle_s: float = 1.0, huge_line_bytes: int = 8 << 20,
                 max_events: int = 2_000_000, lifetime_s: float | None = 120.0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: one of {MODES}")
        if on not in (None, "chat", "models", "all"):
            raise ValueError("on: 'chat', 'models' or 'all'")
        self.mode = mode
        self.on = on
        self.only = set(only) if only is not None else None
        self.models_count, self.patch_size, self.merge_size = models_count, patch_size, merge_size
        self.silence_s, self.trickle_s = silence_s, trickle_s
        self.huge_line_bytes, self.max_events = huge_line_bytes, max_events
        self.lifetime_s = lifetime_s
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.bodies: list[Any] = []  # per chat request, its JSON body (None where it was not JSON)
        self.events_sent: list[int] = []  # per chat request that streamed: events written before it ended
        # Set when the server starts withholding: silence, a full backlog, a 503 to wait on, a trickle.
        self.stalled = threading.Event()
        self._chat_count = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._fillers: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._backlog_full = False

    # -- life ----------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def authorizations(self) -> list[str | None]:
        """The Authorization header of each request received (None where there was none)."""
        return [headers.get("authorization") for _, _, headers in self.requests]

    def start(self) -> HostileServer:
        self._spawn(self._accept_loop, "hostile-accept")
        if self.lifetime_s is not None:
            self._spawn(lambda: self._stop.wait(self.lifetime_s) or self.stop(join=False), "hostile-lifetime")
        return self

    def stop(self, join: bool = True) -> None:
        self._stop.set()
        with self._lock:
            socks = self._conns + self._fillers
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if join:
            for thread in list(self._threads):
                if thread is not threading.current_thread():
                    thread.join(timeout=5)
        self._listener.close()

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _fill_backlog(self) -> None:
        """Make connecting hang: a backlog of 0 holds one connection, and with it queued the kernel drops SYNs."""
        self._listener.listen(0)
        for _ in range(4):  # bounded: the first normally queues, the next already hangs
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(0.3)
            try:
                filler.connect(("127.0.0.1", self.port))
            except OSError:
                filler.close()
                break
            with self._lock:
                self._fillers.append(filler)
        self._backlog_full = True
        self.stalled.set()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if self.mode == "no_accept":
                if not self._backlog_full:
                    self._fill_backlog()
                self._stop.wait(0.05)
                continue
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.05)
                if not ready:
                    continue
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            conn.settimeout(_IO_TIMEOUT_S)
            with self._lock:
                self._conns.append(conn)
            self._spawn(self._handle, "hostile-conn", conn)

    # -- one request ---------------------------------------------------------------------------------------
    def _read_request(self, conn: socket.socket) -> tuple[str, str, dict[str, str], bytes] | None:
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > _MAX_HEADER_BYTES:
                return None
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = min(int(headers.get("content-length") or 0), _MAX_BODY_BYTES)
        while len(body) < length:
            chunk = conn.recv(min(1 << 20, length - len(body)))
            if not chunk:
                return None
            body += chunk
        return method, path, headers, body

    def _handle(self, conn: socket.socket) -> None:
        try:
            request = self._read_request(conn)
            if request is None:
                return
            method, path, headers, body = request
            with self._lock:
                self.requests.append((method, path, headers))
            if path.rstrip("/").endswith("/models"):
                self._models(conn, self._applies("models", None))
            elif path.rstrip("/").endswith("/chat/completions"):
                with self._lock:
                    index = self._chat_count
                    self._chat_count += 1
                try:
                    payload = json.loads(body or b"{}")
                except ValueError:
                    payload = None
                with self._lock:
                    self.bodies.append(payload)
                try:
                    max_tokens = int(payload.get("max_tokens") or len(TOKENS))
                except (ValueError, TypeError, AttributeError):
                    max_tokens = len(TOKENS)
                self._chat(conn, self._applies("chat", index), headers, max_tokens)
            else:
                self._send_status(conn, 404, b'{"error": {"message": "not found"}}')
        except (_Gone, OSError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _applies(self, where: str, index: int | None) -> str:
        mode = self.mode
        on = self.on or ("models" if mode in MODELS_MODES else "chat")
        if mode == "no_accept":
            return mode  # accepted just before the switch: it stays silent, as if never accepted
        if on not in (where, "all"):
            return "ok"
        if where == "chat" and self.only is not None and index not in self.only:
            return "ok"
        return mode

    # -- writing -------------------------------------------------------------------------------------------
    def _send(self, conn: socket.socket, data: bytes) -> None:
        if self._stop.is_set():
            raise _Gone
        try:
            conn.sendall(data)
        except OSError:
            raise _Gone from None

    def _send_status(self, conn: socket.socket, status: int, body: bytes, extra: str = "",
                     ctype: str = "application/json") -> None:
        reason = {200: "OK", 302: "Found", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                  503: "Service Unavailable"}.get(status, "Status")
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"{extra}Connection: close\r\n\r\n")
        self._send(conn, head.encode("latin-1") + body)

    def _stream_head(self, conn: socket.socket) -> None:
        self._send(conn, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: close\r\n\r\n")

    def _chunk(self, conn: socket.socket, data: bytes) -> None:
        self._send(conn, b"%x\r\n%s\r\n" % (len(data), data))

    @staticmethod
    def _event(payload: dict[str, Any] | str | bytes) -> bytes:
        if isinstance(payload, bytes):
            return b"data: " + payload + b"\n\n"
        text = payload if isinstance(payload, str) else json.dumps(payload)
        return b"data: " + text.encode() + b"\n\n"

    @staticmethod
    def _token(text: str | bytes) -> bytes:
        if isinstance(text, bytes):  # raw bytes inside the JSON string, as a broken server would write them
            return b'{"choices": [{"index": 0, "delta": {"content": "' + text + b'"}, "finish_reason": null}]}'
        return json.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}).encode()

    def _silence(self) -> None:
        self.stalled.set()
        self._stop.wait(self.silence_s)
        raise _Gone

    def _ok_stream(self, conn: socket.socket, max_tokens: int) -> None:
        self._stream_head(conn)
        sent = TOKENS[:max(0, max_tokens)]
        for token in sent:
            self._chunk(conn, self._event(self._token(token)))
        finish = "stop" if len(sent) == len(TOKENS) else "length"
        self._chunk(conn, self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
        self._chunk(conn, self._event({"choices": [], "usage": {"prompt_tokens": 42, "completion_tokens": len(sent),
                                                                "total_tokens": 42 + len(sent)}}))
        self._chunk(conn, self._event("[DONE]"))
        self._send(conn, b"0\r\n\r\n")

    # -- the answers ---------------------------------------------------------------------------------------
    def _common(self, conn: socket.socket, mode: str, headers: dict[str, str]) -> bool:
        """The modes that behave the same on both paths; True where one answered."""
        if mode in ("silent_after_connect", "no_accept"):
            self._silence()
        if mode == "silent_after_headers":
            self._stream_head(conn)
            self._silence()
        if mode == "redirect":
            self._send_status(conn, 302, b"", extra=f"Location: {REDIRECT_TO}\r\n")
        elif mode == "unauthorized":
            self._send_status(conn, 401, b'{"error": {"message": "invalid api key", "code": 401}}')
        elif mode == "echo_auth_status":
            auth = headers.get("authorization", "no-authorization")
            self._send(conn, f"HTTP/1.1 {auth}\r\n\r\n".encode("latin-1", "replace"))
        elif mode == "http_400":
            self._send_status(conn, 400, b'{"error": {"message": "this image is refused (hostile server)"}}')
        elif mode == "busy":
            self._send_status(conn, 503, b'{"error": {"message": "busy"}}', extra="Retry-After: 30\r\n")
            self.stalled.set()
        elif mode == "trickle":
            self._send(conn, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            data = self._event(self._token("slow")) * 1000
            self.stalled.set()
            for byte in data:  # bounded: len(data) bytes, one per trickle_s, and the server's lifetime
                self._send(conn, bytes([byte]))
                if self._stop.wait(self.trickle_s):
                    raise _Gone
            raise _Gone
        else:
            return False
        return True

    def _models(self, conn: socket.socket, mode: str) -> None:
        if self._common(conn, mode, {}):
            return
        entry: dict[str, Any] = {"id": MODEL, "object": "model", "owned_by": "hostile"}
        if mode == "huge_models":
            names = ",".join(f'{{"id": "model-{i}", "object": "model"}}' for i in range(self.models_count))
            body = f'{{"object": "list", "data": [{names}]}}'.encode()
        elif mode == "endless_models":
            self._send(conn, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
            self._send(conn, b'{"object": "list", "data": [')
            piece = b'{"id": "again", "object": "model"},' * 1000
            deadline = time.monotonic() + self.silence_s
            for _ in range(1 << 16):  # bounded: 2 GB at most, and silence_s, and the client going away
                if time.monotonic() > deadline:
                    break
                self._send(conn, piece)
            raise _Gone
        elif mode == "models_not_json":
            body = b"<html><body>It works!</body></html>"
        elif mode == "id_not_string":
            body = json.dumps({"object": "list", "data": [{"id": 12345, "object": "model"}]}).encode()
        elif mode == "data_not_list":
            body = json.dumps({"object": "list", "data": {"id": MODEL}}).encode()
        else:
            if mode == "bad_patch":
                entry.update(patch_size=self.patch_size, spatial_merge_size=self.merge_size)
            body = json.dumps({"object": "list", "data": [entry]}).encode()
        self._send_status(conn, 200, body)

    def _chat(self, conn: socket.socket, mode: str, headers: dict[str, str], max_tokens: int) -> None:
        if self._common(conn, mode, headers):
            return
        events = 0
        try:
            if mode == "ok":
                self._ok_stream(conn, max_tokens)
            elif mode == "one_token_then_silence":
                self._stream_head(conn)
                self._chunk(conn, self._event(self._token(TOKENS[0])))
                events = 1
                self._silence()
            elif mode == "endless_stream":
                self._stream_head(conn)
                event = self._event(self._token("more"))
                while events < self.max_events and not self._stop.is_set():
                    self._chunk(conn, event * 16)
                    events += 16
                raise _Gone
            elif mode == "huge_line":
                self._stream_head(conn)
                self._chunk(conn, b"data: ")
                piece = b"x" * 65536
                for _ in range(max(1, self.huge_line_bytes // len(piece))):
                    self._chunk(conn, piece)
                self._chunk(conn, b"\n\n")
                raise _Gone
            elif mode in ("no_finish", "no_finish_chunked"):
                self._stream_head(conn)
                for token in TOKENS[:3]:
                    self._chunk(conn, self._event(self._token(token)))
                    events += 1
                if mode == "no_finish_chunked":
                    self._send(conn, b"0\r\n\r\n")  # a clean end of the body: still no finish
                else:
                    conn.shutdown(socket.SHUT_RDWR)  # mid-body: the chunked framing is left open
                raise _Gone
            elif mode in ("plain_json", "invalid_json", "json_not_completion"):
                body = {
                    "plain_json": json.dumps({
                        "id": "chatcmpl-hostile", "object": "chat.completion", "model": MODEL,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": PLAIN_TEXT},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}).encode(),
                    "invalid_json": b'{"choices": [{"message": {"content": "unfinished',
                    "json_not_completion": b'{"object": "list", "data": []}',
                }[mode]
                self._send_status(conn, 200, body)
            elif mode == "non_utf8":
                self._stream_head(conn)
                for raw in (b"caf\xc3", b"\xa9 ", b"x\xffy"):  # U+00E9 split across two events; a stray byte
                    event = self._event(self._token(raw))
                    cut = event.index(b"\xc3") + 1 if b"\xc3" in event else len(event) // 2
                    self._chunk(conn, event[:cut])  # and each event split across two writes
                    time.sleep(0.02)
                    self._chunk(conn, event[cut:])
                    events += 1
                self._chunk(conn, self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
                self._chunk(conn, self._event("[DONE]"))
                self._send(conn, b"0\r\n\r\n")
        finally:
            with self._lock:
                self.events_sent.append(events)


def main() -> None:
    parser = argparse.ArgumentParser(description="A misbehaving OpenAI-compatible server (tests/hostile_server.py)")
    parser.add_argument("--mode", default="ok", choices=MODES)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--on", choices=["chat", "models", "all"], default=None)
    parser.add_argument("--only", default="", help="comma-separated chat request indices the mode applies to")
    parser.add_argument("--lifetime", type=float, default=None, help="stop after this many seconds (default: never)")
    parser.add_argument("--silence", type=float, default=3600.0, help="how long the silent modes stay silent")
    args = parser.parse_args()
    only = {int(i) for i in args.only.split(",") if i.strip()} or None
    server = HostileServer(args.mode, port=args.port, on=args.on, only=only, lifetime_s=args.lifetime,
                           silence_s=args.silence).start()
    print(f"hostile server ({args.mode}) at {server.url}", flush=True)
    try:
        while not server._stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
