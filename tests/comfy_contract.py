"""ComfyUI's model-management contract, reproduced for in-process tests (not ComfyUI's code).

Two flavours of what a custom node's ``ModelPatcher`` meets in ``comfy.model_management``:

* ``"current"``: ComfyUI 0.3.x (checked against 0.3.64). A ``LoadedModel`` entry holds the patcher by weak
  reference and attaches ``weakref.finalize(patcher.model, cleanup_models)`` when it loads; ``free_memory``
  collects the indices of the entries it may unload, asks each to unload (``partially_unload``, then
  ``detach``), detaches that entry's finalizer, and pops the saved indices afterwards. ``cleanup_models``
  pops every entry whose ``patcher.model`` has died. Re-loading a patcher that is already loaded first drops
  its entry through ``detach(unpatch_all=False)``.
* ``"2024-03"``: the March-2024 ComfyUI (the one CI runs as a server). Entries hold the patcher strongly,
  ``free_memory`` pops first and unloads afterwards (``unpatch_model``), ``cleanup_models`` drops entries
  nobody else references.

Memory is simulated per device: a device has ``capacity`` bytes and an entry uses its ``loaded_size()``.
Every call that ComfyUI would make into a patcher is made the same way here, from inside the same kind of
loop, so a patcher that breaks ComfyUI's lists breaks them here too.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch

CPU = torch.device("cpu")


class ModelPatcherBase:
    """The ModelPatcher behaviour the contract depends on (both flavours): patcher.model is the module."""

    def __init__(self, model: torch.nn.Module, load_device: torch.device, offload_device: torch.device,
                 size: int = 0, current_device: torch.device | None = None) -> None:
        self.size = size
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.current_device = current_device or offload_device
        self.parent = None
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        if getattr(model, "device", None) is None:
            model.device = offload_device
        if not hasattr(model, "model_loaded_weight_memory"):
            model.model_loaded_weight_memory = 0
        self.unloads = 0  # times ComfyUI took this model's weights off its device
        self.model_size()

    def model_size(self) -> int:
        if self.size <= 0:
            self.size = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return self.size

    def loaded_size(self) -> int:
        return self.model.model_loaded_weight_memory

    def current_loaded_device(self) -> torch.device:
        return self.model.device

    def model_dtype(self) -> torch.dtype:
        return torch.float32

    def lowvram_patch_counter(self) -> int:
        return 0

    def model_patches_to(self, device: Any) -> None:
        return None

    def model_patches_models(self) -> list:
        return []

    def is_clone(self, other: Any) -> bool:
        return hasattr(other, "model") and self.model is other.model

    def partially_load(self, device_to: torch.device, extra_memory: float = 0, force_patch_weights: bool = False):
        self.model.to(device_to)
        self.model.device = device_to
        self.current_device = device_to
        before = self.model.model_loaded_weight_memory
        self.model.model_loaded_weight_memory = self.model_size()
        return self.model.model_loaded_weight_memory - before

    def partially_unload(self, device_to: torch.device, memory_to_free: float = 0) -> int:
        return 0

    def detach(self, unpatch_all: bool = True):
        if unpatch_all:
            self.unpatch_model(self.offload_device)
        return self.model

    def patch_model(self, device_to: torch.device | None = None, patch_weights: bool = True):
        self.partially_load(device_to or self.load_device)
        return self.model

    def unpatch_model(self, device_to: torch.device | None = None, unpatch_weights: bool = True) -> None:
        if unpatch_weights:
            self.unloads += 1
            self.model.to(device_to or self.offload_device)
            self.model.device = device_to or self.offload_device
            self.current_device = self.model.device
            self.model.model_loaded_weight_memory = 0

    def __del__(self) -> None:
        self.detach(unpatch_all=False)


class _CurrentLoadedModel:
    def __init__(self, mm: ModelManagement, patcher: Any) -> None:
        self._mm = mm
        self._patcher = weakref.ref(patcher)
        self.device = patcher.load_device
        self.real_model: Any = None
        self.model_finalizer: Any = None
        self.currently_used = True

    @property
    def model(self) -> Any:
        return self._patcher()

    def model_memory(self) -> int:
        return self.model.model_size()

    def model_offloaded_memory(self) -> int:
        return self.model.model_size() - self.model.loaded_size()

    def model_memory_required(self, device: torch.device) -> int:
        if device == self.model.current_loaded_device():
            return self.model_offloaded_memory()
        return self.model_memory()

    def model_load(self, lowvram_model_memory: float = 0) -> Any:
        self.model.model_patches_to(self.device)
        self.model.model_patches_to(self.model.model_dtype())
        self.model.partially_load(self.device, lowvram_model_memory or 1e32)
        real_model = self.model.model
        self.real_model = weakref.ref(real_model)
        self.model_finalizer = weakref.finalize(real_model, self._mm.cleanup_models)
        return real_model

    def model_unload(self, memory_to_free: float | None = None, unpatch_weights: bool = True) -> bool:
        if memory_to_free is not None and memory_to_free < self.model.loaded_size():
            if self.model.partially_unload(self.model.offload_device, memory_to_free) >= memory_to_free:
                return False
        self.model.detach(unpatch_weights)  # the property's strong reference ends with this call
        self.model_finalizer.detach()
        self.model_finalizer = None
        self.real_model = None
        return True

    def is_dead(self) -> bool:
        return self.real_model is not None and self.real_model() is not None and self.model is None

    def __eq__(self, other: object) -> bool:
        return self.model is getattr(other, "model", None)


class _March2024LoadedModel:
    def __init__(self, mm: ModelManagement, patcher: Any) -> None:
        self.model = patcher
        self.device = patcher.load_device
        self.real_model: Any = None

    def model_memory(self) -> int:
        return self.model.model_size()

    def model_memory_required(self, device: torch.device) -> int:
        return 0 if device == self.model.current_device else self.model_memory()

    def model_load(self, lowvram_model_memory: float = 0) -> Any:
        self.model.model_patches_to(self.device)
        self.real_model = self.model.patch_model(device_to=self.device, patch_weights=True)
        return self.real_model

    def model_unload(self, unpatch_weights: bool = True) -> None:
        self.model.unpatch_model(self.model.offload_device, unpatch_weights=unpatch_weights)
        self.model.model_patches_to(self.model.offload_device)

    def __eq__(self, other: object) -> bool:
        return self.model is getattr(other, "model", None)


class ModelManagement:
    """Stands where ``comfy.model_management`` stands: the functions a patcher is driven by."""

    def __init__(self, flavour: str = "current", device: torch.device = CPU, capacity: int = 1 << 34) -> None:
        assert flavour in ("current", "2024-03"), flavour
        self.flavour = flavour
        self.device = device
        self.capacity = capacity
        self.current_loaded_models: list[Any] = []
        self.gc_collects = 0  # how often the contract had to fall back on a full gc (a leak in a patcher)
        self.free_memory_calls: list[tuple[float, torch.device]] = []

    # -- helpers ComfyUI offers -------------------------------------------------------------------
    def get_torch_device(self) -> torch.device:
        return self.device

    def soft_empty_cache(self, force: bool = False) -> None:
        return None

    def minimum_inference_memory(self) -> int:
        return 1 << 20

    def get_free_memory(self, device: torch.device | None = None) -> int:
        used = sum(e.model.loaded_size() for e in self.current_loaded_models
                   if e.model is not None and e.device == (device or self.device))
        return self.capacity - used

    # -- loading and unloading ------------------------------------------------------------------
    def load_models_gpu(self, models: list, memory_required: int = 0) -> None:
        if self.flavour == "2024-03":
            return self._load_march2024(models)
        self.cleanup_models_gc()
        extra = max(self.minimum_inference_memory(), memory_required)
        to_load = []
        for patcher in models:
            entry = _CurrentLoadedModel(self, patcher)
            try:
                index = self.current_loaded_models.index(entry)
            except ValueError:
                index = None
            if index is not None:
                entry = self.current_loaded_models[index]
                entry.currently_used = True
            to_load.append(entry)
        for entry in to_load:
            clones = [i for i in range(len(self.current_loaded_models))
                      if entry.model.is_clone(self.current_loaded_models[i].model)]
            for i in reversed(clones):
                old = self.current_loaded_models.pop(i)
                old.model.detach(unpatch_all=False)
                old.model_finalizer.detach()
        required: dict[torch.device, float] = {}
        for entry in to_load:
            required[entry.device] = required.get(entry.device, 0) + entry.model_memory_required(entry.device)
        for device, need in required.items():
            if device.type != "cpu":
                self.free_memory(need * 1.1 + extra, device)
        for entry in to_load:
            entry.model_load()
            self.current_loaded_models.insert(0, entry)

    def _load_march2024(self, models: list) -> None:
        for patcher in models:
            entry = _March2024LoadedModel(self, patcher)
            if entry in self.current_loaded_models:
                index = self.current_loaded_models.index(entry)
                self.current_loaded_models.insert(0, self.current_loaded_models.pop(index))
                continue
            need = entry.model_memory_required(entry.device)
            if entry.device.type != "cpu":
                self.free_memory(need * 1.3 + self.minimum_inference_memory(), entry.device)
            entry.model_load()
            self.current_loaded_models.insert(0, entry)

    def free_memory(self, memory_required: float, device: torch.device, keep_loaded: list | None = None) -> list:
        self.free_memory_calls.append((memory_required, device))
        keep_loaded = keep_loaded or []
        if self.flavour == "2024-03":
            unloaded = []
            for i in range(len(self.current_loaded_models) - 1, -1, -1):
                if self.get_free_memory(device) > memory_required:
                    break
                entry = self.current_loaded_models[i]
                if entry.device == device and entry not in keep_loaded:
                    m = self.current_loaded_models.pop(i)
                    m.model_unload()
                    unloaded.append(m)
            return unloaded
        self.cleanup_models_gc()
        candidates = []
        for i in range(len(self.current_loaded_models) - 1, -1, -1):
            entry = self.current_loaded_models[i]
            if entry.device == device and entry not in keep_loaded and not entry.is_dead():
                candidates.append((-entry.model_offloaded_memory(), sys.getrefcount(entry.model),
                                   entry.model_memory(), i))
                entry.currently_used = False
        unloaded_indices = []
        for candidate in sorted(candidates):
            i = candidate[-1]
            free = self.get_free_memory(device)
            if free > memory_required:
                break
            if self.current_loaded_models[i].model_unload(memory_required - free):
                unloaded_indices.append(i)
        return [self.current_loaded_models.pop(i) for i in sorted(unloaded_indices, reverse=True)]

    def unload_all_models(self) -> None:
        self.free_memory(1e30, self.get_torch_device())

    def cleanup_models(self) -> None:
        if self.flavour == "2024-03":
            for i in range(len(self.current_loaded_models) - 1, -1, -1):
                if sys.getrefcount(self.current_loaded_models[i].model) <= 2:
                    self.current_loaded_models.pop(i).model_unload()
            return
        dead = [i for i, e in enumerate(self.current_loaded_models) if e.real_model() is None]
        for i in reversed(dead):
            self.current_loaded_models.pop(i)

    def cleanup_models_gc(self) -> None:
        if any(e.is_dead() for e in self.current_loaded_models):
            self.gc_collects += 1

    # -- for assertions -------------------------------------------------------------------------
    def loaded_patchers(self) -> list:
        return [e.model for e in self.current_loaded_models]


def other_model(mm: ModelManagement, features: int = 64) -> ModelPatcherBase:
    """Another node pack's model (say, a diffusion model) registered the usual way."""
    module = torch.nn.Linear(features, features)
    patcher = ModelPatcherBase(module, load_device=mm.device, offload_device=CPU)
    mm.load_models_gpu([patcher])
    return patcher
