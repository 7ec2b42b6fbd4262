"""The server backend: the same requests, answered by an OpenAI-compatible server (vLLM first).

The pack does not serve models itself. With ``backend="server"`` a :class:`ServerModel` stands where a local
model stands: ``run_once`` gives it the same :class:`~engine.GenerationRequest`, and it

1. applies the quality preset *before upload*: each image is resized to the preset's token budget for the
   served family's patch size and sent as PNG (or JPEG), so tokens, upload bytes and server compute shrink
   as they do locally (``native`` sends the original). Encoded uploads are memoised by image digest and size
   (at most ``UPLOAD_MEMO_BYTES``); reuse of the image's embedding and of the prompt prefix is the server's
   own business (vLLM's encoder and prefix caches);
2. streams the answer (server-sent events) for per-token progress and partial text; Cancel shuts the
   connection's socket down, which wakes a blocked read at once and makes the server abort the request;
3. keeps several requests in flight (``server_max_in_flight``) when there are several answers to give (one
   answer per image, Caption Folder), so the server can batch them; answers come back in input order;
4. retries 429, 503 and dropped connections with backoff, and turns every other failure into an error that
   names the URL and the fix.

What the server sends is bounded and checked: ``server_timeout_s`` is a deadline for a whole request (not
per read), an answer counts only when it ends with a ``finish_reason`` or ``[DONE]``, reading stops at
``max_new_tokens`` received tokens, one event line, a ``/models`` body and an error body are read up to a
byte cap, and the patch geometry a server reports must be a Qwen family's.

The API key comes from ``$QWENVL_FAST_API_KEY`` only, is sent only to the origins listed in
``$QWENVL_FAST_API_KEY_ORIGINS`` (never to an address a workflow alone names, never on a redirect) and never
appears in logs, errors, exception chains or timing records. Only the standard library is used for HTTP.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import errno
import http.client
import io
import json
import logging
import os
import select
import socket
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import quality_presets as qp
from ..caches import get_cache
from ..core.api import (
    BATCH_MODES,
    UPLOAD_FORMATS,
    GenerationRequest,
    GenerationResult,
    LoadOptions,
)
from ..core.errors import GenerationInterrupted, QwenVLError
from ..embedding_cache import canonical_digest
from ..engine.prompting import split_thinking
from ..perf_monitor import RunMonitor, RunRecord
from ..vision.images import canonicalize_image

log = logging.getLogger("QwenVL-Fast")

API_KEY_ENV = "QWENVL_FAST_API_KEY"
API_KEY_ORIGINS_ENV = "QWENVL_FAST_API_KEY_ORIGINS"
RETRY_STATUSES = (429, 502, 503, 504)
# Statuses that speak of one request only (its image, its length): with ``per_answer_errors`` they fail that
# answer alone. Everything else (refused key, unknown model, a redirect, a server down) hits every answer.
ANSWER_STATUSES = (400, 413, 422)
UPLOAD_MEMO_ENTRIES = 256
UPLOAD_MEMO_BYTES = 64 << 20  # `native` uploads of large photos are tens of MiB each: bound the bytes, not entries
MAX_SSE_LINE_BYTES = 1 << 20  # one event is one token's JSON: a megabyte is already absurd
MAX_MODELS_BYTES = 16 << 20
MAX_ERROR_BODY_BYTES = 64 << 10
MAX_JSON_ANSWER_BYTES = 16 << 20
MAX_LISTED_NAMES = 20
MAX_SERVER_TEXT = 500  # characters of the server's own words quoted in an error
MODELS_TIMEOUT_S = 30.0
# Events read past max_new_tokens received tokens, for a server's closing finish/usage chunk.
TOKEN_SLACK_EVENTS = 4
# After the finish (or the token cap) the closing usage chunk and [DONE] get this long before the answer stands.
FINISH_GRACE_S = 5.0
# Sockets' own timeout past the deadline: only a backstop, the watchdog ends a late request first.
_SOCKET_SLACK_S = 5.0
QWEN_PATCH_SIZES = (14, 16)  # Qwen2/2.5-VL: 14; Qwen3-VL, Qwen3.5: 16
QWEN_MERGE_SIZE = 2
STREAM_EVERY_TOKENS = 8
_POLL_S = 0.05
_CONNECT_IN_PROGRESS = {0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY,
                        getattr(errno, "WSAEWOULDBLOCK", errno.EWOULDBLOCK)}


class ServerError(QwenVLError):
    """The server could not answer; the message names the URL and what to do."""


class AnswerError(ServerError):
    """One answer failed on its own (cut off, malformed, refused for its content, past its deadline)."""


class _Aborted(Exception):
    """A request's sockets were shut down from another thread; ``_Abort.reason`` says why."""


def api_key() -> str:
    return os.environ.get(API_KEY_ENV, "").strip()


def redact(text: str) -> str:
    """``text`` with the API key (if any) replaced: nothing the pack shows or logs may carry it."""
    key = api_key()
    return text.replace(key, "***") if key else text


