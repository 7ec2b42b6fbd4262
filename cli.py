"""Command line: the same engine as the nodes, on image files.

    python cli.py --model synthetic:qwen2.5-vl-3b@2 --image photo.png --prompt "Describe it."
    python cli.py --model /path/to/Qwen2.5-VL-3B-Instruct --image a.png --image b.png

With no --image a built-in test picture is used. ``synthetic:`` models are real architectures
with random weights (their text is meaningless; their timings are real).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pack_path  # noqa: E402

pack_path.import_pack()
from qwenvl_fast import quality_presets as qp  # noqa: E402
from qwenvl_fast import qwenvl_loader as ql  # noqa: E402
from qwenvl_fast.vision.images import load_image_file  # noqa: E402
from qwenvl_fast.vision.video import load_video_file  # noqa: E402

DEFAULT_MODEL = "synthetic:qwen2.5-vl-3b@2"
log = logging.getLogger("QwenVL-Fast")


def demo_image(height: int = 768, width: int = 1024) -> torch.Tensor:
    """A deterministic picture with gradients, shapes and stripes (ComfyUI layout, float HWC)."""
    y = torch.linspace(0, 1, height)[:, None]
    x = torch.linspace(0, 1, width)[None, :]
    r = x.expand(height, width)
    g = y.expand(height, width)
    b = ((torch.sin(x * 40) * torch.cos(y * 25)) * 0.5 + 0.5).expand(height, width)
    img = torch.stack([r, g, b], dim=-1).clone()
    img[height // 4: height // 2, width // 4: width // 2] = torch.tensor([0.9, 0.2, 0.1])
    return img


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Qwen-VL Fast on image files (the ComfyUI node's engine).")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model folder, Qwen repo id or synthetic:<preset>[@text_layers] (default {DEFAULT_MODEL}; "
                        f"presets: {', '.join(ql.synthetic_choices())})")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--video", help="a video file: one clip through the model's video path (decoded with PyAV)")
    p.add_argument("--max-frames", type=int, default=16, help="most frames sampled from --video (evenly)")
    p.add_argument("--prompt", default="Describe this image in detail.")
    p.add_argument("--system-prompt", default="")
    p.add_argument("--quality", default=qp.DEFAULT_QUALITY, choices=qp.QUALITY_CHOICES)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="disable the image-embedding cache")
    p.add_argument("--no-disk-cache", action="store_true", help="memory tier only")
    p.add_argument("--per-image", action="store_true", help="one answer per image instead of one prompt")
    p.add_argument("--quantization", default="none", choices=ql.QUANTIZATION_CHOICES)
    p.add_argument("--attention", default="auto", choices=ql.ATTENTION_CHOICES)
    p.add_argument("--dtype", default="auto", choices=ql.DTYPE_CHOICES)
    p.add_argument("--device", default="auto", choices=ql.DEVICE_CHOICES)
    p.add_argument("--compile-vision", default="off", choices=ql.COMPILE_CHOICES)
    p.add_argument("--preprocess", default="fast", choices=ql.PREPROCESS_CHOICES)
    p.add_argument("--json", action="store_true", help="print the result and timing record as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        videos = [load_video_file(Path(args.video), args.max_frames)] if args.video else []
    except ql.QwenVLError as exc:
        log.error("[QwenVL-Fast] %s", exc)
        return 2
    images = [load_image_file(Path(f)) for f in args.image] if args.image or videos else [demo_image()]
    options = ql.LoadOptions(model=args.model, quantization=args.quantization, attention_mode=args.attention,
                             dtype=args.dtype, device=args.device, compile_vision=args.compile_vision)
    request = ql.GenerationRequest(
        prompt=args.prompt, images=images, videos=videos, max_frames=args.max_frames,
        system_prompt=args.system_prompt, image_quality=args.quality,
        enable_image_cache=not args.no_cache, disk_cache=not args.no_disk_cache, max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens, do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
        batch_mode=ql.BATCH_MODES[1] if args.per_image else ql.BATCH_MODES[0], preprocess=args.preprocess,
    )
    try:
        result = ql.run_once(options, request)
    except ql.QwenVLError as exc:
        log.error("[QwenVL-Fast] %s", exc)
        return 2
    if args.json:
        print(json.dumps({"texts": result.texts, "thinking": result.thinking, "timing": result.record.as_dict()},
                         default=str))
        return 0
    random_weights = ql.synthetic.is_synthetic_name(args.model)
    for i, text in enumerate(result.texts):
        ids = result.token_ids[i] if i < len(result.token_ids) else []
        print(f"--- answer {i + 1}: {len(ids)} new tokens ---")
        if random_weights or not text.strip():
            print("token ids: " + " ".join(str(t) for t in ids))
        if text.strip():
            print(("text (meaningless, random weights): " if random_weights else "") + text)
        else:
            print("text: (none" + _why_no_text(ids) + ")")
        if result.thinking[i]:
            print(f"--- reasoning {i + 1} ---\n{result.thinking[i]}")
    print(_timing_line(result.record))
    if random_weights:
        print(f"Demo run complete: {args.model} has random weights, so the tokens above mean nothing; the pipeline "
              "that produced them and its timings are real. For real answers give --model a model folder or a "
              "Qwen/... repo id.")
    return 0  # the engine also logged its one-line timing summary and any tips


def _why_no_text(ids: list[int]) -> str:
    """Why these ids decode to nothing: ids the tokenizer does not have, the rest special tokens or whitespace."""
    tokenizer = getattr(ql.MANAGER.current, "tokenizer", None)
    if tokenizer is None or not ids:
        return ""
    size = len(tokenizer)
    beyond = sum(1 for t in ids if t >= size)
    if not beyond:
        return ": these ids are special tokens and whitespace only"
    which = f"all {beyond}" if beyond == len(ids) else f"{beyond} of the {len(ids)}"
    return (f": {which} ids lie beyond the tokenizer's {size} entries and decode to nothing"
            + (", the others are special tokens or whitespace" if beyond < len(ids) else ""))


def _timing_line(rec) -> str:
    """The run's stage times in seconds, in the order they ran (the engine's record, not a new measurement)."""
    stages = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in rec.stages.items() if seconds >= 0.005)
    speed = f" ({rec.decode_tokens_per_s:.1f} tok/s)" if rec.decode_tokens_per_s else ""
    return f"timings: total {rec.total_s:.2f}s = {stages}; {rec.new_tokens} new tokens{speed}"


if __name__ == "__main__":
    sys.exit(main())
