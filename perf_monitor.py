"""Timing monitor: each stage of a run timed where it really runs, plus tips derived from the numbers.

Stages: hash (canonical bytes, MD5 and cache lookup), preprocess, transfer (host to device),
encode (vision tower), prefill (up to the first new token), decode (the remaining tokens).
On CUDA each stage boundary synchronises the device, so the vision tower is charged to
"encode" and not to whatever happens to wait for it later. With the monitor off nothing is
synchronised and nothing is recorded.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

log = logging.getLogger("QwenVL-Fast")

STAGES = ("load", "hash", "preprocess", "transfer", "encode", "cache", "prompt", "prefill", "decode")


def cache_hits(entries: list[dict[str, Any]]) -> int:
    """How many of a record's images / videos came from a cache tier (their "cache" is "memory" or "disk")."""
    return sum(1 for e in entries if e.get("cache") in ("memory", "disk"))


@dataclass
class RunRecord:
    model: str = ""
    family: str = ""
    device: str = ""
    dtype: str = ""
    quantization: str = "none"
    attention: str = ""
    vision_attention: str = ""
    quality: str = ""
    compile: str = "off"
    compile_warmup_s: float | None = None
    decode_compile: str = "off"  # "on": static KV cache + torch.compile decode (decode_compile.py); "off (why)"
    model_loaded_this_run: bool = False
    keep_model_loaded: bool = True
    stages: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0
    images: list[dict[str, Any]] = field(default_factory=list)
    # One entry per video clip: frames sampled (of the source's), tokens per temporal patch and in all, the
    # clip's token budget, the per-frame size and the cache tier (video.py).
    videos: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    new_tokens: int = 0
    # Prefix-KV reuse (prefix_cache.py): prompt tokens whose KV came from the prefix cache, and prefix tokens
    # prefilled this run where reuse applied but missed (both 0 when reuse is off for the run).
    prefix_tokens_reused: int = 0
    prefix_tokens_prefilled: int = 0
    decode_tokens_per_s: float | None = None
    interrupted: bool = False
    cache_stats: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)  # the server backend's client-side figures
    tips: list[str] = field(default_factory=list)
    # What the engine changed or refused on its own (e.g. max_new_tokens cut to fit the context): shown on the node,
    # not only in the log.
    warnings: list[str] = field(default_factory=list)
    # How each answer ended (core.api.ENDINGS: complete, cut, aborted, ...), one per answer; every ending but
    # "complete" also has a line in ``warnings``.
    endings: list[str] = field(default_factory=list)
    # Structured output (engine/structured.py): the answer's format, and for json/tags what the constraint cost:
    # {"constraint_ms_per_token", "constraint_s", "steps", "compile_s", "budget_steps"} (local) or the server field.
    output_format: str = "text"
    structured: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), default=str)

    @classmethod
    def from_json(cls, text: str) -> "RunRecord":
        """The record back from ``to_json`` (keys this version does not know are ignored)."""
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary_line(self) -> str:
        """One line for the node: "1.8 s · 234 visual tokens · cache hit · 12.4 tok/s" (parts without data left out)."""
        parts = [f"{self.total_s:.1f} s"]
        if self.model_loaded_this_run:
            parts.append("model loaded")
        entries = [*self.images, *self.videos]
        if entries:
            parts.append(f"{sum(int(e.get('tokens', 0)) for e in entries)} visual tokens")
        if any(e.get("cache") != "off" for e in entries):
            hits = cache_hits(entries)
            parts.append("cache hit" if hits == len(entries) else "cache miss" if hits == 0
                         else f"cache {hits}/{len(entries)} hit")
        if self.server:
            parts.append("server")
        parts.append(f"{self.new_tokens} new tokens")
        if self.decode_tokens_per_s:
            parts.append(f"{self.decode_tokens_per_s:.1f} tok/s")
        unfinished = [e for e in self.endings if e != "complete"]
        if unfinished:  # "1 cut", "2 aborted": the warnings say which and why
            parts.extend(f"{unfinished.count(e)} {e.replace('_', ' ')}" for e in dict.fromkeys(unfinished))
        if self.interrupted:
            parts.append("interrupted")
        return " · ".join(parts)

    def notices(self) -> list[str]:
        """What the user should read on the node: the warnings first, then the tips."""
        return [*self.warnings, *self.tips]

    def summary(self) -> str:
        parts = [f"{k} {v * 1000:.1f}ms" for k, v in self.stages.items() if v > 0]
        hits = cache_hits(self.images)
        img = ""
        if self.images:
            tokens = sum(i["tokens"] for i in self.images)
            img = f" | {len(self.images)} image(s), {tokens} visual tokens, cache {hits}/{len(self.images)} hit"
        for v in self.videos:
            img += (f" | video {v['frames']} frames ({v['source_frames']} in source) at {v['size_resized'][1]}x"
                    f"{v['size_resized'][0]}, {v['tokens_per_frame_pair']} tokens per frame pair, {v['tokens']} visual "
                    f"tokens of {v['budget_tokens']}, cache {v['cache']}")
        speed = f", {self.decode_tokens_per_s:.1f} tok/s" if self.decode_tokens_per_s else ""
        if self.decode_compile == "on":
            speed += ", compiled decode"
        if self.output_format != "text":
            cost = self.structured.get("constraint_ms_per_token")
            speed += f", {self.output_format}" + (f" (constraint {cost:.2f} ms/token)" if cost is not None else "")
        return (
            f"[QwenVL-Fast] {self.model} ({self.family}, {self.device} {self.dtype}) total {self.total_s:.2f}s: "
            + ", ".join(parts) + img + f" | {self.new_tokens} new tokens{speed}"
            + (" | INTERRUPTED" if self.interrupted else "")
        )


