"""GGUF models through a real llama.cpp llama-server that the pack starts itself (backends/llama_server.py).

A tiny random Qwen2.5-VL converted with llama.cpp's own converter (tests/llama_fixture.py); the binary from
``.ci/install_llama_server.sh``. Skips with the reason when that is not built. Answers are sampled: greedy
decoding of the random tied weights repeats a newline, which strips to nothing.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from llama_fixture import MODEL_FOLDER, REPO_ROOT, gguf_root, llama_server_pids, process_running  # noqa: F401 (fixture)
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.backends.errors import AnswerError
from qwenvl_fast.backends.http_transport import Endpoint, request_headers
from qwenvl_fast.backends.llama_server import LLAMA_SERVER_ENV, RELEASES_URL, LlamaServerModel
from qwenvl_fast.backends.openai_server import ServerModel, is_llama_cpp
from qwenvl_fast.backends.streams import TAGS_GBNF, chat_body
from qwenvl_fast.core.errors import GenerationInterrupted, QwenVLError
from qwenvl_fast.engine.structured import TAGS_MAX_CHARS, TAGS_MAX_COUNT, TAGS_REGEX
from qwenvl_fast.sources.models import list_gguf_models, model_choices, resolve_model

F16 = f"{MODEL_FOLDER}/model-f16.gguf"
Q8 = f"{MODEL_FOLDER}/model-q8_0.gguf"


def _gone(pid: int, within: float = 15.0) -> bool:
    """True once ``pid`` is no running llama-server (polled; the bound is a failure deadline, not a measure)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not process_running(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def manager(gguf_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ql.ModelManager]:
    monkeypatch.setenv("QWENVL_FAST_MODELS_DIR", str(gguf_root))
    m = ql.ModelManager()
    try:
        yield m
    finally:
        m.release()


def _image(seed: int, h: int = 200, w: int = 300) -> torch.Tensor:
    return torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed))


def _request(**kw) -> ql.GenerationRequest:
    # Sampled over the whole vocabulary (temperature 1, no top-k/top-p cut): greedy or a narrow cut of the random
    # tied weights keeps picking whitespace.
    values = dict(prompt="Describe the image.", images=[_image(0)], max_new_tokens=16, do_sample=True,
                  temperature=1.0, top_p=1.0, top_k=0, seed=3, monitor=False)
    values.update(kw)
    return ql.GenerationRequest(**values)


def _server_pid(manager: ql.ModelManager) -> int:
    model = manager.current
    assert isinstance(model, LlamaServerModel)
    pid = model.process.pid
    assert pid is not None
    return pid


def test_listed_one_entry_per_model_file(gguf_root: Path, tmp_path: Path) -> None:
    names = model_choices([gguf_root])
    assert F16 in names and Q8 in names
    assert not any("mmproj" in n for n in names)
    # A .gguf without a projector beside it is no Qwen-VL model: not listed.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.gguf").write_bytes((gguf_root / F16).read_bytes())
    assert list_gguf_models([tmp_path]) == []
    assert resolve_model(F16, [gguf_root], allow_absolute=False).kind == "gguf"
    with pytest.raises(QwenVLError, match="projector"):
        resolve_model(f"{MODEL_FOLDER}/mmproj-model-f16.gguf", [gguf_root])


def test_text_back_and_two_runs_reuse_one_server(manager: ql.ModelManager) -> None:
    options = ql.LoadOptions(model=F16)
    first = ql.run_once(options, _request(), manager=manager)
    assert first.texts[0].strip(), first.texts
    pid = _server_pid(manager)
    second = ql.run_once(options, _request(seed=4), manager=manager)
    assert second.texts[0].strip()
    assert _server_pid(manager) == pid and manager.load_count == 1
    rec = second.record
    assert rec.family == "server (patch 14)"  # from the projector's clip.vision.patch_size
    assert Path(rec.server["llama_server"]["log"]).is_file()
    assert rec.new_tokens == 16


