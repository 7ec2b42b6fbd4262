"""Qwen-VL Fast: Qwen vision-language models in ComfyUI, fast and trustworthy.

Importing the pack registers its nodes and nothing else: no download, no model, no GPU memory.
"""

import logging

log = logging.getLogger("QwenVL-Fast")

MIN_TRANSFORMERS = (4, 57)
MIN_TORCH = (2, 5)


def _check_versions() -> str | None:
    """One clear sentence instead of an import traceback in ComfyUI's log."""
    try:
        import torch
        import transformers

        from .sources.tf_compat import version_tuple
    except ImportError as exc:
        missing = exc.name or str(exc)
        return f"cannot import {missing}: run 'pip install -r requirements.txt' in ComfyUI's Python."
    if version_tuple(torch.__version__) < MIN_TORCH:
        return f"torch {torch.__version__} is too old: Qwen-VL Fast needs torch >= {'.'.join(map(str, MIN_TORCH))}."
    if version_tuple(transformers.__version__) < MIN_TRANSFORMERS:
        return (f"transformers {transformers.__version__} is too old: Qwen-VL Fast needs transformers >= "
                f"{'.'.join(map(str, MIN_TRANSFORMERS))} (pip install -U 'transformers>=4.57').")
    return None


# The small frontend extension (web/js/qwenvl_fast.js) that shows each node's result on the node.
WEB_DIRECTORY = "./web"

_problem = _check_versions()
if not __package__:
    # Imported as a plain module, not as ComfyUI's custom-node package: pytest does this to a checkout whose
    # folder name is not an identifier (e.g. "ComfyUI-QwenVL-Fast"). There are no nodes to register then.
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}
elif _problem is None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    log.error("[QwenVL-Fast] nodes not loaded: %s", _problem)
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
