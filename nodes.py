"""ComfyUI nodes of Qwen-VL Fast: node classes only, thin over the engine.

Inputs become one ``LoadOptions`` and one ``GenerationRequest`` and go through ``qwenvl_loader.run_once``
(or the folder captioner, which uses it too). What ties the engine to ComfyUI (model folders, model
manager, interrupt, progress) is in ``comfyui_host/glue.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from . import captioning as cap
from . import quality_presets as qp
from . import qwenvl_loader as ql
from .captioning.progress import bounded_lines, progress_with_eta, shown_name
from .captioning.report import chart_tensor, folder_report
from .comfyui_host import glue as comfy_glue
from .comfyui_host import trust as comfy_trust
from .core.api import BACKENDS, DEFAULT_MAX_FRAMES, DEFAULT_MAX_IN_FLIGHT, DEFAULT_VIDEO_FPS, UPLOAD_FORMATS, VideoClip
from .embedding_cache import CACHE_DIR_ENV, cache_summary_line
from .engine.structured import OUTPUT_FORMATS, TAGS_MAX_CHARS, TAGS_MAX_COUNT
from .vision.video import as_clip

log = logging.getLogger("QwenVL-Fast")

CATEGORY = "Qwen-VL Fast"
MODEL_TYPE = "QWENVL_MODEL"
DEFAULT_COMPILE = "off"  # the benchmark decides; see README "Performance"
LOADER_INPUTS = ("model", "quantization", "attention_mode", "dtype", "device", "compile_vision", "backend",
                 "server_url", "server_model", "server_max_in_flight", "server_upload_format", "compile_decode",
                 "server_timeout_s")

comfy_glue.connect()


def load_options(inputs: dict[str, Any]) -> ql.LoadOptions:
    """The loader inputs of a node as LoadOptions (workflows may only name models inside the LLM folders)."""
    values = comfy_trust.allowed_server({k: inputs[k] for k in LOADER_INPUTS if k in inputs})
    values["device"] = comfy_glue.device_choice(values.get("device", "auto"))
    values.setdefault("compile_vision", DEFAULT_COMPILE)
    return ql.LoadOptions(**values, allow_absolute_path=False)


def run_generation(options: ql.LoadOptions, inputs: dict[str, Any], keep_model_loaded: bool,
                   unique_id: str | None = None) -> dict[str, Any]:
    """One node run: the request from the node's inputs, through the one entry point."""
    on_progress, on_text = comfy_glue.progress_callbacks(unique_id)
    image = inputs.get("image")
    request = ql.GenerationRequest.from_inputs(
        inputs, images=ql.split_image_batch(image), image_quality=qp.validate_quality(inputs["image_quality"]),
        videos=_videos(inputs), should_stop=comfy_glue.interrupted, on_progress=on_progress, on_text=on_text,
    )
    if image is not None and not request.images:
        raise ql.QwenVLError("The image input is an empty batch: connect at least one image, or disconnect it.")
    try:
        result = ql.run_once(options, request, keep_model_loaded=keep_model_loaded, manager=ql.MANAGER)
    except ql.GenerationInterrupted:
        comfy_glue.raise_interrupt()
        raise
    timing = result.record.to_json()
    return {
        # "text" and "timing" as before (/history readers); "summary" and "warnings" for the node's own display
        # (web/js/qwenvl_fast.js), which shows them above the answer and keeps them across reloads.
        "ui": {"text": list(result.texts), "timing": [timing], "summary": [result.record.summary_line()],
               "warnings": result.record.notices()},
        "result": (list(result.texts), list(result.thinking), timing),
    }


