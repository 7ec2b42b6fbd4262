"""Caption every image file (and, if asked, every video file) of one folder (the existing packs' most requested
feature).

Video files are decoded with PyAV: it binds FFmpeg itself (every container and codec FFmpeg reads), ships wheels
with FFmpeg inside for every platform, is maintained, and is what current ComfyUI decodes video with, so a
ComfyUI install already has it. torchvision's video reader was deprecated in favour of TorchCodec, which needs a
system FFmpeg.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import qwenvl_loader as ql
from .core.api import BATCH_MODES, GenerationRequest
from .core.errors import QwenVLError
from .engine.structured import spec_of
from .vision.images import load_image_file
from .vision.video import VIDEO_EXTENSIONS, load_video_file

log = logging.getLogger("QwenVL-Fast")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CHUNK = 4  # images encoded together; one answer each (a server gets twice its requests in flight per chunk)
# An existing caption is read up to this many bytes: captions are a few hundred bytes, and a huge file named like
# one (a log, a dump) must not be pulled into memory and into the node's output.
CAPTION_READ_LIMIT = 1 << 20
EMPTY_ANSWER = "error: the model gave an empty answer; nothing written"
# Platforms without these flags (Windows) have no FIFOs or symlink swaps to guard against in the same way.
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)


EXISTING_MODES = ["skip", "overwrite", "append", "prepend"]
CAPTION_EXTENSIONS = [".txt", ".caption"]
METADATA_NAME = "metadata.jsonl"


@dataclass(frozen=True)
class CaptionOptions:
    """How a Caption Folder run treats the folder and what it writes (the defaults are the node's first behaviour).

    ``prefix`` / ``suffix``: put verbatim before / after every written caption. ``existing``: where a caption
    exists, ``skip`` it, ``overwrite`` it, ``append`` the new text after it or ``prepend`` it (joined with ", ");
    files without one are always captioned. ``extension``: ``.txt`` or ``.caption``. ``recursive``: subfolders
    too, each caption beside its file. ``limit``: caption only the first N files that need work (0: all).
    ``write_jsonl``: also keep ``metadata.jsonl`` (Hugging Face imagefolder rows) in the folder root.
    ``write_captions``: write caption files at all (off: the captions are only returned).
    ``json_field``: with ``output_format`` json, the caption written is this field of the answer's object (a
    string as it is, any other value as compact JSON); empty: the whole JSON. metadata.jsonl's row then also
    carries the whole object in its ``json`` column.
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

    def __post_init__(self):
        if self.existing not in EXISTING_MODES:
            raise QwenVLError(f"existing must be one of {', '.join(EXISTING_MODES)}, not {self.existing!r}")
        if self.extension not in CAPTION_EXTENSIONS:
            raise QwenVLError(f"extension must be one of {', '.join(CAPTION_EXTENSIONS)}, not {self.extension!r}")
        if self.limit < 0:
            raise QwenVLError(f"limit must be 0 (all files) or more, not {self.limit}")


@dataclass
class CaptionResult:
    path: Path
    caption: str
    status: str  # written / captioned / skipped / error: ...
    data: Any = None  # output_format json: the answer's whole object (metadata.jsonl's "json" column)