def sync_device(device: torch.device | None) -> None:
    """Wait for the device's queued work, so a clock read after it measures the work (CUDA, MPS)."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
    elif device is not None and device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


class RunMonitor:
    """Collects one run's stage times. ``enabled=False`` makes every call a no-op."""

    def __init__(self, enabled: bool = True, device: torch.device | None = None) -> None:
        self.enabled = enabled
        self.device = device
        self.record = RunRecord()
        self._start = time.perf_counter()
        self._adds: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        sync_device(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync_device(self.device)
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            self.record.stages[name] = self.record.stages.get(name, 0.0) + seconds
            self._adds[name] = self._adds.get(name, 0) + 1

    def finish(self) -> RunRecord:
        self.record.total_s = time.perf_counter() - self._start
        decode = self.record.stages.get("decode", 0.0)
        # Each generate call (one per answer) produces its first token in prefill, the rest in decode.
        decoded = self.record.new_tokens - max(1, self._adds.get("prefill", 0))
        if decode > 0 and decoded > 0:
            self.record.decode_tokens_per_s = decoded / decode
        return self.record


class TokenTimer:
    """A transformers streamer that splits generation time into prefill and decode.

    ``generate`` calls ``put`` once with the prompt, then once per new token with a host tensor
    (it already synchronised to copy it), so the first new token marks the end of prefill.
    """

    def __init__(self, on_token=None) -> None:
        self.t_start = time.perf_counter()
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.count = 0
        self._seen_prompt = False
        self._on_token = on_token

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            self.t_start = time.perf_counter()
            return
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        self.count += int(value.numel()) if hasattr(value, "numel") else 1
        if self._on_token is not None:
            self._on_token(value)

    def end(self) -> None:
        self.t_end = time.perf_counter()

    @property
    def prefill_s(self) -> float:
        return (self.t_first or self.t_end or time.perf_counter()) - self.t_start

    @property
    def decode_s(self) -> float:
        if self.t_first is None:
            return 0.0
        return (self.t_end or time.perf_counter()) - self.t_first


# ---------------------------------------------------------------------------------------------
# Tips: rules over measured numbers. Each returns (tip id, situation, text) or None.
# ---------------------------------------------------------------------------------------------

SLOW_VISION_S_PER_IMAGE = 1.0
MIN_RUNS_FOR_HIT_RATE = 5


@dataclass
class TipContext:
    """What the rules look at: this run plus a little history of the process."""

    record: RunRecord
    runs_with_cache: int = 0
    hits_with_cache: int = 0
    loads: int = 0
    runs: int = 0
    compile_requested: bool = False
    compile_unavailable_reason: str | None = None
    gpu_total_bytes: int | None = None
    model_bf16_bytes: int | None = None
    expected_decode_tokens_per_s: float | None = None


EXPENSIVE_PRESETS = ("high", "ultra", "native")


def tip_slow_vision(ctx: TipContext):
    r = ctx.record
    misses = [i for i in r.images if i["cache"] in ("miss", "off")]
    encode = r.stages.get("encode", 0.0) + r.stages.get("preprocess", 0.0)
    quality = str(r.quality).strip().lower()
    # Under 'auto' what counts is the preset it chose per image (labels read "auto->ultra").
    chosen = {str(i.get("preset", "")).split("->")[-1] for i in misses}
    if (misses and encode / len(misses) > SLOW_VISION_S_PER_IMAGE
            and (quality in EXPENSIVE_PRESETS or chosen & set(EXPENSIVE_PRESETS))):
        return ("slow_vision", quality,
                f"vision encoding took {encode / len(misses):.1f}s per image at '{quality}': "
                "'balanced' uses about half the visual tokens and 'fast' about a quarter of 'ultra'.")
    return None


def tip_zero_hit_rate(ctx: TipContext):
    if ctx.runs_with_cache >= MIN_RUNS_FOR_HIT_RATE and ctx.hits_with_cache == 0:
        return ("zero_hits", "",
                f"the image cache was on for {ctx.runs_with_cache} runs and never hit: the images differ every "
                "run (a random crop/resize or a noise node upstream changes their pixels). Disable the cache for "
                "such graphs, or feed the same image tensor.")
    return None


def tip_compile_unavailable(ctx: TipContext):
    if ctx.compile_requested and ctx.compile_unavailable_reason:
        return ("compile_unavailable", ctx.compile_unavailable_reason,
                f"vision compile is unavailable: {ctx.compile_unavailable_reason}")
    return None


def tip_reloaded_every_run(ctx: TipContext):
    if ctx.runs >= 3 and ctx.loads >= ctx.runs and not ctx.record.keep_model_loaded:
        return ("reload_every_run", "",
                f"the model was loaded in each of the last {ctx.runs} runs: turn on keep_model_loaded to keep "
                "it in memory between runs.")
    return None


def tip_quantized_but_fits(ctx: TipContext):
    r = ctx.record
    if (r.quantization in ("4-bit", "8-bit") and r.device.startswith("cuda") and ctx.gpu_total_bytes
            and ctx.model_bf16_bytes and ctx.model_bf16_bytes * 1.3 < ctx.gpu_total_bytes):
        return ("quantized_fits", r.quantization,
                f"the model is {r.quantization} but would fit this GPU in bf16 "
                f"({ctx.model_bf16_bytes / 2**30:.1f} GiB of {ctx.gpu_total_bytes / 2**30:.0f} GiB): "
                "bitsandbytes kernels decode slower than bf16; choose quantization 'none'.")
    return None


def tip_slow_decode(ctx: TipContext):
    r = ctx.record
    if (r.decode_tokens_per_s and ctx.expected_decode_tokens_per_s and r.device.startswith("cuda")
            and r.decode_tokens_per_s < 0.25 * ctx.expected_decode_tokens_per_s and r.attention == "eager"):
        return ("slow_decode", r.attention,
                f"decoding ran at {r.decode_tokens_per_s:.1f} tok/s, far below what this GPU should give "
                f"(~{ctx.expected_decode_tokens_per_s:.0f}); attention_mode is 'eager': use 'auto' or 'sdpa'.")
    return None


TIP_RULES = [tip_slow_vision, tip_zero_hit_rate, tip_compile_unavailable, tip_reloaded_every_run,
             tip_quantized_but_fits, tip_slow_decode]


class TipBook:
    """Shows each tip once per process, unless its situation changes."""

    def __init__(self) -> None:
        self._shown: dict[str, str] = {}
        self._lock = threading.Lock()
        self.runs = 0
        self.loads = 0
        self.runs_with_cache = 0
        self.hits_with_cache = 0

    def observe(self, record: RunRecord, cache_enabled: bool) -> None:
        with self._lock:
            self.runs += 1
            self.loads += int(record.model_loaded_this_run)
            if cache_enabled and record.images:
                self.runs_with_cache += 1
                self.hits_with_cache += cache_hits(record.images)
            if not record.model_loaded_this_run:
                # keep the "reloaded every run" window to consecutive runs
                self.loads = 0
                self.runs = 0

    def tips(self, ctx: TipContext) -> list[str]:
        out = []
        for rule in TIP_RULES:
            found = rule(ctx)
            if found is None:
                continue
            tip_id, situation, text = found
            with self._lock:
                if self._shown.get(tip_id) == situation:
                    continue
                self._shown[tip_id] = situation
            out.append(text)
        return out

    def context(self, record: RunRecord, **extra) -> TipContext:
        return TipContext(record=record, runs_with_cache=self.runs_with_cache, hits_with_cache=self.hits_with_cache,
                          loads=self.loads, runs=self.runs, **extra)


TIPS = TipBook()


def report(record: RunRecord) -> None:
    """One compact console summary per run, and the tips as separate lines."""
    log.info(record.summary())
    for tip in record.tips:
        log.info("[QwenVL-Fast] TIP: %s", tip)
