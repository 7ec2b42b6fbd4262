"""``dtype=auto`` on a CPU: each part of the model (vision tower, language-model body, ``lm_head``) in the dtype
that a short probe measured faster on this CPU, and the intra-op threads on the physical cores.

Why per part: on a CPU that computes bf16 natively (Intel AMX or AVX512-BF16), a tower-shaped matmul
(4096x1280 by 1280x3420) ran 3.3x faster in bf16 than in fp32, while one token through a Qwen ``lm_head``
(1x2048 by 2048x151,936) ran slower in bf16 (205 ms against 150 ms): the tower is compute-bound, a one-token
product is bound by memory and by the bf16 kernel's conversions. So nothing is assumed: where bf16 is native, a
probe times each part's shape in both dtypes once per CPU model (cached in the pack's cache folder) and a part
runs in bf16 only where bf16 was clearly faster. Where bf16 is not native (AVX2 CPUs such as the AMD EPYC Zen 3
this project's CI runs on, where bf16 is emulated), everything stays fp32 and nothing is probed.

Threads: torch's intra-op pool is put on the physical cores (hyper-threads share one core's matmul units and
only add contention), unless the user or the host chose a count: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set,
or ``torch.set_num_threads`` called since the pack was imported. ComfyUI sets no thread count of its own.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("QwenVL-Fast")

PARTS = ("tower", "text", "lm_head")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# A part runs in bf16 only when bf16 took at most this share of fp32's time: a near-tie keeps fp32's precision.
BF16_MARGIN = 0.85
PROBE_FILE = "cpu_dtype_probe.json"
# The text body's probe weighs one caption: a prefill of this many rows, then this many one-token steps.
TEXT_PREFILL_ROWS, TEXT_DECODE_STEPS = 512, 64
TOWER_ROWS = 1024
LM_HEAD_COLUMNS_CAP = 16384  # a one-token product scales with the columns: the ratio holds, the probe stays small

_THREADS_AT_IMPORT = torch.get_num_threads()
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class PartDtypes:
    """The dtype each part runs in, and why (for the log and the run record)."""

    tower: torch.dtype = torch.float32
    text: torch.dtype = torch.float32
    lm_head: torch.dtype = torch.float32
    why: str = ""

    @property
    def mixed(self) -> bool:
        return len({self.tower, self.text, self.lm_head}) > 1

    def summary(self) -> str:
        """``"tower bf16, text fp32, lm_head fp32"``; a single dtype when all parts agree."""
        if not self.mixed:
            return _SHORT.get(self.text, str(self.text))
        return ", ".join(f"{p} {_SHORT.get(getattr(self, p), str(getattr(self, p)))}" for p in PARTS)


# -- what this CPU is ---------------------------------------------------------------------------
def cpu_model_name(cpuinfo: str | None = None) -> str:
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        if line.lower().startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        if line.lower().startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # macOS, Windows: torch's own report is used instead
        return ""


def native_bf16(flags: set[str] | None = None, torch_says: bool | None = None) -> tuple[bool, str]:
    """(native, why). The CPU flags decide where they can be read: oneDNN also reports bf16 "supported" on plain
    AVX512 CPUs, where it emulates bf16; only without /proc/cpuinfo is torch's report the answer."""
    flags = cpu_flags() if flags is None else flags
    if flags:
        found = [f for f in NATIVE_BF16_FLAGS if f in flags]
        if found:
            return True, f"native bf16 ({', '.join(found)})"
        return False, "no native bf16 on this CPU (no amx_bf16 / avx512_bf16)"
    if torch_says is None:
        torch_says = _torch_reports_bf16()
    return (True, "native bf16 (torch's report)") if torch_says else (False, "no native bf16 (torch's report)")


def _torch_reports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # an older torch or a build without oneDNN
        return False


# -- the probe ----------------------------------------------------------------------------------
def probe_shapes(config: Any) -> dict[str, list[tuple[int, int, int, int]]]:
    """Per part, the matmuls (rows, inner, columns, count) one typical request does, from the model's dims."""
    vision = getattr(config, "vision_config", config)
    text = getattr(config, "text_config", config)
    v_hidden = int(getattr(vision, "hidden_size", getattr(vision, "embed_dim", 1280)))
    v_mlp = int(getattr(vision, "intermediate_size", 4 * v_hidden))
    hidden = int(getattr(text, "hidden_size", 2048))
    mlp = int(getattr(text, "intermediate_size", 4 * hidden))
    vocab = int(getattr(text, "vocab_size", getattr(config, "vocab_size", 151936)))
    return {
        "tower": [(TOWER_ROWS, v_hidden, v_mlp, 1)],
        "text": [(TEXT_PREFILL_ROWS, hidden, mlp, 1), (1, hidden, mlp, TEXT_DECODE_STEPS)],
        "lm_head": [(1, hidden, min(vocab, LM_HEAD_COLUMNS_CAP), 1)],
    }


def time_matmuls(shapes: list[tuple[int, int, int, int]], dtype: torch.dtype, repeats: int = 3) -> float:
    """Seconds for one pass over ``shapes`` (each matmul timed alone, best of ``repeats``, times its count)."""
    total = 0.0
    gen = torch.Generator().manual_seed(0)
    for rows, inner, cols, count in shapes:
        a = torch.randn(rows, inner, generator=gen).to(dtype)
        b = torch.randn(inner, cols, generator=gen).to(dtype)
        torch.matmul(a, b)  # the first call pays oneDNN's kernel selection
        best = float("inf")
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t0)
        total += best * count
    return total


