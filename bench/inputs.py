"""The benchmark's inputs: constants, deterministic images, folders of PNG files and video clips."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

PRESETS = ["ultra", "high", "balanced", "fast"]
PROMPT = "Describe this image in detail."
CHILD_MARK = "BENCH_CHILD_RESULT "
SECTIONS = ["single", "hash", "multi", "attention", "e2e", "disk", "compile", "answers", "video", "preprocess"]
MODEL_SECTIONS = [s for s in SECTIONS if s != "preprocess"]  # the sections that build a model
QUICK_MODELS = ["synthetic:tiny-qwen2.5-vl", "synthetic:tiny-qwen3-vl"]
CPU_MODEL = "synthetic:qwen2.5-vl-3b@1"
GPU_MODEL = "synthetic:qwen2.5-vl-3b"
N_MULTI = 4
CAPTION_PROMPT = "Write a concise caption for this image."  # the Caption Folder node's default


def cut_by_design(status: str) -> bool:
    """A Caption Folder status for an answer cut at max_new_tokens. The benchmarks generate every answer to a fixed
    length (min_new_tokens = max_new_tokens), so Caption Folder refuses each as cut (only complete answers are
    written): the answer was still generated, and counts as such."""
    return status.startswith("error: cut at max_new_tokens")
SYSTEM_PROMPT = "You are a helpful assistant."
# The seed guide's table (Qwen3-VL-4B, one 1024x1024 image), which was never measured.
SEED_CLAIMS = {"ultra": "~3.5 s, 1.0x", "high": "~2.2 s, 1.6x", "balanced": "~1.7 s, 2.1x", "fast": "~1.0 s, 3.5x",
               "cache": "~0.01 s, 350x", "compile": "~1.3 s, 2.7x"}


def make_image(size: int, seed: int = 0, k: int = 0) -> torch.Tensor:
    """A deterministic ComfyUI-style float image [H, W, 3] in [0, 1] (same bytes in every process).

    ``k`` is written into four pixels so that each k is a different image (a different cache key)
    with the same content statistics: every cache miss below is a genuine new image.
    """
    h = w = int(size)
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    base = torch.stack([x.expand(h, w), y.expand(h, w),
                        ((torch.sin(x * 40) * torch.cos(y * 25)) * 0.5 + 0.5).expand(h, w)], dim=-1)
    img = (0.8 * base + 0.2 * torch.rand((h, w, 3), generator=gen)).contiguous()
    for j in range(4):
        img[0, j, 0] = ((k >> (8 * j)) & 255) / 255.0
    return img


def write_image_folder(folder: Path, count: int, size: int, seed: int, first_k: int) -> list[Path]:
    """``count`` different PNG files (``make_image`` content, each its own cache key), as Caption Folder reads them."""
    import numpy as np
    from PIL import Image

    files = []
    for i in range(count):
        arr = (make_image(size, seed, first_k + i).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        path = folder / f"image_{i:03d}.png"
        Image.fromarray(arr).save(path)
        files.append(path)
    return files


def parse_size(text: str) -> tuple[int, int]:
    """``1280x720`` -> (width, height)."""
    w, h = (int(x) for x in str(text).lower().split("x"))
    return w, h


def int_list(text: str | list[int]) -> list[int]:
    """``2,16`` -> [2, 16]."""
    return [int(x) for x in str(text).split(",") if x.strip()] if not isinstance(text, list) else text


def make_clip_frames(count: int, width: int, height: int, seed: int) -> torch.Tensor:
    """``count`` random frames ``[T, H, W, 3]``, float32 in [0, 1]: a ComfyUI IMAGE batch as video loaders give."""
    return torch.rand((count, height, width, 3), generator=torch.Generator().manual_seed(seed))


def stamp_clip(frames: torch.Tensor, k: int) -> torch.Tensor:
    """A copy of ``frames`` with ``k`` written into four pixels of every frame: a new clip (every frame a new
    cache key and digest-memo entry) with the same content statistics."""
    out = frames.clone()
    for j in range(4):
        out[:, 0, j, 0] = ((k >> (8 * j)) & 255) / 255.0
    return out


@contextmanager
def count_generate_calls(model: Any) -> Iterator[list[int]]:
    """Counts ``model.generate`` calls inside the block (an instance wrapper, removed afterwards)."""
    calls = [0]
    had = "generate" in vars(model)
    inner = model.generate

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return inner(*args, **kwargs)

    model.generate = counting
    try:
        yield calls
    finally:
        if had:
            model.generate = inner
        else:
            del model.generate


def make_uint8_image(width: int, height: int, seed: int = 0) -> torch.Tensor:
    """A deterministic uint8 RGB image ``[H, W, 3]`` as a photo decoder gives it: smooth gradients with noise.

    The noise gives the resize sharp content, where a float resize and the CPU's fixed-point kernel part ways.
    """
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    base = torch.stack([x, y, (torch.sin(x * 40) * torch.cos(y * 25)) * 0.5 + 0.5], dim=-1)
    noise = torch.randint(-40, 41, (height, width, 3), generator=gen, dtype=torch.int16)
    return ((base * 200.0).to(torch.int16) + 28 + noise).clamp_(0, 255).to(torch.uint8).contiguous()
