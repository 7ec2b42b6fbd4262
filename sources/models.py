"""Where models come from: known repos, families, the model folders, safe name resolution, folder checks.

The host (``nodes.py`` inside ComfyUI) hands its model folders in with :func:`set_host_model_dirs`; this
module never imports ComfyUI.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ModelNotFoundError, QwenVLError
from . import synthetic

KNOWN_MODELS: dict[str, str] = {
    # repo id: size shown in the model list
    "Qwen/Qwen2-VL-2B-Instruct": "2B",
    "Qwen/Qwen2-VL-7B-Instruct": "7B",
    "Qwen/Qwen2.5-VL-3B-Instruct": "3B",
    "Qwen/Qwen2.5-VL-7B-Instruct": "7B",
    "Qwen/Qwen2.5-VL-32B-Instruct": "32B",
    "Qwen/Qwen2.5-VL-72B-Instruct": "72B",
    "Qwen/Qwen3-VL-2B-Instruct": "2B",
    "Qwen/Qwen3-VL-2B-Thinking": "2B",
    "Qwen/Qwen3-VL-4B-Instruct": "4B",
    "Qwen/Qwen3-VL-4B-Thinking": "4B",
    "Qwen/Qwen3-VL-8B-Instruct": "8B",
    "Qwen/Qwen3-VL-8B-Thinking": "8B",
    "Qwen/Qwen3-VL-32B-Instruct": "32B",
    "Qwen/Qwen3-VL-32B-Thinking": "32B",
    "Qwen/Qwen3-VL-30B-A3B-Instruct": "30B MoE, 3B active",
    "Qwen/Qwen3-VL-30B-A3B-Thinking": "30B MoE, 3B active",
    "Qwen/Qwen3-VL-235B-A22B-Instruct": "235B MoE, 22B active",
    "Qwen/Qwen3-VL-235B-A22B-Thinking": "235B MoE, 22B active",
    "Qwen/Qwen3.5-0.8B": "0.8B",
    "Qwen/Qwen3.5-2B": "2B",
    "Qwen/Qwen3.5-4B": "4B",
    "Qwen/Qwen3.5-9B": "9B",
    "Qwen/Qwen3.5-27B": "27B",
    "Qwen/Qwen3.5-35B-A3B": "35B MoE, 3B active",
    "Qwen/Qwen3.5-122B-A10B": "122B MoE, 10B active",
    "Qwen/Qwen3.5-397B-A17B": "397B MoE, 17B active",
}

SUPPORTED_FAMILIES: dict[str, str] = {
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "qwen3_vl_moe": "Qwen3-VL-MoE",
    "qwen3_5": "Qwen3.5",
    "qwen3_5_moe": "Qwen3.5-MoE",
}

@dataclass(frozen=True)
class FamilyInfo:
    model_type: str
    name: str
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    deepstack_levels: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

def detect_family(config: Any, model_type: str | None = None) -> FamilyInfo:
    """The family from the config (never from the folder name)."""
    model_type = model_type or getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise QwenVLError(
            f"Unsupported model architecture '{model_type}'. Qwen-VL Fast runs Qwen vision-language models: "
            f"{', '.join(SUPPORTED_FAMILIES.values())}. A text-only Qwen or another VLM cannot be used here."
        )
    vision = config.vision_config
    deepstack = getattr(vision, "deepstack_visual_indexes", None) or []
    return FamilyInfo(
        model_type=model_type,
        name=SUPPORTED_FAMILIES[model_type],
        patch_size=int(vision.patch_size),
        merge_size=int(vision.spatial_merge_size),
        temporal_patch_size=int(getattr(vision, "temporal_patch_size", 2)),
        deepstack_levels=len(deepstack),
    )


# ---------------------------------------------------------------------------------------------
# The model folders
# ---------------------------------------------------------------------------------------------

_EXTRA_MODEL_DIRS: list[Path] = []
_host_model_dirs: Callable[[], Sequence[str | Path]] | None = None


def set_host_model_dirs(provider: Callable[[], Sequence[str | Path]] | None) -> None:
    """The host's model folders (ComfyUI: its ``LLM`` folders, read at each call so YAML additions count)."""
    global _host_model_dirs
    _host_model_dirs = provider


