#!/usr/bin/env python
"""Caption Folder throughput: one folder of mixed-size images captioned three ways, side by side in one run.

    python bench/caption_throughput.py --json docs/benchmark-cpu-caption-throughput.json \\
        --markdown docs/benchmark-cpu-caption-throughput.md          # 64 images, 3 rounds; ~15 min on 2 cores
    python bench/caption_throughput.py --quick                      # smoke run: 8 small images, 1 round

The rows, each a whole Caption Folder run (``captioning.caption_folder``: read the files, answer, write the
caption files) over a folder of ``--images`` files of several sizes (PNG and, for the large ones, JPEG):

(a) ``one_by_one``: the local model, one image per ``run_once`` (``captioning.CHUNK`` set to 1);
(b) ``batched``: the local model, Caption Folder's own chunks (``CHUNK`` images per ``run_once``, encoded
    together, one answer per image generated in one batch);
(c) ``server``: the server backend against a real vLLM (OpenAI-compatible, its CPU build) serving the same model
    folder, ``--in-flight`` requests in flight. vLLM is started as ``tests/vllm_server.py`` does (its venv:
    ``$QWENVL_FAST_VLLM_VENV``); without it the row is skipped with the reason. ``--server-url`` uses a running
    server instead.

The model is ``synthetic:tiny-qwen2.5-vl-h64`` written to a folder (random weights, the real architecture and
processor; vLLM's CPU attention needs head size 64), so every row runs the same weights. Answers have a fixed
length (``min_new_tokens = max_new_tokens``; ``ignore_eos`` on the server).

Every pass captions a folder never seen before (its files carry a pass number in four pixels, written before the
clock starts), so no row gains from an embedding cache, a digest memo or vLLM's multimodal cache of a previous
pass; the pack's memory caches are emptied before each pass as well. Rounds alternate the rows, rotating their
order; a ratio is computed inside each round (wall time: the server's work is in another process, so this
process's CPU time cannot compare it) and reported as the median over rounds with its spread (min-max).

Where the time goes: the stages of every run record (``run_once``'s RunRecord: hash, preprocess, transfer, encode,
prefill, decode, upload...) summed over the pass, and ``outside run_once`` = wall - the runs' totals (reading and
decoding the image files, writing the captions). The server's request stages (upload = sent until its first byte,
queue included; prefill = first token; decode) are summed over requests that overlap in flight, so they can add
up to more than the wall time.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository root on sys.path, not bench/ (see benchmark.py)
    HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, str(HERE.parent))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import bench  # noqa: E402, F401  (the pack as qwenvl_fast)
from bench.cli import machine_info  # noqa: E402
from bench.fmt import fmt_ratio, fmt_time  # noqa: E402
from bench.inputs import CAPTION_PROMPT, cut_by_design, make_uint8_image  # noqa: E402
from qwenvl_fast import captioning as bc  # noqa: E402
from qwenvl_fast import embedding_cache as caches  # noqa: E402
from qwenvl_fast import qwenvl_loader as ql  # noqa: E402
from qwenvl_fast.core.settings import env_float  # noqa: E402
from qwenvl_fast.sources import synthetic  # noqa: E402

log = logging.getLogger("QwenVL-Fast.bench")  # INFO while the engine's own logger says WARNING only

ROOT = Path(__file__).resolve().parents[1]
MODEL_PRESET = "synthetic:tiny-qwen2.5-vl-h64"
SERVED_NAME = "tiny-qwen2.5-vl"
VARIANTS = ("one_by_one", "batched", "server", "server_per_image")
LOCAL = ("one_by_one", "batched")
SERVER = ("server", "server_per_image")
# The per-image row's prompt: Caption Folder fills ``{name}`` per file, so every request has its own prompt.
PER_IMAGE_PROMPT = CAPTION_PROMPT + " The file is called {name}."
LABELS = {
    "one_by_one": "(a) local, one by one (1 image per run_once)",
    "batched": f"(b) local, batched ({bc.CHUNK} images per run_once, answers batched)",
    "server": "(c) server backend -> vLLM (CPU build), one shared prompt",
    "server_per_image": "(d) server backend -> vLLM (CPU build), a prompt per image ({name})",
}
# (width, height, format): small to large photos; the large ones as JPEG, as cameras write them.
SIZES = [(320, 240, "png"), (640, 480, "png"), (1024, 768, "png"), (1920, 1080, "jpg"), (4000, 3000, "jpg")]
QUICK_SIZES = [(96, 64, "png"), (320, 240, "png"), (1024, 768, "jpg")]
STAGE_ORDER = ("load", "hash", "preprocess", "transfer", "encode", "cache", "prompt", "upload", "prefill", "decode")


# ---------------------------------------------------------------------------------------------------- inputs
class Folders:
    """Folders of ``n`` image files cycling through ``sizes``; each pass a new folder whose files carry the pass
    number in four pixels (new content for every cache), written before the clock starts."""

    def __init__(self, n: int, sizes: list[tuple[int, int, str]], seed: int, root: Path) -> None:
        self.n, self.sizes, self.root = n, sizes, root
        self.bases = {(w, h): make_uint8_image(w, h, seed).numpy() for w, h, _ in sizes}
        self.count = 0

    def write(self) -> Path:
        from PIL import Image

        self.count += 1
        folder = self.root / f"pass_{self.count:03d}"
        folder.mkdir(parents=True)
        for i in range(self.n):
            w, h, fmt = self.sizes[i % len(self.sizes)]
            arr = self.bases[(w, h)].copy()
            stamp = self.count * 1000 + i
            for j in range(4):
                arr[0, j, 0] = (stamp >> (8 * j)) & 255
            Image.fromarray(arr).save(folder / f"img_{i:03d}.{fmt}", **({"quality": 90} if fmt == "jpg" else {}))
        return folder

    def describe(self) -> str:
        counts = {}
        for i in range(self.n):
            w, h, fmt = self.sizes[i % len(self.sizes)]
            counts[(w, h, fmt)] = counts.get((w, h, fmt), 0) + 1
        return ", ".join(f"{c}x {w}x{h} {fmt.upper()}" for (w, h, fmt), c in counts.items())


# ------------------------------------------------------------------------------------------------- measuring
@contextlib.contextmanager
def recorded_runs() -> Iterator[list[Any]]:
    """Every ``run_once`` record made inside the block (``caption_folder`` calls ``ql.run_once``)."""
    records: list[Any] = []
    inner = ql.run_once

    def recording(*args: Any, **kwargs: Any) -> Any:
        result = inner(*args, **kwargs)
        records.append(result.record)
        return result

    ql.run_once = recording
    try:
        yield records
    finally:
        ql.run_once = inner


@contextlib.contextmanager
def chunk_of(size: int | None) -> Iterator[None]:
    """Caption Folder's local chunk size set to ``size`` inside the block (None: unchanged)."""
    from qwenvl_fast.captioning import run as caption_run

    before = caption_run.CHUNK
    if size is not None:
        caption_run.CHUNK = size
    try:
        yield
    finally:
        caption_run.CHUNK = before


