"""Structured output: answers that are JSON valid against a schema, or a clean tag list, whatever the weights.

``output_format`` (``core.api.OUTPUT_FORMATS``): ``text`` (free text), ``json`` (decoding constrained by
``json_schema``; empty means any JSON object), ``tags`` (a fixed grammar, :data:`TAGS_REGEX`).

The local backend constrains decoding with **llguidance** (``pip install llguidance``), through a transformers
``LogitsProcessor`` (:class:`GrammarConstraint`): before each token, every row of the batch gets its own matcher's
mask of the tokens the grammar allows. Why llguidance rather than xgrammar (both measured here, Qwen's 151,669-
token vocabulary, a 5-field schema, 2-core CPU): computing a mask takes 0.08 ms (xgrammar 0.02 ms), far below a
decode step (about 130 ms for a 3B-vocabulary model on this CPU), so speed does not decide; llguidance is one wheel
with no Python dependencies (abi3 wheels for Windows, macOS and Linux), while xgrammar pulls ``triton`` on Linux,
``pydantic`` and ``apache-tvm-ffi`` into ComfyUI's Python next to its torch; llguidance covers more of JSON Schema
(it backs llama.cpp's and vLLM's "guidance" modes) and takes Lark grammars with regex intersection. Its own torch
helper compiles with ``torch.compile`` on first use (a C++ compiler on Windows), so the mask is applied here with
numpy on the host (and one masked_fill on a GPU): about 1.5 ms per token in all (docs/benchmark-cpu-structured.md).

The budget: a schema whose answer is cut by ``max_new_tokens`` does not parse. The constraint keeps, at every step,
a way to close the answer within the tokens left: when the shortest closing path it finds (:func:`closing_path`:
the tokens the grammar forces, else the best-ranked token of the real vocabulary the grammar allows, see
:class:`ClosingVocab`) needs nearly all of them, the next token is the model's best choice among those after which
the answer can still close in time, and at the end exactly that path. Before generating, that path from the start
is the figure a too-small ``max_new_tokens`` (0 included) is refused with. A schema with no finite instance
(a required property that leads back to itself) is refused when it is parsed (structured_check.py). Every answer
is then validated like a server's (:func:`validate_answer`) before it is returned.

Nothing here imports llguidance at import time: the pack imports without it, and only a run asking for ``json``
or ``tags`` on the local backend needs it (a clear error says how to install it).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core import strict_json
from ..core.api import COMPLETE, CUT, FAILED, OUTPUT_FORMATS
from ..core.errors import QwenVLError
from ..core.lru import LRU
from .structured_check import (
    check_patterns_compile,
    largest_step,
    no_finite_instance,
    parse_strict,
    schema_error,
)
from .structured_closing import (
    CLOSING_LIMIT,
    NUMBER_RUN_LIMIT,
    ClosingVocab,
    closing_path,
    closing_vocab,
    mask_filler,
)

log = logging.getLogger("QwenVL-Fast")

TAGS_MAX_COUNT = 40  # at most this many tags
TAGS_MAX_CHARS = 32  # at most this many characters per tag
# A tag: lowercase letters, digits, '_' and '-', words joined by spaces, no space at either end, 1..32 characters;
# tags joined by ", ". Plain regex (no look-around), so a server takes the same pattern (vLLM's structured_outputs).
_TAG = rf"[a-z0-9](?:[a-z0-9 _-]{{0,{TAGS_MAX_CHARS - 2}}}[a-z0-9])?"
TAGS_REGEX = rf"{_TAG}(?:, {_TAG}){{0,{TAGS_MAX_COUNT - 1}}}"
_TAGS_PATTERN = re.compile(TAGS_REGEX)
TAGS_DESCRIPTION = (f"a comma-separated list of at most {TAGS_MAX_COUNT} tags, each 1-{TAGS_MAX_CHARS} lowercase "
                    "letters, digits, '_', '-' or inner spaces")
# Compact JSON: no whitespace outside strings, so no runaway whitespace ("," and ":" as separators).
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
# Within this many tokens (plus the schema's largest step: structured_check.largest_step, an optional property with
# its smallest value) of the closing path's length, each token is checked to leave a way to close in time.
BUDGET_SLACK = 24
ANY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
INSTALL_HINT = ("Structured output (output_format json or tags) on the local backend needs llguidance, which the "
                "pack's requirements.txt installs: pip install -r requirements.txt (with ComfyUI's Python).")


@dataclass(frozen=True)
class OutputSpec:
    """What a request asks the answer to be: its format and, for ``json``, the schema (parsed and checked)."""

    output_format: str = "text"
    schema: dict[str, Any] | None = None

    @property
    def constrained(self) -> bool:
        return self.output_format != "text"

    @property
    def schema_text(self) -> str:
        return json.dumps(self.schema, sort_keys=True, separators=(",", ":")) if self.schema is not None else ""

    def grammar(self) -> str:
        """The llguidance grammar (a JSON-schema or regex grammar) of this spec."""
        llg = _llguidance()
        if self.output_format == "json":
            return llg.LLMatcher.grammar_from_json_schema(self.schema, defaults=dict(_JSON_OPTIONS))
        return llg.LLMatcher.grammar_from_regex(TAGS_REGEX)


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf  # noqa: F401  (the tokenizer bridge)
    except ImportError as exc:
        raise QwenVLError(INSTALL_HINT) from exc
    return llguidance


def parse_output_spec(output_format: str, json_schema: str | dict[str, Any] | None,
                      need_grammar: bool = False) -> OutputSpec:
    """Check a request's ``output_format`` / ``json_schema`` before any model work; a clear error names the fault.

    ``need_grammar``: the local backend will constrain with llguidance, so it must be installed and must be able
    to express the schema; the server backend leaves that to the server (the schema is still parsed and checked).
    """
    fmt = (output_format or "text").strip().lower()
    if fmt not in OUTPUT_FORMATS:
        raise QwenVLError(f"Unknown output_format '{output_format}': choose one of {OUTPUT_FORMATS}.")
    if fmt == "text":
        return OutputSpec()
    schema = None
    if fmt == "json":
        schema = _parse_schema(json_schema)
        _check_meta_schema(schema)
        check_patterns_compile(schema)
        endless = no_finite_instance(schema)
        if endless:
            raise QwenVLError(endless)
    spec = OutputSpec(fmt, schema)
    if need_grammar:
        llg = _llguidance()
        grammar = spec.grammar()
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise QwenVLError(f"json_schema cannot be used for constrained decoding: {_first(messages)} - "
                              "simplify that part of the schema.")
        if messages:  # features the library ignores (e.g. a 'format' it does not know): said once, not fatal
            log.warning("[QwenVL-Fast] json_schema: %s", "; ".join(messages)[:300])
    return spec


def _first(messages: list[str]) -> str:
    # llguidance's messages span lines (the regex, a caret under it, the reason): one line, spaces collapsed
    return " ".join((messages[0] if messages else "unknown error").split())[:300]


def _parse_schema(json_schema: str | dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(json_schema, dict):
        return json_schema
    text = (json_schema or "").strip()
    if not text:
        return dict(ANY_OBJECT_SCHEMA)
    try:
        schema = strict_json.loads(text)
    except strict_json.StrictJSONError as exc:
        raise QwenVLError(f"json_schema is not valid JSON: {exc}. Give a JSON Schema such as "
                          "{\"type\": \"object\", \"properties\": {...}}, or leave it empty for any JSON "
                          "object.") from exc
    if not isinstance(schema, dict):
        raise QwenVLError(f"json_schema must be a JSON object (a schema), not {type(schema).__name__}.")
    return schema


def _check_meta_schema(schema: dict[str, Any]) -> None:
    """The schema against its meta-schema (a wrong type or keyword value)."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the top level"
        raise QwenVLError(f"json_schema is not a valid JSON Schema at {where}: {exc.message}") from exc


