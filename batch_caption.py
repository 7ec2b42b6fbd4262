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
import logging
import os
import stat
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import qwenvl_loader as ql
from .core.api import BATCH_MODES, GenerationRequest
from .core.errors import QwenVLError
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
    """

    prefix: str = ""
    suffix: str = ""
    existing: str = "skip"
    extension: str = ".txt"
    recursive: bool = False
    limit: int = 0
    write_jsonl: bool = False
    write_captions: bool = True

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


def list_images(folder: Path, include_videos: bool = False) -> list[Path]:
    """Image (and video) files directly inside ``folder``; links that lead outside it are ignored."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise QwenVLError(f"'{folder}' is not a folder: give the full path of the folder to caption.")
    root = folder.resolve()
    files = []
    extensions = IMAGE_EXTENSIONS + (VIDEO_EXTENSIONS if include_videos else ())
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in extensions and p.is_file() and p.resolve().parent == root:
            files.append(p)
    return files


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


class CaptionFileError(QwenVLError):
    """An existing caption file, or what sits at a caption's name, that cannot be read or replaced safely."""


def caption_path(path: Path) -> Path:
    """Where the caption of an image (or video) file goes: beside it, same stem, ``.txt``."""
    return path.with_suffix(".txt")


_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a link"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _not_a_caption(txt: Path, mode: int) -> CaptionFileError:
    return CaptionFileError(f"{txt.name} is {_kind(mode)}, not a caption file: move or rename it, and run again")


