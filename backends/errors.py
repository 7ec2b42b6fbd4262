"""The server backend's error types and the rules for quoting a server in them (bounded, never the raw body).

What a server says is quoted in a short excerpt on one line, control characters replaced: an error message
must not become a way to read whatever answers at an address (a workflow may name a local service), nor
carry terminal escapes or fake log lines into ComfyUI's console."""

from __future__ import annotations

import json

from ..core.errors import QwenVLError

MAX_LISTED_NAMES = 20
MAX_SERVER_TEXT = 200  # characters of the server's own words quoted in an error


class ServerError(QwenVLError):
    """The server could not answer; the message names the URL and what to do."""


class AnswerError(ServerError):
    """One answer failed on its own (cut off, malformed, refused for its content, past its deadline)."""


def clip(text: str, limit: int = MAX_SERVER_TEXT) -> str:
    """``text`` on one line (control and other unprintable characters as '?'), at most ``limit`` characters."""
    text = text[: limit + 1]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit] + " …"


def names_text(names: list[str]) -> str:
    """At most ``MAX_LISTED_NAMES`` names: a server listing 300,000 models must not make a 4 MB error."""
    shown = ", ".join(clip(n, 100) for n in names[:MAX_LISTED_NAMES])
    more = len(names) - MAX_LISTED_NAMES
    return shown + (f" … and {more} more" if more > 0 else "")


def error_text(body: bytes) -> str:
    """The message of an error body (OpenAI's ``{"error": {"message": ...}}`` or FastAPI's ``detail``), clipped."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return clip(text)
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return clip(str(err.get("message") or err.get("detail") or err))
    return clip(str(err))