# spec_of's parsed specs: a request's spec is asked for at each layer (the loader, Caption Folder, the model, each
# server request's body), and parsing checks the schema against its meta-schema and, locally, builds its grammar.
_SPECS: LRU[OutputSpec] = LRU(max_entries=32)


def spec_of(request: Any, need_grammar: bool = False) -> OutputSpec:
    """The request's OutputSpec (its ``output_format`` and ``json_schema`` fields), parsed once per distinct fields
    (a refused one is not kept: it raises again)."""
    output_format = getattr(request, "output_format", "text")
    json_schema = getattr(request, "json_schema", "")
    if not isinstance(output_format, str) or not isinstance(json_schema, str):
        return parse_output_spec(output_format, json_schema, need_grammar)
    key = (output_format, json_schema, need_grammar)
    spec = _SPECS.get(key)
    if spec is None:
        spec = parse_output_spec(output_format, json_schema, need_grammar)
        _SPECS.put(key, spec)
    return spec


def validate_answer(text: str, spec: OutputSpec,
                    should_stop: Callable[[], bool] | None = None) -> tuple[Any, str | None]:
    """``(value, None)`` when ``text`` is a complete answer of ``spec``, else ``(None, why)``.

    ``value``: the parsed JSON (strict: no NaN/Infinity, bounded depth and numbers) for ``json``, the list of tags
    for ``tags``, the text itself for ``text``. Every structured answer, local or from a server, passes here
    before it is returned; Caption Folder calls it for its own JSON handling. ``should_stop`` (Cancel) is looked
    at before each pattern match; a cancelled check raises GenerationInterrupted.
    """
    if spec.output_format == "tags":
        if tags_match(text):
            return text.split(", "), None
        return None, f"the answer is not {TAGS_DESCRIPTION}: {text[:80]!r}"
    if spec.output_format != "json":
        return text, None
    try:
        value = parse_strict(text)
    except strict_json.StrictJSONError as exc:
        return None, f"the answer is not strict JSON ({exc}; raise max_new_tokens if it was cut)"
    why = schema_error(spec.schema if spec.schema is not None else ANY_OBJECT_SCHEMA, value, should_stop)
    if why is not None:
        return None, f"the answer does not match json_schema: {why}"
    return value, None


