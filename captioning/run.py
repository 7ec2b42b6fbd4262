"""The folder run: decide every file, answer the ones that need it chunk by chunk, commit each complete answer.

Only an answer that ended complete (``GenerationResult.is_complete``) reaches ``commit.write_caption``; a cut,
aborted, filtered, cancelled or failed one is that file's error with the reason, and its old caption stays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import qwenvl_loader as ql
from ..backends.llama_server import is_gguf_name
from ..core.api import BATCH_MODES, CANCELLED, CUT, FAILED, THINKING_OPEN, GenerationRequest, GenerationResult
from ..core.errors import QwenVLError
from ..engine.structured import spec_of
from ..vision.images import load_image_file
from ..vision.video import load_video_file
from . import metadata as md
from .cleanup import clean_caption, compose_caption, render_prompt, structured_caption
from .commit import CaptionFileError, _kind, _not_a_caption, read_caption, write_caption
from .ledger import Ledger, Stamp, image_stamp, text_digest
from .listing import caption_collisions, caption_path, is_video_file, list_images
from .options import EMPTY_ANSWER, CaptionOptions, CaptionResult, resolve_caption_options
from .tag_rules import with_tag_rules

log = logging.getLogger("QwenVL-Fast")

CHUNK = 4  # local backend: images encoded together; one answer each
# A hook run on every cleaned answer before it is composed and committed: (answer, image path) -> the caption's
# body. Raising QwenVLError makes it that file's error (nothing written).
Transform = Callable[[str, Path], str]


class FolderInterrupted(ql.GenerationInterrupted):
    """Cancel / Ctrl-C / SIGTERM: ``results`` holds every file decided so far (the committed ones included);
    ``unfinished`` counts the answers that were in flight and dropped."""

    def __init__(self, message: str, results: list[CaptionResult], unfinished: int) -> None:
        super().__init__(message)
        self.results = results
        self.unfinished = unfinished


@dataclass
class _Work:
    """A file to caption: its existing caption's text (empty if none), and how to write its caption."""

    path: Path
    name: str  # its path inside the folder ("/"), the ledger's and metadata.jsonl's name for it
    stamp: Stamp | None = None  # the image's (size, mtime_ns) when decided
    old: str = ""
    replace: bool = False  # replace what is at the caption's name (otherwise: only if nothing appeared there)
    caption_stamp: tuple[int, int, int] | None = None  # (inode, size, mtime) of the caption read; changed: kept
    prompt: str = ""


def done_settings(caption: CaptionOptions, request: GenerationRequest) -> dict[str, Any]:
    """The settings that define "done" for a file: the same answer would be written the same way. Not the limit,
    max_new_tokens, sampling or the model: raising max_new_tokens after a cut answer retries only what failed."""
    return {"existing": caption.existing, "prompt": request.prompt, "system_prompt": request.system_prompt,
            "extension": caption.extension, "prefix": caption.prefix, "suffix": caption.suffix,
            "output_format": request.output_format, "json_schema": request.json_schema,
            "json_field": caption.json_field, "write_captions": caption.write_captions,
            "write_jsonl": caption.write_jsonl, "exclude_tags": caption.exclude_tags,
            "replace_tags": caption.replace_tags}


