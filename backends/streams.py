"""Chat requests to a server, several in flight: their bodies, retries, the streamed answers, Cancel and deadlines.

An answer counts only when it ends with a ``finish_reason`` or ``[DONE]``, and it is complete only when that
reason is ``stop`` (:func:`ending_of_finish`; a bare ``[DONE]`` is an aborted answer); reading stops at
``max_new_tokens`` received tokens (a server that goes on is not listened to: the answer is cut);
``server_timeout_s`` is a deadline for a whole request from the moment its worker starts, watched from the
caller's thread. Answers come back in input order.
"""

from __future__ import annotations

import codecs
import http.client
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..core.api import ABORTED, CANCELLED, COMPLETE, CUT, FAILED, FILTERED, GenerationRequest
from ..core.errors import GenerationInterrupted
from ..core.sampling import Sampling
from ..engine.structured import TAGS_MAX_CHARS, TAGS_MAX_COUNT, TAGS_REGEX, OutputSpec, spec_of
from ..perf_monitor import RunRecord
from .api_key import redact
from .errors import AnswerError, ServerError, clip
from .faults import CHAT_PATH, Faults
from .http_transport import MAX_ERROR_BODY_BYTES, POLL_S, SOCKET_SLACK_S, Abort, Endpoint, read_capped, request_headers
from .sse import raw_bytes, sse_events

log = logging.getLogger("QwenVL-Fast")

RETRY_STATUSES = (429, 502, 503, 504)
MAX_JSON_ANSWER_BYTES = 16 << 20
# Events read past max_new_tokens received tokens, for a server's closing finish/usage chunk.
TOKEN_SLACK_EVENTS = 4
# After the finish (or the token cap) the closing usage chunk and [DONE] get this long before the answer stands.
FINISH_GRACE_S = 5.0
STREAM_EVERY_TOKENS = 8
# engine.structured.TAGS_REGEX as a GBNF grammar, for llama.cpp's llama-server, which takes a ``grammar`` field and
# ignores vLLM's regex field.
TAGS_GBNF = (f'root ::= tag (", " tag){{0,{TAGS_MAX_COUNT - 1}}}\n'
             f"tag ::= [a-z0-9] ([a-z0-9 _-]{{0,{TAGS_MAX_CHARS - 2}}} [a-z0-9])?\n")


def sampling_fields(s: Sampling) -> dict[str, Any]:
    """The OpenAI body's form of the request's sampling (``top_k``, ``min_tokens``, ``ignore_eos``,
    ``repetition_penalty``: vLLM and SGLang take them; other servers ignore unknown fields)."""
    fields: dict[str, Any] = {"max_tokens": s.max_new_tokens, "seed": s.seed}
    if s.greedy:
        fields["temperature"] = 0.0
    else:
        fields.update(temperature=s.temperature, top_p=s.top_p)
        if s.top_k > 0:
            fields["top_k"] = s.top_k
    if s.repetition_penalty is not None:
        fields["repetition_penalty"] = s.repetition_penalty
    if s.min_new_tokens:
        fields["min_tokens"] = s.min_new_tokens
        if s.fixed_length:
            fields["ignore_eos"] = True  # fixed-length answers (benchmarks), where the server supports it
    return fields


def chat_body(req: GenerationRequest, model: str, uploads: list[dict[str, Any]],
              llama_cpp: bool = False) -> dict[str, Any]:
    """One streamed chat completion: the uploads' images, then the prompt (``llama_cpp``: the server is
    llama.cpp's llama-server, see :func:`structured_fields`)."""
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u["url"]}} for u in uploads]
    content.append({"type": "text", "text": req.prompt})
    messages: list[dict[str, Any]] = []
    if req.system_prompt.strip():
        messages.append({"role": "system", "content": req.system_prompt})
    messages.append({"role": "user", "content": content})
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True,
                            "stream_options": {"include_usage": True}}
    body.update(sampling_fields(Sampling.from_request(req)))
    spec = spec_of(req)
    if spec.constrained:  # the grammar decides where the answer ends: a forced length would fight it
        body.pop("min_tokens", None)
        body.pop("ignore_eos", None)
    body.update(structured_fields(spec, llama_cpp))
    return body