def test_presets_change_the_servers_prompt_tokens_as_computed(manager: ql.ModelManager) -> None:
    options = ql.LoadOptions(model=Q8)
    image = _image(1, 1024, 1024)
    counts, image_tokens = {}, {}
    for quality in ("fast", "high"):
        result = ql.run_once(options, _request(images=[image], image_quality=quality, max_new_tokens=2),
                             manager=manager)
        counts[quality] = result.record.prompt_tokens  # the server's own count (usage)
        image_tokens[quality] = result.record.images[0]["tokens"]  # what the pack computed before upload
    assert image_tokens == {"fast": 256, "high": 729}
    assert counts["high"] - counts["fast"] == image_tokens["high"] - image_tokens["fast"]


def _slots_busy(port: int) -> list[bool]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        # The pack's own key for this server (it answers 401 without it).
        conn.request("GET", "/slots", headers=request_headers(Endpoint.parse(f"http://127.0.0.1:{port}/v1")))
        return [bool(s.get("is_processing")) for s in json.loads(conn.getresponse().read())]
    finally:
        conn.close()


def test_cancel_frees_the_slot(manager: ql.ModelManager) -> None:
    options = ql.LoadOptions(model=F16)
    ql.run_once(options, _request(max_new_tokens=2), manager=manager)
    port = manager.current.process.port
    stop = threading.Event()
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done >= 4:
            stop.set()

    request = _request(max_new_tokens=6000, min_new_tokens=6000, on_progress=progress, should_stop=stop.is_set)
    with pytest.raises(GenerationInterrupted):
        ql.run_once(options, request, manager=manager)
    assert seen and max(seen) < 6000
    end = time.monotonic() + 10
    while any(_slots_busy(port)) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(_slots_busy(port))
    assert ql.run_once(options, _request(), manager=manager).texts[0].strip()  # the same server answers on


def test_keep_model_loaded_off_and_release_leave_no_process(manager: ql.ModelManager) -> None:
    options = ql.LoadOptions(model=F16)
    ql.run_once(options, _request(), manager=manager)
    pid = _server_pid(manager)
    ql.run_once(options, _request(), keep_model_loaded=False, manager=manager)
    assert manager.current is None and _gone(pid)
    ql.run_once(options, _request(), manager=manager)
    pid = _server_pid(manager)
    ql.run_once(ql.LoadOptions(model=Q8), _request(), manager=manager)  # another model chosen
    assert _gone(pid)
    pid = _server_pid(manager)
    manager.release()  # what Unload / POST /free do through ComfyUI's model manager
    assert _gone(pid)


def test_a_killed_server_is_started_again(manager: ql.ModelManager) -> None:
    options = ql.LoadOptions(model=F16)
    ql.run_once(options, _request(), manager=manager)
    pid = _server_pid(manager)
    os.kill(pid, signal.SIGKILL)
    # Waited for as its parent: /proc shows the leader as a zombie while its other threads still exit.
    assert manager.current.process.proc.wait(timeout=15) == -signal.SIGKILL
    result = ql.run_once(options, _request(), manager=manager)
    assert result.texts[0].strip()
    assert _server_pid(manager) != pid and manager.load_count == 2


def test_a_server_dying_during_a_run_names_its_log(manager: ql.ModelManager) -> None:
    options = ql.LoadOptions(model=F16)
    ql.run_once(options, _request(max_new_tokens=2), manager=manager)
    pid = _server_pid(manager)

    killed: list[int] = []

    def kill_after_first_token(done: int, total: int) -> None:
        if done >= 1 and not killed:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    request = _request(max_new_tokens=6000, min_new_tokens=6000, on_progress=kill_after_first_token)
    with pytest.raises(QwenVLError, match=r"llama-server for 'model-f16.gguf' exited .* its log is .*\.log"):
        ql.run_once(options, request, manager=manager)
    assert killed
    assert ql.run_once(options, _request(), manager=manager).texts[0].strip()  # and the next run starts anew


