"""ComfyUI nodes of Qwen-VL Fast: thin adapters over ``qwenvl_loader``.

Everything ComfyUI-specific lives here: the model folder registration, the model manager
hook (so "Unload models" and ``POST /free`` release the model), interrupt polling, the
progress bar and the V1 node classes. The engine itself never imports ComfyUI.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from . import comfy_model_manager
from . import quality_presets as qp
from . import qwenvl_loader as ql
from .embedding_cache import CACHE_DIR_ENV

log = logging.getLogger("QwenVL-Fast")

CATEGORY = "Qwen-VL Fast"
MODEL_TYPE = "QWENVL_MODEL"
DEFAULT_COMPILE = "off"  # the benchmark decides; see README "Performance"

try:  # ComfyUI's helpers, when running inside it
    import comfy.model_management as mm  # type: ignore[import-not-found]
    import comfy.utils as comfy_utils  # type: ignore[import-not-found]
    import folder_paths  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - exercised in the real-server tests
    mm = None
    comfy_utils = None
    folder_paths = None


def _register_model_folder() -> None:
    """models/LLM (and anything extra_model_paths.yaml added under the LLM key)."""
    if folder_paths is None:
        return
    default = os.path.join(folder_paths.models_dir, "LLM")
    registered = folder_paths.folder_names_and_paths.get("LLM")
    if registered is None or default not in registered[0]:
        folder_paths.add_model_folder_path("LLM", default)


_register_model_folder()

# ComfyUI model management: "Unload models", POST /free and VRAM pressure release the model
# (design and reasons in comfy_model_manager.py).
if mm is not None:
    try:
        from comfy.model_patcher import ModelPatcher  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - every ComfyUI since 2023 has it
        ModelPatcher = None
    comfy_model_manager.install(ql.MANAGER, mm, ModelPatcher)

# ---------------------------------------------------------------------------------------------
# Shared run logic
# ---------------------------------------------------------------------------------------------


def _device_choice(device: str) -> str:
    if device == "auto" and mm is not None:
        return str(mm.get_torch_device())
    return device


def _interrupted() -> bool:
    return bool(mm is not None and mm.processing_interrupted())


def _raise_comfyui_interrupt() -> None:
    """Turn the engine's interruption into ComfyUI's own, so the run ends as interrupted, not failed."""
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def _progress_callbacks(unique_id: str | None):
    bar = comfy_utils.ProgressBar(1) if comfy_utils is not None else None
    server = None
    try:
        from server import PromptServer  # type: ignore[import-not-found]

        server = PromptServer.instance
    except Exception:
        pass
    send_text = getattr(server, "send_progress_text", None) if server is not None else None

    def on_progress(step: int, total: int) -> None:
        if bar is not None:
            bar.update_absolute(step, total)  # also raises if the user pressed Cancel

    def on_text(text: str) -> None:
        if send_text is not None and unique_id is not None:
            try:
                send_text(text, unique_id)
            except Exception:
                pass

    return on_progress, on_text


def run_generation(
    options: ql.LoadOptions, *, image: torch.Tensor | None, prompt: str, system_prompt: str, image_quality: str,
    enable_image_cache: bool, keep_model_loaded: bool, max_new_tokens: int, do_sample: bool, temperature: float,
    top_p: float, top_k: int, repetition_penalty: float, seed: int, batch_mode: str, unique_id: str | None = None,
) -> dict[str, Any]:
    on_progress, on_text = _progress_callbacks(unique_id)
    request = ql.GenerationRequest(
        prompt=prompt, images=ql.split_image_batch(image), system_prompt=system_prompt,
        image_quality=qp.validate_quality(image_quality), enable_image_cache=enable_image_cache,
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, seed=seed, batch_mode=batch_mode,
        should_stop=_interrupted, on_progress=on_progress, on_text=on_text,
    )
    if image is not None and not request.images:
        raise ql.QwenVLError("The image input is an empty batch: connect at least one image, or disconnect it.")
    try:
        result = ql.run_once(options, request, keep_model_loaded=keep_model_loaded, manager=ql.MANAGER)
    except ql.GenerationInterrupted:
        _raise_comfyui_interrupt()
        raise
    timing = result.record.to_json()
    return {
        "ui": {"text": list(result.texts), "timing": [timing]},
        "result": (list(result.texts), list(result.thinking), timing),
    }


def _tip(text: str) -> dict[str, str]:
    return {"tooltip": text}


def _generation_inputs() -> dict[str, tuple]:
    return {
        "prompt": ("STRING", {"multiline": True, "default": "Describe this image in detail.",
                              **_tip("What to ask. Text-only prompts work without an image.")}),
        "system_prompt": ("STRING", {"multiline": True, "default": "",
                                     **_tip("Optional system message; empty uses the model's default.")}),
        "image_quality": (qp.QUALITY_CHOICES, {"default": qp.DEFAULT_QUALITY, **_tip(
            "Visual-token budget per image: fast 128-256, balanced 256-512, high 256-768, ultra 256-1024 tokens; "
            "auto picks per image from its detail; native uses the model's own limits.")}),
        "enable_image_cache": ("BOOLEAN", {"default": True, **_tip(
            "Reuse the vision encoder's output for an image seen before (memory and disk).")}),
        "max_new_tokens": ("INT", {"default": 256, "min": 1, "max": 32768, **_tip("Most tokens to generate.")}),
        "do_sample": ("BOOLEAN", {"default": False, **_tip(
            "Off: greedy, deterministic. On: sampling with temperature/top_p/top_k; "
            "the same seed gives the same text.")}),
        "temperature": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 2.0, "step": 0.05,
                                  **_tip("Sampling temperature (0 means greedy).")}),
        "top_p": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1.0, "step": 0.01, **_tip("Nucleus sampling mass.")}),
        "top_k": ("INT", {"default": 50, "min": 0, "max": 1000,
                          **_tip("Sample among the k likeliest tokens (0: all).")}),
        "repetition_penalty": ("FLOAT", {"default": 1.0, "min": 0.5, "max": 2.0, "step": 0.01,
                                         **_tip("Above 1 discourages repeating tokens.")}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, **_tip("Seed for sampling.")}),
        "batch_mode": (ql.BATCH_MODES, {"default": ql.BATCH_MODES[0], **_tip(
            "With several images: one prompt that sees all of them, or one answer per image (a list).")}),
    }


def _loader_inputs() -> dict[str, tuple]:
    choices = ql.model_choices()
    return {
        "model": (choices, {"default": choices[0] if choices else "", **_tip(
            "A folder under models/LLM, or a Qwen repo (downloaded once into models/LLM/<name>).")}),
        "quantization": (ql.QUANTIZATION_CHOICES, {"default": "none", **_tip(
            "8-bit or 4-bit through bitsandbytes (CUDA only) to save VRAM; slower than bf16 when the model fits.")}),
        "attention_mode": (ql.ATTENTION_CHOICES, {"default": "auto", **_tip(
            "auto uses flash-attn when installed and usable, else PyTorch SDPA.")}),
    }


def _loader_extras() -> dict[str, tuple]:
    return {
        "dtype": (ql.DTYPE_CHOICES, {"default": "auto", **_tip("auto: bf16 on GPUs that support it, fp16 on older "
                                                               "GPUs, fp32 on CPU.")}),
        "device": (ql.DEVICE_CHOICES, {"default": "auto", **_tip("auto: ComfyUI's device.")}),
        "compile_vision": (ql.COMPILE_CHOICES, {"default": DEFAULT_COMPILE, **_tip(
            "torch.compile the vision encoder (regional, dynamic shapes). auto: on for CUDA with a working "
            "compiler.")}),
    }


def _options(model: str, quantization: str, attention_mode: str, dtype: str = "auto", device: str = "auto",
             compile_vision: str = DEFAULT_COMPILE) -> ql.LoadOptions:
    return ql.LoadOptions(model=model, quantization=quantization, attention_mode=attention_mode, dtype=dtype,
                          device=_device_choice(device), compile_vision=compile_vision, allow_absolute_path=False)


# ---------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------


class _AnswerNode:
    """What the Run and Generate nodes share: their outputs, shown on the node and kept in /history."""

    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "STRING")
    RETURN_NAMES = ("text", "thinking", "timing")
    OUTPUT_IS_LIST = (True, True, False)


class QwenVLFastRun(_AnswerNode):
    DESCRIPTION = "Load a Qwen-VL model (kept between runs) and answer a prompt about the connected image(s)."
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_loader_inputs(),
                **_generation_inputs(),
                "keep_model_loaded": ("BOOLEAN", {"default": True, **_tip(
                    "Keep the model in memory for the next run; off releases it after this run.")}),
            },
            "optional": {
                "image": ("IMAGE", {**_tip("One image, or a batch: several images in one prompt.")}),
                **_loader_extras(),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def run(self, model, quantization, attention_mode, prompt, system_prompt, image_quality, enable_image_cache,
            max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, seed, batch_mode,
            keep_model_loaded, image=None, dtype="auto", device="auto", compile_vision=DEFAULT_COMPILE,
            unique_id=None):
        options = _options(model, quantization, attention_mode, dtype, device, compile_vision)
        return run_generation(
            options, image=image, prompt=prompt, system_prompt=system_prompt, image_quality=image_quality,
            enable_image_cache=enable_image_cache, keep_model_loaded=keep_model_loaded,
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed, batch_mode=batch_mode, unique_id=unique_id,
        )


class QwenVLHandle:
    """What flows on a QWENVL_MODEL link: the load options; the manager holds the weights."""

    def __init__(self, options: ql.LoadOptions, keep_model_loaded: bool = True) -> None:
        self.options = options
        self.keep_model_loaded = keep_model_loaded

    def __repr__(self) -> str:
        return f"QwenVLHandle({self.options.model})"


class QwenVLFastLoadModel:
    DESCRIPTION = "Load a Qwen-VL model once and share it between several Generate nodes."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("qwenvl_model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_loader_inputs(),
                **_loader_extras(),
                "keep_model_loaded": ("BOOLEAN", {"default": True, **_tip(
                    "Keep the model in memory after each Generate; off releases it after every run.")}),
            },
        }

    def load(self, model, quantization, attention_mode, dtype, device, compile_vision, keep_model_loaded):
        options = _options(model, quantization, attention_mode, dtype, device, compile_vision)
        ql.MANAGER.get(options)  # load now, so that a broken model fails at this node
        return (QwenVLHandle(options, keep_model_loaded),)


class QwenVLFastGenerate(_AnswerNode):
    DESCRIPTION = "Answer a prompt about the connected image(s) with a model from Load Model."
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"qwenvl_model": (MODEL_TYPE, _tip("From Qwen-VL Fast Load Model.")), **_generation_inputs()},
            "optional": {"image": ("IMAGE", _tip("One image, or a batch: several images in one prompt."))},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def generate(self, qwenvl_model, prompt, system_prompt, image_quality, enable_image_cache, max_new_tokens,
                 do_sample, temperature, top_p, top_k, repetition_penalty, seed, batch_mode, image=None,
                 unique_id=None):
        if not isinstance(qwenvl_model, QwenVLHandle):
            raise ql.QwenVLError("qwenvl_model must come from a 'Qwen-VL Fast Load Model' node.")
        return run_generation(
            qwenvl_model.options, image=image, prompt=prompt, system_prompt=system_prompt,
            image_quality=image_quality, enable_image_cache=enable_image_cache,
            keep_model_loaded=qwenvl_model.keep_model_loaded, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed,
            batch_mode=batch_mode, unique_id=unique_id,
        )


class QwenVLFastCacheInfo:
    DESCRIPTION = "Show the image-embedding cache's statistics, and clear it on request."
    CATEGORY = CATEGORY
    FUNCTION = "info"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clear_memory": ("BOOLEAN", {"default": False, **_tip("Empty the in-memory tier.")}),
            "clear_disk": ("BOOLEAN", {"default": False, **_tip(
                f"Delete every entry of the disk tier (folder: ${CACHE_DIR_ENV} or the default).")}),
        }}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # a new NaN each time: ComfyUI compares by identity first, math.nan would match

    def info(self, clear_memory, clear_disk):
        cache = ql.get_cache(True)
        if clear_memory or clear_disk:
            cache.clear(memory=clear_memory, disk=clear_disk)
        text = json.dumps(cache.info(), indent=1)
        return {"ui": {"text": [text]}, "result": (text,)}


class QwenVLFastCaptionFolder:
    DESCRIPTION = ("Caption every image file of a folder, optionally writing a .txt beside each; files that already "
                   "have a .txt are skipped unless overwrite is on.")
    CATEGORY = CATEGORY
    FUNCTION = "caption"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("captions", "files")
    OUTPUT_IS_LIST = (True, True)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "qwenvl_model": (MODEL_TYPE, _tip("From Qwen-VL Fast Load Model.")),
                "folder": ("STRING", {"default": "", **_tip("The folder whose images to caption (not recursive).")}),
                "prompt": ("STRING", {"multiline": True, "default": "Write a concise caption for this image.",
                                      **_tip("The captioning instruction.")}),
                "image_quality": (qp.QUALITY_CHOICES, {"default": qp.DEFAULT_QUALITY,
                                                       **_tip("Visual-token budget per image.")}),
                "max_new_tokens": ("INT", {"default": 128, "min": 1, "max": 4096, **_tip("Most tokens per caption.")}),
                "write_txt": ("BOOLEAN", {"default": True, **_tip("Write <image name>.txt beside each image.")}),
                "overwrite": ("BOOLEAN", {"default": False,
                                          **_tip("Replace existing .txt files (otherwise skipped).")}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, **_tip("Seed (greedy ignores).")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def caption(self, qwenvl_model, folder, prompt, image_quality, max_new_tokens, write_txt, overwrite, seed,
                unique_id=None):
        from .batch_caption import caption_folder  # noqa: PLC0415

        if not isinstance(qwenvl_model, QwenVLHandle):
            raise ql.QwenVLError("qwenvl_model must come from a 'Qwen-VL Fast Load Model' node.")
        model, _ = ql.MANAGER.get(qwenvl_model.options)
        bar = comfy_utils.ProgressBar(1) if comfy_utils is not None else None

        def on_file(done: int, total: int) -> None:
            if bar is not None:
                bar.update_absolute(done, total)

        try:
            results = caption_folder(
                model, Path(folder), prompt=prompt, image_quality=image_quality, max_new_tokens=max_new_tokens,
                write_txt=write_txt, overwrite=overwrite, seed=seed, should_stop=_interrupted, on_file=on_file,
            )
        except ql.GenerationInterrupted:
            _raise_comfyui_interrupt()
            raise
        finally:
            if not qwenvl_model.keep_model_loaded:
                ql.MANAGER.release()
        _raise_comfyui_interrupt()
        captions = [r.caption for r in results]
        files = [str(r.path) for r in results]
        summary = [f"{r.path.name}: {r.status}" for r in results]
        return {"ui": {"text": summary or ["no images found"]}, "result": (captions, files)}


NODE_CLASS_MAPPINGS = {
    "QwenVLFast_Run": QwenVLFastRun,
    "QwenVLFast_LoadModel": QwenVLFastLoadModel,
    "QwenVLFast_Generate": QwenVLFastGenerate,
    "QwenVLFast_CacheInfo": QwenVLFastCacheInfo,
    "QwenVLFast_CaptionFolder": QwenVLFastCaptionFolder,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "QwenVLFast_Run": "Qwen-VL Fast (all-in-one)",
    "QwenVLFast_LoadModel": "Qwen-VL Fast Load Model",
    "QwenVLFast_Generate": "Qwen-VL Fast Generate",
    "QwenVLFast_CacheInfo": "Qwen-VL Fast Cache Info",
    "QwenVLFast_CaptionFolder": "Qwen-VL Fast Caption Folder",
}
