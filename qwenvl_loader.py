"""The shared model loader and inference engine of Qwen-VL Fast (no ComfyUI needed).

- ``LoadOptions`` / ``ModelManager``: one loaded model at a time, reused while the same options
  are asked for, released (memory really freed) before another is loaded.
- ``QwenVLModel.run``: images in, text out, with quality presets applied per image on every
  call, the embedding cache in front of the vision tower, batched encoding of cache misses,
  a tensor-native preprocessing path, interrupt and progress callbacks, and a timing record.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Inside ComfyUI the pack is a package (imported by path); scripts and tests import the modules directly.
if __package__:
    from . import fast_preprocess, synthetic, vision_attention
    from . import quality_presets as qp
    from .embedding_cache import EmbeddingCache, ImageEmbedding, canonical_digest, entry_key
    from .perf_monitor import TIPS, RunMonitor, RunRecord, TokenTimer, report
else:
    import fast_preprocess
    import quality_presets as qp
    import synthetic
    import vision_attention
    from embedding_cache import EmbeddingCache, ImageEmbedding, canonical_digest, entry_key
    from perf_monitor import TIPS, RunMonitor, RunRecord, TokenTimer, report

log = logging.getLogger("QwenVL-Fast")


def _transformers_major() -> int:
    try:
        from importlib.metadata import version

        return int(version("transformers").split(".")[0])
    except Exception:
        return 5


_TRANSFORMERS_MAJOR = _transformers_major()

# ---------------------------------------------------------------------------------------------
# Known models and families
# ---------------------------------------------------------------------------------------------

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

QUANTIZATION_CHOICES = ["none", "8-bit", "4-bit"]
ATTENTION_CHOICES = ["auto", "sdpa", "flash_attention_2", "eager"]
DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]
DEVICE_CHOICES = ["auto", "cuda", "cpu", "mps"]
COMPILE_CHOICES = ["auto", "on", "off"]
BATCH_MODES = ["one prompt, all images", "one answer per image"]
PREPROCESS_CHOICES = ["fast", "reference"]


class QwenVLError(RuntimeError):
    """An error a user can act on: the message says what to do."""


class ModelNotFoundError(QwenVLError):
    pass


class GenerationInterrupted(QwenVLError):
    pass


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
# Where models come from
# ---------------------------------------------------------------------------------------------

_EXTRA_MODEL_DIRS: list[Path] = []


def default_model_dirs() -> list[Path]:
    """ComfyUI's ``LLM`` folders when running inside it, plus ``$QWENVL_FAST_MODELS_DIR``."""
    dirs: list[Path] = []
    try:
        import folder_paths  # type: ignore[import-not-found]

        dirs.extend(Path(p) for p in folder_paths.get_folder_paths("LLM"))
    except Exception:
        pass
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


def model_choices(dirs: Sequence[Path] | None = None) -> list[str]:
    """The node's model list: local folders first, then the known repos."""
    local = list_local_models(dirs)
    known = [r for r in KNOWN_MODELS if r.split("/")[-1] not in local and r not in local]
    return local + known


def display_name(choice: str) -> str:
    size = KNOWN_MODELS.get(choice)
    return f"{choice} ({size})" if size else choice


def _folder_for_repo(repo_id: str) -> str:
    return repo_id.split("/")[-1]


INCOMPLETE_MARKER = ".incomplete"  # written before a download starts, removed when it completes


def _is_model_folder(path: Path) -> bool:
    """A complete model folder: config.json, and no marker of an interrupted download."""
    return (path / "config.json").is_file() and not (path / INCOMPLETE_MARKER).exists()


def _incomplete_message(path: Path) -> str:
    return (f"'{path}' is an interrupted download (it holds a '{INCOMPLETE_MARKER}' marker). Pick the model's repo "
            "name (e.g. Qwen/...) to resume the download, or copy the missing files in and delete the marker.")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # local / synthetic / repo
    name: str
    path: Path | None = None
    repo_id: str | None = None


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
    candidate = Path(name).expanduser()
    if candidate.is_absolute():
        if not allow_absolute:
            raise ModelNotFoundError(
                f"'{name}' is an absolute path; workflows may only name models inside the LLM model folders "
                f"({', '.join(map(str, dirs)) or 'none registered'}). Move the model there and pick it from the list."
            )
        if _is_model_folder(candidate):
            return ModelSource("local", name, path=candidate)
        if (candidate / INCOMPLETE_MARKER).exists():
            raise ModelNotFoundError(_incomplete_message(candidate))
        raise ModelNotFoundError(f"'{candidate}' is not a model folder (no config.json in it).")
    parts = Path(name).parts
    if ".." in parts:
        raise ModelNotFoundError(f"'{name}' contains '..'; model names must stay inside the LLM model folders.")
    for base in dirs:
        for rel in (name, _folder_for_repo(name)):
            # The name (no '..', not absolute) keeps the lexical path inside the model folder; a symlink the
            # user put there (models on another drive) is their choice and is followed.
            path = Path(os.path.normpath(base / rel))
            if path.is_relative_to(Path(os.path.normpath(base))) and _is_model_folder(path):
                return ModelSource("local", name, path=path)
    if "/" in name and not name.startswith("/"):
        return ModelSource("repo", name, repo_id=name)
    for base in dirs:
        if (base / name / INCOMPLETE_MARKER).exists():
            raise ModelNotFoundError(_incomplete_message(base / name))
        if (base / name).is_dir():
            raise ModelNotFoundError(
                f"'{base / name}' exists but has no config.json: it is not a complete model folder. "
                "Download the model again into it."
            )
    raise ModelNotFoundError(
        f"Model '{name}' was not found in {', '.join(map(str, dirs)) or 'any model folder'}. "
        "Put the model's files (config.json, *.safetensors, tokenizer and processor files) in a folder there."
    )


