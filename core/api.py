"""The pack's vocabulary: what a caller asks for and what it gets back, below every part that uses it.

``LoadOptions`` (which model, how, where it answers), ``GenerationRequest`` / ``GenerationResult`` (one run),
``VideoClip``, the choices and defaults they carry, and ``Backend``: what ``run_once`` asks of whatever answers
(the local transformers engine, ``engine.model.QwenVLModel``, or an OpenAI-compatible server,
``backends.openai_server.ServerModel``). This module imports nothing of the pack beyond the leaves ``core.errors``
and ``perf_monitor`` (for a type only), so every other part can import it without a circle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from .errors import QwenVLError

if TYPE_CHECKING:  # a leaf module with no imports of the pack: no circle is possible
    from ..perf_monitor import RunRecord

DEFAULT_QUALITY = "balanced"
BATCH_MODES = ["one prompt, all images", "one answer per image"]
PREPROCESS_CHOICES = ["fast", "reference"]
BACKENDS = ["local", "server"]
UPLOAD_FORMATS = ["png", "jpeg"]
DEFAULT_MAX_IN_FLIGHT = 8
DEFAULT_MAX_FRAMES = 16
DEFAULT_VIDEO_FPS = 24.0
# What an answer is (engine/structured.py): free text, JSON valid against ``json_schema`` (empty: any JSON object),
# or a comma-separated tag list; json and tags constrain decoding (local) or ask the server's structured output.
OUTPUT_FORMATS = ["text", "json", "tags"]

# "one answer per image": the answers are generated together, in batches of at most this many tokens (rows x
# (longest prompt + max_new_tokens), what the KV cache holds at the end). 16k tokens of KV cache are ~0.6 GiB
# for a 3B model and ~0.9 GiB for a 7B one in bf16; 0 (or any budget a single row exceeds) means one by one.
ANSWER_BATCH_TOKENS = 16384

# How an answer ended (``GenerationResult.endings``, one per answer). Only ``COMPLETE`` (a stop token, or a server's
# ``finish_reason: "stop"``) may become a caption or a metadata row; every other ending is that answer's error.
COMPLETE = "complete"
CUT = "cut"  # max_new_tokens / finish_reason "length"
ABORTED = "aborted"  # the server ended it (finish_reason "abort", a dropped stream)
FILTERED = "filtered"  # finish_reason "content_filter"
CANCELLED = "cancelled"  # the user stopped the run
FAILED = "failed"  # no answer: the error says why
THINKING_OPEN = "thinking_open"  # a thinking model's reasoning never closed (no answer after </think>)
ENDINGS = (COMPLETE, CUT, ABORTED, FILTERED, CANCELLED, FAILED, THINKING_OPEN)


def ending_warning(index: int, count: int, ending: str, max_new_tokens: int, new_tokens: int | None = None,
                   detail: str = "") -> str | None:
    """What the user should read about an answer that did not end complete (None for a complete one).

    ``new_tokens``: the answer's length, where known (a cut shorter than ``max_new_tokens`` hit the model's
    context); ``detail``: the backend's own words (the server's finish_reason, the error).
    """
    if ending == COMPLETE:
        return None
    which = f"answer {index + 1} of {count}" if count > 1 else "the answer"
    why = f" ({detail})" if detail else ""
    if ending == CUT:
        if new_tokens is not None and 0 < new_tokens < max_new_tokens:
            return (f"{which} was cut at {new_tokens} new tokens, where the model's context ends: shorten the "
                    "prompt or use a cheaper image_quality")
        return f"{which} was cut at max_new_tokens={max_new_tokens}: raise max_new_tokens"
    if ending == THINKING_OPEN:
        return (f"{which} ended while still reasoning (no </think>, so no answer after it){why}: raise "
                "max_new_tokens so the reasoning can close")
    if ending == FILTERED:
        return f"{which} was stopped by the server's content filter{why}: the text is partial"
    if ending == ABORTED:
        return f"{which} was aborted by the server{why}: the text may be partial; run it again"
    if ending == CANCELLED:
        return f"{which} was cancelled"
    return f"{which} failed{why}"


def note_endings(record: RunRecord, endings: list[str], max_new_tokens: int,
                 new_tokens: list[int | None] | None = None, details: list[str] | None = None) -> None:
    """Put each answer's ending in the timing record, and a warning for each one that is not complete."""
    record.endings = list(endings)
    for i, ending in enumerate(endings):
        note = ending_warning(i, len(endings), ending, int(max_new_tokens),
                              new_tokens[i] if new_tokens is not None else None,
                              details[i] if details is not None else "")
        if note is not None and note not in record.warnings:
            record.warnings.append(note)


@dataclass(frozen=True)
class LoadOptions:
    model: str
    quantization: str = "none"
    attention_mode: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    compile_vision: str = "off"
    compile_decode: str = "auto"  # static KV cache + torch.compile decode: auto (CUDA, where supported) or off
    allow_absolute_path: bool = True
    # backend "server": an OpenAI-compatible server answers instead (backends/); model is then unused.
    backend: str = "local"
    server_url: str = ""
    server_model: str = ""
    server_max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    server_upload_format: str = "png"
    server_timeout_s: float = 300.0
    server_retries: int = 3