def open_ledger(folder: Path, caption: CaptionOptions, request: GenerationRequest) -> Ledger | None:
    """The folder run's ledger; None when it is off or nothing is committed (captions only returned)."""
    if not caption.ledger or not (caption.write_captions or caption.write_jsonl):
        return None
    return Ledger(folder, done_settings(caption, request))


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _existing(work: _Work, caption: CaptionOptions, need_text: bool) -> CaptionResult | _Work:
    """What an existing caption (or something at its name) decides for a file: a result, or the work to do.

    ``existing=skip`` never reads the caption it skips (a size of 0 says it is empty) unless ``need_text``."""
    f, ext = work.path, caption.extension
    txt = caption_path(f, ext)
    try:
        st = os.lstat(txt)
    except FileNotFoundError:
        work.replace = caption.existing == "overwrite"
        return work
    except OSError as exc:
        return CaptionResult(f, "", f"error: cannot check {txt.name} ({type(exc).__name__}: {exc.strerror or exc})")
    if stat.S_ISLNK(st.st_mode):
        # Writing through a link could change a file outside the folder; reading it would leak one.
        return CaptionResult(f, "", f"error: its {ext} is a link; not written (make {txt.name} a plain file)")
    if not stat.S_ISREG(st.st_mode):
        return CaptionResult(f, "", f"error: {_not_a_caption(txt, st.st_mode)}")
    if caption.existing == "skip" and not need_text:
        if st.st_size == 0:
            return CaptionResult(f, "", f"skipped: {txt.name} is empty (turn overwrite on to caption it again)")
        return CaptionResult(f, "", "skipped")
    if caption.existing == "overwrite" and not need_text:
        work.replace = True
        return work
    fix = ("take {caption} out of the prompt to replace it" if caption.existing == "overwrite"
           else "turn overwrite on to replace it")
    try:
        text = read_caption(txt, fix=fix)
    except FileNotFoundError:  # removed since the lstat: caption it like a file that never had one
        work.replace = caption.existing == "overwrite"
        return work
    except CaptionFileError as exc:
        log.warning("[QwenVL-Fast] %s: %s", f, exc)
        return CaptionResult(f, "", f"error: {exc}")
    if caption.existing == "skip":
        if not text.strip():
            return CaptionResult(f, text, f"skipped: {txt.name} is empty (turn overwrite on to caption it again)")
        return CaptionResult(f, text, "skipped")
    work.old, work.replace, work.caption_stamp = text, True, (st.st_ino, st.st_size, st.st_mtime_ns)
    return work


def _settle(ledger: Ledger, work: _Work, caption: CaptionOptions) -> bool:
    """A write begun in a run that crashed before recording its end: done if the caption holds that text."""
    digest = ledger.unsettled(work.name, work.stamp)
    if digest is None or not caption.write_captions:
        return False
    try:
        held = read_caption(caption_path(work.path, caption.extension))
    except (OSError, QwenVLError):
        return False
    if text_digest(held) != digest:
        return False
    ledger.record(work.name, "done", work.stamp, digest)
    return True


@dataclass
class Plan:
    """Every file of the folder decided before any model work."""

    files: list[Path]
    results: list[CaptionResult]  # decided without the model: skipped, errors, past the limit
    todo: list[_Work]
    ledger: Ledger | None


def _decide(f: Path, folder: Path, caption: CaptionOptions, ledger: Ledger | None, need_text: bool,
            needs_row: set[str] | None, read: bool) -> CaptionResult | _Work:
    name = f.relative_to(folder).as_posix()
    work = _Work(f, name, image_stamp(f))
    if caption.write_jsonl:
        try:
            md.metadata_name(f, folder)
        except QwenVLError as exc:
            return CaptionResult(f, "", f"error: {exc}")
    skip_by_file = caption.existing == "skip" and caption.write_captions
    if ledger is not None and not skip_by_file and (ledger.done(name, work.stamp) or (
            read and _settle(ledger, work, caption))):
        return CaptionResult(f, "", "skipped: done in an earlier run with these settings (the ledger; reset it "
                                    "to caption it again)")
    if not caption.write_captions:
        if need_text or caption.existing in ("append", "prepend"):
            decided = _existing(work, dataclasses.replace(caption, existing="append"), True) if read else work
            return work if isinstance(decided, _Work) else _Work(f, name, work.stamp)
        return work
    if not read:
        decided = _existing(work, caption, False) if caption.existing == "skip" else work
        return decided
    row_wanted = needs_row is not None and name in needs_row
    return _existing(work, caption, need_text or row_wanted)


