"""The closing path of a constrained answer: the shortest way the grammar lets an answer end from where it is.

Computed over the tokenizer's real vocabulary (:class:`ClosingVocab` ranks every token), so whatever characters a
schema forces (capitalised keys, enums, patterns) some token writes them. ``engine/structured.py`` uses it to
refuse a budget no answer fits, and at each step to keep the answer able to close within ``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core import strict_json


def mask_filler() -> Any:
    import llguidance.torch as llg_torch

    return llg_torch.fill_next_token_bitmask


# The longest closing path looked for before generating (longer: the schema is refused).
CLOSING_LIMIT = 4096
_NUMBER_CHARS = frozenset("0123456789.eE+-")
# A run of number characters this long stops growing where the grammar allows anything else: strict JSON
# (core.strict_json) refuses numbers over MAX_NUMBER_CHARS, and a grammar's "number" has no length bound (random or
# weak weights write 100.000000... until the budget ends). Below that limit, with room for one more token.
NUMBER_RUN_LIMIT = strict_json.MAX_NUMBER_CHARS - 16
# How many of the best-ranked closing tokens of each class are tried one by one (with every one-character token)
# before the grammar's whole mask is computed.
_CLOSING_SHORTLIST = 12


@dataclass
class ClosingVocab:
    """The tokenizer's whole vocabulary ranked for closing an answer: what a closing path may take, best first.

    Rank classes, each longest text first: only ``"}]`` (closes the most per token), then with ``,:``, then digits,
    then any other printable ASCII (letters of either case, punctuation), then everything else (whitespace, other
    scripts). So whatever characters the grammar forces (a capitalised key, an enum, a pattern), some token of
    the real vocabulary writes it.
    """

    ranks: np.ndarray  # one per token id (logits width); larger is worse; ids past the tokenizer are never taken
    shortlist: list[int]  # the best-ranked tokens, tried before the mask
    # Per token id: how many characters of a JSON number it writes when it is made of them only (else 0).
    number_chars: np.ndarray
    bitmask: torch.Tensor  # scratch for one mask


def closing_vocab(tokenizer: Any, vocab_size: int) -> ClosingVocab:
    """Rank every token of ``tokenizer`` (``vocab_size``: the logits' width) for :func:`closing_path`."""
    n_tok = min(len(tokenizer), int(vocab_size))
    pieces = tokenizer.convert_ids_to_tokens(list(range(n_tok)))
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    worst = np.iinfo(np.int32).max
    ranks = np.full(int(vocab_size), worst, dtype=np.int64)
    number_chars = np.zeros(int(vocab_size), dtype=np.int64)
    for i, piece in enumerate(pieces):
        if not piece or i in specials:
            continue
        # Byte-level pieces: printable ASCII stands for itself; any other piece holds a space, a control character
        # or another script (the last class either way), so it needs no decoding.
        ranks[i] = _rank(piece) if piece.isascii() else 4_000 + (999 - min(len(piece), 999))
        if piece.isascii() and all(c in _NUMBER_CHARS for c in piece):
            number_chars[i] = len(piece)
    # The shortlist: the best few of each class, and every one-character token (a vocabulary holds dozens of
    # "}}}}"-like closers, which alone would crowd out the plain '"', ',' and digits).
    order = np.argsort(ranks, kind="stable")
    classes = ranks[order] // 1000
    shortlist = [int(t) for c in range(5) for t in order[classes == c][:_CLOSING_SHORTLIST]]
    singles = [i for i, piece in enumerate(pieces) if piece and len(piece) == 1 and 33 <= ord(piece) <= 126
               and i not in specials]
    shortlist = sorted(set(shortlist) | set(singles), key=lambda t: (int(ranks[t]), t))
    return ClosingVocab(ranks, shortlist, number_chars,
                        torch.zeros((1, (int(vocab_size) + 31) // 32), dtype=torch.int32))


def _rank(text: str) -> int:
    length = min(len(text), 999)
    if not text:
        return 5_000
    if all(c in '"}]' for c in text):
        cls = 0
    elif all(c in '"}],:' for c in text):
        cls = 1
    elif text.isdigit() and text.isascii():
        cls = 2
    elif all(33 <= ord(c) <= 126 for c in text):
        cls = 3
    else:
        cls = 4
    return cls * 1000 + (999 - length)


def closing_path(matcher: Any, vocab: ClosingVocab, eos: int | None, limit: int) -> list[int] | None:
    """The tokens of a short way to finish the answer from ``matcher``'s state (EOS last), or None past ``limit``
    (or when the grammar allows no token at all). The matcher is rolled back after.

    Each step: the tokens the grammar forces (its fast-forward tokens), else the best-ranked token of the whole
    vocabulary that the grammar allows (:class:`ClosingVocab`).
    """
    path: list[int] = []
    try:
        while len(path) < limit:
            if matcher.is_accepting():
                return [*path, eos] if eos is not None else path
            forced = matcher.compute_ff_tokens()[: limit - len(path)]
            if forced:
                taken = matcher.try_consume_tokens(forced)
                path.extend(forced[:taken])
                if taken:
                    continue
            token = _best_allowed(matcher, vocab)
            if token is None or matcher.try_consume_tokens([token]) != 1:
                return None
            path.append(token)
        return None
    finally:
        if path:
            matcher.rollback(len(path))


def _best_allowed(matcher: Any, vocab: ClosingVocab) -> int | None:
    for token in vocab.shortlist:  # cheap: a try and a rollback each
        if matcher.try_consume_tokens([token]) == 1:
            matcher.rollback(1)
            return token
    mask_filler()(matcher, vocab.bitmask, 0)
    allowed = np.unpackbits(vocab.bitmask[0].numpy().view(np.uint8), bitorder="little")[: vocab.ranks.shape[0]]
    ranked = np.where(allowed.astype(bool), vocab.ranks[: allowed.shape[0]], np.iinfo(np.int64).max)
    best = int(np.argmin(ranked))
    return best if ranked[best] < np.iinfo(np.int32).max else None
