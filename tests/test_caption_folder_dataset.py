"""Caption Folder for training sets (issue 19): prefix / suffix, what to do with an existing caption, per-image
prompts, the .caption extension, subfolders, a limit, metadata.jsonl, caption cleaning, progress and summary.

Everything is real: files and links on disk, the node classes, and answers from a small OpenAI-compatible server
on loopback that answers each request with its own prompt (``_PromptEcho``), through the pack's real server
backend, so every caption is known exactly. One test runs the tiny local model for the batching path.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from scripted_server import Reply, ScriptedServer, image_count, prompt_of

from conftest import TINY_FAMILIES
from qwenvl_fast import captioning as bc
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.captioning.progress import progress_with_eta

FAMILY = "tiny-qwen2.5-vl" if "tiny-qwen2.5-vl" in TINY_FAMILIES else TINY_FAMILIES[0]


def _echo_prompt(server: ScriptedServer, body: dict) -> Reply:
    """Every request is answered with its rendered prompt: a caption is exactly what the prompt said."""
    prompt = prompt_of(body)
    server.prompts.append((prompt, image_count(body)))
    return Reply([prompt])


@pytest.fixture(scope="module")
def echo():
    server = ScriptedServer(_echo_prompt)
    server.prompts = []
    yield server.start()
    server.stop()


@pytest.fixture
def node_env(echo):
    from qwenvl_fast import nodes

    echo.prompts.clear()
    (handle,) = nodes.QwenVLFastLoadModel().load(
        model="(served)", quantization="none", attention_mode="auto", dtype="auto", device="auto",
        compile_vision="off", keep_model_loaded=True, backend="server", server_url=echo.url, server_max_in_flight=1)
    yield nodes, handle
    ql.MANAGER.release()


def run(node_env, folder: Path, prompt: str = "Caption {name}.", **extra):
    nodes, handle = node_env
    widgets = dict(folder=str(folder), prompt=prompt, image_quality="fast", max_new_tokens=16, write_txt=True,
                   overwrite=False, seed=0)
    widgets.update(extra)
    return nodes.QwenVLFastCaptionFolder().caption(qwenvl_model=handle, **widgets)


def is_changed(node_env, folder: Path, prompt: str = "Caption {name}.", **extra):
    nodes, _ = node_env
    widgets = dict(folder=str(folder), prompt=prompt, image_quality="fast", max_new_tokens=16, write_txt=True,
                   overwrite=False, seed=0)
    widgets.update(extra)
    return nodes.QwenVLFastCaptionFolder.IS_CHANGED(**widgets)


def lines(out) -> dict[str, str]:
    """The node's per-file lines (after the summary) as {shown name: status}."""
    return dict(line.split(": ", 1) for line in out["ui"]["text"][1:])


def image(path: Path, rgb=(10, 120, 200)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), rgb).save(path)
    return path


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@pytest.fixture
def folder(tmp_path):
    f = tmp_path / "pics"
    f.mkdir()
    return f


# ------------------------------------------------------------------------------------- the node's inputs
def test_new_inputs_are_optional_last_and_default_to_the_earlier_behaviour():
    from qwenvl_fast import nodes

    types = nodes.QwenVLFastCaptionFolder.INPUT_TYPES()
    optional = list(types["optional"])
    # where saved workflows have them; structured output's inputs come after (tests/test_structured.py)
    assert optional[2:9] == ["prefix", "suffix", "existing", "extension", "recursive", "limit", "write_jsonl"]
    assert optional[:2] == ["include_videos", "max_frames"]
    defaults = {k: types["optional"][k][1]["default"] for k in optional[2:9]}
    assert defaults == {"prefix": "", "suffix": "", "existing": "skip", "extension": ".txt", "recursive": False,
                        "limit": 0, "write_jsonl": False}
    assert types["optional"]["existing"][0] == bc.EXISTING_MODES == ["skip", "overwrite", "append", "prepend"]
    assert types["optional"]["extension"][0] == bc.CAPTION_EXTENSIONS == [".txt", ".caption"]


