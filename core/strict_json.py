"""Strict, bounded JSON: what any answer, schema or ``metadata.jsonl`` line is parsed with.

Python's ``json`` accepts ``NaN``/``Infinity`` (not JSON), turns ``1e400`` into ``inf`` and recurses once per
nesting level, so a hostile or unlucky text can raise ``RecursionError`` or spend seconds on a huge integer. Here
the nesting depth and every number's length are bounded by a linear scan *before* parsing, and the non-finite
values are refused, each as a ``StrictJSONError`` (a ``ValueError``) that says what was wrong.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64
MAX_NUMBER_CHARS = 64


class StrictJSONError(ValueError):
    """The text is not strict JSON within the bounds; the message says why (for one item's error)."""


def _scan(text: str, max_depth: int, max_number_chars: int) -> None:
    """Linear pass outside strings: nesting depth and the length of each number literal."""
    depth = 0
    in_string = False
    escaped = False
    run = 0  # length of the current run of number characters
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch in "0123456789+-.eE":
            run += 1
            if run > max_number_chars:
                raise StrictJSONError(f"a number longer than {max_number_chars} characters")
            continue
        run = 0
        if ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                raise StrictJSONError(f"nested deeper than {max_depth} levels")
        elif ch in "]}":
            depth -= 1


def _refuse_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise StrictJSONError(f"the number {literal[:20]} is out of range")
    return value


def loads(text: str, *, max_depth: int = MAX_DEPTH, max_number_chars: int = MAX_NUMBER_CHARS,
          allow_control_characters: bool = False) -> Any:
    """Parse strict JSON (no NaN/Infinity, finite numbers, bounded depth and number length) or raise StrictJSONError.

    ``allow_control_characters`` accepts raw U+0000-U+001F inside strings (``json.loads(strict=False)``), which
    some constrained decoders emit; everything else stays strict.
    """
    if not isinstance(text, str):
        raise StrictJSONError(f"expected text, got {type(text).__name__}")
    _scan(text, max_depth, max_number_chars)
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                          strict=not allow_control_characters)
    except StrictJSONError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise StrictJSONError(f"not valid JSON ({exc})") from None


def dumps(value: Any, *, ascii_only: bool = False) -> str:
    """Compact JSON that any strict parser reads back (refuses NaN/Infinity; lone surrogates escaped)."""
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: \uXXXX escapes are valid JSON and survive UTF-8 files
        text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text