def test_context_overflow_gets_the_prompt_too_long_message(manager: ql.ModelManager,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENVL_FAST_LLAMA_CONTEXT", "512")  # tokens per slot; one slot
    options = ql.LoadOptions(model=F16, server_max_in_flight=1)
    with pytest.raises(AnswerError, match="prompt is too long.*llama-server: -c"):
        ql.run_once(options, _request(images=[_image(2, 1024, 1024)], image_quality="ultra"), manager=manager)


def test_missing_binary_names_the_variable_and_the_releases(manager: ql.ModelManager,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    monkeypatch.setenv(LLAMA_SERVER_ENV, str(tmp_path / "no-such-llama-server"))
    with pytest.raises(QwenVLError) as err:
        ql.run_once(ql.LoadOptions(model=F16), _request(), manager=manager)
    assert LLAMA_SERVER_ENV in str(err.value) and RELEASES_URL in str(err.value)
    monkeypatch.delenv(LLAMA_SERVER_ENV)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(QwenVLError) as err:
        ql.run_once(ql.LoadOptions(model=F16), _request(), manager=manager)
    assert LLAMA_SERVER_ENV in str(err.value) and RELEASES_URL in str(err.value) and "PATH" in str(err.value)


# An enum, a bounded integer, a boolean and a bounded string; no other keys, so the grammar is finite. The string's
# pattern keeps it ASCII: llama.cpp's grammar decodes UTF-8 leniently (a byte 0xF8-0xFF passes as the lead of a
# 4-byte character), so random weights over byte tokens can write invalid UTF-8 into a free string, which
# llama-server's own output parser then refuses ("does not match the expected peg-native format"). llama.cpp
# builds the string from the pattern (not maxLength), so the pattern carries the bound too.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["kind", "count", "indoor", "note"],
          "properties": {"kind": {"enum": ["cat", "dog", "car"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 20},
                         "indoor": {"type": "boolean"},
                         "note": {"type": "string", "maxLength": 12, "pattern": "^[a-z ]{0,12}$"}}}
# Enough tokens (one per byte here) for the longest answer either grammar allows, so none is cut: JSON with the
# most whitespace llama.cpp's schema grammar lets between tokens; tags at the count and length limits.
JSON_TOKENS = 800
TAGS_TOKENS = TAGS_MAX_COUNT * (TAGS_MAX_CHARS + 2) + 8


def test_structured_output_on_llama_server(manager: ql.ModelManager) -> None:
    """json (llama-server's own schema grammar, from response_format) and tags (a GBNF ``grammar``), sampled from
    random weights, through the pack's llama-server and through the same server used as a user's own
    (``backend="server"``, told apart by ``owned_by: llamacpp`` in /models). One server for all."""
    import jsonschema

    options = ql.LoadOptions(model=F16)
    for seed in (1, 2, 3):
        result = ql.run_once(options, _request(seed=seed, output_format="json", json_schema=json.dumps(SCHEMA),
                                               max_new_tokens=JSON_TOKENS), manager=manager)
        jsonschema.validate(json.loads(result.texts[0]), SCHEMA)
        assert result.record.structured == {"server_field": "response_format"}
        tags = ql.run_once(options, _request(seed=seed, output_format="tags", max_new_tokens=TAGS_TOKENS),
                           manager=manager)
        assert re.fullmatch(TAGS_REGEX, tags.texts[0]), tags.texts[0]
        assert tags.record.structured == {"server_field": "grammar"}
    assert manager.load_count == 1  # and no crash: the server answered every request
    own = ServerModel(ql.LoadOptions(model="(served)", backend="server", server_url=manager.current.process.url))
    try:
        assert own.llama_cpp
        for seed in (4, 5):
            answer = own.run(_request(seed=seed, output_format="tags", max_new_tokens=TAGS_TOKENS)).texts[0]
            assert re.fullmatch(TAGS_REGEX, answer), answer
            answer = own.run(_request(seed=seed, output_format="json", json_schema=json.dumps(SCHEMA),
                                      max_new_tokens=JSON_TOKENS)).texts[0]
            jsonschema.validate(json.loads(answer), SCHEMA)
    finally:
        own.close()


@pytest.mark.parametrize("watchdog", ["auto", "pipe"])
def test_a_killed_parent_leaves_no_orphan_server(gguf_root: Path, watchdog: str) -> None:
    """A ComfyUI killed with SIGKILL runs no atexit: the kernel's parent-death signal (Linux, ``auto``) or the pipe
    watchdog (macOS and Windows; forced here with ``pipe``) must end the server."""
    child = textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import pack_path
        pack_path.import_pack()
        from qwenvl_fast import qwenvl_loader as ql
        ql.add_model_dir({str(gguf_root)!r})
        holder = {{}}
        # Loaded from a short-lived thread: the server must outlive the thread, and die with the process.
        t = threading.Thread(target=lambda: holder.update(m=ql.MANAGER.get(ql.LoadOptions(model={F16!r}))[0]))
        t.start(); t.join()
        print(holder["m"].process.pid, flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "QWENVL_FAST_LLAMA_WATCHDOG": watchdog})
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), line
        pid = int(line)
        time.sleep(0.5)
        assert pid in llama_server_pids()  # alive after the loading thread ended
        proc.kill()
        proc.wait(timeout=30)
        assert _gone(pid), f"llama-server {pid} outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------- no binary needed: files only