def test_caption_options_refuse_unknown_values():
    with pytest.raises(ql.QwenVLError, match="existing must be one of skip, overwrite, append, prepend"):
        bc.CaptionOptions(existing="merge")
    with pytest.raises(ql.QwenVLError, match="extension must be one of"):
        bc.CaptionOptions(extension=".md")
    with pytest.raises(ql.QwenVLError, match="limit must be 0"):
        bc.CaptionOptions(limit=-1)
    assert bc.resolve_caption_options(None, write_txt=False, overwrite=True) == bc.CaptionOptions(
        existing="overwrite", write_captions=False)
    assert bc.resolve_caption_options(bc.CaptionOptions(existing="append"), None, True).existing == "append"


# ------------------------------------------------------------------------------------- prefix / suffix, prompts
def test_prefix_and_suffix_go_verbatim_around_every_caption(node_env, folder):
    image(folder / "a.png")
    image(folder / "b.jpg")
    out = run(node_env, folder, prefix="ohwx, ", suffix=", best quality")
    assert lines(out) == {"a.png": "written", "b.jpg": "written"}
    assert read(folder / "a.txt") == "ohwx, Caption a., best quality"
    assert read(folder / "b.txt") == "ohwx, Caption b., best quality"
    assert out["result"][0] == ["ohwx, Caption a., best quality", "ohwx, Caption b., best quality"]
    assert out["ui"]["text"][0] == "2 written, 0 skipped, 0 failed"


def test_per_image_prompts_and_literal_braces(node_env, folder, echo):
    image(folder / "cat.png")
    image(folder / "dog.png")
    (folder / "dog.txt").write_text("a brown dog\n", encoding="utf-8")
    prompt = 'Describe {name} in {folder}; was "{caption}". Keep {0}, {}, {{name}} and {"k": 1}.'
    out = run(node_env, folder, prompt=prompt, existing="overwrite")
    assert lines(out) == {"cat.png": "written", "dog.png": "written"}
    assert read(folder / "cat.txt") == 'Describe cat in pics; was "". Keep {0}, {}, {cat} and {"k": 1}.'
    assert read(folder / "dog.txt") == 'Describe dog in pics; was "a brown dog". Keep {0}, {}, {dog} and {"k": 1}.'
    # Two different prompts: two requests, one image each.
    assert sorted(echo.prompts) == sorted((read(folder / f"{n}.txt"), 1) for n in ("cat", "dog"))


def test_rendered_prompts_go_together_each_answer_with_its_own(monkeypatch, folder, echo):
    """Prompts that differ per file still fill every chunk (one request, a prompt per answer: issue 31), and files
    with equal prompts sit next to each other."""
    calls = []
    real_run_once = ql.run_once

    def spy(options, request, **kw):
        calls.append([request.prompt_of(i) for i in range(len(request.images))])
        return real_run_once(options, request, **kw)

    monkeypatch.setattr(ql, "run_once", spy)
    for sub in ("x", "y"):
        for i in range(3):
            image(folder / sub / f"{i}.png", (i * 40, 10, 10))
    image(folder / "top.png")
    options = ql.LoadOptions(model="(served)", backend="server", server_url=echo.url, server_max_in_flight=2,
                             server_retries=0)
    results = bc.caption_folder(options, folder, ql.GenerationRequest(prompt="In {folder}.", monitor=False),
                                caption=bc.CaptionOptions(recursive=True))
    assert {r.status for r in results} == {"written"} and len(results) == 7
    assert [len(c) for c in calls] == [4, 3]  # chunks of 2 x server_max_in_flight, across prompts
    sent = [p for c in calls for p in c]
    assert sorted(sent) == ["In pics."] + ["In x."] * 3 + ["In y."] * 3
    runs = [p for i, p in enumerate(sent) if i == 0 or sent[i - 1] != p]
    assert len(runs) == len(set(runs))  # each prompt in one run: equal prompts grouped
    assert read(folder / "x" / "2.txt") == "In x." and read(folder / "top.txt") == "In pics."


