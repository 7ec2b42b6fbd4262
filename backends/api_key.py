"""The API key: read from ``$QWENVL_FAST_API_KEY`` only, sent only to the origins ``$QWENVL_FAST_API_KEY_ORIGINS``
lists (never to an address a workflow alone names), and redacted from everything the pack shows or logs.

A server the pack starts itself (``llama_server.py``) gets a fresh random key of its own at every start,
registered here for its loopback origin only (:func:`register_server_key`) and forgotten when it stops: the
pack sends it, nothing else on the machine has it."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import urllib.parse

from .errors import ServerError, clip

log = logging.getLogger("QwenVL-Fast")

API_KEY_ENV = "QWENVL_FAST_API_KEY"
API_KEY_ORIGINS_ENV = "QWENVL_FAST_API_KEY_ORIGINS"

_WARNED_ORIGINS: set[str] = set()
_SERVER_KEYS: dict[str, str] = {}  # origin -> key of a server this process started (llama-server)
_SERVER_KEYS_LOCK = threading.Lock()


def api_key() -> str:
    return os.environ.get(API_KEY_ENV, "").strip()


def new_server_key() -> str:
    """A fresh random key for a server the pack starts (256 bits, URL-safe: fits an HTTP header)."""
    return secrets.token_urlsafe(32)


def register_server_key(origin: str, key: str) -> None:
    """Send ``key`` to ``origin`` (a server the pack started on loopback) until :func:`forget_server_key`."""
    check_key(key)
    with _SERVER_KEYS_LOCK:
        _SERVER_KEYS[origin] = key


def forget_server_key(origin: str) -> None:
    with _SERVER_KEYS_LOCK:
        _SERVER_KEYS.pop(origin, None)


def _server_key(origin: str) -> str | None:
    with _SERVER_KEYS_LOCK:
        return _SERVER_KEYS.get(origin)


def redact(text: str) -> str:
    """``text`` with the API key and the pack's own servers' keys replaced: nothing shown or logged carries them."""
    with _SERVER_KEYS_LOCK:
        keys = [k for k in (api_key(), *_SERVER_KEYS.values()) if k]
    for key in keys:
        text = text.replace(key, "***")
    return text


def host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def origin_text(scheme: str, host: str, port: int | None) -> str:
    """The normalised origin, as written in ``$QWENVL_FAST_API_KEY_ORIGINS``: lowercase, default port left out.

    ``localhost`` and ``127.0.0.1`` stay different origins: the list names exactly what the user trusts."""
    scheme = scheme.lower()
    default = 443 if scheme == "https" else 80
    text = f"{scheme}://{host_text(host.lower())}"
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
                            "http://127.0.0.1:8000; ignored", API_KEY_ORIGINS_ENV, clip(entry.strip(), 100))
            continue
        origins.add(origin)
    return origins


def key_for(origin: str) -> str | None:
    """The key to send to ``origin``: its own for a server the pack started, else ``$QWENVL_FAST_API_KEY`` for
    an origin the user listed; None otherwise."""
    own = _server_key(origin)
    if own is not None:
        return own
    key = api_key()
    if not key or origin not in key_origins():
        return None
    check_key(key)
    return key


def check_key(key: str) -> None:
    # http.client would refuse such a key with a ValueError that quotes the whole header, key and all.
    if any(not (" " <= c <= "~" or "\xa0" <= c <= "\xff") for c in key):
        raise ServerError(f"${API_KEY_ENV} holds a character that cannot be sent in an HTTP header (a newline, a "
                          "control character or a character outside Latin-1): set it to the key alone, on one "
                          "line.")
