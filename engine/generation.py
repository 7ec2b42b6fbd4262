"""Generation: tokenised prompts in, answers out, through ONE ``model.generate`` skeleton.

- ``Generator.one``: one prompt with all its images and clips; the prompt's prefix may come from the prefix cache
  (only the question is prefilled) or be kept for the next question (``prefix_reuse.py``).
- ``Generator.rows``: one answer per row in one left-padded call; each row stops at its own EOS.
- ``Generator._generate``: what both share: the stopping criterion polling Cancel, the TokenTimer streamer,
  compiled decode's static cache, the embeddings hand-over undone afterwards, prefill/decode bookkeeping, the
  tokens counted and the interrupt raised.

Sampling: each call seeds torch with ``req.seed``. Greedy batched rows match one-by-one answers token for token
in fp32 on the CPU (tests/test_batched_answers.py); see ``QwenVLModel._generate_each`` for the rest.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.api import GenerationRequest
from ..core.errors import GenerationInterrupted, QwenVLError
from ..core.sampling import Sampling
from ..embedding_cache import ImageEmbedding
from ..perf_monitor import RunMonitor, RunRecord, TokenTimer
from ..sources import tf_compat
from ..sources.models import FamilyInfo
from ..vision.images import PreparedImage
from ..vision.video import PreparedVideo
from .decode_compile import DecodeCompile
from .interrupt import StopFlag
from .prefix_reuse import PrefixReuse
from .prompting import PromptBuilder
from .structured import ConstraintStats, OutputSpec, make_constraint

log = logging.getLogger("QwenVL-Fast")

END_OF_TURN = "<|im_end|>"  # Qwen's chat templates end every turn with it
STREAM_EVERY_TOKENS = 8  # partial text sent to the UI this often: decoding every token would cost more


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


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """The chat template's end of turn (``<|im_end|>``) and the tokenizer's eos token, those it has."""
    ids: set[int] = set()
    vocab = tokenizer.get_vocab()
    if END_OF_TURN in vocab:
        ids.add(int(vocab[END_OF_TURN]))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _record_constraint(rec: Any, stats: ConstraintStats) -> None:
    """Add one generate call's constraint costs to the run record (summed over calls)."""
    s = rec.structured
    s["constraint_s"] = round(s.get("constraint_s", 0.0) + stats.seconds, 6)
    s["constraint_cpu_s"] = round(s.get("constraint_cpu_s", 0.0) + stats.cpu_seconds, 6)
    s["steps"] = s.get("steps", 0) + stats.steps
    s["compile_s"] = round(s.get("compile_s", 0.0) + stats.compile_s, 6)
    s["budget_steps"] = s.get("budget_steps", 0) + stats.budget_steps
    s["constraint_ms_per_token"] = round(1000 * s["constraint_s"] / max(s["steps"], 1), 4)
    s["constraint_cpu_ms_per_token"] = round(1000 * s["constraint_cpu_s"] / max(s["steps"], 1), 4)


@dataclass
class Generated:
    ids: list[list[int]]  # per row, its new tokens (a batch row's cut after its first EOS)
    cache: Any = None  # the call's KV cache, when it was asked for (return_dict_in_generate)


class EmbeddingHandoff:
    """Hands cached image and clip embeddings to ``generate``, the way the installed transformers takes them."""

    def __init__(self, net: Any, family: FamilyInfo, device: torch.device, visual_dtype: torch.dtype) -> None:
        self.net = net
        self.family = family
        self.device = device
        self.visual_dtype = visual_dtype
        self.takes_encoder_outputs = tf_compat.supports_mm_encoder_outputs(net)
        self.deepstack_output_cls = tf_compat.deepstack_output_class(net)

    def pass_to(self, gen_kwargs: dict[str, Any], embeddings: list[ImageEmbedding],
                video_embeddings: list[ImageEmbedding] | None = None) -> Callable[[], None] | None:
        """Put the embeddings in ``gen_kwargs`` (the vision tower never runs inside generate); returns what undoes
        an override installed on the model for an older transformers, or None."""
        levels = self.family.deepstack_levels
        if video_embeddings:  # VisionEncoder.prepare_videos made sure this transformers takes mm_encoder_outputs
            gen_kwargs["mm_encoder_outputs"] = {
                "video": tf_compat.encoder_outputs(video_embeddings, levels, self.deepstack_output_cls)}
        if not embeddings:
            return None
        if self.takes_encoder_outputs:
            gen_kwargs.setdefault("mm_encoder_outputs", {})["image"] = tf_compat.encoder_outputs(
                embeddings, levels, self.deepstack_output_cls)
            return None
        flat = 3 * self.family.temporal_patch_size * self.family.patch_size ** 2
        placeholder = torch.empty((0, flat), dtype=self.visual_dtype, device=self.device)
        features = tf_compat.legacy_features(embeddings, levels, self.deepstack_output_cls)
        return tf_compat.install_feature_override(self.net, features, placeholder, gen_kwargs)