def read_caption(txt: Path, limit: int = CAPTION_READ_LIMIT) -> str:
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
                               "permissions, or turn overwrite on to replace it") from exc
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
                               "away, or turn overwrite on to replace it")
    data = b"".join(chunks)
    try:
        return data.decode("utf-8-sig")  # -sig: a BOM that Windows editors put first is not part of the caption
    except UnicodeDecodeError as exc:
        raise CaptionFileError(f"{txt.name} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                               "re-save it as UTF-8, or turn overwrite on to replace it") from exc


def _check_writable_name(txt: Path) -> None:
    """Refuse a caption name taken by a link or by something other than a regular file (lstat: links not followed)."""
    try:
        st = os.lstat(txt)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise CaptionFileError(f"its .txt is a link; not written (make {txt.name} a plain file)")
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


def _caption_key(path: Path) -> str:
    # Windows and macOS file systems ignore case, and macOS's also Unicode normalization: two names equal
    # after both are one file there, so they are treated as one everywhere (a caption set is often moved).
    return unicodedata.normalize("NFC", caption_path(path).name).casefold()


def caption_collisions(files: list[Path]) -> dict[Path, str]:
    """The files whose captions would land in one file, each with the error status that says so."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(_caption_key(f), []).append(f)
    statuses = {}
    for group in groups.values():
        if len(group) < 2:
            continue
        names = [f.name for f in group]
        listed = ", ".join(names[:-1]) + " and " + names[-1]
        targets = sorted({caption_path(f).name for f in group})
        shared = targets[0] if len(targets) == 1 else (
            f"{' / '.join(targets)} (one file where names ignore case or accents' encoding, as on Windows and macOS)")
        fix = "rename one" if len(group) == 2 else "rename all but one"
        for f in group:
            statuses[f] = f"error: {listed} would share {shared}: {fix}; nothing written"
    return statuses


def folder_fingerprint(folder: Path, include_videos: bool = False) -> str:
    """A digest of what a Caption Folder run would find: every listed file's name, size, mtime and inode, and the
    same for its caption (lstat: a link or a folder there counts as what it is). Stat calls only, no file is read,
    so it is cheap enough for ComfyUI to ask before every queued run. Raises ``QwenVLError`` for a missing folder.
    """
    digest = hashlib.sha256()
    for f in list_images(folder, include_videos):
        st = f.stat()
        digest.update(os.fsencode(f.name) + f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0".encode())
        try:
            cst = os.lstat(caption_path(f))
            digest.update(f"{stat.S_IFMT(cst.st_mode)}\0{cst.st_size}\0{cst.st_mtime_ns}\0{cst.st_ino}\n".encode())
        except FileNotFoundError:
            digest.update(b"-\n")
    return digest.hexdigest()


def _existing(f: Path, overwrite: bool) -> CaptionResult | None:
    """What an existing caption (or something at its name) decides for ``f``: a result, or None to caption it."""
    txt = caption_path(f)
    try:
        st = os.lstat(txt)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return CaptionResult(f, "", f"error: cannot check {txt.name} ({type(exc).__name__}: {exc.strerror or exc})")
    if stat.S_ISLNK(st.st_mode):
        # Writing through a link could change a file outside the folder; reading it would leak one.
        return CaptionResult(f, "", f"error: its .txt is a link; not written (make {txt.name} a plain file)")
    if not stat.S_ISREG(st.st_mode):
        return CaptionResult(f, "", f"error: {_not_a_caption(txt, st.st_mode)}")
    if overwrite:
        return None
    try:
        text = read_caption(txt)
    except FileNotFoundError:  # removed since the lstat: caption it like a file that never had one
        return None
    except CaptionFileError as exc:
        log.warning("[QwenVL-Fast] %s: %s", f, exc)
        return CaptionResult(f, "", f"error: {exc}")
    if not text.strip():
        return CaptionResult(f, text, f"skipped: {txt.name} is empty (turn overwrite on to caption it again)")
    return CaptionResult(f, text, "skipped")


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


def caption_folder(
    options: ql.LoadOptions, folder: Path, request: GenerationRequest, *, caption: CaptionOptions | None = None,
    keep_model_loaded: bool = True, on_file: Callable[[int, int], None] | None = None,
    manager: ql.ModelManager | None = None, include_videos: bool = False, write_txt: bool | None = None,
    overwrite: bool | None = None,
) -> list[CaptionResult]:
    """Caption every image of ``folder`` with ``request`` (its prompt, preset, sampling; one answer each).

    ``include_videos``: video files too, each one clip through the model's video path (``request.max_frames``
    frames, evenly sampled), one at a time after the images.

    Goes through ``run_once`` chunk by chunk, so every chunk is timed and gets tips like a node run. An
    interrupt (``request.should_stop``) ends the folder with ``GenerationInterrupted``; the captions
    already written stay, whole.

    One file's trouble is that file's error status and the folder goes on: an odd existing caption (not UTF-8,
    a folder, a FIFO, a device, a link), captions that two files would share, an empty or failed answer (nothing
    written), a caption that cannot be written (its computed text is kept in the result).
    """
    caption = resolve_caption_options(caption, write_txt, overwrite)
    write_txt = caption.write_captions
    overwrite = caption.existing == "overwrite"
    manager = manager or ql.MANAGER
    files = list_images(folder, include_videos)
    results: list[CaptionResult] = []
    todo: list[Path] = []
    collisions = caption_collisions(files) if write_txt else {}
    for f in files:
        if f in collisions:
            results.append(CaptionResult(f, "", collisions[f]))
            continue
        decided = _existing(f, overwrite) if write_txt else None
        if decided is None:
            todo.append(f)
        else:
            results.append(decided)
    clips = [f for f in todo if is_video_file(f)]
    todo = [f for f in todo if not is_video_file(f)]
    done = len(results)
    chunk_size = 2 * max(1, options.server_max_in_flight) if options.backend == "server" else CHUNK
    try:
        for start in range(0, len(todo), chunk_size):
            if request.should_stop is not None and request.should_stop():
                raise ql.GenerationInterrupted("Captioning was interrupted.")
            chunk = todo[start:start + chunk_size]
            images, ok_files = [], []
            for f in chunk:
                try:
                    images.append(load_image_file(f))
                    ok_files.append(f)
                except Exception as exc:  # a broken file must not stop the folder
                    log.warning("[QwenVL-Fast] cannot read %s: %s", f, exc)
                    results.append(CaptionResult(f, "", f"error: cannot read image ({exc})"))
            if images:
                chunk_request = dataclasses.replace(request, images=images, batch_mode=BATCH_MODES[1],
                                                    per_answer_errors=True)
                result = ql.run_once(options, chunk_request, keep_model_loaded=True, manager=manager)
                for i, (f, text) in enumerate(zip(ok_files, result.texts)):
                    results.append(_finish(f, text, result.error_of(i), write_txt, overwrite))
            done += len(chunk)
            if on_file is not None:
                on_file(done, len(files))
        for f in clips:
            if request.should_stop is not None and request.should_stop():
                raise ql.GenerationInterrupted("Captioning was interrupted.")
            try:
                clip = load_video_file(f, request.max_frames)
            except Exception as exc:  # a broken file must not stop the folder
                log.warning("[QwenVL-Fast] cannot read %s: %s", f, exc)
                results.append(CaptionResult(f, "", f"error: cannot read video ({exc})"))
            else:
                clip_request = dataclasses.replace(request, images=[], videos=[clip], batch_mode=BATCH_MODES[0],
                                                   per_answer_errors=True)
                result = ql.run_once(options, clip_request, keep_model_loaded=True, manager=manager)
                results.append(_finish(f, result.text, result.error_of(0), write_txt, overwrite))
            done += 1
            if on_file is not None:
                on_file(done, len(files))
    finally:
        if not keep_model_loaded:
            manager.release()
    order = {p: i for i, p in enumerate(files)}
    results.sort(key=lambda r: order.get(r.path, 0))
    return results


def _finish(path: Path, text: str, error: str | None, write_txt: bool, overwrite: bool) -> CaptionResult:
    """One answer's result: written (or only captioned), or an error status that leaves the disk as it was."""
    if error:
        log.warning("[QwenVL-Fast] no caption for %s: %s", path, error)
        return CaptionResult(path, "", f"error: the answer failed ({error}); nothing written")
    if not text.strip():
        # A 0-byte caption would look done: later runs would skip the file and a trainer would use no caption.
        log.warning("[QwenVL-Fast] %s: the model gave an empty answer; nothing written", path)
        return CaptionResult(path, "", EMPTY_ANSWER)
    if not write_txt:
        return CaptionResult(path, text, "captioned")
    txt = caption_path(path)
    try:
        write_caption(txt, text, overwrite=overwrite)
    except FileExistsError:
        try:
            mode = os.lstat(txt).st_mode
        except OSError:
            mode = stat.S_IFREG
        if stat.S_ISREG(mode):
            return CaptionResult(path, text, "skipped: its .txt appeared while captioning (kept)")
        return CaptionResult(path, text, f"error: {txt.name} appeared as {_kind(mode)} while captioning; "
                                         "not written (move it away and run again)")
    except CaptionFileError as exc:
        return CaptionResult(path, text, f"error: {exc}")
    except (OSError, ValueError) as exc:  # ValueError: text the file cannot hold (a lone surrogate from a server)
        reason = getattr(exc, "strerror", None) or str(exc)
        log.warning("[QwenVL-Fast] cannot write %s: %s", txt, exc)
        # The caption is kept in the result: the node's output shows it, so the model's work is not lost.
        return CaptionResult(path, text, f"error: cannot write {txt.name} ({type(exc).__name__}: {reason})")
    return CaptionResult(path, text, "written")
