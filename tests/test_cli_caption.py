"""``python cli.py caption-folder``: the Caption Folder node on the command line (issue 19).

Every test runs the real command line as a subprocess on a real folder of image files and checks what it wrote,
its exit status (0 nothing failed, 1 some file failed, 2 usage or configuration error, 130 interrupted) and what
it printed (progress with the time left on stderr, the summary on stdout). Answers come from the tiny local model
(random weights: its captions are meaningless but real) or, where a test must know the exact text, from a small
OpenAI-compatible server on loopback through the pack's real server backend.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from scripted_server import Reply, ScriptedServer, first_pixel

from conftest import TINY_FAMILIES

ROOT = Path(__file__).resolve().parents[1]
FAMILY = "tiny-qwen2.5-vl" if "tiny-qwen2.5-vl" in TINY_FAMILIES else TINY_FAMILIES[0]
SIZES = [(40, 30), (320, 240), (1280, 720)]  # mixed sizes, one large


def cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def noise_images(folder: Path, sizes=SIZES, prefix: str = "img") -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"{prefix}_{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        files.append(path)
    return files


def solid(folder: Path, name: str, rgb: tuple[int, int, int]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.new("RGB", (40, 30), rgb).save(path)
    return path


# ------------------------------------------------------------------------------------------ a server on loopback
def answer_for(rgb: tuple[int, int, int]) -> str:
    return f"colour {bytes(rgb).hex()}"


def _by_colour(server: ScriptedServer, body: dict) -> Reply:
    server.requests += 1
    return Reply([answer_for(first_pixel(body))], completion_tokens=2)


@pytest.fixture(scope="module")
def echo():
    server = ScriptedServer(_by_colour, model="echo")
    server.requests = 0
    yield server.start()
    server.stop()


@pytest.fixture
def served(echo):
    echo.delay = 0.0
    return ["--backend", "server", "--server-url", echo.url, "--server-max-in-flight", "1", "--quality", "fast"]


RED, GREEN, BLUE = (200, 0, 0), (0, 200, 0), (0, 0, 200)


# ------------------------------------------------------------------------------------------------ local model
def test_local_model_cut_answers_are_each_a_files_error_with_progress_and_summary(models_dir, tmp_path):
    # Random weights never emit a stop token: every answer is cut at --max-new-tokens, so none becomes a caption.
    folder = tmp_path / "photos"
    files = noise_images(folder, SIZES + [(64, 64), (900, 1400)])
    proc = cli("caption-folder", str(folder), "--model", str(models_dir / FAMILY), "--quality", "fast",
               "--max-new-tokens", "8", "--min-new-tokens", "8")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert not [f for f in files if f.with_suffix(".txt").exists()]
    assert proc.stderr.count("cut at max_new_tokens=8: raise max_new_tokens; nothing written") == 5, proc.stderr
    # 5 files in chunks of 4: progress after each chunk, the second with an estimate of the time left
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[caption-folder] ") and "/5 files" in
                line]
    assert [re.search(r"(\d+)/5 files", line).group(1) for line in progress] == ["4", "5"], proc.stderr
    assert re.search(r"about \d+(m\d\d)?s left$", progress[0]), progress[0]
    assert "0 written, 0 skipped, 5 failed" in proc.stdout, proc.stdout


def test_a_broken_file_is_exit_status_1_and_the_rest_go_on(models_dir, tmp_path):
    folder = tmp_path / "mixed"
    good = noise_images(folder, SIZES[:2])
    (folder / "broken.png").write_bytes(b"not a png at all")
    proc = cli("caption-folder", str(folder), "--model", str(models_dir / FAMILY), "--quality", "fast",
               "--max-new-tokens", "4", "--min-new-tokens", "4")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert not (folder / "broken.txt").exists() and not [f for f in good if f.with_suffix(".txt").exists()]
    assert "0 written, 0 skipped, 3 failed" in proc.stdout
    assert "broken.png: error: cannot read image" in proc.stderr
    assert proc.stderr.count("cut at max_new_tokens=4: raise max_new_tokens; nothing written") == 2


@pytest.mark.parametrize("args, message", [
    (["--model", "MODEL", "--existing", "replace"], "invalid choice: 'replace'"),
    (["--model", "MODEL", "--extension", ".md"], "invalid choice: '.md'"),
    (["--model", "MODEL", "--limit", "-1"], "limit"),
    ([], "--model is required"),
    (["--backend", "server"], "--server-url"),
    (["--model", "/no/such/model"], "/no/such/model"),
])
def test_usage_and_configuration_errors_are_exit_status_2(models_dir, tmp_path, args, message):
    folder = tmp_path / "one"
    noise_images(folder, SIZES[:1])
    args = [str(models_dir / FAMILY) if a == "MODEL" else a for a in args]
    proc = cli("caption-folder", str(folder), *args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not list(folder.glob("*.txt"))


def test_a_missing_folder_and_an_unreachable_server_are_exit_status_2(tmp_path):
    proc = cli("caption-folder", str(tmp_path / "nope"), "--model", "synthetic:tiny-qwen2.5-vl")
    assert proc.returncode == 2 and "is not a folder" in proc.stderr, proc.stderr[-3000:]
    noise_images(tmp_path / "here", SIZES[:1])
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = cli("caption-folder", str(tmp_path / "here"), "--backend", "server", "--server-url",
               f"http://127.0.0.1:{port}/v1")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert not list((tmp_path / "here").glob("*.txt"))


def test_the_single_image_command_is_unchanged():
    proc = cli("--model", "synthetic:tiny-qwen2.5-vl", "--quality", "fast", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--- answer 1:" in proc.stdout and "timings: total" in proc.stdout


# ------------------------------------------------------------------------------ exact texts: the loopback server
def test_prefix_suffix_and_extension(served, tmp_path):
    folder = tmp_path / "set"
    solid(folder, "a.png", RED)
    solid(folder, "b.png", GREEN)
    proc = cli("caption-folder", str(folder), *served, "--prefix", "photo of sks, ", "--suffix", ", 4k",
               "--extension", ".caption")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (folder / "a.caption").read_text() == f"photo of sks, {answer_for(RED)}, 4k"
    assert (folder / "b.caption").read_text() == f"photo of sks, {answer_for(GREEN)}, 4k"
    assert not list(folder.glob("*.txt"))
    assert "2 written, 0 skipped, 0 failed" in proc.stdout


@pytest.mark.parametrize("mode, expected", [
    ("skip", "old caption"),
    ("overwrite", answer_for(BLUE)),
    ("append", f"old caption, {answer_for(BLUE)}"),
    ("prepend", f"{answer_for(BLUE)}, old caption"),
])
def test_existing_captions(served, tmp_path, mode, expected):
    folder = tmp_path / mode
    solid(folder, "x.png", BLUE)
    (folder / "x.txt").write_text("old caption")
    proc = cli("caption-folder", str(folder), *served, "--existing", mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (folder / "x.txt").read_text() == expected
    assert ("1 skipped" if mode == "skip" else "1 written") in proc.stdout


def test_recursive_limit_and_jsonl(served, tmp_path):
    folder = tmp_path / "tree"
    solid(folder, "a.png", RED)
    solid(folder / "sub", "b.png", GREEN)
    solid(folder / "sub", "c.png", BLUE)
    flat = cli("caption-folder", str(folder), *served)
    assert flat.returncode == 0, flat.stderr[-3000:]
    assert (folder / "a.txt").is_file() and not list((folder / "sub").glob("*.txt"))

    limited = cli("caption-folder", str(folder), *served, "--recursive", "--limit", "1", "--jsonl")
    assert limited.returncode == 0, limited.stderr[-3000:]
    assert len(list((folder / "sub").glob("*.txt"))) == 1
    rest = cli("caption-folder", str(folder), *served, "--recursive", "--jsonl")
    assert rest.returncode == 0, rest.stderr[-3000:]
    for name, rgb in (("sub/b", GREEN), ("sub/c", BLUE)):
        assert (folder / f"{name}.txt").read_text() == answer_for(rgb)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    assert any(answer_for(GREEN) in json.dumps(r) for r in rows) and any(answer_for(BLUE) in json.dumps(r)
                                                                          for r in rows), rows


def test_no_write_prints_the_captions_and_json_is_one_object(served, tmp_path):
    folder = tmp_path / "dry"
    solid(folder, "a.png", RED)
    proc = cli("caption-folder", str(folder), *served, "--no-write")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{folder / 'a.png'}\t{answer_for(RED)}" in proc.stdout
    assert not list(folder.glob("*.txt"))
    proc = cli("caption-folder", str(folder), *served, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["failed"] == 0 and data["results"] == [
        {"path": str(folder / "a.png"), "status": "written", "caption": answer_for(RED)}]


def test_progress_estimates_the_time_left(served, echo, tmp_path):
    folder = tmp_path / "many"
    for i in range(6):
        solid(folder, f"{i}.png", (i * 10, 0, 0))
    proc = cli("caption-folder", str(folder), *served)  # one request in flight: chunks of two
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [line for line in proc.stderr.splitlines() if "/6 files" in line]
    assert [re.search(r"(\d)/6", line).group(1) for line in progress] == ["2", "4", "6"], proc.stderr
    for line in progress[:2]:  # from the first chunk on (the rate since the start, the model already loaded)
        assert re.search(r"about \d+(m\d\d)?s left$", line), line
    assert "left" not in progress[2]


def test_ctrl_c_stops_after_the_files_in_flight_with_status_130(served, echo, tmp_path):
    folder = tmp_path / "interrupted"
    for i in range(12):
        solid(folder, f"{i:02d}.png", (i * 10, 0, 0))
    echo.delay = 0.4
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "caption-folder", str(folder), *served],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # the first chunk is done: two captions written
            if "/12 files" in line:
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "interrupted" in err
    written = sorted(p.name for p in folder.glob("*.txt"))
    assert 2 <= len(written) < 12, written
    assert all((folder / w).read_text().startswith("colour ") for w in written)  # each whole


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_model_loads_exits_130_without_a_traceback(tmp_path, sig):
    """The README: Ctrl-C or SIGTERM never prints a traceback, also during the model load. The load here is the
    server backend's model list from a server that accepts the connection and never answers."""
    import socket

    folder = tmp_path / "loading"
    solid(folder, "a.png", (1, 2, 3))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(120)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "caption-folder", str(folder), "--backend",
                             "server", "--server-url", url], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        conn, _ = listener.accept()  # the load has asked for the model list: it is waiting now
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        conn.close()
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "interrupted while loading the model" in err and "Traceback" not in err, err[-2000:]
    assert not list(folder.glob("*.txt"))
