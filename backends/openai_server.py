"""The server backend: the same requests, answered by an OpenAI-compatible server (vLLM first).

The pack does not serve models itself. With ``backend="server"`` a :class:`ServerModel` stands where a local
model stands: ``run_once`` gives it the same :class:`~engine.GenerationRequest`, and it

1. applies the quality preset *before upload*: each image is resized to the preset's token budget for the
   served family's patch size and sent as PNG (or JPEG), so tokens, upload bytes and server compute shrink
   as they do locally (``native`` sends the original). Encoded uploads are memoised by image digest and size
   (at most ``uploads.UPLOAD_MEMO_BYTES``); reuse of the image's embedding and of the prompt prefix is the server's
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

This module is the adapter (loading, a run, its record, tips); the parts, each below the one that uses it:
``streams.py`` (request bodies, retries, streams in flight), ``uploads.py`` (the preset's size, the memo),
``served_models.py`` (``/models``, the model, its geometry), ``faults.py`` (errors naming the URL and the fix),
``sse.py`` (the event reader), ``http_transport.py`` (endpoint, interruptible connections, the watchdog, bounded
reads), ``api_key.py`` (the key and its origins) and ``errors.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import quality_presets as qp
from ..core.api import (
    BATCH_MODES,
    COMPLETE,
    CUT,
    FAILED,
    THINKING_OPEN,
    UPLOAD_FORMATS,
    GenerationRequest,
    GenerationResult,
    LoadOptions,
    note_endings,
)
from ..core.errors import QwenVLError
from ..engine.prompting import split_thinking
from ..engine.structured import check_answer, normalize_json, spec_of
from ..perf_monitor import RunMonitor, RunRecord
from .errors import AnswerError, ServerError, clip
from .faults import Faults
from .http_transport import Endpoint
from .served_models import ModelList, choose_model, patch_geometry
from .streams import Stream, StreamRunner, chat_body, structured_fields
from .uploads import Uploads

__all__ = ["AnswerError", "Endpoint", "ServerError", "ServerModel"]

log = logging.getLogger("QwenVL-Fast")


def is_llama_cpp(served: list[dict[str, Any]], model: str) -> bool:
    """Whether ``model`` is served by llama.cpp's llama-server: its ``/models`` entries say ``owned_by: llamacpp``."""
    entry = next((m for m in served if m["id"] == model), {})
    return entry.get("owned_by") == "llamacpp"