def empty_memory_caches() -> None:
    for cache in caches._CACHES.values():
        cache.memory.clear()
        cache.digests.clear()
    gc.collect()


def caption_pass(variant: str, options: ql.LoadOptions, folder: Path, request: ql.GenerationRequest, n: int,
                 manager: ql.ModelManager) -> dict[str, Any]:
    """One Caption Folder run over ``folder``: its wall and CPU time, its runs' stages, the files' statuses."""
    empty_memory_caches()
    caption = bc.CaptionOptions(existing="overwrite")
    with chunk_of(1 if variant == "one_by_one" else None), recorded_runs() as records:
        t0, c0 = time.perf_counter(), time.process_time()
        results = bc.caption_folder(options, folder, request, caption=caption, keep_model_loaded=True,
                                    manager=manager)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # Every answer is generated to the fixed length (min_new_tokens = max_new_tokens, ignore_eos), so Caption Folder
    # refuses it as cut (issue 27: only complete answers are written); an empty answer (random weights can give
    # tokens that decode to nothing) was generated too. Both count as answered and are reported; any other error
    # fails the pass.
    empty = sum(r.status == bc.EMPTY_ANSWER for r in results)
    cut = sum(cut_by_design(r.status) for r in results)
    bad = [f"{r.path.name}: {r.status}" for r in results
           if r.status not in ("written", bc.EMPTY_ANSWER) and not cut_by_design(r.status)]
    if len(results) != n or bad:
        raise RuntimeError(f"{variant}: {len(results)} results for {n} files; failed: {bad[:3]}")
    stages: dict[str, float] = {}
    for rec in records:
        for name, seconds in rec.stages.items():
            stages[name] = stages.get(name, 0.0) + float(seconds)
    run_total = sum(float(rec.total_s) for rec in records)
    return dict(wall_s=wall, cpu_s=cpu, captions_per_s=n / wall, runs=len(records), run_total_s=run_total,
                outside_s=max(0.0, wall - run_total), stages=stages, empty_answers=empty, cut_answers=cut,
                new_tokens=sum(int(rec.new_tokens) for rec in records),
                visual_tokens=sum(int(i.get("tokens", 0)) for rec in records for i in rec.images))