def plan_folder(folder: Path, caption: CaptionOptions, request: GenerationRequest, include_videos: bool = False,
                read: bool = True) -> Plan:
    """Decide every file: skipped (it has a caption in skip mode, or the ledger says done), an error (a caption
    name shared or taken by something odd, a name metadata.jsonl cannot hold), past the limit, or work.
    ``read=False`` (IS_CHANGED): stat calls only, no file is read, no ledger entry written."""
    folder = Path(folder).expanduser()
    files = list_images(folder, include_videos, caption.recursive)
    ledger = open_ledger(folder, caption, request)
    need_text = "{caption}" in request.prompt
    needs_row = None
    if caption.write_jsonl and caption.existing == "skip" and read:
        have = {row["file_name"] for row in md.read_metadata(folder)}
        needs_row = {f.relative_to(folder).as_posix() for f in files} - have
    collisions = caption_collisions(files, caption.extension) if caption.write_captions else {}
    results: list[CaptionResult] = []
    todo: list[_Work] = []
    for f in files:
        if f in collisions:
            results.append(CaptionResult(f, "", collisions[f]))
            continue
        decided = _decide(f, folder, caption, ledger, need_text, needs_row, read)
        (todo if isinstance(decided, _Work) else results).append(decided)
    if caption.limit and len(todo) > caption.limit:
        for w in todo[caption.limit:]:
            results.append(CaptionResult(w.path, w.old, f"skipped: past the limit of {caption.limit} files for "
                                                        "this run (queue again for the next ones)"))
        todo = todo[:caption.limit]
    return Plan(files, results, todo, ledger)


def pending_digest(folder: Path, caption: CaptionOptions, request: GenerationRequest,
                   include_videos: bool = False) -> str:
    """What is left to do in ``folder`` with these settings, as a digest (Caption Folder's IS_CHANGED).

    The files not yet done (each with its image's size and mtime), and, while some are, the ledger's size: a run
    that failed some files changes it, so queueing again retries them; when nothing is left the value settles and
    ComfyUI keeps its cached result. Stat calls only."""
    plan = plan_folder(folder, dataclasses.replace(caption, limit=0), request, include_videos, read=False)
    digest = hashlib.sha256(repr(sorted(done_settings(caption, request).items())).encode("utf-8", "replace"))
    digest.update(os.fsencode(str(Path(folder).expanduser().resolve())))
    for w in plan.todo:
        digest.update(os.fsencode(w.name) + f"\0{w.stamp}\n".encode())
    if plan.todo and plan.ledger is not None:
        digest.update(f"ledger {plan.ledger.size()}".encode())
    if not plan.todo and plan.ledger is not None and plan.ledger.settled:
        return plan.ledger.settled  # what ComfyUI saw before the run that finished the folder: its result is cached
    return digest.hexdigest()


def remember_settled(folder: Path, caption: CaptionOptions, request: GenerationRequest, include_videos: bool,
                     before: str) -> None:
    """After a run: if nothing is left to do, note ``before`` (IS_CHANGED's value when the run was queued) in the
    ledger, so IS_CHANGED gives it again and ComfyUI keeps that run's result instead of running once more."""
    plan = plan_folder(folder, dataclasses.replace(caption, limit=0), request, include_videos, read=False)
    if not plan.todo and plan.ledger is not None and plan.ledger.settled != before:
        plan.ledger.record_settled(before)


# ------------------------------------------------------------------------------------- answers to captions
def ending_error(result: GenerationResult, index: int, max_new_tokens: int) -> str | None:
    """Why answer ``index`` may not become a caption (None: it is complete)."""
    if result.is_complete(index):
        return None
    error = result.error_of(index)
    ending = result.ending_of(index)
    if ending == CUT:
        why = f"cut at max_new_tokens={max_new_tokens}: raise max_new_tokens"
    elif ending == THINKING_OPEN:
        why = f"the reasoning never closed (</think>) within max_new_tokens={max_new_tokens}: raise max_new_tokens"
    elif ending == FAILED:
        why = f"the answer failed ({error})" if error else "the answer failed (the backend said nothing about it)"
    else:
        why = f"the answer ended {ending}" + (f" ({error})" if error else "")
    return why


def _answer_body(text: str, output_format: str, caption: CaptionOptions, path: Path,
                 transform: Transform | None) -> tuple[str, Any]:
    data = None
    if output_format == "text":
        answer = clean_caption(text)
    else:
        answer, data = structured_caption(text, output_format, caption.json_field)
    if answer and transform is not None:
        answer = transform(answer, path).strip()
    return answer, data


