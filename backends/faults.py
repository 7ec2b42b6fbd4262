"""What went wrong with a request to one server, in words that name its URL and the fix.

Every error here is made fresh, never chained to what caused it: a cause may quote the server's raw bytes (a
status line that echoes the Authorization header), and nothing the pack shows may carry the API key.
"""

from __future__ import annotations

import http.client
import urllib.parse
from collections.abc import Callable

from ..core.errors import GenerationInterrupted, QwenVLError
from .api_key import API_KEY_ENV, API_KEY_ORIGINS_ENV, api_key, key_origins, parse_origin, redact
from .errors import AnswerError, ServerError, clip, error_text, names_text
from .http_transport import Abort, Endpoint

# Statuses that speak of one request only (its image, its length): with ``per_answer_errors`` they fail that
# answer alone. Everything else (refused key, unknown model, a redirect, a server down) hits every answer.
ANSWER_STATUSES = (400, 413, 422)
CHAT_PATH = "/chat/completions"
_TOO_LONG_WORDS = ("context length", "maximum model length", "too long", "max_model_len", "longer than",
                   "exceeds the available context size")  # the last: llama-server's words


class Faults:
    """The errors of requests to ``endpoint``."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    @property
    def url(self) -> str:
        return self.endpoint.url

    def deadline(self, what: str, limit: float) -> AnswerError:
        return AnswerError(f"The server at {self.url} did not finish {what} within the {limit:g}s "
                           "deadline (server_timeout_s, for a whole request): it may be overloaded, stuck or "
                           "still starting; raise server_timeout_s for long answers (Load Model's or the all-in-one "
                           "node's server_timeout_s input, or --server-timeout on the command line).")

    def cut_off(self, tokens: int) -> AnswerError:
        return AnswerError(f"The answer from {self.url} was cut off: its stream ended after {tokens} tokens "
                           "without a finish_reason or [DONE] (the server stopped or dropped the connection "
                           "mid-answer). Run it again; check the server's log if it repeats.")

    def unauthorized(self) -> ServerError:
        url, origin = self.url, self.endpoint.origin
        if api_key() and origin in key_origins():
            return ServerError(f"The server at {url} refused the API key: set ${API_KEY_ENV} to the key it "
                               "expects (never in a workflow).")
        if api_key():
            return ServerError(f"The server at {url} asks for an API key (HTTP 401), and ${API_KEY_ENV} is only "
                               f"sent to the origins listed in ${API_KEY_ORIGINS_ENV}: if you trust this server, "
                               f"add {origin} to ${API_KEY_ORIGINS_ENV} (comma-separated).")
        return ServerError(f"The server at {url} asks for an API key (HTTP 401): set ${API_KEY_ENV} to the key it "
                           f"expects (never in a workflow) and add {origin} to ${API_KEY_ORIGINS_ENV}.")

    def redirected(self, status: int, location: str | None) -> ServerError:
        target = "an address it did not give"
        if location:
            joined = urllib.parse.urljoin(self.url + "/", location.strip())
            target = parse_origin(joined) or "an address that is not http(s)"
        return ServerError(f"The server at {self.url} redirected the request (HTTP {status}) to "
                           f"{clip(target, 200)}. Redirects are never followed (the API key must not travel to "
                           "another address): set server_url to the address that answers.")

    def status(self, status: int, location: str | None, body: bytes, path: str, served_model: str = "",
               served_names: Callable[[], list[str]] | None = None) -> ServerError:
        """A non-200 answer; ``served_names`` lists the server's models for a 404 about the model."""
        if 300 <= status < 400:
            return self.redirected(status, location)
        if status == 401:
            return self.unauthorized()
        message = redact(error_text(body))
        low = message.lower()
        model = clip(served_model, 100)
        if status == 404 and "model" in low and path == CHAT_PATH:
            try:
                names = names_text(served_names()) if served_names is not None else "unknown"
            except ServerError:
                names = "unknown"
            return ServerError(f"The server at {self.url} does not serve '{model}' (it serves: {names}); set "
                               "server_model to one of those.")
        if status == 400 and path == CHAT_PATH and any(w in low for w in _TOO_LONG_WORDS):
            return AnswerError(f"The prompt is too long for '{model}' at {self.url} ({message}). Use a cheaper "
                               "image_quality, fewer images, fewer max_new_tokens, or a larger context on the "
                               "server (vLLM: --max-model-len; llama-server: -c, or $QWENVL_FAST_LLAMA_CONTEXT "
                               "for a .gguf model the pack starts).")
        cls = AnswerError if status in ANSWER_STATUSES else ServerError
        return cls(f"The server at {self.url} answered {path} with HTTP {status}: {message}")

    def transport(self, exc: BaseException, abort: Abort, what: str, limit: float) -> BaseException:
        """A fresh error for what happened to a request."""
        if abort.reason == "cancel":
            return GenerationInterrupted("Generation was interrupted.")
        if abort.reason == "deadline" or isinstance(exc, TimeoutError):
            return self.deadline(what, limit)
        if isinstance(exc, QwenVLError):
            message = str(exc)
            if isinstance(exc, AnswerError) and self.url not in message:
                message = f"The server at {self.url} {message}"  # the stream parser's words name no URL
            return type(exc)(message)
        if isinstance(exc, http.client.HTTPException) and not isinstance(exc, ConnectionError):
            # Its text is the server's raw bytes (a status line that may echo the Authorization header).
            return AnswerError(f"The server at {self.url} sent something that is not an HTTP answer "
                               f"({type(exc).__name__}) for {what}: is server_url an OpenAI-compatible server?")
        if isinstance(exc, OSError):
            return ServerError(f"Cannot reach the server at {self.url} ({type(exc).__name__}: "
                               f"{clip(redact(str(exc)), 200)}). Start it (README: 'Server backend') or fix "
                               "server_url.")
        return ServerError(f"The request to {self.url} failed ({type(exc).__name__}: "
                           f"{clip(redact(str(exc)), 200)}).")
