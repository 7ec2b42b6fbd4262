"""torch.compile for the Qwen-VL vision tower: regional, dynamic shapes, reversible, never fatal.

What is compiled, and why this way
----------------------------------
Every image size is a different number of patches, so the tower sees a new input shape on
almost every call. Compiling the whole tower fails at that: its forward builds ``cu_seqlens``,
the window index and the rotary tables from ``grid_thw`` with data-dependent ops, and the
attention splits the packed sequence with ``cu_seqlens.tolist()``. Dynamo breaks the graph
there and then unrolls the per-window loop that follows, guarding on the number of windows,
so it recompiles (for tens of seconds) for nearly every new image size and soon hits its
recompile limit. ``mode="reduce-overhead"`` is no better: it records one CUDA graph per input
shape.

So this module compiles *regions*: each transformer block of ``visual.blocks`` and the patch
mergers (``merger`` and, on Qwen3-VL, every ``deepstack_merger_list`` entry), each with
``torch.compile(dynamic=True)``. The data-dependent tower forward stays eager. Inside each
block the attention module stays eager too (wrapped in ``torch.compiler.disable``): its
``.tolist()`` split is the loop above, and its kernel (SDPA / flash-attention) is already one
fused call. What gets compiled is the code around it: the norms, the MLP and the residual adds.
That gives a fixed graph break per block at the attention call, and no graph break that
depends on the input.

All blocks of a tower share their code objects, and Dynamo guards on parameter shapes, not on
the module instance, so one compile serves every block. The first call compiles 4 frames (the
block's ``GradientCheckpointingLayer.__call__``, its ``forward``, the resume function after the
attention, and the merger). Measured on transformers 5.24 / torch 2.14 CPU, it also recompiles at
most once per frame: under ``no_grad`` the first block's input is a view and later blocks' inputs
are not (3 recompiles; none under ``inference_mode``), and Qwen3-VL's deepstack mergers normalise
over 4x the width of the final merger (1). After that, new image sizes compile nothing.

Mechanics: ``nn.Module.compile`` style (the module's ``_compiled_call_impl``), so modules are
never replaced. The ``state_dict`` keys, hooks and module identity stay the same, and
``uncompile_vision_tower`` restores the eager tower exactly. The compiled call is wrapped: if
compiling fails lazily (compilation happens at the first call, not in ``compile_vision_tower``),
the call reruns eagerly. If eager succeeds, the whole tower goes back to eager with ONE log line.
If eager fails too, the error was not the compiler's and it is raised. Out of memory is never
taken for a compiler failure: it is raised as it is, for the engine's out-of-memory policy.

Counting compilations: ``count_recompiles()`` reads ``torch._dynamo.utils.counters`` (frame
compiles, graphs, graph breaks) and the ``recompile_reason`` of Dynamo's per-compile
``CompilationMetrics`` records (``torch._dynamo.utils.get_compilation_metrics()``), see there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import first_line
from ..perf_monitor import sync_device

log = logging.getLogger("QwenVL-Fast")

SETTINGS = ("auto", "on", "off")
MODE_REGIONAL = "regional"  # each block + merger compiled, dynamic=True, attention eager
MODE_EAGER = "eager"

# Where the compile state lives on the vision tower module (a plain attribute: not a submodule,
# not in the state_dict).
_STATE_ATTR = "_qwenvl_fast_compile"
_MISSING = object()


# --------------------------------------------------------------------------------------------
# Reports and counters
# --------------------------------------------------------------------------------------------
@dataclass
class CompileCounter:
    """Dynamo compilation activity during a ``count_recompiles()`` block (filled in on exit).

    frames:       Dynamo frame compilations, ``counters["frames"]["ok"]``. This counts first
                  compiles, recompiles and every resume function after a graph break.
    recompiles:   compilations of a frame that already had a compiled entry whose guards
                  failed: ``CompilationMetrics.recompile_reason`` is set.
    graphs:       FX graphs handed to the backend, ``counters["stats"]["unique_graphs"]``.
    graph_breaks: graph breaks Dynamo met while tracing, the sum of ``counters["graph_break"]``.
    reasons:      the recompile reasons (the first guard that failed, one per recompile).
    truncated:    torch keeps only the latest 64 metrics records. True when the block compiled
                  at least that many times, in which case ``recompiles`` is a lower bound.
    """

    frames: int = 0
    recompiles: int = 0
    graphs: int = 0
    graph_breaks: int = 0
    reasons: list[str] = field(default_factory=list)
    truncated: bool = False


def _counter_snapshot() -> tuple[int, int, int]:
    from torch._dynamo.utils import counters

    return (int(counters["frames"]["ok"]), int(counters["stats"]["unique_graphs"]),
            int(sum(counters["graph_break"].values())))


@contextlib.contextmanager
def count_recompiles() -> Iterator[CompileCounter]:
    """Count Dynamo compilations inside the ``with`` block. The counts are read on exit.

    ``with count_recompiles() as c: visual(x, grid_thw=g)`` then ``c.recompiles``, ``c.frames``.
    This uses the process-wide Dynamo counters, so compilations from other threads in the same
    window are counted too.
    """
    from torch._dynamo import utils as dynamo_utils

    result = CompileCounter()
    # Keep the old records alive while the block runs, so their ids cannot be reused by new ones.
    before = dynamo_utils.get_compilation_metrics()
    before_ids = {id(m) for m in before}
    frames0, graphs0, breaks0 = _counter_snapshot()
    try:
        yield result
    finally:
        frames1, graphs1, breaks1 = _counter_snapshot()
        new = [m for m in dynamo_utils.get_compilation_metrics() if id(m) not in before_ids]
        reasons = [str(m.recompile_reason) for m in new if getattr(m, "recompile_reason", None)]
        limit = getattr(getattr(dynamo_utils, "_compilation_metrics", None), "maxlen", None) or 64
        result.frames = frames1 - frames0
        result.graphs = graphs1 - graphs0
        result.graph_breaks = breaks1 - breaks0
        result.recompiles = len(reasons)
        result.reasons = reasons
        result.truncated = len(new) >= limit
        del before


@dataclass
class CompileReport:
    """What ``compile_vision_tower`` did, plus timings of the calls the caller reports to it.

    enabled:          the tower's regions are compiled now. A lazy compile failure flips this
                      to False.
    mode:             ``"regional"`` (blocks and mergers compiled, dynamic shapes, attention
                      eager) or ``"eager"``.
    reason:           one line saying why: what was compiled, or what is missing.
    setting:          the requested setting (auto/on/off).
    device:           the device the decision was made for.
    compiled_modules: how many modules got a compiled call.
    warmup_s:         the first call after compiling (it includes compile time). None until that
                      call is reported, and always None when not compiled.
    steady_calls / steady_total_s: later calls that compiled nothing (``steady_mean_s``).
    compile_calls / compile_calls_s: later calls that did compile something, e.g. a new dtype.
                      They are kept out of the steady state. Only ``measure()`` can tell these
                      apart; ``note_call`` without a counter counts every later call as steady.
    recompiles, frame_compiles, graph_breaks: totals over the calls timed with ``measure()``.
    """

    enabled: bool
    mode: str
    reason: str
    setting: str = "auto"
    device: str = ""
    compiled_modules: int = 0
    warmup_s: float | None = None
    steady_calls: int = 0
    steady_total_s: float = 0.0
    compile_calls: int = 0
    compile_calls_s: float = 0.0
    recompiles: int = 0
    frame_compiles: int = 0
    graph_breaks: int = 0
    _awaiting_warmup: bool = field(default=False, repr=False)

    @property
    def steady_mean_s(self) -> float | None:
        return self.steady_total_s / self.steady_calls if self.steady_calls else None

    def note_call(self, seconds: float, counter: CompileCounter | None = None) -> None:
        """Record one vision-tower call. The first call after compiling is the warm-up.

        The caller times the call. On CUDA it must synchronize before stopping the clock, or
        use ``measure()``, which does.
        """
        if counter is not None:
            self.recompiles += counter.recompiles
            self.frame_compiles += counter.frames
            self.graph_breaks += counter.graph_breaks
        if self._awaiting_warmup:
            self._awaiting_warmup = False
            self.warmup_s = float(seconds)
        elif counter is not None and counter.frames > 0:
            self.compile_calls += 1
            self.compile_calls_s += float(seconds)
        else:
            self.steady_calls += 1
            self.steady_total_s += float(seconds)

    @contextlib.contextmanager
    def measure(self) -> Iterator[CompileCounter]:
        """Time a call (synchronizing CUDA) and count its compilations, then ``note_call`` it."""
        sync = _synchronizer(self.device)
        sync()
        with count_recompiles() as counter:
            t0 = time.perf_counter()
            yield counter
            sync()
            seconds = time.perf_counter() - t0
        self.note_call(seconds, counter)

    def summary(self) -> str:
        if not self.enabled and self.warmup_s is None:
            return f"vision compile off ({self.reason})"
        parts = [f"vision compile {self.mode}" if self.enabled else f"vision compile off ({self.reason})"]
        if self.warmup_s is not None:
            parts.append(f"warm-up {self.warmup_s:.2f} s")
        if self.steady_mean_s is not None:
            parts.append(f"steady {self.steady_mean_s * 1000:.1f} ms/call over {self.steady_calls}")
        if self.recompiles:
            parts.append(f"{self.recompiles} recompiles")
        return ", ".join(parts)


def _synchronizer(device: str) -> Callable[[], None]:
    dev = torch.device(device)
    return lambda: sync_device(dev)


# --------------------------------------------------------------------------------------------
# Can torch.compile work here?
# --------------------------------------------------------------------------------------------
def _cpp_compiler_candidates() -> list[str]:
    """The compilers Inductor's CPU backend will actually try (its config, honouring $CXX)."""
    if sys.platform == "win32":
        return [os.environ.get("CXX", "cl")]
    try:
        from torch._inductor import config as inductor_config

        cxx = inductor_config.cpp.cxx
        names = [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]
    except Exception:  # noqa: BLE001  (an Inductor without that setting: use its long-standing default)
        names = []
    return names or [os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")]


def _find_c_compiler() -> str | None:
    for name in _cpp_compiler_candidates():
        # $CXX may carry flags ("ccache g++"); the first word must be a program on PATH.
        program = name.split()[0] if name.split() else name
        found = shutil.which(program)
        if found:
            return found
    return None


def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # Inductor's CUDA backend generates Triton kernels
    except Exception as exc:  # noqa: BLE001  (ImportError, or a broken install that fails while importing)
        hint = "no Triton on Windows: pip install triton-windows" if sys.platform == "win32" else "pip install triton"
        detail = "" if isinstance(exc, ImportError) else f"; import failed: {type(exc).__name__}"
        return False, f"Triton is not installed ({hint}{detail})"
    return True, f"Triton {getattr(triton, '__version__', '?')}"


def compiler_status(device: torch.device | str) -> tuple[bool, str]:
    """Can torch.compile (Inductor) work on ``device``? Returns (ok, one-line reason).

    CUDA: CUDA available, Triton importable and a GPU of compute capability >= 7.0 (Triton's
    minimum). CPU: the C++ compiler Inductor uses is on PATH (g++ / clang++ / $CXX; cl on
    Windows). Other device types: no pre-check, ok, and a lazy failure falls back to eager.
    """
    device = torch.device(device)
    try:
        from torch import _dynamo

        supported = bool(_dynamo.is_dynamo_supported())
    except Exception as exc:  # noqa: BLE001  (a broken torch install must not break model loading)
        return False, f"torch.compile cannot be imported ({type(exc).__name__}: {exc})"
    if not supported:
        py = ".".join(str(v) for v in sys.version_info[:2])
        return False, f"torch.compile is not supported on Python {py} with torch {torch.__version__}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        ok, why = _triton_status()
        if not ok:
            return False, why
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7:
            return False, f"GPU compute capability {major}.{minor} is below 7.0 (Triton needs Volta or newer)"
        return True, f"{why}, GPU compute capability {major}.{minor}"
    if device.type == "cpu":
        found = _find_c_compiler()
        if found is None:
            wanted = " / ".join(_cpp_compiler_candidates())
            return False, f"no C++ compiler on PATH (Inductor on CPU needs {wanted}; install it or set CXX)"
        return True, f"C++ compiler {found}"
    return True, f"no pre-check for device type '{device.type}'; torch.compile will be tried"


# --------------------------------------------------------------------------------------------
# Compile / uncompile
# --------------------------------------------------------------------------------------------
@dataclass
class _Region:
    module: nn.Module
    attention: nn.Module | None
    attention_forward: Any = _MISSING  # the attention's own instance ``forward`` before, if any


@dataclass
class _TowerState:
    report: CompileReport
    regions: list[_Region]
    failed: bool = False


def find_vision_tower(model: nn.Module) -> nn.Module | None:
    """``model.model.visual`` (transformers 5.x), ``model.visual`` (4.x), or the tower itself."""
    for candidate in (getattr(getattr(model, "model", None), "visual", None), getattr(model, "visual", None), model):
        if isinstance(candidate, nn.Module) and isinstance(getattr(candidate, "blocks", None), nn.ModuleList):
            return candidate
    return None


def _attention_of(block: nn.Module) -> nn.Module | None:
    for name in ("attn", "self_attn", "attention"):
        sub = getattr(block, name, None)
        if isinstance(sub, nn.Module):
            return sub
    return None


def _regions_of(visual: nn.Module) -> list[_Region]:
    regions = [_Region(block, _attention_of(block)) for block in visual.blocks]
    merger = getattr(visual, "merger", None)
    if isinstance(merger, nn.Module):
        regions.append(_Region(merger, None))
    deepstack = getattr(visual, "deepstack_merger_list", None)
    if isinstance(deepstack, nn.ModuleList):
        regions.extend(_Region(m, None) for m in deepstack)
    return regions


def _param_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")




def _guarded_call(compiled: Callable[..., Any], eager: Callable[..., Any], visual: nn.Module,
                  state: _TowerState) -> Callable[..., Any]:
    """The module's compiled call, falling back to eager if compiling fails at call time."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if state.failed:
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            # Not the compiler's fault: an eager rerun that then fits would turn compiling off for good. The
            # engine's one out-of-memory policy (engine.memory.free_after_oom) runs where the run catches it.
            raise
        except Exception as exc:  # noqa: BLE001  (any compiler failure; the eager rerun sorts out the rest)
            # Rerun eagerly. If that works too, the compiler was at fault: go eager for good
            # (one log line). If it fails as well, the input was bad and the eager error is the
            # one to report, with compilation left as it was. The regions are pure functions of
            # their inputs, so running one twice has no side effect.
            out = eager(*args, **kwargs)
            state.failed = True
            _restore(visual, state)
            state.report.enabled = False
            state.report.mode = MODE_EAGER
            state.report.reason = f"compile failed: {first_line(exc)}"
            log.warning("[QwenVL-Fast] vision compile failed at first use (%s); the vision tower runs eagerly",
                        first_line(exc))
            return out

    return call


def _restore(visual: nn.Module, state: _TowerState) -> None:
    for region in state.regions:
        region.module._compiled_call_impl = None
        if region.attention is not None:
            if region.attention_forward is _MISSING:
                region.attention.__dict__.pop("forward", None)
            else:
                region.attention.forward = region.attention_forward
    if visual.__dict__.get(_STATE_ATTR) is state:
        del visual.__dict__[_STATE_ATTR]


def _disabled_report(setting: str, device: str, reason: str) -> CompileReport:
    return CompileReport(enabled=False, mode=MODE_EAGER, reason=reason, setting=setting, device=device)


def compile_vision_tower(model: nn.Module, setting: str = "auto",
                         device: torch.device | str | None = None) -> CompileReport:
    """Compile the vision tower's blocks and mergers in place (regional, ``dynamic=True``).

    setting: ``"auto"`` compiles only on CUDA with a working compiler, ``"on"`` tries on any
    device whose compiler check passes, and ``"off"`` leaves the tower eager (it uncompiles
    a tower compiled earlier, so that switching the setting on a loaded model takes effect).
    Calling it twice does not wrap twice: the second call returns the first report. This never
    raises. When compiling is unavailable or fails, the tower stays eager, the report says why
    and one line goes to the log.
    """
    requested = str(setting or "auto").strip().lower()
    visual = find_vision_tower(model)
    dev = torch.device(device) if device is not None else (
        _param_device(visual) if visual is not None else torch.device("cpu"))
    dev_name = str(dev)
    if requested not in SETTINGS:
        log.warning("[QwenVL-Fast] unknown compile setting '%s' (choose auto/on/off); the vision tower runs eagerly",
                    setting)
        return _disabled_report(requested, dev_name, f"unknown setting '{setting}'")
    if visual is None:
        if requested != "off":
            log.info("[QwenVL-Fast] vision compile skipped: no vision tower (.blocks) found on %s",
                     type(model).__name__)
        return _disabled_report(requested, dev_name, "no vision tower found")
    state: _TowerState | None = visual.__dict__.get(_STATE_ATTR)
    if requested == "off":
        if state is not None:
            uncompile_vision_tower(visual)
        return _disabled_report(requested, dev_name, "off")
    if state is not None:
        return state.report  # already compiled: idempotent
    if requested == "auto" and dev.type != "cuda":
        # Not logged: on CPU, auto means off. Compiling costs tens of seconds there and saves little.
        return _disabled_report(requested, dev_name, f"auto compiles on CUDA only (device is {dev.type})")
    ok, why = compiler_status(dev)
    if not ok:
        log.warning("[QwenVL-Fast] vision compile unavailable: %s; the vision tower runs eagerly", why)
        return _disabled_report(requested, dev_name, why)

    report = CompileReport(enabled=True, mode=MODE_REGIONAL, reason="", setting=requested, device=dev_name)
    state = _TowerState(report=report, regions=[])
    try:
        for region in _regions_of(visual):
            module = region.module
            if getattr(module, "_compiled_call_impl", None) is not None:
                continue  # compiled by someone else: leave theirs alone
            if region.attention is not None:
                region.attention_forward = region.attention.__dict__.get("forward", _MISSING)
                # Keep the attention eager: its cu_seqlens.tolist() split would otherwise make
                # Dynamo recompile for every new number of windows, i.e. for most image sizes.
                region.attention.forward = torch.compiler.disable(region.attention.forward)
            state.regions.append(region)
            compiled = torch.compile(module._call_impl, dynamic=True)
            module._compiled_call_impl = _guarded_call(compiled, module._call_impl, visual, state)
        visual.__dict__[_STATE_ATTR] = state
    except Exception as exc:  # noqa: BLE001  (promised: never raise, fall back to eager)
        _restore(visual, state)
        log.warning("[QwenVL-Fast] vision compile failed (%s); the vision tower runs eagerly", first_line(exc))
        return _disabled_report(requested, dev_name, f"compile failed: {first_line(exc)}")
    report.compiled_modules = len(state.regions)
    report.reason = (f"{len(state.regions)} regions (blocks + mergers), dynamic shapes, attention eager; {why}")
    report._awaiting_warmup = True
    log.info("[QwenVL-Fast] vision tower compiled: %s", report.reason)
    return report


def uncompile_vision_tower(model: nn.Module) -> bool:
    """Restore the eager vision tower. Returns True if something was compiled.

    Dynamo's code cache is process-wide and is not cleared, because other compiled code may use
    it. Its entries for these modules simply go unused.
    """
    visual = find_vision_tower(model)
    state: _TowerState | None = visual.__dict__.get(_STATE_ATTR) if visual is not None else None
    if visual is None or state is None:
        return False
    _restore(visual, state)
    state.report.enabled = False
    state.report.mode = MODE_EAGER
    state.report.reason = "uncompiled"
    return True


def compile_state(model: nn.Module) -> CompileReport | None:
    """The report of the compilation currently applied to the model's tower, or None if eager."""
    visual = find_vision_tower(model)
    state = visual.__dict__.get(_STATE_ATTR) if visual is not None else None
    return state.report if state is not None else None