def probe(shapes: dict[str, list[tuple[int, int, int, int]]], repeats: int = 3,
          timer: Callable[..., float] = time_matmuls) -> dict[str, dict[str, float]]:
    """``{part: {"fp32": s, "bf16": s}}``."""
    return {part: {"fp32": timer(s, torch.float32, repeats), "bf16": timer(s, torch.bfloat16, repeats)}
            for part, s in shapes.items()}


def choose(native: bool, why_native: str, timings: dict[str, dict[str, float]] | None) -> PartDtypes:
    """The pure decision: bf16 for a part only on a native-bf16 CPU and only where the probe saw it clearly faster."""
    if not native or not timings:
        return PartDtypes(why=why_native)
    picks: dict[str, torch.dtype] = {}
    notes = []
    for part in PARTS:
        t = timings.get(part) or {}
        fp32, bf16 = t.get("fp32"), t.get("bf16")
        faster = fp32 is not None and bf16 is not None and fp32 > 0 and bf16 <= BF16_MARGIN * fp32
        picks[part] = torch.bfloat16 if faster else torch.float32
        if fp32 and bf16:
            notes.append(f"{part} bf16/fp32 {bf16 / fp32:.2f}")
    return PartDtypes(**picks, why=f"{why_native}; probe: {', '.join(notes)}")


def _probe_key(shapes: dict[str, list[tuple[int, int, int, int]]]) -> str:
    return json.dumps([cpu_model_name(), torch.__version__, torch.get_num_threads(),
                       {k: [list(s) for s in v] for k, v in sorted(shapes.items())}])


def cached_probe(shapes: dict[str, list[tuple[int, int, int, int]]], cache_dir: Path | None = None,
                 run_probe: Callable[[dict], dict[str, dict[str, float]]] | None = None) -> dict[str, dict[str, float]]:
    """The probe's timings for this CPU model, torch version, thread count and shapes: read from the cache
    folder's ``cpu_dtype_probe.json`` when there, else measured once and written (a write failure only logs)."""
    from ..cache.location import default_cache_dir

    path = (cache_dir or default_cache_dir()) / PROBE_FILE
    key = _probe_key(shapes)
    stored: dict[str, Any] = {}
    try:
        stored = json.loads(path.read_text())
        if isinstance(stored, dict) and isinstance(stored.get(key), dict):
            return stored[key]
    except (OSError, ValueError):
        stored = {}
    t0 = time.perf_counter()
    timings = (run_probe or probe)(shapes)
    log.info("[QwenVL-Fast] CPU dtype probe took %.1f s (once per CPU model; cached in %s)",
             time.perf_counter() - t0, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = stored if isinstance(stored, dict) else {}
        stored[key] = timings
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stored, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("[QwenVL-Fast] could not keep the CPU dtype probe in %s (%s): it runs again next load", path, exc)
    return timings


# -- threads ------------------------------------------------------------------------------------
def physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except Exception:  # psutil missing (ComfyUI always has it)
        return None


def set_cpu_threads(cores: int | None = None) -> str:
    """Put torch's intra-op threads on the physical cores unless someone chose a count; says what it did."""
    current = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            return f"{current} threads ({var} is set)"
    if current != _THREADS_AT_IMPORT:
        return f"{current} threads (set by the host)"
    cores = physical_cores() if cores is None else cores
    if cores and cores != current:
        torch.set_num_threads(cores)
        return f"{cores} threads (physical cores; torch had {current})"
    return f"{current} threads"


# -- applying the choice to a loaded model ------------------------------------------------------
def choose_for_model(config: Any, cache_dir: Path | None = None) -> PartDtypes:
    native, why = native_bf16()
    if not native:
        return PartDtypes(why=why)
    return choose(native, why, cached_probe(probe_shapes(config), cache_dir))


def apply(model: Any, parts: PartDtypes) -> None:
    """Cast each part; where two neighbouring parts differ, their boundary casts the activations (the tower's
    output is cast by transformers itself when it is placed among the text embeddings)."""
    inner = model.model
    inner.visual.to(parts.tower)
    inner.language_model.to(parts.text)
    head = model.lm_head
    if head.weight is inner.language_model.get_input_embeddings().weight:  # tied: one tensor, the text's dtype
        if parts.lm_head != parts.text:
            head.weight = torch.nn.Parameter(head.weight.detach().to(parts.lm_head), requires_grad=False)
    else:
        head.to(parts.lm_head)
    if parts.lm_head != parts.text:
        head.register_forward_pre_hook(_cast_input(parts.lm_head))
        head.register_forward_hook(lambda _m, _i, out: out.float())  # logits processors expect fp32 scores


def _cast_input(dtype: torch.dtype) -> Callable:
    def hook(_module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    return hook


def auto_cpu_parts(model: Any, dtype_option: str, device: torch.device, cache_dir: Path | None = None,
                   chooser: Callable[[Any], PartDtypes] | None = None) -> PartDtypes | None:
    """For ``dtype=auto`` on a CPU: threads, the per-part choice, applied; None elsewhere (nothing changed)."""
    if dtype_option != "auto" or device.type != "cpu":
        return None
    threads = set_cpu_threads()
    parts = chooser(model.config) if chooser is not None else choose_for_model(model.config, cache_dir)
    if parts.mixed or parts.text != torch.float32:
        apply(model, parts)
    log.info("[QwenVL-Fast] CPU dtype auto: %s (%s); %s", parts.summary(), parts.why, threads)
    return parts