def _clip(text: str, limit: int = MAX_SERVER_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + " …"


def _names_text(names: list[str]) -> str:
    """At most ``MAX_LISTED_NAMES`` names: a server listing 300,000 models must not make a 4 MB error."""
    shown = ", ".join(_clip(n, 100) for n in names[:MAX_LISTED_NAMES])
    more = len(names) - MAX_LISTED_NAMES
    return shown + (f" … and {more} more" if more > 0 else "")


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def origin_text(scheme: str, host: str, port: int | None) -> str:
    """The normalised origin, as written in ``$QWENVL_FAST_API_KEY_ORIGINS``: lowercase, default port left out.

    ``localhost`` and ``127.0.0.1`` stay different origins: the list names exactly what the user trusts."""
    scheme = scheme.lower()
    default = 443 if scheme == "https" else 80
    text = f"{scheme}://{_host_text(host.lower())}"
    return text if port in (None, default) else f"{text}:{port}"


def parse_origin(text: str) -> str | None:
    """The normalised origin of ``text`` (a path is ignored), or None where it is not an http(s) origin."""
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    if port is not None and not 1 <= port <= 65535:
        return None
    return origin_text(parts.scheme, parts.hostname, port)


_WARNED_ORIGINS: set[str] = set()


def key_origins() -> set[str]:
    """The origins the API key may be sent to, from ``$QWENVL_FAST_API_KEY_ORIGINS`` (comma-separated)."""
    origins = set()
    for entry in os.environ.get(API_KEY_ORIGINS_ENV, "").split(","):
        if not entry.strip():
            continue
        origin = parse_origin(entry)
        if origin is None:
            if entry not in _WARNED_ORIGINS:
                _WARNED_ORIGINS.add(entry)
                log.warning("[QwenVL-Fast] $%s: '%s' is not an origin like https://api.example.com or "
                            "http://127.0.0.1:8000; ignored", API_KEY_ORIGINS_ENV, _clip(entry.strip(), 100))
            continue
        origins.add(origin)
    return origins


def _check_key(key: str) -> None:
    # http.client would refuse such a key with a ValueError that quotes the whole header, key and all.
    if any(not (" " <= c <= "~" or "\xa0" <= c <= "\xff") for c in key):
        raise ServerError(f"${API_KEY_ENV} holds a character that cannot be sent in an HTTP header (a newline, a "
                          "control character or a character outside Latin-1): set it to the key alone, on one "
                          "line.")


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible base URL, e.g. ``http://127.0.0.1:8000/v1``."""

    scheme: str
    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        text = (url or "").strip().rstrip("/")
        if not text:
            raise ServerError("backend 'server' needs server_url, e.g. http://127.0.0.1:8000/v1 (the OpenAI-"
                              "compatible base URL of a vLLM, SGLang, llama.cpp, Ollama or LM Studio server).")
        if "://" not in text:
            text = "http://" + text
        parts = urllib.parse.urlsplit(text)
        shown = _clip(url, 200)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServerError(f"server_url '{shown}' is not an http(s) URL like http://127.0.0.1:8000/v1.")
        if parts.username or parts.password:
            raise ServerError("server_url must not carry credentials; put the API key in $QWENVL_FAST_API_KEY.")
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 1 <= port <= 65535:
            raise ServerError(f"server_url '{shown}' has an invalid port: a port is a number from 1 to 65535, as "
                              "in http://127.0.0.1:8000/v1.")
        prefix = parts.path or ""
        if not prefix.endswith("/v1"):
            prefix += "/v1"
        port = port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, prefix)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{_host_text(self.host)}:{self.port}{self.prefix}"

    @property
    def origin(self) -> str:
        return origin_text(self.scheme, self.host, self.port)

    def connection(self, timeout: float, abort: _Abort | None = None,
                   deadline: float | None = None) -> http.client.HTTPConnection:
        """A connection whose connect, TLS handshake and reads ``abort`` can end from another thread."""
        abort = abort or _Abort()
        deadline = deadline if deadline is not None else time.monotonic() + timeout
        cls = _HTTPSConnection if self.scheme == "https" else _HTTPConnection
        return cls(self.host, self.port, timeout, abort, deadline)


def _headers(endpoint: Endpoint) -> dict[str, str]:
    """The request headers; the API key only for an origin the user listed (never one a workflow alone names)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    key = api_key()
    if key and endpoint.origin in key_origins():
        _check_key(key)
        headers["Authorization"] = f"Bearer {key}"
    return headers


# -- sockets that another thread can interrupt ---------------------------------------------------------------
def _shutdown(sock: socket.socket) -> None:
    try:
        # The plain socket's shutdown even for a TLS socket: ssl's own would drop its state under the reader.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass  # not connected yet (the connect loop polls the reason) or already closed


class _Abort:
    """Ends one request's blocking socket calls from another thread: Cancel and the deadline.

    Closing an ``HTTPConnection`` from another thread does not wake a thread blocked in ``recv``; shutting its
    socket down does (the read returns at once), so that is what ``fire`` does; connecting polls ``reason``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.reason: str | None = None  # "cancel" or "deadline"
        self.event = threading.Event()

    def register(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            fired = self.reason is not None
        if fired:
            _shutdown(sock)

    def fire(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            socks = list(self._socks)
        self.event.set()
        for sock in socks:
            _shutdown(sock)

    def check(self) -> None:
        if self.reason is not None:
            raise _Aborted(self.reason)


def _resolve(host: str, port: int, abort: _Abort, deadline: float) -> list:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass
    # A name lookup cannot be interrupted: it runs in a daemon thread that Cancel simply stops waiting for.
    box: dict[str, Any] = {}

    def lookup() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            box["error"] = exc

    worker = threading.Thread(target=lookup, name="qwenvl-resolve", daemon=True)
    worker.start()
    while worker.is_alive():
        abort.check()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"looking up {host} timed out")
        worker.join(_POLL_S)
    if "error" in box:
        raise box["error"]
    return box["infos"]


def _connect(address: tuple[str, int], timeout: float, abort: _Abort, deadline: float) -> socket.socket:
    """``socket.create_connection``, but non-blocking underneath so Cancel and the deadline end it at once."""
    last: OSError | None = None
    for family, kind, proto, _, addr in _resolve(address[0], address[1], abort, deadline):
        sock = socket.socket(family, kind, proto)
        try:
            abort.register(sock)
            sock.setblocking(False)
            code = sock.connect_ex(addr)
            if code not in _CONNECT_IN_PROGRESS:
                raise OSError(code, os.strerror(code))
            while code != 0:
                abort.check()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"connecting to {address[0]}:{address[1]} timed out")
                _, writable, failed = select.select([], [sock], [sock], min(_POLL_S, left))
                if writable or failed:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise OSError(code, os.strerror(code))
                    break
            sock.settimeout(timeout)
            return sock
        except (TimeoutError, _Aborted):
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last or OSError(f"no address for {address[0]}")


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, timeout: float, abort: _Abort, deadline: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.abort, self.deadline = abort, deadline
        self._create_connection = self._interruptible_connect  # http.client's own hook for making the socket

    def _interruptible_connect(self, address: tuple[str, int], timeout: float, source_address: Any = None
                               ) -> socket.socket:
        return _connect(address, timeout, self.abort, self.deadline)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, timeout: float, abort: _Abort, deadline: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.abort, self.deadline = abort, deadline
        self._create_connection = self._interruptible_connect

    def _interruptible_connect(self, address: tuple[str, int], timeout: float, source_address: Any = None
                               ) -> socket.socket:
        return _connect(address, timeout, self.abort, self.deadline)

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP, interruptibly (no proxy tunnel: never configured here)
        # The handshake after registering the TLS socket, so that shutting it down ends a stalled handshake too.
        sock = self._context.wrap_socket(self.sock, server_hostname=self.host, do_handshake_on_connect=False)
        self.sock = sock
        self.abort.register(sock)
        sock.do_handshake()