def test_structured_body_for_llama_cpp_and_vllm() -> None:
    tags = _request(output_format="tags", images=[])
    body = chat_body(tags, "m", [], llama_cpp=True)
    assert body["grammar"] == TAGS_GBNF and "structured_outputs" not in body
    assert f"{{0,{TAGS_MAX_COUNT - 1}}}" in TAGS_GBNF and f"{{0,{TAGS_MAX_CHARS - 2}}}" in TAGS_GBNF
    body = chat_body(tags, "m", [])
    assert body["structured_outputs"] == {"regex": TAGS_REGEX} and "grammar" not in body
    as_json = _request(output_format="json", json_schema=json.dumps(SCHEMA), images=[])
    for llama_cpp in (True, False):  # llama-server takes the standard field (it converts the schema itself)
        body = chat_body(as_json, "m", [], llama_cpp=llama_cpp)
        assert body["response_format"]["json_schema"]["schema"] == SCHEMA
        assert "grammar" not in body and "structured_outputs" not in body
    assert "grammar" not in chat_body(_request(images=[]), "m", [], llama_cpp=True)
    served = [{"id": "a.gguf", "owned_by": "llamacpp"}, {"id": "Qwen/Qwen2.5-VL-3B-Instruct", "owned_by": "vllm"}]
    assert is_llama_cpp(served, "a.gguf") and not is_llama_cpp(served, "Qwen/Qwen2.5-VL-3B-Instruct")


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")


def test_listing_split_models_and_nested_folders(tmp_path: Path) -> None:
    for name in ("a/model-Q4_K_M.gguf", "a/model-Q8_0.gguf", "a/mmproj-f16.gguf",
                 "b/big-00001-of-00002.gguf", "b/big-00002-of-00002.gguf", "b/mmproj-big.gguf",
                 "org/c/model.gguf", "org/c/mmproj.gguf", "d/model.gguf"):
        _touch(tmp_path / name)
    assert list_gguf_models([tmp_path]) == ["a/model-Q4_K_M.gguf", "a/model-Q8_0.gguf", "b/big-00001-of-00002.gguf",
                                            "org/c/model.gguf"]
    with pytest.raises(QwenVLError, match="absolute path"):
        resolve_model(str(tmp_path / "a/model-Q8_0.gguf"), [tmp_path], allow_absolute=False)
    with pytest.raises(QwenVLError, match=r"'\.\.'"):
        resolve_model("a/../../x.gguf", [tmp_path], allow_absolute=False)
    with pytest.raises(QwenVLError, match="not found"):
        resolve_model("a/none.gguf", [tmp_path])


def _projector(path: Path, patch: int | None) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "clip")
    if patch is not None:
        writer.add_uint32("clip.vision.patch_size", patch)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_patch_size_comes_from_the_projector_and_is_checked(tmp_path: Path) -> None:
    from qwenvl_fast.backends.llama_server import find_projector, projector_patch_size

    # The name says qwen3 (patch 16); the metadata says 14, and the metadata wins.
    assert projector_patch_size(_projector(tmp_path / "mmproj-qwen3-vl.gguf", 14)) == 14
    assert projector_patch_size(_projector(tmp_path / "mmproj-b.gguf", 16)) == 16
    for patch in (50, None):
        with pytest.raises(QwenVLError, match="clip.vision.patch_size"):
            projector_patch_size(_projector(tmp_path / f"mmproj-bad-{patch}.gguf", patch))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "mmproj.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(QwenVLError, match="cannot be read as GGUF"):
        projector_patch_size(tmp_path / "broken" / "mmproj.gguf")
    with pytest.raises(QwenVLError, match="several projectors"):
        find_projector(tmp_path / "model.gguf")


