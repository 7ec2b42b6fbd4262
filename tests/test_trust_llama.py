"""The pack's own llama-server, as a local attacker or a killed ComfyUI would meet it (backends/llama_server.py,
backends/private_log.py, backends/api_key.py).

These need no llama.cpp: a real executable that behaves like llama-server's HTTP side (it binds ``--port``
and either answers ``/health`` or accepts and never answers), started by the real ``LlamaServerProcess``,
through a real wrapper script where a test says so. The real llama-server's 401 without the key is in
tests/test_llama_server.py. Linux only where /proc and process groups are asserted.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from llama_fixture import REPO_ROOT, process_running
from qwenvl_fast.backends import api_key
from qwenvl_fast.backends.http_transport import Endpoint, request_headers
from qwenvl_fast.backends.llama_server import SERVER_KEY_ENV, LlamaServerProcess
from qwenvl_fast.backends.private_log import LOG_DIR_ENV, open_log, private_log_dir
from qwenvl_fast.core.errors import GenerationInterrupted, QwenVLError

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="asserts through /proc (Linux)")

# What the fake records: its pid, whether it got a key, and each connection it accepted (one line each).
FAKE_SERVER = """
import os, socket, sys, time
record = os.environ["FAKE_RECORD"]
port = int(sys.argv[sys.argv.index("--port") + 1])
def note(line):
    with open(record, "a") as f:
        f.write(line + "\\n")
note(f"pid {os.getpid()}")
note(f"key {len(os.environ.get('LLAMA_API_KEY', ''))}")
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(16)
held = []
while True:
    conn, _ = srv.accept()
    note("accepted")
    if os.environ.get("FAKE_MODE") == "silent":
        held.append(conn)  # read nothing, answer nothing, never close
        continue
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
    conn.close()