def check_answer(spec: OutputSpec, text: str) -> str | None:
    """Why ``text`` is not an answer of ``spec`` (None when it is): :func:`validate_answer`'s reason."""
    return validate_answer(text, spec)[1]


def normalize_json(text: str) -> str:
    """A JSON answer as compact, strictly valid JSON: xgrammar (vLLM's default) lets raw control characters
    (U+0000-U+001F) into strings, which strict parsers refuse; they come back escaped, the values unchanged.
    Call after ``validate_answer`` accepted ``text``."""
    return strict_json.dumps(parse_strict(text))


def tags_match(text: str) -> bool:
    """Whether ``text`` is a tag list of the ``tags`` grammar."""
    return _TAGS_PATTERN.fullmatch(text) is not None


# -- compiled constraints, cached per tokenizer and grammar ----------------------------------------
@dataclass
class Compiled:
    """One tokenizer's view of one grammar: what each answer's matcher starts from."""

    tokenizer_info: Any
    grammar: str
    vocab_size: int
    eos_ids: frozenset[int]
    closing: ClosingVocab
    # Tokens of the greedy closing path from the start (EOS included): the least max_new_tokens that works (None:
    # more than CLOSING_LIMIT).
    min_new_tokens: int | None = None
    compile_s: float = 0.0
    # Within this many tokens of the closing path's length, each token is checked to leave a way to close in time.
    slack: int = 24


