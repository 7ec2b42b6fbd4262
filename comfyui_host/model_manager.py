"""The pack's loaded model inside ComfyUI's model manager ("Unload models", ``POST /free``, VRAM pressure).

Design, and why. ComfyUI's ``LoadedModel`` entries (``comfy.model_management.current_loaded_models``)
point at a ``ModelPatcher``; ComfyUI asks a patcher to give its memory back from inside loops over that
list. Current ComfyUI (0.3.x) holds the patcher and ``patcher.model`` only weakly, attaches
``weakref.finalize(patcher.model, cleanup_models)`` and pops the entries it unloaded by their saved
indices *after* the loop. If ``patcher.model`` dies inside the callback, the finalizer runs
``cleanup_models()`` mid-loop and ComfyUI's later ``pop(i)`` hits the wrong entry or raises
``IndexError`` in the prompt worker, which then never runs a prompt again.

So:

* ``patcher.model`` is a parameterless anchor module owned by the patcher, not the transformers
  model. The weights belong to the pack's :class:`ModelManager` alone, and ComfyUI's finalizer watches
  something that cannot die while ComfyUI iterates.
* When ComfyUI asks for memory (``detach`` / ``unpatch_model``), the weights are **released**, not
  moved to the CPU: a bitsandbytes model cannot be moved, on a CPU-only ComfyUI a move frees nothing,
  and the next run reloads the model with the same options (from the page cache, usually). Inside the
  callback nothing touches ComfyUI's lists and ``gc`` is not run (ComfyUI collects after ``/free``);
  the patcher is parked in ``_RETIRED`` so it outlives the loop.
* When the pack releases the model itself (``keep_model_loaded`` off, another model chosen), it removes
  its entry from ComfyUI's list right there (outside any ComfyUI callback, with the finalizer
  detached first), so nothing of the model stays reachable.
* The patcher reports the true size and loaded size, so registering an already loaded model makes
  ComfyUI evict nothing more; before a load, ComfyUI is asked for the estimated weights plus its own
  inference reserve, once.

Works with the March-2024 ComfyUI (strong references, ``current_device`` attribute, pop-then-unload)
and the current one (weak references, finalizers, ``current_loaded_device()``, ``detach``). Imports no
ComfyUI module itself: :func:`install` is handed ComfyUI's ``model_management`` module and
``ModelPatcher`` class by ``nodes.py`` (or by the tests, a reproduction of that contract).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

if __package__:
    from .. import qwenvl_loader as ql
else:  # pragma: no cover - plain-module import in scripts
    import qwenvl_loader as ql

log = logging.getLogger("QwenVL-Fast")

# Weights per stored byte by quantization, for the estimate of what a load needs.
_QUANTIZED_SHARE = {"none": 1.0, "8-bit": 0.55, "4-bit": 0.3}


class _WeightsAnchor(torch.nn.Module):
    """What ComfyUI sees as ``patcher.model``: owns no tensors, lives exactly as long as its patcher."""

    def __init__(self, device: torch.device, dtype: torch.dtype, name: str) -> None:
        super().__init__()
        self.device = device
        self.dtype = dtype
        self.qwenvl_model_name = name

    def get_dtype(self) -> torch.dtype:
        return self.dtype


class _State:
    """What this module holds between calls (one pack, one manager, one ComfyUI)."""

    def __init__(self) -> None:
        self.mm: Any = None
        self.manager: ql.ModelManager | None = None
        self.patcher_cls: type | None = None
        self.active: Any = None  # the patcher of the manager's current model
        self.retired: list[Any] = []  # released from inside a ComfyUI callback; unregistered later
        self.in_callback = False


_STATE = _State()


def _build_patcher_class(base: type) -> type:
    class QwenVLPatcher(base):  # type: ignore[misc, valid-type]
        """A ModelPatcher for the pack's model; see the module docstring for the design."""

        def __init__(self, engine: ql.QwenVLModel, load_device: torch.device, offload_device: torch.device,
                     size: int) -> None:
            anchor = _WeightsAnchor(load_device, engine.dtype, engine.options.model)
            super().__init__(anchor, load_device=load_device, offload_device=offload_device, size=size)
            self.engine_ref = weakref.ref(engine)
            self.released = False
            self.current_device = load_device  # March-2024 ComfyUI reads this attribute
            anchor.model_loaded_weight_memory = size

        # -- sizes: what ComfyUI plans its memory with ----------------------------------------------
        def model_size(self) -> int:
            return self.size

        def loaded_size(self) -> int:
            return 0 if self.released else self.size

        def current_loaded_device(self) -> torch.device:
            return self.offload_device if self.released else self.load_device

        def model_dtype(self) -> torch.dtype:
            return self.model.dtype

        def lowvram_patch_counter(self) -> int:
            return 0

        # -- loading: the weights are already where the engine put them ----------------------------
        def patch_model(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
            return self.model

        def patch_model_lowvram(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
            return self.model

        def partially_load(self, *args: Any, **kwargs: Any) -> int:
            return 0

        def model_patches_to(self, device: Any) -> None:
            return None

        # -- unloading: all or nothing --------------------------------------------------------------
        def partially_unload(self, *args: Any, **kwargs: Any) -> int:
            return 0  # a transformers model is not split by layer here; ComfyUI then calls detach()

        def detach(self, unpatch_all: bool = True) -> torch.nn.Module:
            # unpatch_all=False is "drop the entry, keep the weights" (re-registration, clone swaps).
            if unpatch_all:
                _comfyui_unloads(self)
            return self.model

        def unpatch_model(self, device_to: Any = None, unpatch_weights: bool = True) -> None:
            if unpatch_weights:  # March-2024 ComfyUI's unload
                _comfyui_unloads(self)

        def __del__(self) -> None:
            # ModelPatcher.__del__ calls detach(); this patcher holds no weights, and a patcher being
            # collected must never release a model that another registration now serves.
            pass

    return QwenVLPatcher


class _ModelPatcherBase:
    """The part of ComfyUI's ModelPatcher the patcher relies on, for a ComfyUI without one."""

    def __init__(self, model: torch.nn.Module, load_device: torch.device, offload_device: torch.device,
                 size: int = 0) -> None:
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size
        self.model_options: dict[str, Any] = {"transformer_options": {}}

    def is_clone(self, other: Any) -> bool:
        return getattr(other, "model", None) is self.model

    def model_patches_models(self) -> list:
        return []


@contextlib.contextmanager
def _inside_comfyui_callback() -> Iterator[None]:
    previous, _STATE.in_callback = _STATE.in_callback, True
    try:
        yield
    finally:
        _STATE.in_callback = previous


def _comfyui_unloads(patcher: Any) -> None:
    """ComfyUI wants this patcher's memory. Called from inside ComfyUI's loops: touch none of its lists."""
    if patcher.released:
        return
    patcher.released = True
    patcher.current_device = patcher.offload_device
    patcher.model.device = patcher.offload_device
    patcher.model.model_loaded_weight_memory = 0
    _STATE.retired.append(patcher)  # keeps patcher.model alive until ComfyUI is done with its list
    manager = _STATE.manager
    engine = patcher.engine_ref()
    if manager is None or engine is None or manager.current is not engine or _STATE.active is not patcher:
        return
    log.info("[QwenVL-Fast] ComfyUI asked for the model's memory; releasing it (the next run reloads it)")
    with _inside_comfyui_callback():
        manager.release(collect_garbage=False)


def _entries_of(patcher: Any) -> list[int]:
    """Indices of ComfyUI's entries for ``patcher`` (current ComfyUI: a weak property; March 2024: a field)."""
    found = []
    for i, entry in enumerate(_STATE.mm.current_loaded_models):
        try:
            model = entry.model
        except Exception:  # a dead weak reference in some versions
            continue
        if model is patcher:
            found.append(i)
    return found


def _unregister(patcher: Any) -> None:
    """Remove ``patcher`` from ComfyUI's list. Only ever called outside ComfyUI's own callbacks."""
    patcher.released = True
    mm = _STATE.mm
    if mm is None:
        return
    for i in reversed(_entries_of(patcher)):
        entry = mm.current_loaded_models[i]
        finalizer = getattr(entry, "model_finalizer", None)
        if finalizer is not None:
            finalizer.detach()  # its job (dropping the entry) is done here, now
            entry.model_finalizer = None
        mm.current_loaded_models.pop(i)


def _prune_retired() -> None:
    while _STATE.retired:
        _unregister(_STATE.retired.pop())


def _on_release(engine: ql.QwenVLModel) -> None:
    patcher = _STATE.active
    if patcher is None or patcher.engine_ref() is not engine:
        return
    _STATE.active = None
    if _STATE.in_callback:
        return  # ComfyUI pops the entry itself after its loop; the patcher waits in _RETIRED
    _unregister(patcher)
    if _STATE.mm is not None:
        with contextlib.suppress(Exception):
            _STATE.mm.soft_empty_cache()


def _device_type(device: Any) -> str:
    return getattr(device, "type", str(device).split(":")[0])


def estimated_load_bytes(options: ql.LoadOptions) -> int:
    """Bytes the weights will take once loaded: the folder's safetensors, scaled by the quantization."""
    try:
        source = ql.resolve_model(options.model, allow_absolute=options.allow_absolute_path)
    except Exception:
        return 0
    path: Path | None = source.path
    if path is None:
        return 0
    if source.kind == "gguf":  # a llama-server is about to take about its files' size
        from ..backends.llama_server import gguf_bytes

        return gguf_bytes(path)
    stored = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return int(stored * _QUANTIZED_SHARE.get(options.quantization, 1.0))


def _before_load(options: ql.LoadOptions) -> None:
    """Make room on ComfyUI's device for the model about to load, once and only as much as needed."""
    _prune_retired()
    mm = _STATE.mm
    if mm is None or options.backend != "local":
        return
    device = mm.get_torch_device()
    if _device_type(device) == "cpu" or (options.device != "auto" and _device_type(options.device) == "cpu"):
        return
    need = estimated_load_bytes(options)
    if need <= 0:
        return
    reserve = mm.minimum_inference_memory() if hasattr(mm, "minimum_inference_memory") else 0
    try:
        mm.free_memory(need + reserve, device)
    except Exception as exc:  # an API drift must not stop the load
        log.warning("[QwenVL-Fast] ComfyUI could not make room before loading: %s", exc)


def _on_load(engine: ql.QwenVLModel) -> None:
    """Register the freshly loaded model, with its true size, so ComfyUI can account for and unload it."""
    _prune_retired()
    mm = _STATE.mm
    owns_server = getattr(engine, "owns_server", False)
    if mm is None or _STATE.patcher_cls is None or (getattr(engine, "is_remote", False) and not owns_server):
        return  # a served model holds no memory here
    offload = torch.device("cpu")
    if owns_server:
        # A llama-server the pack started (a .gguf model) holds its memory on ComfyUI's device: registered there,
        # "Unload models" / POST /free stop it like they release local weights.
        patcher = _STATE.patcher_cls(engine, mm.get_torch_device(), offload, engine.server_bytes())
    else:
        patcher = _STATE.patcher_cls(engine, engine.device, offload, engine.param_bytes())
    _STATE.active = patcher
    try:
        mm.load_models_gpu([patcher])
    except Exception as exc:  # an API drift must not break generation
        log.warning("[QwenVL-Fast] could not register the model with ComfyUI's model manager: %s", exc)
        _STATE.active = None
        _unregister(patcher)


def install(manager: ql.ModelManager, model_management: Any, patcher_base: type | None = None) -> None:
    """Connect ``manager`` to ComfyUI's ``model_management`` module (idempotent per manager)."""
    if _STATE.manager is not None and _STATE.manager is not manager:
        uninstall()
    _STATE.mm = model_management
    _STATE.patcher_cls = _build_patcher_class(patcher_base or _ModelPatcherBase)
    if _STATE.manager is manager:
        return
    _STATE.manager = manager
    manager.before_load.append(_before_load)
    manager.on_load.append(_on_load)
    manager.on_release.append(_on_release)


def uninstall() -> None:
    """Disconnect (tests): unregister what is registered and remove the hooks."""
    manager = _STATE.manager
    if manager is not None:
        for hooks, hook in ((manager.before_load, _before_load), (manager.on_load, _on_load),
                            (manager.on_release, _on_release)):
            if hook in hooks:
                hooks.remove(hook)
    if _STATE.active is not None:
        _unregister(_STATE.active)
    _prune_retired()
    _STATE.__init__()


def registered_patcher() -> Any:
    """The patcher ComfyUI currently tracks for the pack's model, or None."""
    return _STATE.active


def retired_count() -> int:
    return len(_STATE.retired)
