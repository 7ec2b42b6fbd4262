"""Linear layers for a few rows on the CPU: ``y = (W @ x^T)^T`` where that was measured faster.

Why: decoding a batch of answers multiplies a few rows (one per answer) by every weight matrix. The weights are
read once per step whatever the number of rows, so a batch of four should cost about what one row costs. With
PyTorch's x86 BLAS (MKL) on the AMD EPYC this project runs on, ``F.linear`` on 4 rows of a 2048x11008 fp32 matrix
took 19.7 ms against 4.8 ms for one row: the batch cost four single rows, and batched decode gained little. The
same product written as ``W @ x^T`` (``x^T`` a transposed view) took 5.4 ms (``docs/benchmark-cpu-linear.md``).

So nothing is assumed: at load, on a CPU, a short probe times both forms on one of the model's own weight matrices
(``probe_layer``) with ``PROBE_ROWS`` rows; only where the transposed form took at most ``GAIN_MARGIN`` of
``F.linear``'s time do the model's plain fp32 ``nn.Linear`` layers use it, and then only for 2 to
``SMALL_ROWS_MAX`` rows (one row, and a prefill's hundreds, keep ``F.linear``). Models whose largest matrix is
under ``MIN_PROBE_WEIGHTS`` (test-size models) are left alone: the probe would time noise.
``$QWENVL_FAST_CPU_SMALL_BATCH_LINEAR`` = ``on`` / ``off`` overrides the probe (``auto``, the default).
"""

from __future__ import annotations

import logging
import os
import time
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import QwenVLError

log = logging.getLogger("QwenVL-Fast")

SETTING_ENV = "QWENVL_FAST_CPU_SMALL_BATCH_LINEAR"
SMALL_ROWS_MAX = 64
PROBE_ROWS = 4
PROBE_REPEATS = 5
GAIN_MARGIN = 0.8  # a near-tie keeps F.linear: the same kernel as every other row count
MIN_PROBE_WEIGHTS = 4 * 1024 * 1024  # elements of the largest matrix (16 MiB in fp32)
# The probe's matrix: the largest at most this size (an MLP matrix, not a 151,936-row lm_head: 4 rows of that took
# 300 ms with F.linear here, and the probe calls each form 6 times).
MAX_PROBE_WEIGHTS = 32 * 1024 * 1024
_MARK = "_qwenvl_small_batch_linear"


def small_batch_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, as ``W @ x^T`` for 2 to ``SMALL_ROWS_MAX`` rows (a contiguous result)."""
    features = x.shape[-1]
    rows = x.numel() // features if features else 0
    if not (1 < rows <= SMALL_ROWS_MAX) or x.dtype != module.weight.dtype or x.device.type != "cpu":
        # (a model moved to a GPU after load keeps its own kernels' choice)
        return F.linear(x, module.weight, module.bias)
    flat = x.reshape(rows, features)
    if module.bias is None:
        out = torch.mm(module.weight, flat.t())
    else:
        out = torch.addmm(module.bias.unsqueeze(1), module.weight, flat.t())
    return out.t().contiguous().reshape(*x.shape[:-1], module.weight.shape[0])


def plain_fp32_linears(model: nn.Module) -> list[nn.Linear]:
    """The model's ``nn.Linear`` layers (the class itself: quantized and wrapped layers are not touched) with fp32
    weights."""
    return [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32
            and m.weight.device.type == "cpu"]


def probe(weight: torch.Tensor, rows: int = PROBE_ROWS, repeats: int = PROBE_REPEATS) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of ``F.linear`` and of the transposed form for ``rows`` rows on ``weight``."""
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
    forms = (lambda: F.linear(x, weight), lambda: torch.mm(weight, x.t()).t().contiguous())
    best = [float("inf"), float("inf")]
    with torch.inference_mode():
        for form in forms:
            form()  # warm: first-call allocations are not the kernel's speed
        for _ in range(repeats):
            for k, form in enumerate(forms):  # interleaved: a busy moment falls on both forms alike
                t0 = time.perf_counter()
                form()
                best[k] = min(best[k], time.perf_counter() - t0)
    return best[0], best[1]


def probe_layer(layers: list[nn.Linear]) -> nn.Linear:
    """The layer the probe times: the largest of at most ``MAX_PROBE_WEIGHTS`` elements (else the smallest)."""
    fitting = [m for m in layers if m.weight.numel() <= MAX_PROBE_WEIGHTS]
    if fitting:
        return max(fitting, key=lambda m: m.weight.numel())
    return min(layers, key=lambda m: m.weight.numel())


def setting() -> str:
    value = os.environ.get(SETTING_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "on", "off"):
        raise QwenVLError(f"${SETTING_ENV} must be auto, on or off (it is '{value[:40]}'); unset it for auto.")
    return value


def enable_small_batch_linear(model: nn.Module, device: torch.device) -> str:
    """Use the transposed form in ``model``'s plain fp32 linear layers where it was measured faster on this CPU;
    returns what was decided, for the log ('' on another device or when the model has no such layer)."""
    if device.type != "cpu":
        return ""
    layers = plain_fp32_linears(model)
    if not layers:
        return ""
    choice = setting()
    if choice == "auto":
        if max(m.weight.numel() for m in layers) < MIN_PROBE_WEIGHTS:
            return "small-batch linear: off (a test-size model: nothing to gain, the probe would time noise)"
        sample = probe_layer(layers)
        linear_s, transposed_s = probe(sample.weight.detach())
        shape = "x".join(str(d) for d in sample.weight.shape)
        measured = (f"{PROBE_ROWS} rows of {shape}: F.linear {linear_s * 1e3:.1f} ms, W @ x^T "
                    f"{transposed_s * 1e3:.1f} ms")
        if transposed_s > GAIN_MARGIN * linear_s:
            return f"small-batch linear: off ({measured})"
        choice, why = "on", measured
    else:
        why = f"${SETTING_ENV}={choice}"
    if choice == "off":
        return f"small-batch linear: off ({why})"
    for layer in layers:
        layer.forward = types.MethodType(small_batch_linear, layer)
        setattr(layer, _MARK, True)
    return f"small-batch linear: on for {len(layers)} layers, 2-{SMALL_ROWS_MAX} rows ({why})"


def is_enabled(module: Any) -> bool:
    return bool(getattr(module, _MARK, False))