def _videos(inputs: dict[str, Any]) -> list[VideoClip]:
    """The frames on ``video`` (IMAGE batch at ``video_fps``) and the VIDEO on ``video_clip`` (its own rate)."""
    fps = float(inputs.get("video_fps", DEFAULT_VIDEO_FPS))
    max_frames = int(inputs.get("max_frames", DEFAULT_MAX_FRAMES))
    clips = [as_clip(inputs.get("video"), fps), as_clip(inputs.get("video_clip"), fps, max_frames)]
    for clip in clips:
        if clip is not None and int(clip.frames.shape[0]) == 0:
            raise ql.QwenVLError("The video input has no frames: connect a clip with at least one frame.")
    return [c for c in clips if c is not None]


def _video_links() -> dict[str, tuple]:
    return {
        "video": ("IMAGE", _tip(
            "Video frames as an IMAGE batch (what video loaders give): one clip through the model's video path, "
            "sampled evenly to max_frames. Not the same as several images.")),
        "video_clip": ("VIDEO", _tip("A VIDEO (ComfyUI's Load Video); its own frame rate is used.")),
    }


def _video_widgets() -> dict[str, tuple]:
    # Optional and last: workflows saved before them load unchanged, with the defaults.
    return {
        "video_fps": ("FLOAT", {"default": DEFAULT_VIDEO_FPS, "min": 0.1, "max": 240.0, "step": 0.01, **_tip(
            "Frame rate of the frames on 'video' (timestamps and time positions follow from it).")}),
        "max_frames": ("INT", {"default": DEFAULT_MAX_FRAMES, "min": 1, "max": 768, **_tip(
            "Most frames sampled from a clip (evenly; rounded down to pairs). The image_quality preset is a budget "
            "for the whole clip, so more frames means smaller frames.")}),
    }


def _tip(text: str) -> dict[str, str]:
    return {"tooltip": text}


# Inputs that the newest ComfyUI frontends fold away as "advanced" (frontend 1.27 ignores the flag and shows them):
# everything but what the compact node has (QwenVLFastAsk.WIDGETS and LINKS) and the structured-output inputs.
# The flag only changes how the input is drawn, never its order or value.
ADVANCED_INPUTS = frozenset({
    "system_prompt", "enable_image_cache", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
    "batch_mode", "quantization", "attention_mode", "dtype", "device", "compile_vision", "compile_decode",
    "backend", "server_url", "server_model", "server_max_in_flight", "server_upload_format", "video_fps",
    "max_frames", "server_timeout_s",
})


def _advanced(inputs: dict[str, tuple]) -> dict[str, tuple]:
    """The same inputs, the rarely-used ones marked ``"advanced": True``."""
    out = {}
    for name, (kind, *rest) in inputs.items():
        options = dict(rest[0]) if rest else {}
        if name in ADVANCED_INPUTS:
            options["advanced"] = True
        out[name] = (kind, options)
    return out


OUTPUT_TIPS = {
    "text": "The answer(s): one per image with batch_mode 'one answer per image', else one.",
    "thinking": "The model's reasoning (thinking models), one per answer; empty for other models.",
    "timing": "The run's timing record as JSON: stages, visual tokens, cache tiers, tok/s, warnings and tips.",
}


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


def _structured_inputs(json_field: bool = False) -> dict[str, tuple]:
    """Structured output (engine/structured.py): optional and LAST in each node, so saved workflows load unchanged."""
    inputs = {
        "output_format": (OUTPUT_FORMATS, {"default": "text", **_tip(
            "text: free text. json: decoding is constrained to JSON valid against json_schema. tags: a comma-"
            f"separated list of at most {TAGS_MAX_COUNT} lowercase tags of at most {TAGS_MAX_CHARS} characters. "
            "Local backend: pip install llguidance.")}),
        "json_schema": ("STRING", {"multiline": True, "default": "", **_tip(
            "A JSON Schema (enum, integer/number minimum/maximum, string maxLength, required... are honoured); "
            "empty means any JSON object. Used with output_format json.")}),
    }
    if json_field:
        inputs["json_field"] = ("STRING", {"default": "", **_tip(
            "With output_format json: write this field of the answer (e.g. caption) as the caption; empty writes "
            "the whole JSON. metadata.jsonl's 'json' column holds the whole object.")})
    return inputs


