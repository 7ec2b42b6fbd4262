"""The shared model loader of Qwen-VL Fast (no ComfyUI needed), and the one entry point every caller uses.

- ``LoadOptions`` / ``load_model``: a model folder (or a known repo, or a ``synthetic:`` name) into a
  ready :class:`~engine.QwenVLModel`.
- ``ModelManager`` / ``MANAGER``: one loaded model at a time, reused while the same options are asked for,
  released (memory really freed) before another is loaded; hooks let a host follow its life.
- ``run_once``: load or reuse, run one :class:`~engine.GenerationRequest`, report timings and tips, release
  if asked. The nodes, the folder captioner, the CLI and the benchmark's end-to-end rows all go through it.

The rest, in the order an image travels: ``sources/`` (where a model comes from: models.py, download.py,
weights_identity.py, tf_compat.py), ``engine/runtime_choice.py`` (device, dtype, attention, quantization),
``vision/images.py`` (node input to pixels), ``embedding_cache.py`` (cache lookup), ``engine/model.py`` (vision
tower, prompt, generate) and ``engine/prompting.py``; ``backends/openai_server.py`` answers from a server instead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from .backends.llama_server import LlamaServerModel, is_gguf_name
from .backends.openai_server import ServerModel
from .core.api import (
    BACKENDS,
    BATCH_MODES,
    PREPROCESS_CHOICES,
    Backend,
    GenerationRequest,
    GenerationResult,
    LoadOptions,
)
from .core.errors import GenerationInterrupted, ModelNotFoundError, QwenVLError
from .embedding_cache import canonical_digest, clear_memory_caches, get_cache
from .engine import cpu_dtype, cpu_linear
from .engine.decode_compile import DECODE_COMPILE_CHOICES
from .engine.model import QwenVLModel
from .engine.prompting import split_thinking
from .engine.runtime_choice import (
    ATTENTION_CHOICES,
    COMPILE_CHOICES,
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    QUANTIZATION_CHOICES,
    quantization_config,
    release_memory,
    resolve_attention,
    resolve_device,
    resolve_dtype,
)
from .engine.structured import check_budget, enforce_answers, spec_of
from .perf_monitor import TIPS, RunMonitor, report
from .sources import synthetic
from .sources.download import download_model
from .sources.models import (
    INCOMPLETE_MARKER,
    add_model_dir,
    check_architecture,
    check_folder,
    detect_family,
    model_choices,
    resolve_model,
    synthetic_choices,
)
from .sources.weights_identity import folder_identity, synthetic_identity
from .vision import attention as vision_attention
from .vision.images import canonicalize_image, split_image_batch

log = logging.getLogger("QwenVL-Fast")


def _load_pretrained(path: Any, options: LoadOptions, dtype: torch.dtype, attention: str, quant: Any,
                     device: torch.device) -> tuple[Any, Any, Any, str]:
    """A model folder's weights and processor (safetensors only, no remote code), checked before and after."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    check_folder(path)
    model_type = check_architecture(path)
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=attention, trust_remote_code=False,
                                  use_safetensors=True)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except torch.OutOfMemoryError as exc:
        release_memory()
        raise QwenVLError(f"Out of memory loading '{options.model}': choose quantization '4-bit' or a smaller "
                          "model.") from exc
    if quant is None:
        model.to(device)
    model.eval()
    config = model.config
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
    if not getattr(processor, "chat_template", None):
        # Some repos keep the template in tokenizer_config.json only; without any, every run would fail.
        tokenizer_template = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
        if not tokenizer_template:
            raise ModelNotFoundError(
                f"'{path}' has no chat template (chat_template.jinja or chat_template.json): copy it from the "
                "model repository into the folder."
            )
        processor.chat_template = tokenizer_template
    return model, processor, config, model_type