def default_model_dirs() -> list[Path]:
    """The host's model folders, plus ``$QWENVL_FAST_MODELS_DIR``, plus folders added with add_model_dir."""
    dirs: list[Path] = []
    if _host_model_dirs is not None:
        dirs.extend(Path(p) for p in _host_model_dirs())
    env = os.environ.get("QWENVL_FAST_MODELS_DIR")
    if env:
        dirs.append(Path(env))
    dirs.extend(_EXTRA_MODEL_DIRS)
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def add_model_dir(path: str | Path) -> None:
    """Register another folder to search for local models (scripts and tests)."""
    p = Path(path)
    if p not in _EXTRA_MODEL_DIRS:
        _EXTRA_MODEL_DIRS.append(p)

def list_local_models(dirs: Sequence[Path] | None = None) -> list[str]:
    """Local model folders (holding config.json) under the model dirs, as relative names."""
    found: list[str] = []
    for base in dirs if dirs is not None else default_model_dirs():
        if not base.is_dir():
            continue
        for cfg in sorted(base.glob("*/config.json")) + sorted(base.glob("*/*/config.json")):
            name = cfg.parent.relative_to(base).as_posix()
            if name not in found:
                found.append(name)
    return found

GGUF_SUFFIX = ".gguf"
GGUF_PROJECTOR_PREFIX = "mmproj"
# llama.cpp's split files; the first one loads all
GGUF_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def is_gguf_projector(path: Path) -> bool:
    """A projector (``mmproj*.gguf``), never a model to pick."""
    return path.name.lower().startswith(GGUF_PROJECTOR_PREFIX)


def _gguf_model_file(path: Path) -> bool:
    """A pickable GGUF model file: not a projector, of a split model only the first part, and with a projector
    (``mmproj*.gguf``) in its folder (a Qwen-VL GGUF needs both)."""
    if not path.name.lower().endswith(GGUF_SUFFIX) or is_gguf_projector(path) or not path.is_file():
        return False
    split = GGUF_SPLIT.search(path.name)
    if split is not None and int(split.group(1)) != 1:
        return False
    return any(is_gguf_projector(p) for p in path.parent.glob("*" + GGUF_SUFFIX))


def list_gguf_models(dirs: Sequence[Path] | None = None) -> list[str]:
    """GGUF models (a folder holding a model ``.gguf`` and its ``mmproj*.gguf``) under the model dirs, one entry
    per model file (several quantizations in one folder are several entries): ``<folder>/<file>.gguf``."""
    found: list[str] = []
    for base in dirs if dirs is not None else default_model_dirs():
        if not base.is_dir():
            continue
        for f in sorted(base.glob("*/*" + GGUF_SUFFIX)) + sorted(base.glob("*/*/*" + GGUF_SUFFIX)):
            name = f.relative_to(base).as_posix()
            if name not in found and _gguf_model_file(f):
                found.append(name)
    return found


def model_choices(dirs: Sequence[Path] | None = None) -> list[str]:
    """The node's model list: local folders first, then GGUF models (run by llama-server), then the known repos.

    A known repo whose folder is here is listed once, as the folder; but an interrupted download's folder keeps its
    repo name in the list too: choosing the repo name is how the download resumes (a ComfyUI combo accepts only
    listed values).
    """
    local = list_local_models(dirs)
    bases = list(dirs) if dirs is not None else default_model_dirs()

    def complete_here(name: str) -> bool:
        return name in local and any(is_model_folder(Path(base) / name) for base in bases)

    known = [r for r in KNOWN_MODELS if not complete_here(r.split("/")[-1]) and not complete_here(r)]
    return local + list_gguf_models(dirs) + known

def synthetic_choices() -> list[str]:
    return [f"synthetic:{name}" for name in synthetic.SYNTHETIC_PRESETS]

