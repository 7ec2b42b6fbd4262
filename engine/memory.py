"""Device memory: what one decode step reads (the tip's expected speed, the benchmark's rows), and what an
out-of-memory error frees before the run reports it."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

from .runtime_choice import release_memory

log = logging.getLogger("QwenVL-Fast")


class LoadedModel(Protocol):
    """What these estimates and the out-of-memory policy read of a loaded model (``engine.model.QwenVLModel``)."""

    model: Any  # the transformers model
    device: torch.device
    prefix_cache: Any
    decode_compile: Any

    @property
    def visual(self) -> torch.nn.Module: ...


def device_memory_bandwidth(device: torch.device) -> float | None:
    """Peak memory bandwidth in bytes/s from a CUDA device's properties (None elsewhere, or when they do not say)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return clock_khz * 1000 * 2 * bus_bits / 8  # double data rate


def expected_decode_tokens_per_s(model: LoadedModel) -> float | None:
    """Memory-bound decode estimate: GPU memory bandwidth / bytes of weights read per token."""
    bandwidth = device_memory_bandwidth(model.device)
    weights = decode_bytes_per_token(model) if bandwidth else 0
    return bandwidth / weights if weights else None


def decode_bytes_per_token(model: LoadedModel) -> int:
    """Weight bytes one decode step reads: the language model and its head, not the vision tower, and of an input
    embedding that is not tied to the head only the one row looked up (nothing, next to the rest)."""
    net = model.model
    visual = {id(p) for p in model.visual.parameters()}
    embed = net.get_input_embeddings()
    head = net.get_output_embeddings()
    embed_weight = getattr(embed, "weight", None)
    tied = head is not None and getattr(head, "weight", None) is embed_weight
    total = 0
    for p in net.parameters():  # each shared tensor once
        if id(p) in visual or (p is embed_weight and not tied):
            continue
        total += p.numel() * p.element_size()
    return total


def unquantized_bf16_bytes(model: LoadedModel) -> int:
    """The model's size in bf16; transformers counts packed 4-bit weights as the parameters they hold."""
    return int(model.model.num_parameters()) * 2


def free_after_oom(model: LoadedModel) -> None:
    """The one out-of-memory policy: what the model keeps between calls goes first, then the allocator's cache.

    The kept prefixes, and compiled decode's static KV cache together with its compiled callable (CUDA graphs hold
    their own memory pool; the next call compiles anew rather than replaying graphs recorded before the error).
    """
    model.prefix_cache.clear()
    model.decode_compile.drop_compiled()
    release_memory()


def free_weights(net: torch.nn.Module) -> None:
    """Give a model's device memory back without a host copy: every parameter and buffer becomes an empty tensor
    on its own device (a reference kept elsewhere, by a hook or a closure, then holds nothing either)."""
    with torch.no_grad():
        for module in net.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is None or tensor.numel() == 0:
                        continue
                    empty = torch.empty(0, device=tensor.device, dtype=tensor.dtype)
                    try:
                        tensor.data = empty
                    except RuntimeError:  # an inference-mode buffer takes no .data: the module lets go of it
                        log.debug("[QwenVL-Fast] %s.%s replaced instead of emptied", type(module).__name__, name)
                        table[name] = torch.nn.Parameter(empty, False) if table is module._parameters else empty
