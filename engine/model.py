"""The engine: one request in, answers out, for a loaded model.

``QwenVLModel.run`` orchestrates: images (``images.py``) -> cache or vision tower -> prompt
(``prompting.py``) -> ``generate`` (cached embeddings passed the way the installed transformers takes
them, ``tf_compat.py``) -> answers and a timing record (``perf_monitor.py``).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import quality_presets as qp
from ..caches import get_cache
from ..core.api import (
    BATCH_MODES,
    GenerationRequest,
    GenerationResult,
    LoadOptions,
)
from ..core.errors import GenerationInterrupted, QwenVLError
from ..embedding_cache import ImageEmbedding
from ..perf_monitor import RunMonitor, RunRecord, TokenTimer
from ..sources import tf_compat
from ..sources.models import FamilyInfo, ModelSource
from ..vision.images import ImageSpec, PreparedImage, canonicalize_image, pixel_values_for, prepare_images
from ..vision.video import (
    PreparedVideo,
    chunk_bounds,
    join_chunks,
    prepare_videos,
    video_pixel_values,
)
from .decode_compile import DecodeCompile
from .prefix_cache import PrefixCache, prefix_cache_bytes, prefix_length, snapshot
from .prompting import PromptBuilder, split_thinking
from .runtime_choice import release_memory

log = logging.getLogger("QwenVL-Fast")

STREAM_EVERY_TOKENS = 8  # partial text sent to the UI this often: decoding every token would cost more

def _check_stop(req: GenerationRequest, rec: RunRecord) -> None:
    if req.should_stop is not None and req.should_stop():
        rec.interrupted = True
        raise GenerationInterrupted("Generation was interrupted.")


def answer_chunks(prompt_lengths: list[int], max_new: int, budget: int) -> list[list[int]]:
    """Consecutive rows per generate call: a batch costs rows x (its longest prompt + max_new) tokens of KV cache,
    at most ``budget``; a row over the budget alone goes alone."""
    chunks: list[list[int]] = []
    longest = 0
    for i, length in enumerate(prompt_lengths):
        if chunks and (len(chunks[-1]) + 1) * (max(longest, length) + max_new) <= budget:
            chunks[-1].append(i)
            longest = max(longest, length)
        else:
            chunks.append([i])
            longest = length
    return chunks


def cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    """A batch row's new tokens up to and with its first EOS (what one by one returns); the padding after goes."""
    for k, token in enumerate(ids):
        if token in eos:
            return ids[:k + 1]
    return ids