def list_images(folder: Path, include_videos: bool = False, recursive: bool = False) -> list[Path]:
    """Image (and video) files inside ``folder``; links that lead outside it are ignored.

    Not recursive: the files directly inside it (a file link counts when its target is directly in the folder).
    ``recursive``: its subfolders too, in path order. Every file is resolved and kept only when it lies inside
    the folder; links to folders are not followed (a folder inside is listed under its own path anyway, and one
    outside or a loop is never entered), each real folder is entered once (by device and inode: bind mounts
    cannot loop either), and hidden folders (a name starting with ".": .git, .cache, ...) are left out.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise QwenVLError(f"'{folder}' is not a folder: give the full path of the folder to caption.")
    root = folder.resolve()
    extensions = IMAGE_EXTENSIONS + (VIDEO_EXTENSIONS if include_videos else ())
    if not recursive:
        return [p for p in sorted(folder.iterdir())
                if p.suffix.lower() in extensions and p.is_file() and p.resolve().parent == root]
    files: list[Path] = []
    seen: set[tuple[int, int]] = set()
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            st = os.stat(current)
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:  # an unreadable subfolder: said in the log, the rest is captioned
            if current == folder:
                raise QwenVLError(f"cannot list '{folder}' ({exc.strerror or exc})") from exc
            log.warning("[QwenVL-Fast] cannot list %s: %s", current, exc)
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        for entry in entries:
            p = current / entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not entry.name.startswith("."):
                        pending.append(p)
                elif p.suffix.lower() in extensions and p.is_file() and p.resolve().is_relative_to(root):
                    files.append(p)
            except OSError:  # gone meanwhile, or a link loop: not an image to caption
                continue
    return sorted(files, key=lambda p: p.relative_to(folder).parts)


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


class CaptionFileError(QwenVLError):
    """An existing caption file, or what sits at a caption's name, that cannot be read or replaced safely."""


def caption_path(path: Path, extension: str = ".txt") -> Path:
    """Where the caption of an image (or video) file goes: beside it, same stem, ``extension``."""
    return path.with_suffix(extension)


_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a link"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _not_a_caption(txt: Path, mode: int) -> CaptionFileError:
    return CaptionFileError(f"{txt.name} is {_kind(mode)}, not a caption file: move or rename it, and run again")