def _loader_inputs() -> dict[str, tuple]:
    choices = ql.model_choices()
    return {
        "model": (choices, {"default": choices[0] if choices else "", **_tip(
            "A folder under models/LLM, a <folder>/<file>.gguf there (with its mmproj*.gguf beside it; runs through "
            "llama-server), or a Qwen repo (downloaded once into models/LLM/<name>).")}),
        "quantization": (ql.QUANTIZATION_CHOICES, {"default": "none", **_tip(
            "8-bit or 4-bit through bitsandbytes (CUDA only) to save VRAM; slower than bf16 when the model fits.")}),
        "attention_mode": (ql.ATTENTION_CHOICES, {"default": "auto", **_tip(
            "auto uses flash-attn when installed and usable, else PyTorch SDPA.")}),
    }


def _server_inputs() -> dict[str, tuple]:
    return {
        "backend": (BACKENDS, {"default": "local", **_tip(
            "local: this machine runs the model. server: an OpenAI-compatible server (vLLM, SGLang, llama.cpp, "
            "Ollama, LM Studio) answers; presets still shrink the images before upload. API key: the "
            "QWENVL_FAST_API_KEY environment variable, never a widget.")}),
        "server_url": ("STRING", {"default": "http://127.0.0.1:8000/v1", **_tip(
            "The server's OpenAI-compatible base URL (backend 'server').")}),
        "server_model": ("STRING", {"default": "", **_tip(
            "The served model's name; empty: the server's only model.")}),
        "server_max_in_flight": ("INT", {"default": DEFAULT_MAX_IN_FLIGHT, "min": 1, "max": 256, **_tip(
            "Requests kept in flight for batches and folders, so the server can batch them.")}),
        "server_upload_format": (UPLOAD_FORMATS, {"default": "png", **_tip(
            "png: lossless; jpeg: smaller uploads for photos.")}),
    }


def _timeout_input() -> dict[str, tuple]:
    # Optional and LAST in the nodes that have it: workflows saved before it load unchanged, with the default.
    return {
        "server_timeout_s": ("FLOAT", {"default": ql.LoadOptions.server_timeout_s, "min": 1.0, "max": 86400.0,
                                       "step": 1.0, **_tip(
            "Seconds one server request may take, the whole answer included (backend 'server', .gguf models): "
            "raise it for long answers on a slow server.")}),
    }


def _loader_extras() -> dict[str, tuple]:
    return {
        "dtype": (ql.DTYPE_CHOICES, {"default": "auto", **_tip(
            "auto: bf16 on GPUs that support it, fp16 on older GPUs; on a CPU, fp32 unless it computes bf16 natively "
            "(AMX / AVX512-BF16), then each part (vision tower, text, lm_head) in the dtype a short probe measured "
            "faster there. The timing says what ran in which dtype.")}),
        "device": (ql.DEVICE_CHOICES, {"default": "auto", **_tip("auto: ComfyUI's device.")}),
        "compile_vision": (ql.COMPILE_CHOICES, {"default": DEFAULT_COMPILE, **_tip(
            "torch.compile the vision encoder (regional, dynamic shapes). auto: on for CUDA with a working "
            "compiler.")}),
    }


def _decode_inputs() -> dict[str, tuple]:
    # Optional and last: workflows saved before it load unchanged, with the default.
    return {
        "compile_decode": (ql.DECODE_COMPILE_CHOICES, {"default": "auto", **_tip(
            "Decode on a static KV cache with torch.compile (CUDA graphs). auto: on for CUDA where the model "
            "supports it (not bitsandbytes, not Qwen3.5), else eager with one log line; off: always eager.")}),
    }


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
    OUTPUT_TOOLTIPS = tuple(OUTPUT_TIPS[name] for name in RETURN_NAMES)