def _answer_stream(req: GenerationRequest, prompts: PromptBuilder, part: tuple[int, int],
                   max_new: int) -> Callable[[torch.Tensor], None]:
    """One answer's per-token callback: progress (answer ``part[0]`` of ``part[1]``) and partial text."""
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
                req.on_text(prompts.decode_partial(streamed))

    return on_token


class _RowsStream:
    """A batch's per-token callback: it sees one token per row per step.

    Progress counts each answer as max_new_tokens steps: a row counts its tokens, a finished row counts in full, so
    the bar moves per row, never back, and reaches the total of all answers. Partial text: the batch's answers so
    far, joined like GenerationResult.text (rows that finished keep their whole answer in it).
    """

    def __init__(self, req: GenerationRequest, prompts: PromptBuilder, eos: set[int], count: int, first_row: int,
                 total_rows: int) -> None:
        self.req, self.prompts, self.eos = req, prompts, eos
        self.unit = max(int(req.max_new_tokens), 1)
        self.base, self.total = first_row * self.unit, total_rows * self.unit
        self.streamed: list[list[int]] = [[] for _ in range(count)]
        self.finished = [False] * count
        self.steps = 0

    def __call__(self, value: torch.Tensor) -> None:
        self.steps += 1
        for r, token in enumerate(value.reshape(-1).tolist()):  # a host tensor: no device sync
            if not self.finished[r]:
                self.streamed[r].append(int(token))
                self.finished[r] = int(token) in self.eos
        if self.req.on_progress is not None:
            self.req.on_progress(self.base + sum(self.unit if done else min(len(ids), self.unit)
                                                 for ids, done in zip(self.streamed, self.finished)), self.total)
        if self.req.on_text is not None and self.steps % STREAM_EVERY_TOKENS == 0:
            self.req.on_text("\n\n".join(self.prompts.decode_partial(ids) for ids in self.streamed))

    def all_done(self) -> None:
        if self.req.on_progress is not None:
            self.req.on_progress(self.base + len(self.streamed) * self.unit, self.total)