def load_model(options: LoadOptions, should_stop: Callable[[], bool] | None = None) -> QwenVLModel | ServerModel:
    """``should_stop`` (Cancel) ends a server backend's load (its ``/models`` call, a llama-server's start); a
    transformers load ignores it."""
    if options.backend == "server":
        return ServerModel(options, should_stop=should_stop)
    if options.backend != "local":
        raise QwenVLError(f"Unknown backend '{options.backend}': choose one of {', '.join(BACKENDS)}.")
    if is_gguf_name(options.model):
        # A GGUF pair runs in llama.cpp's llama-server, started (and stopped) by the model it backs.
        gguf = resolve_model(options.model, allow_absolute=options.allow_absolute_path)
        return LlamaServerModel(options, gguf.path, should_stop=should_stop)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if options.quantization not in QUANTIZATION_CHOICES:
        raise QwenVLError(
            f"Unknown quantization '{options.quantization}': choose one of {', '.join(QUANTIZATION_CHOICES)}."
        )
    quant = quantization_config(options.quantization, device, dtype)
    attention = resolve_attention(options.attention_mode, device, dtype)
    source = resolve_model(options.model, allow_absolute=options.allow_absolute_path)
    t0 = time.perf_counter()
    if source.kind == "synthetic":
        log.info("[QwenVL-Fast] building synthetic model %s (random weights: its text is meaningless)", source.name)
        model, processor, config = synthetic.build_synthetic(source.name, dtype=dtype, device=str(device))
        if hasattr(model, "set_attn_implementation"):
            try:
                model.set_attn_implementation(attention)
            except Exception:
                pass
    else:
        path = source.path if source.kind == "local" else download_model(source.repo_id or source.name)
        model, processor, config, model_type = _load_pretrained(path, options, dtype, attention, quant, device)
    # dtype=auto on a CPU: each part in the dtype measured faster here, threads on the physical cores (cpu_dtype.py)
    parts = cpu_dtype.auto_cpu_parts(model, options.dtype, device)
    dtype = parts.text if parts is not None else dtype
    family = detect_family(config, model_type if source.kind != "synthetic" else None)
    t_identity = time.perf_counter()
    if source.kind == "synthetic":
        identity = synthetic_identity(source.name, 0, family.model_type, config)
    else:
        identity = folder_identity(path, family.model_type, config)
    identity_s = time.perf_counter() - t_identity
    loaded = QwenVLModel(
        options=options, source=source, model=model, processor=processor, config=config, family=family,
        device=device, dtype=dtype, attention=attention, load_seconds=time.perf_counter() - t0,
        weights_identity=identity,
    )
    loaded.identity_seconds = identity_s
    loaded.dtype_summary = parts.summary() if parts is not None else ""
    # A batch's decode step on a CPU whose BLAS reads the weights once per row (cpu_linear.py): measured at load.
    loaded.small_batch_linear = cpu_linear.enable_small_batch_linear(model, device)
    if loaded.small_batch_linear:
        log.info("[QwenVL-Fast] %s", loaded.small_batch_linear)
    if attention == "sdpa" and os.environ.get("QWENVL_FAST_GROUPED_VISION_ATTENTION", "1") != "0":
        # Same arithmetic as transformers' per-window SDPA loop, in a few batched calls (vision/attention.py).
        if vision_attention.enable_grouped_vision_attention(model):
            loaded.vision_attention = "grouped sdpa"
    if options.compile_vision != "off":
        loaded.set_compile(options.compile_vision)
    return loaded