@contextlib.contextmanager
def _watchdog(abort: _Abort, should_stop: Callable[[], bool] | None, deadline: float) -> Iterator[None]:
    """Fires ``abort`` on Cancel or at the deadline while the calling thread blocks on the request."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(_POLL_S):
            if should_stop is not None and should_stop():
                abort.fire("cancel")
                return
            if time.monotonic() >= deadline:
                abort.fire("deadline")
                return

    thread = threading.Thread(target=watch, name="qwenvl-server-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


_LOAD_STOP = threading.local()


@contextlib.contextmanager
def stop_during_load(should_stop: Callable[[], bool] | None) -> Iterator[None]:
    """Lets Cancel end a server backend's load (its ``/models`` call) too: wrap ``ModelManager.get`` in this."""
    previous = getattr(_LOAD_STOP, "should_stop", None)
    _LOAD_STOP.should_stop = should_stop
    try:
        yield
    finally:
        _LOAD_STOP.should_stop = previous


def _read_capped(resp: http.client.HTTPResponse, cap: int) -> tuple[bytes, bool]:
    """At most ``cap`` bytes of the body, and whether there was more (a never-ending body is not read whole)."""
    parts: list[bytes] = []
    size = 0
    while size <= cap:
        chunk = resp.read(min(65536, cap + 1 - size))
        if not chunk:
            return b"".join(parts), False
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)[:cap], True


