"""Child processes of the benchmark (``--child``): a disk-tier hit in a fresh process, torch.compile on/off."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.inputs import CHILD_MARK, PROMPT, make_image
from bench.measure import Clock, Row, TimeBudget, median, ratio_basis
from bench.rows import row_labels
from qwenvl_fast import embedding_cache as caches
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.perf_monitor import RunMonitor
from qwenvl_fast.vision.images import pixel_values_for

log = logging.getLogger("QwenVL-Fast")
ENTRY = Path(__file__).resolve().with_name("benchmark.py")  # the script a child process runs (--child)


def child_disk(spec: dict[str, Any]) -> dict[str, Any]:
    """Fresh process: for each model, load it (not timed), then time hits that must come from the disk tier."""
    import diskcache  # noqa: F401  (imported before timing: the parent has it imported too)
    import safetensors.torch  # noqa: F401

    results = {}
    for job in spec["jobs"]:
        try:
            results[job["model"]] = _child_disk_job(job)
        except Exception as exc:
            log.exception("[bench] disk-hit child failed for %s", job["model"])
            results[job["model"]] = dict(error=f"{type(exc).__name__}: {exc}")
        caches._CACHES.clear()
        ql.release_memory()
    return results


def _child_setup(spec: dict[str, Any]):
    """A child process's model (load time measured apart), clock and test image."""
    t0 = time.perf_counter()
    qm = ql.load_model(ql.LoadOptions(model=spec["model"], dtype=spec["dtype"], device=spec["device"]))
    load_s = time.perf_counter() - t0
    return qm, load_s, Clock(qm.device), make_image(spec["size"], spec["seed"], spec["k"])


def _child_disk_job(spec: dict[str, Any]) -> dict[str, Any]:
    qm, load_s, clock, img = _child_setup(spec)
    cache = ql.get_cache(True)
    times, cpus, tiers = [], [], []
    for _ in range(int(spec["repeats"])):
        cache.memory.clear()  # every hit below reads the disk tier, as the first run after a restart does
        x = img.clone()  # a tensor the digest memo has never seen
        gc.collect()  # keep a collector pause out of a millisecond-scale timing
        req = ql.GenerationRequest(prompt=PROMPT, images=[x], image_quality=spec["quality"], max_new_tokens=0,
                                   enable_image_cache=True, disk_cache=True, monitor=True)
        with clock.time() as t:
            rec = qm.run(req).record
        times.append(t["wall"])
        cpus.append(t["cpu"])
        tiers.append(rec.images[0]["cache"])
    out = dict(times=times, cpu=cpus, tiers=tiers, load_s=load_s, vision_calls=qm.vision_calls)
    qm.close()
    return out


def child_compile(spec: dict[str, Any]) -> dict[str, Any]:
    """Encode one image eager vs compiled (steady state, alternated); warm-up reported separately."""
    qm, load_s, clock, img = _child_setup(spec)
    req = ql.GenerationRequest(prompt=PROMPT, images=[img], image_quality=spec["quality"], enable_image_cache=False)
    mon = RunMonitor(enabled=False)
    prepared = qm._prepare([img], req, None, mon)
    pv, grid = pixel_values_for(prepared, qm.image_spec, req.preprocess, mon)

    gpu_times: dict[str, list[float]] = {"eager": [], "compiled": []}
    cpu_times: dict[str, list[float]] = {"eager": [], "compiled": []}

    def encode(kind: str = ""):
        with clock.time() as t, torch.inference_mode():
            out = qm.encode(pv, grid)
        if kind and "gpu" in t:
            gpu_times[kind].append(t["gpu"])
        if kind:
            cpu_times[kind].append(t["cpu"])
        return t["wall"], out

    eager_first, ref_out = encode()
    with clock.time() as t:
        qm.set_compile("on")
    set_s = t["wall"]
    report = qm.compile_report
    if report is None or not getattr(report, "enabled", False):
        return dict(skipped=f"compile_vision_tower did not enable compile: {getattr(report, 'reason', report)}")
    warm1, _ = encode()
    warm2, out = encode()
    diff = float((out[0].embeds.float() - ref_out[0].embeds.float()).abs().max())
    stance = getattr(torch.compiler, "set_stance", None)
    eager, compiled = [], []
    for r in range(int(spec["repeats"])):
        for v in (["compiled", "eager"] if r % 2 == 0 else ["eager", "compiled"]):
            if v == "eager":
                if stance is None:
                    continue
                with torch.compiler.set_stance("force_eager"):
                    eager.append(encode("eager")[0])
            else:
                compiled.append(encode("compiled")[0])
    note = ""
    if stance is None:  # old torch: eager only measured before compiling
        eager = [eager_first]
        note = "eager measured once before compiling (torch.compiler.set_stance unavailable)"
    return dict(eager=eager, compiled=compiled, warmup=[warm1, warm2], set_compile_s=set_s, max_abs_diff=diff,
                load_s=load_s, eager_first=eager_first, note=note, gpu_event_s=gpu_times, cpu_s=cpu_times,
                report_warmup_s=getattr(report, "warmup_s", None))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (OSError, AttributeError):  # already gone, or no process groups (Windows)
        proc.kill()
    proc.wait()


def run_child(kind: str, spec: dict[str, Any], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(ENTRY), "--child", kind, "--child-spec", json.dumps(spec)]
    log.info("[bench] child process (%s), timeout %.0f s", kind, timeout)
    # Its own session, so that a timeout kills the child and everything it started (compile workers).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise
    except BaseException:
        _kill_group(proc)
        raise
    for line in reversed(stdout.splitlines()):
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):])
    raise RuntimeError(f"child '{kind}' exited with {proc.returncode} and no result")