class ModelManager:
    """Keeps one model loaded; a different request releases the previous one first.

    Hooks let a host (ComfyUI, see ``comfyui_host/model_manager.py``) follow the model's life without the
    engine importing it: ``before_load(options)`` to make room, ``on_load(model)`` right after a load,
    ``on_release(model)`` right after a release. A failing hook is logged, never raised.
    """

    def __init__(self) -> None:
        self.current: Backend | None = None
        self._lock = threading.RLock()
        self.load_count = 0
        self.before_load: list[Callable[[LoadOptions], None]] = []
        self.on_load: list[Callable[[Backend], None]] = []
        self.on_release: list[Callable[[Backend], None]] = []

    @staticmethod
    def _call(hooks: list, arg: Any) -> None:
        for hook in list(hooks):
            try:
                hook(arg)
            except Exception:
                log.exception("[QwenVL-Fast] model-manager hook %s failed", getattr(hook, "__name__", hook))

    def get(self, options: LoadOptions, should_stop: Callable[[], bool] | None = None) -> tuple[Backend, bool]:
        """(model, loaded_now); ``should_stop`` as for ``load_model``."""
        with self._lock:
            if self.current is not None and self.current.options == options and self.current.usable:
                return self.current, False
            self.release()
            self._call(self.before_load, options)
            model = load_model(options, should_stop)
            self.current = model
            self.load_count += 1
            self._call(self.on_load, model)
            return model, True

    def release(self, collect_garbage: bool = True) -> None:
        """Drop the current model. ``collect_garbage=False`` from inside a host's callback (no ``gc`` there)."""
        with self._lock:
            model, self.current = self.current, None
            if model is not None:
                model.close()
                self._call(self.on_release, model)
                del model
            if collect_garbage:
                release_memory()
            elif torch.cuda.is_available():
                torch.cuda.empty_cache()


MANAGER = ModelManager()
MANAGER.on_release.append(lambda _model: clear_memory_caches())


def needs_local_grammar(options: LoadOptions) -> bool:
    """Whether ``options`` constrain decoding in this process (llguidance): the transformers backend only; a
    server, or a ``.gguf`` model (served by the pack's llama-server), constrains on the server's side."""
    return options.backend == "local" and not is_gguf_name(options.model)


def run_once(options: LoadOptions, request: GenerationRequest, keep_model_loaded: bool = True,
             manager: ModelManager | None = None) -> GenerationResult:
    """Load (or reuse) a model, run one request, report timings and tips; release if asked."""
    manager = manager or MANAGER
    # A broken json_schema, a schema with no finite instance or no room for an answer fails here, before any model
    # work; only the transformers backend constrains in this process (a .gguf is served by llama-server).
    spec = spec_of(request, need_grammar=needs_local_grammar(options))
    check_budget(spec, request.max_new_tokens)
    t0 = time.perf_counter()
    model, loaded_now = manager.get(options, should_stop=request.should_stop)
    load_s = time.perf_counter() - t0
    try:
        result = model.run(request)
    except GenerationInterrupted:
        if not keep_model_loaded:
            manager.release()
        raise
    except Exception:
        if not keep_model_loaded:
            manager.release()
        raise
    try:  # every structured answer, local or served, validated before it is returned
        enforce_answers(spec, result, request.per_answer_errors, request.should_stop)
    except Exception:
        if not keep_model_loaded:
            manager.release()
        raise
    rec = result.record
    rec.model_loaded_this_run = loaded_now
    rec.keep_model_loaded = keep_model_loaded
    if loaded_now and request.monitor:
        rec.stages = {"load": load_s, **rec.stages}
        rec.total_s += load_s
    TIPS.observe(rec, request.enable_image_cache)
    rec.tips = model.tips(rec)
    if request.monitor:
        report(rec)
    if not keep_model_loaded:
        manager.release()
    return result


__all__ = [
    "ATTENTION_CHOICES", "BACKENDS", "BATCH_MODES", "COMPILE_CHOICES", "DECODE_COMPILE_CHOICES", "DEVICE_CHOICES",
    "DTYPE_CHOICES",
    "INCOMPLETE_MARKER", "MANAGER", "PREPROCESS_CHOICES", "QUANTIZATION_CHOICES", "GenerationInterrupted",
    "GenerationRequest",
    "GenerationResult", "LoadOptions", "ModelManager", "ModelNotFoundError", "QwenVLError", "QwenVLModel",
    "RunMonitor", "add_model_dir", "canonical_digest", "canonicalize_image", "check_folder", "clear_memory_caches",
    "detect_family", "download_model", "get_cache", "load_model", "model_choices", "needs_local_grammar",
    "release_memory",
    "resolve_attention", "resolve_device", "resolve_model", "run_once", "split_image_batch", "split_thinking",
    "synthetic", "synthetic_choices",
]
