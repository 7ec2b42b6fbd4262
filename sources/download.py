"""Download a known repo once into the first model folder (resumable); offline, say where the files go."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import ModelNotFoundError
from .models import INCOMPLETE_MARKER, default_model_dirs, folder_for_repo, is_model_folder

log = logging.getLogger("QwenVL-Fast")


def download_model(repo_id: str, dirs: Sequence[Path] | None = None) -> Path:
    """Download a repo once into ``<models/LLM>/<name>`` (resumable); offline, say where to put it."""
    dirs = list(dirs) if dirs is not None else default_model_dirs()
    if not dirs:
        raise ModelNotFoundError(
            f"Cannot download '{repo_id}': no model folder is configured. Set QWENVL_FAST_MODELS_DIR or run inside "
            "ComfyUI (models/LLM)."
        )
    target = dirs[0] / folder_for_repo(repo_id)
    if is_model_folder(target):
        return target
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline:
        raise ModelNotFoundError(
            f"'{repo_id}' is not downloaded and HF_HUB_OFFLINE is set. Download it elsewhere and put its files in "
            f"'{target}' (config.json, *.safetensors, tokenizer and processor files)."
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelNotFoundError("huggingface_hub is missing: pip install -r requirements.txt") from exc
    log.info("[QwenVL-Fast] downloading %s into %s (once)", repo_id, target)
    target.mkdir(parents=True, exist_ok=True)
    marker = target / INCOMPLETE_MARKER
    marker.write_text("download in progress; an interrupted download resumes on the next run\n")
    try:
        snapshot_download(
            repo_id=repo_id,
            local_dir=str(target),
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "tokenizer*", "*.tiktoken"],
        )
    except Exception as exc:
        raise ModelNotFoundError(
            f"Could not download '{repo_id}' ({type(exc).__name__}: {exc}). If this machine is offline, download "
            f"it elsewhere and put its files in '{target}'."
        ) from exc
    marker.unlink(missing_ok=True)
    return target
