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
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import qwenvl_loader as ql
from .core.api import BATCH_MODES, GenerationRequest
from .core.errors import QwenVLError
from .vision.video import VIDEO_EXTENSIONS, load_video_file

log = logging.getLogger("QwenVL-Fast")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CHUNK = 4  # images encoded together; one answer each (a server gets twice its requests in flight per chunk)


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


def load_image_file(path: Path) -> torch.Tensor:
    """A file as a ComfyUI-style float HWC tensor (RGBA kept, so alpha is composited like the node does)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        arr = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(arr).float() / 255.0


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def write_caption(txt: Path, text: str, *, overwrite: bool) -> None:
    """Write ``txt`` whole or not at all: a cancel or a crash mid-write never leaves half a caption.

    The text goes to a temporary file beside it first; without ``overwrite`` it is linked into place, which
    fails if a caption appeared meanwhile, instead of replacing it.
    """
    tmp = txt.with_name(f".{txt.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if overwrite:
            os.replace(tmp, txt)
        else:
            try:
                os.link(tmp, txt)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: check, then rename
                if txt.exists():
                    raise FileExistsError(txt) from None
                os.replace(tmp, txt)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def caption_folder(
    options: ql.LoadOptions, folder: Path, request: GenerationRequest, *, write_txt: bool = True,
    overwrite: bool = False, keep_model_loaded: bool = True, on_file: Callable[[int, int], None] | None = None,
    manager: ql.ModelManager | None = None, include_videos: bool = False,
) -> list[CaptionResult]:
    """Caption every image of ``folder`` with ``request`` (its prompt, preset, sampling; one answer each).

    ``include_videos``: video files too, each one clip through the model's video path (``request.max_frames``
    frames, evenly sampled), one at a time after the images.

    Goes through ``run_once`` chunk by chunk, so every chunk is timed and gets tips like a node run. An
    interrupt (``request.should_stop``) ends the folder with ``GenerationInterrupted``; the captions
    already written stay, whole.
    """
    manager = manager or ql.MANAGER
    files = list_images(folder, include_videos)
    results: list[CaptionResult] = []
    todo: list[Path] = []
    for f in files:
        if write_txt and f.with_suffix(".txt").is_symlink():
            # Writing through a link could change a file outside the folder; reading it would leak one.
            results.append(CaptionResult(f, "", "error: its .txt is a link; not written (make it a plain file)"))
        elif write_txt and f.with_suffix(".txt").exists() and not overwrite:
            results.append(CaptionResult(f, f.with_suffix(".txt").read_text(encoding="utf-8"), "skipped"))
        else:
            todo.append(f)
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
                chunk_request = dataclasses.replace(request, images=images, batch_mode=BATCH_MODES[1])
                result = ql.run_once(options, chunk_request, keep_model_loaded=True, manager=manager)
                for f, text in zip(ok_files, result.texts):
                    results.append(_finish(f, text, write_txt, overwrite))
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
                clip_request = dataclasses.replace(request, images=[], videos=[clip], batch_mode=BATCH_MODES[0])
                result = ql.run_once(options, clip_request, keep_model_loaded=True, manager=manager)
                results.append(_finish(f, result.text, write_txt, overwrite))
            done += 1
            if on_file is not None:
                on_file(done, len(files))
    finally:
        if not keep_model_loaded:
            manager.release()
    order = {p: i for i, p in enumerate(files)}
    results.sort(key=lambda r: order.get(r.path, 0))
    return results


def _finish(path: Path, text: str, write_txt: bool, overwrite: bool) -> CaptionResult:
    status = "captioned"
    if write_txt:
        try:
            write_caption(path.with_suffix(".txt"), text, overwrite=overwrite)
            status = "written"
        except FileExistsError:
            status = "skipped: its .txt appeared while captioning (kept)"
    return CaptionResult(path, text, status)
