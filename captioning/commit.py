"""The one place a caption (or metadata.jsonl) reaches the disk, and the one place an existing caption is read.

A commit is whole or nothing: the text goes to an exclusive temporary file in the same folder, is synced, given the
mode the file it replaces had (a new file: the mode the umask gives, 0644 under 022), and renamed over the name;
links are never followed, and a link or something other than a regular file at the name is refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import threading
from pathlib import Path

from ..core.errors import QwenVLError

# An existing caption is read up to this many bytes: captions are a few hundred bytes, and a huge file named like
# one (a log, a dump) must not be pulled into memory and into the node's output.
CAPTION_READ_LIMIT = 1 << 20
# Platforms without these flags (Windows) have no FIFOs or symlink swaps to guard against in the same way.
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)


class CaptionFileError(QwenVLError):
    """An existing caption file, or what sits at a caption's name, that cannot be read or replaced safely."""


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


def current_umask() -> int:
    """The process's umask, read without changing it where the platform says it (Linux's /proc), else set and put
    back at once under a lock (the only portable way to read it)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def _mode_for(txt: Path) -> int:
    """The permission bits a committed file gets: those of the regular file it replaces, else the umask's."""
    try:
        st = os.lstat(txt)
    except FileNotFoundError:
        return 0o666 & ~current_umask()
    if stat.S_ISREG(st.st_mode):
        return stat.S_IMODE(st.st_mode)
    return 0o666 & ~current_umask()


def write_caption(txt: Path, text: str, *, overwrite: bool) -> None:
    """Commit ``text`` to ``txt`` whole or not at all: a cancel or a crash mid-write never leaves half a caption.

    The text goes first to a new temporary file in the caption's own folder, created exclusively under an
    unpredictable name (``mkstemp``: ``O_CREAT|O_EXCL``, and ``O_NOFOLLOW`` where the platform has it), so a
    link planted at a guessable name cannot redirect the write outside the folder; it gets the mode of the file it
    replaces (a new file: the umask's), is synced, then renamed over ``txt`` (``overwrite``) or hard-linked to it,
    which fails with ``FileExistsError`` if anything appeared there meanwhile instead of replacing it. Neither
    rename nor link follows a link at ``txt``; a link or a non-regular file there is refused with
    ``CaptionFileError`` all the same, so the caption never ends up as one. Text that UTF-8 cannot hold (a lone
    surrogate) raises ``ValueError`` before anything is created.
    """
    data = text.encode("utf-8")  # before touching the disk: text that cannot be encoded leaves nothing behind
    _check_writable_name(txt)
    mode = _mode_for(txt)
    fd, tmp_name = tempfile.mkstemp(dir=txt.parent, prefix=".qwenvl-caption-", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        if not hasattr(os, "fchmod"):
            os.chmod(tmp, mode)
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
