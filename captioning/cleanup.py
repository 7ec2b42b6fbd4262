"""Text: a file's prompt, a model's answer made into a caption (cleaned, structured, composed with what exists)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .. import qwenvl_loader as ql
from ..core import strict_json
from ..core.errors import QwenVLError
from .options import CaptionOptions

_PLACEHOLDERS = re.compile(r"\{(name|folder|caption|concept)\}")
PROMPT_PLACEHOLDERS = ("{name}", "{folder}", "{caption}", "{concept}")
_KOHYA_FOLDER = re.compile(r"\d+_(.+)", re.DOTALL)


def kohya_concept(folder_name: str) -> str:
    """The concept of a kohya ``<repeats>_<concept>`` folder (``10_red car`` -> ``red car``); any other name whole."""
    match = _KOHYA_FOLDER.fullmatch(folder_name)
    return match.group(1) if match else folder_name


def render_prompt(prompt: str, path: Path, existing: str = "") -> str:
    """``prompt`` for one file: ``{name}`` is its stem, ``{folder}`` its folder's name, ``{concept}`` that name's
    concept (``kohya_concept``), ``{caption}`` its existing caption (trimmed; empty if none). Exactly these four are
    replaced (not ``str.format``): any other braces, ``{0}``, ``{}``, JSON, stay as written."""
    folder = Path(os.path.abspath(path.parent)).name
    values = {"name": path.stem, "folder": folder, "concept": kohya_concept(folder), "caption": existing.strip()}
    return _PLACEHOLDERS.sub(lambda m: values[m.group(1)], prompt)


_TOKEN = re.compile(r"\S+\s*")
_PUNCT = ".,;:!?"
REPEAT_MIN_COPIES = 3  # a phrase this many times in a row is a model stuck in a loop
REPEAT_MIN_CHARS = 8  # a one-word phrase counts from this many characters (two or more words always count)
_REPEAT_MAX_WORDS = 64


def cut_repeats(text: str) -> str:
    """``text`` with every run of a phrase repeated over and over cut after its first occurrence.

    Precisely: the text is split into words (runs of non-space, with the spaces after them). A phrase is one or
    more consecutive words, compared without case and without the punctuation ``.,;:!?`` at a word's end; it
    counts when it has at least 2 words or, as a single word, at least 8 characters. Where a phrase (of up to
    64 words) occurs ``REPEAT_MIN_COPIES`` (3) or more times in a row, only its first occurrence is kept, ending
    with the punctuation and spaces of the last copy: "a cat, a cat, a cat, a cat" -> "a cat", "a cat, a cat,
    a cat, a dog" -> "a cat, a dog". Scanning goes left to right and tries the shortest phrase first. Two copies
    ("a cat, a cat") and short single words ("very very very") are left alone.
    """
    tokens = _TOKEN.findall(text.strip())
    words = [t.strip().rstrip(_PUNCT).casefold() for t in tokens]
    out: list[str] = []
    i, n = 0, len(tokens)
    while i < n:
        found = None
        for k in range(1, min(_REPEAT_MAX_WORDS, (n - i) // REPEAT_MIN_COPIES) + 1):
            if k == 1 and len(words[i]) < REPEAT_MIN_CHARS:
                continue
            if words[i + k] != words[i]:
                continue
            phrase = words[i:i + k]
            copies = 1
            while i + (copies + 1) * k <= n and words[i + copies * k:i + (copies + 1) * k] == phrase:
                copies += 1
            if copies >= REPEAT_MIN_COPIES:
                found = (k, copies)
                break
        if found is None:
            out.append(tokens[i])
            i += 1
            continue
        k, copies = found
        out.extend(tokens[i:i + k - 1])
        out.append(tokens[i + copies * k - 1])
        i += copies * k
    return "".join(out).strip()


def clean_caption(text: str) -> str:
    """The caption to write from a model's answer: thinking removed (both backends split it off already; a
    leftover ``<think>`` block never reaches a caption file), ends trimmed, repeated phrases cut (``cut_repeats``).
    An empty result means nothing is written."""
    answer, _ = ql.split_thinking(text)
    return cut_repeats(answer)


def _join(left: str, right: str) -> str:
    """Two captions as one: ", " between them, or one space where the left one ends with punctuation."""
    left, right = left.rstrip(), right.lstrip()
    if not left or not right:
        return left or right
    return left + (" " if left[-1] in _PUNCT else ", ") + right


def compose_caption(answer: str, old: str, caption: CaptionOptions) -> str:
    """The text written for a (cleaned) ``answer``: ``prefix + body + suffix``, verbatim.

    ``body`` is the answer, or with ``append`` / ``prepend`` and a non-empty existing caption ``old``: the old
    text after or before the answer (``_join``). The prefix and suffix are taken off ``old`` first when it has
    them (a caption this node wrote), so they appear once, first and last, however often it is appended to.
    """
    body = answer
    core = old.strip()
    if caption.existing in ("append", "prepend") and core:
        p, s = caption.prefix.strip(), caption.suffix.strip()
        if p and core.startswith(p):
            core = core[len(p):].strip()
        if s and core.endswith(s):
            core = core[:-len(s)].strip()
        body = _join(core, answer) if caption.existing == "append" else _join(answer, core)
    return caption.prefix + body + caption.suffix


def structured_caption(text: str, output_format: str, json_field: str = "") -> tuple[str, Any]:
    """(caption, whole JSON object or None) of a structured answer; raises QwenVLError for that file.

    ``json``: the JSON as the model wrote it (compact), or its ``json_field``. ``tags``: the tag list with repeated
    tags dropped (first kept). Repeated-phrase cutting (``cut_repeats``) is not applied: it could break the JSON.
    """
    answer = ql.split_thinking(text)[0].strip()
    if output_format == "tags":
        seen: dict[str, None] = {}
        for tag in answer.split(", "):
            if tag:
                seen.setdefault(tag, None)
        return ", ".join(seen), None
    if output_format != "json" or not answer:
        return answer, None
    try:
        data = strict_json.loads(answer)
    except strict_json.StrictJSONError as exc:
        raise QwenVLError(f"the answer is not JSON ({exc}); nothing written") from None
    if not json_field:
        return answer, data
    if not isinstance(data, dict) or json_field not in data:
        raise QwenVLError(f"the answer has no field '{json_field}' (make it required in json_schema); nothing "
                          "written")
    value = data[json_field]
    return (value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)).strip(), data