def expected_runs(variant: str, n: int, in_flight: int) -> int:
    # The per-image row must go in the same chunks as the shared prompt: each answer carries its own prompt.
    per_run = {"one_by_one": 1, "batched": bc.CHUNK}.get(variant, 2 * max(1, in_flight))
    return math.ceil(n / per_run)


# ------------------------------------------------------------------------------------------------- the server
def start_vllm(model_dir: Path, log_dir: Path) -> tuple[Any, str | None]:
    """A vLLM server for ``model_dir`` as the tests start it (tests/vllm_server.py), or (None, why not)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    try:
        import vllm_server as vs
    except ImportError as exc:
        return None, f"tests/vllm_server.py cannot be imported ({exc})"
    reason = vs.vllm_missing_reason()
    if reason:
        return None, reason
    server = vs.VllmServer(model_dir, served_name=SERVED_NAME, log_path=log_dir / "vllm-server.log")
    try:
        server.start(timeout=env_float("QWENVL_FAST_VLLM_START_TIMEOUT", 300.0, 1.0))
    except Exception as exc:
        return None, f"vLLM did not start: {str(exc)[:2000]}"
    log.info("[bench] vLLM answered /health after %.1f s at %s", server.start_seconds, server.url)
    return server, None


def group_cpu_s(pgid: int) -> float:
    """CPU time (user + system) of every live process in process group ``pgid`` (Linux /proc; 0.0 elsewhere)."""
    total = 0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / tick


class PausedServer:
    """The vLLM we started, stopped (SIGSTOP to its process group) while the local rows run: an idle vLLM on CPU
    still polls, and would take cores from the local rows it is compared with. Continued for its own row."""

    def __init__(self, server: Any) -> None:
        self.server = server

    @property
    def pgid(self) -> int | None:
        proc = getattr(self.server, "proc", None)
        return proc.pid if proc is not None and proc.poll() is None else None

    def _signal(self, sig: int) -> None:
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        if self.server is not None and not self.server.healthy():  # answering again before the clock starts
            raise RuntimeError("vLLM did not answer /health after being continued")


# ----------------------------------------------------------------------------------------------------- the run
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Caption Folder throughput: one by one vs batched vs a vLLM server, "
                                            "side by side in one run.")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 small images, 1 round, 4 new tokens")
    p.add_argument("--images", type=int, default=None, help="image files in the folder (default 64; 8 quick)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; 1 quick)")
    p.add_argument("--new-tokens", type=int, default=None, help="exact new tokens per caption (default 16; 4 quick)")
    p.add_argument("--quality", default="fast", help="image preset of every row (default fast)")
    p.add_argument("--in-flight", type=int, default=ql.LoadOptions.server_max_in_flight,
                   help="server row: requests in flight")
    p.add_argument("--model", default=MODEL_PRESET,
                   help=f"a synthetic preset (default {MODEL_PRESET}; e.g. synthetic:qwen2.5-vl-3b, the 3B size) "
                        "or a model folder; written to a temp folder only when a vLLM is started for it")
    p.add_argument("--model-dir", help="local model folder (same as --model FOLDER)")
    p.add_argument("--rows", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="which rows run (default all)")
    p.add_argument("--server-url", help="server row: use this running server (OpenAI-compatible base URL) "
                                        "instead of starting vLLM")
    p.add_argument("--server-model", default="", help="with --server-url: the served model's name")
    p.add_argument("--no-server", action="store_true", help="skip the server rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result (with every pass's raw numbers) to this file")
    p.add_argument("--markdown", help="write the tables to this file")
    return p


def apply_defaults(args: argparse.Namespace) -> None:
    if args.images is None:
        args.images = 8 if args.quick else 64
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.new_tokens is None:
        args.new_tokens = 4 if args.quick else 16


def summarize_row(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the timed passes of one row, with min-max of the captions per second."""
    if not passes:
        return {}
    med = {k: statistics.median(p[k] for p in passes) for k in ("wall_s", "cpu_s", "captions_per_s", "run_total_s",
                                                                 "outside_s", "runs", "new_tokens",
                                                                 "visual_tokens", "empty_answers")}
    if all("server_cpu_s" in p for p in passes):
        med["server_cpu_s"] = statistics.median(p["server_cpu_s"] for p in passes)
    names = sorted({s for p in passes for s in p["stages"]},
                   key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s))
    med["stages"] = {s: statistics.median(p["stages"].get(s, 0.0) for p in passes) for s in names}
    rates = [p["captions_per_s"] for p in passes]
    med["captions_per_s_min"], med["captions_per_s_max"] = min(rates), max(rates)
    return med