def folder_for_repo(repo_id: str) -> str:
    return repo_id.split("/")[-1]

INCOMPLETE_MARKER = ".incomplete"  # written before a download starts, removed when it completes

def is_model_folder(path: Path) -> bool:
    """A complete model folder: config.json, and no marker of an interrupted download."""
    return (path / "config.json").is_file() and not (path / INCOMPLETE_MARKER).exists()

def incomplete_message(path: Path) -> str:
    return (f"'{path}' is an interrupted download (it holds a '{INCOMPLETE_MARKER}' marker). Pick the model's repo "
            "name (e.g. Qwen/...) to resume the download, or copy the missing files in and delete the marker.")

@dataclass(frozen=True)
class ModelSource:
    kind: str  # local / synthetic / repo / gguf (path: the model .gguf file)
    name: str
    path: Path | None = None
    repo_id: str | None = None

def _absolute_refused(name: str, dirs: Sequence[Path]) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"'{name}' is an absolute path; workflows may only name models inside the LLM model folders "
        f"({', '.join(map(str, dirs)) or 'none registered'}). Move the model there and pick it from the list."
    )


def _dots_refused(name: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"'{name}' contains '..'; model names must stay inside the LLM model folders.")


def _inside(base: Path, rel: str) -> Path | None:
    """``base / rel`` normalised lexically, or None where that leaves ``base``."""
    path = Path(os.path.normpath(base / rel))
    return path if path.is_relative_to(Path(os.path.normpath(base))) else None


def resolve_model(name: str, dirs: Sequence[Path] | None = None, allow_absolute: bool = True,
                  allow_download: bool = True) -> ModelSource:
    """Find a model: a synthetic name, a local folder, or a known repo (downloaded once).

    From a workflow (``allow_absolute=False``) a name can only point inside the model folders:
    absolute paths and ``..`` are refused, so a shared workflow cannot read arbitrary folders.
    """
    name = str(name).strip()
    if not name:
        raise ModelNotFoundError("No model selected: choose one in the model list.")
    if synthetic.is_synthetic_name(name):
        return ModelSource("synthetic", name)
    dirs = list(dirs) if dirs is not None else default_model_dirs()
    if name.lower().endswith(GGUF_SUFFIX):
        return resolve_gguf(name, dirs, allow_absolute)
    candidate = Path(name).expanduser()
    if candidate.is_absolute():
        if not allow_absolute:
            raise _absolute_refused(name, dirs)
        if is_model_folder(candidate):
            return ModelSource("local", name, path=candidate)
        if (candidate / INCOMPLETE_MARKER).exists():
            raise ModelNotFoundError(incomplete_message(candidate))
        raise ModelNotFoundError(f"'{candidate}' is not a model folder (no config.json in it).")
    parts = Path(name).parts
    if ".." in parts:
        raise _dots_refused(name)
    for base in dirs:
        for rel in (name, folder_for_repo(name)):
            # The name (no '..', not absolute) keeps the lexical path inside the model folder; a symlink the
            # user put there (models on another drive) is their choice and is followed.
            path = _inside(base, rel)
            if path is not None and is_model_folder(path):
                return ModelSource("local", name, path=path)
    if "/" in name and not name.startswith("/"):
        return ModelSource("repo", name, repo_id=name)
    for base in dirs:
        if (base / name / INCOMPLETE_MARKER).exists():
            raise ModelNotFoundError(incomplete_message(base / name))
        if (base / name).is_dir():
            raise ModelNotFoundError(
                f"'{base / name}' exists but has no config.json: it is not a complete model folder. "
                "Download the model again into it."
            )
    raise ModelNotFoundError(
        f"Model '{name}' was not found in {', '.join(map(str, dirs)) or 'any model folder'}. "
        "Put the model's files (config.json, *.safetensors, tokenizer and processor files) in a folder there."
    )