def test_missing_binary_is_named_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Needs no llama.cpp: a real (empty) model file and a real projector written with the gguf package."""
    folder = tmp_path / "m"
    folder.mkdir()
    _touch(folder / "model.gguf")
    _projector(folder / "mmproj-model.gguf", 14)
    monkeypatch.setenv("QWENVL_FAST_MODELS_DIR", str(tmp_path))
    monkeypatch.delenv(LLAMA_SERVER_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(QwenVLError) as err:
        ql.run_once(ql.LoadOptions(model="m/model.gguf"), _request(), manager=ql.ModelManager())
    assert LLAMA_SERVER_ENV in str(err.value) and RELEASES_URL in str(err.value)


def test_cancel_while_the_server_starts_leaves_no_process(manager: ql.ModelManager) -> None:
    with pytest.raises(GenerationInterrupted):
        manager.get(ql.LoadOptions(model=F16), should_stop=lambda: True)
    assert manager.current is None
    end = time.monotonic() + 15
    while llama_server_pids(MODEL_FOLDER) and time.monotonic() < end:
        time.sleep(0.05)
    assert not llama_server_pids(MODEL_FOLDER)


def test_a_broken_model_file_is_an_error_naming_the_log(gguf_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF" + b"\0" * 64)  # a header and nothing a model needs
    (folder / "mmproj-model-f16.gguf").write_bytes((gguf_root / MODEL_FOLDER / "mmproj-model-f16.gguf").read_bytes())
    monkeypatch.setenv("QWENVL_FAST_MODELS_DIR", str(tmp_path))
    manager = ql.ModelManager()
    with pytest.raises(QwenVLError, match=r"llama-server for 'model.gguf' exited \(code \d+\) while starting; its "
                                          r"log is .*\.log"):
        ql.run_once(ql.LoadOptions(model="broken/model.gguf"), _request(), manager=manager)
    assert manager.current is None and not llama_server_pids(str(folder))


def test_the_pipe_watchdog_goes_with_a_normal_stop(manager: ql.ModelManager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENVL_FAST_LLAMA_WATCHDOG", "pipe")
    ql.run_once(ql.LoadOptions(model=F16), _request(), manager=manager)
    pid = _server_pid(manager)
    watchdog = manager.current.process.watchdog
    assert watchdog is not None and watchdog.poll() is None
    manager.release()
    assert _gone(pid) and watchdog.poll() is not None


def _status(port: int, method: str, path: str, headers: dict | None = None, body: bytes | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_the_server_answers_401_without_the_packs_key(manager: ql.ModelManager) -> None:
    """Another local user or process cannot run inference on the model or read /slots: the key is fresh at each
    start, lives only in the pack's process (and the server's environment), and a wrong one is refused too."""
    ql.run_once(ql.LoadOptions(model=F16), _request(max_new_tokens=2), manager=manager)
    process = manager.current.process
    port = process.port
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    json_type = {"Content-Type": "application/json"}
    assert _status(port, "GET", "/health") == 200  # public in llama-server: the pack's readiness probe
    assert _status(port, "GET", "/slots") == 401
    assert _status(port, "POST", "/v1/chat/completions", json_type, chat) == 401
    assert _status(port, "POST", "/completion", json_type, b'{"prompt": "hi", "n_predict": 2}') == 401
    wrong = {**json_type, "Authorization": "Bearer not-the-key"}
    assert _status(port, "POST", "/v1/chat/completions", wrong, chat) == 401
    own = request_headers(Endpoint.parse(process.url))
    assert _status(port, "GET", "/slots", own) == 200
    assert own["Authorization"][7:] not in Path(f"/proc/{process.pid}/cmdline").read_text(errors="replace")
    first = own["Authorization"]
    manager.release()
    ql.run_once(ql.LoadOptions(model=F16), _request(max_new_tokens=2), manager=manager)
    assert request_headers(Endpoint.parse(manager.current.process.url))["Authorization"] != first