class QwenVLFastRun(_AnswerNode):
    DESCRIPTION = "Load a Qwen-VL model (kept between runs) and answer a prompt about the connected image(s)."
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": _advanced({
                **_loader_inputs(),
                **_generation_inputs(),
                "keep_model_loaded": ("BOOLEAN", {"default": True, **_tip(
                    "Keep the model in memory for the next run; off releases it after this run.")}),
            }),
            "optional": _advanced({
                "image": ("IMAGE", {**_tip("One image, or a batch: several images in one prompt.")}),
                **_video_links(),
                **_loader_extras(),
                **_server_inputs(),
                **_decode_inputs(),
                **_video_widgets(),
                **_structured_inputs(),
                **_timeout_input(),
            }),
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def run(self, keep_model_loaded: bool, unique_id: str | None = None, **inputs: Any) -> dict[str, Any]:
        return run_generation(load_options(inputs), inputs, keep_model_loaded, unique_id)


class QwenVLFastAsk(_AnswerNode):
    """The common case on one small node; every other setting keeps its default (the all-in-one node has them)."""

    DESCRIPTION = ("Ask a Qwen-VL model about the connected image(s) or video: the common settings only. For "
                   "sampling, dtype, device, compile, attention, quantization or a server, use the all-in-one node.")
    FUNCTION = "ask"
    # The all-in-one node's inputs it shows, in this order (none of them is in ADVANCED_INPUTS).
    WIDGETS = ("model", "prompt", "image_quality", "max_new_tokens", "seed", "keep_model_loaded")
    LINKS = ("image", "video", "video_clip")

    @classmethod
    def INPUT_TYPES(cls):
        spec = QwenVLFastRun.INPUT_TYPES()
        return {
            "required": {name: spec["required"][name] for name in cls.WIDGETS},
            "optional": {name: spec["optional"][name] for name in cls.LINKS},
            "hidden": spec["hidden"],
        }

    ask = QwenVLFastRun.run


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
    OUTPUT_TOOLTIPS = ("The model's load options, for Generate and Caption Folder nodes (the weights load once).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **_loader_inputs(),
                **_loader_extras(),
                "keep_model_loaded": ("BOOLEAN", {"default": True, **_tip(
                    "Keep the model in memory after each Generate; off releases it after every run.")}),
            },
            "optional": {**_server_inputs(), **_decode_inputs(), **_timeout_input()},
        }

    def load(self, keep_model_loaded: bool, **inputs: Any) -> tuple[QwenVLHandle]:
        options = load_options(inputs)
        try:
            # Load now, so that a broken model fails at this node; Cancel ends a server backend's /models call.
            ql.MANAGER.get(options, should_stop=comfy_glue.interrupted)
        except ql.GenerationInterrupted:
            comfy_glue.raise_interrupt()
            raise
        return (QwenVLHandle(options, keep_model_loaded),)


class QwenVLFastGenerate(_AnswerNode):
    DESCRIPTION = "Answer a prompt about the connected image(s) with a model from Load Model."
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": _advanced({"qwenvl_model": (MODEL_TYPE, _tip("From Qwen-VL Fast Load Model.")),
                                   **_generation_inputs()}),
            "optional": _advanced({"image": ("IMAGE", _tip("One image, or a batch: several images in one prompt.")),
                                   **_video_links(), **_video_widgets(), **_structured_inputs()}),
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def generate(self, qwenvl_model: QwenVLHandle, unique_id: str | None = None, **inputs: Any) -> dict[str, Any]:
        handle = _handle(qwenvl_model)
        return run_generation(handle.options, inputs, handle.keep_model_loaded, unique_id)


