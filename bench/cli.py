"""The benchmark's command line: options, defaults per device, the run over models, --render-json."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.children import child_main, section_compile, section_disk
from bench.inputs import CPU_MODEL, GPU_MODEL, MODEL_SECTIONS, PRESETS, QUICK_MODELS, SECTIONS
from bench.measure import Row, TimeBudget
from bench.preprocess import preprocess_cases, run_preprocess
from bench.report import to_markdown, write_outputs
from bench.rows import complete_rows, video_rows, video_source_frames
from bench.sections_answers import AnswerSections
from bench.sections_image import ImageSections
from bench.sections_video import VideoSection
from qwenvl_fast import embedding_cache as caches
from qwenvl_fast import qwenvl_loader as ql

log = logging.getLogger("QwenVL-Fast")


class ModelBench(ImageSections, AnswerSections, VideoSection):
    """Every in-process section of one model, on one shared state (rows, image counter, time budget)."""


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = dict(cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                                python=platform.python_version(), platform=platform.platform(),
                                torch=torch.__version__)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        info["transformers"] = "missing"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Qwen-VL Fast benchmark (side by side, paired ratios, medians).")
    p.add_argument("--model", action="append", default=[],
                   help=f"model (repeatable); default {CPU_MODEL} on CPU, {GPU_MODEL} on CUDA, "
                        f"{' + '.join(QUICK_MODELS)} with --quick")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny models, 1 round, small images, no compile (checks the benchmark works)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds of the expensive sections (default: 1 quick, 2 CPU, 5 CUDA)")
    p.add_argument("--multi-repeats", type=int, default=None, help="rounds of the multi-image section (default "
                   "--repeats)")
    p.add_argument("--hit-repeats", type=int, default=None, help="cache hits / hashes timed per round (default: 3 "
                   "quick, 5 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds per section (default: 1 on "
                   "CUDA, 0 on CPU, where a small warm-up run is done instead)")
    p.add_argument("--device", default="auto", choices=ql.DEVICE_CHOICES)
    p.add_argument("--dtype", default="auto", choices=ql.DTYPE_CHOICES)
    p.add_argument("--image-size", type=int, default=None, help="square image side (default 1024; 256 with --quick)")
    p.add_argument("--multi-quality", default="balanced", choices=PRESETS, help="preset of the multi-image rows")
    p.add_argument("--new-tokens", type=int, default=16, help="exact number of new tokens in the end-to-end rows")
    p.add_argument("--seed", type=int, default=0, help="image content seed")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: sections/rounds that would start after this are skipped (marked in the output)")
    p.add_argument("--compile-quality", default="balanced", choices=PRESETS, help="preset of the compile rows")
    p.add_argument("--compile-budget", type=float, default=300.0,
                   help="seconds for the compile child process (compile + measurements); 0 skips compile")
    p.add_argument("--skip", action="append", default=[], choices=SECTIONS, help="skip a section (repeatable)")
    p.add_argument("--only", action="append", default=[], choices=SECTIONS,
                   help="run only this section (repeatable): every other one is skipped")
    p.add_argument("--answers-images", type=int, default=None,
                   help="answers section: images answered one each, batched vs one by one (default 8; 3 quick)")
    p.add_argument("--answers-new-tokens", type=int, default=None, help="answers section: exact new tokens per "
                   "answer of the batched, folder and decode rows (default 64 CUDA, 16 CPU, 4 quick)")
    p.add_argument("--answers-image-size", type=int, default=None, help="answers section: side of the images "
                   "answered one each and of the folder's files (default 1024 CUDA, 320 CPU, 64 quick)")
    p.add_argument("--answers-quality", default="fast", choices=PRESETS,
                   help="answers section: preset of the images answered one each and of the folder")
    p.add_argument("--folder-images", type=int, default=None, help="answers section: image files in the captioned "
                   "folder (default 16; 5 quick)")
    p.add_argument("--folder-cache", choices=["cold", "warm"], default=None,
                   help="answers section: the folder rows with an empty embedding cache before each pass (cold: "
                        "every image encoded, default on CUDA) or with the embeddings of the first pass (warm: "
                        "re-captioning, default on CPU, where the full-size vision tower takes seconds per image)")
    p.add_argument("--video-frames", default=None, help="video section: frames sampled in the `fast` rows, comma "
                   "separated (default 16,32,64 CUDA; 2,16 CPU, where the full tower costs about a minute per 1000 "
                   "visual tokens; 2,4 quick)")
    p.add_argument("--video-presets", default="balanced,high",
                   help="video section: presets compared at --video-preset-frames (comma separated)")
    p.add_argument("--video-preset-frames", type=int, default=None, help="video section: frames of the "
                   "--video-presets rows (default 32 CUDA, 2 CPU, 2 quick)")
    p.add_argument("--video-size", default=None, help="video section: frame size WxH (default 1280x720; 320x180 "
                   "quick)")
    p.add_argument("--preprocess-sizes", default=None, help="preprocess section: uint8 image sizes WxH, comma "
                   "separated (default 640x480,1024x1024,1920x1080,4000x3000; 320x240,640x480 quick)")
    p.add_argument("--preprocess-presets", default="balanced,high",
                   help="preprocess section: presets, comma separated (each at every size and geometry)")
    p.add_argument("--preprocess-repeats", type=int, default=None, help="preprocess section: timed rounds (default "
                   "20 CUDA, 7 CPU, 2 quick)")
    p.add_argument("--json", help="write all results (with raw samples) to this JSON file")
    p.add_argument("--markdown", help="write the tables to this markdown file")
    p.add_argument("--render-json", metavar="FILE", help="measure nothing: re-render the tables of a saved --json "
                   "result (to stdout and --markdown)")
    p.add_argument("--child", choices=["disk", "compile"], help=argparse.SUPPRESS)
    p.add_argument("--child-spec", help=argparse.SUPPRESS)
    return p


def apply_defaults(args: argparse.Namespace, device: torch.device) -> None:
    cuda = device.type == "cuda"
    if not args.model:
        args.model = list(QUICK_MODELS) if args.quick else [GPU_MODEL if cuda else CPU_MODEL]
    if args.repeats is None:
        args.repeats = 1 if args.quick else (5 if cuda else 2)
    if args.hit_repeats is None:
        args.hit_repeats = 3 if args.quick else (20 if cuda else 5)
    if args.warmup is None:
        args.warmup = 1 if cuda else 0
    if args.image_size is None:
        args.image_size = 256 if args.quick else 1024
    if args.quick:
        args.compile_budget = 0
    if args.only:
        args.skip = sorted(set(args.skip) | {s for s in SECTIONS if s not in args.only})
    if args.answers_images is None:
        args.answers_images = 3 if args.quick else 8
    if args.answers_new_tokens is None:
        args.answers_new_tokens = 4 if args.quick else (64 if cuda else 16)
    if args.answers_image_size is None:
        args.answers_image_size = 64 if args.quick else (1024 if cuda else 320)
    if args.folder_images is None:
        args.folder_images = 5 if args.quick else 16
    if args.folder_cache is None:
        args.folder_cache = "cold" if cuda else "warm"
    if args.video_frames is None:
        args.video_frames = "2,4" if args.quick else ("16,32,64" if cuda else "2,16")
    if args.video_preset_frames is None:
        args.video_preset_frames = 2 if args.quick else (32 if cuda else 2)
    if args.video_size is None:
        args.video_size = "320x180" if args.quick else "1280x720"
    if args.preprocess_sizes is None:
        args.preprocess_sizes = "320x240,640x480" if args.quick else "640x480,1024x1024,1920x1080,4000x3000"
    if args.preprocess_repeats is None:
        args.preprocess_repeats = 2 if args.quick else (20 if cuda else 7)


def bench_model(name: str, args: argparse.Namespace, budget: TimeBudget, entry: dict[str, Any],
                save: Any) -> tuple[dict[str, Any], dict[str, float] | None]:
    """The in-process sections for one model; returns the disk-hit job for the child and the miss time."""
    t0 = time.perf_counter()
    qm = ql.load_model(ql.LoadOptions(model=name, dtype=args.dtype, device=args.device))
    entry.update(load_s=time.perf_counter() - t0, family=qm.family.name, device=str(qm.device),
                 dtype=str(qm.dtype).replace("torch.", ""), use_mm_encoder_outputs=qm.use_mm_encoder_outputs,
                 attention=qm.attention, vision_attention=getattr(qm, "vision_attention", qm.attention),
                 params=sum(p.numel() for p in qm.model.parameters()),
                 compile_decode=getattr(qm.options, "compile_decode", "n/a (not in this build)"),
                 vision_params=sum(p.numel() for p in qm.visual.parameters()))
    log.info("[bench] %s built in %.1f s (%s, %s)", name, entry["load_s"], entry["device"], entry["dtype"])
    bench = ModelBench(qm, args, budget, entry)
    miss_s = None
    try:
        bench.warm_start()
        for section, fn in (("single", bench.section_single), ("hash", bench.section_hash),
                            ("multi", bench.section_multi), ("attention", bench.section_attention),
                            ("e2e", bench.section_e2e), ("answers", bench.section_answers),
                            ("video", bench.section_video)):
            if section in args.skip:
                entry["notes"].append(f"section '{section}' skipped (--skip)")
                continue
            t = time.perf_counter()
            fn()
            log.info("[bench] %s: section '%s' took %.1f s", name, section, time.perf_counter() - t)
            save()
        hit = bench.rows.get("cache.memory_hit")
        if hit is not None and hit.status == "ok":
            miss_s = {"time_s": hit.metrics["miss_s"], "cpu_s": hit.metrics["miss_cpu_s"]}
    finally:
        spec_k = bench.disk_image_k
        qm.close()
        del qm, bench
        ql.release_memory()
    common = model_spec(name, args)
    return {**common, "k": spec_k, "repeats": max(5, 2 * int(args.hit_repeats))}, miss_s


def model_spec(name: str, args: argparse.Namespace) -> dict[str, Any]:
    return dict(model=name, dtype=args.dtype, device=args.device, size=int(args.image_size), seed=args.seed,
                quality="balanced")


def render_json(args: argparse.Namespace) -> int:
    """Tables from a saved result; the measuring run's options come from the command stored in it."""
    result = json.loads(Path(args.render_json).read_text())
    run_args = build_parser().parse_args(shlex.split(result["meta"]["command"])[2:])
    apply_defaults(run_args, torch.device(result["meta"]["device"]))
    for entry in result["models"] + ([result["preprocess"]] if result.get("preprocess") else []):
        entry["rows"] = [Row(**r) for r in entry["rows"]]
    result["meta"].setdefault("notes", []).append(
        f"tables re-rendered from the saved JSON (`python bench/benchmark.py --render-json {args.render_json}`): "
        "same measurements, current table layout")
    md = to_markdown(result, run_args)
    if args.markdown:
        Path(args.markdown).write_text(md)
    print(md)
    return 0


