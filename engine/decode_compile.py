"""Compiled decode: a static KV cache and ``torch.compile`` (CUDA graphs) for the language model's decode steps.

What it does
------------
transformers' ``generate`` compiles the decode forward by itself when the cache it decodes into is compileable
(a ``StaticCache``) and the model is on CUDA: ``GenerationMixin._valid_auto_compile_criteria`` (checked on
transformers 5.24) then calls ``model.get_compiled_call(compile_config)``, which wraps ``model.__call__`` in
``torch.compile(mode="reduce-overhead")`` (Inductor + CUDA graphs). The prefill stays eager. With a static cache
``prepare_inputs_for_generation`` builds the 4-D attention mask outside the model, sized to the cache, and the
Qwen-VL families receive their 3-D rope positions from ``generate`` (``position_ids`` with the stored
``rope_deltas`` already added), so every decode step has the same shapes: [batch, 1] tokens, a cache of
[batch, kv heads, max_cache_len, head dim] per layer and a mask of [batch, 1, 1, max_cache_len].

This module decides per loaded model whether decode runs that way, and provides what ``generate`` needs:

- ONE preallocated ``StaticCache`` per model, sized to a bucket (:func:`cache_bucket`), reset and reused across
  calls. A new cache object per call would put new tensors at new addresses, and CUDA graphs re-record when a
  static input's address changes (``torch._dynamo.mark_static_address``); the same object keeps one recording.
- the compile itself, through an instance override of ``get_compiled_call``: the compiled call is guarded, so
  a compile that fails (at its first call, which is when Inductor compiles) puts the layers' cache lengths back,
  reruns that step eagerly, turns compiled decode off for the model with ONE log line, and decoding goes on.
- continuity with prefix-KV reuse (``prefix_cache.py``): a reused prefix (a ``DynamicCache`` of copies) is copied
  into the static cache, and after a call that fills the prefix cache :meth:`DecodeCompile.prefix_view` shows the
  static cache's first tokens as the ``DynamicCache`` that ``prefix_cache.snapshot`` cuts. Greedy answers are the
  same either way (tests/test_compiled_decode.py).

When it stays off (one log line at load under ``auto``; none under ``off``): not on CUDA, quantized
(bitsandbytes), a text model whose layers are not all full attention (Qwen3.5's hybrid linear attention: its
cache holds recurrent states), a transformers without the pieces above, no working Inductor (Triton), or weights
offloaded by a device map.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..core.errors import first_line

log = logging.getLogger("QwenVL-Fast")

DECODE_COMPILE_CHOICES = ["auto", "off"]

# Static cache lengths are bucketed: a compiled decode step's shapes include the cache length, so a cache sized to
# each call's prompt + max_new_tokens would recompile (and record new CUDA graphs) for nearly every prompt. Powers of
# two from 256: at most 8 sizes up to a 32k context, so at most a few compiles ever, and the cache is at most twice
# the length the call needs. A decode step reads the whole static cache (the mask hides the unused tail): for a 3B
# model that is ~36 KiB per position (36 layers x 2 KV heads x 128 x 2 bytes x K and V), ~37 MiB at 1024 positions,
# under 1% of the ~7 GB of weights each step also reads, so the padding costs little.
BUCKET_MIN = 256


def cache_bucket(tokens: int, context_length: int | None = None) -> int:
    """The static cache length for a call needing ``tokens`` positions (prompt + new tokens).

    The next power of two at or above ``max(tokens, BUCKET_MIN)``, capped at the model's context (never below
    ``tokens``): prompts of different lengths share a bucket, and so one compiled graph.
    """
    need = max(int(tokens), 1)
    bucket = BUCKET_MIN
    while bucket < need:
        bucket *= 2
    if context_length is not None and bucket > int(context_length):
        bucket = max(int(context_length), need)
    return bucket




def _transformers_pieces() -> tuple[Any, Any, str]:
    """(StaticCache, CompileConfig, why missing): what this module needs from transformers."""
    try:
        from transformers import CompileConfig, PreTrainedModel, StaticCache
        from transformers.generation.utils import GenerationMixin
    except Exception as exc:  # noqa: BLE001  (an old or broken transformers: eager decode)
        return None, None, f"this transformers has no StaticCache/CompileConfig ({first_line(exc)})"
    if not hasattr(GenerationMixin, "_valid_auto_compile_criteria") or not hasattr(PreTrainedModel,
                                                                                   "get_compiled_call"):
        return None, None, "this transformers does not compile decode in generate"
    return StaticCache, CompileConfig, ""


def _static_layers_reason(model: Any, static_cache_cls: Any) -> str:
    """Why a StaticCache of this model would not be plain full-attention static layers; "" when it is."""
    from transformers.cache_utils import StaticLayer

    try:
        probe = static_cache_cls(config=model.config, max_cache_len=BUCKET_MIN)  # lazy: allocates nothing
    except Exception as exc:  # noqa: BLE001
        return f"no static cache for this model ({first_line(exc)})"
    kinds = {type(layer).__name__ for layer in probe.layers if type(layer) is not StaticLayer}
    if kinds:
        # Qwen3.5: linear-attention layers keep recurrent and conv states; sliding windows forget. Neither fits one
        # preallocated [max_cache_len] buffer per layer that a prefix can be copied into and cut from.
        return f"its cache is not plain full attention ({', '.join(sorted(kinds))})"
    return ""


def support_reason(model: Any, device: torch.device, quantization: str = "none", model_type: str = "",
                   check_compiler: bool = True) -> str:
    """Why compiled decode cannot run for this model here; "" when it can."""
    if device.type != "cuda":
        return f"needs CUDA (device is {device.type})"
    if quantization not in ("none", "", None) or getattr(model, "hf_quantizer", None) is not None:
        return f"quantized ({quantization}): bitsandbytes layers do not compile into CUDA graphs"
    if str(model_type).startswith("qwen3_5"):
        return "Qwen3.5's hybrid linear-attention cache is not a static KV cache"
    static_cls, _, missing = _transformers_pieces()
    if missing:
        return missing
    device_map = getattr(model, "hf_device_map", None) or {}
    if any(str(d) in ("cpu", "disk") for d in device_map.values()):
        return "weights offloaded to CPU/disk"
    why = _static_layers_reason(model, static_cls)
    if why:
        return why
    if check_compiler:
        from ..vision.tower_compile import compiler_status

        ok, status = compiler_status(device)
        if not ok:
            return status
    return ""


class DecodeCompile:
    """Per loaded model: whether decode runs on a static cache (compiled on CUDA), and the kwargs that make it so.

    ``setting``: "auto" (on where supported) or "off". ``enabled``: the static-cache path is used. ``compiled``:
    decode steps go through ``torch.compile`` (transformers' auto-compile, guarded here).

    Test hooks (keyword-only, never used by the pack): ``force_static=True`` skips the support checks and uses the
    static cache on any device; ``compile_config`` (a transformers ``CompileConfig``, or None for no compile) is what
    decode compiles with; with ``force_static`` and no config, decode runs the static cache eagerly.
    """

    def __init__(self, model: Any, setting: str, device: torch.device, *, quantization: str = "none",
                 model_type: str = "", context_length: int | None = None, force_static: bool = False,
                 compile_config: Any = "default") -> None:
        self.model = model
        self.setting = str(setting or "auto").strip().lower()
        self.device = torch.device(device)
        self.context_length = context_length
        self.enabled = False
        self.compiled = False
        self.failed = False
        self.reason = ""
        self.compile_config: Any = None
        self.cache: Any = None
        self.last_status = "off"  # what the latest generate call did, for its run record
        self._cache_key: tuple | None = None
        self._guarded: Callable[..., Any] | None = None
        self._guarded_config: Any = None
        if self.setting not in DECODE_COMPILE_CHOICES:
            self.reason = f"unknown setting '{setting}'"
            log.warning("[QwenVL-Fast] compiled decode off: %s (choose %s); decoding eagerly", self.reason,
                        "/".join(DECODE_COMPILE_CHOICES))
            return
        if self.setting == "off":
            self.reason = "off"
            return
        static_cls, config_cls, missing = _transformers_pieces()
        why = missing or ("" if force_static else support_reason(model, self.device, quantization, model_type))
        if why:
            self.reason = why
            log.info("[QwenVL-Fast] compiled decode off: %s; decoding eagerly", why)
            return
        self._static_cls = static_cls
        if compile_config == "default":
            compile_config = config_cls(fullgraph=False, mode="reduce-overhead")
        self.compile_config = compile_config
        self.enabled = True
        self.compiled = compile_config is not None
        if self.compiled:
            # generate asks the model for its compiled call; this instance attribute answers instead of the class
            # method, with a guarded call (see _compiled_call). Removed again by release().
            model.__dict__["get_compiled_call"] = self._compiled_call
        self.reason = "static cache, torch.compile" if self.compiled else "static cache, eager (test)"
        log.info("[QwenVL-Fast] compiled decode on: %s", self.reason)

    # -- status ----------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """For the run record: "on", or "off (why)"."""
        if self.enabled and self.compiled and not self.failed:
            return "on"
        if self.enabled and not self.compiled:
            return "off (static cache without compile)"
        return f"off ({self.reason})"

    # -- generate kwargs -------------------------------------------------------------------------
    def prepare(self, gen_kwargs: dict[str, Any], batch_size: int, prompt_len: int, max_new: int,
                cache_kwarg: str = "cache") -> str:
        """Add what makes ``generate`` decode on the static cache (and compile) to ``gen_kwargs``.

        A ``cache_kwarg`` already there (a reused prefix, a ``DynamicCache``) is copied into the static cache. Returns
        the status for the run record.
        """
        self.last_status = self.status
        if not self.enabled:
            return self.last_status
        given = gen_kwargs.get(cache_kwarg)
        length = cache_bucket(int(prompt_len) + int(max_new), self.context_length)
        with torch.inference_mode():  # the cache's tensors were made in generate, under inference mode
            cache = self._static_cache(int(batch_size), length)
            if given is not None and not self._copy_prefix(given, cache):
                self.last_status = "off (this prefix cache cannot be copied into a static cache)"
                return self.last_status
        gen_kwargs[cache_kwarg] = cache
        if self.compiled and not self.failed:
            gen_kwargs["compile_config"] = self.compile_config
        else:
            gen_kwargs["disable_compile"] = True
        return self.last_status

    def _static_cache(self, batch_size: int, length: int) -> Any:
        key = (batch_size, length)
        if self.cache is not None and self._cache_key == key:
            self.cache.reset()  # in place: the tensors keep their addresses (and CUDA graphs their recordings)
            return self.cache
        self.cache = None  # the old buffers go before the new ones are allocated (lazily, in the prefill)
        self.cache = self._static_cls(config=self.model.config, max_cache_len=length)
        self._cache_key = key
        return self.cache

    @staticmethod
    def _copy_prefix(given: Any, cache: Any) -> bool:
        """Copy a DynamicCache's keys/values (a reused prefix) into the empty static cache; False if it cannot."""
        layers = getattr(given, "layers", None)
        if not layers or len(layers) != len(cache.layers):
            return False
        for src, dst in zip(layers, cache.layers):
            keys, values = getattr(src, "keys", None), getattr(src, "values", None)
            if keys is None or values is None or keys.dim() != 4 or keys.shape[-2] > dst.max_cache_len:
                return False
        for src, dst in zip(layers, cache.layers):
            dst.update(src.keys, src.values)  # lazy init on first use, then index_copy_ at positions 0..n-1
        return True

    def prefix_view(self, cache: Any, tokens: int) -> Any:
        """The cache a prefix snapshot can cut: a static cache's first ``tokens`` positions as a DynamicCache."""
        from transformers.cache_utils import DynamicCache, StaticLayer

        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not StaticLayer or not layer.is_initialized for layer in layers):
            return cache
        with torch.inference_mode():
            return DynamicCache(ddp_cache_data=[(layer.keys[:, :, :tokens], layer.values[:, :, :tokens])
                                                for layer in layers])

    # -- the guarded compiled call ---------------------------------------------------------------
    def _compiled_call(self, compile_config: Any = None) -> Callable[..., Any]:
        eager = self.model.__call__
        if self.failed:
            return eager
        config = compile_config or self.compile_config
        if self._guarded is None or self._guarded_config != config:
            compiled = torch.compile(eager, **config.to_dict())
            self._guarded = self._guard(compiled, eager)
            self._guarded_config = config
        return self._guarded

    def _guard(self, compiled: Callable[..., Any], eager: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.failed:
                return eager(*args, **kwargs)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            lengths = _cache_lengths(cache)
            try:
                return compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001  (any compiler failure; the eager rerun tells which)
                # Inductor compiles at the first call. With graph breaks, earlier graphs may already have run and
                # advanced some layers' cache lengths: put them back, then run the step eagerly (the keys/values it
                # writes land at the same positions). If eager fails too the error was not the compiler's: raise it.
                _restore_lengths(cache, lengths)
                out = eager(*args, **kwargs)
                self.failed = True
                self.reason = f"compile failed: {first_line(exc)}"
                self.last_status = self.status
                self.model.__dict__.pop("get_compiled_call", None)
                log.warning("[QwenVL-Fast] compiled decode failed (%s); decoding eagerly", first_line(exc))
                return out

        return call

    # -- lifecycle -------------------------------------------------------------------------------
    def drop_cache(self) -> None:
        """Memory pressure: free the kept static cache; the next call allocates one of the size it needs."""
        self.cache = None
        self._cache_key = None

    def drop_compiled(self) -> None:
        """After an out-of-memory error: the static cache and the compiled callable go (with the CUDA graphs it
        recorded); the next call allocates and compiles anew. Compiled decode stays on."""
        self.drop_cache()
        self._guarded = None
        self._guarded_config = None

    def release(self) -> None:
        """Drop the static cache and the compiled call (the model is being unloaded)."""
        self.drop_compiled()
        model = self.model
        if model is not None:
            model.__dict__.pop("get_compiled_call", None)
        self.model = None
        self.enabled = False


def _cache_lengths(cache: Any) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = []
    for layer in getattr(cache, "layers", None) or []:
        length = getattr(layer, "cumulative_length", None)
        out.append(length.clone() if isinstance(length, torch.Tensor) else None)
    return out


def _restore_lengths(cache: Any, lengths: list[torch.Tensor | None]) -> None:
    for layer, length in zip(getattr(cache, "layers", None) or [], lengths):
        current = getattr(layer, "cumulative_length", None)
        if length is not None and isinstance(current, torch.Tensor):
            current.copy_(length)


__all__ = ["BUCKET_MIN", "DECODE_COMPILE_CHOICES", "DecodeCompile", "cache_bucket", "support_reason"]