def finish(work: _Work, text: str, why_not: str | None, caption: CaptionOptions, output_format: str = "text",
           ledger: Ledger | None = None, transform: Transform | None = None) -> CaptionResult:
    """One answer's result: committed (or only captioned), or an error status that leaves the disk as it was."""
    path = work.path
    if why_not:
        log.warning("[QwenVL-Fast] no caption for %s: %s", path, why_not)
        return _failed(work, ledger, CaptionResult(path, "", f"error: {why_not}; nothing written"))
    try:
        answer, data = _answer_body(text, output_format, caption, path, transform)
    except QwenVLError as exc:
        return _failed(work, ledger, CaptionResult(path, "", f"error: {exc}"))
    if not answer:
        # A 0-byte caption would look done: later runs would skip the file and a trainer would use no caption.
        log.warning("[QwenVL-Fast] %s: the model gave an empty answer; nothing written", path)
        return _failed(work, ledger, CaptionResult(path, "", EMPTY_ANSWER))
    final = compose_caption(answer, work.old, caption)
    if not caption.write_captions:
        return CaptionResult(path, final, "captioned", data)
    result = _commit(work, final, caption, ledger)
    result.data = data if result.status == "written" else None
    return result


def _failed(work: _Work, ledger: Ledger | None, result: CaptionResult) -> CaptionResult:
    if ledger is not None:
        ledger.record(work.name, "failed", work.stamp, reason=result.status.removeprefix("error: "))
    return result


def _commit(work: _Work, final: str, caption: CaptionOptions, ledger: Ledger | None) -> CaptionResult:
    path, ext = work.path, caption.extension
    txt = caption_path(path, ext)
    if work.caption_stamp is not None and _stamp(txt) != work.caption_stamp:
        # Someone edited (or replaced) the caption while the model worked: theirs is kept, not joined blindly.
        return CaptionResult(path, final, f"skipped: its {ext} changed while captioning (kept; run again to "
                                          f"{caption.existing} to it)")
    digest = text_digest(final)
    if ledger is not None:
        ledger.record(work.name, "writing", work.stamp, digest)
    try:
        write_caption(txt, final, overwrite=work.replace)
    except FileExistsError:
        try:
            mode = os.lstat(txt).st_mode
        except OSError:
            mode = stat.S_IFREG
        if stat.S_ISREG(mode):
            return CaptionResult(path, final, f"skipped: its {ext} appeared while captioning (kept)")
        return _failed(work, ledger, CaptionResult(path, final, f"error: {txt.name} appeared as {_kind(mode)} "
                                                                "while captioning; not written (move it away and "
                                                                "run again)"))
    except CaptionFileError as exc:
        return _failed(work, ledger, CaptionResult(path, final, f"error: {exc}"))
    except (OSError, ValueError) as exc:  # ValueError: text the file cannot hold (a lone surrogate from a server)
        reason = getattr(exc, "strerror", None) or str(exc)
        log.warning("[QwenVL-Fast] cannot write %s: %s", txt, exc)
        # The caption is kept in the result: the node's output shows it, so the model's work is not lost.
        return _failed(work, ledger, CaptionResult(path, final, f"error: cannot write {txt.name} "
                                                                f"({type(exc).__name__}: {reason})"))
    if ledger is not None:
        ledger.record(work.name, "done", work.stamp, digest)
    return CaptionResult(path, final, "written")


# ------------------------------------------------------------------------------------- the loop
def videos_supported(options: ql.LoadOptions) -> bool:
    """Video files go through the local transformers backend only (not a server, not llama-server)."""
    return options.backend == "local" and not is_gguf_name(options.model)


def chunk_size(options: ql.LoadOptions) -> int:
    """Images per ``run_once``: twice the requests a server (or every llama-server slot) keeps in flight."""
    if options.backend == "server" or is_gguf_name(options.model):
        return 2 * max(1, int(options.server_max_in_flight))
    return CHUNK