def structured_fields(spec: OutputSpec, llama_cpp: bool = False) -> dict[str, Any]:
    """The OpenAI body's form of the request's output format (engine/structured.py).

    ``json``: the standard ``response_format`` of type ``json_schema`` (strict), which vLLM, SGLang and
    llama.cpp's llama-server take. ``tags``: for llama-server (``llama_cpp``) its ``grammar`` field with
    :data:`TAGS_GBNF`; for the others vLLM's documented ``structured_outputs: {"regex": ...}`` (vLLM 0.32).
    Servers that do not know a field ignore it, and every answer is checked against the format on arrival
    (``engine.structured.check_answer``).
    """
    if spec.output_format == "json":
        # Whitespace is the server's setting: vLLM 0.32 ignores a request's own disable_any_whitespace (only
        # --structured-outputs-config sets it), and its default grammar lets weak or random weights write
        # whitespace until max_tokens; README "Structured output" gives the server flag.
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "answer", "schema": spec.schema, "strict": True}}}
    if spec.output_format == "tags":
        return {"grammar": TAGS_GBNF} if llama_cpp else {"structured_outputs": {"regex": TAGS_REGEX}}
    return {}


# finish_reason -> ending: OpenAI's and vLLM's words, and llama.cpp's older "eos" / "limit". Any other reason (vLLM's
# "abort", a server's own words) is an aborted answer, its reason kept for the warning.
_FINISH_ENDINGS = {"stop": COMPLETE, "eos": COMPLETE, "length": CUT, "limit": CUT, "max_tokens": CUT,
                   "content_filter": FILTERED}


def ending_of_finish(reason: str | None) -> str:
    """How an answer that the server ended with ``finish_reason`` ended (None: a bare ``[DONE]``, no reason)."""
    if not reason:
        return ABORTED
    return _FINISH_ENDINGS.get(reason.strip().lower(), ABORTED)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


@dataclass
class Stream:
    """One answer's streaming state, shared between its worker thread and the caller's thread."""

    index: int
    body: dict[str, Any]
    max_new_tokens: int = 256
    text: str = ""
    reasoning: str = ""  # a reasoning parser's separate field (vLLM: reasoning_content / reasoning)
    tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int | None = None
    upload_s: float = 0.0
    first_token_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str | None = None
    complete: bool = False  # the server ended it (a finish_reason, [DONE]) or the reader's cap did
    dropped: bool = False  # the stream closed before either
    server_finished: bool = False  # the server sent its finish_reason (not the reader's cap)
    t_headers: float = 0.0
    t_first: float | None = None
    error: BaseException | None = None
    done: bool = False
    cancelled: bool = False  # Cancel came before it ended (its text, if any, is not an answer)
    deadline: float | None = None  # set when its worker starts: a request waiting for a slot is not late
    abort: Abort = field(default_factory=Abort, repr=False)
    connection: http.client.HTTPConnection | None = field(default=None, repr=False)

    def completed(self) -> None:
        self.complete = True
        self.deadline = min(self.deadline or float("inf"), time.monotonic() + FINISH_GRACE_S)

    @property
    def ending(self) -> str:
        """How this answer ended (core.api.ENDINGS), once its worker is done."""
        if self.cancelled:
            return CANCELLED
        if self.dropped:
            return ABORTED
        if self.error is not None or not self.complete:
            return FAILED
        return ending_of_finish(self.finish_reason)

    @property
    def ending_detail(self) -> str:
        """The server's words for an ending that is not complete (for the warning)."""
        if self.dropped:
            return f"the stream closed after {self.tokens} tokens without a finish_reason or [DONE]"
        if self.error is not None:
            return clip(str(self.error), 300)
        if self.complete and not self.finish_reason:
            return "the stream ended with [DONE] and no finish_reason"
        if self.ending in (ABORTED, FILTERED):
            return f"finish_reason '{self.finish_reason}'"
        return ""

    def take_usage(self, usage: dict[str, Any]) -> None:
        self.prompt_tokens = _count(usage.get("prompt_tokens"))
        self.completion_tokens = _count(usage.get("completion_tokens"))


