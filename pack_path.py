"""Import this folder as the package ``qwenvl_fast``: the one way scripts and tests reach the pack's modules.

Inside ComfyUI the folder is imported as a package by ComfyUI itself; the engine's modules use relative
imports only, so none of them can also be imported a second time as a plain module (with a second model
manager and second caches). Scripts (``cli.py``, ``bench/benchmark.py``) and the tests call :func:`import_pack`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE = "qwenvl_fast"
ROOT = Path(__file__).resolve().parent


def import_pack() -> ModuleType:
    """The pack as ``qwenvl_fast`` (imported once per process); its modules are ``qwenvl_fast.<name>``."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    return module