class QwenVLFastCacheInfo:
    DESCRIPTION = "Show the image-embedding cache's statistics, and clear it on request."
    CATEGORY = CATEGORY
    FUNCTION = "info"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    OUTPUT_TOOLTIPS = ("The cache's figures as JSON: hits, misses, entries and bytes per tier.",)
    # A list on 'after' (Caption Folder's captions) orders this node once, not once per item; so every input
    # arrives as a list.
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clear_memory": ("BOOLEAN", {"default": False, **_tip("Empty the in-memory tier.")}),
                "clear_disk": ("BOOLEAN", {"default": False, **_tip(
                    f"Delete every entry of the disk tier (folder: ${CACHE_DIR_ENV} or the default).")}),
            },
            # Optional and last. Any output linked here only orders the nodes: this one runs after that job.
            "optional": {"after": (ANY_TYPE, _tip(
                "Connect any output of a job (e.g. a caption run's text) so the figures are read after it."))},
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # a new NaN each time: ComfyUI compares by identity first, math.nan would match

    def info(self, clear_memory: bool | list[bool], clear_disk: bool | list[bool], after: Any = None) -> dict[str, Any]:
        clear_memory, clear_disk = _single(clear_memory), _single(clear_disk)
        cache = ql.get_cache(True)
        if clear_memory or clear_disk:
            cache.clear(memory=clear_memory, disk=clear_disk)
        figures = cache.info()
        text = json.dumps(figures, indent=1)
        return {"ui": {"text": [text], "summary": [cache_summary_line(figures)]}, "result": (text,)}


def _single(value: Any) -> Any:
    """A widget's value from an INPUT_IS_LIST node (a one-item list), or the value itself when called directly."""
    return value[0] if isinstance(value, list) and value else value


class _AnyType(str):
    """ComfyUI's usual "any type" socket: equal to every type, so any output can be linked."""

    def __ne__(self, other: object) -> bool:
        return False


ANY_TYPE = _AnyType("*")


