"""The ledger of a folder run: which files are done with these settings, so a queue never does one twice.

One small append-only journal per (resolved folder, settings that define "done"), JSON lines through
``core.strict_json``, each line written with one ``write`` and fsynced. Where it lives: ``$QWENVL_FAST_LEDGER_DIR``
if set; inside ComfyUI ``<ComfyUI user folder>/qwenvl_fast/ledgers`` (set by ``comfyui_host.glue``); else the
platform's user data folder (``platformdirs.user_data_dir("qwenvl_fast")/ledgers``: ``~/.local/share`` on Linux).

Lines, after a header naming the folder and the settings:
``{"f": <path in the folder>, "e": "writing" | "done" | "failed", "s": [size, mtime_ns], "h": sha256, "r": why}``.
``writing`` comes before a commit with the digest of the text about to be written and ``done`` after it, so a
crash between the two is settled by looking at the file: holding that text, it is done. A torn last line (a crash
mid-write) is ignored. A file is done for a given image (its size and mtime): a replaced image is work again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import strict_json

log = logging.getLogger("QwenVL-Fast")

LEDGER_DIR_ENV = "QWENVL_FAST_LEDGER_DIR"
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_host_root: Path | None = None

Stamp = tuple[int, int]  # the image's (size, mtime_ns)


def set_host_root(root: str | os.PathLike | None) -> None:
    """The host's folder for the pack's state (ComfyUI's user folder): ledgers go to ``<root>/qwenvl_fast/ledgers``."""
    global _host_root
    _host_root = Path(root) / "qwenvl_fast" / "ledgers" if root else None


def ledger_dir() -> Path:
    """Where ledgers live now (see the module's docstring)."""
    configured = os.environ.get(LEDGER_DIR_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    if _host_root is not None:
        return _host_root
    try:
        import platformdirs

        return Path(platformdirs.user_data_dir("qwenvl_fast", appauthor=False)) / "ledgers"
    except ImportError:  # pragma: no cover - a requirement; a bare install still works
        return Path.home() / ".local" / "share" / "qwenvl_fast" / "ledgers"


def image_stamp(path: Path) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _name_key(name: str) -> str:
    # A name that is not UTF-8 arrives with lone surrogates; strict_json escapes them and reads them back the same.
    return name


@dataclass
class _Entry:
    event: str
    stamp: Stamp | None
    digest: str | None = None
    reason: str = ""


class Ledger:
    """One folder run's journal. ``done(name, stamp)``; ``record(...)`` appends; ``reset()`` forgets everything."""

    def __init__(self, folder: Path, settings: dict[str, Any], root: Path | None = None) -> None:
        self.folder = Path(os.path.realpath(folder))
        self.settings = settings
        identity = strict_json.dumps({"folder": os.fsdecode(os.fsencode(self.folder)), "settings": settings},
                                     ascii_only=True)
        self.key = hashlib.sha256(identity.encode("ascii")).hexdigest()[:32]
        self.root = Path(root) if root is not None else ledger_dir()
        self.path = self.root / f"{self.key}.jsonl"
        self._header = identity
        self.entries: dict[str, _Entry] = {}
        self.settled: str | None = None  # IS_CHANGED's value for the run that left nothing to do
        self.load()

    # ---------------------------------------------------------------- reading
    def load(self) -> None:
        """Read the journal; lines that are not whole entries (a torn last line) are ignored."""
        self.entries = {}
        self.settled = None
        try:
            with open(self.path, "rb") as journal:
                data = journal.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("[QwenVL-Fast] cannot read the caption ledger %s (%s): every file counts as not done",
                        self.path, exc)
            return
        for raw in data.split(b"\n"):
            try:
                entry = strict_json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, strict_json.StrictJSONError):
                continue
            if isinstance(entry, dict) and isinstance(entry.get("settled"), str):
                self.settled = entry["settled"]
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("f"), str) or entry.get("e") not in (
                    "writing", "done", "failed"):
                continue
            stamp = entry.get("s")
            stamp = tuple(stamp) if isinstance(stamp, list) and len(stamp) == 2 else None
            self.entries[entry["f"]] = _Entry(entry["e"], stamp, entry.get("h"), str(entry.get("r", "")))
            self.settled = None

    def size(self) -> int:
        """The journal's size in bytes: it grows with every attempt (what IS_CHANGED follows)."""
        try:
            return os.stat(self.path).st_size
        except OSError:
            return 0

    def done(self, name: str, stamp: Stamp | None) -> bool:
        entry = self.entries.get(_name_key(name))
        return entry is not None and entry.event == "done" and (stamp is None or entry.stamp == stamp)

    def unsettled(self, name: str, stamp: Stamp | None) -> str | None:
        """The digest of a write begun for this image whose end was not recorded (a crash between the two)."""
        entry = self.entries.get(_name_key(name))
        if entry is not None and entry.event == "writing" and entry.stamp == stamp:
            return entry.digest
        return None

    def failed(self) -> dict[str, str]:
        return {name: e.reason for name, e in self.entries.items() if e.event == "failed"}

    # ---------------------------------------------------------------- writing
    def record(self, name: str, event: str, stamp: Stamp | None, digest: str | None = None,
               reason: str = "") -> None:
        """Append one entry and fsync it. A ledger that cannot be written is said in the log; the caption stays."""
        entry: dict[str, Any] = {"f": _name_key(name), "e": event, "s": list(stamp) if stamp else None}
        if digest:
            entry["h"] = digest
        if reason:
            entry["r"] = reason[:300]
        try:
            self._append(strict_json.dumps(entry) + "\n")
        except OSError as exc:
            log.warning("[QwenVL-Fast] cannot write the caption ledger %s (%s): %s may be done again next run",
                        self.path, exc, name)
            return
        self.entries[entry["f"]] = _Entry(event, stamp, digest, reason)
        self.settled = None  # any attempt unsettles the folder

    def record_settled(self, value: str) -> None:
        try:
            self._append(strict_json.dumps({"settled": value}) + "\n")
        except OSError as exc:
            log.warning("[QwenVL-Fast] cannot write the caption ledger %s (%s)", self.path, exc)
            return
        self.settled = value

    def _append(self, line: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            prefix = ""
            if size == 0:
                prefix = self._header + "\n"
            elif not self._ends_with_newline(size):
                prefix = "\n"  # a torn last line: the new entry starts on its own line
            data = (prefix + line).encode("utf-8")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ends_with_newline(self, size: int) -> bool:
        with contextlib.suppress(OSError), open(self.path, "rb") as journal:
            journal.seek(size - 1)
            return journal.read(1) == b"\n"
        return True

    def reset(self) -> bool:
        """Forget every file of this folder and settings; whether there was a ledger."""
        self.entries = {}
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True


def reset_folder_ledgers(folder: Path, root: Path | None = None) -> int:
    """Forget every ledger of ``folder`` (whatever its settings); how many there were."""
    root = Path(root) if root is not None else ledger_dir()
    wanted = os.fsdecode(os.fsencode(os.path.realpath(folder)))
    forgotten = 0
    for path in sorted(root.glob("*.jsonl")) if root.is_dir() else []:
        try:
            with open(path, "rb") as journal:
                header = strict_json.loads(journal.readline().decode("utf-8"))
        except (OSError, UnicodeDecodeError, strict_json.StrictJSONError):
            continue
        if isinstance(header, dict) and header.get("folder") == wanted:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                forgotten += 1
    return forgotten
