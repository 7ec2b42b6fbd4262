"""Command line: the same engine as the nodes, on image files.

    python cli.py --model synthetic:qwen2.5-vl-3b@2 --image photo.png --prompt "Describe it."
    python cli.py --model /path/to/Qwen2.5-VL-3B-Instruct --image a.png --image b.png
    python cli.py caption-folder ~/dataset --model /path/to/Qwen2.5-VL-3B-Instruct --prefix "photo of sks, "

With no --image a built-in test picture is used. ``caption-folder`` is the Caption Folder node on the command
line (same options, same engine): progress on stderr, the summary on stdout; exit status 0 when no file failed,
1 when some did, 2 on a usage or configuration error (a missing folder or model, an unreachable server).

``synthetic:`` models are real architectures with random weights (their text is meaningless; their timings are real).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pack_path  # noqa: E402

pack_path.import_pack()
from qwenvl_fast import captioning as bc  # noqa: E402
from qwenvl_fast import quality_presets as qp  # noqa: E402
from qwenvl_fast import qwenvl_loader as ql  # noqa: E402
from qwenvl_fast.captioning.report import folder_report, save_chart  # noqa: E402
from qwenvl_fast.core.api import OUTPUT_FORMATS  # noqa: E402
from qwenvl_fast.engine.structured import spec_of  # noqa: E402
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
    p = argparse.ArgumentParser(
        usage=("%(prog)s [--model M] [--image FILE ...] [--prompt TEXT] [options]\n"
               f"       %(prog)s {CAPTION_COMMAND} FOLDER --model M [options]   (%(prog)s {CAPTION_COMMAND} --help)"),
        description="Qwen-VL Fast on image files (the ComfyUI node's engine).",
        epilog="To caption every image of a folder (the Caption Folder node): python cli.py caption-folder FOLDER "
               "--model M [options]; see python cli.py caption-folder --help.")
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
    _sampling_arguments(p)
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
    _structured_arguments(p)
    return p


def _sampling_arguments(group) -> None:
    """--min-new-tokens, --sample and the sampling settings, the same for both commands."""
    group.add_argument("--min-new-tokens", type=int, default=0)
    group.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, default=0.7)
    group.add_argument("--top-p", type=float, default=0.9)
    group.add_argument("--top-k", type=int, default=50)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--seed", type=int, default=0)


def _sampling_request_fields(args: argparse.Namespace) -> dict:
    """The GenerationRequest fields of :func:`_sampling_arguments`' flags."""
    return dict(min_new_tokens=args.min_new_tokens, do_sample=args.sample, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _structured_arguments(group, json_field: bool = False) -> None:
    """--output-format, --json-schema (and for caption-folder --json-field): README "Structured output"."""
    group.add_argument("--output-format", default="text", choices=OUTPUT_FORMATS,
                       help="text; json (constrained to --json-schema); tags (a comma-separated tag list)")
    group.add_argument("--json-schema", default="", type=_schema_text,
                       help="a JSON Schema as text, or @FILE to read it (empty: any JSON object)")
    if json_field:
        group.add_argument("--json-field", default="",
                           help="with --output-format json: write this field of the answer as the caption")


def _schema_text(value: str) -> str:
    if value.startswith("@"):
        try:
            return Path(value[1:]).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read the schema file {value[1:]!r}: {exc.strerror}") from exc
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == CAPTION_COMMAND:
        return caption_folder_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_libraries()
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
        batch_mode=ql.BATCH_MODES[1] if args.per_image else ql.BATCH_MODES[0], preprocess=args.preprocess,
        output_format=args.output_format, json_schema=args.json_schema, **_sampling_request_fields(args),
    )
    try:
        result = ql.run_once(options, request)
    except ql.QwenVLError as exc:
        log.error("[QwenVL-Fast] %s", exc)
        return 2
    if args.json:
        print(json.dumps({"texts": result.texts, "thinking": result.thinking, "endings": result.endings,
                          "timing": result.record.as_dict()}, default=str))
        return 0
    random_weights = ql.synthetic.is_synthetic_name(args.model)
    for i, text in enumerate(result.texts):
        ids = result.token_ids[i] if i < len(result.token_ids) else []
        # how it ended: "complete", or "cut" / "thinking open" (the warning below says what to change)
        print(f"--- answer {i + 1}: {len(ids)} new tokens, {result.ending_of(i).replace('_', ' ')} ---")
        if random_weights or not text.strip():
            print("token ids: " + " ".join(str(t) for t in ids))
        if text.strip():
            print(("text (meaningless, random weights): " if random_weights else "") + text)
        else:
            print("text: (none" + _why_no_text(ids) + ")")
        if result.thinking[i]:
            print(f"--- reasoning {i + 1} ---\n{result.thinking[i]}")
    for warning in result.record.warnings:
        print(f"warning: {warning}")
    print(_timing_line(result.record))
    if random_weights:
        print(f"Demo run complete: {args.model} has random weights, so the tokens above mean nothing; the pipeline "
              "that produced them and its timings are real. For real answers give --model a model folder or a "
              "Qwen/... repo id.")
    return 0  # the engine also logged its one-line timing summary and any tips


