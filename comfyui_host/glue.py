"""What ties the engine to a running ComfyUI: model folders, cache folder, model manager, interrupt, progress.

Imports ComfyUI's modules only when they are there (inside ComfyUI); elsewhere every function here is a
no-op or a plain default, so the rest of the pack runs and is tested without ComfyUI. ``nodes.py`` calls
:func:`connect` once and uses the rest from its node classes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from .. import embedding_cache
from .. import qwenvl_loader as ql
from ..captioning import ledger as caption_ledger
from ..sources import models as model_sources
from . import model_manager as comfy_model_manager

log = logging.getLogger("QwenVL-Fast")

try:  # ComfyUI's helpers, when running inside it
    import comfy.model_management as mm  # type: ignore[import-not-found]
    import comfy.utils as comfy_utils  # type: ignore[import-not-found]
    import folder_paths  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - exercised in the real-server tests
    mm = None
    comfy_utils = None
    folder_paths = None

_connected = False


def connect() -> None:
    """Register models/LLM, hand ComfyUI's folders to the engine, join ComfyUI's model manager (once)."""
    global _connected
    if _connected or folder_paths is None:
        return
    _connected = True
    default = os.path.join(folder_paths.models_dir, "LLM")
    registered = folder_paths.folder_names_and_paths.get("LLM")
    if registered is None or default not in registered[0]:
        folder_paths.add_model_folder_path("LLM", default)  # plus what extra_model_paths.yaml adds under LLM
    model_sources.set_host_model_dirs(lambda: folder_paths.get_folder_paths("LLM"))
    # The user directory survives restarts; very old ComfyUI versions only have a temp directory.
    root = (folder_paths.get_user_directory() if hasattr(folder_paths, "get_user_directory")
            else folder_paths.get_temp_directory() if hasattr(folder_paths, "get_temp_directory") else None)
    embedding_cache.set_default_cache_root(root)
    caption_ledger.set_host_root(root)  # Caption Folder's ledgers: <user>/qwenvl_fast/ledgers
    if mm is not None:
        try:
            from comfy.model_patcher import ModelPatcher  # type: ignore[import-not-found]
        except ImportError:  # pragma: no cover - every ComfyUI since 2023 has it
            ModelPatcher = None
        comfy_model_manager.install(ql.MANAGER, mm, ModelPatcher)


def device_choice(device: str) -> str:
    """``auto`` means ComfyUI's device inside ComfyUI."""
    if device == "auto" and mm is not None:
        return str(mm.get_torch_device())
    return device


def interrupted() -> bool:
    return bool(mm is not None and mm.processing_interrupted())


def raise_interrupt() -> None:
    """Turn the engine's interruption into ComfyUI's own, so the run ends as interrupted, not failed."""
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def progress_callbacks(unique_id: str | None) -> tuple[Callable[[int, int], None], Callable[[str], None]]:
    """(on_progress, on_text): ComfyUI's progress bar (each update also checks Cancel) and partial text."""
    bar = comfy_utils.ProgressBar(1) if comfy_utils is not None else None
    server: Any = None
    try:
        from server import PromptServer  # type: ignore[import-not-found]

        server = PromptServer.instance
    except Exception:
        pass
    send_text = getattr(server, "send_progress_text", None) if server is not None else None

    def on_progress(step: int, total: int) -> None:
        if bar is not None:
            bar.update_absolute(step, total)

    def on_text(text: str) -> None:
        if send_text is not None and unique_id is not None:
            try:
                send_text(text, unique_id)
            except Exception:
                pass

    return on_progress, on_text
