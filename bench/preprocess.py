"""The 'preprocess' section: the pack's tensor preprocessing against transformers' image processor, no model.

``vision/fast_preprocess.py`` resizes, normalises and patchifies uint8 tensors on the device. transformers'
own Qwen2-VL image processor has a torchvision backend that does the same on the device (``device=``):
``Qwen2VLImageProcessor`` from transformers 5 (the ``Fast`` suffix was dropped), ``Qwen2VLImageProcessorFast``
before. Both start from the same uint8 host tensor and end with ``pixel_values`` on the device, on the same
device, for several image sizes at each preset and for two geometries (Qwen2.5-VL: 14-pixel patches and CLIP
normalisation; Qwen3-VL: 16-pixel patches, mean = std = 0.5). Ours includes the target size (``smart_resize``)
and the upload, as the engine runs them; theirs computes the size itself.

Each round times every case, the two variants back to back with the order flipped from round to round; the
ratio theirs / ours is computed inside each round (process CPU time on a CPU device, synchronised wall time on
an accelerator; the wall-time ratio is kept too). Before the rounds an untimed call of each checks exactness:
the max |ours - theirs| of ``pixel_values`` and whether the grids are identical; on an accelerator each is also
compared with the CPU processor (the values the models were trained with).
"""

from __future__ import annotations

import argparse
import gc
import logging
from dataclasses import dataclass
from typing import Any

import torch

from bench.fmt import fmt_ratio, fmt_time
from bench.inputs import make_uint8_image, parse_size
from bench.measure import Clock, Row, TimeBudget, median, ratio_basis
from qwenvl_fast import quality_presets as qp
from qwenvl_fast.vision import fast_preprocess

log = logging.getLogger("QwenVL-Fast")

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# The geometry and normalisation of the released checkpoints' preprocessor_config.json.
GEOMETRIES: dict[str, dict[str, Any]] = {
    "qwen2.5-vl": dict(patch_size=14, merge_size=2, temporal_patch_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD),
    "qwen3-vl": dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=(0.5, 0.5, 0.5),
                     image_std=(0.5, 0.5, 0.5)),
}


def preprocess_cases(args: argparse.Namespace) -> list[tuple[str, str, int, int]]:
    """(geometry, preset, width, height) of every row, in table order."""
    sizes = [parse_size(s) for s in str(args.preprocess_sizes).split(",") if s.strip()]
    presets = [p.strip() for p in str(args.preprocess_presets).split(",") if p.strip()]
    return [(g, p, w, h) for g in GEOMETRIES for p in presets for w, h in sizes]


