"""Where and how a model runs: device, dtype, attention implementation, quantization; freeing memory."""

from __future__ import annotations

import gc
import importlib.util

import torch

from ..core.errors import QwenVLError

QUANTIZATION_CHOICES = ["none", "8-bit", "4-bit"]

ATTENTION_CHOICES = ["auto", "sdpa", "flash_attention_2", "eager"]

DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]

DEVICE_CHOICES = ["auto", "cuda", "cpu", "mps"]

COMPILE_CHOICES = ["auto", "on", "off"]

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
    # CPU: the model is built in fp32; engine/cpu_dtype.auto_cpu_parts then casts the parts measured faster in bf16
    # on a CPU that computes bf16 natively (the loader calls it for "auto" only).
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

def release_memory(device: torch.device | None = None) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if getattr(torch, "mps", None) is not None and getattr(torch.backends, "mps", None) is not None:
        if torch.backends.mps.is_available():
            torch.mps.empty_cache()
