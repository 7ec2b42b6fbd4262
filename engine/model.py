"""The engine: one request in, answers out, for a loaded model.

``QwenVLModel`` (a ``core.api.Backend``) orchestrates its parts, in the order a request travels:

- ``vision_encode.VisionEncoder``: images and clips (``vision/``) -> embedding cache or vision tower;
- ``prompting.PromptBuilder``: the prompt's token ids;
- ``generation.Generator``: ``generate`` (cached embeddings passed the way the installed transformers takes them,
  ``sources/tf_compat.py``), with ``prefix_reuse.PrefixReuse`` and ``decode_compile.DecodeCompile``;
- ``memory``: the one out-of-memory policy, weights freed without a host copy, the decode-speed estimates;

then answers and a timing record (``perf_monitor.py``).
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any

import torch

from .. import quality_presets as qp
from ..core.api import (
    ANSWER_BATCH_TOKENS,
    BATCH_MODES,
    COMPLETE,
    CUT,
    THINKING_OPEN,
    GenerationRequest,
    GenerationResult,
    LoadOptions,
    note_endings,
)
from ..core.errors import QwenVLError
from ..embedding_cache import ImageEmbedding, get_cache
from ..perf_monitor import TIPS, RunMonitor, RunRecord
from ..sources import tf_compat
from ..sources.models import FamilyInfo, ModelSource
from ..vision.images import PreparedImage
from ..vision.video import PreparedVideo
from .decode_compile import DecodeCompile
from .generation import EmbeddingHandoff, Generator, answer_chunks, cut_at_eos
from .interrupt import check_stop
from .memory import expected_decode_tokens_per_s, free_after_oom, free_weights, unquantized_bf16_bytes
from .prefix_cache import PrefixCache, prefix_cache_bytes
from .prefix_reuse import PrefixReuse, reuse_off_reason
from .prompting import PromptBuilder, reasoning_open, split_thinking
from .structured import spec_of
from .vision_encode import VisionEncoder, image_spec_for

log = logging.getLogger("QwenVL-Fast")

__all__ = ["ANSWER_BATCH_TOKENS", "BATCH_MODES", "QwenVLError", "QwenVLModel", "answer_chunks", "cut_at_eos"]

OUT_OF_MEMORY = ("Out of memory. Use a cheaper image_quality ('balanced' or 'fast'), fewer images per prompt, "
                 "fewer max_new_tokens, or quantization '4-bit'.")


class QwenVLModel:
    """A loaded model with its processor: orchestrates one request from images to answers."""

    is_remote = False

    def __init__(self, *, options: LoadOptions, source: ModelSource, model: Any, processor: Any, config: Any,
                 family: FamilyInfo, device: torch.device, dtype: torch.dtype, attention: str,
                 load_seconds: float, weights_identity: str) -> None:
        self.options, self.source, self.model, self.processor, self.config = options, source, model, processor, config
        self.family, self.device, self.dtype, self.attention = family, device, dtype, attention
        self.load_seconds, self.weights_identity = load_seconds, weights_identity
        self.vision_attention = attention  # the loader sets "grouped sdpa" (vision/attention.py)
        self.usable = True
        self._lock = threading.Lock()
        self.tokenizer = processor.tokenizer
        self.use_mm_encoder_outputs = tf_compat.supports_mm_encoder_outputs(model)
        self.prompts = PromptBuilder(processor, config.image_token_id, family.merge_size,
                                     tf_compat.takes_mm_token_type_ids(model),
                                     video_token_id=getattr(config, "video_token_id", None),
                                     video_timestamps=family.model_type.startswith("qwen3"),
                                     with_second_per_grid_ts="second_per_grid_ts" in inspect.signature(
                                         model.model.forward).parameters)
        text_cfg = getattr(config, "text_config", config)
        self.context_length = int(getattr(text_cfg, "max_position_embeddings", 32768))
        self.image_spec = image_spec_for(processor, family, device, self.visual_dtype, weights_identity)
        self.vision = VisionEncoder(model, family, config, self.image_spec, device, self.use_mm_encoder_outputs)
        self.prefix = PrefixReuse(PrefixCache(prefix_cache_bytes()),
                                  reuse_off_reason(model, config, family.model_type, self.use_mm_encoder_outputs),
                                  getattr(config, "vision_end_token_id", None))
        # Static KV cache + torch.compile for decode where supported (decode_compile.py); one log line when not.
        decode = DecodeCompile(model, getattr(options, "compile_decode", "auto"), device,
                               quantization=options.quantization, model_type=family.model_type,
                               context_length=self.context_length)
        self.generation = Generator(model, self.prompts, device, self.context_length, decode, self.prefix,
                                    EmbeddingHandoff(model, family, device, self.visual_dtype))

    # -- the parts, as tests and the benchmark reach them ------------------------------------------
    @property
    def visual(self) -> torch.nn.Module:
        return self.model.model.visual

    @property
    def visual_dtype(self) -> torch.dtype:
        try:
            return next(self.visual.parameters()).dtype
        except StopIteration:  # pragma: no cover
            return self.dtype

    compile_report = property(lambda self: self.vision.compile_report,
                              lambda self, report: setattr(self.vision, "compile_report", report))
    decode_compile = property(lambda self: self.generation.decode_compile,
                              lambda self, dc: setattr(self.generation, "decode_compile", dc))
    vision_calls = property(lambda self: self.vision.calls, doc="vision-tower calls so far")
    cache_key_extra = property(lambda self: self.vision.cache_key_extra)
    prefix_cache = property(lambda self: self.prefix.cache)
    prefix_reuse_off_reason = property(lambda self: self.prefix.off_reason, doc='why no prefix reuse; "" when on')

    @property
    def prefix_identity(self) -> str:
        """The loaded model in a prefix key (each model has its own prefix cache; this keeps a tower change apart)."""
        return f"{self.weights_identity}{self.cache_key_extra}|{self.options.model}|{self.dtype}"

    def set_compile(self, setting: str) -> None:
        self.vision.set_compile(setting)

    def encode(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> list[ImageEmbedding]:
        return self.vision.encode(pixel_values, grid)

    def build_inputs(self, prompt: str, system_prompt: str, images: list[PreparedImage],
                     videos: list[PreparedVideo] | None = None) -> dict[str, torch.Tensor]:
        return self.prompts.build_inputs(prompt, system_prompt, images, videos)

    def _prepare(self, images: list[torch.Tensor], req: GenerationRequest, cache: Any,
                 mon: RunMonitor) -> list[PreparedImage]:
        return self.vision.prepare_images(images, req, cache, mon)

    # -- Backend -------------------------------------------------------------------------------
    def close(self) -> None:
        """Give the device memory back, without a host copy of the weights; ``usable`` becomes False.

        Also called from inside ComfyUI's free callback: no ``gc`` here (the manager collects when it may).
        """
        self.usable = False
        self.prefix_cache.clear()
        self.decode_compile.release()
        net, self.model = self.model, None
        self.vision.close()
        self.generation.close()
        if net is not None:
            free_weights(net)  # a reference that lingers (a hook, a traceback) then holds nothing on the device
            del net
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def tips(self, record: RunRecord) -> list[str]:
        """What the run's record suggests the user change (shown on the node)."""
        report = self.compile_report
        gpu_total = (torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda"
                     else None)
        return TIPS.tips(TIPS.context(
            record,
            compile_requested=self.options.compile_vision == "on",
            compile_unavailable_reason=report.reason if report is not None and not report.enabled else None,
            gpu_total_bytes=gpu_total,
            model_bf16_bytes=unquantized_bf16_bytes(self) if self.options.quantization != "none" else None,
            expected_decode_tokens_per_s=expected_decode_tokens_per_s(self),
        ))

    def run(self, req: GenerationRequest) -> GenerationResult:
        if not self.usable or self.model is None:
            raise QwenVLError("This model was unloaded; run the loader again.")
        with self._lock:
            return self._run(req)

    # -- one request ---------------------------------------------------------------------------
    def _run(self, req: GenerationRequest) -> GenerationResult:
        if req.batch_mode not in BATCH_MODES:
            raise QwenVLError(f"Unknown batch_mode '{req.batch_mode}': choose one of {BATCH_MODES}.")
        spec = spec_of(req, need_grammar=True)  # a broken schema fails before any image work
        req = req.resolved_prompts()
        mon = self._new_monitor(req)
        rec = mon.record
        rec.output_format = spec.output_format
        self.generation.output_spec = spec
        cache = get_cache(req.disk_cache) if req.enable_image_cache else None
        try:
            if req.videos and req.batch_mode == BATCH_MODES[1] and len(req.images) > 1:
                raise QwenVLError("'one answer per image' answers images one by one; a video goes into one prompt. "
                                  "Use 'one prompt, all images', or run the video in its own node.")
            prepared = self.vision.prepare_images(req.images, req, cache, mon)
            videos = self.vision.prepare_videos(req, cache, mon)
            self.vision.encode_image_misses(req, prepared, cache, mon)
            self.vision.encode_clip_misses(req, videos, cache, mon)
            _record_media(rec, prepared, videos, self.family.merge_size ** 2)
            if req.batch_mode == BATCH_MODES[1] and len(prepared) > 1:
                answers = self._generate_each(req, prepared, mon)
            else:
                check_stop(req, rec)  # before the prefill
                answers = [self._generate(req, prepared, mon, part=(0, 1), videos=videos)]
        except torch.OutOfMemoryError as exc:
            free_after_oom(self)  # memory pressure: the kept prefixes and compiled decode's cache go first
            raise QwenVLError(OUT_OF_MEMORY) from exc
        texts, thoughts, endings = [], [], []
        stops, opened = self.generation.eos_ids(), self.prompts.opens_thinking
        for raw, ids in answers:
            answer, thinking = split_thinking(raw, opened)
            texts.append(answer)
            thoughts.append(thinking)
            # An answer is complete when it ended on a stop token; else max_new_tokens (or the context) cut it.
            endings.append(THINKING_OPEN if reasoning_open(raw, opened) else
                           COMPLETE if ids and ids[-1] in stops else CUT)
        note_endings(rec, endings, int(req.max_new_tokens), new_tokens=[len(ids) for _, ids in answers])
        mon.finish()
        if cache is not None:  # after finish: these statistics are bookkeeping, not part of the run's time
            rec.cache_stats = cache.info()
        return GenerationResult(texts, thoughts, rec, [ids for _, ids in answers], endings=endings)

    def _new_monitor(self, req: GenerationRequest) -> RunMonitor:
        mon = RunMonitor(enabled=req.monitor, device=self.device)
        rec = mon.record
        rec.model, rec.family, rec.device = self.options.model, self.family.name, str(self.device)
        rec.dtype = getattr(self, "dtype_summary", "") or str(self.dtype).replace("torch.", "")
        rec.quantization, rec.attention, rec.vision_attention = (self.options.quantization, self.attention,
                                                                 self.vision_attention)
        rec.quality = qp.validate_quality(req.image_quality)
        if self.compile_report is not None:
            rec.compile = "on" if self.compile_report.enabled else f"off ({self.compile_report.reason})"
            rec.compile_warmup_s = getattr(self.compile_report, "warmup_s", None)
        return mon

    def _generate(self, req: GenerationRequest, group: list[PreparedImage], mon: RunMonitor,
                  part: tuple[int, int], videos: list[PreparedVideo] | None = None) -> tuple[str, list[int]]:
        """The one prompt of 'one prompt, all images': its prefix may be reused or kept."""
        with mon.stage("prompt"):
            inputs = self.build_inputs(req.prompt, req.system_prompt, group, videos)
        return self._generate_built(req, inputs, group, mon, part, reuse_prefix=True, videos=videos)

    def _generate_built(self, req: GenerationRequest, inputs: dict[str, torch.Tensor], group: list[PreparedImage],
                        mon: RunMonitor, part: tuple[int, int], reuse_prefix: bool = False,
                        videos: list[PreparedVideo] | None = None) -> tuple[str, list[int]]:
        """One answer from one tokenised prompt (``Generator.one``)."""
        return self.generation.one(req, inputs, group, mon, part,
                                   self.prefix_identity if reuse_prefix else None, videos)

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
            rows = [self.build_inputs(req.prompt_of(i), req.system_prompt, [p]) for i, p in enumerate(prepared)]
        n = len(rows)
        if self.tokenizer.pad_token_id is None:  # no pad token to pad with: one by one, as before batching
            chunks = [[i] for i in range(n)]
        else:
            lengths = [int(r["input_ids"].shape[1]) for r in rows]
            chunks = answer_chunks(lengths, max(int(req.max_new_tokens), 0), int(req.answer_batch_tokens))
        answers: list[tuple[str, list[int]]] = []
        for chunk in chunks:
            check_stop(req, mon.record)  # before each prefill
            if len(chunk) == 1:
                i = chunk[0]
                answers.append(self._generate_built(req, rows[i], [prepared[i]], mon, part=(i, n)))
                continue
            try:
                answers.extend(self.generation.rows(req, [rows[i] for i in chunk], [prepared[i] for i in chunk],
                                                    mon, first_row=chunk[0], total_rows=n))
                continue
            except torch.OutOfMemoryError:
                pass  # out of the except block first: its traceback's frames hold the failed call's tensors
            # The batch did not fit where one answer at a time may: answer these rows as before batching
            # (their progress restarts from the chunk's first row).
            free_after_oom(self)
            log.warning("[QwenVL-Fast] out of memory answering %d images together; answering them one by one "
                        "(a smaller answer_batch_tokens avoids this retry)", len(chunk))
            for i in chunk:
                check_stop(req, mon.record)
                answers.append(self._generate_built(req, rows[i], [prepared[i]], mon, part=(i, n)))
        return answers


def _record_media(rec: RunRecord, prepared: list[PreparedImage], videos: list[PreparedVideo], merge2: int) -> None:
    """Each image's and clip's sizes, tokens, preset and cache tier, for the run record."""
    for p in prepared:
        rec.images.append({
            "index": p.index, "size_in": list(p.size_in), "size_resized": list(p.size),
            "tokens": p.tokens // merge2, "preset": p.budget.label,
            "detail_score": p.budget.detail_score, "cache": p.tier,
        })
    for v in videos:
        rec.videos.append({
            "index": v.index, "frames": len(v.indices), "source_frames": v.total_frames, "fps": v.fps,
            "size_in": list(v.size_in), "size_resized": list(v.size), "preset": v.budget.preset,
            "tokens_per_frame_pair": v.grid[1] * v.grid[2] // merge2, "tokens": v.tokens // merge2,
            "budget_tokens": v.clip_tokens, "cache": v.tier,
        })