def run_meta(args: argparse.Namespace, device: torch.device, command: str, models: list[str]) -> dict[str, Any]:
    """The run's description at the top of the JSON (and the markdown)."""
    meta = dict(command=command, machine=machine_info(device), device=str(device), dtype=args.dtype,
                quick=args.quick, models=models, repeats=args.repeats, hit_repeats=args.hit_repeats,
                multi_repeats=args.multi_repeats or args.repeats, warmup=args.warmup,
                image_size=args.image_size, new_tokens=args.new_tokens, time_budget=args.time_budget,
                answers=dict(images=args.answers_images, new_tokens=args.answers_new_tokens,
                             image_size=args.answers_image_size, quality=args.answers_quality,
                             folder_images=args.folder_images, folder_cache=args.folder_cache),
                video=dict(rows=[list(r) for r in video_rows(args)], size=args.video_size,
                           source_frames=video_source_frames(args), dtype="float32", new_tokens=1),
                preprocess=dict(cases=[list(c) for c in preprocess_cases(args)], repeats=args.preprocess_repeats),
                started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), notes=[])
    if device.type == "cpu":
        meta["notes"].append(
            "CPU device: paired ratios use process CPU time (robust to other tenants); wall times depend on the "
            "machine's load at the moment they were taken.")
    return meta