@dataclass
class VideoClip:
    """Frames ``[T, H, W, C]`` (a ComfyUI IMAGE batch) and the rate they were taken at."""

    frames: torch.Tensor
    fps: float = DEFAULT_VIDEO_FPS
    # Indices of ``frames`` in the source video, when the caller already sampled (a decoder that kept only
    # some frames); None means consecutive frames 0..T-1.
    source_indices: list[int] | None = None
    source_total: int | None = None


@dataclass
class GenerationRequest:
    prompt: str
    # "one answer per image": each answer's own prompt, one per image in the images' order (Caption Folder's
    # {name} / {folder} / {caption}); empty: ``prompt`` for every answer. Answers with different prompts still go
    # together: in one local batch (each row is its own prompt) and ``server_max_in_flight`` requests at a time.
    prompts: list[str] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    # Video clips (vision/video.py): each through the model's video path, in the same prompt as the images.
    videos: list[VideoClip] = field(default_factory=list)
    max_frames: int = DEFAULT_MAX_FRAMES
    system_prompt: str = ""
    image_quality: str = DEFAULT_QUALITY
    enable_image_cache: bool = True
    disk_cache: bool = True
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int = 0
    batch_mode: str = BATCH_MODES[0]
    answer_batch_tokens: int = ANSWER_BATCH_TOKENS
    preprocess: str = "fast"
    monitor: bool = True
    should_stop: Callable[[], bool] | None = None
    on_progress: Callable[[int, int], None] | None = None
    on_text: Callable[[str], None] | None = None
    # Caption Folder's contract: an answer that fails on its own (a bad or cut-off server answer) is reported in
    # ``GenerationResult.errors`` at its index instead of failing the whole request. Cancel and faults that hit
    # every answer (server down, refused key) still raise.
    per_answer_errors: bool = False
    # Structured output (engine/structured.py): "text", "json" (valid against json_schema, a JSON Schema as text;
    # empty means any JSON object) or "tags".
    output_format: str = "text"
    json_schema: str = ""

    def prompt_of(self, index: int) -> str:
        """The prompt of answer ``index``: its own, or the shared ``prompt``."""
        return self.prompts[index] if self.prompts else self.prompt

    def resolved_prompts(self) -> GenerationRequest:
        """This request with its per-answer prompts checked, and as one prompt where only one answer is asked
        (one image, or 'one prompt, all images' with one image); raises ``QwenVLError`` with the fix."""
        if not self.prompts:
            return self
        if self.batch_mode != BATCH_MODES[1] or len(self.prompts) != len(self.images) or self.videos:
            raise QwenVLError(f"{len(self.prompts)} per-answer prompts need batch_mode '{BATCH_MODES[1]}', one "
                              f"prompt per image and no video (got {len(self.images)} images, {len(self.videos)} "
                              f"videos, batch_mode '{self.batch_mode}'): give one prompt, or one per image.")
        if len(self.prompts) == 1:
            return dataclasses.replace(self, prompt=self.prompts[0], prompts=[])
        return self

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, Any], **overrides: Any) -> GenerationRequest:
        """A request from a node's (or any caller's) keyword inputs: the fields it knows, the rest ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in inputs.items() if k in names}
        values.update(overrides)
        return cls(**values)


@dataclass
class GenerationResult:
    texts: list[str]
    thinking: list[str]
    record: RunRecord
    token_ids: list[list[int]] = field(default_factory=list)
    # One entry per answer when the request set ``per_answer_errors``: None, or why that answer has no text.
    errors: list[str | None] = field(default_factory=list)
    # One entry per answer, from ENDINGS: how it ended. Empty only for results built before anything answered.
    endings: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n\n".join(self.texts)

    def error_of(self, index: int) -> str | None:
        return self.errors[index] if index < len(self.errors) else None

    def ending_of(self, index: int) -> str:
        """How answer ``index`` ended; an answer the backend said nothing about counts as FAILED, never COMPLETE."""
        return self.endings[index] if index < len(self.endings) else FAILED

    def is_complete(self, index: int) -> bool:
        return self.ending_of(index) == COMPLETE and self.error_of(index) is None


@runtime_checkable
class Backend(Protocol):
    """What ``run_once`` and the model manager ask of a loaded model, local or served."""

    options: LoadOptions
    usable: bool  # False once closed: the manager loads anew
    is_remote: bool  # answers come from elsewhere: no weights here, no device memory to free
    device: torch.device

    def run(self, request: GenerationRequest) -> GenerationResult:
        """Answer one request; raises ``GenerationInterrupted`` on Cancel, ``QwenVLError`` with the fix otherwise."""
        ...

    def tips(self, record: RunRecord) -> list[str]:
        """What the run's record suggests the user change (shown on the node)."""
        ...

    def param_bytes(self) -> int:
        """Bytes of weights this backend holds in this process (0 when served elsewhere)."""
        ...

    def close(self) -> None:
        """Free what it holds; ``usable`` becomes False."""
        ...