def download_model(repo_id: str, dirs: Sequence[Path] | None = None) -> Path:
    """Download a repo once into ``<models/LLM>/<name>`` (resumable); offline, say where to put it."""
    dirs = list(dirs) if dirs is not None else default_model_dirs()
    if not dirs:
        raise ModelNotFoundError(
            f"Cannot download '{repo_id}': no model folder is configured. Set QWENVL_FAST_MODELS_DIR or run inside "
            "ComfyUI (models/LLM)."
        )
    target = dirs[0] / _folder_for_repo(repo_id)
    if _is_model_folder(target) and not (target / ".incomplete").exists():
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
    marker = target / ".incomplete"
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


def model_fingerprint(source: ModelSource, config: Any) -> str:
    """Identity of the weights: path or repo, config, weights index and safetensors headers."""
    h = hashlib.sha256()
    h.update(f"{source.kind}:{source.repo_id or source.name}".encode())
    h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    if source.path is not None:
        for p in sorted(source.path.glob("*.safetensors.index.json")):
            h.update(p.read_bytes())
        for p in sorted(source.path.glob("*.safetensors")):
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
            try:
                with open(p, "rb") as f:
                    head = f.read(8)
                    n = int.from_bytes(head, "little") if len(head) == 8 else 0
                    h.update(f.read(min(n, 1 << 22)))
            except OSError:
                pass
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadOptions:
    model: str
    quantization: str = "none"
    attention_mode: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    compile_vision: str = "off"
    allow_absolute_path: bool = True


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QwenVLError("device 'cuda' was chosen but this PyTorch sees no CUDA GPU: choose 'auto' or 'cpu'.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise QwenVLError("device 'mps' was chosen but MPS is not available: choose 'auto' or 'cpu'.")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "fp16":
        return torch.float16
    if dtype == "fp32":
        return torch.float32
    if dtype != "auto":
        raise QwenVLError(f"Unknown dtype '{dtype}': choose one of {', '.join(DTYPE_CHOICES)}.")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def flash_attention_usable(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "flash-attn needs a CUDA GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return False, "flash-attn is not installed"
    if dtype not in (torch.float16, torch.bfloat16):
        return False, "flash-attn needs fp16 or bf16"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, "flash-attn 2 needs an Ampere or newer GPU"
    return True, ""


def resolve_attention(mode: str, device: torch.device, dtype: torch.dtype) -> str:
    if mode not in ATTENTION_CHOICES:
        raise QwenVLError(f"Unknown attention_mode '{mode}': choose one of {', '.join(ATTENTION_CHOICES)}.")
    ok, why = flash_attention_usable(device, dtype)
    if mode == "auto":
        return "flash_attention_2" if ok else "sdpa"
    if mode == "flash_attention_2" and not ok:
        raise QwenVLError(f"attention_mode 'flash_attention_2' is not usable here: {why}. Choose 'auto' or 'sdpa'.")
    return mode


def quantization_config(quantization: str, device: torch.device, dtype: torch.dtype):
    if quantization in ("none", "", None):
        return None
    if quantization not in QUANTIZATION_CHOICES:
        raise QwenVLError(f"Unknown quantization '{quantization}': choose one of {', '.join(QUANTIZATION_CHOICES)}.")
    if device.type != "cuda":
        raise QwenVLError(
            f"quantization '{quantization}' uses bitsandbytes, which needs a CUDA GPU; this run is on "
            f"{device.type}. Choose quantization 'none'."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QwenVLError(
            f"quantization '{quantization}' needs bitsandbytes: pip install bitsandbytes (or choose 'none')."
        )
    from transformers import BitsAndBytesConfig

    # The vision tower and lm_head stay in full precision: quantizing them costs quality for little memory.
    skip = ["visual", "lm_head"]
    if quantization == "8-bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=skip)


def _check_folder(path: Path) -> None:
    """Fail early, with the fix, on incomplete or unsafe model folders."""
    if (path / INCOMPLETE_MARKER).exists():
        raise ModelNotFoundError(_incomplete_message(path))
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
        try:
            with open(w, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise QwenVLError(f"'{w.name}' is truncated (incomplete download): download it again.")
                n = int.from_bytes(head, "little")
                size = w.stat().st_size
                if n <= 0 or 8 + n > size:
                    raise QwenVLError(f"'{w.name}' is truncated or corrupt: download it again.")
                header = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if 8 + n + end > size:
                    raise QwenVLError(f"'{w.name}' is truncated ({size} of {8 + n + end} bytes): download it again.")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QwenVLError(f"'{w.name}' cannot be read as safetensors ({exc}): download it again.") from exc
    has_processor = any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json"))
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if not (has_processor and has_tokenizer):
        missing = "preprocessor_config.json" if not has_processor else "tokenizer files"
        raise ModelNotFoundError(f"'{path}' is missing {missing}: copy the processor and tokenizer files from the "
                                 "model repository into the folder.")


def _check_architecture(path: Path) -> str:
    """Refuse a non-Qwen-VL config before transformers spends time (or memory) loading it."""
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QwenVLError(f"'{path / 'config.json'}' is not valid JSON ({exc}): download it again.") from exc
    return detect_family(type("RawConfig", (), {"model_type": raw.get("model_type"),
                                                "vision_config": _Namespace(raw.get("vision_config") or {})})()
                         ).model_type


class _Namespace:
    def __init__(self, values: dict[str, Any]) -> None:
        self.patch_size = values.get("patch_size", 14)
        self.spatial_merge_size = values.get("spatial_merge_size", 2)
        self.temporal_patch_size = values.get("temporal_patch_size", 2)
        self.deepstack_visual_indexes = values.get("deepstack_visual_indexes")


def _release_memory(device: torch.device | None = None) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if getattr(torch, "mps", None) is not None and getattr(torch.backends, "mps", None) is not None:
        if torch.backends.mps.is_available():
            torch.mps.empty_cache()


def _supports_mm_encoder_outputs(model) -> bool:
    return "mm_encoder_outputs" in inspect.signature(model.forward).parameters


def load_model(options: LoadOptions) -> QwenVLModel:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if options.quantization not in QUANTIZATION_CHOICES:
        raise QwenVLError(
            f"Unknown quantization '{options.quantization}': choose one of {', '.join(QUANTIZATION_CHOICES)}."
        )
    quant = quantization_config(options.quantization, device, dtype)
    attention = resolve_attention(options.attention_mode, device, dtype)
    source = resolve_model(options.model, allow_absolute=options.allow_absolute_path)
    t0 = time.perf_counter()
    if source.kind == "synthetic":
        log.info("[QwenVL-Fast] building synthetic model %s (random weights: its text is meaningless)", source.name)
        model, processor, config = synthetic.build_synthetic(source.name, dtype=dtype, device=str(device))
        if hasattr(model, "set_attn_implementation"):
            try:
                model.set_attn_implementation(attention)
            except Exception:
                pass
    else:
        path = source.path if source.kind == "local" else download_model(source.repo_id or source.name)
        _check_folder(path)
        model_type = _check_architecture(path)
        kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=attention, trust_remote_code=False,
                                      use_safetensors=True)
        if quant is not None:
            kwargs["quantization_config"] = quant
            kwargs["device_map"] = {"": device.index or 0}
        try:
            model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        except torch.OutOfMemoryError as exc:
            _release_memory()
            raise QwenVLError(f"Out of memory loading '{options.model}': choose quantization '4-bit' or a smaller "
                              "model.") from exc
        if quant is None:
            model.to(device)
        model.eval()
        config = model.config
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
        if not getattr(processor, "chat_template", None):
            # Some repos keep the template in tokenizer_config.json only; without any, every run would fail.
            tokenizer_template = getattr(getattr(processor, "tokenizer", None), "chat_template", None)
            if not tokenizer_template:
                raise ModelNotFoundError(
                    f"'{path}' has no chat template (chat_template.jinja or chat_template.json): copy it from the "
                    "model repository into the folder."
                )
            processor.chat_template = tokenizer_template
    family = detect_family(config, model_type if source.kind != "synthetic" else None)
    loaded = QwenVLModel(
        options=options, source=source, model=model, processor=processor, config=config, family=family,
        device=device, dtype=dtype, attention=attention, load_seconds=time.perf_counter() - t0,
    )
    if attention == "sdpa" and os.environ.get("QWENVL_FAST_GROUPED_VISION_ATTENTION", "1") != "0":
        # Same arithmetic as transformers' per-window SDPA loop, in a few batched calls (vision_attention.py).
        if vision_attention.enable_grouped_vision_attention(model):
            loaded.vision_attention = "grouped sdpa"
    if options.compile_vision != "off":
        loaded.set_compile(options.compile_vision)
    return loaded


class ModelManager:
    """Keeps one model loaded; a different request releases the previous one first.

    Hooks let a host (ComfyUI, see ``comfy_model_manager.py``) follow the model's life without the
    engine importing it: ``before_load(options)`` to make room, ``on_load(model)`` right after a load,
    ``on_release(model)`` right after a release. A failing hook is logged, never raised.
    """

    def __init__(self) -> None:
        self.current: QwenVLModel | None = None
        self._lock = threading.RLock()
        self.load_count = 0
        self.before_load: list[Callable[[LoadOptions], None]] = []
        self.on_load: list[Callable[[QwenVLModel], None]] = []
        self.on_release: list[Callable[[QwenVLModel], None]] = []

    @staticmethod
    def _call(hooks: list, arg: Any) -> None:
        for hook in list(hooks):
            try:
                hook(arg)
            except Exception:
                log.exception("[QwenVL-Fast] model-manager hook %s failed", getattr(hook, "__name__", hook))

    def get(self, options: LoadOptions) -> tuple[QwenVLModel, bool]:
        """(model, loaded_now)."""
        with self._lock:
            if self.current is not None and self.current.options == options and self.current.usable:
                return self.current, False
            self.release()
            self._call(self.before_load, options)
            model = load_model(options)
            self.current = model
            self.load_count += 1
            self._call(self.on_load, model)
            return model, True

    def release(self, collect_garbage: bool = True) -> None:
        """Drop the current model. ``collect_garbage=False`` from inside a host's callback (no ``gc`` there)."""
        with self._lock:
            model, self.current = self.current, None
            if model is not None:
                model.close()
                self._call(self.on_release, model)
                del model
            if collect_garbage:
                _release_memory()
            elif torch.cuda.is_available():
                torch.cuda.empty_cache()


MANAGER = ModelManager()
_CACHES: dict[tuple, EmbeddingCache] = {}


def get_cache(use_disk: bool = True) -> EmbeddingCache:
    """The process-wide embedding cache (one per disk setting and folder)."""
    disk_dir = os.environ.get("QWENVL_FAST_CACHE_DIR", "")
    key = (use_disk, disk_dir)
    if key not in _CACHES:
        mem = int(os.environ.get("QWENVL_FAST_CACHE_MEMORY_MB", "1024")) << 20
        disk = int(os.environ.get("QWENVL_FAST_CACHE_DISK_MB", "4096")) << 20
        _CACHES[key] = EmbeddingCache(memory_bytes=mem, disk_bytes=disk, use_disk=use_disk)
    return _CACHES[key]


def clear_memory_caches() -> None:
    for cache in _CACHES.values():
        cache.clear(memory=True)


MANAGER.on_release.append(lambda _model: clear_memory_caches())

# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def split_image_batch(image: torch.Tensor | None) -> list[torch.Tensor]:
    """ComfyUI IMAGE ``[B,H,W,C]`` (or a single ``[H,W,C]``) into a list of ``[H,W,C]`` tensors."""
    if image is None:
        return []
    if not isinstance(image, torch.Tensor):
        raise QwenVLError(f"image must be a ComfyUI IMAGE tensor, got {type(image).__name__}")
    if image.dim() == 3:
        return [image]
    if image.dim() == 4:
        return list(image.unbind(0))
    if image.dim() == 5:
        raise QwenVLError(
            f"Got a 5-D tensor {tuple(image.shape)} (a video or a batch of batches) where an IMAGE [B,H,W,C] is "
            "expected: flatten it to frames first (e.g. with a batch/list node)."
        )
    raise QwenVLError(f"image has shape {tuple(image.shape)}; expected [B,H,W,C].")


def canonicalize_image(image: torch.Tensor) -> torch.Tensor:
    """Any reasonable image tensor to uint8 RGB HWC on the CPU.

    1 channel: grey; 2: grey + alpha; 3: RGB; 4: RGBA. Alpha is composited onto white.
    Float values are clamped to [0, 1]; NaN/inf are an error (they mean a broken upstream node).
    A channels-first image (C in (1,3,4) first and not last) is transposed.
    """
    img = image.detach()
    if img.dim() != 3:
        raise QwenVLError(f"Each image must be [H,W,C]; got shape {tuple(img.shape)}.")
    if img.shape[-1] not in (1, 2, 3, 4) and img.shape[0] in (1, 2, 3, 4):
        img = img.permute(1, 2, 0)
    h, w, c = img.shape
    if h == 0 or w == 0:
        raise QwenVLError("Got an empty image (0 pixels); check the image loader upstream.")
    if c not in (1, 2, 3, 4):
        raise QwenVLError(f"Image has {c} channels; expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA).")
    img = img.to("cpu")
    if img.dtype == torch.uint8:
        f = img.float() / 255.0
    elif img.dtype.is_floating_point:
        f = img.float()
        if not torch.isfinite(f).all():
            raise QwenVLError("The image holds NaN or infinite values; the node upstream produced a broken image.")
        f = f.clamp(0.0, 1.0)
    elif img.dtype in (torch.int16, torch.int32, torch.int64, torch.uint16 if hasattr(torch, "uint16") else None):
        f = img.float().clamp(0, 255) / 255.0
    else:
        raise QwenVLError(f"Unsupported image dtype {img.dtype}.")
    if c == 1:
        rgb = f.expand(h, w, 3)
    elif c == 2:
        alpha = f[..., 1:2]
        rgb = (f[..., :1] * alpha + (1.0 - alpha)).expand(h, w, 3)
    elif c == 4:
        alpha = f[..., 3:4]
        rgb = f[..., :3] * alpha + (1.0 - alpha)
    else:
        rgb = f
    if img.dtype == torch.uint8 and c == 3:
        out = img.contiguous()
    else:
        out = (rgb * 255.0).round_().clamp_(0, 255).to(torch.uint8).contiguous()
    return qp.pad_to_max_aspect(out, fill=255)


@dataclass
class PreparedImage:
    index: int
    digest: str
    size_in: tuple[int, int]
    budget: qp.Budget
    size: tuple[int, int]
    grid: tuple[int, int, int]
    key: str
    canonical: torch.Tensor | None = None
    embedding: ImageEmbedding | None = None
    tier: str = "off"

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    prompt: str
    images: list[torch.Tensor] = field(default_factory=list)
    system_prompt: str = ""
    image_quality: str = qp.DEFAULT_QUALITY
    enable_image_cache: bool = True
    disk_cache: bool = True
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int = 0
    batch_mode: str = BATCH_MODES[0]
    preprocess: str = "fast"
    monitor: bool = True
    should_stop: Callable[[], bool] | None = None
    on_progress: Callable[[int, int], None] | None = None
    on_text: Callable[[str], None] | None = None


@dataclass
class GenerationResult:
    texts: list[str]
    thinking: list[str]
    record: RunRecord
    token_ids: list[list[int]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n\n".join(self.texts)


STREAM_EVERY_TOKENS = 8  # partial text sent to the UI this often: decoding every token would cost more
_THINK_END = "</think>"
_THINK_START = "<think>"


def split_thinking(raw: str) -> tuple[str, str]:
    """(answer, reasoning). Thinking models open with <think> (often in the template) and close with </think>."""
    if _THINK_END in raw:
        reasoning, _, answer = raw.partition(_THINK_END)
        return answer.strip(), reasoning.replace(_THINK_START, "").strip()
    if raw.lstrip().startswith(_THINK_START):
        # Cut off while still reasoning: there is no answer yet.
        return "", raw.replace(_THINK_START, "").strip()
    return raw.strip(), ""


def _check_stop(req: GenerationRequest, rec: RunRecord) -> None:
    if req.should_stop is not None and req.should_stop():
        rec.interrupted = True
        raise GenerationInterrupted("Generation was interrupted.")


class _StopFlag:
    """A stopping criterion that polls the caller's interrupt flag once per generated token."""

    def __init__(self, should_stop: Callable[[], bool] | None) -> None:
        self.should_stop = should_stop
        self.stopped = False

    def __call__(self, input_ids, scores, **kwargs):
        stop = bool(self.should_stop and self.should_stop())
        self.stopped = self.stopped or stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class QwenVLModel:
    """A loaded model with its processor and the inference engine."""

    def __init__(self, *, options: LoadOptions, source: ModelSource, model, processor, config, family: FamilyInfo,
                 device: torch.device, dtype: torch.dtype, attention: str, load_seconds: float) -> None:
        self.options = options
        self.source = source
        self.model = model
        self.processor = processor
        self.config = config
        self.family = family
        self.device = device
        self.dtype = dtype
        self.attention = attention
        self.load_seconds = load_seconds
        self.fingerprint = model_fingerprint(source, config)
        self.use_mm_encoder_outputs = _supports_mm_encoder_outputs(model)
        # Read once: these describe the model class, and build_inputs runs on every generation.
        self._takes_mm_token_type_ids = "mm_token_type_ids" in inspect.signature(model.forward).parameters
        self._deepstack_output_cls = getattr(inspect.getmodule(type(model.model)),
                                             "BaseModelOutputWithDeepstackFeatures", None)
        self.compile_report = None
        self.vision_attention = attention
        self.usable = True
        self._lock = threading.Lock()
        self.vision_calls = 0
        ip = processor.image_processor
        self.image_mean = tuple(float(v) for v in ip.image_mean)
        self.image_std = tuple(float(v) for v in ip.image_std)
        size = getattr(ip, "size", None) or {}
        lo = size.get("shortest_edge") or getattr(ip, "min_pixels", None)
        hi = size.get("longest_edge") or getattr(ip, "max_pixels", None)
        self.native_limits = (int(lo), int(hi)) if lo and hi else None
        self.tokenizer = processor.tokenizer
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.image_token_id = int(config.image_token_id)
        self._reserved = [t for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
                                      "<|im_start|>", "<|im_end|>", "<|endoftext|>", self.image_token) if t]
        text_cfg = getattr(config, "text_config", config)
        self.context_length = int(getattr(text_cfg, "max_position_embeddings", 32768))

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self.usable = False
        model = self.model
        self.model = None
        if model is not None:
            try:
                if self.options.quantization == "none" and self.device.type != "cpu":
                    model.to("cpu")  # drops the device copies at once, even if a reference lingers
            except Exception:
                pass
            del model

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def visual(self):
        return self.model.model.visual

    def set_compile(self, setting: str) -> None:
        if __package__:
            from .vision_compile import compile_vision_tower
        else:
            from vision_compile import compile_vision_tower
        self.compile_report = compile_vision_tower(self.model, setting, device=self.device)

    # -- images ----------------------------------------------------------------------------
    def _prepare(self, images: list[torch.Tensor], req: GenerationRequest, cache: EmbeddingCache | None,
                 mon: RunMonitor) -> list[PreparedImage]:
        prepared: list[PreparedImage] = []
        quality = qp.validate_quality(req.image_quality)
        factor = self.family.factor
        patch = self.family.patch_size
        with mon.stage("hash"):
            for i, image in enumerate(images):
                memo = cache.digests.get(image) if cache is not None else None
                canonical = None
                if memo is None or quality == qp.AUTO:
                    canonical = canonicalize_image(image)
                    digest = canonical_digest(canonical) if cache is not None else ""
                    memo = (digest, (int(canonical.shape[0]), int(canonical.shape[1])))
                    if cache is not None:
                        cache.digests.put(image, memo)
                digest, size_in = memo
                budget = qp.resolve_budget(quality, factor, self.native_limits, canonical)
                size = qp.target_size(size_in[0], size_in[1], factor, budget)
                grid = (1, size[0] // patch, size[1] // patch)
                key = entry_key(digest, self.fingerprint, self.dtype, size, (self.image_mean, self.image_std))
                item = PreparedImage(i, digest, size_in, budget, size, grid, key, canonical)
                if cache is not None:
                    item.embedding, item.tier = cache.get(key, self.device)
                prepared.append(item)
        return prepared

    def _pixel_values(self, misses: list[PreparedImage], req: GenerationRequest, mon: RunMonitor):
        """pixel_values and grid for the images to encode: tensor-native on the device, or the processor."""
        if req.preprocess == "reference":
            from PIL import Image

            with mon.stage("preprocess"):
                pils = [Image.fromarray(m.canonical.numpy()) for m in misses]
                ip = self.processor.image_processor
                pix, grids = [], []
                for m, pil in zip(misses, pils):
                    limits: dict[str, Any] = {"size": {"shortest_edge": m.budget.min_pixels,
                                                       "longest_edge": m.budget.max_pixels}}
                    if _TRANSFORMERS_MAJOR < 5:  # 4.x reads min_pixels/max_pixels from the call
                        limits = {"min_pixels": m.budget.min_pixels, "max_pixels": m.budget.max_pixels}
                    out = ip(images=[pil], return_tensors="pt", **limits)
                    pix.append(out["pixel_values"])
                    grids.append(out["image_grid_thw"])
                pixel_values = torch.cat(pix)
                grid = torch.cat(grids)
            with mon.stage("transfer"):
                pixel_values = pixel_values.to(self.device, self.visual_dtype)
            return pixel_values, grid
        with mon.stage("transfer"):
            uploaded = fast_preprocess.upload([m.canonical for m in misses], self.device)
        with mon.stage("preprocess"):
            pixel_values, grid = fast_preprocess.preprocess_images(
                uploaded, [m.size for m in misses], patch_size=self.family.patch_size,
                merge_size=self.family.merge_size, temporal_patch_size=self.family.temporal_patch_size,
                image_mean=self.image_mean, image_std=self.image_std, device=self.device, dtype=self.visual_dtype,
            )
        return pixel_values, grid

    @property
    def visual_dtype(self) -> torch.dtype:
        try:
            return next(self.visual.parameters()).dtype
        except StopIteration:  # pragma: no cover
            return self.dtype

    def encode(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> list[ImageEmbedding]:
        """Run the vision tower once over all images; split its output per image."""
        self.vision_calls += 1
        grid_host = grid.to("cpu")
        out = self.visual(pixel_values, grid_thw=grid.to(self.device))
        embeds, deepstack = _vision_outputs(out)
        merge2 = self.family.merge_size ** 2
        sizes = [int(t * h * w) // merge2 for t, h, w in grid_host.tolist()]
        per_embeds = torch.split(embeds, sizes)
        per_deep = [torch.split(level, sizes) for level in deepstack]
        result = []
        for i, (t, h, w) in enumerate(grid_host.tolist()):
            result.append(ImageEmbedding(per_embeds[i], [lvl[i] for lvl in per_deep], (int(t), int(h), int(w))))
        return result

    # -- prompt ----------------------------------------------------------------------------
    def _clean_user_text(self, text: str) -> str:
        cleaned, previous = text, None
        while cleaned != previous:  # until stable: removing one token must not join the pieces of another
            previous = cleaned
            for tok in self._reserved:
                cleaned = cleaned.replace(tok, "")
        if cleaned != text:
            log.warning("[QwenVL-Fast] removed chat-template control tokens from the prompt text")
        return cleaned

    def build_inputs(self, prompt: str, system_prompt: str, images: list[PreparedImage]) -> dict[str, torch.Tensor]:
        content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": self._clean_user_text(prompt)})
        messages: list[dict[str, Any]] = []
        if system_prompt.strip():
            messages.append({"role": "system", "content": [{"type": "text",
                                                             "text": self._clean_user_text(system_prompt)}]})
        messages.append({"role": "user", "content": content})
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        merge2 = self.family.merge_size ** 2
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise QwenVLError(f"The chat template produced {len(pieces) - 1} image slots for {len(images)} images.")
        out = pieces[0]
        for img, piece in zip(images, pieces[1:]):
            out += self.image_token * (img.tokens // merge2) + piece
        enc = self.tokenizer(out, return_tensors="pt", add_special_tokens=False)
        ids = enc["input_ids"]
        inputs = {"input_ids": ids, "attention_mask": enc["attention_mask"]}
        if self._takes_mm_token_type_ids:
            inputs["mm_token_type_ids"] = (ids == self.image_token_id).to(torch.int32)
        if images:
            inputs["image_grid_thw"] = torch.tensor([img.grid for img in images], dtype=torch.long)
        return inputs

    def _encoder_outputs(self, embeddings: list[ImageEmbedding]):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        deep_cls = self._deepstack_output_cls
        pooled = tuple(e.embeds for e in embeddings)
        if self.family.deepstack_levels and deep_cls is not None:
            levels = [tuple(e.deepstack[i] for e in embeddings) for i in range(self.family.deepstack_levels)]
            return deep_cls(pooler_output=pooled, deepstack_features=levels)
        return BaseModelOutputWithPooling(pooler_output=pooled)

    def _legacy_features(self, embeddings: list[ImageEmbedding]):
        """What ``get_image_features`` returns in transformers < 5.18, rebuilt from cached parts."""
        import transformers

        pooled = tuple(e.embeds for e in embeddings)
        deep = [torch.cat([e.deepstack[i] for e in embeddings]) for i in range(self.family.deepstack_levels)]
        major = int(transformers.__version__.split(".")[0])
        if major < 5:
            return (pooled, deep) if self.family.deepstack_levels else pooled
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        deep_cls = self._deepstack_output_cls
        if self.family.deepstack_levels and deep_cls is not None:
            return deep_cls(pooler_output=pooled, deepstack_features=deep)
        return BaseModelOutputWithPooling(pooler_output=pooled)

    # -- run -------------------------------------------------------------------------------
    def run(self, req: GenerationRequest) -> GenerationResult:
        if not self.usable or self.model is None:
            raise QwenVLError("This model was unloaded; run the loader again.")
        with self._lock:
            return self._run(req)

    def _run(self, req: GenerationRequest) -> GenerationResult:
        mon = RunMonitor(enabled=req.monitor, device=self.device)
        rec = mon.record
        rec.model = self.options.model
        rec.family = self.family.name
        rec.device = str(self.device)
        rec.dtype = str(self.dtype).replace("torch.", "")
        rec.quantization = self.options.quantization
        rec.attention = self.attention
        rec.vision_attention = self.vision_attention
        rec.quality = qp.validate_quality(req.image_quality)
        if self.compile_report is not None:
            rec.compile = "on" if self.compile_report.enabled else f"off ({self.compile_report.reason})"
            rec.compile_warmup_s = getattr(self.compile_report, "warmup_s", None)
        if req.batch_mode not in BATCH_MODES:
            raise QwenVLError(f"Unknown batch_mode '{req.batch_mode}': choose one of {BATCH_MODES}.")
        cache = get_cache(req.disk_cache) if req.enable_image_cache else None

        try:
            prepared = self._prepare(req.images, req, cache, mon)
            misses = [p for p in prepared if p.embedding is None]
            if misses:
                for m in misses:
                    if m.canonical is None:
                        m.canonical = canonicalize_image(req.images[m.index])
                _check_stop(req, rec)  # before the vision tower: an interrupt must not cost a whole encode
                pixel_values, grid = self._pixel_values(misses, req, mon)
                with mon.stage("encode"), torch.inference_mode():
                    t0 = time.perf_counter()
                    encoded = self.encode(pixel_values, grid)
                    if self.compile_report is not None and hasattr(self.compile_report, "note_call"):
                        self.compile_report.note_call(time.perf_counter() - t0)
                del pixel_values
                for m, emb in zip(misses, encoded):
                    if emb.grid != m.grid:
                        raise QwenVLError(f"internal: grid {emb.grid} != predicted {m.grid}")
                    m.embedding = emb
                    m.tier = "miss" if cache is not None else "off"
                    m.canonical = None
                if cache is not None:
                    with mon.stage("cache"):
                        for m in misses:
                            cache.put(m.key, m.embedding)
            for p in prepared:
                rec.images.append({
                    "index": p.index, "size_in": list(p.size_in), "size_resized": list(p.size),
                    "tokens": p.tokens // self.family.merge_size ** 2, "preset": p.budget.label,
                    "detail_score": p.budget.detail_score, "cache": p.tier,
                })

            if req.batch_mode == BATCH_MODES[1] and len(prepared) > 1:
                groups = [[p] for p in prepared]
            else:
                groups = [prepared]
            texts, thoughts, token_ids = [], [], []
            for n, group in enumerate(groups):
                _check_stop(req, rec)  # before each prefill
                raw, ids = self._generate(req, group, mon, part=(n, len(groups)))
                token_ids.append(ids)
                answer, thinking = split_thinking(raw)
                texts.append(answer)
                thoughts.append(thinking)
        except torch.OutOfMemoryError as exc:
            _release_memory()
            raise QwenVLError(
                "Out of memory. Use a cheaper image_quality ('balanced' or 'fast'), fewer images per prompt, "
                "fewer max_new_tokens, or quantization '4-bit'."
            ) from exc
        mon.finish()
        if cache is not None:  # after finish: these statistics are bookkeeping, not part of the run's time
            rec.cache_stats = cache.info()
        return GenerationResult(texts, thoughts, rec, token_ids)

    def _generate(self, req: GenerationRequest, group: list[PreparedImage], mon: RunMonitor,
                  part: tuple[int, int]) -> tuple[str, list[int]]:
        rec = mon.record
        with mon.stage("prompt"):
            inputs = self.build_inputs(req.prompt, req.system_prompt, group)
        prompt_len = int(inputs["input_ids"].shape[1])
        rec.prompt_tokens += prompt_len
        max_new = int(req.max_new_tokens)
        if max_new <= 0:
            return "", []
        if prompt_len >= self.context_length:
            raise QwenVLError(
                f"The prompt is {prompt_len} tokens but the model's context is {self.context_length}: shorten the "
                "prompt, use fewer images or a cheaper image_quality."
            )
        if prompt_len + max_new > self.context_length:
            max_new = self.context_length - prompt_len
            log.warning("[QwenVL-Fast] max_new_tokens reduced to %d to fit the model's context", max_new)
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        embeddings = [g.embedding for g in group]
        gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new, min_new_tokens=min(req.min_new_tokens, max_new))
        temperature = float(req.temperature)
        do_sample = bool(req.do_sample) and temperature > 0
        if do_sample:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=min(max(float(req.top_p), 1e-6), 1.0),
                              top_k=max(int(req.top_k), 0))
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if req.repetition_penalty and float(req.repetition_penalty) != 1.0:
            gen_kwargs["repetition_penalty"] = max(float(req.repetition_penalty), 1e-3)
        seed = int(req.seed) % (2**63)
        torch.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(seed)

        stop = _StopFlag(req.should_stop)
        from transformers import StoppingCriteriaList

        done_tokens = [0]
        base = part[0] * max_new
        total = part[1] * max_new

        streamed: list[int] = []

        def on_token(value) -> None:
            done_tokens[0] += 1
            if req.on_progress is not None:
                req.on_progress(base + done_tokens[0], total)
            if req.on_text is not None:
                streamed.extend(int(v) for v in value.reshape(-1).tolist())  # a host tensor: no device sync
                if done_tokens[0] % STREAM_EVERY_TOKENS == 0:
                    req.on_text(self.tokenizer.decode(streamed, skip_special_tokens=True))

        timer = TokenTimer(on_token=on_token)
        restore = None
        if embeddings:
            if self.use_mm_encoder_outputs:
                gen_kwargs["mm_encoder_outputs"] = {"image": self._encoder_outputs(embeddings)}
            else:
                restore = self._install_feature_override(embeddings, gen_kwargs)
        pad_id = self.tokenizer.pad_token_id
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs, **gen_kwargs, stopping_criteria=StoppingCriteriaList([stop]), streamer=timer,
                    pad_token_id=pad_id if pad_id is not None else self.tokenizer.eos_token_id,
                )
        finally:
            timer.end()
            if restore is not None:
                restore()
        mon.add("prefill", timer.prefill_s)
        mon.add("decode", timer.decode_s)
        new_ids = output[0, prompt_len:]
        rec.new_tokens += int(new_ids.numel())
        if stop.stopped:
            rec.interrupted = True
            raise GenerationInterrupted("Generation was interrupted.")
        raw = self.tokenizer.decode(new_ids, skip_special_tokens=False)
        for tok in self.tokenizer.all_special_tokens:
            if tok not in (_THINK_START, _THINK_END):
                raw = raw.replace(tok, "")
        if req.on_text is not None:
            req.on_text(raw)
        return raw, new_ids.tolist()

    def _install_feature_override(self, embeddings: list[ImageEmbedding], gen_kwargs: dict[str, Any]):
        """transformers < 5.18: answer ``get_image_features`` from our embeddings for this call only."""
        inner = self.model.model
        features = self._legacy_features(embeddings)
        had_attr = "get_image_features" in inner.__dict__
        previous = inner.__dict__.get("get_image_features")

        def cached_features(*args, **kwargs):
            return features

        inner.get_image_features = cached_features
        # The model only looks for image features when pixel_values is given: pass an empty placeholder.
        flat = 3 * self.family.temporal_patch_size * self.family.patch_size ** 2
        gen_kwargs["pixel_values"] = torch.empty((0, flat), dtype=self.visual_dtype, device=self.device)

        def restore() -> None:
            if had_attr:
                inner.get_image_features = previous
            else:
                del inner.get_image_features

        return restore


def _vision_outputs(out) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Merged embeddings and deepstack levels from any transformers version's vision tower output."""
    if isinstance(out, torch.Tensor):
        return out, []
    if isinstance(out, tuple) and not hasattr(out, "pooler_output"):
        embeds, deep = out[0], (out[1] if len(out) > 1 else [])
        return embeds, list(deep or [])
    embeds = getattr(out, "pooler_output", None)
    if embeds is None:
        embeds = out.last_hidden_state
    return embeds, list(getattr(out, "deepstack_features", None) or [])


def run_once(options: LoadOptions, request: GenerationRequest, keep_model_loaded: bool = True,
             manager: ModelManager | None = None) -> GenerationResult:
    """Load (or reuse) a model, run one request, report timings and tips; release if asked."""
    manager = manager or MANAGER
    t0 = time.perf_counter()
    model, loaded_now = manager.get(options)
    load_s = time.perf_counter() - t0
    try:
        result = model.run(request)
    except GenerationInterrupted:
        if not keep_model_loaded:
            manager.release()
        raise
    except Exception:
        if not keep_model_loaded:
            manager.release()
        raise
    rec = result.record
    rec.model_loaded_this_run = loaded_now
    rec.keep_model_loaded = keep_model_loaded
    if loaded_now and request.monitor:
        rec.stages = {"load": load_s, **rec.stages}
        rec.total_s += load_s
    TIPS.observe(rec, request.enable_image_cache)
    gpu_total = None
    if model.device.type == "cuda":
        gpu_total = torch.cuda.get_device_properties(model.device).total_memory
    ctx = TIPS.context(
        rec,
        compile_requested=options.compile_vision == "on",
        compile_unavailable_reason=(model.compile_report.reason if model.compile_report is not None
                                    and not model.compile_report.enabled else None),
        gpu_total_bytes=gpu_total,
        model_bf16_bytes=_bf16_bytes(model) if options.quantization != "none" else None,
        expected_decode_tokens_per_s=_expected_decode_tokens_per_s(model),
    )
    rec.tips = TIPS.tips(ctx)
    if request.monitor:
        report(rec)
    if not keep_model_loaded:
        manager.release()
    return result


def _expected_decode_tokens_per_s(model: QwenVLModel) -> float | None:
    """Memory-bound decode estimate: GPU memory bandwidth / bytes of weights read per token."""
    if model.device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(model.device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    bandwidth = clock_khz * 1000 * 2 * bus_bits / 8  # double data rate
    weights = model.param_bytes()
    return bandwidth / weights if weights else None


def _bf16_bytes(model: QwenVLModel) -> int:
    return sum(p.numel() for p in model.model.parameters()) * 2


def synthetic_choices() -> list[str]:
    return [f"synthetic:{name}" for name in synthetic.SYNTHETIC_PRESETS]


__all__ = [
    "BATCH_MODES", "GenerationInterrupted", "GenerationRequest", "GenerationResult", "LoadOptions", "MANAGER",
    "ModelManager", "ModelNotFoundError", "QwenVLError", "QwenVLModel", "canonicalize_image", "detect_family",
    "get_cache", "load_model", "model_choices", "resolve_model", "run_once", "split_image_batch", "split_thinking",
]
