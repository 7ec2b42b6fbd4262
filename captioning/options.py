"""What a Caption Folder run is asked to do (``CaptionOptions``) and what it reports per file (``CaptionResult``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import QwenVLError
from .tag_rules import TagRuleError, TagRules, parse_rules

EXISTING_MODES = ["skip", "overwrite", "append", "prepend"]
CAPTION_EXTENSIONS = [".txt", ".caption"]
METADATA_NAME = "metadata.jsonl"
EMPTY_ANSWER = "error: the model gave an empty answer; nothing written"


@dataclass(frozen=True)
class CaptionOptions:
    """How a Caption Folder run treats the folder and what it writes (the defaults are the node's first behaviour).

    ``prefix`` / ``suffix``: put verbatim before / after every written caption. ``existing``: where a caption
    exists, ``skip`` it, ``overwrite`` it, ``append`` the new text after it or ``prepend`` it (joined with ", ");
    files without one are always captioned. ``extension``: ``.txt`` or ``.caption``. ``recursive``: subfolders
    too, each caption beside its file. ``limit``: caption only the next N files not yet done (0: all).
    ``write_jsonl``: also keep ``metadata.jsonl`` (Hugging Face imagefolder rows) in the folder root.
    ``write_captions``: write caption files at all (off: the captions are only returned).
    ``json_field``: with ``output_format`` json, the caption written is this field of the answer's object (a
    string as it is, any other value as compact JSON); empty: the whole JSON. metadata.jsonl's row then also
    carries the whole object in its ``json`` column.
    ``ledger``: keep the folder run's ledger (``captioning.ledger``), so that append / prepend apply once per file
    and settings and ``limit`` moves on; off: every run decides from the files alone.
    """

    prefix: str = ""
    suffix: str = ""
    existing: str = "skip"
    extension: str = ".txt"
    recursive: bool = False
    limit: int = 0
    write_jsonl: bool = False
    write_captions: bool = True
    json_field: str = ""
    ledger: bool = True
    exclude_tags: str = ""  # tag rules (captioning.tag_rules), applied to every answer before prefix / suffix
    replace_tags: str = ""

    def __post_init__(self):
        if self.existing not in EXISTING_MODES:
            raise QwenVLError(f"existing must be one of {', '.join(EXISTING_MODES)}, not {self.existing!r}")
        if self.extension not in CAPTION_EXTENSIONS:
            raise QwenVLError(f"extension must be one of {', '.join(CAPTION_EXTENSIONS)}, not {self.extension!r}")
        if self.limit < 0:
            raise QwenVLError(f"limit must be 0 (all files) or more, not {self.limit}")
        self.tag_rules()  # a rule that cannot be read: before any file or model work

    def tag_rules(self) -> TagRules:
        """``exclude_tags`` and ``replace_tags`` parsed; raises QwenVLError naming the line and the fix."""
        try:
            return parse_rules(self.exclude_tags, self.replace_tags)
        except TagRuleError as exc:
            raise QwenVLError(str(exc)) from exc


@dataclass
class CaptionResult:
    path: Path
    caption: str
    status: str  # written / captioned / skipped / error: ...
    data: Any = None  # output_format json: the answer's whole object (metadata.jsonl's "json" column)


def resolve_caption_options(caption: CaptionOptions | None, write_txt: bool | None,
                            overwrite: bool | None) -> CaptionOptions:
    """``caption`` with the first spellings folded in: ``overwrite=True`` means ``existing="overwrite"`` (where
    ``existing`` is still "skip"), ``write_txt=False`` means ``write_captions=False``."""
    caption = caption or CaptionOptions()
    if overwrite and caption.existing == "skip":
        caption = dataclasses.replace(caption, existing="overwrite")
    if write_txt is not None and not write_txt:
        caption = dataclasses.replace(caption, write_captions=False)
    return caption


def summarize(results: list[CaptionResult], max_reasons: int = 3) -> str:
    """One line for people: how many were written / skipped / failed, and the first few failures' reasons."""
    written = sum(r.status == "written" for r in results)
    captioned = sum(r.status == "captioned" for r in results)
    skipped = sum(r.status.startswith("skipped") for r in results)
    failed = [r for r in results if r.status.startswith("error")]
    parts = [f"{written} written"]
    if captioned:
        parts.append(f"{captioned} captioned (not written)")
    parts += [f"{skipped} skipped", f"{len(failed)} failed"]
    line = ", ".join(parts)
    if failed:
        reasons = "; ".join(f"{r.path.name}: {r.status.removeprefix('error: ')}" for r in failed[:max_reasons])
        more = f"; and {len(failed) - max_reasons} more" if len(failed) > max_reasons else ""
        line += f" ({reasons}{more})"
    return line


def options_from_settings(settings: Mapping[str, Any]) -> CaptionOptions:
    """The Caption Folder node's settings (its widget values, defaults filled in) as CaptionOptions (overwrite on
    with existing "skip" means overwrite)."""
    existing = settings["existing"]
    if settings.get("overwrite") and existing == "skip":
        existing = "overwrite"
    return CaptionOptions(
        prefix=str(settings["prefix"]), suffix=str(settings["suffix"]), existing=existing,
        extension=settings["extension"], recursive=bool(settings["recursive"]), limit=int(settings["limit"]),
        write_jsonl=bool(settings["write_jsonl"]), write_captions=bool(settings.get("write_txt", True)),
        json_field=str(settings["json_field"]).strip(), exclude_tags=str(settings["exclude_tags"]),
        replace_tags=str(settings["replace_tags"]))


def folder_from_input(folder: Any) -> Path:
    """The folder widget as a path; an empty one is an error (Path("") is the working directory: ComfyUI's own)."""
    text = str(folder or "").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()  # "Copy as path" on Windows adds quotes
    if not text:
        raise QwenVLError("Caption Folder needs a folder: give the full path of the folder to caption.")
    return Path(text)
