"""The server backend: the same requests, answered by an OpenAI-compatible server (vLLM first).

The pack does not serve models itself. With ``backend="server"`` a :class:`ServerModel` stands where a local
model stands: ``run_once`` gives it the same :class:`~engine.GenerationRequest`, and it

1. applies the quality preset *before upload*: each image is resized to the preset's token budget for the
   served family's patch size and sent as PNG (or JPEG), so tokens, upload bytes and server compute shrink
   as they do locally (``native`` sends the original). Encoded uploads are memoised by image digest and size;
   reuse of the image's embedding and of the prompt prefix is the server's own business (vLLM's encoder and
   prefix caches);
2. streams the answer (server-sent events) for per-token progress and partial text; Cancel closes the
   stream, which makes the server abort the request;
3. keeps several requests in flight (``server_max_in_flight``) when there are several answers to give (one
   answer per image, Caption Folder), so the server can batch them; answers come back in input order;
4. retries 429, 503 and dropped connections with backoff, and turns every other failure into an error that
   names the URL and the fix.

The API key comes from ``$QWENVL_FAST_API_KEY`` only and never appears in logs, errors or timing records.
Only the standard library is used for HTTP.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator
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
RETRY_STATUSES = (429, 502, 503, 504)
UPLOAD_MEMO_ENTRIES = 256
STREAM_EVERY_TOKENS = 8
_POLL_S = 0.05


class ServerError(QwenVLError):
    """The server could not answer; the message names the URL and what to do."""


def api_key() -> str:
    return os.environ.get(API_KEY_ENV, "").strip()


def redact(text: str) -> str:
    """``text`` with the API key (if any) replaced: nothing the pack shows or logs may carry it."""
    key = api_key()
    return text.replace(key, "***") if key else text


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
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServerError(f"server_url '{url}' is not an http(s) URL like http://127.0.0.1:8000/v1.")
        if parts.username or parts.password:
            raise ServerError("server_url must not carry credentials; put the API key in $QWENVL_FAST_API_KEY.")
        prefix = parts.path or ""
        if not prefix.endswith("/v1"):
            prefix += "/v1"
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, prefix)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.prefix}"

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)


def _headers() -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    key = api_key()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def _error_text(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:500]
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)[:500]
    return str(err)[:500]


@dataclass
class _Stream:
    """One answer's streaming state, shared between its worker thread and the caller's thread."""

    index: int
    body: dict[str, Any]
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int | None = None
    upload_s: float = 0.0
    first_token_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str | None = None
    error: BaseException | None = None
    done: bool = False
    connection: http.client.HTTPConnection | None = field(default=None, repr=False)


class ServerModel:
    """A model served elsewhere, used exactly like a local QwenVLModel by ``run_once``."""

    is_remote = True
    compile_report = None

    def __init__(self, options: LoadOptions) -> None:
        self.options = options
        self.endpoint = Endpoint.parse(options.server_url)
        self.timeout = float(options.server_timeout_s)
        self.max_in_flight = max(1, int(options.server_max_in_flight))
        self.upload_format = options.server_upload_format
        if self.upload_format not in UPLOAD_FORMATS:
            raise ServerError(f"server_upload_format '{self.upload_format}': choose one of {UPLOAD_FORMATS}.")
        self.device = torch.device("cpu")  # nothing of the model is here
        self.usable = True
        self.load_seconds = 0.0
        t0 = time.perf_counter()
        served = self.list_models()
        self.served_model = self._choose(served, options.server_model)
        self.patch_size, self.merge_size = self._patch_geometry(served)
        self.load_seconds = time.perf_counter() - t0
        self._uploads: OrderedDict[tuple, str] = OrderedDict()
        self._uploads_lock = threading.Lock()
        log.info("[QwenVL-Fast] using %s at %s (patch %d, merge %d)", self.served_model, self.endpoint.url,
                 self.patch_size, self.merge_size)

    # -- what run_once and the model manager ask of a model --------------------------------
    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def close(self) -> None:
        self.usable = False
        with self._uploads_lock:
            self._uploads.clear()

    def param_bytes(self) -> int:
        return 0

    # -- the server's models ----------------------------------------------------------------
    def _get_json(self, path: str) -> Any:
        conn = self.endpoint.connection(min(self.timeout, 30.0))
        try:
            conn.request("GET", self.endpoint.prefix + path, headers=_headers())
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ServerError(f"Cannot reach the server at {self.endpoint.url} ({type(exc).__name__}: "
                              f"{redact(str(exc))}). Start it (README: 'Server backend') or fix server_url.") from exc
        finally:
            conn.close()
        if resp.status == 401:
            raise ServerError(f"The server at {self.endpoint.url} refused the API key: set ${API_KEY_ENV} to the "
                              "key it expects (never in a workflow).")
        if resp.status != 200:
            raise ServerError(f"The server at {self.endpoint.url} answered {path} with HTTP {resp.status}: "
                              f"{redact(_error_text(body))}")
        return json.loads(body)

    def list_models(self) -> list[dict[str, Any]]:
        data = self._get_json("/models")
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise ServerError(f"{self.endpoint.url}/models did not list models: is this an OpenAI-compatible "
                              "server?")
        return [m for m in models if isinstance(m, dict) and m.get("id")]

    def _choose(self, served: list[dict[str, Any]], wanted: str) -> str:
        names = [m["id"] for m in served]
        wanted = (wanted or "").strip()
        if wanted:
            if wanted not in names:
                raise ServerError(f"The server at {self.endpoint.url} does not serve '{wanted}'; it serves: "
                                  f"{', '.join(names) or 'nothing'}. Set server_model to one of those.")
            return wanted
        if len(names) != 1:
            raise ServerError(f"The server at {self.endpoint.url} serves {len(names)} models "
                              f"({', '.join(names) or 'none'}): set server_model to the one to use.")
        return names[0]

    def _patch_geometry(self, served: list[dict[str, Any]]) -> tuple[int, int]:
        """Patch and merge size of the served family: from the server where it says, else from the name."""
        entry = next(m for m in served if m["id"] == self.served_model)
        for key in ("patch_size", "vision_patch_size"):
            if isinstance(entry.get(key), int):
                return int(entry[key]), int(entry.get("spatial_merge_size", 2))
        name = f"{entry.get('id', '')} {entry.get('root', '')}".lower()
        # Qwen3-VL and Qwen3.5 use 16-pixel patches, Qwen2/2.5-VL 14 (facts file); all merge 2x2.
        return (16 if ("qwen3" in name or "qwen3.5" in name) else 14), 2

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
                with self._uploads_lock:
                    self._uploads[key] = url
                    while len(self._uploads) > UPLOAD_MEMO_ENTRIES:
                        self._uploads.popitem(last=False)
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

    def _open(self, stream: _Stream, cancelled: threading.Event) -> http.client.HTTPResponse:
        """POST the request, retrying 429/5xx and dropped connections with backoff; the open response."""
        payload = json.dumps(stream.body).encode()
        delay = 0.5
        retries = max(0, int(self.options.server_retries))
        for attempt in range(retries + 1):
            if cancelled.is_set():
                raise GenerationInterrupted("Generation was interrupted.")
            conn = self.endpoint.connection(self.timeout)
            stream.connection = conn
            t0 = time.perf_counter()
            try:
                conn.request("POST", self.endpoint.prefix + "/chat/completions", body=payload, headers=_headers())
                resp = conn.getresponse()
            except (ConnectionError, http.client.RemoteDisconnected) as exc:
                conn.close()
                if attempt < retries:
                    log.info("[QwenVL-Fast] %s dropped the connection (%s); retrying in %.1fs", self.endpoint.url,
                             type(exc).__name__, delay)
                    cancelled.wait(delay)
                    delay *= 2
                    continue
                raise ServerError(f"Cannot reach the server at {self.endpoint.url} ({type(exc).__name__}): start "
                                  "it (README: 'Server backend') or fix server_url.") from exc
            except TimeoutError as exc:
                conn.close()
                raise ServerError(f"The server at {self.endpoint.url} did not answer within {self.timeout:.0f}s: "
                                  "it may be overloaded or still starting.") from exc
            except OSError as exc:
                conn.close()
                if cancelled.is_set():
                    raise GenerationInterrupted("Generation was interrupted.") from exc
                raise ServerError(f"Cannot reach the server at {self.endpoint.url} ({type(exc).__name__}: "
                                  f"{redact(str(exc))}): start it or fix server_url.") from exc
            stream.upload_s += time.perf_counter() - t0
            if resp.status == 200:
                return resp
            body = resp.read()
            conn.close()
            message = redact(_error_text(body))
            if resp.status in RETRY_STATUSES and attempt < retries:
                wait = delay
                retry_after = resp.getheader("Retry-After")
                if retry_after and retry_after.isdigit():
                    wait = min(float(retry_after), 30.0)
                log.info("[QwenVL-Fast] %s answered HTTP %d; retrying in %.1fs", self.endpoint.url, resp.status,
                         wait)
                cancelled.wait(wait)
                delay *= 2
                continue
            raise self._http_error(resp.status, message)
        raise ServerError(f"The server at {self.endpoint.url} stayed busy after {retries} retries.")

    def _http_error(self, status: int, message: str) -> ServerError:
        url = self.endpoint.url
        low = message.lower()
        if status == 401:
            return ServerError(f"The server at {url} refused the API key: set ${API_KEY_ENV} to the key it expects.")
        if status == 404 and "model" in low:
            try:
                names = ", ".join(m["id"] for m in self.list_models())
            except ServerError:
                names = "unknown"
            return ServerError(f"The server at {url} does not serve '{self.served_model}' (it serves: {names}); "
                               "set server_model to one of those.")
        if status == 400 and any(w in low for w in ("context length", "maximum model length", "too long",
                                                    "max_model_len", "longer than")):
            return ServerError(f"The prompt is too long for '{self.served_model}' at {url} ({message}). Use a "
                               "cheaper image_quality, fewer images, fewer max_new_tokens, or a larger "
                               "--max-model-len on the server.")
        return ServerError(f"The server at {url} answered HTTP {status}: {message}")

    def _consume(self, stream: _Stream, cancelled: threading.Event) -> None:
        """Run one streaming request to its end (in a worker thread); errors land in ``stream.error``."""
        try:
            resp = self._open(stream, cancelled)
            t_headers = time.perf_counter()
            t_first: float | None = None
            for event in _sse_events(resp):
                if cancelled.is_set():
                    break
                if event.get("usage"):
                    stream.prompt_tokens = int(event["usage"].get("prompt_tokens") or 0)
                    stream.completion_tokens = int(event["usage"].get("completion_tokens") or 0)
                for choice in event.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content") or ""
                    if delta:  # one streamed chunk per token (the final usage gives the exact count)
                        if t_first is None:
                            t_first = time.perf_counter()
                            stream.first_token_s = t_first - t_headers
                        stream.tokens += 1
                        stream.text += delta
                    if choice.get("finish_reason"):
                        stream.finish_reason = choice["finish_reason"]
            if t_first is not None:
                stream.decode_s = time.perf_counter() - t_first
        except BaseException as exc:  # handed to the caller's thread
            stream.error = exc
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
        streams = [_Stream(i, self._body(req, g)) for i, g in enumerate(groups)]
        self._run_streams(streams, req, rec)
        texts, thoughts = [], []
        for s in streams:
            answer, thinking = split_thinking(s.text)
            texts.append(answer)
            thoughts.append(thinking)
            rec.prompt_tokens += s.prompt_tokens
            rec.new_tokens += s.completion_tokens if s.completion_tokens is not None else s.tokens
            mon.add("upload", s.upload_s)  # request sent until the server's first byte: upload + queue
            mon.add("prefill", s.first_token_s)
            mon.add("decode", s.decode_s)
        rec.server = {"url": self.endpoint.url, "model": self.served_model, "requests": len(streams),
                      "in_flight": min(self.max_in_flight, len(streams)),
                      "upload_bytes": sum(u["record"]["upload_bytes"] for u in uploads),
                      "prompt_tokens": [s.prompt_tokens for s in streams],
                      "time_to_first_token_s": [round(s.upload_s + s.first_token_s, 4) for s in streams]}
        mon.finish()
        if len(streams) > 1 and rec.total_s > 0:
            # Stage times are summed over requests that overlapped: per answer, not per wall second.
            rec.server["stage_times"] = "summed over concurrent requests"
        return GenerationResult(texts, thoughts, rec, [[] for _ in streams])

    def _run_streams(self, streams: list[_Stream], req: GenerationRequest, rec: RunRecord) -> None:
        """Keep up to ``max_in_flight`` requests streaming; progress, partial text and Cancel from this thread."""
        cancelled = threading.Event()
        total = len(streams) * int(req.max_new_tokens)
        last_progress, last_text = -1, 0
        with ThreadPoolExecutor(max_workers=min(self.max_in_flight, len(streams)),
                                thread_name_prefix="qwenvl-server") as pool:
            futures = [pool.submit(self._consume, s, cancelled) for s in streams]
            try:
                while not all(f.done() for f in futures):
                    if req.should_stop is not None and req.should_stop():
                        cancelled.set()
                        for s in streams:
                            if s.connection is not None:
                                s.connection.close()
                        break
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
                cancelled.set()
                for s in streams:
                    if s.connection is not None:
                        s.connection.close()
                raise
        if cancelled.is_set():
            rec.interrupted = True
            raise GenerationInterrupted("Generation was interrupted.")
        for s in streams:
            if s.error is not None:
                if isinstance(s.error, QwenVLError):
                    raise s.error
                raise ServerError(f"The request to {self.endpoint.url} failed: {type(s.error).__name__}: "
                                  f"{redact(str(s.error))}") from s.error
        if req.on_progress is not None:
            req.on_progress(total, total)
        if req.on_text is not None:
            req.on_text(streams[-1].text)

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


def _sse_events(resp: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON events of a server-sent-events response, until ``[DONE]``."""
    buffer = b""
    while True:
        chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if isinstance(event, dict):
                if event.get("error"):
                    raise ServerError(f"The server reported an error mid-answer: {redact(_error_text(data))}")
                yield event
