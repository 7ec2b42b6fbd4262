"""What a Caption Folder run shows people: its per-file lines, bounded, and progress with the time left."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

# Lines of Caption Folder's ui text kept (/history and the saved workflow hold them): a folder of 100,000 files
# must not put 100,000 lines into every saved workflow. The outputs keep every file; the summary counts them all.
SHOWN_LINES = 200


def bounded_lines(lines: list[tuple[str, bool]], limit: int = SHOWN_LINES) -> list[str]:
    """At most ``limit`` of (line, is_error): errors first (what the user must act on), then the rest, and a count
    of the others; in the folder's order when all fit."""
    if len(lines) <= limit:
        return [line for line, _ in lines]
    errors = [line for line, bad in lines if bad]
    others = [line for line, bad in lines if not bad]
    kept = (errors + others)[:limit - 1]
    more = len(lines) - len(kept)
    return kept + [f"... and {more} more files (all of them are in the 'files' and 'captions' outputs)"]


def shown_name(file: Path, folder: Path) -> str:
    """A file as the node's text shows it: its name, or its path inside the folder when it is in a subfolder."""
    try:
        return file.relative_to(folder.expanduser()).as_posix()
    except ValueError:
        return file.name


def eta_text(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_with_eta(on_progress, on_text, clock=time.monotonic):
    """Caption Folder's ``on_file``: the progress bar, and "done/total files, about m:ss left" as progress text.

    The estimate is the time per file so far times the files left, counted from ``on_file.start`` (caption_folder's
    ``on_start``: before any model work, with the files decided up front, which cost nothing); before any model
    work has finished there is no estimate yet.
    """
    state: dict[str, Any] = {"start": clock(), "first": 0}

    def start(done: int, total: int) -> None:
        state["start"], state["first"] = clock(), done
        on_progress(done, total)
        on_text(f"{done}/{total} files")

    def on_file(done: int, total: int) -> None:
        on_progress(done, total)
        now = clock()
        worked = done - state["first"]
        elapsed = now - state["start"]
        text = f"{done}/{total} files"
        if worked > 0 and done < total:
            text += f", about {eta_text(elapsed / worked * (total - done))} left"
        elif done >= total:
            text += ", done"
        on_text(text)

    on_file.start = start  # type: ignore[attr-defined]
    return on_file