@dataclass
class _Context:
    options: ql.LoadOptions
    request: GenerationRequest
    caption: CaptionOptions
    output_format: str
    ledger: Ledger | None
    manager: ql.ModelManager
    transform: Transform | None
    results: list[CaptionResult]
    stop_after_chunk: Callable[[], bool] | None = None

    def stop_asked(self) -> bool:
        if self.stop_after_chunk is not None and self.stop_after_chunk():
            return True
        return self.request.should_stop is not None and bool(self.request.should_stop())

    def answer(self, works: list[_Work], request: GenerationRequest) -> None:
        """Run ``request`` (one answer per work) and commit every complete answer."""
        try:
            result = ql.run_once(self.options, request, keep_model_loaded=True, manager=self.manager)
        except ql.GenerationInterrupted as exc:
            raise FolderInterrupted(str(exc) or "Captioning was interrupted.", self.results, len(works)) from exc
        cancelled = 0
        for i, w in enumerate(works):
            if result.ending_of(i) == CANCELLED:
                cancelled += 1  # unfinished, as if never asked: no result, no ledger line; the next run asks again
                continue
            text = result.texts[i] if i < len(result.texts) else ""
            why = ending_error(result, i, request.max_new_tokens)
            self.results.append(finish(w, text, why, self.caption, self.output_format, self.ledger,
                                       self.transform))
        if cancelled:
            raise FolderInterrupted("Captioning was interrupted.", self.results, cancelled)

    def images(self, chunk: list[_Work]) -> None:
        images, ok = [], []
        for w in chunk:
            try:
                images.append(load_image_file(w.path))
                ok.append(w)
            except Exception as exc:  # a broken file must not stop the folder
                log.warning("[QwenVL-Fast] cannot read %s: %s", w.path, exc)
                self.results.append(_failed(w, self.ledger, CaptionResult(w.path, "", f"error: cannot read "
                                                                                      f"image ({exc})")))
        if images:
            # Each answer its own prompt, all in one request: the server keeps server_max_in_flight requests
            # going and the local engine batches the answers whatever their prompts.
            prompts = [w.prompt for w in ok] if len({w.prompt for w in ok}) > 1 else []
            self.answer(ok, dataclasses.replace(self.request, prompt=ok[0].prompt, prompts=prompts, images=images,
                                                batch_mode=BATCH_MODES[1], per_answer_errors=True))

    def clip(self, w: _Work) -> None:
        try:
            clip = load_video_file(w.path, self.request.max_frames)
        except Exception as exc:  # a broken file must not stop the folder
            log.warning("[QwenVL-Fast] cannot read %s: %s", w.path, exc)
            self.results.append(_failed(w, self.ledger, CaptionResult(w.path, "", f"error: cannot read video "
                                                                                  f"({exc})")))
            return
        self.answer([w], dataclasses.replace(self.request, prompt=w.prompt, images=[], videos=[clip],
                                             batch_mode=BATCH_MODES[0], per_answer_errors=True))


def _video_errors(todo: list[_Work], options: ql.LoadOptions) -> tuple[list[_Work], list[CaptionResult]]:
    """Videos on a backend that cannot take them: each that file's error, said once in the log; pictures go on."""
    videos = [w for w in todo if is_video_file(w.path)]
    if not videos or videos_supported(options):
        return todo, []
    where = "llama-server (GGUF)" if is_gguf_name(options.model) else "a server"
    why = f"videos run on the local backend only, not on {where}: caption them with backend local; nothing written"
    log.warning("[QwenVL-Fast] %d video file(s) left out: %s", len(videos), why)
    return [w for w in todo if not is_video_file(w.path)], [CaptionResult(w.path, "", f"error: {why}")
                                                            for w in videos]