def child_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    spec = json.loads(args.child_spec)
    try:
        out = child_disk(spec) if args.child == "disk" else child_compile(spec)
    except Exception as exc:  # reported to the parent as a failed row
        log.exception("[bench] child failed")
        out = dict(error=f"{type(exc).__name__}: {exc}")
    print(CHILD_MARK + json.dumps(out), flush=True)
    return 0


def section_disk(jobs: list[tuple[dict[str, Any], dict[str, Any], dict[str, float] | None]], budget: TimeBudget,
                 env: dict[str, str], args: argparse.Namespace) -> None:
    """One fresh child process times the disk-tier hits of every model (jobs: entry, spec, parent miss time)."""
    rows = []
    labels = row_labels(args)
    for entry, spec, miss_s in jobs:
        row = Row("cache.disk_hit", *labels["cache.disk_hit"])
        entry["rows"].append(row)
        if spec.get("k") is None:
            row.status, row.reason = "skipped", "no balanced image was cached (single-image section did not run)"
        else:
            rows.append((row, spec, miss_s))
    if not rows:
        return

    def fail(status: str, reason: str) -> None:
        for row, _, _ in rows:
            row.status, row.reason = status, reason

    if not budget.allows():
        return fail("skipped", "--time-budget reached")
    try:
        outs = run_child("disk", {"jobs": [spec for _, spec, _ in rows]}, min(900.0, max(1.0, budget.left())), env)
    except subprocess.TimeoutExpired:
        return fail("skipped", "the child process did not finish within the time budget")
    except Exception as exc:
        return fail("failed", str(exc))
    if "error" in outs:
        return fail("failed", outs["error"])
    for row, spec, miss_s in rows:
        out = outs.get(spec["model"], {"error": "no result from the child"})
        if "error" in out:
            row.status, row.reason = "failed", out["error"]
            continue
        if any(t != "disk" for t in out["tiers"]) or out["vision_calls"]:
            row.status = "failed"
            row.reason = f"expected disk hits without encoding, got tiers {out['tiers']}, {out['vision_calls']} encodes"
            continue
        row.samples["time_s"], row.samples["cpu_s"] = out["times"], out["cpu"]
        row.metrics["first_s"], row.metrics["first_cpu_s"] = out["times"][0], out["cpu"][0]
        row.metrics["time_s"], row.metrics["cpu_s"] = median(out["times"]), median(out["cpu"])
        row.info.update(rounds=len(out["times"]), child_load_s=out["load_s"])
        if miss_s:
            B = ratio_basis(spec["device"] if spec["device"] != "auto" else ql.resolve_device("auto"))
            first = "first_cpu_s" if B == "cpu_s" else "first_s"
            row.metrics["miss_s"] = miss_s["time_s"]
            row.metrics["miss_over_hit"] = miss_s[B] / row.metrics[B]
            row.metrics["miss_over_first_hit"] = miss_s[B] / row.metrics[first]


def section_compile(rows: list[Row], spec: dict[str, Any], args: argparse.Namespace, budget: TimeBudget,
                    env: dict[str, str]) -> None:
    labels = row_labels(args)
    off = Row("compile.off", *labels["compile.off"])
    on = Row("compile.on", *labels["compile.on"])
    rows.extend([off, on])

    def skip(reason: str, status: str = "skipped") -> None:
        for r in (off, on):
            r.status, r.reason = status, reason

    if args.quick:
        return skip("--quick skips torch.compile")
    if "compile" in args.skip:
        return skip("--skip compile")
    if importlib.util.find_spec("qwenvl_fast.vision.tower_compile") is None:
        return skip("vision/tower_compile.py is not in the pack")
    if args.compile_budget <= 0:
        return skip("--compile-budget 0")
    timeout = min(float(args.compile_budget), budget.left())
    if timeout <= 30:
        return skip("--time-budget reached (less than 30 s left for compile)")
    try:
        out = run_child("compile", spec, timeout, env)
    except subprocess.TimeoutExpired:
        return skip(f"compile + measurement did not finish within {timeout:.0f} s (--compile-budget/--time-budget)")
    except Exception as exc:
        return skip(str(exc), "failed")
    if "error" in out:
        return skip(out["error"], "failed")
    if "skipped" in out:
        return skip(out["skipped"])
    off.samples["time_s"], on.samples["time_s"] = out["eager"], out["compiled"]
    off.metrics["time_s"], on.metrics["time_s"] = median(out["eager"]), median(out["compiled"])
    cpu = out.get("cpu_s") or {}
    for row, kind in ((off, "eager"), (on, "compiled")):
        if cpu.get(kind):
            row.samples["cpu_s"] = cpu[kind]
            row.metrics["cpu_s"] = median(cpu[kind])
    B = ratio_basis(spec["device"] if spec["device"] != "auto" else ql.resolve_device("auto"))
    if B not in on.metrics or B not in off.metrics:
        B = "time_s"
    on.metrics["speedup_vs_eager"] = off.metrics[B] / on.metrics[B]
    on.metrics["warmup_first_s"], on.metrics["warmup_second_s"] = out["warmup"]
    on.info.update(max_abs_diff=out["max_abs_diff"], set_compile_s=out["set_compile_s"], note=out["note"],
                   report_warmup_s=out["report_warmup_s"], rounds=len(out["compiled"]))
    off.info.update(rounds=len(out["eager"]), note=out["note"])