class StreamRunner:
    """Runs a request's streams against one served model; ``served_names`` lists the server's models (for a 404
    that names the model)."""

    def __init__(self, endpoint: Endpoint, faults: Faults, model: str, timeout: float, retries: int,
                 max_in_flight: int, served_names: Callable[[Callable[[], bool]], list[str]]) -> None:
        self.endpoint = endpoint
        self.faults = faults
        self.model = model
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.max_in_flight = max_in_flight
        self.served_names = served_names

    # -- one request --------------------------------------------------------------------------
    def open(self, stream: Stream) -> http.client.HTTPResponse:
        """POST the request, retrying 429/5xx and dropped connections with backoff; the open response."""
        payload = json.dumps(stream.body).encode()
        abort, deadline = stream.abort, stream.deadline or time.monotonic() + self.timeout
        url, delay, retries = self.endpoint.url, 0.5, self.retries
        for attempt in range(retries + 1):
            abort.check()
            conn = self.endpoint.connection(self.timeout + SOCKET_SLACK_S, abort, deadline)
            stream.connection = conn
            t0 = time.perf_counter()
            try:
                conn.request("POST", self.endpoint.prefix + CHAT_PATH, body=payload,
                             headers=request_headers(self.endpoint))
                resp = conn.getresponse()
            except ConnectionError as exc:  # refused, reset, or closed before answering: maybe a restart
                conn.close()
                abort.check()
                if attempt < retries:
                    log.info("[QwenVL-Fast] %s dropped the connection (%s); retrying in %.1fs", url,
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
            body, _ = read_capped(resp, MAX_ERROR_BODY_BYTES)
            conn.close()
            abort.check()
            if resp.status in RETRY_STATUSES and attempt < retries:
                wait = delay
                retry_after = (resp.getheader("Retry-After") or "").strip()
                if retry_after.isdigit():
                    wait = min(float(retry_after), 30.0)
                log.info("[QwenVL-Fast] %s answered HTTP %d; retrying in %.1fs", url, resp.status, wait)
                abort.event.wait(wait)  # Cancel and the deadline wake it
                delay *= 2
                continue
            raise self.faults.status(resp.status, resp.getheader("Location"), body, CHAT_PATH, self.model,
                                     lambda: self.served_names(lambda: abort.reason is not None))
        raise ServerError(f"The server at {url} stayed busy after {retries} retries.")

    def read_stream(self, stream: Stream, resp: http.client.HTTPResponse) -> None:
        """Read server-sent events up to a finish, ``[DONE]`` or ``max_new_tokens`` tokens (then stop reading)."""
        stream.t_headers = time.perf_counter()
        decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character may span two events
        cap = max(1, stream.max_new_tokens)
        past_cap = 0  # events read since the cap was reached, waiting for the finish and usage chunks
        usage_seen = False
        try:
            for event in sse_events(resp):
                if event is None:  # [DONE]; without a finish_reason before it, an aborted answer (Stream.ending)
                    stream.complete = True
                    break
                usage = event.get("usage")
                if isinstance(usage, dict):
                    usage_seen = True
                    stream.take_usage(usage)
                choices = event.get("choices") or []
                if not isinstance(choices, list):
                    raise AnswerError("sent an event whose 'choices' is not a list")
                for choice in choices:
                    _take_choice(stream, choice, cap, decoder)
                if stream.complete and usage_seen:
                    break  # nothing more to wait for; [DONE] or the close may never come
                if stream.tokens >= cap:
                    if not stream.complete:  # the cap ends an answer, whatever a server goes on sending
                        stream.finish_reason = "length"
                        stream.completed()
                    past_cap += 1
                    if past_cap > TOKEN_SLACK_EVENTS:
                        break
        except TimeoutError:
            raise
        except (OSError, http.client.IncompleteRead):
            stream.abort.check()
            if not stream.complete:
                stream.dropped = True
                raise self.faults.cut_off(stream.tokens) from None
        stream.text += decoder.decode(b"", final=True)
        if not stream.complete:
            stream.abort.check()  # a shut-down socket reads as the end of the stream
            stream.dropped = True
            raise self.faults.cut_off(stream.tokens)
        if stream.t_first is not None:
            stream.decode_s = time.perf_counter() - stream.t_first

    def read_json_answer(self, stream: Stream, resp: http.client.HTTPResponse) -> None:
        """A 200 with ``application/json``: one non-streamed chat completion (a server that ignores ``stream``)."""
        url = self.endpoint.url
        t0 = time.perf_counter()
        body, over = read_capped(resp, MAX_JSON_ANSWER_BYTES)
        stream.abort.check()
        if over:
            raise AnswerError(f"The server at {url} sent an answer larger than {MAX_JSON_ANSWER_BYTES >> 20} MiB.")
        try:
            data = json.loads(body.decode("utf-8", "replace"))
        except ValueError:
            raise AnswerError(f"The server at {url} answered with invalid JSON "
                              f"({clip(redact(body.decode('utf-8', 'replace')), 80)}).") from None
        choices = data.get("choices") if isinstance(data, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict) or not isinstance(content, (str, type(None))):
            raise AnswerError(f"The server at {url} answered with JSON that is not a chat completion (no "
                              "choices[0].message.content): is server_url an OpenAI-compatible server?")
        stream.text = content or ""
        stream.reasoning = reasoning_of(message)
        reason = choice.get("finish_reason")
        stream.finish_reason = clip(str(reason), 40) if reason else None  # none given: an aborted answer
        usage = data.get("usage")
        if isinstance(usage, dict):
            stream.take_usage(usage)
        stream.tokens = stream.completion_tokens or (1 if stream.text else 0)
        stream.first_token_s = time.perf_counter() - t0
        stream.complete = True

    def consume(self, stream: Stream) -> None:
        """Run one request to its end (in a worker thread); errors land in ``stream.error``."""
        stream.deadline = time.monotonic() + self.timeout
        try:
            resp = self.open(stream)
            if (resp.getheader("Content-Type") or "").lower().startswith("application/json"):
                self.read_json_answer(stream, resp)
            else:
                self.read_stream(stream, resp)
        except BaseException as exc:  # handed to the caller's thread
            if not (stream.complete and stream.abort.reason == "deadline"):  # late only for the closing chunks
                stream.error = self.faults.transport(exc, stream.abort, "the answer", self.timeout)
        finally:
            if stream.connection is not None:
                stream.connection.close()  # on Cancel this is what makes the server abort the request
            stream.done = True

    # -- several in flight ----------------------------------------------------------------------
    def run_all(self, streams: list[Stream], req: GenerationRequest, rec: RunRecord) -> list[str | None]:
        """Keep up to ``max_in_flight`` requests streaming; progress, partial text, Cancel and deadlines from this
        thread. Returns each answer's error (None where it succeeded) when the request takes per-answer errors."""
        cancelled = False
        with ThreadPoolExecutor(max_workers=min(self.max_in_flight, len(streams)),
                                thread_name_prefix="qwenvl-server") as pool:
            futures = [pool.submit(self.consume, s) for s in streams]
            try:
                cancelled = self._watch(streams, req, lambda: all(f.done() for f in futures))
            except BaseException:
                _abort_all(streams, "cancel")
                raise
        if cancelled or any(isinstance(s.error, GenerationInterrupted) for s in streams):
            rec.interrupted = True
            if not req.per_answer_errors:
                raise GenerationInterrupted("Generation was interrupted.")
            _keep_what_ended_before_cancel(streams)
        for s in streams:
            # Faults that hit every answer raise, and any fault where the caller takes no per-answer errors.
            if s.error is not None and (not req.per_answer_errors or not isinstance(s.error, AnswerError)):
                raise s.error
        errors = [str(s.error) if s.error is not None else None for s in streams]
        for s, error in zip(streams, errors):
            if error is not None and not s.cancelled:
                log.warning("[QwenVL-Fast] answer %d failed on its own: %s", s.index + 1, error)
        total = len(streams) * int(req.max_new_tokens)
        if req.on_progress is not None:
            req.on_progress(total, total)
        if req.on_text is not None:
            req.on_text(streams[-1].text)
        return errors

    @staticmethod
    def _watch(streams: list[Stream], req: GenerationRequest, finished: Callable[[], bool]) -> bool:
        """Poll until every stream is done: Cancel, deadlines, progress and partial text. True on Cancel."""
        total = len(streams) * int(req.max_new_tokens)
        last_progress, last_text = -1, 0
        while not finished():
            if req.should_stop is not None and req.should_stop():
                _abort_all(streams, "cancel")
                return True
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
            time.sleep(POLL_S)
        return False


def _take_choice(stream: Stream, choice: Any, cap: int, decoder: codecs.IncrementalDecoder) -> None:
    """One streamed choice: its token (one chunk per token; the final usage gives the exact count) and its finish.

    The server's first finish_reason ends the answer (what it sends after is not part of it); one that comes after
    more than ``cap`` tokens does not count: the reader's cap already cut the answer.
    """
    if not isinstance(choice, dict):
        raise AnswerError("sent an event whose choice is not an object")
    if stream.server_finished:
        return
    delta = choice.get("delta") or {}
    content = delta.get("content") if isinstance(delta, dict) else None
    thought = reasoning_of(delta) if isinstance(delta, dict) else ""
    if thought:
        _first_token(stream)
        if stream.tokens < cap:
            stream.reasoning += thought
        stream.tokens += 1
    if content:
        if not isinstance(content, str):
            raise AnswerError("sent a delta whose content is not text")
        _first_token(stream)
        if stream.tokens < cap:  # past the cap a server is not listening: its text is not kept
            stream.text += decoder.decode(raw_bytes(content))
        stream.tokens += 1
    if choice.get("finish_reason") and stream.tokens <= cap:
        stream.finish_reason = clip(str(choice["finish_reason"]), 40)
        stream.server_finished = True
        stream.completed()


def _first_token(stream: Stream) -> None:
    if stream.t_first is None:  # reasoning or answer, the first token ends the wait
        stream.t_first = time.perf_counter()
        stream.first_token_s = stream.t_first - stream.t_headers


def reasoning_of(part: dict[str, Any]) -> str:
    """The reasoning a server with a reasoning parser sends apart from the answer (vLLM's ``reasoning_content``,
    newer ``reasoning``); text that is not a string is ignored."""
    for key in ("reasoning_content", "reasoning"):
        value = part.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def _keep_what_ended_before_cancel(streams: list[Stream]) -> None:
    """After Cancel, with per-answer errors: an answer the server had ended stays as it ended (a caption folder
    commits it), every other one is ``cancelled`` (its partial text never taken for an answer)."""
    for s in streams:
        if s.complete and s.server_finished and isinstance(s.error, GenerationInterrupted):
            s.error = None  # Cancel only cut the closing [DONE]: the server had already finished this answer
        if s.error is None and s.complete:
            continue  # ended before Cancel, as it ended (complete, or cut by the reader's cap, ...)
        s.cancelled = True
        s.error = AnswerError("cancelled before it finished (Cancel)")


def _abort_all(streams: list[Stream], reason: str) -> None:
    # Queued streams first (no worker yet: no deadline): an in-flight stream whose socket is shut down frees its
    # worker at once, and the queued stream that worker takes next must already be aborted, or it still sends.
    for s in sorted(streams, key=lambda s: s.deadline is not None):
        s.abort.fire(reason)