def resolve_gguf(name: str, dirs: Sequence[Path], allow_absolute: bool = True) -> ModelSource:
    """A GGUF model file: inside the model folders (from a workflow), or any path (scripts)."""
    candidate = Path(name).expanduser()
    if candidate.is_absolute():
        if not allow_absolute:
            raise _absolute_refused(name, dirs)
        paths = [candidate]
    elif ".." in Path(name).parts:
        raise _dots_refused(name)
    else:
        paths = [p for p in (_inside(base, name) for base in dirs) if p is not None]
    for path in paths:
        if path.is_file():
            if is_gguf_projector(path):
                raise ModelNotFoundError(f"'{name}' is a projector (mmproj); pick the model .gguf beside it.")
            return ModelSource("gguf", name, path=path)
    raise ModelNotFoundError(
        f"GGUF model '{name}' was not found in {', '.join(map(str, dirs)) or 'any model folder'}. Put the model "
        ".gguf and its mmproj*.gguf projector in a folder there."
    )


# ---------------------------------------------------------------------------------------------
# Folder checks
# ---------------------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, data start offset) of a safetensors file; ``QwenVLError`` with the fix when it is broken."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QwenVLError(f"'{path.name}' is truncated (incomplete download): download it again.")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise QwenVLError(f"'{path.name}' is truncated or corrupt: download it again.")
            header = json.loads(f.read(n))
    except (OSError, ValueError, TypeError) as exc:
        raise QwenVLError(f"'{path.name}' cannot be read as safetensors ({exc}): download it again.") from exc
    if not isinstance(header, dict):
        raise QwenVLError(f"'{path.name}' cannot be read as safetensors (bad header): download it again.")
    return header, 8 + n


def check_folder(path: Path) -> None:
    """Fail early, with the fix, on incomplete or unsafe model folders."""
    if (path / INCOMPLETE_MARKER).exists():
        raise ModelNotFoundError(incomplete_message(path))
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"'{path}' has no config.json: it is not a model folder.")
    weights = list(path.glob("*.safetensors"))
    if not weights:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise QwenVLError(
                f"'{path}' holds only pickle weights (.bin/.pt); Qwen-VL Fast loads safetensors only, for safety. "
                "Download the safetensors version of the model."
            )
        raise ModelNotFoundError(f"'{path}' has no *.safetensors weights: download the model's weight files into it.")
    for index in path.glob("*.safetensors.index.json"):
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QwenVLError(f"'{index.name}' cannot be read ({exc}): download it again.") from exc
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelNotFoundError(f"'{path}' is missing weight files ({', '.join(missing[:3])}"
                                     f"{', ...' if len(missing) > 3 else ''}): download them again.")
    for w in weights:
        header, data_start = read_safetensors_header(w)
        try:
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (KeyError, TypeError, IndexError) as exc:
            raise QwenVLError(f"'{w.name}' cannot be read as safetensors ({exc}): download it again.") from exc
        size = w.stat().st_size
        if data_start + end > size:
            raise QwenVLError(f"'{w.name}' is truncated ({size} of {data_start + end} bytes): download it again.")
    has_processor = any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json"))
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if not (has_processor and has_tokenizer):
        missing = "preprocessor_config.json" if not has_processor else "tokenizer files"
        raise ModelNotFoundError(f"'{path}' is missing {missing}: copy the processor and tokenizer files from the "
                                 "model repository into the folder.")

class _VisionConfigView:
    def __init__(self, values: dict[str, Any]) -> None:
        self.patch_size = values.get("patch_size", 14)
        self.spatial_merge_size = values.get("spatial_merge_size", 2)
        self.temporal_patch_size = values.get("temporal_patch_size", 2)
        self.deepstack_visual_indexes = values.get("deepstack_visual_indexes")

def check_architecture(path: Path) -> str:
    """Refuse a non-Qwen-VL config before transformers spends time (or memory) loading it."""
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QwenVLError(f"'{path / 'config.json'}' is not valid JSON ({exc}): download it again.") from exc
    return detect_family(type("RawConfig", (), {"model_type": raw.get("model_type"),
                                                "vision_config": _VisionConfigView(raw.get("vision_config") or {})})()
                         ).model_type