class ConstraintCache:
    """llguidance tokenizers (about 1.4 s to build for Qwen's vocabulary) and checked grammars, per tokenizer.

    Keyed by the tokenizer object itself (weakly: a model unloaded takes its entries with it), the logits' width,
    the stop tokens, the format and the schema (canonical JSON).
    """

    def __init__(self, max_grammars: int = 32) -> None:
        self._per_tokenizer: weakref.WeakKeyDictionary[Any, _TokenizerEntry] = weakref.WeakKeyDictionary()
        self.max_grammars = max_grammars
        self._lock = threading.Lock()

    def get(self, tokenizer: Any, vocab_size: int, eos_ids: set[int], spec: OutputSpec) -> Compiled:
        llg = _llguidance()
        eos = tuple(sorted(eos_ids)) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
        key = (int(vocab_size), eos, spec.output_format, spec.schema_text)
        with self._lock:
            mine = self._per_tokenizer.get(tokenizer)
            if mine is None:
                mine = self._per_tokenizer[tokenizer] = _TokenizerEntry(
                    {}, LRU(max_entries=self.max_grammars), {})
            hit = mine.grammars.get(key)
            if hit is not None:
                return hit
            t0 = time.perf_counter()
            info = mine.infos.get(key[:2])
            if info is None:
                # The model's vocabulary may be padded beyond the tokenizer's: n_vocab is the logits' width, and
                # the ids past the tokenizer are never allowed.
                info = llg.hf.from_tokenizer(tokenizer, n_vocab=int(vocab_size), eos_token=list(eos) or None)
                mine.infos[key[:2]] = info
            grammar = spec.grammar()
            probe = llg.LLMatcher(info, grammar, log_level=0)
            if probe.is_error():
                raise QwenVLError(f"json_schema cannot be used for constrained decoding: {probe.get_error()}")
            vocab = mine.closing.get(int(vocab_size))
            if vocab is None:
                vocab = mine.closing[int(vocab_size)] = closing_vocab(tokenizer, int(vocab_size))
            path = closing_path(probe, vocab, min(eos) if eos else None, CLOSING_LIMIT)
            # One token can open an optional part (a property, an array item, a longer branch): the budget check
            # starts early enough that even the largest such step still leaves room to close.
            slack = BUDGET_SLACK + (largest_step(spec.schema) if spec.schema is not None else 0)
            compiled = Compiled(info, grammar, int(vocab_size), frozenset(eos), vocab,
                                None if path is None else len(path), time.perf_counter() - t0, slack)
            mine.grammars.put(key, compiled)
            return compiled


@dataclass
class _TokenizerEntry:
    """One tokenizer's llguidance tokenizers (per logits width and stop tokens), grammars and closing tokens."""

    infos: dict[tuple[int, tuple[int, ...]], Any]
    grammars: LRU[Compiled]
    closing: dict[int, ClosingVocab]  # per logits width


CONSTRAINTS = ConstraintCache()

@dataclass
class ConstraintStats:
    """What the constraint cost in one generate call (for the run record)."""

    seconds: float = 0.0  # wall time in the processor
    cpu_seconds: float = 0.0  # this thread's CPU time in it (a busy machine stretches wall time, not this)
    steps: int = 0
    compile_s: float = 0.0
    budget_steps: int = 0  # steps on which the token budget narrowed the choice