def preprocess_row_labels(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    return {f"preprocess.{g}.{p}.{w}x{h}": ("preprocess", f"{g}, `{p}`, a {w}x{h} uint8 image")
            for g, p, w, h in preprocess_cases(args)}


def processor_class() -> type:
    """transformers' torchvision-backed Qwen2-VL image processor (the one that takes ``device=``)."""
    from transformers.models.qwen2_vl import image_processing_qwen2_vl as m

    if any(c.__name__ == "TorchvisionBackend" for c in m.Qwen2VLImageProcessor.__mro__):
        return m.Qwen2VLImageProcessor  # transformers 5: the torchvision backend is the default class
    from transformers import Qwen2VLImageProcessorFast

    return Qwen2VLImageProcessorFast


@dataclass
class Case:
    """One row: a geometry, a preset and an image, with both ways of preprocessing it."""

    row: Row
    geometry: dict[str, Any]
    processor: Any
    image: torch.Tensor  # HWC uint8 on the host
    limits: tuple[int, int]  # the preset's (min_pixels, max_pixels)
    device: torch.device

    def ours(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.geometry
        size = qp.smart_resize(int(self.image.shape[0]), int(self.image.shape[1]), g["patch_size"] * g["merge_size"],
                               *self.limits)
        return fast_preprocess.preprocess_images([self.image], [size], device=self.device, **g)

    def theirs(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.limits
        out = self.processor(images=[self.image.permute(2, 0, 1)], return_tensors="pt",
                             device=str(device or self.device), size={"shortest_edge": lo, "longest_edge": hi})
        return out["pixel_values"], out["image_grid_thw"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over every value (inf when the shapes differ: the grids then differ too)."""
    if a.shape != b.shape:
        return float("inf")
    return float((a.float().cpu() - b.float().cpu()).abs().max()) if a.numel() else 0.0


def check_exactness(case: Case) -> dict[str, Any]:
    """Untimed: one call of each (also the warm-up); what differs between their outputs."""
    (pv_a, grid_a), (pv_b, grid_b) = case.ours(), case.theirs()
    info: dict[str, Any] = dict(max_abs_diff=max_diff(pv_a, pv_b), bit_exact=bool(torch.equal(pv_a.cpu(), pv_b.cpu())),
                                grid_equal=bool(torch.equal(grid_a.cpu(), grid_b.cpu())),
                                grid_thw=[int(x) for x in grid_a[0]], patches=int(pv_a.shape[0]),
                                size_resized=[int(grid_a[0, 1]) * case.geometry["patch_size"],
                                              int(grid_a[0, 2]) * case.geometry["patch_size"]])
    info["tokens"] = info["patches"] // case.geometry["merge_size"] ** 2
    if case.device.type != "cpu":  # against the CPU processor: the values the models were trained with
        pv_cpu, _ = case.theirs(torch.device("cpu"))
        info.update(ours_vs_cpu_max_abs_diff=max_diff(pv_a, pv_cpu), theirs_vs_cpu_max_abs_diff=max_diff(pv_b, pv_cpu))
    return info


def time_round(case: Case, clock: Clock, basis: str, flip: bool) -> dict[str, float]:
    """Ours and theirs back to back (order flipped every other round); their times and the paired ratios."""
    got: dict[str, dict[str, float]] = {}
    for v in (["theirs", "ours"] if flip else ["ours", "theirs"]):
        fn = case.ours if v == "ours" else case.theirs
        gc.collect()  # keep a collector pause out of a millisecond-scale timing
        with clock.time() as t:
            fn()
        got[v] = {"time_s": t["wall"], "cpu_s": t["cpu"]}
    ours, theirs = got["ours"], got["theirs"]
    return dict(ours_s=ours["time_s"], theirs_s=theirs["time_s"], ours_cpu_s=ours["cpu_s"],
                theirs_cpu_s=theirs["cpu_s"], speedup=theirs[basis] / max(ours[basis], 1e-9),
                wall_speedup=theirs["time_s"] / ours["time_s"])


def build_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    cls = processor_class()
    labels = preprocess_row_labels(args)
    processors = {name: cls(**geo) for name, geo in GEOMETRIES.items()}
    images: dict[tuple[int, int], torch.Tensor] = {}
    cases = []
    for geo, preset, w, h in preprocess_cases(args):
        rid = f"preprocess.{geo}.{preset}.{w}x{h}"
        image = images.setdefault((w, h), make_uint8_image(w, h, args.seed))
        factor = GEOMETRIES[geo]["patch_size"] * GEOMETRIES[geo]["merge_size"]
        cases.append(Case(Row(rid, *labels[rid]), GEOMETRIES[geo], processors[geo], image,
                          qp.preset_pixels(preset, factor), device))
    return cases


def run_preprocess(args: argparse.Namespace, device: torch.device, budget: TimeBudget) -> dict[str, Any]:
    """The section's result: its device, the processor class, notes and one row per case."""
    cases = build_cases(args, device)
    entry: dict[str, Any] = dict(device=str(device), processor=processor_class().__name__, notes=[],
                                 rows=[c.row for c in cases])
    if not budget.allows():
        for c in cases:
            c.row.status, c.row.reason = "skipped", "--time-budget reached"
        return entry
    clock, basis = Clock(device), ratio_basis(device)
    for c in cases:
        c.row.info.update(check_exactness(c))
    rounds = int(args.preprocess_repeats)
    for r in range(rounds):
        if not budget.allows():
            entry["notes"].append(f"preprocess: stopped after {r} of {rounds} round(s): --time-budget reached")
            break
        for c in cases:
            for key, value in time_round(c, clock, basis, flip=r % 2 == 1).items():
                c.row.samples.setdefault(key, []).append(float(value))
        log.info("[bench] preprocess round %d: %s", r, ", ".join(
            f"{c.row.id.split('.', 1)[1]} {fmt_ratio(c.row.samples['speedup'][-1])}" for c in cases[:4]))
    for c in cases:
        if not c.row.samples:
            c.row.status, c.row.reason = "skipped", "no round finished within --time-budget"
            continue
        c.row.metrics = {key: median(vals) for key, vals in c.row.samples.items()}
        c.row.info["rounds"] = len(c.row.samples["speedup"])
        log.info("[bench] %s: ours %s, theirs %s, %s", c.row.id, fmt_time(c.row.metrics["ours_s"]),
                 fmt_time(c.row.metrics["theirs_s"]), fmt_ratio(c.row.metrics["speedup"]))
    return entry