def _quiet_libraries() -> None:
    """The command line's output is the answer and one timing report: the libraries' log lines and their
    progress bars (transformers' "Loading weights", huggingface_hub's downloads) would bury it."""
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):  # an older transformers / huggingface_hub without these switches
        from transformers.utils import logging as tf_logging

        tf_logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


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


# ---------------------------------------------------------------------------------------------- caption-folder
CAPTION_COMMAND = "caption-folder"
CAPTION_PROMPT = "Write a concise caption for this image."  # the Caption Folder node's default
CAPTION_MAX_NEW_TOKENS = 128  # the node's default
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_caption_parser() -> argparse.ArgumentParser:
    """``cli.py caption-folder``: the Caption Folder node's options, with the node's defaults."""
    p = argparse.ArgumentParser(
        prog=f"{Path(sys.argv[0]).name} {CAPTION_COMMAND}",
        description="Caption every image file (and, with --include-videos, every video file) of a folder, writing "
                    "a caption file beside each: the Caption Folder node on the command line. Progress (files done "
                    "and estimated time left) goes to stderr, the summary to stdout. Exit status: 0 when no file "
                    "failed, 1 when some did, 2 on a usage or configuration error, 130 when interrupted (Ctrl-C: "
                    "the captions already written stay, whole).")
    p.add_argument("folder", help="the folder to caption")
    model = p.add_argument_group("model")
    model.add_argument("--model", help="model folder, Qwen repo id or synthetic:<preset>[@text_layers] (required "
                                       "with the local backend)")
    model.add_argument("--backend", default="local", choices=ql.BACKENDS,
                       help="local: this machine runs the model; server: an OpenAI-compatible server answers")
    model.add_argument("--server-url", default="", help="the server's OpenAI-compatible base URL (--backend server; "
                                                        "API key: the QWENVL_FAST_API_KEY environment variable)")
    model.add_argument("--server-model", default="", help="the served model's name (empty: the server's only one)")
    model.add_argument("--server-max-in-flight", type=int, default=ql.LoadOptions.server_max_in_flight,
                       help="requests kept in flight, so the server can batch them")
    model.add_argument("--server-upload-format", default="png", choices=["png", "jpeg"])
    model.add_argument("--server-timeout", type=float, default=ql.LoadOptions.server_timeout_s,
                       help="seconds one request may take, whole answer included (raise it for long answers on "
                            "a slow server)")
    model.add_argument("--quantization", default="none", choices=ql.QUANTIZATION_CHOICES)
    model.add_argument("--attention", default="auto", choices=ql.ATTENTION_CHOICES)
    model.add_argument("--dtype", default="auto", choices=ql.DTYPE_CHOICES)
    model.add_argument("--device", default="auto", choices=ql.DEVICE_CHOICES)
    model.add_argument("--compile-vision", default="off", choices=ql.COMPILE_CHOICES)
    gen = p.add_argument_group("captioning")
    gen.add_argument("--prompt", default=CAPTION_PROMPT, help=f"the instruction (default: {CAPTION_PROMPT!r}); "
                     "{name}, {folder}, {concept} and {caption} are each file's stem, folder name, kohya concept "
                     "(10_red car: red car) and existing caption")
    gen.add_argument("--system-prompt", default="")
    gen.add_argument("--quality", default=qp.DEFAULT_QUALITY, choices=qp.QUALITY_CHOICES,
                     help="visual-token budget per image")
    gen.add_argument("--max-new-tokens", type=int, default=CAPTION_MAX_NEW_TOKENS)
    _sampling_arguments(gen)
    gen.add_argument("--include-videos", action="store_true", help="caption video files too (one clip each)")
    gen.add_argument("--max-frames", type=int, default=16, help="most frames sampled from each video (evenly)")
    gen.add_argument("--no-cache", action="store_true", help="disable the image-embedding cache")
    gen.add_argument("--no-disk-cache", action="store_true", help="memory tier only")
    out = p.add_argument_group("caption files")
    out.add_argument("--prefix", default="", help="text put verbatim before every written caption")
    out.add_argument("--suffix", default="", help="text put verbatim after every written caption")
    out.add_argument("--existing", default="skip", choices=bc.EXISTING_MODES,
                     help="where a caption file exists: skip the image, overwrite it, or append / prepend the new "
                          "caption (default skip)")
    out.add_argument("--extension", default=".txt", choices=bc.CAPTION_EXTENSIONS, help="caption file extension")
    out.add_argument("--recursive", action="store_true", help="subfolders too (each caption beside its file)")
    out.add_argument("--limit", type=int, default=0, help="caption only the first N files that need it (0: all)")
    out.add_argument("--jsonl", action="store_true",
                     help=f"also write {getattr(bc, 'METADATA_NAME', 'metadata.jsonl')} (Hugging Face imagefolder)")
    out.add_argument("--no-write", action="store_true",
                     help="write no caption file: print each caption to stdout instead")
    out.add_argument("--exclude-tags", default="", help="comma-separated tags dropped from every caption (case, _ "
                     "and spaces ignored; a caption is split on commas, only whole items match)")
    out.add_argument("--replace-tags", default="", help="tag rules, one 'old = new' per line, applied once in order "
                     "(an empty new drops the tag); then duplicates are dropped")
    out.add_argument("--report", metavar="FILE.png", help="write the folder report's chart (top tags, caption "
                     "lengths) as a PNG; the report's summary is printed after every run")
    out.add_argument("--json", action="store_true", help="print the results and the summary as one JSON object")
    out.add_argument("--reset-ledger", action="store_true",
                     help="forget which files of this folder earlier runs did (every setting's ledger), so that "
                          "append / prepend / overwrite apply again; ledgers live in $QWENVL_FAST_LEDGER_DIR or the "
                          "user data folder (README \"Caption Folder\")")
    out.add_argument("--verbose", action="store_true", help="the engine's timing line after every chunk, too")
    _structured_arguments(p.add_argument_group("structured output"), json_field=True)
    return p