class ServerModel:
    """A model served elsewhere, used exactly like a local QwenVLModel by ``run_once``."""

    is_remote = True
    compile_report = None

    def __init__(self, options: LoadOptions, should_stop: Callable[[], bool] | None = None) -> None:
        """Asks the server what it serves (``/models``); ``should_stop`` (Cancel) ends that call early."""
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
        self.faults = Faults(self.endpoint)
        self.models = ModelList(self.endpoint, self.faults, self.timeout)
        t0 = time.perf_counter()
        served = self.models.models(should_stop)
        self.served_model = choose_model(self.endpoint.url, served, options.server_model)
        self.patch_size, self.merge_size = patch_geometry(self.endpoint.url, served, self.served_model)
        self.llama_cpp = is_llama_cpp(served, self.served_model)  # its own field for a grammar (streams.py)
        self.uploads = Uploads(self.upload_format, self.factor)
        self.streams = StreamRunner(self.endpoint, self.faults, self.served_model, self.timeout,
                                    options.server_retries, self.max_in_flight, self.models.names)
        self.load_seconds = time.perf_counter() - t0
        log.info("[QwenVL-Fast] using %s at %s (patch %d, merge %d)", clip(self.served_model, 100),
                 self.endpoint.url, self.patch_size, self.merge_size)

    # -- what run_once and the model manager ask of a model --------------------------------
    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def close(self) -> None:
        self.usable = False
        self.uploads.clear()

    def param_bytes(self) -> int:
        return 0

    def list_models(self, should_stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
        return self.models.models(should_stop)

    def prepare_uploads(self, images: list[torch.Tensor], quality: str, mon: RunMonitor) -> list[dict[str, Any]]:
        """One data URL per image at the preset's size, and what the record shows about it."""
        return self.uploads.prepare(images, quality, mon)

    def upload_memo_bytes(self) -> int:
        """Bytes the memo of encoded uploads holds now (at most ``uploads.UPLOAD_MEMO_BYTES``)."""
        return self.uploads.memo_bytes()

    # -- a run ------------------------------------------------------------------------------
    def run(self, req: GenerationRequest) -> GenerationResult:
        if not self.usable:
            raise QwenVLError("This server connection was closed; run the loader again.")
        if req.batch_mode not in BATCH_MODES:
            raise QwenVLError(f"Unknown batch_mode '{req.batch_mode}': choose one of {BATCH_MODES}.")
        if req.videos:
            # The pack's video path (sampling, clip budget, cache) runs the local model; a server samples and
            # sizes video itself, from a video file it can fetch, which a frames tensor is not.
            raise QwenVLError("Video runs on the local backend only: set backend to 'local' for a video input.")
        req = req.resolved_prompts()
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
        asks = [dataclasses.replace(req, prompt=req.prompt_of(i)) for i in range(len(groups))] if one_each else [req]
        streams = [Stream(i, chat_body(ask, self.served_model, g, self.llama_cpp),
                          max_new_tokens=int(req.max_new_tokens)) for i, (g, ask) in enumerate(zip(groups, asks))]
        errors = self.streams.run_all(streams, req, rec)
        spec = spec_of(req)
        rec.output_format = spec.output_format
        if spec.constrained:
            rec.structured = {"server_field": next(iter(structured_fields(spec, self.llama_cpp)))}
        texts, thoughts, endings = [], [], []
        for i, (s, error) in enumerate(zip(streams, errors)):
            answer, thinking = split_thinking(s.text) if error is None else ("", "")
            ending = s.ending
            if ending in (COMPLETE, CUT) and s.text.lstrip().startswith("<think>") and "</think>" not in s.text:
                ending = THINKING_OPEN  # reasoning only: no answer followed it
            if error is None and s.reasoning.strip():
                # A reasoning parser (vLLM --reasoning-parser) sends the reasoning apart from the answer.
                thinking = "\n".join(t for t in (s.reasoning.strip(), thinking) if t)
                if ending in (COMPLETE, CUT) and not s.text.strip():
                    ending = THINKING_OPEN  # it reasoned and never answered
            if error is None and spec.constrained:
                # The server constrains; what it sent is checked (a server that ignored the field, a cut answer).
                answer = answer.strip()
                bad = check_answer(spec, answer)
                if bad is not None:
                    if ending == CUT:
                        bad += f" (it was cut at max_new_tokens={int(req.max_new_tokens)}: raise max_new_tokens)"
                    if not req.per_answer_errors:
                        raise QwenVLError(f"The server's answer {i + 1} is not valid {spec.output_format}: {bad}. "
                                          "Check that the server supports structured output (vLLM, llama-server).")
                    errors[i], answer, thinking = bad, "", ""
                    ending = ending if ending != COMPLETE else FAILED
                elif spec.output_format == "json":
                    answer = normalize_json(answer)
            texts.append(answer)
            thoughts.append(thinking)
            endings.append(ending)
        self._record(mon, streams, uploads, errors)
        note_endings(rec, endings, int(req.max_new_tokens), details=[
            errors[i] or s.ending_detail if endings[i] != THINKING_OPEN else "" for i, s in enumerate(streams)])
        return GenerationResult(texts, thoughts, rec, [[] for _ in streams],
                                errors=errors if req.per_answer_errors else [], endings=endings)

    def _record(self, mon: RunMonitor, streams: list[Stream], uploads: list[dict[str, Any]],
                errors: list[str | None]) -> None:
        """What the client saw of the run: tokens, stage times, and the server's own section."""
        rec = mon.record
        for s in streams:
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