class GrammarConstraint:
    """A transformers logits processor: each row's logits masked to what its grammar allows, within the budget.

    One per generate call (it keeps one matcher per row). Rows that ended (EOS) are left alone (generate pads
    them). ``input_ids`` is the whole sequence, prompt included: only its last column is read, so a reused prompt
    prefix (prefix_reuse.py) and a static cache (decode_compile.py) change nothing here.
    """

    def __init__(self, compiled: Compiled, rows: int, max_new: int, stats: ConstraintStats | None = None) -> None:
        llg = _llguidance()
        self.compiled = compiled
        self.matchers = [llg.LLMatcher(compiled.tokenizer_info, compiled.grammar, log_level=0) for _ in range(rows)]
        self.done = [False] * rows
        self.number_run = [0] * rows  # number characters at the end of each row's answer
        self.next_check = [0] * rows  # the step at which each row's closing path is computed again
        self.max_new = int(max_new)
        self.step = 0
        self.stats = stats if stats is not None else ConstraintStats()
        self.eos = sorted(compiled.eos_ids)
        self.eos_main = self.eos[0] if self.eos else None
        words = (compiled.vocab_size + 31) // 32
        self.bitmask = torch.zeros((rows, words), dtype=torch.int32)
        self.numbers = compiled.closing.number_chars
        self.fill_mask = mask_filler()  # imported here, not on the first token: its import is not a token's cost

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t0, c0 = time.perf_counter(), time.thread_time()
        rows = len(self.matchers)
        if self.step > 0:
            last = input_ids[:, -1].tolist()
            for r in range(rows):
                if self.done[r]:
                    continue
                token = int(last[r])
                if token in self.compiled.eos_ids:
                    self.done[r] = True
                elif not self.matchers[r].consume_token(token):
                    raise QwenVLError(f"Constrained decoding lost its place in answer {r + 1}: "
                                      f"{self.matchers[r].get_error() or 'a token the grammar refused'}")
                else:
                    digits = int(self.numbers[token]) if token < self.numbers.shape[0] else 0
                    self.number_run[r] = self.number_run[r] + digits if digits else 0
        left = self.max_new - self.step  # tokens still to come, this one included
        self.step += 1
        # The per-row work is numpy on the host (single-threaded): small torch ops each wake the intra-op thread
        # pool, which on a busy CPU costs far more than the work (measured: ~30 ms a token against ~1 ms).
        width = scores.shape[-1]
        allowed = np.ones(scores.shape, dtype=bool)
        host_scores = None
        for r in range(rows):
            if self.done[r]:
                continue
            self.fill_mask(self.matchers[r], self.bitmask, r)
            row = self._unpack(r, width)
            if self.number_run[r] >= NUMBER_RUN_LIMIT:
                row = self._end_number(row)
            if host_scores is None:
                host_scores = scores.detach().float().cpu().numpy()
            choice = self._within_budget(r, row, host_scores[r], left)
            if choice is not None:
                row = np.zeros_like(row)
                row[choice] = True
            allowed[r] = row
        if scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.is_contiguous():
            out = scores  # masked in place through numpy: no intra-op thread pool (see above)
            np.copyto(scores.detach().numpy(), -np.inf, where=~allowed)
        else:
            out = scores.masked_fill(torch.from_numpy(~allowed).to(scores.device), float("-inf"))
        self.stats.seconds += time.perf_counter() - t0
        self.stats.cpu_seconds += time.thread_time() - c0
        self.stats.steps += 1
        return out

    def _end_number(self, row: np.ndarray) -> np.ndarray:
        """``row`` without the tokens that only lengthen a number, when the grammar allows anything else."""
        numeric = np.zeros_like(row)
        n = min(row.shape[0], self.numbers.shape[0])
        numeric[:n] = self.numbers[:n] > 0
        others = row & ~numeric
        return others if others.any() else row

    def _unpack(self, r: int, width: int) -> np.ndarray:
        row = np.unpackbits(self.bitmask[r].numpy().view(np.uint8), bitorder="little")[:width].astype(bool)
        if row.shape[0] < width:  # logits wider than the mask: the extra ids are never allowed
            row = np.concatenate([row, np.zeros(width - row.shape[0], dtype=bool)])
        if self.eos_main is not None and self.eos_main < width and row[self.eos_main]:
            for e in self.eos:  # every stop token of the model ends an answer the grammar accepts
                if e < width:
                    row[e] = True
        return row

    def _within_budget(self, r: int, row: np.ndarray, scores: np.ndarray, left: int) -> int | None:
        """The token to take when the budget narrows the choice, else None (the grammar's mask alone)."""
        if self.step < self.next_check[r]:
            return None  # far from the budget (see below): no closing path needed yet
        matcher = self.matchers[r]
        closing = self.compiled.closing
        path = closing_path(matcher, closing, self.eos_main, left + 1)
        if path is None:
            return None  # no closing path within the budget: nothing to keep (checked before generating)
        slack = self.compiled.slack
        if len(path) + slack < left:
            # Room to spare: the model's own choice. A token lengthens the path by at most ``slack`` (the assumption
            # the check rests on), so the next k steps cannot reach the budget while path + k*(slack+1) + slack
            # stays below what is left: the path is computed again only then.
            self.next_check[r] = self.step + max(0, (left - len(path) - slack - 1) // (slack + 1))
            return None
        self.stats.budget_steps += 1
        # The model's best tokens first: the first after which the answer can still close in time.
        candidates = np.flatnonzero(row)
        if candidates.size > 16:  # a partial sort: a full one of 151,936 scores costs ~9 ms
            candidates = candidates[np.argpartition(-scores[candidates], 15)[:16]]
        for token in candidates[np.argsort(-scores[candidates], kind="stable")].tolist():
            if token in self.compiled.eos_ids:
                return int(token)
            if matcher.try_consume_tokens([token]) != 1:
                continue
            rest = closing_path(matcher, closing, self.eos_main, left)
            matcher.rollback(1)
            if rest is not None and len(rest) <= left - 1:
                return int(token)
        return int(path[0])


def make_constraint(tokenizer: Any, vocab_size: int, eos_ids: set[int], spec: OutputSpec, rows: int,
                    max_new: int, stats: ConstraintStats) -> GrammarConstraint:
    """The logits processor for one generate call of ``rows`` answers, after checking the budget fits."""
    compiled = CONSTRAINTS.get(tokenizer, vocab_size, eos_ids, spec)
    stats.compile_s += compiled.compile_s
    compiled.compile_s = 0.0  # counted once: later calls reuse the cached compile
    need = compiled.min_new_tokens
    if need is None or need > max_new:
        raise QwenVLError(budget_message(spec, max_new, need))
    return _processor_class()(compiled, rows, max_new, stats)


def budget_message(spec: OutputSpec, max_new: int, need: int | None) -> str:
    """The refusal of a ``max_new_tokens`` too small for any complete answer of ``spec``."""
    what = "the JSON schema" if spec.output_format == "json" else "a tag list"
    if need is None:
        return (f"max_new_tokens is {max_new} but every complete answer of {what} found takes more than "
                f"{CLOSING_LIMIT} tokens: simplify the schema (fewer required fields, smaller minLength/minItems).")
    return (f"max_new_tokens is {max_new} but the shortest complete answer of {what} takes {need} tokens (the stop "
            f"token included): raise max_new_tokens to at least {need}.")


_PROCESSOR_CLASS: type | None = None


def _processor_class() -> type:
    """GrammarConstraint as a subclass of transformers' LogitsProcessor (built on first use: no import at load)."""
    global _PROCESSOR_CLASS
    if _PROCESSOR_CLASS is None:
        from transformers import LogitsProcessor

        _PROCESSOR_CLASS = type("GrammarLogitsProcessor", (GrammarConstraint, LogitsProcessor), {})
    return _PROCESSOR_CLASS


def check_budget(spec: OutputSpec, max_new_tokens: int) -> None:
    """Refuse a structured request whose ``max_new_tokens`` leaves no room for any answer (0 or less), on every
    backend, before any model work; the local backend also refuses anything below its closing path's length."""
    if spec.constrained and int(max_new_tokens) < 1:
        raise QwenVLError(f"max_new_tokens is {int(max_new_tokens)}: an answer of output_format {spec.output_format} "
                          "needs at least one token (and the stop token): raise max_new_tokens.")


def enforce_answers(spec: OutputSpec, result: Any, per_answer_errors: bool,
                    should_stop: Callable[[], bool] | None = None) -> None:
    """Validate every answer of ``result`` (a GenerationResult) against ``spec`` before it is returned.

    An invalid answer raises a QwenVLError naming it, or, with ``per_answer_errors``, becomes that answer's error
    (its text emptied; its ending FAILED unless it already says why, e.g. CUT).
    """
    if not spec.constrained:
        return
    for i, text in enumerate(result.texts):
        if result.error_of(i) is not None:
            continue
        _, why = validate_answer(text, spec, should_stop)
        if why is None:
            continue
        cut = result.ending_of(i) == CUT
        message = (f"Answer {i + 1} is not valid {spec.output_format}: {why}"
                   + (" (it was cut at max_new_tokens: raise max_new_tokens)" if cut else ""))
        if not per_answer_errors:
            raise QwenVLError(message)
        if len(result.errors) < len(result.texts):
            result.errors.extend([None] * (len(result.texts) - len(result.errors)))
        result.errors[i] = message
        result.texts[i] = ""
        if i < len(result.endings) and result.endings[i] == COMPLETE:
            result.endings[i] = FAILED
