"""Image sections: one image by preset and cache hits, hashing, several images, vision attention, end to end."""

from __future__ import annotations

import contextlib
import gc
import logging
import time

import torch

from bench.bench_base import Bench
from bench.fmt import fmt_time
from bench.inputs import N_MULTI, PRESETS, PROMPT, make_image
from bench.measure import median
from qwenvl_fast import quality_presets as qp
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.embedding_cache import canonical_digest
from qwenvl_fast.vision import fast_preprocess

log = logging.getLogger("QwenVL-Fast")


class ImageSections(Bench):
    """Single image by preset (with the cache hits), hashing, several images, vision attention, end to end."""

    # -- section 1: one image, reference vs presets, cache hits ---------------------------------
    def section_single(self) -> None:
        ids = self.ids("single.reference", *[f"single.{p}" for p in PRESETS], "cache.memory_hit",
                       "cache.memory_hit_rehash")
        if not self.budget.allows():
            return self.skip_section(ids, "--time-budget reached")
        variants = ["reference", *PRESETS]
        hit_reps = int(self.args.hit_repeats)
        for r, warm in self.rounds("single image", int(self.args.repeats)):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            got: dict[str, dict[str, float]] = {}
            for v in order:
                k, img = self.new_image()
                if v == "reference":
                    got[v] = self.reference_embed(img)
                    log.info("[bench] round %d reference: %s (cpu %s)", r, fmt_time(got[v]["time_s"]),
                             fmt_time(got[v]["cpu_s"]))
                    continue
                wall, rec, cpu = self.pack_run([img], v, cache=True)
                if rec.images[0]["cache"] != "miss":
                    raise RuntimeError(f"expected a cache miss for a new image, got {rec.images[0]['cache']}")
                got[v] = {**self.pack_parts(rec), "run_s": wall, "cpu_s": cpu}
                log.info("[bench] round %d %s: %s (cpu %s, %d tokens)", r, v, fmt_time(got[v]["time_s"]),
                         fmt_time(cpu), got[v]["tokens"])
                if v == "balanced":
                    self.disk_image_k = k
                    hits: dict[str, list[float]] = {"hit": [], "rehash": [], "hit_cpu": [], "rehash_cpu": []}
                    for _ in range(hit_reps):
                        for kind in ("hit", "rehash"):
                            x = img if kind == "hit" else img.clone()  # a clone is unknown to the digest memo
                            gc.collect()  # keep a collector pause out of a millisecond-scale timing
                            w, rec_h, c = self.pack_run([x], v, cache=True)
                            if rec_h.images[0]["cache"] != "memory":
                                raise RuntimeError(f"expected a memory hit, got {rec_h.images[0]['cache']}")
                            hits[kind].append(w)
                            hits[f"{kind}_cpu"].append(c)
                    for kind in ("hit", "rehash"):
                        got[kind] = {"time_s": median(hits[kind]), "cpu_s": median(hits[f"{kind}_cpu"])}
            if warm:
                continue
            B = self.basis
            ultra = got["ultra"][B]
            ref = self.row("single.reference", "single", "")
            self.add(ref, **got["reference"])
            for p in PRESETS:
                row = self.rows[f"single.{p}"]
                self.add(row, **got[p], speedup_vs_ultra=ultra / got[p][B],
                         speedup_vs_reference=got["reference"][B] / got[p][B])
            miss = {"time_s": got["balanced"]["run_s"], "cpu_s": got["balanced"]["cpu_s"]}
            for kind, rid in (("hit", "cache.memory_hit"), ("rehash", "cache.memory_hit_rehash")):
                self.add(self.rows[rid], **got[kind], miss_s=miss["time_s"], miss_cpu_s=miss["cpu_s"],
                         miss_over_hit=miss[B] / got[kind][B])
        self.finish_rows([i for i, _, _ in ids], "no round finished within --time-budget")

    # -- section 2: hashing ----------------------------------------------------------------------
    def section_hash(self) -> None:
        ids = self.ids("hash.no_memo", "hash.memo", "hash.detail_score")
        if not self.budget.allows():
            return self.skip_section(ids, "--time-budget reached")
        img = make_image(self.size, self.args.seed, 0)
        memo = self.cache.digests
        reps = max(3, int(self.args.hit_repeats))
        for i in range(reps + 1):
            for v in (["no_memo", "memo"] if i % 2 == 0 else ["memo", "no_memo"]):
                # A new view of the same pixels on a repeat, as ComfyUI's batch unbind gives each run.
                x = img.clone() if v == "no_memo" else img[:]
                t0, c0 = time.perf_counter(), time.process_time()
                if v == "no_memo":
                    canonical = ql.canonicalize_image(x)
                    value = (canonical_digest(canonical), (int(canonical.shape[0]), int(canonical.shape[1])), None)
                    memo.put(img, value)  # what _prepare does: remember the digest for this tensor
                else:
                    value = memo.get(x)
                    if value is None:
                        raise RuntimeError("digest memo missed an unchanged tensor")
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if i > 0:  # the first pair warms up
                    self.add(self.rows[f"hash.{v}"], time_s=dt, cpu_s=dc)
            t0, c0 = time.perf_counter(), time.process_time()
            qp.detail_score(img)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i > 0:
                self.add(self.rows["hash.detail_score"], time_s=dt, cpu_s=dc)
        # The memo lookup takes microseconds, below the CPU clock's resolution: this ratio is in wall time.
        a, b = self.rows["hash.no_memo"].samples["time_s"], self.rows["hash.memo"].samples["time_s"]
        self.rows["hash.memo"].samples["no_memo_over_memo"] = [x / y for x, y in zip(a, b)]
        self.finish_rows([i for i, _, _ in ids], "not measured")

    # -- section 3: several images ---------------------------------------------------------------
    def section_multi(self) -> None:
        q = self.args.multi_quality
        ids = self.ids("multi.one_by_one", "multi.batched")
        if not self.budget.allows():
            return self.skip_section(ids, "--time-budget reached")
        variants = ["one_by_one", "batched"]
        for r, warm in self.rounds("multi-image", int(self.args.multi_repeats or self.args.repeats)):
            got: dict[str, dict[str, float]] = {}
            for v in (variants if r % 2 == 0 else variants[::-1]):
                imgs = [self.new_image()[1] for _ in range(N_MULTI)]
                calls = self.qm.vision_calls
                if v == "batched":
                    wall, rec, cpu = self.pack_run(imgs, q, cache=True)
                    parts = self.pack_parts(rec)
                    expected_calls = 1
                else:
                    wall, cpu, parts = 0.0, 0.0, {}
                    for img in imgs:
                        w, rec, c = self.pack_run([img], q, cache=True)
                        wall += w
                        cpu += c
                        for key, val in self.pack_parts(rec).items():
                            parts[key] = parts.get(key, 0.0) + val
                    expected_calls = N_MULTI
                if self.qm.vision_calls - calls != expected_calls:
                    raise RuntimeError(f"{v}: {self.qm.vision_calls - calls} encode calls, expected {expected_calls}")
                got[v] = dict(time_s=parts["time_s"], per_image_s=parts["time_s"] / N_MULTI,
                              encode_s=parts["encode_s"], run_s=wall, tokens=parts["tokens"], cpu_s=cpu,
                              per_image_cpu_s=cpu / N_MULTI)
                log.info("[bench] round %d %s: %s (cpu %s)", r, v, fmt_time(got[v]["time_s"]), fmt_time(cpu))
            if warm:
                continue
            base = got["one_by_one"][self.basis]
            for v in variants:
                self.add(self.rows[f"multi.{v}"], **got[v], speedup_vs_one_by_one=base / got[v][self.basis])
        self.finish_rows([i for i, _, _ in ids], "no round finished within --time-budget")

    # -- section: vision attention (transformers' per-window SDPA vs the pack's grouped SDPA) -------
    def section_attention(self) -> None:
        ids = self.ids("attention.per_window", "attention.grouped")
        if not self.budget.allows():
            return self.skip_section(ids, "--time-budget reached")
        if getattr(self.qm, "vision_attention", None) != "grouped sdpa":
            return self.skip_section(ids, f"grouped SDPA not in use (vision attention: {self.qm.vision_attention})")
        q = self.args.multi_quality
        img = make_image(self.size, self.args.seed, 99)
        canonical = ql.canonicalize_image(img)
        lo, hi = qp.preset_pixels(q, self.qm.family.factor)
        size = qp.smart_resize(int(canonical.shape[0]), int(canonical.shape[1]), self.qm.family.factor, lo, hi)
        pv, grid = fast_preprocess.preprocess_images(
            fast_preprocess.upload([canonical], self.qm.device), [size], patch_size=self.qm.family.patch_size,
            merge_size=self.qm.family.merge_size, temporal_patch_size=self.qm.family.temporal_patch_size,
            image_mean=self.qm.image_spec.image_mean, image_std=self.qm.image_spec.image_std, device=self.qm.device,
            dtype=self.qm.visual_dtype)
        grid_dev = grid.to(self.qm.device)
        outputs: dict[str, torch.Tensor] = {}
        for r, warm in self.rounds("vision attention", int(self.args.repeats)):
            got: dict[str, dict[str, float]] = {}
            for v in (["per_window", "grouped"] if r % 2 == 0 else ["grouped", "per_window"]):
                ctx = self.stock_attention() if v == "per_window" else contextlib.nullcontext()
                with ctx, self.clock.time() as t, torch.inference_mode():
                    out = self.qm.visual(pv, grid_thw=grid_dev)
                outputs[v] = (out.pooler_output if hasattr(out, "pooler_output") else out).float()
                got[v] = dict(time_s=t["wall"], cpu_s=t["cpu"])
            if warm:
                continue
            base = got["per_window"][self.basis]
            for v in ("per_window", "grouped"):
                self.add(self.rows[f"attention.{v}"], **got[v], speedup=base / got[v][self.basis])
        if outputs:
            diff = float((outputs["per_window"] - outputs["grouped"]).abs().max())
            self.rows["attention.grouped"].info["max_abs_diff"] = diff
        self.finish_rows([i for i, _, _ in ids], "no round finished within --time-budget")

    # -- section 4: end to end -------------------------------------------------------------------
    def reference_generate(self, img: torch.Tensor, n: int) -> dict[str, float]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        text = self.qm.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tok = self.qm.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with self.stock_attention(), self.clock.time() as t:
            inputs = self.reference_pixels(img, processor_call=True, text=text).to(self.qm.device)
            with torch.inference_mode():
                out = self.qm.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                             temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        new = int(out.shape[1] - inputs["input_ids"].shape[1])
        if new != n:
            raise RuntimeError(f"reference generate produced {new} tokens, expected {n}")
        return dict(time_s=t["wall"], cpu_s=t["cpu"], new_tokens=new, prompt_tokens=int(inputs["input_ids"].shape[1]))

    def section_e2e(self) -> None:
        n = int(self.args.new_tokens)
        ids = self.ids("e2e.reference", "e2e.pack_miss", "e2e.pack_hit")
        if not self.budget.allows():
            return self.skip_section(ids, "--time-budget reached")
        for r, warm in self.rounds("end-to-end", int(self.args.repeats)):
            got: dict[str, dict[str, float]] = {}
            _, img_ref = self.new_image()
            _, img = self.new_image()
            steps = ["reference", "pack"] if r % 2 == 0 else ["pack", "reference"]
            for v in steps:
                if v == "reference":
                    got["reference"] = self.reference_generate(img_ref, n)
                    continue
                for tier, name in (("miss", "pack_miss"), ("memory", "pack_hit")):
                    wall, rec, cpu = self.pack_run([img], "balanced", cache=True, new_tokens=n)
                    if rec.images[0]["cache"] != tier or rec.new_tokens != n:
                        raise RuntimeError(f"{name}: cache {rec.images[0]['cache']}, {rec.new_tokens} tokens")
                    st = rec.stages
                    got[name] = dict(time_s=wall, cpu_s=cpu, prefill_s=st.get("prefill", 0.0),
                                     decode_s=st.get("decode", 0.0),
                                     embed_s=sum(st.get(k, 0.0) for k in ("hash", "preprocess", "transfer",
                                                                          "encode")),
                                     new_tokens=rec.new_tokens, prompt_tokens=rec.prompt_tokens)
            log.info("[bench] round %d e2e: reference %s, miss %s, hit %s", r, fmt_time(got["reference"]["time_s"]),
                     fmt_time(got["pack_miss"]["time_s"]), fmt_time(got["pack_hit"]["time_s"]))
            if warm:
                continue
            B = self.basis
            ref = got["reference"][B]
            self.add(self.rows["e2e.reference"], **got["reference"])
            miss, hit = got["pack_miss"], got["pack_hit"]
            self.add(self.rows["e2e.pack_miss"], **miss, speedup_vs_reference=ref / miss[B])
            self.add(self.rows["e2e.pack_hit"], **hit, speedup_vs_reference=ref / hit[B],
                     speedup_vs_miss=miss[B] / hit[B])
        self.finish_rows([i for i, _, _ in ids], "no round finished within --time-budget")