def warm_up(variants: list[str], options: dict[str, ql.LoadOptions], managers: dict[str, ql.ModelManager],
            request: ql.GenerationRequest, paused: Any, warm: Any, meta: dict[str, Any]) -> None:
    """Untimed: load the model (and connect), one small folder through every row; what an idle vLLM costs."""
    for v in variants:
        folder = warm.write()
        (paused.resume if v in SERVER else paused.pause)()
        t0 = time.perf_counter()
        managers[v].get(options[v])
        bc.caption_folder(options[v], folder, request_for(v, request),
                          caption=bc.CaptionOptions(existing="overwrite"), manager=managers[v])
        log.info("[bench] warm-up %s: %.1f s", v, time.perf_counter() - t0)
        shutil.rmtree(folder, ignore_errors=True)
        # What an idle vLLM costs: the reason it is paused for the others.
        if v in SERVER and paused.pgid and "vllm_idle_cpu_s_per_s" not in meta:
            cpu0, t0 = group_cpu_s(paused.pgid), time.perf_counter()
            time.sleep(3.0)
            idle = (group_cpu_s(paused.pgid) - cpu0) / (time.perf_counter() - t0)
            meta["vllm_idle_cpu_s_per_s"] = idle
            log.info("[bench] idle vLLM: %.2f CPU seconds per second", idle)


