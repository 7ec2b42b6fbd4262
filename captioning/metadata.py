"""``metadata.jsonl``: the Hugging Face ``datasets`` imagefolder rows (``file_name``, ``text``) a run keeps up to date.

A line that cannot be read as a row (not strict JSON, nested too deep, a 5,000-digit number, not an object with a
``file_name`` string) is one bad line: it is kept exactly as it was and said in the log, never a reason to stop the
run or to drop the rows around it.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import strict_json
from ..core.errors import QwenVLError
from .commit import CaptionFileError, _kind, read_caption, write_caption
from .options import METADATA_NAME, CaptionResult

log = logging.getLogger("QwenVL-Fast")

METADATA_READ_LIMIT = 256 << 20
_FIX = "move it away to start a new one (or turn write_jsonl off)"


@dataclass
class Metadata:
    """The file's lines in order: each a row (a dict) or a line kept verbatim (a str)."""

    lines: list[dict[str, Any] | str] = field(default_factory=list)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if isinstance(line, dict)]

    @property
    def bad_lines(self) -> int:
        return sum(isinstance(line, str) for line in self.lines)


def _parse_line(path: Path, number: int, line: str) -> dict[str, Any] | str:
    try:
        row = strict_json.loads(line)
    except strict_json.StrictJSONError as exc:
        log.warning("[QwenVL-Fast] %s line %d is not a row (%s): kept as it is", path, number, exc)
        return line
    if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
        log.warning("[QwenVL-Fast] %s line %d is not an object with a \"file_name\" string: kept as it is",
                    path, number)
        return line
    return row


def load_metadata(folder: Path) -> Metadata:
    """``folder``'s metadata.jsonl (empty if missing). Lines are split on "\\n" only: a row's text may hold U+2028
    and the like, which ``str.splitlines`` would cut. The file itself must be a readable UTF-8 regular file of at
    most 256 MiB (not a link, not a folder): else ``QwenVLError`` with the fix, before any model work."""
    path = Path(folder) / METADATA_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Metadata()
    if not stat.S_ISREG(st.st_mode):
        raise QwenVLError(f"{path} is {_kind(st.st_mode)}, not a file: {_FIX}")
    try:
        text = read_caption(path, METADATA_READ_LIMIT, fix=_FIX)
    except FileNotFoundError:
        return Metadata()
    except CaptionFileError as exc:
        raise QwenVLError(f"{path}: {exc}") from exc
    return Metadata([_parse_line(path, n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()])


def read_metadata(folder: Path) -> list[dict]:
    """The readable rows of ``folder``'s metadata.jsonl (see ``load_metadata``)."""
    return load_metadata(folder).rows


def metadata_name(path: Path, folder: Path) -> str:
    """A file's ``file_name`` in metadata.jsonl: its path relative to the folder, with "/".

    A name that is not valid UTF-8 (bytes Python keeps as lone surrogates) cannot be a ``file_name`` that the
    ``datasets`` loader matches to the file: ``QwenVLError`` saying to rename it, for that file alone.
    """
    name = Path(path).relative_to(folder).as_posix()
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise QwenVLError(f"the name {ascii(name)} is not valid UTF-8, so metadata.jsonl cannot name it (datasets "
                          "matches file_name to the file): rename it; nothing written") from None
    return name


def row_line(row: dict[str, Any]) -> str:
    """One row as a JSON line; text UTF-8 cannot hold (a lone surrogate) is written as \\u escapes."""
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row, ensure_ascii=True)
    return line


def _apply(meta: Metadata, name: str, result: CaptionResult, index: dict[str, int]) -> bool:
    """Set ``name``'s row from ``result``: its first row updated in place, later duplicates dropped."""
    lines = meta.lines
    if name not in index:
        index[name] = len(lines)
        lines.append({"file_name": name, "text": result.caption,
                      **({"json": result.data} if result.data is not None else {})})
        return True
    i = index[name]
    row = lines[i]
    changed = False
    if row.get("text") != result.caption:
        row["text"] = result.caption
        changed = True
    if result.data is not None and row.get("json") != result.data:
        row["json"] = result.data
        changed = True
    return changed


def update_metadata(folder: Path, results: Iterable[CaptionResult]) -> bool:
    """Bring ``folder``'s metadata.jsonl up to date with ``results``; whether it was written.

    The file is read again (someone may have changed it during the run). Each file captioned now (written, or
    captioned without writing a caption file) gets its row's ``text`` set to the caption as written: in place,
    other columns kept, later duplicate rows of it dropped; a file without a row gets a new one at the end, in
    listing order. A file skipped because it has a caption gets a row with that caption only when it has none.
    Rows of every other file, and lines that are not rows, stay as they were, in their order. Committed whole or
    not at all (``write_caption``), keeping the file's mode.
    """
    folder = Path(folder)
    meta = load_metadata(folder)
    index: dict[str, int] = {}
    for i, line in enumerate(meta.lines):
        if isinstance(line, dict):
            index.setdefault(line["file_name"], i)
    changed = False
    touched: set[str] = set()
    for r in results:
        try:
            name = metadata_name(r.path, folder)
        except QwenVLError:
            continue  # that file's error was given before any work
        if r.status in ("written", "captioned"):
            changed |= _apply(meta, name, r, index)
            touched.add(name)
        elif r.status == "skipped" and r.caption.strip() and name not in index:
            changed |= _apply(meta, name, r, index)
    keep = []
    for i, line in enumerate(meta.lines):
        if isinstance(line, dict) and line["file_name"] in touched and index[line["file_name"]] != i:
            changed = True  # a later duplicate row of a file captioned now
            continue
        keep.append(line)
    if not changed:
        return False
    data = "".join((row_line(line) if isinstance(line, dict) else line) + "\n" for line in keep)
    write_caption(folder / METADATA_NAME, data, overwrite=True)
    return True
