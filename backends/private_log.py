"""llama-server's log: a private per-user folder, files opened without following links.

The default folder sits in the shared temp folder, where another local user could create it first or plant a
link named like the next log (the log would then be appended to a file of their choosing). So: the folder is
created 0700 and its owner checked before use; a default folder that someone else made is never used (a fresh
``mkdtemp`` folder instead); a folder the owner configured (``$QWENVL_FAST_LLAMA_LOG_DIR``) that is not theirs,
or writable by others, is an error naming that variable; every log file is opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path
from typing import Any

from ..core.errors import QwenVLError

log = logging.getLogger("QwenVL-Fast")

LOG_DIR_ENV = "QWENVL_FAST_LLAMA_LOG_DIR"


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # Windows has no symlink races of this kind in a per-user %TEMP%
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _log_dir_error(folder: Path, why: str) -> QwenVLError:
    return QwenVLError(f"llama-server's log folder '{folder}' {why}. Set ${LOG_DIR_ENV} to a folder of your own "
                       "that only you can write (it is created with mode 0700 if missing).")


def _private_problem(folder: Path, strict: bool) -> str | None:
    """Why ``folder`` is not private to this user (None when it is). ``strict`` (the default folder under the
    shared temp folder) also refuses a link and any access for others; a folder the owner configured may be
    group-readable, never writable by others."""
    try:
        info = os.lstat(folder) if strict else os.stat(folder)
    except OSError as exc:
        return f"cannot be read ({type(exc).__name__}: {exc.strerror or exc})"
    if not stat.S_ISDIR(info.st_mode):
        return "is a link or not a folder" if strict else "is not a folder"
    if os.name != "posix":
        return None
    if info.st_uid != os.getuid():
        return f"belongs to another user (uid {info.st_uid}, you are {os.getuid()})"
    if info.st_mode & (0o077 if strict else 0o022):
        return f"can be {'used' if strict else 'written'} by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _make_private(folder: Path) -> None:
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise _log_dir_error(folder, f"cannot be created ({type(exc).__name__}: {exc.strerror or exc})") from None


def private_log_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """The folder for llama-server's logs: ``configured`` (else ``$QWENVL_FAST_LLAMA_LOG_DIR``), created 0700,
    owned by this user and not writable by others; else ``<tmp>/qwenvl-fast-llama-<uid>`` (0700, not a link).

    A default folder that another user created first (to read or redirect the logs) is never used: a fresh
    private folder is made instead (``mkdtemp``), with a warning. A configured folder that is not private is an
    error naming the variable."""
    import tempfile

    chosen = configured if configured is not None else os.environ.get(LOG_DIR_ENV, "").strip()
    if chosen:
        folder = Path(chosen).expanduser()
        _make_private(folder)
        problem = _private_problem(folder, strict=False)
        if problem:
            raise _log_dir_error(folder, problem)
        return folder
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    folder = Path(tempfile.gettempdir()) / f"qwenvl-fast-llama-{uid}"
    with contextlib.suppress(FileExistsError, OSError):
        folder.mkdir(mode=0o700)
    problem = _private_problem(folder, strict=True)
    if problem is None:
        return folder
    fresh = Path(tempfile.mkdtemp(prefix=f"qwenvl-fast-llama-{uid}-"))
    log.warning("[QwenVL-Fast] llama-server's usual log folder %s %s: using %s instead (set $%s to choose one)",
                folder, problem, fresh, LOG_DIR_ENV)
    return fresh


def open_log(path: Path, append: bool = True) -> Any:
    """``path`` opened for appending (or reading) without following a link, as a binary file object."""
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT if append else os.O_RDONLY) | _NOFOLLOW | _CLOEXEC
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0), 0o600)
    except OSError as exc:
        raise _log_dir_error(path.parent, f"does not let the log '{path.name}' be opened without following a link "
                             f"({type(exc).__name__}: {exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _log_dir_error(path.parent, f"holds '{path.name}', which is not a regular file")
    return os.fdopen(fd, "ab" if append else "rb")