def _error_text(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return _clip(text)
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return _clip(str(err.get("message") or err.get("detail") or err))
    return _clip(str(err))


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _raw_bytes(text: str) -> bytes:
    """A delta's bytes as the server sent them (invalid UTF-8 kept as surrogate escapes, see ``_sse_events``)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate the server wrote as a JSON escape
        return text.encode("utf-8", "replace")


def _sse_lines(resp: http.client.HTTPResponse, limit: int) -> Iterator[bytes]:
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


def _sse_events(resp: http.client.HTTPResponse) -> Iterator[dict[str, Any] | None]:
    """The JSON events of a server-sent-events response; None for ``[DONE]`` (then it ends)."""
    for line in _sse_lines(resp, MAX_SSE_LINE_BYTES):
        if not line.startswith(b"data:"):
            continue  # comments (keep-alives), event names, blank separators
        data = line[5:].strip()
        if data == b"[DONE]":
            yield None
            return
        try:
            # Invalid UTF-8 survives as surrogate escapes, to be decoded once, across events, with replacement.
            event = json.loads(data.decode("utf-8", "surrogateescape"))
        except ValueError:
            raise AnswerError(f"sent an event that is not JSON "
                              f"({_clip(redact(data.decode('utf-8', 'replace')), 80)})") from None
        if not isinstance(event, dict):
            raise AnswerError("sent an event that is not a JSON object")
        if event.get("error"):
            raise AnswerError(f"reported an error mid-answer: {redact(_error_text(data))}")
        yield event


@dataclass
class _Stream:
    """One answer's streaming state, shared between its worker thread and the caller's thread."""

    index: int
    body: dict[str, Any]
    max_new_tokens: int = 256
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int | None = None
    upload_s: float = 0.0
    first_token_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str | None = None
    complete: bool = False
    error: BaseException | None = None
    done: bool = False
    deadline: float | None = None  # set when its worker starts: a request waiting for a slot is not late
    abort: _Abort = field(default_factory=_Abort, repr=False)
    connection: http.client.HTTPConnection | None = field(default=None, repr=False)


class ServerModel:
    """A model served elsewhere, used exactly like a local QwenVLModel by ``run_once``."""

    is_remote = True
    compile_report = None

    def __init__(self, options: LoadOptions) -> None:
        self.options = options
        self.endpoint = Endpoint.parse(options.server_url)
        self.timeout = float(options.server_timeout_s)
        if not self.timeout > 0:
            raise ServerError(f"server_timeout_s must be above 0 (it is {options.server_timeout_s}).")
        self.max_in_flight = max(1, int(options.server_max_in_flight))
        self.upload_format = options.server_upload_format
        if self.upload_format not in UPLOAD_FORMATS:
            raise ServerError(f"server_upload_format '{self.upload_format}': choose one of {UPLOAD_FORMATS}.")
        self.device = torch.device("cpu")  # nothing of the model is here
        self.usable = True
        self.load_seconds = 0.0
        self._uploads: OrderedDict[tuple, str] = OrderedDict()
        self._upload_bytes = 0
        self._uploads_lock = threading.Lock()
        t0 = time.perf_counter()
        served = self.list_models(getattr(_LOAD_STOP, "should_stop", None))
        self.served_model = self._choose(served, options.server_model)
        self.patch_size, self.merge_size = self._patch_geometry(served)
        self.load_seconds = time.perf_counter() - t0
        log.info("[QwenVL-Fast] using %s at %s (patch %d, merge %d)", _clip(self.served_model, 100),
                 self.endpoint.url, self.patch_size, self.merge_size)

    # -- what run_once and the model manager ask of a model --------------------------------
    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def close(self) -> None:
        self.usable = False
        with self._uploads_lock:
            self._uploads.clear()
            self._upload_bytes = 0

    def param_bytes(self) -> int:
        return 0

    # -- errors -----------------------------------------------------------------------------
    def _deadline_error(self, what: str, limit: float) -> AnswerError:
        return AnswerError(f"The server at {self.endpoint.url} did not finish {what} within the {limit:g}s "
                           "deadline (server_timeout_s, for a whole request): it may be overloaded, stuck or "
                           "still starting; raise server_timeout_s for long answers.")

    def _unauthorized(self) -> ServerError:
        url, origin = self.endpoint.url, self.endpoint.origin
        if api_key() and origin in key_origins():
            return ServerError(f"The server at {url} refused the API key: set ${API_KEY_ENV} to the key it "
                               "expects (never in a workflow).")
        if api_key():
            return ServerError(f"The server at {url} asks for an API key (HTTP 401), and ${API_KEY_ENV} is only "
                               f"sent to the origins listed in ${API_KEY_ORIGINS_ENV}: if you trust this server, "
                               f"add {origin} to ${API_KEY_ORIGINS_ENV} (comma-separated).")
        return ServerError(f"The server at {url} asks for an API key (HTTP 401): set ${API_KEY_ENV} to the key it "
                           f"expects (never in a workflow) and add {origin} to ${API_KEY_ORIGINS_ENV}.")

    def _redirected(self, status: int, location: str | None) -> ServerError:
        target = "an address it did not give"
        if location:
            joined = urllib.parse.urljoin(self.endpoint.url + "/", location.strip())
            target = parse_origin(joined) or "an address that is not http(s)"
        return ServerError(f"The server at {self.endpoint.url} redirected the request (HTTP {status}) to "
                           f"{_clip(target, 200)}. Redirects are never followed (the API key must not travel to "
                           "another address): set server_url to the address that answers.")

    def _status_error(self, status: int, location: str | None, body: bytes, path: str,
                      should_stop: Callable[[], bool] | None = None) -> ServerError:
        url = self.endpoint.url
        if 300 <= status < 400:
            return self._redirected(status, location)
        if status == 401:
            return self._unauthorized()
        message = redact(_error_text(body))
        low = message.lower()
        if status == 404 and "model" in low and path == "/chat/completions":
            try:
                names = _names_text([m["id"] for m in self.list_models(should_stop)])
            except ServerError:
                names = "unknown"
            return ServerError(f"The server at {url} does not serve '{_clip(self.served_model, 100)}' (it serves: "
                               f"{names}); set server_model to one of those.")
        if status == 400 and any(w in low for w in ("context length", "maximum model length", "too long",
                                                    "max_model_len", "longer than")):
            return AnswerError(f"The prompt is too long for '{_clip(self.served_model, 100)}' at {url} "
                               f"({message}). Use a cheaper image_quality, fewer images, fewer max_new_tokens, "
                               "or a larger --max-model-len on the server.")
        cls = AnswerError if status in ANSWER_STATUSES else ServerError
        return cls(f"The server at {url} answered {path} with HTTP {status}: {message}")

    def _transport_error(self, exc: BaseException, abort: _Abort, what: str, limit: float) -> BaseException:
        """A fresh error for what happened to a request (never chained: the cause may quote the server's bytes)."""
        if abort.reason == "cancel":
            return GenerationInterrupted("Generation was interrupted.")
        if abort.reason == "deadline" or isinstance(exc, TimeoutError):
            return self._deadline_error(what, limit)
        if isinstance(exc, QwenVLError):
            message = str(exc)
            if isinstance(exc, AnswerError) and self.endpoint.url not in message:
                message = f"The server at {self.endpoint.url} {message}"  # the stream parser's words name no URL
            return type(exc)(message)
        if isinstance(exc, http.client.HTTPException) and not isinstance(exc, ConnectionError):
            # Its text is the server's raw bytes (a status line that may echo the Authorization header).
            return AnswerError(f"The server at {self.endpoint.url} sent something that is not an HTTP answer "
                               f"({type(exc).__name__}) for {what}: is server_url an OpenAI-compatible server?")
        if isinstance(exc, OSError):
            return ServerError(f"Cannot reach the server at {self.endpoint.url} ({type(exc).__name__}: "
                               f"{_clip(redact(str(exc)), 200)}). Start it (README: 'Server backend') or fix "
                               "server_url.")
        return ServerError(f"The request to {self.endpoint.url} failed ({type(exc).__name__}: "
                           f"{_clip(redact(str(exc)), 200)}).")

    # -- the server's models ----------------------------------------------------------------
    def _get_json(self, path: str, should_stop: Callable[[], bool] | None = None) -> Any:
        abort = _Abort()
        limit = min(self.timeout, MODELS_TIMEOUT_S)
        deadline = time.monotonic() + limit
        failure: BaseException | None = None
        status, location, body, over = 0, None, b"", False
        with _watchdog(abort, should_stop, deadline):
            conn = self.endpoint.connection(limit + _SOCKET_SLACK_S, abort, deadline)
            try:
                conn.request("GET", self.endpoint.prefix + path, headers=_headers(self.endpoint))
                resp = conn.getresponse()
                status, location = resp.status, resp.getheader("Location")
                body, over = _read_capped(resp, MAX_MODELS_BYTES if status == 200 else MAX_ERROR_BODY_BYTES)
                abort.check()  # a shut-down socket reads as a short body
            except (OSError, http.client.HTTPException, _Aborted) as exc:
                failure = self._transport_error(exc, abort, path, limit)
            finally:
                conn.close()
        if failure is not None:
            raise failure
        if status != 200:
            raise self._status_error(status, location, body, path)
        if over:
            raise ServerError(f"{self.endpoint.url}{path} sent more than {MAX_MODELS_BYTES >> 20} MiB: is server_url "
                              "an OpenAI-compatible server?")
        try:
            return json.loads(body.decode("utf-8", "replace"))
        except ValueError:
            pass  # raised below, outside this block: the decoder's error holds the whole body
        raise ServerError(f"{self.endpoint.url}{path} did not answer JSON: is server_url the OpenAI-compatible base "
                          "URL (ending in /v1)?")

    def list_models(self, should_stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
        url = self.endpoint.url
        data = self._get_json("/models", should_stop)
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise ServerError(f"{url}/models did not list models (no 'data' list): is this an OpenAI-compatible "
                              "server?")
        for m in models:
            if not isinstance(m, dict) or not isinstance(m.get("id"), str) or not m["id"]:
                shown = _clip(repr(m.get("id") if isinstance(m, dict) else m), 60)
                raise ServerError(f"{url}/models lists a model whose id is not a name ({shown}): is this an "
                                  "OpenAI-compatible server?")
        return models

    def _choose(self, served: list[dict[str, Any]], wanted: str) -> str:
        names = [m["id"] for m in served]
        wanted = (wanted or "").strip()
        if wanted:
            if wanted not in names:
                raise ServerError(f"The server at {self.endpoint.url} does not serve '{_clip(wanted, 100)}'; it "
                                  f"serves: {_names_text(names) or 'nothing'}. Set server_model to one of those.")
            return wanted
        if len(names) != 1:
            raise ServerError(f"The server at {self.endpoint.url} serves {len(names)} models "
                              f"({_names_text(names) or 'none'}): set server_model to the one to use.")
        return names[0]

    def _patch_geometry(self, served: list[dict[str, Any]]) -> tuple[int, int]:
        """Patch and merge size of the served family: from the server where it says, else from the name.

        A server's word is checked: it sizes every image (a patch of 50000 asked for terapixel resizes)."""
        entry = next(m for m in served if m["id"] == self.served_model)
        name = f"{entry.get('id', '')} {entry.get('root', '')}".lower()
        # Qwen3-VL and Qwen3.5 use 16-pixel patches, Qwen2/2.5-VL 14 (facts file); all merge 2x2.
        patch: Any = 16 if "qwen3" in name else 14
        for key in ("patch_size", "vision_patch_size"):
            if entry.get(key) is not None:
                patch = entry[key]
                break
        merge: Any = entry.get("spatial_merge_size")
        merge = QWEN_MERGE_SIZE if merge is None else merge
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (patch, merge))
        if not ok or patch not in QWEN_PATCH_SIZES or merge != QWEN_MERGE_SIZE:
            raise ServerError(f"The server at {self.endpoint.url} reports patch_size {_clip(repr(patch), 40)} and "
                              f"spatial_merge_size {_clip(repr(merge), 40)} for '{_clip(self.served_model, 100)}'; "
                              f"Qwen-VL models use patch_size {' or '.join(map(str, QWEN_PATCH_SIZES))} with "
                              f"spatial_merge_size {QWEN_MERGE_SIZE}. Serve a Qwen-VL model, or fix what the "
                              "server reports.")
        return patch, merge

    # -- images -----------------------------------------------------------------------------
    def _encode(self, canonical: torch.Tensor, size: tuple[int, int] | None) -> str:
        from PIL import Image

        img = Image.fromarray(canonical.numpy())
        if size is not None and (img.height, img.width) != size:
            img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        if self.upload_format == "jpeg":
            img.save(buf, format="JPEG", quality=95)
            mime = "image/jpeg"
        else:
            img.save(buf, format="PNG", compress_level=1)  # level 1: far faster, barely larger
            mime = "image/png"
        return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"

    def upload_memo_bytes(self) -> int:
        """Bytes the memo of encoded uploads holds now (at most ``UPLOAD_MEMO_BYTES``)."""
        with self._uploads_lock:
            return self._upload_bytes

    def _memoise(self, key: tuple, url: str) -> None:
        if len(url) > UPLOAD_MEMO_BYTES:
            return  # one upload larger than the whole memo would only push everything else out
        with self._uploads_lock:
            old = self._uploads.pop(key, None)
            self._upload_bytes += len(url) - (len(old) if old is not None else 0)
            self._uploads[key] = url
            while self._uploads and (self._upload_bytes > UPLOAD_MEMO_BYTES
                                     or len(self._uploads) > UPLOAD_MEMO_ENTRIES):
                _, dropped = self._uploads.popitem(last=False)
                self._upload_bytes -= len(dropped)

    def prepare_uploads(self, images: list[torch.Tensor], quality: str, mon: RunMonitor) -> list[dict[str, Any]]:
        """One data URL per image at the preset's size, and what the record shows about it."""
        quality = qp.validate_quality(quality)
        memo = get_cache(False).digests
        out = []
        for image in images:
            with mon.stage("hash"):
                seen = memo.get(image)
                canonical = None
                if seen is None:
                    canonical = canonicalize_image(image)
                    seen = (canonical_digest(canonical), (int(canonical.shape[0]), int(canonical.shape[1])), None)
                digest, size_in, score = seen
                if quality == qp.AUTO and score is None:
                    canonical = canonical if canonical is not None else canonicalize_image(image)
                    score = qp.detail_score(canonical)
                if canonical is not None:
                    memo.put(image, (digest, size_in, score))
                budget = qp.resolve_budget(quality, self.factor, None, canonical, score=score)
                size = None if quality == qp.NATIVE else qp.target_size(size_in[0], size_in[1], self.factor, budget)
            key = (digest, size, self.upload_format)
            with self._uploads_lock:
                url = self._uploads.get(key)
                if url is not None:
                    self._uploads.move_to_end(key)
            tier = "client-memo"
            if url is None:
                tier = "encoded"
                with mon.stage("preprocess"):
                    canonical = canonical if canonical is not None else canonicalize_image(image)
                    url = self._encode(canonical, size)
                self._memoise(key, url)
            # `native` leaves the size to the server's own limits: the count shown assumes none bind.
            shown = size or qp.smart_resize(size_in[0], size_in[1], self.factor, self.factor ** 2, 1 << 40)
            out.append({"url": url, "record": {
                "size_in": list(size_in), "size_resized": list(shown), "preset": budget.label,
                "tokens": (shown[0] // self.factor) * (shown[1] // self.factor),
                "detail_score": budget.detail_score, "cache": tier, "upload_bytes": len(url)}})
        return out

    # -- requests ---------------------------------------------------------------------------
    def _body(self, req: GenerationRequest, uploads: list[dict[str, Any]]) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u["url"]}} for u in uploads]
        content.append({"type": "text", "text": req.prompt})
        messages: list[dict[str, Any]] = []
        if req.system_prompt.strip():
            messages.append({"role": "system", "content": req.system_prompt})
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {
            "model": self.served_model, "messages": messages, "max_tokens": int(req.max_new_tokens),
            "stream": True, "stream_options": {"include_usage": True}, "seed": int(req.seed) % (2**63),
        }
        if req.do_sample and float(req.temperature) > 0:
            body.update(temperature=float(req.temperature), top_p=float(req.top_p))
            if int(req.top_k) > 0:
                body["top_k"] = int(req.top_k)  # vLLM and SGLang take it; others ignore unknown fields
        else:
            body["temperature"] = 0.0
        if req.repetition_penalty and float(req.repetition_penalty) != 1.0:
            body["repetition_penalty"] = float(req.repetition_penalty)
        if req.min_new_tokens:
            body.update(min_tokens=int(req.min_new_tokens))
            if req.min_new_tokens >= req.max_new_tokens:
                body["ignore_eos"] = True  # fixed-length answers (benchmarks), where the server supports it
        return body

    def _open(self, stream: _Stream) -> http.client.HTTPResponse:
        """POST the request, retrying 429/5xx and dropped connections with backoff; the open response."""
        payload = json.dumps(stream.body).encode()
        abort, deadline = stream.abort, stream.deadline or time.monotonic() + self.timeout
        delay = 0.5
        retries = max(0, int(self.options.server_retries))
        path = "/chat/completions"
        for attempt in range(retries + 1):
            abort.check()
            conn = self.endpoint.connection(self.timeout + _SOCKET_SLACK_S, abort, deadline)
            stream.connection = conn
            t0 = time.perf_counter()
            try:
                conn.request("POST", self.endpoint.prefix + path, body=payload, headers=_headers(self.endpoint))
                resp = conn.getresponse()
            except ConnectionError as exc:  # refused, reset, or closed before answering: maybe a restart
                conn.close()
                abort.check()
                if attempt < retries:
                    log.info("[QwenVL-Fast] %s dropped the connection (%s); retrying in %.1fs", self.endpoint.url,
                             type(exc).__name__, delay)
                    abort.event.wait(delay)
                    delay *= 2
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            stream.upload_s += time.perf_counter() - t0
            if resp.status == 200:
                return resp
            body, _ = _read_capped(resp, MAX_ERROR_BODY_BYTES)
            conn.close()
            abort.check()
            if resp.status in RETRY_STATUSES and attempt < retries:
                wait = delay
                retry_after = (resp.getheader("Retry-After") or "").strip()
                if retry_after.isdigit():
                    wait = min(float(retry_after), 30.0)
                log.info("[QwenVL-Fast] %s answered HTTP %d; retrying in %.1fs", self.endpoint.url, resp.status,
                         wait)
                abort.event.wait(wait)  # Cancel and the deadline wake it
                delay *= 2
                continue
            raise self._status_error(resp.status, resp.getheader("Location"), body, path,
                                     should_stop=lambda: abort.reason is not None)
        raise ServerError(f"The server at {self.endpoint.url} stayed busy after {retries} retries.")

    def _cut_off(self, stream: _Stream) -> AnswerError:
        return AnswerError(f"The answer from {self.endpoint.url} was cut off: its stream ended after "
                           f"{stream.tokens} tokens without a finish_reason or [DONE] (the server stopped or dropped "
                           "the connection mid-answer). Run it again; check the server's log if it repeats.")

    @staticmethod
    def _completed(stream: _Stream) -> None:
        stream.complete = True
        stream.deadline = min(stream.deadline or float("inf"), time.monotonic() + FINISH_GRACE_S)

    def _read_stream(self, stream: _Stream, resp: http.client.HTTPResponse) -> None:
        """Read server-sent events up to a finish, ``[DONE]`` or ``max_new_tokens`` tokens (then stop reading)."""
        t_headers = time.perf_counter()
        t_first: float | None = None
        decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character may span two events
        cap = max(1, stream.max_new_tokens)
        past_cap = 0  # events read since the cap was reached, waiting for the finish and usage chunks
        usage_seen = False
        try:
            for event in _sse_events(resp):
                if event is None:  # [DONE]
                    stream.complete = True
                    break
                usage = event.get("usage")
                if isinstance(usage, dict):
                    usage_seen = True
                    stream.prompt_tokens = _count(usage.get("prompt_tokens"))
                    stream.completion_tokens = _count(usage.get("completion_tokens"))
                choices = event.get("choices") or []
                if not isinstance(choices, list):
                    raise AnswerError("sent an event whose 'choices' is not a list")
                for choice in choices:
                    if not isinstance(choice, dict):
                        raise AnswerError("sent an event whose choice is not an object")
                    delta = choice.get("delta") or {}
                    content = delta.get("content") if isinstance(delta, dict) else None
                    if content:  # one streamed chunk per token (the final usage gives the exact count)
                        if not isinstance(content, str):
                            raise AnswerError("sent a delta whose content is not text")
                        if t_first is None:
                            t_first = time.perf_counter()
                            stream.first_token_s = t_first - t_headers
                        if stream.tokens < cap:  # past the cap a server is not listening: its text is not kept
                            stream.text += decoder.decode(_raw_bytes(content))
                        stream.tokens += 1
                    if choice.get("finish_reason"):
                        stream.finish_reason = _clip(str(choice["finish_reason"]), 40)
                        self._completed(stream)
                if stream.complete and usage_seen:
                    break  # nothing more to wait for; [DONE] or the close may never come
                if stream.tokens >= cap:
                    if not stream.complete:  # the cap ends an answer, whatever a server goes on sending
                        stream.finish_reason = "length"
                        self._completed(stream)
                    past_cap += 1
                    if past_cap > TOKEN_SLACK_EVENTS:
                        break
        except TimeoutError:
            raise
        except (OSError, http.client.IncompleteRead):
            stream.abort.check()
            if not stream.complete:
                raise self._cut_off(stream) from None
        stream.text += decoder.decode(b"", final=True)
        if not stream.complete:
            stream.abort.check()  # a shut-down socket reads as the end of the stream
            raise self._cut_off(stream)
        if t_first is not None:
            stream.decode_s = time.perf_counter() - t_first

    def _read_json_answer(self, stream: _Stream, resp: http.client.HTTPResponse) -> None:
        """A 200 with ``application/json``: one non-streamed chat completion (a server that ignores ``stream``)."""
        url = self.endpoint.url
        t0 = time.perf_counter()
        body, over = _read_capped(resp, MAX_JSON_ANSWER_BYTES)
        stream.abort.check()
        if over:
            raise AnswerError(f"The server at {url} sent an answer larger than {MAX_JSON_ANSWER_BYTES >> 20} MiB.")
        try:
            data = json.loads(body.decode("utf-8", "replace"))
        except ValueError:
            raise AnswerError(f"The server at {url} answered with invalid JSON "
                              f"({_clip(redact(body.decode('utf-8', 'replace')), 80)}).") from None
        choices = data.get("choices") if isinstance(data, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict) or not isinstance(content, (str, type(None))):
            raise AnswerError(f"The server at {url} answered with JSON that is not a chat completion (no "
                              "choices[0].message.content): is server_url an OpenAI-compatible server?")
        stream.text = content or ""
        stream.finish_reason = _clip(str(choice.get("finish_reason") or "stop"), 40)
        usage = data.get("usage")
        if isinstance(usage, dict):
            stream.prompt_tokens = _count(usage.get("prompt_tokens"))
            stream.completion_tokens = _count(usage.get("completion_tokens"))
        stream.tokens = stream.completion_tokens or (1 if stream.text else 0)
        stream.first_token_s = time.perf_counter() - t0
        stream.complete = True

    def _consume(self, stream: _Stream) -> None:
        """Run one request to its end (in a worker thread); errors land in ``stream.error``."""
        stream.deadline = time.monotonic() + self.timeout
        try:
            resp = self._open(stream)
            if (resp.getheader("Content-Type") or "").lower().startswith("application/json"):
                self._read_json_answer(stream, resp)
            else:
                self._read_stream(stream, resp)
        except BaseException as exc:  # handed to the caller's thread
            if not (stream.complete and stream.abort.reason == "deadline"):  # late only for the closing chunks
                stream.error = self._transport_error(exc, stream.abort, "the answer", self.timeout)
        finally:
            if stream.connection is not None:
                stream.connection.close()  # on Cancel this is what makes the server abort the request
            stream.done = True

    def run(self, req: GenerationRequest) -> GenerationResult:
        if not self.usable:
            raise QwenVLError("This server connection was closed; run the loader again.")
        if req.batch_mode not in BATCH_MODES:
            raise QwenVLError(f"Unknown batch_mode '{req.batch_mode}': choose one of {BATCH_MODES}.")
        if req.videos:
            # The pack's video path (sampling, clip budget, cache) runs the local model; a server samples and
            # sizes video itself, from a video file it can fetch, which a frames tensor is not.
            raise QwenVLError("Video runs on the local backend only: set backend to 'local' for a video input.")
        mon = RunMonitor(enabled=req.monitor)
        rec = mon.record
        rec.model = f"{self.served_model} @ {self.endpoint.url}"
        rec.family = f"server (patch {self.patch_size})"
        rec.device, rec.dtype, rec.quantization, rec.attention = "server", "", "server", "server"
        rec.quality = qp.validate_quality(req.image_quality)
        uploads = self.prepare_uploads(req.images, req.image_quality, mon)
        for i, u in enumerate(uploads):
            rec.images.append({"index": i, **u["record"]})
        one_each = req.batch_mode == BATCH_MODES[1] and len(uploads) > 1
        groups = [[u] for u in uploads] if one_each else [uploads]
        streams = [_Stream(i, self._body(req, g), max_new_tokens=int(req.max_new_tokens))
                   for i, g in enumerate(groups)]
        errors = self._run_streams(streams, req, rec)
        texts, thoughts = [], []
        for s, error in zip(streams, errors):
            answer, thinking = split_thinking(s.text) if error is None else ("", "")
            texts.append(answer)
            thoughts.append(thinking)
            rec.prompt_tokens += s.prompt_tokens
            received = min(s.tokens, s.max_new_tokens)  # what a server sends past the cap is not kept
            rec.new_tokens += s.completion_tokens if s.completion_tokens is not None else received
            mon.add("upload", s.upload_s)  # request sent until the server's first byte: upload + queue
            mon.add("prefill", s.first_token_s)
            mon.add("decode", s.decode_s)
        rec.server = {"url": self.endpoint.url, "model": self.served_model, "requests": len(streams),
                      "in_flight": min(self.max_in_flight, len(streams)),
                      "upload_bytes": sum(u["record"]["upload_bytes"] for u in uploads),
                      "prompt_tokens": [s.prompt_tokens for s in streams],
                      "time_to_first_token_s": [round(s.upload_s + s.first_token_s, 4) for s in streams],
                      "finish_reasons": [s.finish_reason for s in streams]}
        if any(e is not None for e in errors):
            rec.server["failed_answers"] = sum(e is not None for e in errors)
        mon.finish()
        if len(streams) > 1 and rec.total_s > 0:
            # Stage times are summed over requests that overlapped: per answer, not per wall second.
            rec.server["stage_times"] = "summed over concurrent requests"
        return GenerationResult(texts, thoughts, rec, [[] for _ in streams],
                                errors=errors if req.per_answer_errors else [])

    def _run_streams(self, streams: list[_Stream], req: GenerationRequest, rec: RunRecord) -> list[str | None]:
        """Keep up to ``max_in_flight`` requests streaming; progress, partial text, Cancel and deadlines from this
        thread. Returns each answer's error (None where it succeeded) when the request takes per-answer errors."""
        cancelled = False
        total = len(streams) * int(req.max_new_tokens)
        last_progress, last_text = -1, 0

        def abort_all(reason: str) -> None:
            for s in streams:
                s.abort.fire(reason)

        with ThreadPoolExecutor(max_workers=min(self.max_in_flight, len(streams)),
                                thread_name_prefix="qwenvl-server") as pool:
            futures = [pool.submit(self._consume, s) for s in streams]
            try:
                while not all(f.done() for f in futures):
                    if req.should_stop is not None and req.should_stop():
                        cancelled = True
                        abort_all("cancel")
                        break
                    now = time.monotonic()
                    for s in streams:
                        if s.deadline is not None and not s.done and now >= s.deadline:
                            s.abort.fire("deadline")  # the watchdog: a trickling server cannot hold the run
                    done_tokens = sum(min(s.tokens, int(req.max_new_tokens)) for s in streams)
                    if req.on_progress is not None and done_tokens != last_progress:
                        req.on_progress(done_tokens, total)
                        last_progress = done_tokens
                    if req.on_text is not None:
                        current = next((s for s in streams if not s.done), streams[-1])
                        if current.tokens - last_text >= STREAM_EVERY_TOKENS:
                            req.on_text(current.text)
                            last_text = current.tokens
                    time.sleep(_POLL_S)
            except BaseException:
                abort_all("cancel")
                raise
        if cancelled or any(isinstance(s.error, GenerationInterrupted) for s in streams):
            rec.interrupted = True
            raise GenerationInterrupted("Generation was interrupted.")
        for s in streams:
            # Faults that hit every answer raise, and any fault where the caller takes no per-answer errors.
            if s.error is not None and (not req.per_answer_errors or not isinstance(s.error, AnswerError)):
                raise s.error
        errors = [str(s.error) if s.error is not None else None for s in streams]
        for s, error in zip(streams, errors):
            if error is not None:
                log.warning("[QwenVL-Fast] answer %d failed on its own: %s", s.index + 1, error)
        if req.on_progress is not None:
            req.on_progress(total, total)
        if req.on_text is not None:
            req.on_text(streams[-1].text)
        return errors

    def tips(self, rec: RunRecord) -> list[str]:
        """What the client-side numbers suggest."""
        tips = []
        server = getattr(rec, "server", None) or {}
        if rec.decode_tokens_per_s is not None and rec.decode_tokens_per_s < 5:
            tips.append(f"The server decodes at {rec.decode_tokens_per_s:.1f} tokens/s: far below a GPU's rate; "
                        "check that it runs on a GPU and has KV-cache room (vLLM: --gpu-memory-utilization).")
        if server.get("requests", 0) > server.get("in_flight", 1) and server.get("in_flight", 1) < 4:
            tips.append(f"Only {server.get('in_flight')} request(s) in flight for {server.get('requests')} answers: "
                        "raise server_max_in_flight so the server can batch them.")
        return tips
