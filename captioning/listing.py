"""Which files of a folder a Caption Folder run looks at, and where each one's caption goes."""

from __future__ import annotations

import logging
import os
import unicodedata
from pathlib import Path

from ..core.errors import QwenVLError
from ..vision.video import VIDEO_EXTENSIONS

log = logging.getLogger("QwenVL-Fast")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


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


def caption_path(path: Path, extension: str = ".txt") -> Path:
    """Where the caption of an image (or video) file goes: beside it, same stem, ``extension``."""
    return path.with_suffix(extension)



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