class Generator:
    """The language-model side of one loaded model: sampling settings, the context limit, the generate call."""

    def __init__(self, net: Any, prompts: PromptBuilder, device: torch.device, context_length: int,
                 decode_compile: DecodeCompile, prefix: PrefixReuse, handoff: EmbeddingHandoff) -> None:
        self.net = net
        self.prompts = prompts
        self.tokenizer = prompts.tokenizer
        self.device = device
        self.context_length = context_length
        self.decode_compile = decode_compile
        self.prefix = prefix
        self.handoff = handoff
        self.cache_kwarg = "cache" if "cache" in inspect.signature(net.forward).parameters else "past_key_values"
        # The current run's structured-output spec (QwenVLModel._run sets it under the model's lock).
        self.output_spec = OutputSpec()

    def close(self) -> None:
        self.net = None
        self.handoff.net = None

    # -- settings -----------------------------------------------------------------------------
    def sampling_kwargs(self, req: GenerationRequest, max_new: int) -> dict[str, Any]:
        """generate's sampling arguments (core/sampling.py's one mapping); seeds torch with ``req.seed``."""
        s = Sampling.from_request(req, max_new)
        gen_kwargs: dict[str, Any] = dict(max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens)
        if s.greedy:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            gen_kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        if s.repetition_penalty is not None:
            gen_kwargs["repetition_penalty"] = s.repetition_penalty
        torch.manual_seed(s.seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(s.seed)
        return gen_kwargs

    def fit_context(self, prompt_len: int, max_new: int, record: RunRecord) -> int:
        if prompt_len >= self.context_length:
            raise QwenVLError(
                f"The prompt is {prompt_len} tokens but the model's context is {self.context_length}: shorten the "
                "prompt, use fewer images or a cheaper image_quality."
            )
        if prompt_len + max_new > self.context_length:
            asked, max_new = max_new, self.context_length - prompt_len
            log.warning("[QwenVL-Fast] max_new_tokens reduced to %d to fit the model's context", max_new)
            # The node shows it too (perf_monitor.RunRecord.warnings); said once when rows of one run cut alike.
            note = (f"max_new_tokens reduced from {asked} to {max_new} to fit the model's context of "
                    f"{self.context_length} tokens (the prompt takes {prompt_len}).")
            if note not in record.warnings:
                record.warnings.append(note)
        return max_new

    def eos_ids(self) -> set[int]:
        """The tokens an answer stops at: the generation config's, or, where it names none (fine-tunes and merges
        often ship one without), the tokenizer's end of turn (``<|im_end|>``) and its eos token."""
        eos = getattr(getattr(self.net, "generation_config", None), "eos_token_id", None)
        if eos is not None:
            ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
            if ids:
                return ids
        return end_of_turn_ids(self.tokenizer)

    # -- the skeleton both paths share ----------------------------------------------------------
    def _generate(self, req: GenerationRequest, mon: RunMonitor, inputs: dict[str, torch.Tensor],
                  gen_kwargs: dict[str, Any], *, max_new: int, on_token: Callable[[torch.Tensor], None],
                  restore: Callable[[], None] | None, eos: set[int] | None = None) -> Generated:
        """Run ``model.generate`` once over ``inputs`` (one row, or left-padded rows) and do its bookkeeping.

        Cancel is polled per token; ``restore`` (the embeddings hand-over) is undone whatever happens; the run
        record gets the decode-compile status, the prefill and decode times and the new tokens (each row cut
        after its first stop token: ``eos``, default ``eos_ids()``, which generate stops at), then
        ``GenerationInterrupted`` is raised if Cancel stopped the call.
        """
        from transformers import StoppingCriteriaList

        rec = mon.record
        rows, width = (int(n) for n in inputs["input_ids"].shape)
        stop = StopFlag(req.should_stop)
        timer = TokenTimer(on_token=on_token)
        # A static cache (compiled decode); a reused prefix's DynamicCache is copied into it (decode_compile.py)
        self.decode_compile.prepare(gen_kwargs, rows, width, max_new, self.cache_kwarg)
        stats = self._constrain(gen_kwargs, rows, max_new) if self.output_spec.constrained else None
        pad_id = self.tokenizer.pad_token_id
        eos = eos if eos is not None else self.eos_ids()
        stop_ids = sorted(eos)
        try:
            with torch.inference_mode():
                output = self.net.generate(
                    **inputs, **gen_kwargs, stopping_criteria=StoppingCriteriaList([stop]), streamer=timer,
                    pad_token_id=pad_id if pad_id is not None else self.tokenizer.eos_token_id,
                    # the stop tokens said explicitly: a generation config that names none still stops at the end
                    # of turn (eos_ids)
                    eos_token_id=stop_ids or None,
                )
        finally:
            timer.end()
            if restore is not None:
                restore()
            rec.decode_compile = self.decode_compile.last_status  # after: a compile that failed says so
            if stats is not None:
                _record_constraint(rec, stats)
        cache = None
        if not isinstance(output, torch.Tensor):
            cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
            output = output.sequences
        mon.add("prefill", timer.prefill_s)
        for _ in range(rows - 1):
            # RunMonitor.finish counts one first token per prefill; a batch's prefill gave one to each row
            mon.add("prefill", 0.0)
        mon.add("decode", timer.decode_s)
        ids = [cut_at_eos(row, eos) for row in output[:, width:].tolist()]
        rec.new_tokens += sum(len(row) for row in ids)  # real tokens: the padding after a row's EOS is not
        if stop.stopped:
            rec.interrupted = True
            raise GenerationInterrupted("Generation was interrupted.")
        return Generated(ids, cache)

    def _constrain(self, gen_kwargs: dict[str, Any], rows: int, max_new: int) -> ConstraintStats:
        """Put the grammar's logits processor (one matcher per row) into ``gen_kwargs``; its costs go in the stats."""
        from transformers import LogitsProcessorList

        if gen_kwargs.get("min_new_tokens"):
            # min_new_tokens bans EOS where the grammar may allow only EOS: every token would be banned.
            log.info("[QwenVL-Fast] min_new_tokens is ignored with output_format %s (the grammar decides the end)",
                     self.output_spec.output_format)
            gen_kwargs["min_new_tokens"] = 0
        stats = ConstraintStats()
        vocab = int(self.net.get_output_embeddings().weight.shape[0])
        processor = make_constraint(self.tokenizer, vocab, self.eos_ids(), self.output_spec, rows, max_new, stats)
        gen_kwargs["logits_processor"] = LogitsProcessorList([processor])
        return stats

    # -- one prompt -----------------------------------------------------------------------------
    def one(self, req: GenerationRequest, inputs: dict[str, torch.Tensor], group: list[PreparedImage],
            mon: RunMonitor, part: tuple[int, int], prefix_identity: str | None = None,
            videos: list[PreparedVideo] | None = None) -> tuple[str, list[int]]:
        """One answer from one prompt (already tokenised), with all of ``group``'s images and ``videos`` in it.

        ``prefix_identity`` (the loaded model, ``QwenVLModel.prefix_identity``; None: no reuse): the prompt's
        prefix (system turn and image tokens) comes from the prefix cache when it is there (only the question is
        prefilled), and is kept for the next question when it is not.
        """
        rec = mon.record
        prompt_len = int(inputs["input_ids"].shape[1])
        rec.prompt_tokens += prompt_len
        if int(req.max_new_tokens) <= 0:
            return "", []
        max_new = self.fit_context(prompt_len, int(req.max_new_tokens), rec)
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        gen_kwargs = self.sampling_kwargs(req, max_new)
        videos = videos or []
        plan = (self.prefix.plan(prefix_identity, req, inputs, [*group, *videos]) if prefix_identity is not None
                else None)
        entry = self.prefix.cache.get(plan[0]) if plan is not None else None
        restore = None
        if entry is not None:
            # The prefix's KV (images included) is in the cache: no image embeddings are passed, and generate
            # continues from the cache, placing the question at index + the prefix's rope_deltas.
            gen_kwargs[self.cache_kwarg] = entry.new_cache()
            self.net.model.rope_deltas = entry.rope_deltas.to(self.device)
            rec.prefix_tokens_reused += entry.tokens
        else:
            restore = self.handoff.pass_to(gen_kwargs, [g.embedding for g in group], [v.embedding for v in videos])
            if plan is not None:
                gen_kwargs["return_dict_in_generate"] = True  # for its cache, the prefix of which is kept
                rec.prefix_tokens_prefilled += plan[1]
        done = self._generate(req, mon, inputs, gen_kwargs, max_new=max_new, restore=restore,
                              on_token=_answer_stream(req, self.prompts, part, max_new))
        if plan is not None and entry is None:
            self.prefix.keep(plan, self.decode_compile.prefix_view(done.cache, plan[1]),
                             getattr(self.net.model, "rope_deltas", None))
        new_ids = done.ids[0]
        raw = self.prompts.decode_answer(torch.tensor(new_ids, dtype=torch.long))
        if req.on_text is not None:
            req.on_text(raw)
        return raw, new_ids

    # -- rows in one call -----------------------------------------------------------------------
    def rows(self, req: GenerationRequest, rows: list[dict[str, torch.Tensor]], group: list[PreparedImage],
             mon: RunMonitor, first_row: int, total_rows: int) -> list[tuple[str, list[int]]]:
        """One answer per row in ONE generate call: left padding, each row stops on its own EOS."""
        rec = mon.record
        lengths = [int(r["input_ids"].shape[1]) for r in rows]
        if int(req.max_new_tokens) <= 0:
            rec.prompt_tokens += sum(lengths)
            return [("", []) for _ in rows]
        max_new = self.fit_context(max(lengths), int(req.max_new_tokens), rec)
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in self.pad_rows(rows).items()}
        gen_kwargs = self.sampling_kwargs(req, max_new)
        eos = self.eos_ids()
        stream = _RowsStream(req, self.prompts, eos, len(rows), first_row, total_rows)
        restore = self.handoff.pass_to(gen_kwargs, [g.embedding for g in group])
        done = self._generate(req, mon, inputs, gen_kwargs, max_new=max_new, on_token=stream, restore=restore,
                              eos=eos)
        rec.prompt_tokens += sum(lengths)  # real prompt tokens: padding is not counted
        stream.all_done()
        raws = [self.prompts.decode_answer(torch.tensor(ids, dtype=torch.long)) for ids in done.ids]
        if req.on_text is not None:
            req.on_text("\n\n".join(raws))
        return list(zip(raws, done.ids))

    def pad_rows(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
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