# ------------------------------------------------------------------------------------- existing captions
EXISTING_CASES = {
    # mode: (what b.txt holds after the run, b's status)
    "skip": ("old tags", "skipped"),
    "overwrite": ("Caption b.", "written"),
    "append": ("old tags, Caption b.", "written"),
    "prepend": ("Caption b. old tags", "written"),
}


@pytest.mark.parametrize("mode", list(EXISTING_CASES))
def test_existing_modes(node_env, folder, mode):
    image(folder / "a.png")
    image(folder / "b.png")
    (folder / "b.txt").write_text("old tags", encoding="utf-8")
    out = run(node_env, folder, existing=mode)
    expected, status = EXISTING_CASES[mode]
    assert lines(out) == {"a.png": "written", "b.png": status}
    assert read(folder / "a.txt") == "Caption a."  # a file without a caption is always captioned
    assert read(folder / "b.txt") == expected
    # skip never reads the caption it skips: its output is empty
    assert dict(zip([Path(f).name for f in out["result"][1]], out["result"][0]))["b.png"] == (
        "" if mode == "skip" else expected)


def test_the_overwrite_switch_still_works_and_existing_wins_when_set(node_env, folder):
    image(folder / "b.png")
    (folder / "b.txt").write_text("old tags", encoding="utf-8")
    assert lines(run(node_env, folder, overwrite=True)) == {"b.png": "written"}  # existing left at "skip"
    assert read(folder / "b.txt") == "Caption b."
    assert lines(run(node_env, folder, overwrite=True, existing="append")) == {"b.png": "written"}
    assert read(folder / "b.txt") == "Caption b. Caption b."  # a space after punctuation


def test_append_keeps_prefix_and_suffix_once_and_empty_captions_are_replaced(node_env, folder):
    image(folder / "a.png")
    image(folder / "b.png")
    (folder / "a.txt").write_text("ohwx, old tags, best quality\n", encoding="utf-8")
    (folder / "b.txt").write_text("  \n", encoding="utf-8")
    kw = dict(prefix="ohwx, ", suffix=", best quality", existing="append")
    assert lines(run(node_env, folder, **kw)) == {"a.png": "written", "b.png": "written"}
    assert read(folder / "a.txt") == "ohwx, old tags, Caption a., best quality"
    assert read(folder / "b.txt") == "ohwx, Caption b., best quality"
    run(node_env, folder, **dict(kw, existing="prepend"))
    assert read(folder / "a.txt") == "ohwx, Caption a. old tags, Caption a., best quality"


