"""comfyui_host/glue.py: the thin glue between the engine and a running ComfyUI.

Two situations. Without ComfyUI (the unit tests' real situation) every function is a no-op or a plain default.
With ComfyUI, the glue finds ``comfy.model_management``, ``comfy.utils`` and ``folder_paths`` when it is
imported, and ``server.PromptServer`` at each progress_callbacks call; ComfyUI cannot be imported in unit tests,
so minimal stand-ins for those modules, written after ComfyUI's own code (the interrupt flag of
``model_management``, ``ProgressBar`` and its global hook, ``PromptServer.send_progress_text``), are put in
``sys.modules`` and a separate copy of glue.py is imported against them. The real ComfyUI is exercised by
tests/test_comfyui_server.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from comfy_contract import ModelPatcherBase
from qwenvl_fast import embedding_cache
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.comfyui_host import glue
from qwenvl_fast.comfyui_host import model_manager as comfy_model_manager
from qwenvl_fast.sources import models as model_sources

GLUE_PATH = Path(glue.__file__)


# ----------------------------------------------------------------------------------------------------------
# Without ComfyUI
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def comfyui_absent():
    for name in ("comfy", "folder_paths"):
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            pytest.skip(f"'{name}' is importable in this process")
    assert glue.mm is None and glue.comfy_utils is None and glue.folder_paths is None


def test_without_comfyui_nothing_is_interrupted(comfyui_absent):
    assert glue.interrupted() is False
    assert glue.raise_interrupt() is None  # harmless: nothing to raise


def test_without_comfyui_progress_callbacks_do_nothing(comfyui_absent):
    for unique_id in (None, "12"):
        on_progress, on_text = glue.progress_callbacks(unique_id)
        assert callable(on_progress) and callable(on_text)
        assert on_progress(3, 10) is None
        assert on_progress(10, 10) is None
        assert on_text("partial answer") is None


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_without_comfyui_the_device_choice_is_kept(comfyui_absent, device):
    assert glue.device_choice(device) == device


def test_without_comfyui_connect_changes_nothing(comfyui_absent):
    host_before = model_sources._host_model_dirs
    hooks_before = (list(ql.MANAGER.before_load), list(ql.MANAGER.on_load), list(ql.MANAGER.on_release))
    glue.connect()
    assert glue._connected is False
    assert model_sources._host_model_dirs is host_before
    assert (ql.MANAGER.before_load, ql.MANAGER.on_load, ql.MANAGER.on_release) == hooks_before


# ----------------------------------------------------------------------------------------------------------
# Stand-ins for ComfyUI's modules
# ----------------------------------------------------------------------------------------------------------


class InterruptProcessingException(Exception):
    """comfy.model_management.InterruptProcessingException."""


def _model_management(device: torch.device) -> types.ModuleType:
    """comfy.model_management's interrupt flag and device, as ComfyUI writes them."""
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.interrupt_processing = False
    mm.polls = 0

    def interrupt_current_processing(value: bool = True) -> None:
        mm.interrupt_processing = value

    def processing_interrupted() -> bool:
        mm.polls += 1
        return mm.interrupt_processing

    def throw_exception_if_processing_interrupted() -> None:
        if mm.interrupt_processing:
            mm.interrupt_processing = False
            raise InterruptProcessingException()

    mm.interrupt_current_processing = interrupt_current_processing
    mm.processing_interrupted = processing_interrupted
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.get_torch_device = lambda: device
    return mm


def _comfy_utils(mm: types.ModuleType, sent: list) -> types.ModuleType:
    """comfy.utils.ProgressBar and the hook ComfyUI's main.py installs (it checks Cancel on every update)."""
    utils = types.ModuleType("comfy.utils")
    utils.bars = []

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total
            self.current = 0
            self.hook = utils.PROGRESS_BAR_HOOK
            self.node_id = node_id
            utils.bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            if value > self.total:
                value = self.total
            self.current = value
            if self.hook is not None:
                self.hook(self.current, self.total, preview, node_id=self.node_id)

        def update(self, value):
            self.update_absolute(self.current + value)

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        mm.throw_exception_if_processing_interrupted()
        sent.append(("progress", {"value": value, "max": total}))

    utils.ProgressBar = ProgressBar
    utils.PROGRESS_BAR_HOOK = hook
    return utils


def _server(sent: list, with_text: bool = True, failing: bool = False) -> types.ModuleType:
    server = types.ModuleType("server")

    class PromptServer:
        instance = None

        def send_sync(self, event, data, sid=None):
            sent.append((event, data))

        if with_text:
            def send_progress_text(self, text, node_id, sid=None):
                if failing:
                    raise ConnectionResetError("client went away")
                sent.append(("progress_text", node_id, text))

    PromptServer.instance = PromptServer()
    server.PromptServer = PromptServer
    return server


