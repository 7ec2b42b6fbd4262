"""The trust checks (``core/trust.py``) applied where a workflow's folder or ``server_url`` enters the pack.

Inside ComfyUI the default folder roots are ComfyUI's own input, output and user folders; the owner adds more
with ``$QWENVL_FAST_FOLDER_ROOTS`` and servers with ``$QWENVL_FAST_SERVER_ORIGINS`` (read at every check, so
the environment is the one source; see SECURITY.md for why there is no config file in the user folder).
Outside ComfyUI (the engine's own tests, the CLI) there is no workflow and nothing is restricted here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core import trust

try:  # ComfyUI's folder helpers, when running inside it
    import folder_paths  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - exercised in the real-server tests
    folder_paths = None


def default_roots() -> list[Path]:
    """ComfyUI's input, output and user folders (those this ComfyUI version has)."""
    if folder_paths is None:
        return []
    roots = []
    for getter in ("get_input_directory", "get_output_directory", "get_user_directory"):
        function = getattr(folder_paths, getter, None)
        if function is not None:
            try:
                roots.append(Path(function()))
            except Exception:  # an old or partial ComfyUI: that root is just absent
                continue
    return roots


def folder_roots() -> list[Path]:
    return default_roots() + trust.env_folder_roots()


def allowed_folder(path: str | os.PathLike[str]) -> Path:
    """A workflow's folder, resolved, when it lies inside an allowed root (inside ComfyUI); else TrustError."""
    if folder_paths is None:
        return Path(path)
    return trust.check_folder(path, folder_roots())


def allowed_server(values: dict[str, Any]) -> dict[str, Any]:
    """A node's loader values, unchanged, when their ``server_url`` may be used (backend 'server' only: the
    URL is not read otherwise); else TrustError. Checked before any name lookup or connection."""
    if folder_paths is not None and values.get("backend") == "server":
        trust.check_server_url(str(values.get("server_url", "")), trust.env_server_origins())
    return values