def timed_pass(v: str, options: ql.LoadOptions, folder: Path, request: ql.GenerationRequest,
               args: argparse.Namespace, manager: ql.ModelManager, paused: Any) -> dict[str, Any]:
    """One timed pass of row ``v`` (only the server row's vLLM runs meanwhile), checked for its run count."""
    (paused.resume if v in SERVER else paused.pause)()
    cpu0 = group_cpu_s(paused.pgid) if v in SERVER and paused.pgid else None
    p = caption_pass(v, options, folder, request_for(v, request), int(args.images), manager)
    if cpu0 is not None:
        p["server_cpu_s"] = group_cpu_s(paused.pgid) - cpu0
    want = expected_runs(v, int(args.images), int(args.in_flight))
    if p["runs"] != want:
        raise RuntimeError(f"{v}: {p['runs']} run_once calls, expected {want}")
    return p


def new_result(args: argparse.Namespace, command: str, folders: Any) -> dict[str, Any]:
    """The result record before any pass: the run's settings and machine, one empty row per variant."""
    rows = {v: dict(id=v, label=LABELS[v], status="ok", reason="", passes=[]) for v in VARIANTS}
    meta = dict(command=command, machine=machine_info(ql.resolve_device("cpu")),
                started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), images=args.images, files=folders.describe(),
                rounds=args.rounds, new_tokens=args.new_tokens, quality=args.quality, in_flight=args.in_flight,
                chunk=bc.CHUNK, notes=[])
    return dict(meta=meta, rows=rows, ratios={})


def request_for(variant: str, request: ql.GenerationRequest) -> ql.GenerationRequest:
    """The row's request: the per-image row's prompt names the file, so no two images share a prompt."""
    if variant == "server_per_image":
        return dataclasses.replace(request, prompt=PER_IMAGE_PROMPT)
    return request


def add_ratios(ratios: dict[str, list[float]], passes: dict[str, dict[str, Any]]) -> None:
    """One round's speed-ups (wall time), measured side by side in that round: every row over one by one, and
    the per-image prompts over the shared prompt (``per_image_vs_shared``, 1.0 = as fast)."""
    base = passes.get("one_by_one")
    for v, p in passes.items():
        if base is not None:
            ratios.setdefault(v, []).append(base["wall_s"] / p["wall_s"])
    shared, per_image = passes.get("server"), passes.get("server_per_image")
    if shared is not None and per_image is not None:
        ratios.setdefault("per_image_vs_shared", []).append(shared["wall_s"] / per_image["wall_s"])


