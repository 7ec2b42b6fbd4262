"""Where the disk tier lives when nobody says: ``$QWENVL_FAST_CACHE_DIR``, else the host's folder, else the
platform's user cache folder.

This module imports nothing from ComfyUI: a host sets its folder with ``set_default_cache_root``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("QwenVL-Fast")

CACHE_DIR_ENV = "QWENVL_FAST_CACHE_DIR"
CACHE_SUBDIR = "qwenvl_fast_cache"  # the folder under the host's root
APP_NAME = "qwenvl-fast"  # the folder in the platform's user cache folder
_host_cache_root: Path | None = None


def set_default_cache_root(path: str | Path | None) -> None:
    """The host's folder for the disk cache (ComfyUI: its user directory, or its temp directory on old
    versions); the cache lives in ``CACHE_SUBDIR`` under it. None forgets it. ``$QWENVL_FAST_CACHE_DIR``
    still wins. Takes effect for disk tiers created afterwards. This module imports nothing from the
    host: the host tells it where to go.
    """
    global _host_cache_root
    _host_cache_root = Path(path).expanduser() if path else None


def default_cache_dir() -> Path:
    """``$QWENVL_FAST_CACHE_DIR``, else the host's root (``set_default_cache_root``), else the user cache dir.

    The user cache dir is platformdirs' (``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux, ``~/Library/Caches`` on
    macOS, ``%LOCALAPPDATA%`` on Windows). Nothing is created here: a disk tier makes the folder when it opens.
    """
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    if _host_cache_root is not None:
        return _host_cache_root / CACHE_SUBDIR
    try:
        import platformdirs
    except ImportError:  # an install that skipped requirements.txt: the cache still has a home
        log.debug("[QwenVL-Fast] platformdirs is not installed: the disk cache goes under ~/.cache")
        return Path.home() / ".cache" / APP_NAME
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))
