"""HTTP for the server backend, standard library only: the endpoint, its headers, and connections that Cancel and a
whole-request deadline can end from another thread.

Closing an ``HTTPConnection`` from another thread does not wake a thread blocked in ``recv``; shutting its socket
down does. So every socket a request opens is registered with its :class:`Abort`, connecting is non-blocking
underneath (polled against Cancel and the deadline), a TLS handshake runs on a registered socket, and a
:func:`watchdog` thread fires the abort while the caller blocks. Bodies are read up to a byte cap.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .api_key import API_KEY_ENV, host_text, key_for, origin_text
from .errors import ServerError, clip

POLL_S = 0.05
# Sockets' own timeout past the deadline: only a backstop, the watchdog ends a late request first.
SOCKET_SLACK_S = 5.0
MAX_ERROR_BODY_BYTES = 64 << 10
_CONNECT_IN_PROGRESS = {0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY,
                        getattr(errno, "WSAEWOULDBLOCK", errno.EWOULDBLOCK)}


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
        shown = clip(url, 200)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServerError(f"server_url '{shown}' is not an http(s) URL like http://127.0.0.1:8000/v1.")
        if parts.username or parts.password:
            raise ServerError(f"server_url must not carry credentials; put the API key in ${API_KEY_ENV}.")
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
        return f"{self.scheme}://{host_text(self.host)}:{self.port}{self.prefix}"

    @property
    def origin(self) -> str:
        return origin_text(self.scheme, self.host, self.port)

    def connection(self, timeout: float, abort: Abort | None = None,
                   deadline: float | None = None) -> http.client.HTTPConnection:
        """A connection whose connect, TLS handshake and reads ``abort`` can end from another thread."""
        abort = abort or Abort()
        deadline = deadline if deadline is not None else time.monotonic() + timeout
        cls = _HTTPSConnection if self.scheme == "https" else _HTTPConnection
        return cls(self.host, self.port, timeout, abort, deadline)


def request_headers(endpoint: Endpoint) -> dict[str, str]:
    """The request headers; the API key only for an origin the user listed (never one a workflow alone names)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    key = key_for(endpoint.origin)
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return headers


# -- sockets that another thread can interrupt ---------------------------------------------------------------
class Aborted(Exception):
    """A request's sockets were shut down from another thread; ``Abort.reason`` says why."""


def _shutdown(sock: socket.socket) -> None:
    try:
        # The plain socket's shutdown even for a TLS socket: ssl's own would drop its state under the reader.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass  # not connected yet (the connect loop polls the reason) or already closed


class Abort:
    """Ends one request's blocking socket calls from another thread: Cancel and the deadline.

    ``fire`` shuts every registered socket down (a blocked read returns at once); connecting polls ``reason``."""

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
            raise Aborted(self.reason)


def _resolve(host: str, port: int, abort: Abort, deadline: float) -> list:
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
        worker.join(POLL_S)
    if "error" in box:
        raise box["error"]
    return box["infos"]


def _connect(address: tuple[str, int], timeout: float, abort: Abort, deadline: float) -> socket.socket:
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
                _, writable, failed = select.select([], [sock], [sock], min(POLL_S, left))
                if writable or failed:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise OSError(code, os.strerror(code))
                    break
            sock.settimeout(timeout)
            return sock
        except (TimeoutError, Aborted):
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
    def __init__(self, host: str, port: int, timeout: float, abort: Abort, deadline: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.abort, self.deadline = abort, deadline
        self._create_connection = self._interruptible_connect  # http.client's own hook for making the socket

    def _interruptible_connect(self, address: tuple[str, int], timeout: float, source_address: Any = None
                               ) -> socket.socket:
        return _connect(address, timeout, self.abort, self.deadline)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, timeout: float, abort: Abort, deadline: float) -> None:
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
def watchdog(abort: Abort, should_stop: Callable[[], bool] | None, deadline: float) -> Iterator[None]:
    """Fires ``abort`` on Cancel or at the deadline while the calling thread blocks on the request."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(POLL_S):
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


def read_capped(resp: http.client.HTTPResponse, cap: int) -> tuple[bytes, bool]:
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