def row_options(args: argparse.Namespace, work: Path, result: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Each wanted row's LoadOptions, and the vLLM started for the server rows (None when none was): the model is
    written to a folder only for vLLM; the local rows load a synthetic preset directly."""
    rows, meta = result["rows"], result["meta"]
    for v in VARIANTS:
        if v not in args.rows:
            rows[v].update(status="skipped", reason="not in --rows")
    wanted_servers = [v for v in SERVER if v in args.rows]
    model = args.model_dir or args.model
    meta["model"] = model if not synthetic.is_synthetic_name(model) else f"{model} (random weights)"
    if wanted_servers and args.no_server:
        for v in wanted_servers:
            rows[v].update(status="skipped", reason="--no-server")
        wanted_servers = []
    server, url, reason = None, args.server_url, None
    if wanted_servers and not url:
        model_dir = (synthetic.save_synthetic(model, work / "model") if synthetic.is_synthetic_name(model)
                     else Path(model))
        model = str(model_dir)
        server, reason = start_vllm(model_dir, work)
        url = server.url if server else None
        if server:
            meta["vllm_start_s"] = server.start_seconds
    local = ql.LoadOptions(model=model, device="cpu")
    options: dict[str, Any] = {v: local for v in LOCAL if v in args.rows}
    for v in wanted_servers:
        if reason:
            rows[v].update(status="skipped", reason=reason)
            continue
        options[v] = ql.LoadOptions(model="(served)", backend="server", server_url=url,
                                    server_model=args.server_model or (SERVED_NAME if server else ""),
                                    server_max_in_flight=int(args.in_flight))
    return options, server


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="qwenvl-bench-caption-"))
    os.environ["QWENVL_FAST_CACHE_DIR"] = str(work / "cache")  # never the user's cache
    caches._CACHES.clear()
    sizes = QUICK_SIZES if args.quick else SIZES
    folders = Folders(int(args.images), sizes, args.seed, work)
    result = new_result(args, command, folders)
    rows: dict[str, dict[str, Any]] = result["rows"]
    server = None
    t_start = time.perf_counter()
    try:
        options, server = row_options(args, work, result)
        request = ql.GenerationRequest(prompt=CAPTION_PROMPT, image_quality=args.quality,
                                       max_new_tokens=int(args.new_tokens), min_new_tokens=int(args.new_tokens),
                                       disk_cache=False)
        variants = [v for v in VARIANTS if v in options]
        paused = PausedServer(server)
        local_manager = ql.ModelManager()  # the local rows share one model: a 3B-size one twice would not fit
        managers = {v: local_manager if v in LOCAL else ql.ModelManager() for v in variants}
        warm_up(variants, options, managers, request, paused,
                Folders(min(4, int(args.images)), sizes, args.seed + 1, work / "warm"), result["meta"])
        for r in range(int(args.rounds)):
            if not variants:  # every row failed (each says why)
                break
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            got: dict[str, dict[str, Any]] = {}
            for v in order:
                folder = folders.write()
                try:
                    p = got[v] = timed_pass(v, options[v], folder, request, args, managers[v], paused)
                    rows[v]["passes"].append(dict(p, round=r))
                    log.info("[bench] round %d %s: %d captions in %s (%.2f captions/s)", r, v, args.images,
                             fmt_time(p["wall_s"]), p["captions_per_s"])
                except Exception as exc:
                    log.exception("[bench] %s failed", v)
                    rows[v].update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:500]}")
                    options.pop(v, None)
                    variants = [x for x in variants if x != v]
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
            add_ratios(result["ratios"], got)
        for m in {id(m): m for m in managers.values()}.values():
            m.release()
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                PausedServer(server).resume()
            server.stop()
        for cache in caches._CACHES.values():
            if cache.disk is not None:
                cache.disk.close()
        caches._CACHES.clear()
        shutil.rmtree(work, ignore_errors=True)
    for row in rows.values():
        row["metrics"] = summarize_row(row["passes"])
        if row["status"] == "ok" and not row["passes"]:
            row.update(status="skipped", reason="no pass ran")
    result["meta"]["elapsed_s"] = time.perf_counter() - t_start
    with contextlib.suppress(OSError, AttributeError):
        result["meta"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


# ------------------------------------------------------------------------------------------------------ report
def spread_text(values: list[float], fmt=fmt_ratio) -> str:
    if not values:
        return "-"
    med = fmt(statistics.median(values))
    return f"{med} (1 round)" if len(values) == 1 else f"{med} ({fmt(min(values))}-{fmt(max(values))})"


def to_markdown(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    mach = meta["machine"]
    lines = ["# Caption Folder throughput", "", "```", meta["command"], "```", "",
             f"- machine: CPU {mach['cpu']}, {mach['cpu_count']} cores ({mach['torch_threads']} torch threads), "
             f"load average at start {mach.get('load_average')}, at the end {meta.get('load_average_end')}; "
             f"torch {mach['torch']}, transformers "
             f"{mach['transformers']}, Python {mach['python']}",
             f"- model: {meta.get('model')}; random weights, so the captions are meaningless, their cost is real",
             f"- folder: {meta['images']} files ({meta['files']}), `{meta['quality']}` preset, exactly "
             f"{meta['new_tokens']} new tokens per caption, captions written (`existing=overwrite`)",
             f"- {meta['rounds']} round(s), rows alternating (order rotated each round); every pass a folder never "
             "seen before (no cache of an earlier pass helps); ratios from wall time, paired within each round",
             f"- started {meta['started']}, took {fmt_time(meta.get('elapsed_s'))}"
             + (f"; vLLM answered /health after {meta['vllm_start_s']:.0f} s" if meta.get("vllm_start_s") else ""),
             ""]
    lines += ["| Row | Captions/s (min-max) | Wall per pass | CPU: this process (+ vLLM's) | run_once calls | "
              "vs (a), paired |", "|---|---|---|---|---|---|"]
    for v, row in rows.items():
        m = row.get("metrics") or {}
        if row["status"] != "ok" or not m:
            lines.append(f"| {row['label']} | {row['status']}: {row['reason'][:300]} | - | - | - | - |")
            continue
        rate = (f"{m['captions_per_s']:.2f} ({m['captions_per_s_min']:.2f}-{m['captions_per_s_max']:.2f})"
                if len(row["passes"]) > 1 else f"{m['captions_per_s']:.2f} (1 round)")
        cpu = fmt_time(m["cpu_s"]) + (f" (+ {fmt_time(m['server_cpu_s'])})" if "server_cpu_s" in m else "")
        lines.append(f"| {row['label']} | {rate} | {fmt_time(m['wall_s'])} | {cpu} | "
                     f"{m['runs']:.0f} | {spread_text(result['ratios'].get(v, []))} |")
    pairs = result["ratios"].get("per_image_vs_shared", [])
    if pairs:
        lines += ["", f"Per-image prompts vs one shared prompt on the server backend (shared wall / per-image wall, "
                      f"paired within each round; 1.00x = as fast): {spread_text(pairs)}"]
    lines += ["", "Where the time goes (median per pass; run records' stages summed over the pass's run_once calls; "
              "`outside run_once` = wall - the runs' totals: reading and decoding the files, writing the captions):",
              ""]
    names: list[str] = []
    for row in rows.values():
        for s in (row.get("metrics") or {}).get("stages", {}):
            if s not in names:
                names.append(s)
    names.sort(key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s))
    lines += ["| Row | " + " | ".join(names) + " | Σ run_once | outside run_once | visual tokens | new tokens |",
              "|---|" + "---|" * (len(names) + 4)]
    for row in rows.values():
        m = row.get("metrics") or {}
        if row["status"] != "ok" or not m:
            continue
        st = m["stages"]
        lines.append(f"| {row['label']} | " + " | ".join(fmt_time(st.get(s)) if s in st else "-" for s in names)
                     + f" | {fmt_time(m['run_total_s'])} | {fmt_time(m['outside_s'])} | {m['visual_tokens']:.0f} | "
                     f"{m['new_tokens']:.0f} |")
    empty = {v: r["metrics"].get("empty_answers", 0) for v, r in rows.items() if r.get("metrics")}
    lines += ["", "The server row's upload / prefill / decode are per-request times summed over requests that overlap "
              "in flight (upload: sent until the first byte, vLLM's queue included), so they can exceed the wall "
              "time; its hash and preprocess are this process's (the preset shrinks each image before upload). "
              "vLLM's CPU time (all its processes, from /proc) is shown apart. vLLM is stopped (SIGSTOP to its process "
              "group) while the local rows run and continued for its own, so that it takes no core from them"
              + (f" (idle, it used {meta['vllm_idle_cpu_s_per_s']:.2f} CPU seconds per second here)."
                 if meta.get("vllm_idle_cpu_s_per_s") is not None else ".")]
    if any(empty.values()):
        lines.append(f"- empty answers per pass (tokens that decode to nothing; generated all the same, counted as "
                     f"answered): {empty}")
    for note in meta.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_defaults(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("QwenVL-Fast").setLevel(logging.WARNING)  # no line per run_once
    log.setLevel(logging.INFO)
    given = argv if argv is not None else sys.argv[1:]
    command = "python bench/caption_throughput.py " + " ".join(shlex.quote(a) for a in given)
    result = run(args, command)
    md = to_markdown(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(md)
    print(md)
    failed = [v for v, r in result["rows"].items() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
