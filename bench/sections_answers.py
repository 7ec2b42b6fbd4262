"""The 'answers' section: prefix-KV reuse, one answer per image batched, decode vs the floor, Caption Folder."""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.bench_base import Bench
from bench.fmt import fmt_time
from bench.inputs import CAPTION_PROMPT, SYSTEM_PROMPT, count_generate_calls, cut_by_design, write_image_folder
from bench.measure import median
from bench.rows import answer_row_labels
from qwenvl_fast import captioning
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.core.api import ANSWER_BATCH_TOKENS
from qwenvl_fast.engine.memory import decode_bytes_per_token, device_memory_bandwidth
from qwenvl_fast.vision.images import load_image_file

log = logging.getLogger("QwenVL-Fast")


class AnswerSections(Bench):
    """Prefix reuse, one answer per image batched, decode per token vs the floor, Caption Folder."""

    def section_answers(self) -> None:
        ids = self.ids(*answer_row_labels(self.args))
        if not self.budget.allows():
            return self.skip_section(ids, "--time-budget reached")
        a = self.args
        cache = ql.get_cache(False)  # what disk_cache=False requests use: every hit below is a memory hit
        folder = Path(tempfile.mkdtemp(prefix="qwenvl-bench-folder-"))
        self.answers_image: torch.Tensor | None = None
        try:
            files = write_image_folder(folder, int(a.folder_images), int(a.answers_image_size), a.seed, self.next_k)
            self.next_k += int(a.folder_images)
            parts = [(("answers.prefix_reuse", "answers.prefix_no_reuse"), self.answers_prefix),
                     (("answers.each_one_by_one", "answers.each_batched"), lambda: self.answers_each(files)),
                     (("answers.folder_one_by_one", "answers.folder_batched"),
                      lambda: self.answers_folder(folder, cache)),
                     (("answers.decode_eager", "answers.decode_auto"), self.answers_decode)]
            for rids, fn in parts:
                gpu_only_here = rids[0] == "answers.decode_eager" and self.qm.device.type != "cuda"  # skips at once
                if not self.budget.allows() and not gpu_only_here:
                    self.skip_section([i for i in ids if i[0] in rids], "--time-budget reached")
                    continue
                t0 = time.perf_counter()
                try:
                    fn()
                except Exception as exc:  # one part failing leaves the others measured
                    log.exception("[bench] answers: %s failed", rids[0])
                    for rid in rids:
                        self.rows[rid].status, self.rows[rid].reason = "failed", f"{type(exc).__name__}: {exc}"
                log.info("[bench] answers: %s took %.1f s", rids[0].split(".")[1].split("_")[0],
                         time.perf_counter() - t0)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.finish_rows([i for i, _, _ in ids], "no round finished within --time-budget")

    def answers_prefix(self) -> None:
        """(a) a new question with the same system prompt (prefix KV reused) vs (b) a system prompt never seen
        before: the image's embeddings are a memory hit, but its prefix (system turn + image tokens) is prefilled."""
        rids = ("answers.prefix_reuse", "answers.prefix_no_reuse")
        off = getattr(self.qm, "prefix_reuse_off_reason", "this engine has no prefix reuse")
        if off:
            return self.skip_section(self.ids(*rids), f"prefix reuse is off for this model: {off}")
        n = int(self.args.new_tokens)
        _, img = self.new_image()
        self.answers_image = img
        # Untimed: encodes the image (a miss) and keeps the prefix of SYSTEM_PROMPT + image.
        self.qm.run(self.answer_request([img], "Warm-up: what is this?", system_prompt=SYSTEM_PROMPT))
        for r, warm in self.rounds("answers: prefix reuse", int(self.args.repeats)):
            got: dict[str, dict[str, float]] = {}
            question = f"Question {r}: what is in this image?"
            for v in (["reuse", "no_reuse"] if r % 2 == 0 else ["no_reuse", "reuse"]):
                system = SYSTEM_PROMPT if v == "reuse" else f"System prompt number {r} of this benchmark."
                t, res = self.timed_run(self.answer_request([img], question, system_prompt=system))
                rec = res.record
                if rec.images[0]["cache"] != "memory" or rec.new_tokens != n:
                    raise RuntimeError(f"{v}: cache {rec.images[0]['cache']}, {rec.new_tokens} new tokens")
                if (rec.prefix_tokens_reused > 0) != (v == "reuse") or (v != "reuse" and not
                                                                         rec.prefix_tokens_prefilled):
                    raise RuntimeError(f"{v}: {rec.prefix_tokens_reused} prefix tokens reused, "
                                       f"{rec.prefix_tokens_prefilled} prefilled")
                st = rec.stages
                got[v] = dict(time_s=t["wall"], cpu_s=t["cpu"], prefill_s=st.get("prefill", 0.0),
                              decode_s=st.get("decode", 0.0), decode_per_token_s=st.get("decode", 0.0) / max(1, n - 1),
                              prompt_tokens=rec.prompt_tokens, prefix_tokens_reused=rec.prefix_tokens_reused,
                              prefix_tokens_prefilled=rec.prefix_tokens_prefilled, new_tokens=rec.new_tokens)
            log.info("[bench] round %d prefix: reuse %s (prefill %s), no reuse %s (prefill %s)", r,
                     fmt_time(got["reuse"]["time_s"]), fmt_time(got["reuse"]["prefill_s"]),
                     fmt_time(got["no_reuse"]["time_s"]), fmt_time(got["no_reuse"]["prefill_s"]))
            if warm:
                continue
            reuse, fresh = got["reuse"], got["no_reuse"]
            B = self.basis
            self.add(self.rows["answers.prefix_no_reuse"], **fresh)
            self.add(self.rows["answers.prefix_reuse"], **reuse, speedup_vs_no_reuse=fresh[B] / reuse[B],
                     wall_speedup_vs_no_reuse=fresh["time_s"] / reuse["time_s"],
                     prefill_speedup=fresh["prefill_s"] / reuse["prefill_s"])
        self.rows["answers.prefix_reuse"].info.update(self.decode_weights())

    def decode_weights(self) -> dict[str, float]:
        """What one decode step reads: the language model's weights (vision tower and input-embedding lookup
        left out; tied embeddings counted once, as the lm_head), and the lm_head alone timed on one token."""
        head_mod = self.qm.model.get_output_embeddings()
        head = head_mod.weight
        total = decode_bytes_per_token(self.qm)
        h = torch.randn(1, 1, int(head.shape[1]), dtype=head.dtype, device=head.device)
        times = []
        with torch.inference_mode():
            for _ in range(6):
                with self.clock.time() as t:
                    head_mod(h)
                times.append(t["wall"])
        return dict(weight_bytes_per_token=int(total), lm_head_bytes=int(head.numel() * head.element_size()),
                    vocab=int(head.shape[0]), lm_head_one_token_s=median(times[1:]))

    def answers_each(self, files: list[Path]) -> None:
        """N images, one answer each: one batched generate (default answer_batch_tokens) vs one by one (0)."""
        k, t, q = int(self.args.answers_images), int(self.args.answers_new_tokens), self.args.answers_quality
        imgs = [load_image_file(f) for f in files[:k]]
        if len(imgs) != k:
            raise RuntimeError(f"{len(imgs)} images for {k} answers (--folder-images < --answers-images)")
        budgets = {"one_by_one": 0, "batched": ANSWER_BATCH_TOKENS}

        def req(v: str) -> ql.GenerationRequest:
            return self.answer_request(imgs, CAPTION_PROMPT, quality=q, new_tokens=t, batch_mode=ql.BATCH_MODES[1],
                                       answer_batch_tokens=budgets[v])

        # Untimed: encodes the images once (both variants below are memory hits) and warms the batched shapes.
        self.qm.run(req("batched"))
        for r, warm in self.rounds("answers: one answer per image", int(self.args.repeats)):
            got: dict[str, dict[str, float]] = {}
            for v in (["one_by_one", "batched"] if r % 2 == 0 else ["batched", "one_by_one"]):
                calls = self.qm.vision_calls
                with count_generate_calls(self.qm.model) as gen_calls:
                    tm, res = self.timed_run(req(v))
                rec = res.record
                if (self.qm.vision_calls != calls or any(i["cache"] != "memory" for i in rec.images)
                        or rec.new_tokens != k * t or len(res.texts) != k):
                    raise RuntimeError(f"{v}: {self.qm.vision_calls - calls} encodes, tiers "
                                       f"{[i['cache'] for i in rec.images]}, {rec.new_tokens} tokens, "
                                       f"{len(res.texts)} answers")
                want = k if v == "one_by_one" else None
                if (want is not None and gen_calls[0] != want) or (want is None and k > 1 and gen_calls[0] >= k):
                    raise RuntimeError(f"{v}: {gen_calls[0]} generate calls for {k} answers")
                st = rec.stages
                got[v] = dict(time_s=tm["wall"], cpu_s=tm["cpu"], per_caption_s=tm["wall"] / k,
                              captions_per_s=k / tm["wall"], prefill_s=st.get("prefill", 0.0),
                              decode_s=st.get("decode", 0.0), new_tokens=rec.new_tokens,
                              prompt_tokens=rec.prompt_tokens, generate_calls=gen_calls[0])
            log.info("[bench] round %d one answer per image: one by one %s, batched %s", r,
                     fmt_time(got["one_by_one"]["time_s"]), fmt_time(got["batched"]["time_s"]))
            if warm:
                continue
            base = got["one_by_one"][self.basis]
            for v in budgets:
                self.add(self.rows[f"answers.each_{v}"], **got[v], speedup_vs_one_by_one=base / got[v][self.basis])

    def answers_folder(self, folder: Path, cache: Any) -> None:
        """Caption Folder end to end (read files, hash, embed or hit, answer, write .txt) through run_once."""
        f, t, q = int(self.args.folder_images), int(self.args.answers_new_tokens), self.args.answers_quality
        cold = self.args.folder_cache == "cold"
        budgets = {"one_by_one": 0, "batched": ANSWER_BATCH_TOKENS}
        manager = ql.ModelManager()
        manager.current = self.qm  # run_once reuses the loaded model (same options), as the node's handle does

        def empty_cache() -> None:
            cache.memory.clear()
            cache.digests.clear()

        def caption(budget: int) -> tuple[dict[str, float], int]:
            req = self.answer_request([], CAPTION_PROMPT, quality=q, new_tokens=t, answer_batch_tokens=budget)
            calls = self.qm.vision_calls
            gc.collect()
            with self.clock.time() as tm:
                results = captioning.caption_folder(self.qm.options, folder, req, write_txt=True, overwrite=True,
                                                       keep_model_loaded=True, manager=manager)
            bad = [f"{r.path.name}: {r.status}" for r in results
                   if r.status != "written" and not cut_by_design(r.status)]
            if len(results) != f or bad:
                raise RuntimeError(f"{len(results)} captions for {f} files; not written: {bad[:3]}")
            return tm, self.qm.vision_calls - calls

        try:
            empty_cache()
            tm, calls = caption(ANSWER_BATCH_TOKENS)  # the first pass: every image a miss (the warm-up)
            first = dict(first_pass_s=tm["wall"], first_pass_cpu_s=tm["cpu"], first_pass_vision_calls=calls)
            chunks = math.ceil(f / captioning.CHUNK)
            for r, warm in self.rounds("answers: caption folder", int(self.args.repeats)):
                got: dict[str, dict[str, float]] = {}
                for v in (["one_by_one", "batched"] if r % 2 == 0 else ["batched", "one_by_one"]):
                    if cold:
                        empty_cache()
                    tm, calls = caption(budgets[v])
                    if calls != (chunks if cold else 0):
                        raise RuntimeError(f"{v}: {calls} vision calls with {self.args.folder_cache} embeddings")
                    got[v] = dict(time_s=tm["wall"], cpu_s=tm["cpu"], captions_per_s=f / tm["wall"],
                                  per_caption_s=tm["wall"] / f)
                log.info("[bench] round %d caption folder: one by one %s, batched %s", r,
                         fmt_time(got["one_by_one"]["time_s"]), fmt_time(got["batched"]["time_s"]))
                if warm:
                    continue
                base = got["one_by_one"][self.basis]
                for v in budgets:
                    self.add(self.rows[f"answers.folder_{v}"], **got[v],
                             speedup_vs_one_by_one=base / got[v][self.basis])
            self.rows["answers.folder_batched"].info.update(first)
        finally:
            manager.current = None

    def answers_decode(self) -> None:
        """Decode time per token (one cached image, fixed length) against the weight-bandwidth floor (CUDA)."""
        rids = ("answers.decode_eager", "answers.decode_auto")
        if self.qm.device.type != "cuda":
            return self.skip_section(self.ids(*rids), "GPU only: decode per token against a CUDA device's weight-"
                                     f"bandwidth floor (this run: {self.qm.device.type})")
        has_compile = "compile_decode" in {fl.name for fl in dataclasses.fields(ql.LoadOptions)}
        modes = {"eager": "off", "auto": "auto"} if has_compile else {"eager": None}
        if not has_compile:
            self.skip_section(self.ids("answers.decode_auto"), "this build's LoadOptions has no compile_decode")
        t = int(self.args.answers_new_tokens)
        weights = self.decode_weights()
        bandwidth = device_memory_bandwidth(self.qm.device)
        floor = weights["weight_bytes_per_token"] / bandwidth if bandwidth else None
        models: dict[str, Any] = {}
        img = self.answers_image if self.answers_image is not None else self.new_image()[1]
        try:
            for v, mode in modes.items():
                if mode is None or getattr(self.qm.options, "compile_decode", None) == mode:
                    models[v] = self.qm
                else:
                    models[v] = ql.load_model(dataclasses.replace(self.qm.options, compile_decode=mode))

            def req(i: int) -> ql.GenerationRequest:
                return self.answer_request([img], f"Question {i}: describe this image in detail.", new_tokens=t)

            warmups: dict[str, list[float]] = {}
            for v, m in models.items():  # encode (once), compile, and a second prompt length
                for i in range(2):
                    tm, _ = self.timed_run(req(-1 - i), m)
                    warmups.setdefault(v, []).append(tm["wall"])
            for r, warm in self.rounds("answers: decode per token", int(self.args.repeats)):
                got: dict[str, dict[str, float]] = {}
                for v in (list(models) if r % 2 == 0 else list(models)[::-1]):
                    tm, res = self.timed_run(req(r), models[v])
                    rec = res.record
                    if rec.new_tokens != t:
                        raise RuntimeError(f"{v}: {rec.new_tokens} new tokens, expected {t}")
                    per = rec.stages.get("decode", 0.0) / max(1, t - 1)
                    got[v] = dict(time_s=tm["wall"], decode_s=rec.stages.get("decode", 0.0), decode_per_token_s=per,
                                  tokens_per_s=1.0 / per, **({"over_floor": per / floor} if floor else {}))
                log.info("[bench] round %d decode per token: %s", r,
                         ", ".join(f"{v} {fmt_time(g['decode_per_token_s'])}" for v, g in got.items()))
                if warm:
                    continue
                for v, g in got.items():
                    self.add(self.rows[f"answers.decode_{v}"], **g,
                             speedup_vs_eager=got["eager"]["decode_per_token_s"] / g["decode_per_token_s"])
            for v, m in models.items():
                self.rows[f"answers.decode_{v}"].info.update(
                    weights, floor_s=floor, bandwidth_bytes_per_s=bandwidth, warmup_s=warmups.get(v),
                    compile_decode=getattr(m.options, "compile_decode", None),
                    compile_state={k: str(val)[:200] for k, val in vars(m).items() if "compile" in k})
        finally:
            for m in models.values():
                if m is not self.qm:
                    m.close()
            ql.release_memory()