def read_caption(txt: Path, limit: int = CAPTION_READ_LIMIT, fix: str = "turn overwrite on to replace it") -> str:
    """The text of the existing caption file ``txt``.

    Anything that is not a readable UTF-8 regular file of at most ``limit`` bytes raises ``CaptionFileError``
    naming the file and the fix (``FileNotFoundError`` if it is gone). Only regular files are opened, and
    without following links or waiting: a FIFO would block the folder forever (beyond Cancel) and a link could
    show a file from outside the folder. The type is checked again on the open descriptor, so a file swapped in
    between the two checks is caught too.
    """
    st = os.lstat(txt)
    if not stat.S_ISREG(st.st_mode):
        raise _not_a_caption(txt, st.st_mode)
    try:
        fd = os.open(txt, os.O_RDONLY | _O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # a link was swapped in after the lstat (EMLINK: BSDs)
            raise CaptionFileError(f"{txt.name} became a link: not read (make it a plain file)") from exc
        raise CaptionFileError(f"cannot read {txt.name} ({type(exc).__name__}: {exc.strerror or exc}); fix its "
                               f"permissions, or {fix}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_a_caption(txt, st.st_mode)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(65536, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise CaptionFileError(f"{txt.name} is larger than {limit // 1024} KiB, too large for a caption: move it "
                               f"away, or {fix}")
    data = b"".join(chunks)
    try:
        return data.decode("utf-8-sig")  # -sig: a BOM that Windows editors put first is not part of the caption
    except UnicodeDecodeError as exc:
        raise CaptionFileError(f"{txt.name} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                               f"re-save it as UTF-8, or {fix}") from exc


def _check_writable_name(txt: Path) -> None:
    """Refuse a caption name taken by a link or by something other than a regular file (lstat: links not followed)."""
    try:
        st = os.lstat(txt)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise CaptionFileError(f"its {txt.suffix} is a link; not written (make {txt.name} a plain file)")
    if not stat.S_ISREG(st.st_mode):
        raise _not_a_caption(txt, st.st_mode)


def _sync_folder(folder: Path) -> None:
    """Make a rename durable: without it a power cut can forget the new name although the data was synced."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_caption(txt: Path, text: str, *, overwrite: bool) -> None:
    """Write ``txt`` whole or not at all: a cancel or a crash mid-write never leaves half a caption.

    The text goes first to a new temporary file in the caption's own folder, created exclusively under an
    unpredictable name (``mkstemp``: ``O_CREAT|O_EXCL``, and ``O_NOFOLLOW`` where the platform has it), so a
    link planted at a guessable name cannot redirect the write outside the folder; it is synced, then renamed
    over ``txt`` (``overwrite``) or hard-linked to it, which fails with ``FileExistsError`` if anything appeared
    there meanwhile instead of replacing it. Neither rename nor link follows a link at ``txt``; a link or a
    non-regular file there is refused with ``CaptionFileError`` all the same, so the caption never ends up as one.
    """
    data = text.encode("utf-8")  # before touching the disk: text that cannot be encoded leaves nothing behind
    fd, tmp_name = tempfile.mkstemp(dir=txt.parent, prefix=".qwenvl-caption-", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        _check_writable_name(txt)
        if overwrite:
            os.replace(tmp, txt)
        else:
            try:
                os.link(tmp, txt)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links (FAT, some network shares): check, then rename
                if os.path.lexists(txt):
                    raise FileExistsError(txt) from None
                os.replace(tmp, txt)
        _sync_folder(txt.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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


def _caption_key(path: Path, extension: str = ".txt") -> str:
    # Windows and macOS file systems ignore case, and macOS's also Unicode normalization: two names equal
    # after both are one file there, so they are treated as one everywhere (a caption set is often moved).
    return unicodedata.normalize("NFC", str(caption_path(path, extension))).casefold()


def caption_collisions(files: list[Path], extension: str = ".txt") -> dict[Path, str]:
    """The files whose captions would land in one file, each with the error status that says so."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(_caption_key(f, extension), []).append(f)
    statuses = {}
    for group in groups.values():
        if len(group) < 2:
            continue
        names = [f.name for f in group]
        listed = ", ".join(names[:-1]) + " and " + names[-1]
        targets = sorted({caption_path(f, extension).name for f in group})
        shared = targets[0] if len(targets) == 1 else (
            f"{' / '.join(targets)} (one file where names ignore case or accents' encoding, as on Windows and macOS)")
        fix = "rename one" if len(group) == 2 else "rename all but one"
        for f in group:
            statuses[f] = f"error: {listed} would share {shared}: {fix}; nothing written"
    return statuses


def _digest_lstat(digest, path: Path) -> None:
    try:
        st = os.lstat(path)
        digest.update(f"{stat.S_IFMT(st.st_mode)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    except FileNotFoundError:
        digest.update(b"-\n")


def folder_fingerprint(folder: Path, include_videos: bool = False, recursive: bool = False,
                       extension: str = ".txt", write_jsonl: bool = False) -> str:
    """A digest of what a Caption Folder run would find: every listed file's path (relative to the folder), size,
    mtime and inode, and the same for its caption (lstat: a link or a folder there counts as what it is), and for
    ``metadata.jsonl`` when ``write_jsonl``. Stat calls only, no file is read, so it is cheap enough for ComfyUI
    to ask before every queued run. Raises ``QwenVLError`` for a missing folder.
    """
    folder = Path(folder).expanduser()
    digest = hashlib.sha256()
    for f in list_images(folder, include_videos, recursive):
        st = f.stat()
        rel = os.fsencode(str(f.relative_to(folder)))
        digest.update(rel + f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0".encode())
        _digest_lstat(digest, caption_path(f, extension))
    if write_jsonl:
        _digest_lstat(digest, folder / METADATA_NAME)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------- prompts and caption text
_PLACEHOLDERS = re.compile(r"\{(name|folder|caption)\}")
PROMPT_PLACEHOLDERS = ("{name}", "{folder}", "{caption}")


def render_prompt(prompt: str, path: Path, existing: str = "") -> str:
    """``prompt`` for one file: ``{name}`` is its stem, ``{folder}`` its folder's name, ``{caption}`` its existing
    caption (trimmed; empty if none). Exactly these three are replaced (not ``str.format``): any other braces,
    ``{0}``, ``{}``, JSON, stay as written."""
    values = {"name": path.stem, "folder": Path(os.path.abspath(path.parent)).name, "caption": existing.strip()}
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


# ------------------------------------------------------------------------------------- metadata.jsonl
METADATA_READ_LIMIT = 256 << 20


def read_metadata(folder: Path) -> list[dict]:
    """The rows of ``folder``'s ``metadata.jsonl`` (none if it is missing).

    Every non-blank line must be a JSON object with a string ``file_name`` (the Hugging Face imagefolder layout);
    anything else (not JSON, not UTF-8, a link, a folder, over 256 MiB) raises ``QwenVLError`` naming the line and
    the fix, so a run never drops rows it cannot read. Lines are split on "\\n" only: a row's text may hold
    U+2028 and the like, which ``str.splitlines`` would cut.
    """
    path = Path(folder) / METADATA_NAME
    fix = "move it away to start a new one (or turn write_jsonl off)"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return []
    if not stat.S_ISREG(st.st_mode):
        raise QwenVLError(f"{path} is {_kind(st.st_mode)}, not a file: {fix}")
    try:
        text = read_caption(path, METADATA_READ_LIMIT, fix=fix)
    except FileNotFoundError:
        return []
    except CaptionFileError as exc:
        raise QwenVLError(f"{path}: {exc}") from exc
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QwenVLError(f"{path} line {number} is not JSON ({exc.msg}): fix that line or {fix}") from exc
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise QwenVLError(f"{path} line {number} is not an object with a \"file_name\" string (the Hugging Face "
                              f"imagefolder layout): fix that line or {fix}")
        rows.append(row)
    return rows


def metadata_name(path: Path, folder: Path) -> str:
    """A file's ``file_name`` in metadata.jsonl: its path relative to the folder, with "/"."""
    return path.relative_to(folder).as_posix()


def update_metadata(folder: Path, results: list[CaptionResult]) -> bool:
    """Bring ``folder``'s metadata.jsonl up to date with ``results``; whether it was written.

    The file is read again (someone may have changed it during the run). Each file captioned now (written, or
    captioned without writing a caption file) gets its row's ``text`` set to the caption as written: in place,
    other columns kept, later duplicate rows of it dropped; a file without a row gets a new one at the end, in
    listing order. A file skipped because it has a caption gets a row with that caption only when it has none.
    Rows of every other file stay as they were, in their order. Written whole or not at all (``write_caption``).
    """
    folder = Path(folder)
    rows = read_metadata(folder)
    index: dict[str, int] = {}
    for i, row in enumerate(rows):
        index.setdefault(row["file_name"], i)
    drop: set[int] = set()
    changed = False
    for r in results:
        name = metadata_name(r.path, folder)
        if r.status in ("written", "captioned"):
            if name in index:
                i = index[name]
                if rows[i].get("text") != r.caption:
                    rows[i]["text"] = r.caption
                    changed = True
                if r.data is not None and rows[i].get("json") != r.data:
                    rows[i]["json"] = r.data
                    changed = True
                dupes = {j for j, row in enumerate(rows) if j != i and row["file_name"] == name}
                changed |= bool(dupes - drop)
                drop |= dupes
                continue
        elif not (r.status == "skipped" and r.caption.strip() and name not in index):
            continue
        index[name] = len(rows)
        rows.append({"file_name": name, "text": r.caption, **({"json": r.data} if r.data is not None else {})})
        changed = True
    if not changed:
        return False
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for i, row in enumerate(rows) if i not in drop)
    write_caption(folder / METADATA_NAME, data, overwrite=True)
    return True


# ------------------------------------------------------------------------------------- the run
@dataclass
class _Work:
    """A file to caption: its existing caption's text (empty if none), and how to write its caption."""

    path: Path
    old: str = ""
    replace: bool = False  # replace what is at the caption's name (otherwise: only if nothing appeared there)
    stamp: tuple[int, int, int] | None = None  # (inode, size, mtime) of the caption read; changed: kept as is
    prompt: str = ""


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _existing(f: Path, caption: CaptionOptions, need_text: bool) -> CaptionResult | _Work:
    """What an existing caption (or something at its name) decides for ``f``: a result, or the work to do."""
    ext = caption.extension
    txt = caption_path(f, ext)
    try:
        st = os.lstat(txt)
    except FileNotFoundError:
        return _Work(f, replace=caption.existing == "overwrite")
    except OSError as exc:
        return CaptionResult(f, "", f"error: cannot check {txt.name} ({type(exc).__name__}: {exc.strerror or exc})")
    if stat.S_ISLNK(st.st_mode):
        # Writing through a link could change a file outside the folder; reading it would leak one.
        return CaptionResult(f, "", f"error: its {ext} is a link; not written (make {txt.name} a plain file)")
    if not stat.S_ISREG(st.st_mode):
        return CaptionResult(f, "", f"error: {_not_a_caption(txt, st.st_mode)}")
    if caption.existing == "overwrite" and not need_text:
        return _Work(f, replace=True)
    fix = ("take {caption} out of the prompt to replace it" if caption.existing == "overwrite"
           else "turn overwrite on to replace it")
    try:
        text = read_caption(txt, fix=fix)
    except FileNotFoundError:  # removed since the lstat: caption it like a file that never had one
        return _Work(f, replace=caption.existing == "overwrite")
    except CaptionFileError as exc:
        log.warning("[QwenVL-Fast] %s: %s", f, exc)
        return CaptionResult(f, "", f"error: {exc}")
    if caption.existing == "skip":
        if not text.strip():
            return CaptionResult(f, text, f"skipped: {txt.name} is empty (turn overwrite on to caption it again)")
        return CaptionResult(f, text, "skipped")
    return _Work(f, old=text, replace=True, stamp=(st.st_ino, st.st_size, st.st_mtime_ns))


def caption_folder(
    options: ql.LoadOptions, folder: Path, request: GenerationRequest, *, caption: CaptionOptions | None = None,
    keep_model_loaded: bool = True, on_file: Callable[[int, int], None] | None = None,
    manager: ql.ModelManager | None = None, include_videos: bool = False, write_txt: bool | None = None,
    overwrite: bool | None = None, on_start: Callable[[int, int], None] | None = None,
) -> list[CaptionResult]:
    """Caption every image of ``folder`` with ``request`` (its prompt, preset, sampling; one answer each).

    ``caption``: what is written and where (``CaptionOptions``); ``write_txt=False`` and ``overwrite=True`` are
    the first spellings of ``write_captions=False`` and ``existing="overwrite"`` and still work.

    ``on_file(done, total)`` is called after each chunk (and video); ``on_start(done, total)`` once before any
    model work, ``done`` being the files decided without it (skipped, errors, past the limit).

    ``include_videos``: video files too, each one clip through the model's video path (``request.max_frames``
    frames, evenly sampled), one at a time after the images.

    The prompt may hold ``{name}``, ``{folder}`` and ``{caption}`` (``render_prompt``): images are then grouped
    by their rendered prompt, and each group batched as before (equal prompts still share a batch).

    Goes through ``run_once`` chunk by chunk, so every chunk is timed and gets tips like a node run. An
    interrupt (``request.should_stop``) ends the folder with ``GenerationInterrupted``; the captions
    already written stay, whole (and metadata.jsonl is brought up to date with them).

    One file's trouble is that file's error status and the folder goes on: an odd existing caption (not UTF-8,
    a folder, a FIFO, a device, a link), captions that two files would share, an empty or failed answer (nothing
    written), a caption that cannot be written (its computed text is kept in the result). A metadata.jsonl that
    cannot be read is an error for the whole run, raised before any model work.
    """
    caption = resolve_caption_options(caption, write_txt, overwrite)
    write = caption.write_captions
    ext = caption.extension
    manager = manager or ql.MANAGER
    folder = Path(folder).expanduser()
    files = list_images(folder, include_videos, caption.recursive)
    if caption.write_jsonl:
        try:
            read_metadata(folder)  # a malformed file stops the run here, before any model work
        except QwenVLError as exc:
            raise QwenVLError(f"{exc}; nothing was captioned") from exc
    spec = spec_of(request, need_grammar=options.backend != "server")  # a broken schema: before any file work
    if caption.json_field and spec.output_format != "json":
        raise QwenVLError(f"json_field '{caption.json_field}' needs output_format json (it is "
                          f"{spec.output_format}): set output_format to json, or clear json_field.")
    need_text = "{caption}" in request.prompt
    needs_old = need_text or caption.existing in ("append", "prepend")
    results: list[CaptionResult] = []
    todo: list[_Work] = []
    collisions = caption_collisions(files, ext) if write else {}
    for f in files:
        if f in collisions:
            results.append(CaptionResult(f, "", collisions[f]))
            continue
        if write:
            decided = _existing(f, caption, need_text)
        elif needs_old:  # nothing is written: an existing caption is only read, and one that cannot be is none
            decided = _existing(f, dataclasses.replace(caption, existing="append"), need_text)
            decided = _Work(f, old=decided.old) if isinstance(decided, _Work) else _Work(f)
        else:
            decided = _Work(f)
        if isinstance(decided, _Work):
            todo.append(decided)
        else:
            results.append(decided)
    if caption.limit and len(todo) > caption.limit:
        for w in todo[caption.limit:]:
            results.append(CaptionResult(w.path, w.old, f"skipped: past the limit of {caption.limit} files "
                                                        "for this run"))
        todo = todo[:caption.limit]
    for w in todo:
        w.prompt = render_prompt(request.prompt, w.path, w.old)
    clips = [w for w in todo if is_video_file(w.path)]
    groups: dict[str, list[_Work]] = {}
    for w in todo:
        if not is_video_file(w.path):
            groups.setdefault(w.prompt, []).append(w)
    done = len(results)
    chunk_size = 2 * max(1, options.server_max_in_flight) if options.backend == "server" else CHUNK
    chunks = [g[i:i + chunk_size] for g in groups.values() for i in range(0, len(g), chunk_size)]
    completed = False
    if on_start is not None:
        on_start(done, len(files))  # before any model work: the files decided up front (an estimate's start)
    try:
        for chunk in chunks:
            if request.should_stop is not None and request.should_stop():
                raise ql.GenerationInterrupted("Captioning was interrupted.")
            images, ok = [], []
            for w in chunk:
                try:
                    images.append(load_image_file(w.path))
                    ok.append(w)
                except Exception as exc:  # a broken file must not stop the folder
                    log.warning("[QwenVL-Fast] cannot read %s: %s", w.path, exc)
                    results.append(CaptionResult(w.path, "", f"error: cannot read image ({exc})"))
            if images:
                chunk_request = dataclasses.replace(request, prompt=chunk[0].prompt, images=images,
                                                    batch_mode=BATCH_MODES[1], per_answer_errors=True)
                result = ql.run_once(options, chunk_request, keep_model_loaded=True, manager=manager)
                for i, (w, text) in enumerate(zip(ok, result.texts)):
                    results.append(_finish(w, text, result.error_of(i), caption, spec.output_format))
            done += len(chunk)
            if on_file is not None:
                on_file(done, len(files))
        for w in clips:
            if request.should_stop is not None and request.should_stop():
                raise ql.GenerationInterrupted("Captioning was interrupted.")
            try:
                clip = load_video_file(w.path, request.max_frames)
            except Exception as exc:  # a broken file must not stop the folder
                log.warning("[QwenVL-Fast] cannot read %s: %s", w.path, exc)
                results.append(CaptionResult(w.path, "", f"error: cannot read video ({exc})"))
            else:
                clip_request = dataclasses.replace(request, prompt=w.prompt, images=[], videos=[clip],
                                                   batch_mode=BATCH_MODES[0], per_answer_errors=True)
                result = ql.run_once(options, clip_request, keep_model_loaded=True, manager=manager)
                results.append(_finish(w, result.text, result.error_of(0), caption, spec.output_format))
            done += 1
            if on_file is not None:
                on_file(done, len(files))
        completed = True
    finally:
        if not keep_model_loaded:
            manager.release()
        if caption.write_jsonl:
            if completed:
                update_metadata(folder, results)
            else:  # interrupted or failed: the captions written so far get their rows; the run's error stays
                try:
                    update_metadata(folder, results)
                except Exception as exc:
                    log.warning("[QwenVL-Fast] could not update %s: %s", folder / METADATA_NAME, exc)
    order = {p: i for i, p in enumerate(files)}
    results.sort(key=lambda r: order.get(r.path, 0))
    return results


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
        data = json.loads(answer)
    except json.JSONDecodeError as exc:
        raise QwenVLError(f"the answer is not JSON ({exc.msg}); nothing written") from exc
    if not json_field:
        return answer, data
    if not isinstance(data, dict) or json_field not in data:
        raise QwenVLError(f"the answer has no field '{json_field}' (make it required in json_schema); nothing "
                          "written")
    value = data[json_field]
    return (value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)).strip(), data


def _finish(work: _Work, text: str, error: str | None, caption: CaptionOptions,
            output_format: str = "text") -> CaptionResult:
    """One answer's result: written (or only captioned), or an error status that leaves the disk as it was."""
    path = work.path
    if error:
        log.warning("[QwenVL-Fast] no caption for %s: %s", path, error)
        return CaptionResult(path, "", f"error: the answer failed ({error}); nothing written")
    data = None
    if output_format == "text":
        answer = clean_caption(text)
    else:
        try:
            answer, data = structured_caption(text, output_format, caption.json_field)
        except QwenVLError as exc:
            return CaptionResult(path, "", f"error: {exc}")
    if not answer:
        # A 0-byte caption would look done: later runs would skip the file and a trainer would use no caption.
        log.warning("[QwenVL-Fast] %s: the model gave an empty answer; nothing written", path)
        return CaptionResult(path, "", EMPTY_ANSWER)
    final = compose_caption(answer, work.old, caption)
    if not caption.write_captions:
        return CaptionResult(path, final, "captioned", data)
    ext = caption.extension
    txt = caption_path(path, ext)
    if work.stamp is not None and _stamp(txt) != work.stamp:
        # Someone edited (or replaced) the caption while the model worked: theirs is kept, not joined blindly.
        return CaptionResult(path, final, f"skipped: its {ext} changed while captioning (kept; run again to "
                                          f"{caption.existing} to it)")
    try:
        write_caption(txt, final, overwrite=work.replace)
    except FileExistsError:
        try:
            mode = os.lstat(txt).st_mode
        except OSError:
            mode = stat.S_IFREG
        if stat.S_ISREG(mode):
            return CaptionResult(path, final, f"skipped: its {ext} appeared while captioning (kept)")
        return CaptionResult(path, final, f"error: {txt.name} appeared as {_kind(mode)} while captioning; "
                                          "not written (move it away and run again)")
    except CaptionFileError as exc:
        return CaptionResult(path, final, f"error: {exc}")
    except (OSError, ValueError) as exc:  # ValueError: text the file cannot hold (a lone surrogate from a server)
        reason = getattr(exc, "strerror", None) or str(exc)
        log.warning("[QwenVL-Fast] cannot write %s: %s", txt, exc)
        # The caption is kept in the result: the node's output shows it, so the model's work is not lost.
        return CaptionResult(path, final, f"error: cannot write {txt.name} ({type(exc).__name__}: {reason})")
    return CaptionResult(path, final, "written", data)
