"""The per-model bench's plumbing: rows, rounds under the time budget, the pack's and the reference path."""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from bench.inputs import PROMPT, make_image
from bench.measure import Clock, Row, TimeBudget, median, ratio_basis
from bench.rows import row_labels
from qwenvl_fast import quality_presets as qp
from qwenvl_fast import qwenvl_loader as ql

log = logging.getLogger("QwenVL-Fast")


class Bench:
    """One loaded model under measurement: rows, rounds, the time budget, and the paths every section times."""

    def __init__(self, qm: ql.QwenVLModel, args: argparse.Namespace, budget: TimeBudget, result: dict[str, Any]):
        self.qm = qm
        self.args = args
        self.budget = budget
        self.result = result  # this model's entry in the JSON
        self.clock = Clock(qm.device)
        self.rows: dict[str, Row] = {}
        self.next_k = 1
        self.size = int(args.image_size)
        self.disk_image_k: int | None = None
        self.cache = ql.get_cache(True)
        self.basis = ratio_basis(qm.device)

    # -- plumbing --------------------------------------------------------------------------
    def ids(self, *rids: str) -> list[tuple[str, str, str]]:
        labels = row_labels(self.args)
        out = [(rid, *labels[rid]) for rid in rids]
        for rid, section, label in out:
            self.row(rid, section, label)
        return out

    def row(self, rid: str, section: str, label: str) -> Row:
        if rid not in self.rows:
            self.rows[rid] = Row(rid, section, label)
            self.result["rows"].append(self.rows[rid])
        return self.rows[rid]

    def new_image(self) -> tuple[int, torch.Tensor]:
        k = self.next_k
        self.next_k += 1
        return k, make_image(self.size, self.args.seed, k)

    def request(self, images: list[torch.Tensor], quality: str, cache: bool = True, new_tokens: int = 0):
        return ql.GenerationRequest(prompt=PROMPT, images=images, image_quality=quality, enable_image_cache=cache,
                                    disk_cache=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False, seed=0, monitor=True)

    def pack_run(self, images: list[torch.Tensor], quality: str, cache: bool = True, new_tokens: int = 0):
        """The engine's own path (``QwenVLModel.run``); with new_tokens=0 it stops after the prompt is built."""
        req = self.request(images, quality, cache, new_tokens)
        with self.clock.time() as t:
            res = self.qm.run(req)
        return t["wall"], res.record, t["cpu"]

    def rounds(self, section: str, n: int) -> Iterator[tuple[int, bool]]:
        """(round index, is_warmup) with the time budget applied before each round."""
        warm = int(self.args.warmup)
        last = 0.0
        for r in range(warm + n):
            if not self.budget.allows(last if r > 0 else 0.0):
                msg = f"{section}: stopped after {max(0, r - warm)} timed round(s): --time-budget reached"
                log.warning("[QwenVL-Fast] %s", msg)
                self.result["notes"].append(msg)
                return
            t0 = time.perf_counter()
            yield r, r < warm
            last = time.perf_counter() - t0

    def skip_section(self, ids_labels: list[tuple[str, str, str]], reason: str) -> None:
        for rid, section, label in ids_labels:
            row = self.row(rid, section, label)
            if not row.samples:
                row.status, row.reason = "skipped", reason

    def finish_rows(self, ids: list[str], why_empty: str) -> None:
        """Medians of the samples; a row with no samples is marked skipped."""
        for rid in ids:
            row = self.rows.get(rid)
            if row is None:
                continue
            if not any(row.samples.values()):
                if row.status == "ok":
                    row.status, row.reason = "skipped", why_empty
                continue
            for key, vals in row.samples.items():
                if vals:
                    row.metrics[key] = median(vals)
            row.info["rounds"] = max(len(v) for v in row.samples.values())

    @staticmethod
    def add(row: Row, **values: float) -> None:
        for k, v in values.items():
            row.samples.setdefault(k, []).append(float(v))

    def warm_start(self) -> None:
        """One small run so that thread pools, allocators and kernels are initialised before timing."""
        img = make_image(64, self.args.seed, 0)
        self.pack_run([img], "fast", cache=False)

    # -- reference path (how existing packs embed an image) ----------------------------------
    @contextmanager
    def stock_attention(self) -> Iterator[None]:
        """The reference runs transformers' own vision attention, as other packs do (not the pack's grouped SDPA)."""
        grouped = getattr(self.qm, "vision_attention", None) == "grouped sdpa"
        # The module the engine itself imported (a lookup by module name finds nothing once the pack is
        # imported as a package, and the reference would then silently keep the pack's grouped SDPA).
        va = ql.vision_attention if grouped else None
        if va is not None:
            va.disable_grouped_vision_attention(self.qm.model)
        try:
            yield
        finally:
            if va is not None:
                va.enable_grouped_vision_attention(self.qm.model)

    def reference_pixels(self, img: torch.Tensor, processor_call: bool = False, text: str | None = None):
        import numpy as np
        from PIL import Image

        lo, hi = qp.preset_pixels("ultra", self.qm.family.factor)
        pil = Image.fromarray(np.clip(255.0 * img.cpu().numpy(), 0, 255).astype(np.uint8))
        if processor_call:
            return self.qm.processor(text=[text], images=[pil], return_tensors="pt",
                                     size={"shortest_edge": lo, "longest_edge": hi})
        return self.qm.processor.image_processor(images=[pil], return_tensors="pt",
                                                 size={"shortest_edge": lo, "longest_edge": hi})

    def reference_embed(self, img: torch.Tensor) -> dict[str, float]:
        """PIL conversion + processor on the CPU at the ultra budget + pageable .to(device) + eager tower."""
        with self.clock.time() as t_pre:
            out = self.reference_pixels(img)
        pv, grid = out["pixel_values"], out["image_grid_thw"]
        with self.clock.time() as t_tr:
            pv = pv.to(self.qm.device)
            grid_dev = grid.to(self.qm.device)
        with self.stock_attention(), self.clock.time() as t_enc, torch.inference_mode():
            emb = self.qm.visual(pv, grid_thw=grid_dev)
        del emb, pv
        tokens = int(grid.prod(-1).sum()) // self.qm.family.merge_size ** 2
        enc = t_enc["wall"]  # synchronised wall time, like the engine's stage timer; CUDA-event time kept too
        extra = {"encode_gpu_s": t_enc["gpu"]} if "gpu" in t_enc else {}
        return dict(preprocess_s=t_pre["wall"], transfer_s=t_tr["wall"], encode_s=enc,
                    time_s=t_pre["wall"] + t_tr["wall"] + enc, cpu_s=t_pre["cpu"] + t_tr["cpu"] + t_enc["cpu"],
                    tokens=tokens, **extra)

    @staticmethod
    def pack_parts(rec) -> dict[str, float]:
        st = rec.stages
        hash_s, pre, tr, enc = (st.get(k, 0.0) for k in ("hash", "preprocess", "transfer", "encode"))
        return dict(hash_s=hash_s, preprocess_s=hash_s + pre, transfer_s=tr, encode_s=enc,
                    time_s=hash_s + pre + tr + enc, tokens=sum(i["tokens"] for i in rec.images))

    # -- section: answers (prefix-KV reuse, batched answers, decode vs the floor, folder captioning) ------
    def answer_request(self, images: list[torch.Tensor], prompt: str, *, system_prompt: str = "",
                       quality: str = "balanced", new_tokens: int | None = None, **extra: Any) -> ql.GenerationRequest:
        """A request with an exact answer length; memory-tier cache only (``disk_cache=False``)."""
        n = int(self.args.new_tokens if new_tokens is None else new_tokens)
        return ql.GenerationRequest(prompt=prompt, images=images, system_prompt=system_prompt, image_quality=quality,
                                    enable_image_cache=True, disk_cache=False, max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, seed=0, monitor=True, **extra)

    def timed_run(self, req: ql.GenerationRequest, qm: Any = None) -> tuple[dict[str, float], Any]:
        gc.collect()  # keep a collector pause out of the timing
        with self.clock.time() as t:
            res = (qm or self.qm).run(req)
        return t, res
