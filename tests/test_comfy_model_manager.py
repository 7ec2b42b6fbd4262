"""The pack's model inside ComfyUI's model manager: "Unload models", POST /free, VRAM pressure.

Driven through ``tests/comfy_contract.py``, a reproduction of ComfyUI's ``model_management`` in its current
(0.3.x: weak references, finalizers, pops by saved index) and March-2024 flavours, with a real tiny model
loaded by the pack's real manager. The server tests repeat the user-visible parts over HTTP.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from comfy_contract import ModelManagement, ModelPatcherBase, other_model
from conftest import tiny_request
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.comfyui_host import model_manager as cmm

FLAVOURS = ["current", "2024-03"]
TINY = "tiny-qwen2.5-vl"


@pytest.fixture(params=FLAVOURS)
def comfy(request):
    mm = ModelManagement(request.param)
    cmm.install(ql.MANAGER, mm, ModelPatcherBase)
    yield mm
    ql.MANAGER.release()
    cmm.uninstall()


@pytest.fixture
def options(models_dir):
    return ql.LoadOptions(model=str(models_dir / TINY))


def _ours(mm: ModelManagement) -> list:
    return [p for p in mm.loaded_patchers() if isinstance(p, cmm._STATE.patcher_cls)]


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(64, 96, 3, generator=torch.Generator().manual_seed(seed))


def test_unload_all_with_other_models_loaded_keeps_comfyui_consistent(comfy, options):
    before = other_model(comfy)
    model, loaded_now = ql.MANAGER.get(options)
    after = other_model(comfy)
    assert loaded_now and len(_ours(comfy)) == 1

    comfy.unload_all_models()  # raised IndexError (or dropped another model's entry) with the old patcher

    assert comfy.current_loaded_models == []
    assert before.unloads == 1 and after.unloads == 1, "every other model is unloaded exactly once"
    assert before.loaded_size() == 0 and after.loaded_size() == 0
    assert ql.MANAGER.current is None and not model.usable
    assert comfy.gc_collects == 0, "ComfyUI had to garbage-collect to find out a patcher died"


def test_free_twice_and_free_with_nothing_loaded(comfy, options):
    comfy.unload_all_models()  # nothing loaded
    ql.MANAGER.get(options)
    comfy.unload_all_models()
    comfy.unload_all_models()
    assert comfy.current_loaded_models == [] and ql.MANAGER.current is None
    model, loaded_now = ql.MANAGER.get(options)  # and it loads again, registered once
    assert loaded_now and model.usable and len(_ours(comfy)) == 1


def test_patcher_reports_the_true_size_so_registration_evicts_nothing_more(comfy, options):
    model, _ = ql.MANAGER.get(options)
    (patcher,) = _ours(comfy)
    assert patcher.model_size() == model.param_bytes() > 0
    entry = comfy.current_loaded_models[0]
    assert entry.model_memory_required(entry.device) == 0, "a loaded model must not ask ComfyUI for its size again"
    if comfy.flavour == "current":
        assert patcher.loaded_size() == model.param_bytes()
        assert entry.model_offloaded_memory() == 0


def test_registering_again_keeps_the_model(comfy, options):
    model, _ = ql.MANAGER.get(options)
    (patcher,) = _ours(comfy)
    comfy.load_models_gpu([patcher])  # what another node or ComfyUI itself may do with a registered model
    assert model.usable and ql.MANAGER.current is model
    assert _ours(comfy) == [patcher]


def test_keep_model_loaded_off_unregisters_and_frees_each_run(comfy, options):
    weights = []
    track = lambda engine: weights.append(weakref.ref(engine.model))  # noqa: E731
    ql.MANAGER.on_load.append(track)
    try:
        for seed in range(3):
            result = ql.run_once(options, tiny_request([_image(seed)]), keep_model_loaded=False)
            assert result.texts and result.record.model_loaded_this_run
            assert _ours(comfy) == [], "the released model's patcher is still registered with ComfyUI"
            assert cmm.retired_count() == 0
    finally:
        ql.MANAGER.on_load.remove(track)
    gc.collect()
    assert len(weights) == 3
    assert [w for w in weights if w() is not None] == [], "released models still hold their weights"


def test_released_by_comfyui_then_the_next_run_reloads_with_the_same_options(comfy, options):
    first = ql.run_once(options, tiny_request([_image(1)], monitor=True))
    assert first.record.model_loaded_this_run
    assert "load" in first.record.stages, "the load stage is reported when the engine itself loaded the model"
    comfy.unload_all_models()
    again = ql.run_once(options, tiny_request([_image(1)], prompt="A new question."))
    assert again.record.model_loaded_this_run and again.texts
    assert len(_ours(comfy)) == 1
    kept = ql.run_once(options, tiny_request([_image(1)], prompt="And another."))
    assert not kept.record.model_loaded_this_run


def test_weights_are_freed_inside_comfyuis_unload(comfy, options):
    model, _ = ql.MANAGER.get(options)
    weights = weakref.ref(model.model)
    del model
    comfy.unload_all_models()
    assert weights() is None, "the transformers model outlived ComfyUI's unload"


def test_switching_models_unregisters_the_previous_one(comfy, models_dir, options):
    ql.MANAGER.get(options)
    other = ql.LoadOptions(model=str(models_dir / "tiny-qwen3-vl"))
    ql.MANAGER.get(other)
    (patcher,) = _ours(comfy)
    assert patcher.engine_ref() is ql.MANAGER.current


def test_memory_pressure_frees_at_most_what_is_needed(options):
    mm = ModelManagement("current", device=torch.device("cuda:0") if torch.cuda.is_available() else torch.device(
        "meta"))
    cmm.install(ql.MANAGER, mm, ModelPatcherBase)
    try:
        cmm._before_load(ql.LoadOptions(model=options.model, device="cpu"))
        assert mm.free_memory_calls == [], "a CPU load must not evict anything from the GPU"
        cmm._before_load(options)
        (need, device), = mm.free_memory_calls
        assert device == mm.device
        assert need == cmm.estimated_load_bytes(options) + mm.minimum_inference_memory()
        assert cmm.estimated_load_bytes(options) > 0
    finally:
        cmm.uninstall()