def _folder_paths(root: Path, user_directory: bool = True) -> types.ModuleType:
    """folder_paths: models_dir, the registered folders per kind, the user (or temp) directory."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(root / "models")
    fp.folder_names_and_paths = {}
    fp.added = []

    def add_model_folder_path(folder_name, full_folder_path, is_default=False):
        fp.added.append((folder_name, full_folder_path))
        paths, exts = fp.folder_names_and_paths.setdefault(folder_name, ([], set()))
        if full_folder_path not in paths:
            paths.append(full_folder_path)

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = lambda folder_name: list(fp.folder_names_and_paths[folder_name][0])
    fp.get_temp_directory = lambda: str(root / "temp")
    if user_directory:
        fp.get_user_directory = lambda: str(root / "user")
    return fp


class Comfy:
    """The stand-in modules and a copy of glue.py imported against them."""

    def __init__(self, mp: pytest.MonkeyPatch, root: Path, device=torch.device("cuda", 0), *, server=True,
                 with_text=True, failing_text=False, user_directory=True, patcher=True) -> None:
        self.sent: list = []
        self.mm = _model_management(device)
        self.utils = _comfy_utils(self.mm, self.sent)
        self.folder_paths = _folder_paths(root, user_directory)
        comfy = types.ModuleType("comfy")
        comfy.model_management, comfy.utils = self.mm, self.utils
        modules = {"comfy": comfy, "comfy.model_management": self.mm, "comfy.utils": self.utils,
                   "folder_paths": self.folder_paths}
        if patcher:
            model_patcher = types.ModuleType("comfy.model_patcher")
            model_patcher.ModelPatcher = ModelPatcherBase  # tests/comfy_contract.py's reproduction
            comfy.model_patcher = model_patcher
            modules["comfy.model_patcher"] = model_patcher
        if server:
            modules["server"] = _server(self.sent, with_text, failing_text)
        else:
            mp.setitem(sys.modules, "server", None)  # `from server import ...` raises ImportError
        for name, module in modules.items():
            mp.setitem(sys.modules, name, module)
        spec = importlib.util.spec_from_file_location("qwenvl_fast.comfyui_host._glue_in_comfyui", GLUE_PATH)
        self.glue = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.glue)


@pytest.fixture
def comfy_env(tmp_path):
    """Makes Comfy(...) environments; undoes sys.modules, the registered folders and the model-manager hooks
    when the test ends (before conftest releases the model manager)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_sources, "_EXTRA_MODEL_DIRS", [])
        mp.setattr(model_sources, "_host_model_dirs", None)
        mp.delenv("QWENVL_FAST_MODELS_DIR", raising=False)
        try:
            yield lambda **kw: Comfy(mp, tmp_path, **kw)
        finally:
            comfy_model_manager.uninstall()
            embedding_cache.set_default_cache_root(None)


def test_the_glue_finds_comfyuis_modules(comfy_env):
    env = comfy_env()
    assert env.glue.mm is env.mm
    assert env.glue.comfy_utils is env.utils
    assert env.glue.folder_paths is env.folder_paths
    assert glue.mm is None  # the pack's own glue module is untouched


def test_interrupt_flag_is_polled(comfy_env):
    env = comfy_env()
    assert env.glue.interrupted() is False
    assert env.mm.polls == 1
    env.mm.interrupt_current_processing()  # the user pressed Cancel
    assert env.glue.interrupted() is True
    assert env.glue.interrupted() is True  # polling does not clear it
    assert env.mm.polls == 3


def test_raise_interrupt_raises_comfyuis_own_exception(comfy_env):
    env = comfy_env()
    assert env.glue.raise_interrupt() is None  # not interrupted: nothing happens
    env.mm.interrupt_current_processing()
    with pytest.raises(InterruptProcessingException):
        env.glue.raise_interrupt()
    assert env.mm.interrupt_processing is False  # ComfyUI's function resets the flag as it raises
    assert env.glue.raise_interrupt() is None


def test_progress_updates_comfyuis_bar_with_step_and_total(comfy_env):
    env = comfy_env()
    on_progress, _ = env.glue.progress_callbacks("7")
    assert len(env.utils.bars) == 1
    bar = env.utils.bars[0]
    for step in (1, 2, 5):
        on_progress(step, 5)
    assert (bar.current, bar.total) == (5, 5)
    assert env.sent == [("progress", {"value": 1, "max": 5}), ("progress", {"value": 2, "max": 5}),
                        ("progress", {"value": 5, "max": 5})]
    on_progress(3, 8)  # a new total (e.g. the answer ended early / the budget changed) is taken as given
    assert (bar.current, bar.total) == (3, 8)


def test_a_progress_update_after_cancel_raises_comfyuis_interrupt(comfy_env):
    env = comfy_env()
    on_progress, _ = env.glue.progress_callbacks("7")
    on_progress(1, 4)
    env.mm.interrupt_current_processing()
    with pytest.raises(InterruptProcessingException):
        on_progress(2, 4)
    assert env.sent == [("progress", {"value": 1, "max": 4})]