def _duration(seconds: float) -> str:
    seconds = max(0, int(math.ceil(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Files done and the estimated time left, on stderr, after every chunk.

    The estimate is the rate since ``start`` (Caption Folder's ``on_start``: the files decided up front, before
    any model work; the model is loaded before that), or, without it, since the first chunk ended.
    """

    def __init__(self, stream=None, clock=time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.clock = clock
        self.t0 = clock()
        self.first: tuple[float, int] | None = None

    def start(self, done: int, total: int) -> None:
        self.first = (self.clock(), done)

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        left = ""
        if self.first is None:
            self.first = (now, done)
            if done < total:
                left = ", estimating time left"
        elif done < total and done > self.first[1] and now > self.first[0]:
            rate = (done - self.first[1]) / (now - self.first[0])
            left = f", about {_duration((total - done) / rate)} left"
        pct = 100.0 * done / total if total else 100.0
        print(f"[caption-folder] {done}/{total} files ({pct:.0f}%), {_duration(now - self.t0)} elapsed{left}",
              file=self.stream, flush=True)


def caption_folder_main(argv: list[str]) -> int:
    parser = build_caption_parser()
    args = parser.parse_args(argv)  # a usage error exits with status 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    logging.getLogger("QwenVL-Fast").setLevel(logging.INFO if args.verbose else logging.WARNING)
    _quiet_libraries()

    def usage(message: str) -> int:
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    if args.backend == "local" and not args.model:
        return usage("--model is required with the local backend (a model folder, a Qwen repo id or "
                     "synthetic:<preset>); or use --backend server --server-url URL")
    if args.backend == "server" and not args.server_url:
        return usage("--backend server needs --server-url (e.g. http://127.0.0.1:8000/v1)")
    for name in ("max_new_tokens", "server_max_in_flight", "max_frames"):
        if getattr(args, name) < 1:
            return usage(f"--{name.replace('_', '-')} must be 1 or more, not {getattr(args, name)}")
    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        return usage(f"'{folder}' is not a folder: give the path of the folder to caption")
    try:
        caption = bc.CaptionOptions(prefix=args.prefix, suffix=args.suffix, existing=args.existing,
                                    extension=args.extension, recursive=args.recursive, limit=args.limit,
                                    write_jsonl=args.jsonl, write_captions=not args.no_write,
                                    json_field=args.json_field, exclude_tags=args.exclude_tags,
                                    replace_tags=args.replace_tags)
    except ql.QwenVLError as exc:
        return usage(str(exc))
    if args.report and not Path(args.report).expanduser().resolve().parent.is_dir():
        return usage(f"--report {args.report}: its folder does not exist (give a path in an existing folder)")
    options = ql.LoadOptions(
        model=args.model or "(served)", quantization=args.quantization, attention_mode=args.attention,
        dtype=args.dtype, device=args.device, compile_vision=args.compile_vision, backend=args.backend,
        server_url=args.server_url, server_model=args.server_model, server_max_in_flight=args.server_max_in_flight,
        server_upload_format=args.server_upload_format, server_timeout_s=args.server_timeout)
    if args.reset_ledger:
        forgotten = bc.reset_folder_ledgers(folder)
        print(f"[caption-folder] ledger reset: {forgotten} ledger(s) of {folder} forgotten", file=sys.stderr)
    stop = _StopOnSignal()
    request = ql.GenerationRequest(
        prompt=args.prompt, system_prompt=args.system_prompt, image_quality=args.quality,
        max_new_tokens=args.max_new_tokens, max_frames=args.max_frames, **_sampling_request_fields(args),
        enable_image_cache=not args.no_cache, disk_cache=not args.no_disk_cache, should_stop=stop.at_once,
        output_format=args.output_format, json_schema=args.json_schema)
    try:  # a broken schema, or json/tags without llguidance on the local backend: before the model loads
        spec_of(request, need_grammar=ql.needs_local_grammar(options))
    except ql.QwenVLError as exc:
        return usage(str(exc))
    with stop.installed():  # from here on, Ctrl-C and SIGTERM never print a traceback
        return _load_and_caption(options, folder, request, caption, args, stop, usage)


def _load_and_caption(options: ql.LoadOptions, folder: Path, request: ql.GenerationRequest,
                      caption: bc.CaptionOptions, args: argparse.Namespace, stop: _StopOnSignal,
                      usage: Callable[[str], int]) -> int:
    t0 = time.perf_counter()
    try:
        # Loaded (or connected to) first: a missing model or an unreachable server is a configuration error.
        stop.loading = True
        ql.MANAGER.get(options, should_stop=stop)
    except ql.GenerationInterrupted:
        ql.MANAGER.release()
        print("[caption-folder] interrupted while loading the model; nothing was captioned", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ql.QwenVLError as exc:
        return usage(str(exc))
    finally:
        stop.loading = False
    load_s = time.perf_counter() - t0
    print(f"[caption-folder] {'connected to ' + args.server_url if args.backend == 'server' else args.model} "
          f"in {load_s:.1f}s; captioning {folder}", file=sys.stderr, flush=True)
    t1 = time.perf_counter()
    try:
        progress = Progress()
        results = bc.caption_folder(options, folder, request, caption=caption, on_file=progress,
                                    on_start=progress.start, include_videos=args.include_videos,
                                    stop_after_chunk=stop)
    except bc.FolderInterrupted as exc:
        written = sum(r.status in ("written", "captioned") for r in exc.results)
        print(f"[caption-folder] interrupted: {written} caption(s) committed, whole; {exc.unfinished} answer(s) "
              "unfinished, dropped; run again to go on", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ql.GenerationInterrupted:
        print("[caption-folder] interrupted; the captions already written stay, whole; run again to go on",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except ql.QwenVLError as exc:  # a fault that hit the whole folder (the server went away, a refused key)
        print(f"[caption-folder] stopped: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        ql.MANAGER.release()
    elapsed = time.perf_counter() - t1
    return _report(results, args, folder, elapsed)


def _report(results: list, args: argparse.Namespace, folder: Path, elapsed: float) -> int:
    failed = [r for r in results if r.status.startswith("error")]
    done = [r for r in results if r.status in ("written", "captioned")]
    rate = f", {len(done) / elapsed:.2f} captions/s" if done and elapsed > 0 else ""
    summary = bc.summarize(results)
    report = folder_report(results, [r.path for r in results], args.extension)
    chart_failed = False
    if args.report:
        try:
            save_chart(report, Path(args.report).expanduser())
        except (OSError, ValueError) as exc:
            print(f"[caption-folder] cannot write the report chart {args.report}: {exc}", file=sys.stderr)
            chart_failed = True
    if args.json:
        print(json.dumps({"folder": str(folder), "summary": summary, "elapsed_s": round(elapsed, 3),
                          "failed": len(failed), "report": report.as_dict(),
                          "results": [{"path": str(r.path), "status": r.status, "caption": r.caption}
                                      for r in results]}, ensure_ascii=False))
    else:
        for r in failed:
            print(f"{r.path}: {r.status}", file=sys.stderr)
        if args.no_write:
            for r in done:
                print(f"{r.path}\t{r.caption}")
        if not results:
            print(f"no image files in {folder}" + ("" if args.recursive else " (subfolders: --recursive)"))
        print(f"{summary} in {_duration(elapsed)}{rate}")
        print(f"report: {report.summary()}" + (f"; chart in {args.report}" if args.report else ""))
    return EXIT_FAILED if failed or chart_failed else EXIT_OK


class _StopOnSignal:
    """Ctrl-C (SIGINT) and SIGTERM for the folder. The first asks the folder to stop after the answers in flight
    (``__call__``: every answer that completes is committed); a second one stops them at once (``at_once``, the
    request's ``should_stop``: the unfinished ones are dropped). While the model loads, either stops the load."""

    def __init__(self) -> None:
        self.asked = 0
        self.loading = False

    def __call__(self) -> bool:
        return self.asked > 0

    def at_once(self) -> bool:
        return self.asked > 1

    def _handle(self, signum, frame) -> None:
        self.asked += 1
        if self.loading:
            raise ql.GenerationInterrupted("interrupted while loading the model")
        if self.asked == 1:
            print("\n[caption-folder] stopping after the answers in flight, each committed as it completes "
                  "(Ctrl-C again to drop them and stop at once)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self):
        before = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
