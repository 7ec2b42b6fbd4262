"""Caption Folder at its edges (issue 18): no caption lost or overwritten by a bad answer, nothing written outside
the folder, one odd file never stops the folder.

Everything is real: files, links, FIFOs, sockets and devices on disk; answers come either from the tiny local
model through the real node, or, where a test must choose them (empty answers, failed answers, exact texts), from
a scripted OpenAI-compatible server on loopback (``scripted_server.py``) that answers by each image's colour,
through the pack's real server backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import stat
import subprocess
import threading
import unicodedata
from pathlib import Path

import pytest
from scripted_server import Reply, ScriptedServer, first_pixel

from conftest import TINY_FAMILIES
from qwenvl_fast import captioning as bc
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.backends import openai_server as sb
from qwenvl_fast.vision.images import load_image_file

FAMILY = "tiny-qwen2.5-vl" if "tiny-qwen2.5-vl" in TINY_FAMILIES else TINY_FAMILIES[0]

# Answers by the colour of an image's first pixel (solid PNGs: resizing and upload keep the colour exactly).
RED, GREEN, BLUE, PURPLE = (200, 0, 0), (0, 200, 0), (0, 0, 200), (120, 0, 120)
ANSWERS: dict[tuple[int, int, int], object] = {
    RED: "",  # empty answer
    GREEN: " \n\t ",  # whitespace only: empty too
    PURPLE: ("error", "the answer was cut off"),  # an in-band error event mid-answer
}


def caption_of(rgb: tuple[int, int, int]) -> str:
    answer = ANSWERS.get(rgb)
    return answer if isinstance(answer, str) else f"A caption for {bytes(rgb).hex()}."


def _reply(server: ScriptedServer, body: dict) -> Reply:
    rgb = first_pixel(body)
    server.seen.append(rgb)
    answer = ANSWERS.get(rgb, caption_of(rgb))
    if isinstance(answer, tuple):  # half an answer, then an in-band error event
        return Reply(["half an "], error=answer[1])
    return Reply([word + " " for word in answer.split(" ")] if answer else [])


# The echo server streams one word and a space per event; the pack strips the answer's ends.
def streamed(rgb: tuple[int, int, int]) -> str:
    return caption_of(rgb).strip()


@pytest.fixture(scope="module")
def echo():
    server = ScriptedServer(_reply)
    server.seen = []
    yield server.start()
    server.stop()


def served(echo) -> ql.LoadOptions:
    # One request in flight: chunks of two images, so "after the first chunk" is a known point.
    return ql.LoadOptions(model="(served)", backend="server", server_url=echo.url, server_max_in_flight=1,
                          server_retries=0)


def request(**extra) -> ql.GenerationRequest:
    return ql.GenerationRequest(prompt="Caption.", image_quality="fast", max_new_tokens=16, monitor=False, **extra)


def solid(folder: Path, name: str, rgb: tuple[int, int, int], fmt: str | None = None) -> Path:
    from PIL import Image

    path = folder / name
    Image.new("RGB", (40, 30), rgb).save(path, format=fmt)
    return path


def statuses(results) -> dict[str, str]:
    return {r.path.name: r.status for r in results}


def captions(results) -> dict[str, str]:
    return {r.path.name: r.caption for r in results}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): kind, and content or link target."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[str(p.relative_to(root))] = ("link", os.readlink(p))
        elif stat.S_ISREG(st.st_mode):
            out[str(p.relative_to(root))] = ("file", p.read_bytes(), st.st_ino)
        else:
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode),)
    return out


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def dirs(tmp_path):
    folder, outside = tmp_path / "pics", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (outside / "victim.txt").write_text("keep me", encoding="utf-8")
    return folder, outside


# ------------------------------------------------------------------------------------- 1. temp files and links
def test_planted_link_at_a_guessable_temp_name_changes_nothing_outside(echo, dirs):
    folder, outside = dirs
    solid(folder, "photo.png", BLUE)
    victim = outside / "victim.txt"
    # The names the old code used (and plausible variants): each a link to a file outside the folder.
    planted = [folder / f".photo.txt.{os.getpid()}.tmp", folder / ".photo.txt.tmp", folder / ".photo.tmp"]
    for link in planted:
        link.symlink_to(victim)
    before_outside = snapshot(outside)
    for overwrite in (False, True):
        results = bc.caption_folder(served(echo), folder, request(), overwrite=overwrite)
        assert statuses(results) == {"photo.png": "written"}
        assert stat.S_ISREG((folder / "photo.txt").lstat().st_mode)
        assert (folder / "photo.txt").read_text(encoding="utf-8") == streamed(BLUE)
        assert snapshot(outside) == before_outside
        assert all(link.is_symlink() and os.readlink(link) == str(victim) for link in planted)
        (folder / "photo.txt").unlink()
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == sorted(p.name for p in planted)


def test_a_caption_that_is_a_link_or_a_hard_link_is_never_written_through(echo, dirs):
    folder, outside = dirs
    victim = outside / "victim.txt"
    solid(folder, "soft.png", BLUE)
    solid(folder, "hard.png", BLUE)
    (folder / "soft.txt").symlink_to(victim)
    os.link(victim, folder / "hard.txt")  # same inode as the file outside
    before_outside = snapshot(outside)
    results = bc.caption_folder(served(echo), folder, request(), overwrite=True)
    assert statuses(results) == {
        "hard.png": "written", "soft.png": "error: its .txt is a link; not written (make soft.txt a plain file)"}
    assert snapshot(outside) == before_outside and victim.stat().st_nlink == 1  # replaced, not written into
    assert (folder / "hard.txt").read_text(encoding="utf-8") == streamed(BLUE)
    assert os.readlink(folder / "soft.txt") == str(victim)
    assert no_temp_files(folder)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_link_or_folder_appearing_at_the_caption_name_mid_run_is_refused(echo, dirs, overwrite):
    folder, outside = dirs
    victim = outside / "victim.txt"
    for name in ("a.png", "b.png", "c.png", "d.png"):
        solid(folder, name, BLUE)
    before_outside = snapshot(outside)

    def after_chunk(done: int, total: int) -> None:
        if done == 2:  # after the first chunk, before c and d are written
            (folder / "c.txt").symlink_to(victim)
            (folder / "d.txt").mkdir()

    results = bc.caption_folder(served(echo), folder, request(), overwrite=overwrite, on_file=after_chunk)
    # Checked with lstat just before the rename or link (neither follows a link, and the link refuses any name
    # that exists: what appears after the check is refused too).
    assert statuses(results) == {
        "a.png": "written", "b.png": "written",
        "c.png": "error: its .txt is a link; not written (make c.txt a plain file)",
        "d.png": "error: d.txt is a folder, not a caption file: move or rename it, and run again"}
    assert captions(results)["c.png"] == captions(results)["d.png"] == streamed(BLUE)  # the work is kept
    assert snapshot(outside) == before_outside
    assert os.readlink(folder / "c.txt") == str(victim) and list((folder / "d.txt").iterdir()) == []
    assert no_temp_files(folder)


# ------------------------------------------------------------------------------------- 2. odd existing captions
def test_odd_existing_captions_are_each_an_error_and_the_folder_goes_on(echo, dirs):
    folder, outside = dirs
    names = ["big", "bom", "cp", "dev", "dir", "empty", "fifo", "ok", "sock"]
    for name in names:
        solid(folder, f"{name}.png", BLUE)
    (folder / "cp.txt").write_bytes("café au lait".encode("cp1252"))
    (folder / "dir.txt").mkdir()
    os.mkfifo(folder / "fifo.txt")
    (folder / "big.txt").write_bytes(b"a" * (bc.CAPTION_READ_LIMIT + 1))
    (folder / "bom.txt").write_bytes("\ufeffa caption from Notepad".encode())
    (folder / "empty.txt").write_bytes(b"")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(folder / "sock.txt"))
    try:
        os.mknod(folder / "dev.txt", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
        has_device = True
    except (PermissionError, AttributeError):  # not root, or no mknod
        has_device = False
        (folder / "dev.png").unlink()

    # A regression would block forever opening the FIFO; this lets that open return so the test fails instead.
    finished = threading.Event()

    def unblock():
        if not finished.wait(300):
            with contextlib.suppress(OSError):
                os.close(os.open(folder / "fifo.txt", os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    try:
        results = bc.caption_folder(served(echo), folder, request(), overwrite=False)
    finally:
        finished.set()
    expected = {
        # skip never reads the caption it skips: a huge or non-UTF-8 one is skipped like any other
        "big.png": "skipped",
        "bom.png": "skipped",
        "cp.png": "skipped",
        "dev.png": "error: dev.txt is a character device, not a caption file: move or rename it, and run again",
        "dir.png": "error: dir.txt is a folder, not a caption file: move or rename it, and run again",
        "empty.png": "skipped: empty.txt is empty (turn overwrite on to caption it again)",
        "fifo.png": "error: fifo.txt is a FIFO (named pipe), not a caption file: move or rename it, and run again",
        "ok.png": "written",
        "sock.png": "error: sock.txt is a socket, not a caption file: move or rename it, and run again",
    }
    if not has_device:
        del expected["dev.png"]
    assert statuses(results) == expected
    assert captions(results)["bom.png"] == ""  # not read
    append = bc.caption_folder(served(echo), folder, request(), caption=bc.CaptionOptions(existing="append",
                                                                                          write_captions=False))
    assert captions(append)["bom.png"].startswith("a caption from Notepad, ")  # the BOM is not part of the caption
    assert statuses(append)["cp.png"] == "captioned"  # captions only returned: one that cannot be read is none
    assert (folder / "ok.txt").read_text(encoding="utf-8") == streamed(BLUE)
    assert (folder / "cp.txt").read_bytes() == "café au lait".encode("cp1252")  # left as it was

    # overwrite: files are replaced whatever their text; things that are not files still are not touched
    results = bc.caption_folder(served(echo), folder, request(), overwrite=True)
    got = statuses(results)
    for name in ("big", "bom", "cp", "empty", "ok"):
        assert got[f"{name}.png"] == "written"
        assert (folder / f"{name}.txt").read_text(encoding="utf-8") == streamed(BLUE)
    for name in ("dev", "dir", "fifo", "sock"):
        if f"{name}.png" in expected:
            assert got[f"{name}.png"] == expected[f"{name}.png"]
    assert stat.S_ISFIFO((folder / "fifo.txt").lstat().st_mode) and stat.S_ISSOCK((folder / "sock.txt").lstat().st_mode)
    sock.close()
    assert no_temp_files(folder)


def test_read_caption_refuses_what_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(bc.CaptionFileError, match=r"pipe.txt is a FIFO \(named pipe\), not a caption file"):
        bc.read_caption(tmp_path / "pipe.txt")
    (tmp_path / "link.txt").symlink_to(tmp_path / "pipe.txt")
    with pytest.raises(bc.CaptionFileError, match="link.txt is a link"):
        bc.read_caption(tmp_path / "link.txt")
    (tmp_path / "small.txt").write_bytes(b"0123456789")
    assert bc.read_caption(tmp_path / "small.txt", limit=10) == "0123456789"
    with pytest.raises(bc.CaptionFileError, match="too large for a caption"):
        bc.read_caption(tmp_path / "small.txt", limit=9)
    with pytest.raises(FileNotFoundError):
        bc.read_caption(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------- 3. shared captions
def test_files_that_would_share_a_caption_each_get_an_error_and_nothing_is_written(echo, dirs):
    folder, _ = dirs
    solid(folder, "photo.png", BLUE)
    solid(folder, "photo.bmp", BLUE)
    (folder / "photo.txt").write_text("old", encoding="utf-8")  # an existing shared caption is left alone too
    solid(folder, "Shot.png", BLUE)
    solid(folder, "shot.webp", BLUE, fmt="WEBP")
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    solid(folder, f"{nfc}.png", BLUE)
    solid(folder, f"{nfd}.tif", BLUE, fmt="TIFF")
    for ext in ("png", "bmp", "tiff"):
        solid(folder, f"three.{ext}", BLUE)
    solid(folder, "alone.png", BLUE)
    before = snapshot(folder)

    results = bc.caption_folder(served(echo), folder, request(), overwrite=True)
    got = statuses(results)
    ignore = "(one file where names ignore case or accents' encoding, as on Windows and macOS)"
    assert got.pop("alone.png") == "written"
    assert got == {
        "photo.bmp": "error: photo.bmp and photo.png would share photo.txt: rename one; nothing written",
        "photo.png": "error: photo.bmp and photo.png would share photo.txt: rename one; nothing written",
        "Shot.png": f"error: Shot.png and shot.webp would share Shot.txt / shot.txt {ignore}: rename one; nothing "
                    "written",
        "shot.webp": f"error: Shot.png and shot.webp would share Shot.txt / shot.txt {ignore}: rename one; nothing "
                     "written",
        # sorted by code point: the decomposed name (plain e, then the accent) comes first
        f"{nfc}.png": f"error: {nfd}.tif and {nfc}.png would share {nfd}.txt / {nfc}.txt {ignore}: rename one; "
                      "nothing written",
        f"{nfd}.tif": f"error: {nfd}.tif and {nfc}.png would share {nfd}.txt / {nfc}.txt {ignore}: rename one; "
                      "nothing written",
        **{f"three.{ext}": "error: three.bmp, three.png and three.tiff would share three.txt: rename all but one; "
                           "nothing written" for ext in ("png", "bmp", "tiff")},
    }
    assert all(r.caption == "" for r in results if r.path.name != "alone.png")
    after = snapshot(folder)
    assert after.pop("alone.txt")[1] == streamed(BLUE).encode()
    assert after == before
    # Without writing, there is nothing to share: every file is captioned.
    results = bc.caption_folder(served(echo), folder, request(), write_txt=False)
    assert set(statuses(results).values()) == {"captioned"} and len(results) == 10


# ------------------------------------------------------------------------------------- 4. empty answers
def test_empty_answers_are_errors_and_write_nothing_through_the_node(echo, dirs):
    from qwenvl_fast import nodes

    folder, _ = dirs
    solid(folder, "blank.png", RED)
    solid(folder, "spaces.png", GREEN)
    solid(folder, "fine.png", BLUE)
    (handle,) = nodes.QwenVLFastLoadModel().load(
        model="(served)", quantization="none", attention_mode="auto", dtype="auto", device="auto",
        compile_vision="off", keep_model_loaded=True, backend="server", server_url=echo.url, server_max_in_flight=1)
    node_inputs = dict(qwenvl_model=handle, folder=str(folder), prompt="Caption.", image_quality="fast",
                       max_new_tokens=16, write_txt=True, overwrite=False, seed=0)
    for _ in range(2):  # the second run asks again: no 0-byte caption makes those files look done
        out = nodes.QwenVLFastCaptionFolder().caption(**node_inputs)
        assert out["ui"]["text"][1:] == ["blank.png: " + bc.EMPTY_ANSWER, "fine.png: " + ("written" if _ == 0 else
                                         "skipped"), "spaces.png: " + bc.EMPTY_ANSWER]
        assert out["ui"]["text"][0].startswith("1 written, 0 skipped, 2 failed (blank.png: the model gave an empty"
                                                if _ == 0 else "0 written, 1 skipped, 2 failed (blank.png: ")
        assert out["result"][0] == ["", streamed(BLUE) if _ == 0 else "", ""]  # a skipped caption is not read
        assert sorted(p.name for p in folder.iterdir()) == ["blank.png", "fine.png", "fine.txt", "spaces.png"]
    ql.MANAGER.release()


# ------------------------------------------------------------------------------------- per-answer errors
def test_an_answer_that_fails_on_its_own_is_that_files_error(echo, dirs):
    folder, _ = dirs
    solid(folder, "a_ok.png", BLUE)
    solid(folder, "b_cut.png", PURPLE)
    solid(folder, "c_ok.png", (0, 100, 100))
    try:
        errors = ql.run_once(served(echo), request(images=[load_image_file(folder / "b_cut.png")],
                                                   per_answer_errors=True)).errors
    except sb.ServerError:
        pytest.skip("the server backend does not report per-answer errors yet (GenerationResult.errors)")
    assert errors and errors[0]
    results = bc.caption_folder(served(echo), folder, request())
    got = statuses(results)
    assert got["a_ok.png"] == got["c_ok.png"] == "written"
    assert got["b_cut.png"] == f"error: the answer failed ({errors[0]}); nothing written"
    assert "the answer was cut off" in errors[0]
    assert captions(results)["b_cut.png"] == ""
    assert not (folder / "b_cut.txt").exists()


# ------------------------------------------------------------------------------------- 5. failed writes
def _make_unwritable(folder: Path) -> callable:
    """Make ``folder`` refuse new entries for this process, root included; the undo. Skips where impossible."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    # chmod does not stop root; the immutable attribute does (ext4, xfs, btrfs; needs CAP_LINUX_IMMUTABLE).
    try:
        subprocess.run(["chattr", "+i", str(folder)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make a folder read-only for root here (chattr +i: {exc})")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True, capture_output=True)


def test_a_read_only_folder_keeps_every_computed_caption_through_the_node(echo, dirs):
    from qwenvl_fast import nodes

    folder, _ = dirs
    for name, rgb in (("a.png", BLUE), ("b.png", (0, 100, 100)), ("c.png", (100, 100, 0))):
        solid(folder, name, rgb)
    (handle,) = nodes.QwenVLFastLoadModel().load(
        model="(served)", quantization="none", attention_mode="auto", dtype="auto", device="auto",
        compile_vision="off", keep_model_loaded=True, backend="server", server_url=echo.url, server_max_in_flight=1)
    before = snapshot(folder)
    undo = _make_unwritable(folder)
    try:
        with pytest.raises(OSError):
            (folder / "probe").touch()
        out = nodes.QwenVLFastCaptionFolder().caption(
            qwenvl_model=handle, folder=str(folder), prompt="Caption.", image_quality="fast", max_new_tokens=16,
            write_txt=True, overwrite=False, seed=0)
    finally:
        undo()
    captions_out, files_out = out["result"][:2]
    assert [Path(f).name for f in files_out] == ["a.png", "b.png", "c.png"]
    assert captions_out == [streamed(BLUE), streamed((0, 100, 100)), streamed((100, 100, 0))]
    assert out["ui"]["text"][0].startswith("0 written, 0 skipped, 3 failed (a.png: cannot write a.txt")
    for line, name in zip(out["ui"]["text"][1:], ("a", "b", "c"), strict=True):
        assert line.startswith(f"{name}.png: error: cannot write {name}.txt (PermissionError: "), line
    assert snapshot(folder) == before
    ql.MANAGER.release()


def test_text_no_file_can_hold_leaves_nothing_behind(tmp_path):
    # A lone surrogate cannot be UTF-8; the server backend already replaces one a server sends, this guards any
    # other source: the error comes before anything touches the disk (Caption Folder makes it that file's error).
    with pytest.raises(UnicodeEncodeError):
        bc.write_caption(tmp_path / "a.txt", "bad \ud800 text", overwrite=True)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- 6. IS_CHANGED
def test_is_changed_follows_the_folder_and_the_settings_not_our_own_writes(models_dir, dirs, monkeypatch):
    from PIL import Image

    from qwenvl_fast import nodes

    monkeypatch.setenv("QWENVL_FAST_MODELS_DIR", str(models_dir))
    real_run_once = ql.run_once

    def stopped(*args, **kw):  # random weights never emit a stop token: their cut answers are taken as complete
        result = real_run_once(*args, **kw)
        result.endings = ["complete"] * len(result.texts)
        return result

    monkeypatch.setattr(ql, "run_once", stopped)
    folder, _ = dirs
    # The tiny model's random weights give an empty answer for some images (an error, nothing written): these are
    # the images test_nodes captions with these settings, which it answers with text.
    for i in (1, 2):
        Image.new("RGB", (40 + i * 10, 30), (i * 60, 100, 200)).save(folder / f"img{i - 1}.png")
    node = nodes.QwenVLFastCaptionFolder
    (handle,) = nodes.QwenVLFastLoadModel().load(model=FAMILY, quantization="none", attention_mode="auto",
                                                 dtype="auto", device="auto", compile_vision="off",
                                                 keep_model_loaded=True)
    widgets = dict(folder=str(folder), prompt="Caption.", image_quality="fast", max_new_tokens=4, write_txt=True,
                   overwrite=False, seed=0)

    def changed(**extra):  # as ComfyUI calls it: widget values, the model link None, the hidden unique_id
        return node.IS_CHANGED(**{"qwenvl_model": None, "unique_id": "7", **widgets, **extra})

    first = changed()
    assert isinstance(first, str) and changed() == first
    out = node().caption(qwenvl_model=handle, **widgets)
    assert [line.split(": ")[1] for line in out["ui"]["text"][1:]] == ["written", "written"]
    assert changed() == first  # nothing is left to do: the value before the run, so ComfyUI keeps its result

    Image.new("RGB", (70, 30), (180, 100, 200)).save(folder / "img2.png")  # a new image: run again
    second = changed()
    assert second != first
    out = node().caption(qwenvl_model=handle, **widgets)
    assert [line.split(": ")[1] for line in out["ui"]["text"][1:]] == ["skipped", "skipped", "written"]
    assert changed() == second

    (folder / "img0.txt").write_text("edited by hand, longer", encoding="utf-8")  # skip mode has nothing to do
    assert changed() == second
    assert changed(prompt="Other.") != changed()
    assert changed(include_videos=False) == changed()  # a workflow saved before the input is the same run

    overwrite = changed(overwrite=True)  # overwrite rewrites every caption: still cached when nothing else moved
    node().caption(qwenvl_model=handle, **{**widgets, "overwrite": True})
    assert changed(overwrite=True) == overwrite
    node().caption(qwenvl_model=handle, **{**widgets, "overwrite": True})
    assert changed(overwrite=True) == overwrite

    for bad in (dict(folder=str(folder / "missing")), dict(folder=""), dict(folder=str(folder / "img0.png"))):
        value = changed(**bad)
        assert value != value  # NaN: never equal, so the run happens and says what is wrong
    value = node.IS_CHANGED(**{k: v for k, v in widgets.items() if k != "folder"})  # folder fed by a link
    assert value != value
    with pytest.raises(ql.QwenVLError, match="Caption Folder needs a folder"):
        node().caption(qwenvl_model=handle, **{**widgets, "folder": "  "})
    with pytest.raises(ql.QwenVLError, match="is not a folder"):
        node().caption(qwenvl_model=handle, **{**widgets, "folder": str(folder / "missing")})


def test_is_changed_retries_a_folder_whose_last_run_had_errors(echo, dirs):
    from qwenvl_fast import nodes

    folder, _ = dirs
    solid(folder, "fine.png", BLUE)
    solid(folder, "blank.png", RED)  # an empty answer: an error until the server answers it
    node = nodes.QwenVLFastCaptionFolder
    (handle,) = nodes.QwenVLFastLoadModel().load(
        model="(served)", quantization="none", attention_mode="auto", dtype="auto", device="auto",
        compile_vision="off", keep_model_loaded=True, backend="server", server_url=echo.url, server_max_in_flight=1)
    widgets = dict(folder=str(folder), prompt="Retry.", image_quality="fast", max_new_tokens=16, write_txt=True,
                   overwrite=False, seed=0)
    first = node.IS_CHANGED(**widgets)
    out = node().caption(qwenvl_model=handle, **widgets)
    assert out["ui"]["text"][1:] == ["blank.png: " + bc.EMPTY_ANSWER, "fine.png: written"]
    retry = node.IS_CHANGED(**widgets)
    assert retry != first  # the ledger holds the failure: queueing again runs, although the listing shows nothing new
    again = node().caption(qwenvl_model=handle, **widgets)
    assert again["ui"]["text"][1:] == ["blank.png: " + bc.EMPTY_ANSWER, "fine.png: skipped"]
    assert node.IS_CHANGED(**widgets) not in (first, retry)  # failed again: the next queue retries again
    (folder / "blank.png").unlink()  # the fix: here, the file that gets no answer goes
    out = node().caption(qwenvl_model=handle, **widgets)
    assert out["ui"]["text"][1:] == ["fine.png: skipped"]
    settled = node.IS_CHANGED(**widgets)
    assert isinstance(settled, str) and settled != first and node.IS_CHANGED(**widgets) == settled
    node().caption(qwenvl_model=handle, **widgets)
    assert node.IS_CHANGED(**widgets) == settled
    ql.MANAGER.release()


def test_is_changed_reads_no_file(dirs):
    """Stat calls only: a FIFO caption (which any read would block on) and unreadable image bytes do not matter."""
    from qwenvl_fast import nodes

    folder, _ = dirs
    solid(folder, "a.png", BLUE)
    os.mkfifo(folder / "a.txt")
    (folder / "b.png").write_bytes(b"not an image at all")
    widgets = dict(folder=f'"{folder}"', prompt="Caption.", image_quality="fast", max_new_tokens=4, write_txt=True,
                   overwrite=False, seed=0)  # quoted, as Windows' "Copy as path" gives it
    value = nodes.QwenVLFastCaptionFolder.IS_CHANGED(**widgets)
    assert isinstance(value, str) and value == nodes.QwenVLFastCaptionFolder.IS_CHANGED(**widgets)


# ------------------------------------------------------------------------------------- 7. more edges
def test_a_caption_written_by_someone_else_meanwhile_is_kept(echo, dirs):
    folder, _ = dirs
    for name in ("a.png", "b.png", "c.png"):
        solid(folder, name, BLUE)

    def after_chunk(done: int, total: int) -> None:
        if done == 2:
            (folder / "c.txt").write_text("written by hand meanwhile", encoding="utf-8")

    results = bc.caption_folder(served(echo), folder, request(), on_file=after_chunk)
    assert statuses(results) == {"a.png": "written", "b.png": "written",
                                 "c.png": "skipped: its .txt appeared while captioning (kept)"}
    assert (folder / "c.txt").read_text(encoding="utf-8") == "written by hand meanwhile"


def test_cancel_mid_folder_keeps_whole_captions_and_no_temp_files(echo, dirs):
    folder, _ = dirs
    colours = [(10 * i, 50, 90) for i in range(5)]
    for i, rgb in enumerate(colours):
        solid(folder, f"{i}.png", rgb)
    chunks = []
    with pytest.raises(ql.GenerationInterrupted):
        bc.caption_folder(served(echo), folder, request(should_stop=lambda: bool(chunks)),
                          on_file=lambda done, total: chunks.append(done))
    assert chunks == [2]
    assert (folder / "0.txt").read_text(encoding="utf-8") == streamed(colours[0])
    assert (folder / "1.txt").read_text(encoding="utf-8") == streamed(colours[1])
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "0.txt", "1.png", "1.txt", "2.png", "3.png", "4.png"]


def test_cancel_mid_chunk_commits_the_answers_already_ended(dirs):
    """Cancel while some answers of a chunk are still streaming: the ones the server had ended are committed, the
    others are unfinished (no caption, no ledger line), and the next run asks only for those."""
    folder, _ = dirs
    colours = [(10 * i, 70, 90) for i in range(4)]
    for i, rgb in enumerate(colours):
        solid(folder, f"{i}.png", rgb)
    hold = threading.Event()

    def reply(server: ScriptedServer, body: dict) -> Reply:
        rgb = first_pixel(body)
        held = rgb[0] >= 20  # images 2 and 3 wait until the test lets them go
        return Reply([word + " " for word in caption_of(rgb).split(" ")], hold=hold if held else None)

    server = ScriptedServer(reply).start()
    try:
        # Two in flight, one chunk of four: bodies 3 and 4 are sent only once answers 1 and 2 have ended.
        options = dataclasses.replace(served(server), server_max_in_flight=2)
        with pytest.raises(bc.FolderInterrupted) as caught:
            bc.caption_folder(options, folder, request(should_stop=lambda: len(server.bodies) >= 4))
        assert caught.value.unfinished == 2
        assert statuses(caught.value.results) == {"0.png": "written", "1.png": "written"}
        assert sorted(p.name for p in folder.iterdir() if p.suffix == ".txt") == ["0.txt", "1.txt"]
        assert (folder / "0.txt").read_text(encoding="utf-8") == streamed(colours[0])
        assert no_temp_files(folder)
        hold.set()
        asked = len(server.bodies)
        again = bc.caption_folder(options, folder, request())
        assert statuses(again) == {"0.png": "skipped", "1.png": "skipped", "2.png": "written", "3.png": "written"}
        assert len(server.bodies) - asked == 2  # only the two unfinished ones were asked again
        assert (folder / "3.txt").read_text(encoding="utf-8") == streamed(colours[3])
    finally:
        hold.set()
        server.stop()


def test_odd_names_linked_images_and_a_linked_folder(echo, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    linked = tmp_path / "linked"
    linked.symlink_to(real, target_is_directory=True)
    odd = {"new\nline.png": (1, 2, 3), "ünïcödé 😀.png": (4, 5, 6), "-dash.png": (7, 8, 9),
           "dots.in.name.png": (10, 11, 12)}
    for name, rgb in odd.items():
        solid(real, name, rgb)
    (real / "alias.png").symlink_to("dots.in.name.png")  # a link inside the folder: an image of its own
    results = bc.caption_folder(served(echo), linked, request())
    assert set(statuses(results).values()) == {"written"} and len(results) == 5
    for name, rgb in odd.items():
        txt = real / Path(name).with_suffix(".txt").name
        assert stat.S_ISREG(txt.lstat().st_mode) and txt.read_text(encoding="utf-8") == streamed(rgb)
    assert (real / "alias.txt").read_text(encoding="utf-8") == streamed((10, 11, 12))
    assert not (real / "alias.txt").is_symlink() and (real / "alias.png").is_symlink()
    assert {p.name for p in tmp_path.iterdir()} - {"cache"} == {"linked", "real"} and linked.is_symlink()
    assert no_temp_files(real)