def test_progress_text_is_sent_to_the_node(comfy_env):
    env = comfy_env()
    _, on_text = env.glue.progress_callbacks("42")
    on_text("A cat")
    on_text("A cat on a mat")
    assert env.sent == [("progress_text", "42", "A cat"), ("progress_text", "42", "A cat on a mat")]


def test_progress_text_needs_a_node_id(comfy_env):
    env = comfy_env()
    on_progress, on_text = env.glue.progress_callbacks(None)
    on_text("nobody to show it to")
    on_progress(1, 2)
    assert env.sent == [("progress", {"value": 1, "max": 2})]


def test_progress_text_failures_do_not_stop_the_run(comfy_env):
    env = comfy_env(failing_text=True)
    on_progress, on_text = env.glue.progress_callbacks("3")
    assert on_text("partial") is None  # the client's connection error is swallowed
    on_progress(1, 1)
    assert env.sent == [("progress", {"value": 1, "max": 1})]


@pytest.mark.parametrize("kind", ["old server without send_progress_text", "no server module"])
def test_progress_text_without_a_server_that_takes_it(comfy_env, kind):
    env = comfy_env(with_text=False) if kind.startswith("old") else comfy_env(server=False)
    on_progress, on_text = env.glue.progress_callbacks("5")
    assert on_text("partial") is None
    on_progress(2, 3)  # the bar still works
    assert env.sent == [("progress", {"value": 2, "max": 3})]


def test_auto_device_is_comfyuis_device(comfy_env):
    env = comfy_env(device=torch.device("cuda", 1))
    assert env.glue.device_choice("auto") == "cuda:1"
    assert env.glue.device_choice("cpu") == "cpu"  # an explicit choice stays
    assert env.glue.device_choice("cuda") == "cuda"
    cpu_env = comfy_env(device=torch.device("cpu"))
    assert cpu_env.glue.device_choice("auto") == "cpu"


def test_connect_registers_llm_and_hands_comfyuis_folders_to_the_engine(comfy_env, tmp_path, monkeypatch):
    env = comfy_env()
    llm = os.path.join(env.folder_paths.models_dir, "LLM")
    env.glue.connect()

    assert env.folder_paths.added == [("LLM", llm)]
    assert model_sources.default_model_dirs() == [Path(llm)]
    # Folders ComfyUI adds later (extra_model_paths.yaml) count without connecting again.
    env.folder_paths.add_model_folder_path("LLM", str(tmp_path / "elsewhere"))
    assert model_sources.default_model_dirs() == [Path(llm), tmp_path / "elsewhere"]
    # The disk cache goes under ComfyUI's user directory.
    monkeypatch.delenv("QWENVL_FAST_CACHE_DIR")
    assert embedding_cache.default_cache_dir() == tmp_path / "user" / embedding_cache.CACHE_SUBDIR
    # The pack's model manager joined ComfyUI's, with a patcher built on ComfyUI's ModelPatcher.
    state = comfy_model_manager._STATE
    assert state.manager is ql.MANAGER and state.mm is env.mm
    assert issubclass(state.patcher_cls, ModelPatcherBase)
    assert comfy_model_manager._before_load in ql.MANAGER.before_load

    env.glue.connect()  # once only
    assert env.folder_paths.added == [("LLM", llm), ("LLM", str(tmp_path / "elsewhere"))]
    assert ql.MANAGER.before_load.count(comfy_model_manager._before_load) == 1


def test_connect_keeps_an_llm_folder_comfyui_registered_already(comfy_env):
    env = comfy_env()
    llm = os.path.join(env.folder_paths.models_dir, "LLM")
    env.folder_paths.folder_names_and_paths["LLM"] = ([llm], {".safetensors"})
    env.glue.connect()
    assert env.folder_paths.added == []
    assert model_sources.default_model_dirs() == [Path(llm)]


def test_connect_adds_the_default_next_to_folders_from_extra_model_paths(comfy_env, tmp_path):
    env = comfy_env()
    env.folder_paths.folder_names_and_paths["LLM"] = ([str(tmp_path / "yaml")], set())
    env.glue.connect()
    llm = os.path.join(env.folder_paths.models_dir, "LLM")
    assert model_sources.default_model_dirs() == [tmp_path / "yaml", Path(llm)]


def test_connect_on_an_old_comfyui(comfy_env, tmp_path, monkeypatch):
    # No user directory (the cache goes to the temp directory) and no comfy.model_patcher.
    env = comfy_env(user_directory=False, patcher=False)
    env.glue.connect()
    monkeypatch.delenv("QWENVL_FAST_CACHE_DIR")
    assert embedding_cache.default_cache_dir() == tmp_path / "temp" / embedding_cache.CACHE_SUBDIR
    state = comfy_model_manager._STATE
    assert state.manager is ql.MANAGER and state.mm is env.mm
    assert not issubclass(state.patcher_cls, ModelPatcherBase)  # the pack's own base class instead