def test_append_keeps_the_odd_caption_rules(node_env, folder, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("keep me", encoding="utf-8")
    image(folder / "bad.png")
    image(folder / "linked.png")
    (folder / "bad.txt").write_bytes(b"caf\xe9 tags")
    (folder / "linked.txt").symlink_to(outside / "victim.txt")
    out = run(node_env, folder, existing="append")
    got = lines(out)
    assert got["bad.png"].startswith("error: bad.txt is not UTF-8 text (byte 0xe9 at offset 3)")
    assert got["linked.png"] == "error: its .txt is a link; not written (make linked.txt a plain file)"
    assert (folder / "bad.txt").read_bytes() == b"caf\xe9 tags"
    assert read(outside / "victim.txt") == "keep me" and (folder / "linked.txt").is_symlink()
    assert out["ui"]["text"][0].startswith("0 written, 0 skipped, 2 failed (bad.png: bad.txt is not UTF-8")


def test_a_caption_edited_while_the_model_works_is_kept_in_append_mode(echo, folder):
    image(folder / "a.png")
    image(folder / "b.png")
    image(folder / "c.png")
    for n in "abc":
        (folder / f"{n}.txt").write_text("old", encoding="utf-8")
    options = ql.LoadOptions(model="(served)", backend="server", server_url=echo.url, server_max_in_flight=1,
                             server_retries=0)

    def after_chunk(done, total):
        if done == 2:  # the first chunk (a, b) is written; c's caption changes before its answer is joined
            (folder / "c.txt").write_text("edited by hand", encoding="utf-8")

    results = bc.caption_folder(options, folder, ql.GenerationRequest(prompt="new", monitor=False),
                                caption=bc.CaptionOptions(existing="append"), on_file=after_chunk)
    assert {r.path.name: r.status for r in results} == {
        "a.png": "written", "b.png": "written",
        "c.png": "skipped: its .txt changed while captioning (kept; run again to append to it)"}
    assert read(folder / "a.txt") == "old, new" and read(folder / "c.txt") == "edited by hand"


# ------------------------------------------------------------------------------------- extension
def test_caption_extension(node_env, folder):
    image(folder / "a.png")
    image(folder / "b.png")
    image(folder / "x.png")
    image(folder / "x.jpg")
    (folder / "a.txt").write_text("a txt file is not a .caption", encoding="utf-8")
    (folder / "b.caption").write_text("done", encoding="utf-8")
    out = run(node_env, folder, extension=".caption")
    assert lines(out) == {
        "a.png": "written", "b.png": "skipped",
        "x.jpg": "error: x.jpg and x.png would share x.caption: rename one; nothing written",
        "x.png": "error: x.jpg and x.png would share x.caption: rename one; nothing written"}
    assert read(folder / "a.caption") == "Caption a." and read(folder / "b.caption") == "done"
    assert read(folder / "a.txt") == "a txt file is not a .caption"
    assert not (folder / "x.caption").exists() and not (folder / "x.txt").exists()


# ------------------------------------------------------------------------------------- recursive
def _tree(folder: Path, tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    image(outside / "secret.png")
    image(folder / "top.png")
    image(folder / "sub" / "mid.png")
    image(folder / "sub" / "deeper" / "low.png")
    image(folder / ".hidden" / "no.png")
    (folder / "out").symlink_to(outside, target_is_directory=True)  # a folder link leading out
    (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)  # a loop
    (folder / "sub" / "leak.png").symlink_to(outside / "secret.png")  # a file link leading out
    (folder / "sub" / "alias.png").symlink_to(folder / "top.png")  # a file link inside: an image of its own
    return outside


def test_recursive_captions_subfolders_beside_each_file_and_never_leaves_the_folder(node_env, folder, tmp_path):
    outside = _tree(folder, tmp_path)
    before_outside = sorted(p.name for p in outside.iterdir())
    assert lines(run(node_env, folder, prompt="{folder}/{name}")) == {"top.png": "written"}  # not recursive
    out = run(node_env, folder, prompt="{folder}/{name}", recursive=True)
    assert lines(out) == {"sub/alias.png": "written", "sub/deeper/low.png": "written", "sub/mid.png": "written",
                          "top.png": "skipped"}
    assert read(folder / "sub" / "mid.txt") == "sub/mid"
    assert read(folder / "sub" / "deeper" / "low.txt") == "deeper/low"
    assert read(folder / "sub" / "alias.txt") == "sub/alias"
    assert not (folder / ".hidden" / "no.txt").exists() and not (folder / "sub" / "leak.txt").exists()
    assert sorted(p.name for p in outside.iterdir()) == before_outside
    assert [p.relative_to(folder).as_posix() for p in bc.list_images(folder, recursive=True)] == [
        "sub/alias.png", "sub/deeper/low.png", "sub/mid.png", "top.png"]


def test_is_changed_follows_the_recursive_listing_and_the_new_settings(node_env, folder):
    image(folder / "top.png")
    run(node_env, folder, recursive=True)
    flat, deep = is_changed(node_env, folder), is_changed(node_env, folder, recursive=True)
    assert isinstance(deep, str) and is_changed(node_env, folder, recursive=True) == deep
    image(folder / "new" / "one.png")  # only the recursive listing sees it
    assert is_changed(node_env, folder) == flat
    assert is_changed(node_env, folder, recursive=True) != deep
    for change in (dict(prefix="ohwx, "), dict(suffix="!"), dict(existing="append"), dict(extension=".caption"),
                   dict(write_jsonl=True)):
        assert is_changed(node_env, folder, **change) != flat, change


# ------------------------------------------------------------------------------------- limit
def test_limit_captions_the_first_files_that_need_it_and_the_next_queue_goes_on(node_env, folder):
    for n in "abcde":
        image(folder / f"{n}.png")
    (folder / "b.txt").write_text("done", encoding="utf-8")
    past = "skipped: past the limit of 2 files for this run (queue again for the next ones)"
    out = run(node_env, folder, limit=2)
    assert lines(out) == {"a.png": "written", "b.png": "skipped", "c.png": "written", "d.png": past,
                          "e.png": past}
    assert out["ui"]["text"][0] == "2 written, 3 skipped, 0 failed"
    value = is_changed(node_env, folder, limit=2)
    assert isinstance(value, str)  # files are left: the value changes with every run that moves on
    assert lines(run(node_env, folder, limit=2)) == {"a.png": "skipped", "b.png": "skipped", "c.png": "skipped",
                                                     "d.png": "written", "e.png": "written"}
    settled = is_changed(node_env, folder, limit=2)
    # nothing left: the value ComfyUI saw before the last run, so it keeps that run's result
    assert settled == value and is_changed(node_env, folder, limit=2) == settled
    assert [read(folder / f"{n}.txt") for n in "abcde"] == ["Caption a.", "done", "Caption c.", "Caption d.",
                                                             "Caption e."]


# ------------------------------------------------------------------------------------- metadata.jsonl
def imagefolder_rows(folder: Path) -> dict[str, str]:
    """metadata.jsonl checked with the Hugging Face ``datasets`` imagefolder rules, by hand: ``datasets`` itself is
    too heavy for CI. Every non-blank line is a JSON object with a string ``file_name`` (a path relative to the
    folder, "/"-separated, of a file that exists) and a string ``text``; one row per file."""
    rows = {}
    for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        row = json.loads(line)
        assert isinstance(row, dict) and isinstance(row["file_name"], str) and isinstance(row["text"], str), row
        name = row["file_name"]
        assert "\\" not in name and not name.startswith("/") and (folder / name).is_file(), name
        assert name not in rows, f"two rows for {name}"
        rows[name] = row["text"]
    return rows


def test_write_jsonl_keeps_an_imagefolder_metadata_file(node_env, folder):
    image(folder / "top.png")
    image(folder / "sub" / "low.png")
    image(folder / "sub" / "new\u2028line.png")  # U+2028 in a row: no line break for the file's reader
    image(folder / "had.png")
    (folder / "had.txt").write_text("kept caption", encoding="utf-8")
    out = run(node_env, folder, recursive=True, write_jsonl=True, prefix="ohwx, ")
    assert set(lines(out).values()) == {"written", "skipped"}
    assert imagefolder_rows(folder) == {
        "had.png": "kept caption",  # skipped: its caption gets a row, as there was none
        "sub/low.png": "ohwx, Caption low.", "sub/new\u2028line.png": "ohwx, Caption new\u2028line.",
        "top.png": "ohwx, Caption top."}
    assert [json.loads(x)["file_name"] for x in read(folder / "metadata.jsonl").splitlines()[:1]] == ["had.png"]


def test_write_jsonl_replaces_rows_of_captioned_files_and_keeps_the_others(node_env, folder):
    image(folder / "a.png")
    image(folder / "b.png")
    image(folder / "c.png")
    (folder / "gone.png").write_bytes(b"")  # a row's file may be anything: its row is not ours to judge
    old = [{"file_name": "gone.png", "text": "someone else's", "score": 3},
           {"file_name": "b.png", "text": "old b", "score": 5},
           {"file_name": "b.png", "text": "a duplicate row"},
           {"file_name": "zzz/other.png", "text": "not in the folder any more"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old), encoding="utf-8")
    (folder / "c.txt").write_text("c's own", encoding="utf-8")
    run(node_env, folder, write_jsonl=True, existing="overwrite")
    rows = [json.loads(x) for x in read(folder / "metadata.jsonl").splitlines()]
    assert rows == [{"file_name": "gone.png", "text": "someone else's", "score": 3},
                    {"file_name": "b.png", "text": "Caption b.", "score": 5},
                    {"file_name": "zzz/other.png", "text": "not in the folder any more"},
                    {"file_name": "a.png", "text": "Caption a."},
                    {"file_name": "c.png", "text": "Caption c."}]
    before = read(folder / "metadata.jsonl")
    run(node_env, folder, write_jsonl=True)  # all skipped, all have rows: nothing changes
    assert read(folder / "metadata.jsonl") == before


@pytest.mark.parametrize("content", [
    b'{"file_name": "a.png", "text": "x"}\n{not json\n', b'["a.png", "x"]\n', b'{"text": "no name"}\n',
    b'{"file_name": "z.png", "text": ' + b"[" * 100_000 + b"]" * 100_000 + b'}\n',
    b'{"file_name": "z.png", "n": ' + b"7" * 5000 + b'}\n', b'{"file_name": "z.png", "n": NaN}\n',
])
def test_a_bad_metadata_line_is_kept_as_it_is_and_the_run_goes_on(node_env, folder, content):
    image(folder / "a.png")
    (folder / "metadata.jsonl").write_bytes(content)
    assert lines(run(node_env, folder, write_jsonl=True)) == {"a.png": "written"}
    data = (folder / "metadata.jsonl").read_bytes()
    bad = [line for line in content.split(b"\n") if line and b'"text": "x"' not in line]
    assert all(line in data.split(b"\n") for line in bad)  # every line it could not read, kept verbatim
    assert {"file_name": "a.png", "text": "Caption a."} in [json.loads(x) for x in data.split(b"\n")
                                                           if x.startswith(b'{"file_name": "a.png"')]


def test_a_metadata_file_that_is_not_utf8_stops_the_run_before_any_model_work(node_env, folder, echo):
    image(folder / "a.png")
    content = b'\xff\xfe{}\n'
    (folder / "metadata.jsonl").write_bytes(content)
    with pytest.raises(ql.QwenVLError, match="is not UTF-8 text") as info:
        run(node_env, folder, write_jsonl=True)
    assert str(info.value).endswith("nothing was captioned")
    assert echo.prompts == [] and not (folder / "a.txt").exists()
    assert (folder / "metadata.jsonl").read_bytes() == content
    assert lines(run(node_env, folder)) == {"a.png": "written"}  # without write_jsonl the file is not read


def test_a_metadata_link_is_refused(node_env, folder, tmp_path):
    image(folder / "a.png")
    (tmp_path / "elsewhere.jsonl").write_text("", encoding="utf-8")
    (folder / "metadata.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(ql.QwenVLError, match="metadata.jsonl is a link, not a file"):
        run(node_env, folder, write_jsonl=True)
    assert read(tmp_path / "elsewhere.jsonl") == ""


def test_jsonl_without_caption_files(node_env, folder):
    image(folder / "a.png")
    out = run(node_env, folder, write_txt=False, write_jsonl=True, suffix=".")
    assert lines(out) == {"a.png": "captioned"}
    assert out["ui"]["text"][0] == "0 written, 1 captioned (not written), 0 skipped, 0 failed"
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "metadata.jsonl"]
    assert imagefolder_rows(folder) == {"a.png": "Caption a.."}


def test_an_interrupted_run_still_records_what_it_wrote(echo, folder):
    for n in "abcd":
        image(folder / f"{n}.png")
    options = ql.LoadOptions(model="(served)", backend="server", server_url=echo.url, server_max_in_flight=1,
                             server_retries=0)
    done = []
    with pytest.raises(ql.GenerationInterrupted):
        bc.caption_folder(options, folder, ql.GenerationRequest(prompt="{name}", monitor=False,
                                                                should_stop=lambda: bool(done)),
                          caption=bc.CaptionOptions(write_jsonl=True), on_file=lambda d, t: done.append(d))
    # "{name}" renders a prompt of its own per file, yet chunks stay full (2 x server_max_in_flight files, each
    # answer its own prompt); Cancel came after the first chunk.
    assert done == [2] and imagefolder_rows(folder) == {"a.png": "a", "b.png": "b"}
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a.txt", "b.png", "b.txt", "c.png", "d.png",
                                                        "metadata.jsonl"]


# ------------------------------------------------------------------------------------- cleaning
@pytest.mark.parametrize("answer,expected", [
    ("a cat, a cat, a cat, a cat", "a cat"),
    ("A cat, a cat, a cat. The end.", "A cat. The end."),
    ("a red car a red car a red car parked", "a red car parked"),
    ("beautiful beautiful beautiful sky", "beautiful sky"),  # one word of 8+ characters
    ("very very very good", "very very very good"),  # one short word: left alone
    ("a cat, a cat", "a cat, a cat"),  # twice is not a loop
    ("tags: red, blue, red, blue, red, blue, green", "tags: red, blue, green"),
    ("x y, x y, x y\nsecond line", "x y\nsecond line"),
    ("  padded  \n", "padded"),
    ("<think>let me look</think>\n A dog.", "A dog."),
    ("<think>still thinking", ""),
    ("", ""),
])
def test_clean_caption(answer, expected):
    assert bc.clean_caption(answer) == expected


def test_answers_are_cleaned_before_writing_through_the_node(node_env, folder):
    image(folder / "a.png")
    out = run(node_env, folder, prompt="<think>hm</think> {name} {name} {name} {name} sits, sits")
    assert lines(out) == {"a.png": "written"}
    assert read(folder / "a.txt") == "a a a a sits, sits"  # "a" is one short word: not a repeated phrase
    out = run(node_env, folder, prompt="the {name}, the {name}, the {name}", existing="overwrite")
    assert read(folder / "a.txt") == "the a"
    out = run(node_env, folder, prompt="  ", existing="overwrite", prefix="ohwx, ")
    assert lines(out) == {"a.png": bc.EMPTY_ANSWER}  # an empty answer: nothing written, not even the prefix
    assert read(folder / "a.txt") == "the a"


# ------------------------------------------------------------------------------------- progress and summary
def test_progress_text_counts_files_and_estimates_the_time_left():

    bars, texts, now = [], [], [100.0]
    on_file = progress_with_eta(lambda d, t: bars.append((d, t)), texts.append, clock=lambda: now[0])
    on_file.start(2, 10)  # two files decided up front (skipped): no model time
    now[0] += 20.0
    on_file(6, 10)  # four files in 20 s: 5 s each, four left
    now[0] += 20.0
    on_file(10, 10)
    assert texts == ["2/10 files", "6/10 files, about 0:20 left", "10/10 files, done"]
    assert bars == [(2, 10), (6, 10), (10, 10)]
    on_file = progress_with_eta(lambda d, t: None, texts.append, clock=lambda: now[0])
    on_file.start(0, 1000)
    now[0] += 10.0
    on_file(2, 1000)
    assert texts[-1] == "2/1000 files, about 1:23:10 left"


def test_the_node_sends_its_progress_text_and_summarizes_first(node_env, folder, monkeypatch):
    nodes, _ = node_env
    sent = []
    monkeypatch.setattr(nodes.comfy_glue, "progress_callbacks",
                        lambda unique_id: (lambda d, t: sent.append(("bar", d, t)), lambda s: sent.append(s)))
    for n in "abcd":
        image(folder / f"{n}.png")
    (folder / "b.txt").write_text("done", encoding="utf-8")
    (folder / "broken.png").write_bytes(b"not a png")
    out = run(node_env, folder, unique_id="7")
    texts = [s for s in sent if isinstance(s, str)]
    assert texts[0] == "1/5 files"
    assert all(re.fullmatch(r"\d/5 files, about \d+:\d\d left", t) for t in texts[1:-1]), texts
    assert texts[-1] == "5/5 files, done" and ("bar", 5, 5) in sent
    assert out["ui"]["text"][0].startswith("3 written, 1 skipped, 1 failed (broken.png: cannot read image (")
    assert lines(out)["b.png"] == "skipped"


def test_summarize_lists_the_first_failures():
    results = [bc.CaptionResult(Path(f"{i}.png"), "", f"error: reason {i}") for i in range(5)]
    results.append(bc.CaptionResult(Path("ok.png"), "x", "written"))
    results.append(bc.CaptionResult(Path("s.png"), "x", "skipped: past the limit of 1 files for this run"))
    assert bc.summarize(results) == ("1 written, 1 skipped, 5 failed (0.png: reason 0; 1.png: reason 1; "
                                     "2.png: reason 2; and 2 more)")
    assert bc.summarize([]) == "0 written, 0 skipped, 0 failed"


# ------------------------------------------------------------------------------------- the local model's batches
def test_the_local_model_batches_each_rendered_prompt(models_dir, tmp_path, monkeypatch):
    from PIL import Image

    folder = tmp_path / "set"
    for sub, shade in (("red", 0), ("blue", 1)):
        (folder / sub).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + 8 * i, 32), (60 * i, 80 * shade, 120)).save(folder / sub / f"{i}.png")
    options = ql.LoadOptions(model=str(models_dir / FAMILY), dtype="fp32")
    calls = []
    real_run_once = ql.run_once

    def spy(options, request, **kw):
        result = real_run_once(options, request, **kw)
        calls.append(([request.prompt_of(i) for i in range(len(request.images))], list(result.texts)))
        # Random weights never emit a stop token, so every answer is cut at max_new_tokens (never written); this
        # test is about batching by rendered prompt, so the answers are taken as complete.
        assert set(result.endings) == {"cut"}
        result.endings = ["complete"] * len(result.texts)
        return result

    monkeypatch.setattr(ql, "run_once", spy)
    # 8 tokens: with fewer the tiny model's random answers can be empty (an error, nothing written)
    request = ql.GenerationRequest(prompt="Caption this {folder} picture.", image_quality="fast", max_new_tokens=8,
                                   min_new_tokens=8, disk_cache=False)
    try:
        results = bc.caption_folder(options, folder, request,
                                    caption=bc.CaptionOptions(recursive=True, write_jsonl=True, suffix=" [x]"))
    finally:
        ql.MANAGER.release()
    # One batch of CHUNK (4) images across the two prompts, each answer its own prompt (issue 31), then the rest.
    assert [len(prompts) for prompts, _ in calls] == [4, 2]
    assert [p for prompts, _ in calls for p in prompts] == (["Caption this blue picture."] * 3
                                                             + ["Caption this red picture."] * 3)
    answers = [t for _, texts in calls for t in texts]
    rows = imagefolder_rows(folder)
    for r in results:
        rel = r.path.relative_to(folder).as_posix()
        answer = answers[(0 if r.path.parent.name == "blue" else 3) + int(r.path.stem)]
        if not bc.clean_caption(answer):
            assert r.status == bc.EMPTY_ANSWER and rel not in rows
            continue
        assert r.status == "written"
        assert read(r.path.with_suffix(".txt")) == r.caption == bc.clean_caption(answer) + " [x]" == rows[rel]
    assert sum(r.status == "written" for r in results) >= 1
    assert not [p for p in folder.rglob("*.tmp")] and os.path.isfile(folder / "metadata.jsonl")