class _StopFlag:
    """A stopping criterion that polls the caller's interrupt flag once per generated token."""

    def __init__(self, should_stop: Callable[[], bool] | None) -> None:
        self.should_stop = should_stop
        self.stopped = False

    def __call__(self, input_ids, scores, **kwargs):
        stop = bool(self.should_stop and self.should_stop())
        self.stopped = self.stopped or stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class QwenVLModel:
    """A loaded model with its processor: orchestrates one request from images to answers."""

    def __init__(self, *, options: LoadOptions, source: ModelSource, model: Any, processor: Any, config: Any,
                 family: FamilyInfo, device: torch.device, dtype: torch.dtype, attention: str,
                 load_seconds: float, weights_identity: str) -> None:
        self.options = options
        self.source = source
        self.model = model
        self.processor = processor
        self.config = config
        self.family = family
        self.device = device
        self.dtype = dtype
        self.attention = attention
        self.load_seconds = load_seconds
        self.weights_identity = weights_identity
        self.use_mm_encoder_outputs = tf_compat.supports_mm_encoder_outputs(model)
        self._deepstack_output_cls = tf_compat.deepstack_output_class(model)
        self.compile_report: Any = None
        self.vision_attention = attention
        self.usable = True
        self._lock = threading.Lock()
        self.vision_calls = 0
        self.tokenizer = processor.tokenizer
        self.prompts = PromptBuilder(processor, config.image_token_id, family.merge_size,
                                     tf_compat.takes_mm_token_type_ids(model),
                                     video_token_id=getattr(config, "video_token_id", None),
                                     video_timestamps=family.model_type.startswith("qwen3"),
                                     with_second_per_grid_ts="second_per_grid_ts" in inspect.signature(
                                         model.model.forward).parameters)
        text_cfg = getattr(config, "text_config", config)
        self.context_length = int(getattr(text_cfg, "max_position_embeddings", 32768))
        ip = processor.image_processor
        size = getattr(ip, "size", None) or {}
        lo = size.get("shortest_edge") or getattr(ip, "min_pixels", None)
        hi = size.get("longest_edge") or getattr(ip, "max_pixels", None)
        self.image_spec = ImageSpec(
            patch_size=family.patch_size, merge_size=family.merge_size,
            temporal_patch_size=family.temporal_patch_size,
            image_mean=tuple(float(v) for v in ip.image_mean), image_std=tuple(float(v) for v in ip.image_std),
            native_limits=(int(lo), int(hi)) if lo and hi else None, device=device, pixel_dtype=self.visual_dtype,
            weights_identity=weights_identity, image_processor=ip,
        )
        self.prefix_cache = PrefixCache(prefix_cache_bytes())
        self.prefix_reuse_off_reason = self._prefix_reuse_off_reason()
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # Static KV cache + torch.compile for decode where supported (decode_compile.py); one log line when not.
        self.decode_compile = DecodeCompile(model, getattr(options, "compile_decode", "auto"), device,
                                            quantization=options.quantization, model_type=family.model_type,
                                            context_length=self.context_length)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self.usable = False
        self.prefix_cache.clear()
        self.decode_compile.release()
        model = self.model
        self.model = None
        if model is not None:
            try:
                if self.options.quantization == "none" and self.device.type != "cpu":
                    model.to("cpu")  # drops the device copies at once, even if a reference lingers
            except Exception:
                pass
            del model

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.model.visual

    @property
    def visual_dtype(self) -> torch.dtype:
        try:
            return next(self.visual.parameters()).dtype
        except StopIteration:  # pragma: no cover
            return self.dtype

    def set_compile(self, setting: str) -> None:
        from ..vision.tower_compile import compile_vision_tower

        self.compile_report = compile_vision_tower(self.model, setting, device=self.device)

    @property
    def cache_key_extra(self) -> str:
        """Compiled and eager towers agree to ~1e-7, not bit for bit: their embeddings are kept apart."""
        report = self.compile_report
        return "|compiled" if report is not None and report.enabled else ""

    # -- prefix-KV reuse (prefix_cache.py) -----------------------------------------------------
    def _prefix_reuse_off_reason(self) -> str:
        """Why this model never reuses a prompt prefix's KV; "" when it does."""
        if self.family.model_type.startswith("qwen3_5"):
            # Hybrid linear attention: its cache also holds recurrent and conv states taken after the LAST prompt
            # token, which cannot be cut back to the prefix by a token count; a separate prefix-only prefill would
            # chunk the recurrence differently, so the answers would not be exactly those without reuse.
            return "Qwen3.5 (linear-attention states are not prefix-sliceable)"
        if tf_compat.transformers_version() < (5, 18) or not self.use_mm_encoder_outputs:
            # Before 5.18 the cached embeddings reach the model through install_feature_override and a placeholder
            # pixel_values, and generate's continuation from a given cache (positions from the stored rope_deltas,
            # multimodal inputs dropped) is a different code path; reuse is only verified from 5.18 on (tested 5.24).
            return "transformers < 5.18"
        if not hasattr(self.model.model, "rope_deltas"):
            return "the model keeps no rope_deltas"
        if getattr(self.config, "vision_end_token_id", None) is None:
            return "no <|vision_end|> token id in the config"
        return ""

    @property
    def prefix_identity(self) -> str:
        """The loaded model in a prefix key (each model has its own prefix cache; this keeps a tower change apart)."""
        return f"{self.weights_identity}{self.cache_key_extra}|{self.options.model}|{self.dtype}"

    def _prefix_plan(self, req: GenerationRequest, inputs: dict[str, torch.Tensor],
                     group: list[PreparedImage], videos: list[PreparedVideo]) -> tuple[tuple, int] | None:
        """(key, prefix tokens) when this answer may reuse or fill the prefix cache, else None."""
        media = [*group, *videos]
        if (self.prefix_reuse_off_reason or not req.enable_image_cache or not media
                or not self.prefix_cache.enabled or any(not m.key for m in media)):
            return None
        ids = inputs["input_ids"]
        if int(ids.shape[0]) != 1:
            return None
        tokens = prefix_length(ids, int(self.config.vision_end_token_id))
        if tokens <= 0 or tokens >= int(ids.shape[1]):
            return None
        key = PrefixCache.key(self.prefix_identity, [m.key for m in media], ids[0, :tokens])
        return key, tokens

    # -- vision ----------------------------------------------------------------------------
    def encode(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> list[ImageEmbedding]:
        """Run the vision tower once over all images; split its output per image."""
        self.vision_calls += 1
        grid_host = grid.to("cpu")
        out = self.visual(pixel_values, grid_thw=grid.to(self.device))
        embeds, deepstack = tf_compat.vision_outputs(out)
        merge2 = self.family.merge_size ** 2
        sizes = [int(t * h * w) // merge2 for t, h, w in grid_host.tolist()]
        per_embeds = torch.split(embeds, sizes)
        per_deep = [torch.split(level, sizes) for level in deepstack]
        return [ImageEmbedding(per_embeds[i], [lvl[i] for lvl in per_deep], (int(t), int(h), int(w)))
                for i, (t, h, w) in enumerate(grid_host.tolist())]

    def build_inputs(self, prompt: str, system_prompt: str, images: list[PreparedImage],
                     videos: list[PreparedVideo] | None = None) -> dict[str, torch.Tensor]:
        return self.prompts.build_inputs(prompt, system_prompt, images, videos)

    def _prepare(self, images: list[torch.Tensor], req: GenerationRequest, cache: Any,
                 mon: RunMonitor) -> list[PreparedImage]:
        return prepare_images(images, req.image_quality, self.image_spec, cache, mon, self.cache_key_extra)

    def _embed_misses(self, req: GenerationRequest, prepared: list[PreparedImage], cache: Any,
                      mon: RunMonitor) -> None:
        """Encode every image the cache did not have, in one vision-tower call, and store the results."""
        misses = [p for p in prepared if p.embedding is None]
        if not misses:
            return
        for m in misses:
            if m.canonical is None:
                m.canonical = canonicalize_image(req.images[m.index])
        _check_stop(req, mon.record)  # before the vision tower: an interrupt must not cost a whole encode
        pixel_values, grid = pixel_values_for(misses, self.image_spec, req.preprocess, mon)
        with mon.stage("encode"), torch.inference_mode():
            t0 = time.perf_counter()
            encoded = self.encode(pixel_values, grid)
            if self.compile_report is not None and hasattr(self.compile_report, "note_call"):
                self.compile_report.note_call(time.perf_counter() - t0)
        del pixel_values
        for m, emb in zip(misses, encoded):
            if emb.grid != m.grid:
                raise QwenVLError(f"internal: grid {emb.grid} != predicted {m.grid}")
            m.embedding = emb
            m.tier = "miss" if cache is not None else "off"
            m.canonical = None
        if cache is not None:
            with mon.stage("cache"):
                for m in misses:
                    cache.put(m.key, m.embedding)

    def _prepare_videos(self, req: GenerationRequest, cache: Any, mon: RunMonitor) -> list[PreparedVideo]:
        if not req.videos:
            return []
        if not self.use_mm_encoder_outputs:
            raise QwenVLError("Video needs transformers 5.18 or newer (the version that takes cached video "
                              "embeddings): pip install -U transformers.")
        if getattr(self.config, "video_token_id", None) is None:
            raise QwenVLError(f"{self.family.name} has no video token in its config; it cannot take video.")
        return prepare_videos(req.videos, req.image_quality, req.max_frames, self.image_spec, cache, mon,
                              self.cache_key_extra)

    def _embed_video_misses(self, req: GenerationRequest, videos: list[PreparedVideo], cache: Any,
                            mon: RunMonitor) -> None:
        """Encode each clip the cache did not have, a few temporal patches per vision-tower call.

        Between calls the interrupt is honoured and progress reported (patches encoded of all clips' patches):
        a long clip is not one uninterruptible encode.
        """
        misses = [v for v in videos if v.embedding is None]
        if not misses:
            return
        total = sum(v.grid[0] for v in misses)
        done = 0
        for video in misses:
            _check_stop(req, mon.record)
            pixel_values, grid = video_pixel_values(video, req.videos[video.index], self.image_spec, mon)
            t, h, w = (int(x) for x in grid[0].tolist())
            if (t, h, w) != video.grid:
                raise QwenVLError(f"internal: video grid {(t, h, w)} != predicted {video.grid}")
            parts: list[ImageEmbedding] = []
            for start, end in chunk_bounds(t):
                _check_stop(req, mon.record)
                with mon.stage("encode"), torch.inference_mode():
                    chunk = torch.tensor([[end - start, h, w]], dtype=torch.long)
                    parts.extend(self.encode(pixel_values[start * h * w:end * h * w], chunk))
                done += end - start
                if req.on_progress is not None:
                    req.on_progress(done, total)
            del pixel_values
            video.embedding = join_chunks(parts, video.grid)
            video.tier = "miss" if cache is not None else "off"
            if cache is not None:
                with mon.stage("cache"):
                    cache.put(video.key, video.embedding)

    # -- run -------------------------------------------------------------------------------
    def run(self, req: GenerationRequest) -> GenerationResult:
        if not self.usable or self.model is None:
            raise QwenVLError("This model was unloaded; run the loader again.")
        with self._lock:
            return self._run(req)

    def _new_monitor(self, req: GenerationRequest) -> RunMonitor:
        mon = RunMonitor(enabled=req.monitor, device=self.device)
        rec = mon.record
        rec.model = self.options.model
        rec.family = self.family.name
        rec.device = str(self.device)
        rec.dtype = str(self.dtype).replace("torch.", "")
        rec.quantization = self.options.quantization
        rec.attention = self.attention
        rec.vision_attention = self.vision_attention
        rec.quality = qp.validate_quality(req.image_quality)
        if self.compile_report is not None:
            rec.compile = "on" if self.compile_report.enabled else f"off ({self.compile_report.reason})"
            rec.compile_warmup_s = getattr(self.compile_report, "warmup_s", None)
        return mon

    def _run(self, req: GenerationRequest) -> GenerationResult:
        if req.batch_mode not in BATCH_MODES:
            raise QwenVLError(f"Unknown batch_mode '{req.batch_mode}': choose one of {BATCH_MODES}.")
        mon = self._new_monitor(req)
        rec = mon.record
        cache = get_cache(req.disk_cache) if req.enable_image_cache else None
        try:
            if req.videos and req.batch_mode == BATCH_MODES[1] and len(req.images) > 1:
                raise QwenVLError("'one answer per image' answers images one by one; a video goes into one prompt. "
                                  "Use 'one prompt, all images', or run the video in its own node.")
            prepared = self._prepare(req.images, req, cache, mon)
            videos = self._prepare_videos(req, cache, mon)
            self._embed_misses(req, prepared, cache, mon)
            self._embed_video_misses(req, videos, cache, mon)
            for p in prepared:
                rec.images.append({
                    "index": p.index, "size_in": list(p.size_in), "size_resized": list(p.size),
                    "tokens": p.tokens // self.family.merge_size ** 2, "preset": p.budget.label,
                    "detail_score": p.budget.detail_score, "cache": p.tier,
                })
            merge2 = self.family.merge_size ** 2
            for v in videos:
                rec.videos.append({
                    "index": v.index, "frames": len(v.indices), "source_frames": v.total_frames, "fps": v.fps,
                    "size_in": list(v.size_in), "size_resized": list(v.size), "preset": v.budget.preset,
                    "tokens_per_frame_pair": v.grid[1] * v.grid[2] // merge2, "tokens": v.tokens // merge2,
                    "budget_tokens": v.clip_tokens, "cache": v.tier,
                })
            if req.batch_mode == BATCH_MODES[1] and len(prepared) > 1:
                answers = self._generate_each(req, prepared, mon)
            else:
                _check_stop(req, rec)  # before the prefill
                answers = [self._generate(req, prepared, mon, part=(0, 1), videos=videos)]
            texts, thoughts, token_ids = [], [], []
            for raw, ids in answers:
                token_ids.append(ids)
                answer, thinking = split_thinking(raw)
                texts.append(answer)
                thoughts.append(thinking)
        except torch.OutOfMemoryError as exc:
            self.prefix_cache.clear()  # memory pressure: the kept prefixes and the static KV cache go first
            self.decode_compile.drop_cache()
            release_memory()
            raise QwenVLError(
                "Out of memory. Use a cheaper image_quality ('balanced' or 'fast'), fewer images per prompt, "
                "fewer max_new_tokens, or quantization '4-bit'."
            ) from exc
        mon.finish()
        if cache is not None:  # after finish: these statistics are bookkeeping, not part of the run's time
            rec.cache_stats = cache.info()
        return GenerationResult(texts, thoughts, rec, token_ids)

    def _sampling_kwargs(self, req: GenerationRequest, max_new: int) -> dict[str, Any]:
        gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new, min_new_tokens=min(req.min_new_tokens, max_new))
        temperature = float(req.temperature)
        if bool(req.do_sample) and temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=min(max(float(req.top_p), 1e-6), 1.0),
                              top_k=max(int(req.top_k), 0))
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if req.repetition_penalty and float(req.repetition_penalty) != 1.0:
            gen_kwargs["repetition_penalty"] = max(float(req.repetition_penalty), 1e-3)
        seed = int(req.seed) % (2**63)
        torch.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(seed)
        return gen_kwargs

    def _fit_context(self, prompt_len: int, max_new: int) -> int:
        if prompt_len >= self.context_length:
            raise QwenVLError(
                f"The prompt is {prompt_len} tokens but the model's context is {self.context_length}: shorten the "
                "prompt, use fewer images or a cheaper image_quality."
            )
        if prompt_len + max_new > self.context_length:
            max_new = self.context_length - prompt_len
            log.warning("[QwenVL-Fast] max_new_tokens reduced to %d to fit the model's context", max_new)
        return max_new

    def _generate(self, req: GenerationRequest, group: list[PreparedImage], mon: RunMonitor,
                  part: tuple[int, int], videos: list[PreparedVideo] | None = None) -> tuple[str, list[int]]:
        with mon.stage("prompt"):
            inputs = self.build_inputs(req.prompt, req.system_prompt, group, videos)
        return self._generate_built(req, inputs, group, mon, part, reuse_prefix=True, videos=videos)

    def _generate_built(self, req: GenerationRequest, inputs: dict[str, torch.Tensor], group: list[PreparedImage],
                        mon: RunMonitor, part: tuple[int, int], reuse_prefix: bool = False,
                        videos: list[PreparedVideo] | None = None) -> tuple[str, list[int]]:
        """One answer from one prompt (already tokenised), with all of ``group``'s images in it.

        ``reuse_prefix``: the prompt's prefix (system turn and image tokens) comes from the prefix cache when it
        is there (only the question is prefilled), and is kept for the next question when it is not.
        """
        from transformers import StoppingCriteriaList

        rec = mon.record
        prompt_len = int(inputs["input_ids"].shape[1])
        rec.prompt_tokens += prompt_len
        if int(req.max_new_tokens) <= 0:
            return "", []
        max_new = self._fit_context(prompt_len, int(req.max_new_tokens))
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        gen_kwargs = self._sampling_kwargs(req, max_new)
        stop = _StopFlag(req.should_stop)
        done_tokens = [0]
        base, total = part[0] * max_new, part[1] * max_new
        streamed: list[int] = []

        def on_token(value: torch.Tensor) -> None:
            done_tokens[0] += 1
            if req.on_progress is not None:
                req.on_progress(base + done_tokens[0], total)
            if req.on_text is not None:
                streamed.extend(int(v) for v in value.reshape(-1).tolist())  # a host tensor: no device sync
                if done_tokens[0] % STREAM_EVERY_TOKENS == 0:
                    req.on_text(self.prompts.decode_partial(streamed))

        videos = videos or []
        plan = self._prefix_plan(req, inputs, group, videos) if reuse_prefix else None
        entry = self.prefix_cache.get(plan[0]) if plan is not None else None
        timer = TokenTimer(on_token=on_token)
        restore = None
        if entry is not None:
            # The prefix's KV (images included) is in the cache: no image embeddings are passed, and generate
            # continues from the cache, placing the question at index + the prefix's rope_deltas.
            gen_kwargs[self._cache_kwarg] = entry.new_cache()
            self.model.model.rope_deltas = entry.rope_deltas.to(self.device)
            rec.prefix_tokens_reused += entry.tokens
        else:
            restore = self._pass_embeddings([g.embedding for g in group], gen_kwargs,
                                            [v.embedding for v in videos])
            if plan is not None:
                gen_kwargs["return_dict_in_generate"] = True  # for its cache, the prefix of which is kept
                rec.prefix_tokens_prefilled += plan[1]
        # A static cache (compiled decode); a reused prefix's DynamicCache is copied into it (decode_compile.py)
        self.decode_compile.prepare(gen_kwargs, int(inputs["input_ids"].shape[0]), prompt_len, max_new,
                                    self._cache_kwarg)
        pad_id = self.tokenizer.pad_token_id
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs, **gen_kwargs, stopping_criteria=StoppingCriteriaList([stop]), streamer=timer,
                    pad_token_id=pad_id if pad_id is not None else self.tokenizer.eos_token_id,
                )
        finally:
            timer.end()
            if restore is not None:
                restore()
            rec.decode_compile = self.decode_compile.last_status  # after: a compile that failed says so
        if not isinstance(output, torch.Tensor):
            sequences = output.sequences
            if plan is not None and entry is None and not stop.stopped:
                cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
                self._keep_prefix(plan, self.decode_compile.prefix_view(cache, plan[1]))
            output = sequences
        mon.add("prefill", timer.prefill_s)
        mon.add("decode", timer.decode_s)
        new_ids = output[0, prompt_len:]
        rec.new_tokens += int(new_ids.numel())
        if stop.stopped:
            rec.interrupted = True
            raise GenerationInterrupted("Generation was interrupted.")
        raw = self.prompts.decode_answer(new_ids)
        if req.on_text is not None:
            req.on_text(raw)
        return raw, new_ids.tolist()

    def _keep_prefix(self, plan: tuple[tuple, int], cache: Any) -> None:
        """Keep the first ``plan[1]`` positions of a finished generate call's cache for the next question."""
        deltas = getattr(self.model.model, "rope_deltas", None)
        if cache is None or deltas is None:  # without the prefix's rope_deltas the question's positions are unknown
            return
        with torch.inference_mode():
            entry = snapshot(cache, plan[1], deltas)
        if entry is None:
            log.debug("[QwenVL-Fast] this cache cannot be cut to its prefix; prefix reuse skipped")
        elif not self.prefix_cache.put(plan[0], entry):
            log.debug("[QwenVL-Fast] a prefix of %d bytes exceeds the prefix cache budget", entry.nbytes)

    # -- one answer per image, batched ---------------------------------------------------------
    # Sampling: each generate call seeds torch with ``req.seed``, so the same request (same images, same order,
    # same answer_batch_tokens) gives the same texts run to run. One by one, every image is sampled from a fresh
    # seed and its answer does not depend on the other images; in a batch the rows draw from one random stream,
    # so a row's sampled answer depends on its batchmates and differs from the one-by-one answer. Greedy answers
    # match one by one token for token in fp32 on the CPU, left-padded rows included (tests/test_batched_answers.py);
    # in bf16 on a GPU the batched kernels may round differently, and a long greedy answer can then drift.
    # A repetition_penalty also sees a row's left padding (the pad token, <|endoftext|> in Qwen), which one by one
    # does not have: with a penalty, padded rows are slightly less likely to end on <|endoftext|>.
    def _generate_each(self, req: GenerationRequest, prepared: list[PreparedImage],
                       mon: RunMonitor) -> list[tuple[str, list[int]]]:
        """One answer per image: the prompts built together, then generated in batches within the token budget."""
        with mon.stage("prompt"):
            rows = [self.build_inputs(req.prompt, req.system_prompt, [p]) for p in prepared]
        n = len(rows)
        if self.tokenizer.pad_token_id is None:  # no pad token to pad with: one by one, as before batching
            chunks = [[i] for i in range(n)]
        else:
            lengths = [int(r["input_ids"].shape[1]) for r in rows]
            chunks = answer_chunks(lengths, max(int(req.max_new_tokens), 0), int(req.answer_batch_tokens))
        answers: list[tuple[str, list[int]]] = []
        for chunk in chunks:
            _check_stop(req, mon.record)  # before each prefill
            if len(chunk) == 1:
                i = chunk[0]
                answers.append(self._generate_built(req, rows[i], [prepared[i]], mon, part=(i, n)))
                continue
            try:
                answers.extend(self._generate_rows(req, [rows[i] for i in chunk], [prepared[i] for i in chunk],
                                                   mon, first_row=chunk[0], total_rows=n))
            except torch.OutOfMemoryError:
                # The batch did not fit where one answer at a time may: answer these rows as before batching
                # (their progress restarts from the chunk's first row).
                self.prefix_cache.clear()
                self.decode_compile.drop_cache()
                release_memory()
                log.warning("[QwenVL-Fast] out of memory answering %d images together; answering them one by "
                            "one (a smaller answer_batch_tokens avoids this retry)", len(chunk))
                for i in chunk:
                    _check_stop(req, mon.record)
                    answers.append(self._generate_built(req, rows[i], [prepared[i]], mon, part=(i, n)))
        return answers

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    def _pad_rows(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The rows' prompts as one left-padded batch: each row's last prompt token sits in the last column."""
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            batch = tok.pad([{"input_ids": r["input_ids"][0].tolist(),
                              "attention_mask": r["attention_mask"][0].tolist()} for r in rows],
                            padding="longest", return_tensors="pt")
        finally:
            tok.padding_side = side
        width = int(batch["input_ids"].shape[1])
        inputs = {"input_ids": batch["input_ids"].long(), "attention_mask": batch["attention_mask"].long()}
        if "mm_token_type_ids" in rows[0]:  # padding is text (0)
            inputs["mm_token_type_ids"] = torch.stack([
                torch.nn.functional.pad(r["mm_token_type_ids"][0], (width - r["mm_token_type_ids"].shape[1], 0))
                for r in rows])
        if "image_grid_thw" in rows[0]:  # in the order the images' tokens appear in the flattened batch
            inputs["image_grid_thw"] = torch.cat([r["image_grid_thw"] for r in rows])
        return inputs

    def _generate_rows(self, req: GenerationRequest, rows: list[dict[str, torch.Tensor]],
                       group: list[PreparedImage], mon: RunMonitor, first_row: int,
                       total_rows: int) -> list[tuple[str, list[int]]]:
        """One answer per row in ONE generate call: left padding, each row stops on its own EOS."""
        from transformers import StoppingCriteriaList

        rec = mon.record
        lengths = [int(r["input_ids"].shape[1]) for r in rows]
        if int(req.max_new_tokens) <= 0:
            rec.prompt_tokens += sum(lengths)
            return [("", []) for _ in rows]
        max_new = self._fit_context(max(lengths), int(req.max_new_tokens))
        inputs = self._pad_rows(rows)
        width = int(inputs["input_ids"].shape[1])
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        gen_kwargs = self._sampling_kwargs(req, max_new)
        stop = _StopFlag(req.should_stop)
        eos = self._eos_ids()
        count = len(rows)
        # Progress counts each answer as max_new_tokens steps: a row counts its tokens, a finished row counts in
        # full, so the bar moves per row, never back, and reaches the total of all answers.
        unit = max(int(req.max_new_tokens), 1)
        base, total = first_row * unit, total_rows * unit
        streamed: list[list[int]] = [[] for _ in rows]
        finished = [False] * count
        steps = [0]

        def on_token(value: torch.Tensor) -> None:
            steps[0] += 1
            for r, token in enumerate(value.reshape(-1).tolist()):  # a host tensor: no device sync
                if not finished[r]:
                    streamed[r].append(int(token))
                    finished[r] = int(token) in eos
            if req.on_progress is not None:
                req.on_progress(base + sum(unit if finished[r] else min(len(streamed[r]), unit)
                                           for r in range(count)), total)
            # Partial text: the batch's answers so far, joined like GenerationResult.text (one view of all rows;
            # rows that finished keep their whole answer in it).
            if req.on_text is not None and steps[0] % STREAM_EVERY_TOKENS == 0:
                req.on_text("\n\n".join(self.prompts.decode_partial(ids) for ids in streamed))

        timer = TokenTimer(on_token=on_token)  # it sees one token per row per step; rows are counted here
        restore = self._pass_embeddings([g.embedding for g in group], gen_kwargs)
        self.decode_compile.prepare(gen_kwargs, count, width, max_new, self._cache_kwarg)
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs, **gen_kwargs, stopping_criteria=StoppingCriteriaList([stop]), streamer=timer,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
        finally:
            timer.end()
            if restore is not None:
                restore()
            rec.decode_compile = self.decode_compile.last_status
        rec.prompt_tokens += sum(lengths)  # real prompt tokens: padding is not counted
        mon.add("prefill", timer.prefill_s)
        for _ in range(count - 1):
            # RunMonitor.finish counts one first token per prefill; this prefill gave one to each row
            mon.add("prefill", 0.0)
        mon.add("decode", timer.decode_s)
        ids_per_row = [cut_at_eos(row, eos) for row in output[:, width:].tolist()]
        rec.new_tokens += sum(len(ids) for ids in ids_per_row)  # real tokens: the padding after an EOS is not
        if stop.stopped:
            rec.interrupted = True
            raise GenerationInterrupted("Generation was interrupted.")
        if req.on_progress is not None:
            req.on_progress(base + count * unit, total)
        raws = [self.prompts.decode_answer(torch.tensor(ids, dtype=torch.long)) for ids in ids_per_row]
        if req.on_text is not None:
            req.on_text("\n\n".join(raws))
        return list(zip(raws, ids_per_row))

    def _pass_embeddings(self, embeddings: list[ImageEmbedding], gen_kwargs: dict[str, Any],
                         video_embeddings: list[ImageEmbedding] | None = None) -> Callable[[], None] | None:
        """Hand the images' (and clips') embeddings to generate; the vision tower never runs inside it."""
        levels = self.family.deepstack_levels
        if video_embeddings:  # _prepare_videos made sure this transformers takes mm_encoder_outputs
            gen_kwargs["mm_encoder_outputs"] = {
                "video": tf_compat.encoder_outputs(video_embeddings, levels, self._deepstack_output_cls)}
        if not embeddings:
            return None
        if self.use_mm_encoder_outputs:
            gen_kwargs.setdefault("mm_encoder_outputs", {})["image"] = tf_compat.encoder_outputs(
                embeddings, levels, self._deepstack_output_cls)
            return None
        flat = 3 * self.family.temporal_patch_size * self.family.patch_size ** 2
        placeholder = torch.empty((0, flat), dtype=self.visual_dtype, device=self.device)
        features = tf_compat.legacy_features(embeddings, levels, self._deepstack_output_cls)
        return tf_compat.install_feature_override(self.model, features, placeholder, gen_kwargs)


def device_memory_bandwidth(device: torch.device) -> float | None:
    """Peak memory bandwidth in bytes/s from a CUDA device's properties (None elsewhere, or when they do not say)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return clock_khz * 1000 * 2 * bus_bits / 8  # double data rate


def expected_decode_tokens_per_s(model: QwenVLModel) -> float | None:
    """Memory-bound decode estimate: GPU memory bandwidth / bytes of weights read per token."""
    bandwidth = device_memory_bandwidth(model.device)
    weights = decode_bytes_per_token(model) if bandwidth else 0
    return bandwidth / weights if weights else None


def decode_bytes_per_token(model: QwenVLModel) -> int:
    """Weight bytes one decode step reads: the language model and its head, not the vision tower, and of an input
    embedding that is not tied to the head only the one row looked up (nothing, next to the rest)."""
    net = model.model
    visual = {id(p) for p in model.visual.parameters()}
    embed = net.get_input_embeddings()
    head = net.get_output_embeddings()
    embed_weight = getattr(embed, "weight", None)
    tied = head is not None and getattr(head, "weight", None) is embed_weight
    total = 0
    for p in net.parameters():  # each shared tensor once
        if id(p) in visual or (p is embed_weight and not tied):
            continue
        total += p.numel() * p.element_size()
    return total


def unquantized_bf16_bytes(model: QwenVLModel) -> int:
    """The model's size in bf16; transformers counts packed 4-bit weights as the parameters they hold."""
    return int(model.model.num_parameters()) * 2