def caption_folder(
    options: ql.LoadOptions, folder: Path, request: GenerationRequest, *, caption: CaptionOptions | None = None,
    keep_model_loaded: bool = True, on_file: Callable[[int, int], None] | None = None,
    manager: ql.ModelManager | None = None, include_videos: bool = False, write_txt: bool | None = None,
    overwrite: bool | None = None, on_start: Callable[[int, int], None] | None = None,
    transform: Transform | None = None, stop_after_chunk: Callable[[], bool] | None = None,
) -> list[CaptionResult]:
    """Caption the images of ``folder`` not yet done with these settings (``plan_folder``), one answer each.

    ``caption``: what is written and where (``CaptionOptions``; ``write_txt=False`` / ``overwrite=True`` are its
    first spellings). ``on_start(done, total)`` once before any model work, ``on_file(done, total)`` after each
    chunk and video. ``include_videos``: video files too, one clip each (local backend only: elsewhere each is
    that file's error). ``transform(answer, path)``: applied to every cleaned answer before it is composed and
    committed (raise QwenVLError for that file's error). ``stop_after_chunk()`` true: stop after the answers in
    flight, each committed as it would be (``request.should_stop`` drops them at once).
    The prompt's ``{name}``, ``{folder}``, ``{caption}`` are
    filled per file (``render_prompt``); equal rendered prompts share a batch.

    Only complete answers are committed, each right after its chunk; the ledger records every commit and failure.
    Stopping (``request.should_stop``, or an answer ended ``cancelled``) raises ``FolderInterrupted`` after
    committing what completed; metadata.jsonl gets the rows of every caption committed. One file's trouble is that
    file's error and the folder goes on. A metadata.jsonl that is not a readable file stops the run before any
    model work.
    """
    caption = resolve_caption_options(caption, write_txt, overwrite)
    manager = manager or ql.MANAGER
    folder = Path(folder).expanduser()
    if caption.write_jsonl:
        try:
            md.load_metadata(folder)  # a metadata.jsonl that is not a readable file: before any model work
        except QwenVLError as exc:
            raise QwenVLError(f"{exc}; nothing was captioned") from exc
    spec = spec_of(request, need_grammar=options.backend != "server")  # a broken schema: before any file work
    if caption.json_field and spec.output_format != "json":
        raise QwenVLError(f"json_field '{caption.json_field}' needs output_format json (it is "
                          f"{spec.output_format}): set output_format to json, or clear json_field.")
    transform = with_tag_rules(caption.tag_rules(), spec.output_format, caption.json_field, transform)
    plan = plan_folder(folder, caption, request, include_videos)
    todo, video_errors = _video_errors(plan.todo, options)
    ctx = _Context(options, request, caption, spec.output_format, plan.ledger, manager, transform,
                   plan.results + video_errors, stop_after_chunk)
    for w in todo:
        w.prompt = render_prompt(request.prompt, w.path, w.old)
    try:
        _run(ctx, todo, len(plan.files), on_start, on_file)
    except BaseException:
        _close(ctx, folder, keep_model_loaded, completed=False)
        raise
    _close(ctx, folder, keep_model_loaded, completed=True)
    return _sorted(ctx.results, plan.files)


def _sorted(results: list[CaptionResult], files: list[Path]) -> list[CaptionResult]:
    order = {p: i for i, p in enumerate(files)}
    return sorted(results, key=lambda r: order.get(r.path, 0))


def _run(ctx: _Context, todo: list[_Work], total: int, on_start: Callable[[int, int], None] | None,
         on_file: Callable[[int, int], None] | None) -> None:
    groups: dict[str, list[_Work]] = {}
    for w in todo:
        if not is_video_file(w.path):
            groups.setdefault(w.prompt, []).append(w)
    pictures = [w for g in groups.values() for w in g]  # equal prompts next to each other, chunks full across them
    size = chunk_size(ctx.options)
    chunks: list[list[_Work]] = [pictures[i:i + size] for i in range(0, len(pictures), size)]
    chunks += [[w] for w in todo if is_video_file(w.path)]
    done = len(ctx.results)
    if on_start is not None:
        on_start(done, total)  # before any model work: the files decided up front (an estimate's start)
    for chunk in chunks:
        if ctx.stop_asked():
            raise FolderInterrupted("Captioning was interrupted.", ctx.results, 0)
        if is_video_file(chunk[0].path):
            ctx.clip(chunk[0])
        else:
            ctx.images(chunk)
        done += len(chunk)
        if on_file is not None:
            on_file(done, total)


def _close(ctx: _Context, folder: Path, keep_model_loaded: bool, completed: bool) -> None:
    """After the loop, also when stopped: release the model if asked, and give metadata.jsonl the rows of every
    caption committed (a failure to is the run's error when it completed, a log line when it was stopped)."""
    if not keep_model_loaded:
        ctx.manager.release()
    if not ctx.caption.write_jsonl:
        return
    try:
        md.update_metadata(folder, ctx.results)
    except Exception as exc:
        if completed:
            raise
        log.warning("[QwenVL-Fast] could not update %s: %s", folder / md.METADATA_NAME, exc)
        return
    if ctx.ledger is not None and not ctx.caption.write_captions:
        for r in ctx.results:  # captions only in metadata.jsonl: committed now
            if r.status == "captioned":
                ctx.ledger.record(r.path.relative_to(folder).as_posix(), "done", image_stamp(r.path))