"""


def _fake_binary(tmp_path: Path, wrapper: bool = False) -> Path:
    fake = tmp_path / "fake-llama-server"
    fake.write_text(f"#!{sys.executable}\n{FAKE_SERVER}")
    fake.chmod(0o755)
    if not wrapper:
        return fake
    # A wrapper that does not exec (it sets a variable, runs the server as a child, then does more work).
    script = tmp_path / "llama-wrapper.sh"
    script.write_text(f'#!/bin/sh\nexport LD_LIBRARY_PATH="/opt/none"\n"{fake}" "$@"\necho "server ended: $?"\n')
    script.chmod(0o755)
    return script


def _record(tmp_path: Path) -> list[str]:
    path = tmp_path / "record.txt"
    return path.read_text().splitlines() if path.is_file() else []


def _wait_for(predicate, within: float = 15.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _files(tmp_path: Path) -> tuple[Path, Path]:
    model, mmproj = tmp_path / "m.gguf", tmp_path / "mmproj-m.gguf"
    model.write_bytes(b"GGUF")
    mmproj.write_bytes(b"GGUF")
    return model, mmproj


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_RECORD", str(tmp_path / "record.txt"))
    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path / "logs"))
    return tmp_path


# ------------------------------------------------------------------------------------------------ the key
def test_each_start_gets_a_fresh_key_sent_only_to_that_server(fake_env, tmp_path):
    model, mmproj = _files(tmp_path)
    keys = []
    for _ in range(2):
        server = LlamaServerProcess(model, mmproj, slots=1, binary=str(_fake_binary(tmp_path)))
        server.start(timeout=60)
        try:
            endpoint = Endpoint.parse(server.url)
            sent = request_headers(endpoint)["Authorization"]
            assert sent.startswith("Bearer ") and len(sent) > 40
            keys.append(sent)
            assert f"key {len(sent) - len('Bearer ')}" in _record(tmp_path)  # the server got the same key
            # Not on the command line (every local user reads /proc/<pid>/cmdline), not in the log.
            cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes() if sys.platform.startswith("linux") else b""
            assert sent[7:].encode() not in cmdline
            assert sent[7:] not in server.log_tail(100000)
            assert api_key.redact(f"x {sent[7:]} y") == "x *** y"
            other = Endpoint.parse("http://127.0.0.1:1/v1")  # another loopback server gets no key
            assert "Authorization" not in request_headers(other)
        finally:
            server.stop()
        assert "Authorization" not in request_headers(endpoint)  # forgotten with the server
    assert keys[0] != keys[1]
    assert SERVER_KEY_ENV == "LLAMA_API_KEY"  # llama-server's own variable for --api-key


# ------------------------------------------------------------------------------------------------ the log
@linux_only
def test_the_log_folder_is_private_and_owned(fake_env, tmp_path):
    model, mmproj = _files(tmp_path)
    server = LlamaServerProcess(model, mmproj, slots=1, binary=str(_fake_binary(tmp_path)))
    server.start(timeout=60)
    server.stop()
    folder = tmp_path / "logs"
    info = os.stat(folder)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert server.log_path.parent == folder and server.log_path.is_file()
    assert stat.S_IMODE(os.stat(server.log_path).st_mode) & 0o077 == 0


@linux_only
def test_a_link_planted_as_the_log_is_not_followed(fake_env, tmp_path):
    model, mmproj = _files(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    server = LlamaServerProcess(model, mmproj, slots=1, binary=str(_fake_binary(tmp_path)))
    server.log_path.symlink_to(victim)
    with pytest.raises(QwenVLError, match=LOG_DIR_ENV):
        server.start(timeout=60)
    assert victim.read_text() == "precious\n"
    assert not [line for line in _record(tmp_path) if line.startswith("pid")]  # nothing was started
    with pytest.raises(QwenVLError, match="without following a link"):
        open_log(server.log_path)


@linux_only
def test_a_shared_default_log_folder_made_by_someone_else_is_not_used(tmp_path, monkeypatch):
    monkeypatch.delenv(LOG_DIR_ENV, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    planted = tmp_path / f"qwenvl-fast-llama-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)  # as another user would leave it (a root test cannot chown to a real other user here)
    chosen = private_log_dir()
    assert chosen != planted and chosen.parent == tmp_path
    assert stat.S_IMODE(os.stat(chosen).st_mode) == 0o700
    planted.chmod(0o700)
    assert private_log_dir() == planted
    planted.rmdir()
    (tmp_path / "elsewhere").mkdir()
    planted.symlink_to(tmp_path / "elsewhere")  # a link in its place is not followed
    assert private_log_dir() != planted


def test_an_unusable_configured_log_folder_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(LOG_DIR_ENV, str(blocker / "logs"))
    with pytest.raises(QwenVLError, match=rf"\${LOG_DIR_ENV}.*0700|cannot be created") as caught:
        private_log_dir()
    assert LOG_DIR_ENV in str(caught.value) and "FileNotFoundError" not in type(caught.value).__name__
    if os.name == "posix":
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        monkeypatch.setenv(LOG_DIR_ENV, str(shared))
        with pytest.raises(QwenVLError, match="written by other users") as caught:
            private_log_dir()
        assert LOG_DIR_ENV in str(caught.value)


# ------------------------------------------------------------------------------------------------ Cancel
@linux_only
def test_cancel_during_start_up_ends_a_server_that_never_answers_health_within_a_second(fake_env, tmp_path,
                                                                                        monkeypatch):
    """The bound fails at 2 s: a /health probe that blocked for its whole timeout (it was 2 s) would exceed it."""
    monkeypatch.setenv("FAKE_MODE", "silent")
    model, mmproj = _files(tmp_path)
    server = LlamaServerProcess(model, mmproj, slots=1, binary=str(_fake_binary(tmp_path)))
    stop = threading.Event()
    outcome: list[BaseException] = []

    def starting() -> None:
        try:
            server.start(should_stop=stop.is_set, timeout=120)
        except BaseException as exc:  # noqa: BLE001 (checked below)
            outcome.append(exc)

    thread = threading.Thread(target=starting)
    thread.start()
    assert _wait_for(lambda: "accepted" in _record(tmp_path), 60), _record(tmp_path)
    pid = int(next(line for line in _record(tmp_path) if line.startswith("pid")).split()[1])
    time.sleep(0.3)  # the probe is now blocked on a connection that never answers
    t0 = time.monotonic()
    stop.set()
    thread.join(timeout=10)
    gone = _wait_for(lambda: not process_running(pid), 2.0)
    elapsed = time.monotonic() - t0
    assert not thread.is_alive() and outcome and isinstance(outcome[0], GenerationInterrupted), outcome
    assert gone, "the starting server outlived Cancel"
    assert elapsed < 2.0, f"Cancel took {elapsed:.2f}s to end the start-up (bound 2 s, aim 1 s)"
    print(f"Cancel during start-up: ended in {elapsed:.3f}s")


# ------------------------------------------------------------------------------------------------ orphans
@linux_only
@pytest.mark.parametrize("watchdog", ["auto", "pipe"])
def test_sigkill_of_the_parent_leaves_no_server_even_behind_a_wrapper_that_does_not_exec(fake_env, tmp_path,
                                                                                         watchdog):
    model, mmproj = _files(tmp_path)
    wrapper = _fake_binary(tmp_path, wrapper=True)
    child = textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import pack_path
        pack_path.import_pack()
        from pathlib import Path
        from qwenvl_fast.backends.llama_server import LlamaServerProcess
        server = LlamaServerProcess(Path({str(model)!r}), Path({str(mmproj)!r}), slots=1, binary={str(wrapper)!r})
        # Started from a short-lived thread, as ComfyUI's prompt worker may: the server must outlive it.
        t = threading.Thread(target=lambda: server.start(timeout=60))
        t.start(); t.join()
        print(server.pid, flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "QWENVL_FAST_LLAMA_WATCHDOG": watchdog})
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), line
        wrapper_pid = int(line)
        server_pid = int(next(x for x in _record(tmp_path) if x.startswith("pid")).split()[1])
        assert server_pid != wrapper_pid  # the wrapper did not exec: the server is its child
        assert process_running(server_pid) and process_running(wrapper_pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert _wait_for(lambda: not process_running(server_pid)), f"server {server_pid} outlived its killed parent"
        assert _wait_for(lambda: not process_running(wrapper_pid)), f"wrapper {wrapper_pid} outlived its parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid_line in _record(tmp_path):
            if pid_line.startswith("pid"):
                try:
                    os.kill(int(pid_line.split()[1]), signal.SIGKILL)  # only the fake this test started
                except ProcessLookupError:
                    pass