def run_models(result: dict[str, Any], args: argparse.Namespace, budget: TimeBudget, save: Any) -> int:
    """Every model's in-process sections, then the disk-hit and compile child processes; the exit status."""
    rc = 0
    disk_jobs = []
    cache_dir = tempfile.mkdtemp(prefix="qwenvl-bench-cache-")
    os.environ["QWENVL_FAST_CACHE_DIR"] = cache_dir  # never touch the user's real cache
    caches._CACHES.clear()
    child_env = {**os.environ, "QWENVL_FAST_CACHE_DIR": cache_dir}
    try:
        for name in result["meta"]["models"]:
            entry: dict[str, Any] = dict(model=name, rows=[], notes=[])
            result["models"].append(entry)
            if not budget.allows():
                entry["skipped"] = "--time-budget reached before this model"
                continue
            try:
                spec, miss_s = bench_model(name, args, budget, entry, save)
                disk_jobs.append((entry, spec, miss_s))
            except Exception as exc:
                log.exception("[bench] %s failed", name)
                entry["error"] = f"{type(exc).__name__}: {exc}"
                rc = 1
            save()
        if "disk" not in args.skip:
            section_disk(disk_jobs, budget, child_env, args)
            save()
        for entry in result["models"]:
            if entry.get("error") or entry.get("skipped"):
                continue
            spec = {**model_spec(entry["model"], args), "k": 0, "repeats": max(1, int(args.repeats)),
                    "quality": args.compile_quality}
            section_compile(entry["rows"], spec, args, budget, child_env)
            save()
    finally:
        for cache in caches._CACHES.values():
            if cache.disk is not None:
                cache.disk.close()
        caches._CACHES.clear()
        shutil.rmtree(cache_dir, ignore_errors=True)
    for entry in result["models"]:
        why = entry.get("skipped") or ("--time-budget reached" if budget.left() <= 0 else "not run")
        if entry.get("error"):
            why = f"not run: {entry['error']}"
        complete_rows(entry, args, why)
    return rc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(args)
    if args.render_json:
        return render_json(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    device = ql.resolve_device(args.device)
    apply_defaults(args, device)
    budget = TimeBudget(args.time_budget)
    given = argv if argv is not None else sys.argv[1:]
    command = "python bench/benchmark.py " + " ".join(shlex.quote(a) for a in given)
    # --only preprocess builds no model: the section needs none.
    models = args.model if any(s not in args.skip for s in MODEL_SECTIONS) else []
    result: dict[str, Any] = {"meta": run_meta(args, device, command, models), "models": []}

    def save() -> None:
        result["meta"]["elapsed_s"] = budget.elapsed()
        write_outputs(result, args)

    rc = run_models(result, args, budget, save)
    if "preprocess" not in args.skip:
        t = time.perf_counter()
        result["preprocess"] = run_preprocess(args, device, budget)
        log.info("[bench] section 'preprocess' took %.1f s", time.perf_counter() - t)
    result["meta"]["elapsed_s"] = budget.elapsed()
    md = write_outputs(result, args, final=True)
    print(md)
    return rc