class QwenVLFastCaptionFolder:
    DESCRIPTION = ("Caption every image file (and, if asked, every video file) of a folder, optionally writing a .txt "
                   "(or .caption) beside each; files that already have one are skipped unless overwrite is on (or "
                   "existing says append / prepend). For training sets: prefix / suffix, subfolders, a limit, and "
                   "a Hugging Face metadata.jsonl. The first line of its text is a summary.")
    CATEGORY = CATEGORY
    FUNCTION = "caption"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "STRING", "IMAGE")  # report and report_image last: saved links keep places
    RETURN_NAMES = ("captions", "files", "report", "report_image")
    OUTPUT_IS_LIST = (True, True, False, False)
    OUTPUT_TOOLTIPS = ("The caption of each file (a list, in the files' order; empty for a file that failed).",
                       "The path of each file (a list, matching captions).",
                       "JSON: files seen, captioned this run, skipped, failed; every tag's count over all the "
                       "folder's captions; caption length in words (min, median, max).",
                       "A chart of the report: the most frequent tags and a histogram of caption lengths.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "qwenvl_model": (MODEL_TYPE, _tip("From Qwen-VL Fast Load Model.")),
                "folder": ("STRING", {"default": "", **_tip(
                    "The folder whose images to caption (its subfolders too with recursive on).")}),
                "prompt": ("STRING", {"multiline": True, "default": "Write a concise caption for this image.",
                                      **_tip("The captioning instruction. {name} is replaced by the file's name "
                                             "(no extension), {folder} by its folder's name, {concept} by a kohya "
                                             "folder's concept (10_red car: red car), {caption} by its existing "
                                             "caption (empty if none); other braces stay as written.")}),
                "image_quality": (qp.QUALITY_CHOICES, {"default": qp.DEFAULT_QUALITY,
                                                       **_tip("Visual-token budget per image.")}),
                "max_new_tokens": ("INT", {"default": 128, "min": 1, "max": 4096, **_tip("Most tokens per caption.")}),
                "write_txt": ("BOOLEAN", {"default": True, **_tip("Write <image name>.txt beside each image.")}),
                "overwrite": ("BOOLEAN", {"default": False,
                                          **_tip("Replace existing .txt files (otherwise skipped).")}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, **_tip("Seed (greedy ignores).")}),
            },
            "optional": {
                # Optional and last: workflows saved before them load unchanged, with the defaults.
                "include_videos": ("BOOLEAN", {"default": False, **_tip(
                    "Also caption video files (mp4, mov, mkv, webm, avi, m4v, gif), each as one clip through the "
                    "model's video path, decoded with PyAV.")}),
                "max_frames": _video_widgets()["max_frames"],
                # Issue 19 (training sets); defaults give the node's earlier behaviour.
                "prefix": ("STRING", {"default": "", **_tip(
                    "Put verbatim before every written caption (a trigger word: 'ohwx, ').")}),
                "suffix": ("STRING", {"default": "", **_tip(
                    "Put verbatim after every written caption (', best quality').")}),
                "existing": (cap.EXISTING_MODES, {"default": "skip", **_tip(
                    "Where a caption exists: skip the file, overwrite it, append the new caption after it or "
                    "prepend it (joined with ', ', or a space after punctuation). The overwrite switch on means "
                    "overwrite when this is skip.")}),
                "extension": (cap.CAPTION_EXTENSIONS, {"default": ".txt", **_tip(
                    "The caption files' extension (some trainers read .caption).")}),
                "recursive": ("BOOLEAN", {"default": False, **_tip(
                    "Subfolders too (not hidden ones, no links leading out), each caption beside its file.")}),
                "limit": ("INT", {"default": 0, "min": 0, "max": 1_000_000, **_tip(
                    "Caption only the first N files that need it (0: all); queue again for the next N.")}),
                "write_jsonl": ("BOOLEAN", {"default": False, **_tip(
                    "Also keep metadata.jsonl in the folder (Hugging Face datasets imagefolder: file_name, text); "
                    "rows of other files stay as they are.")}),
                **_structured_inputs(json_field=True),
                "exclude_tags": ("STRING", {"default": "", **_tip(
                    "Comma-separated tags dropped from every caption (case, _ and spaces ignored): 'blurry, "
                    "watermark'. A caption is split on commas; only whole items match.")}),
                "replace_tags": ("STRING", {"multiline": True, "default": "", **_tip(
                    "One rule per line, 'old = new', applied once, in order; an empty new drops the tag. Then "
                    "duplicates are dropped, order kept; prefix and suffix stay verbatim.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **inputs: Any) -> str | float:
        """What is left to do in the folder with these settings (``captioning.pending_digest``: the listing and the
        ledger, stat calls only), so that ComfyUI runs the node while files are not done (new ones, failed ones,
        the next ``limit``) and keeps its cached result once nothing is left. ComfyUI passes the widget values; the
        model link is absent or None here. A folder that cannot be listed gives a new NaN (unequal to everything),
        so the run happens and fails with the clear error.
        """
        try:
            settings = _caption_settings(inputs)
            request = ql.GenerationRequest.from_inputs(_request_inputs(settings))
            folder = _folder_path(settings.get("folder"))
            return cap.pending_digest(folder, cap.options_from_settings(settings), request,
                                      bool(settings["include_videos"]))
        except Exception as exc:  # IS_CHANGED must not raise: ComfyUI would only log it
            log.debug("[QwenVL-Fast] Caption Folder IS_CHANGED: %s", exc)
            return float("nan")

    def caption(self, qwenvl_model: QwenVLHandle, folder: str, write_txt: bool, overwrite: bool,
                unique_id: str | None = None, include_videos: bool = False, **inputs: Any) -> dict[str, Any]:
        handle = _handle(qwenvl_model)
        path = _folder_path(folder)
        settings = _caption_settings(dict(inputs, folder=folder, write_txt=write_txt, overwrite=overwrite,
                                          include_videos=include_videos))
        request = ql.GenerationRequest.from_inputs(_request_inputs(settings), should_stop=comfy_glue.interrupted)
        on_file = progress_with_eta(*comfy_glue.progress_callbacks(unique_id))
        options = cap.options_from_settings(settings)
        before = cap.pending_digest(path, options, request, include_videos) if path.is_dir() else ""
        try:
            results = cap.caption_folder(handle.options, path, request, caption=options, on_file=on_file,
                                         keep_model_loaded=handle.keep_model_loaded, on_start=on_file.start,
                                         include_videos=include_videos)
        except cap.FolderInterrupted as exc:
            log.warning("[QwenVL-Fast] Caption Folder %s stopped: %s; %d answer(s) in flight dropped", path,
                        cap.summarize(exc.results), exc.unfinished)
            comfy_glue.raise_interrupt()
            raise
        if before:
            cap.remember_settled(path, options, request, include_videos, before)
        lines = bounded_lines([(f"{shown_name(r.path, path)}: {r.status}", r.status.startswith("error"))
                               for r in results])
        summary = cap.summarize(results)
        log.info("[QwenVL-Fast] Caption Folder %s: %s", path, summary)
        report = folder_report(results, [r.path for r in results], options.extension)
        return {"ui": {"text": [summary] + (lines or ["no images found"]), "summary": [summary],
                       "report": [report.summary()]},
                "result": ([r.caption for r in results], [str(r.path) for r in results],
                           json.dumps(report.as_dict(), ensure_ascii=False), chart_tensor(report))}


_NOT_SETTINGS = ("qwenvl_model", "unique_id")
# The inputs that become CaptionOptions, with the values that give the node's behaviour before they existed.
_CAPTION_OPTION_DEFAULTS = {"prefix": "", "suffix": "", "existing": "skip", "extension": ".txt", "recursive": False,
                            "limit": 0, "write_jsonl": False, "json_field": "", "exclude_tags": "", "replace_tags": ""}
_NOT_REQUEST = (*_CAPTION_OPTION_DEFAULTS, "folder", "write_txt", "overwrite", "include_videos")


def _request_inputs(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in _NOT_REQUEST}


def _folder_path(folder: Any) -> Path:
    """The folder widget, resolved, when the machine's owner allows it (comfyui_host/trust.py; SECURITY.md)."""
    return comfy_trust.allowed_folder(cap.folder_from_input(folder))


def _caption_settings(inputs: dict[str, Any]) -> dict[str, Any]:
    settings = {k: v for k, v in inputs.items() if k not in _NOT_SETTINGS}
    settings.setdefault("include_videos", False)  # workflows saved before the input existed
    for k, v in _CAPTION_OPTION_DEFAULTS.items():
        settings.setdefault(k, v)
    return settings


def _handle(value: Any) -> QwenVLHandle:
    if not isinstance(value, QwenVLHandle):
        raise ql.QwenVLError("qwenvl_model must come from a 'Qwen-VL Fast Load Model' node.")
    return value


NODE_CLASS_MAPPINGS = {
    "QwenVLFast_Ask": QwenVLFastAsk,
    "QwenVLFast_Run": QwenVLFastRun,
    "QwenVLFast_LoadModel": QwenVLFastLoadModel,
    "QwenVLFast_Generate": QwenVLFastGenerate,
    "QwenVLFast_CacheInfo": QwenVLFastCacheInfo,
    "QwenVLFast_CaptionFolder": QwenVLFastCaptionFolder,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "QwenVLFast_Ask": "Qwen-VL Fast",
    "QwenVLFast_Run": "Qwen-VL Fast (all-in-one)",
    "QwenVLFast_LoadModel": "Qwen-VL Fast Load Model",
    "QwenVLFast_Generate": "Qwen-VL Fast Generate",
    "QwenVLFast_CacheInfo": "Qwen-VL Fast Cache Info",
    "QwenVLFast_CaptionFolder": "Qwen-VL Fast Caption Folder",
}
