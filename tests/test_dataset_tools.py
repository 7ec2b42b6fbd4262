"""Dataset tools for trainers (issue 31) through the real Caption Folder node and the real command line: tag rules,
the report and its chart, ``{concept}`` of a kohya folder, per-image prompts in one request.

Answers come from a scripted loopback OpenAI-compatible server through the pack's real server backend: each
answer is chosen by the file's name found in its own prompt, so every caption and every count is known exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scripted_server import Reply, ScriptedServer, prompt_of

from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.captioning import report as rep
from qwenvl_fast.captioning.cleanup import render_prompt

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Tag {name}, a photo of {concept}."
ANSWERS = {  # file stem -> the tags the "model" answers for it
    "a": "Red_Car, blurry, 1girl, tree",
    "b": "red car, watermark, sky, red car",
    "c": "blurry, Watermark",  # nothing left after the rules: that file's error
}
EXCLUDE = "blurry, watermark"
REPLACE = "1girl = girl, solo\n# a comment\nsky = blue sky"


def _answer(server: ScriptedServer, body: dict) -> Reply:
    prompt = prompt_of(body)
    server.prompts.append(prompt)
    stem = prompt.split(",")[0].removeprefix("Tag ")
    return Reply([ANSWERS.get(stem, "unknown")])


@pytest.fixture(scope="module")
def tagger():
    server = ScriptedServer(_answer)
    server.prompts = []
    yield server.start()
    server.stop()


@pytest.fixture
def node_env(tagger):
    from qwenvl_fast import nodes

    tagger.prompts.clear()
    (handle,) = nodes.QwenVLFastLoadModel().load(
        model="(served)", quantization="none", attention_mode="auto", dtype="auto", device="auto",
        compile_vision="off", keep_model_loaded=True, backend="server", server_url=tagger.url, server_max_in_flight=2)
    yield nodes, handle
    ql.MANAGER.release()


def _image(path: Path, rgb=(10, 120, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), rgb).save(path)
    return path


def kohya_folder(tmp_path: Path) -> Path:
    """``10_red car``: a, b, c answered; d not an image; e already captioned (kept by skip)."""
    folder = tmp_path / "train" / "10_red car"
    for name in "abc":
        _image(folder / f"{name}.png")
    (folder / "d.png").write_bytes(b"not a png")
    _image(folder / "e.png")
    (folder / "e.txt").write_text("old, tags", encoding="utf-8")
    return folder


def run_node(node_env, folder: Path, **extra):
    nodes, handle = node_env
    widgets = dict(folder=str(folder), prompt=PROMPT, image_quality="fast", max_new_tokens=16, write_txt=True,
                   overwrite=False, seed=0, prefix="sks, ", exclude_tags=EXCLUDE, replace_tags=REPLACE)
    widgets.update(extra)
    return nodes.QwenVLFastCaptionFolder().caption(qwenvl_model=handle, **widgets)


EXPECTED_REPORT = {
    "files_seen": 5, "captioned": 2, "skipped": 1, "failed": 2, "captions": 3,
    "caption_words": {"min": 2, "median": 5, "max": 5},
    "tags": {"Red_Car": 2, "sks": 2, "blue sky": 1, "girl": 1, "old": 1, "solo": 1, "tags": 1, "tree": 1},
}


def test_rules_report_and_concept_through_the_node(node_env, tmp_path, monkeypatch):
    calls = []
    real_run_once = ql.run_once

    def spy(options, request, **kw):
        calls.append((request.prompt, list(request.prompts), len(request.images)))
        return real_run_once(options, request, **kw)

    monkeypatch.setattr(ql, "run_once", spy)
    folder = kohya_folder(tmp_path)
    out = run_node(node_env, folder)
    captions, files, report, image = out["result"]
    by_name = {Path(f).name: c for f, c in zip(files, captions)}
    assert (folder / "a.txt").read_text(encoding="utf-8") == "sks, Red_Car, girl, solo, tree"
    assert (folder / "b.txt").read_text(encoding="utf-8") == "sks, red car, blue sky"
    assert not (folder / "c.txt").exists() and not (folder / "d.txt").exists()
    assert (folder / "e.txt").read_text(encoding="utf-8") == "old, tags"
    assert by_name["a.png"] == "sks, Red_Car, girl, solo, tree"
    status = dict(line.split(": ", 1) for line in out["ui"]["text"][1:] if ": " in line)
    assert "tag rules removed every tag" in status["c.png"]
    assert json.loads(report) == EXPECTED_REPORT
    # {concept} of "10_red car"; three different prompts in ONE request (per-answer prompts), not one each
    assert sorted(calls[0][1]) == ["Tag a, a photo of red car.", "Tag b, a photo of red car.",
                                                   "Tag c, a photo of red car."]
    assert len(calls) == 1 and calls[0][2] == 3
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[2] >= 512 and image.shape[3] == 3
    pixels = (image[0].numpy() * 255).round().astype(np.uint8)
    bars = np.all(pixels == np.array(rep.TAG_BAR_COLOR, dtype=np.uint8), axis=-1)
    column = bars[:, np.nonzero(bars.any(axis=0))[0][0]]
    rows = int(np.count_nonzero(np.diff(column.astype(int)) == 1)) + int(column[0])
    assert rows == len(EXPECTED_REPORT["tags"])  # one bar per tag
    assert np.all(pixels == np.array(rep.HISTOGRAM_COLOR, dtype=np.uint8), axis=-1).any()


def test_a_second_queue_reports_the_whole_folder(node_env, tmp_path):
    """Nothing left to do: the report still counts every caption the folder holds (skipped ones included)."""
    folder = kohya_folder(tmp_path)
    run_node(node_env, folder)
    again = json.loads(run_node(node_env, folder)["result"][2])
    assert again["captions"] == 3 and again["tags"] == EXPECTED_REPORT["tags"]
    assert again["captioned"] == 0 and again["files_seen"] == 5


def test_bad_rules_are_refused_before_any_request(node_env, tmp_path, tagger):
    folder = kohya_folder(tmp_path)
    with pytest.raises(ql.QwenVLError, match="replace_tags line 1"):
        run_node(node_env, folder, replace_tags="no equals sign here")
    assert tagger.prompts == [] and not (folder / "a.txt").exists()


def test_rules_on_whole_json_are_refused(node_env, tmp_path, tagger):
    folder = kohya_folder(tmp_path)
    with pytest.raises(ql.QwenVLError, match="json_field"):
        run_node(node_env, folder, output_format="json")
    assert tagger.prompts == []


def test_no_rules_write_the_answer_as_before(node_env, tmp_path):
    folder = kohya_folder(tmp_path)
    run_node(node_env, folder, exclude_tags="", replace_tags="", prefix="")
    assert (folder / "b.txt").read_text(encoding="utf-8") == "red car, watermark, sky, red car"


def test_outputs_are_appended_last():
    from qwenvl_fast import nodes

    node = nodes.QwenVLFastCaptionFolder
    assert node.RETURN_NAMES == ("captions", "files", "report", "report_image")
    assert node.RETURN_TYPES == ("STRING", "STRING", "STRING", "IMAGE")
    assert node.OUTPUT_IS_LIST == (True, True, False, False)
    optional = list(node.INPUT_TYPES()["optional"])
    assert optional[-2:] == ["exclude_tags", "replace_tags"]


@pytest.mark.parametrize("folder,concept", [("10_red car", "red car"), ("3_sks dog_2", "sks dog_2"),
                                            ("red car", "red car"), ("10_", "10_"), ("x_10", "x_10")])
def test_concept_of_a_kohya_folder(tmp_path, folder, concept):
    assert render_prompt("{concept}|{folder}", tmp_path / folder / "a.png") == f"{concept}|{folder}"


def test_cli_rules_and_report_png(tagger, tmp_path):
    folder = kohya_folder(tmp_path)
    png = tmp_path / "report.png"
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "caption-folder", str(folder), "--backend", "server",
                           "--server-url", tagger.url, "--prompt", PROMPT, "--prefix", "sks, ", "--exclude-tags",
                           EXCLUDE, "--replace-tags", REPLACE, "--report", str(png)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # c and d failed
    assert (folder / "a.txt").read_text(encoding="utf-8") == "sks, Red_Car, girl, solo, tree"
    assert "report: 5 files: 2 captioned this run, 1 skipped, 2 failed; 3 captions in the folder" in done.stdout
    assert "Red_Car (2)" in done.stdout
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 512
        pixels = np.asarray(im.convert("RGB"))
    assert np.all(pixels == np.array(rep.TAG_BAR_COLOR, dtype=np.uint8), axis=-1).any()


def test_changed_rules_make_files_due_again_and_the_same_rules_do_not(node_env, tmp_path):
    """The rules are part of the ledger's settings (like prefix): overwrite with the same rules does nothing more;
    with other rules every file is captioned again."""
    folder = kohya_folder(tmp_path)
    run_node(node_env, folder, existing="overwrite")
    assert (folder / "b.txt").read_text(encoding="utf-8") == "sks, red car, blue sky"
    again = json.loads(run_node(node_env, folder, existing="overwrite")["result"][2])
    assert again["captioned"] == 0
    changed = run_node(node_env, folder, existing="overwrite", exclude_tags="blurry, watermark, sky",
                       replace_tags="")
    assert json.loads(changed["result"][2])["captioned"] >= 2
    assert (folder / "b.txt").read_text(encoding="utf-8") == "sks, red car"


def test_cli_report_in_a_missing_folder_is_a_usage_error(tagger, tmp_path):
    folder = kohya_folder(tmp_path)
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "caption-folder", str(folder), "--backend", "server",
                           "--server-url", tagger.url, "--report", str(tmp_path / "nope" / "r.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--report" in done.stderr and "does not exist" in done.stderr
    assert not (folder / "a.txt").exists()
