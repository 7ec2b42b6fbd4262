"""Tag rules for written captions: ``exclude_tags`` and ``replace_tags`` (Caption Folder and ``cli.py caption-folder``).

A caption is split on commas into items (a tag list, or prose: a rule only ever touches a whole comma-separated
item), each item trimmed, empty items dropped. Two tags are the same tag when they are equal ignoring case and
the difference between ``_`` and spaces (``Red_Car`` is ``red car``): that is how rules match and how duplicates
are found.

- ``replace_tags``: one rule per line, ``old = new`` (split at the first ``=``; blank lines and lines starting
  with ``#`` are ignored). Each item is compared with the rules in order; the first rule whose ``old`` is that
  item replaces it by ``new``, and nothing else happens to it: rules apply once, in order, never to what a rule
  produced (``a = b`` then ``b = c`` turns ``a`` into ``b``, not ``c``). An empty ``new`` drops the item; a
  ``new`` holding commas gives several tags (``1girl = girl, solo``).
- ``exclude_tags``: comma-separated; every tag equal to one of them is dropped, including one a rule produced,
  so an excluded tag never survives.
- Then duplicates are dropped, the first kept, order kept, and the items are joined with ``", "``.

With no rule at all the caption is left exactly as it is (not even re-joined). An empty result is that file's
error (``EMPTY_AFTER_RULES``): nothing is written. The node's ``prefix`` / ``suffix`` go verbatim around the result
and are not touched by rules. The conventions follow kohya's ``--undesired_tags`` / ``--tag_replacement`` and
taggui's "tags to exclude".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import QwenVLError

EMPTY_AFTER_RULES = "error: the tag rules removed every tag; nothing written"
RULES_MAX_CHARS = 1 << 20  # a rules text is typed by a person; a megabyte is a pasted file by mistake

_SPACES = re.compile(r"[\s_]+")


class TagRuleError(ValueError):
    """A rule that cannot be read; the message names the line and the fix."""


def tag_key(tag: str) -> str:
    """The form two tags are compared in: case folded, ``_`` and runs of whitespace as one space, ends trimmed."""
    return _SPACES.sub(" ", tag).strip().casefold()


def split_items(text: str) -> list[str]:
    """The comma-separated items of a caption, trimmed, empty ones dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass(frozen=True)
class TagRules:
    """Parsed rules: ``exclude`` holds tag keys; ``replace`` holds (old key, new tags) pairs in the order given."""

    exclude: frozenset[str] = frozenset()
    replace: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def empty(self) -> bool:
        return not self.exclude and not self.replace

    def apply(self, caption: str) -> str:
        """``caption`` with the rules applied (see the module's text); "" when nothing is left."""
        if self.empty:
            return caption
        first_rule: dict[str, tuple[str, ...]] = {}
        for old, new in self.replace:
            first_rule.setdefault(old, new)  # a later rule for the same tag never applies: the first one does
        kept: dict[str, str] = {}
        for item in split_items(caption):
            produced = first_rule.get(tag_key(item), (item,))
            for tag in produced:
                key = tag_key(tag)
                if key and key not in self.exclude:
                    kept.setdefault(key, tag)
        return ", ".join(kept.values())


def parse_exclude(text: str) -> frozenset[str]:
    """The keys of a comma-separated ``exclude_tags`` input (newlines count as commas too)."""
    _check_size(text, "exclude_tags")
    return frozenset(k for k in (tag_key(t) for t in text.replace("\n", ",").split(",")) if k)


def parse_replace(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The rules of a ``replace_tags`` input, one ``old = new`` per line; raises ``TagRuleError`` naming the line."""
    _check_size(text, "replace_tags")
    rules: list[tuple[str, tuple[str, ...]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if "=" not in stripped:
            raise TagRuleError(f"replace_tags line {number} ({stripped[:60]!r}) has no '=': write one rule per "
                               "line as 'old = new' (an empty new drops the tag)")
        old, new = stripped.split("=", 1)
        if not tag_key(old):
            raise TagRuleError(f"replace_tags line {number} ({stripped[:60]!r}) has nothing before '=': write "
                               "the tag to replace first, as 'old = new'")
        if "," in old:
            raise TagRuleError(f"replace_tags line {number} ({stripped[:60]!r}) has a comma before '=': a rule "
                               "replaces one tag; write one line per tag")
        rules.append((tag_key(old), tuple(split_items(new))))
    return tuple(rules)


def parse_rules(exclude_tags: str = "", replace_tags: str = "") -> TagRules:
    """Both inputs as one ``TagRules``; raises ``TagRuleError`` (a ValueError) with the line and the fix."""
    return TagRules(parse_exclude(exclude_tags or ""), parse_replace(replace_tags or ""))


def caption_transform(rules: TagRules) -> Callable[[str, Path], str] | None:
    """Caption Folder's hook for ``rules`` (None when there are none): the cleaned answer with the rules applied;
    an answer they leave empty raises ``QwenVLError``, that file's error (nothing written)."""
    if rules.empty:
        return None

    def apply(answer: str, path: Path) -> str:
        out = rules.apply(answer)
        if not out:
            raise QwenVLError(EMPTY_AFTER_RULES.removeprefix("error: ") + f" (the answer was {answer[:80]!r})")
        return out

    return apply


def with_tag_rules(rules: TagRules, output_format: str, json_field: str,
                   transform: Callable[[str, Path], str] | None) -> Callable[[str, Path], str] | None:
    """Caption Folder's ``transform`` followed by the tag rules (None when neither is set). Rules split on commas,
    which would break a whole JSON answer: with output_format json they need ``json_field``."""
    rules_hook = caption_transform(rules)
    if rules_hook is None:
        return transform
    if output_format == "json" and not json_field:
        raise QwenVLError("exclude_tags / replace_tags split a caption on commas, which would break a whole JSON "
                          "answer: set json_field to the field that holds the caption, or clear the tag rules.")
    if transform is None:
        return rules_hook
    return lambda answer, path: rules_hook(transform(answer, path), path)


def _check_size(text: str, name: str) -> None:
    if len(text) > RULES_MAX_CHARS:
        raise TagRuleError(f"{name} is {len(text)} characters long (at most {RULES_MAX_CHARS}): give the tags "
                           "themselves, not a file's contents by mistake")
