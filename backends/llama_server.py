"""GGUF models through llama.cpp: the pack starts its own ``llama-server`` and answers through the server backend.

A folder under the LLM model folders that holds a model ``.gguf`` and its projector ``mmproj*.gguf`` is listed
as ``<folder>/<file>.gguf`` (``sources/models.py``). Picking it makes a :class:`LlamaServerModel`: a
:class:`~backends.openai_server.ServerModel` (presets before upload, streaming, per-token progress, Cancel,
answers in flight, the timing record) whose server is a :class:`LlamaServerProcess` that it owns:

* the binary is ``$QWENVL_FAST_LLAMA_SERVER``, else ``llama-server`` on PATH; started (an argument list, no
  shell) on a free loopback port (``--host 127.0.0.1``, never beyond loopback) with ``-m``, ``--mmproj``, a
  context length (``$QWENVL_FAST_LLAMA_CONTEXT`` tokens per slot), one slot per ``server_max_in_flight`` sharing
  one KV buffer (``--kv-unified``), a bounded prompt cache (``--cache-ram``, ``$QWENVL_FAST_LLAMA_CACHE_RAM_MB``)
  and its output in a log file that every error about it names;
* a fresh random API key at every start, given in llama-server's ``LLAMA_API_KEY`` environment variable (its
  ``--api-key``; not on the command line, which every local user can read) and sent by the pack only: nothing
  else on the machine can run inference on the model or read ``/slots``;
* its log in a private per-user folder (``$QWENVL_FAST_LLAMA_LOG_DIR``, else ``<tmp>/qwenvl-fast-llama-<uid>``):
  created 0700, its owner checked, files opened without following links (a link planted there by another user
  must not redirect the log);
* ready when ``/health`` answers 200; Cancel ends the wait and kills the process at once (each probe reads in
  short slices, so a server that accepts ``/health`` and never answers does not hold Cancel up);
* stopped when the model is released (Unload / ``POST /free``, ``keep_model_loaded`` off, another model
  chosen: the model manager calls ``close()``), at interpreter exit, and, for a killed ComfyUI: it runs in its
  own process group, and a watchdog process kills that whole group when the pipe from the pack's process closes
  (however the pack's process dies), so a ``$QWENVL_FAST_LLAMA_SERVER`` wrapper script that does not ``exec``
  leaves nothing behind either. On Linux the direct child also gets ``PR_SET_PDEATHSIG`` (SIGKILL), started from
  one long-lived thread (the signal follows the thread that forked, not the process);
* a server that died between runs is started again by the next run; one that dies during a run fails that run
  with an error naming its log.

The patch size comes from the projector's own metadata (``clip.vision.patch_size``, read with the ``gguf``
package), never from a file name.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.api import GenerationRequest, GenerationResult, LoadOptions
from ..core.errors import GenerationInterrupted, QwenVLError
from ..core.settings import env_int
from ..sources.models import GGUF_SPLIT, GGUF_SUFFIX, is_gguf_projector
from .api_key import forget_server_key, new_server_key, origin_text, register_server_key
from .errors import ServerError
from .openai_server import ServerModel
from .private_log import LOG_DIR_ENV as LOG_DIR_ENV  # re-exported: the variable's home was here
from .private_log import open_log, private_log_dir
from .served_models import QWEN_MERGE_SIZE, QWEN_PATCH_SIZES
from .uploads import Uploads

log = logging.getLogger("QwenVL-Fast")

LLAMA_SERVER_ENV = "QWENVL_FAST_LLAMA_SERVER"
CONTEXT_ENV = "QWENVL_FAST_LLAMA_CONTEXT"
CACHE_RAM_ENV = "QWENVL_FAST_LLAMA_CACHE_RAM_MB"
START_TIMEOUT_ENV = "QWENVL_FAST_LLAMA_START_TIMEOUT"
WATCHDOG_ENV = "QWENVL_FAST_LLAMA_WATCHDOG"  # auto (the pipe watchdog, plus on Linux the parent-death signal) or pipe
RELEASES_URL = "https://github.com/ggml-org/llama.cpp/releases"
# Tokens of context per answer in flight (slot): a 1024-token image, a system prompt and a long answer. The KV
# buffer is shared (--kv-unified), so one answer may use more while the others are idle.
DEFAULT_CONTEXT_PER_SLOT = 4096
DEFAULT_CACHE_RAM_MB = 1024  # llama-server's prompt cache grows with requests without a bound (facts file)
DEFAULT_START_TIMEOUT_S = 600.0  # loading a large model from a cold disk
HEALTH_POLL_S = 0.1
HEALTH_SLICE_S = 0.1  # a /health probe reads in slices this long, checking Cancel between them
HEALTH_PROBE_S = 5.0  # a probe with no answer by then counts as "not ready" (the start deadline still holds)
CANCEL_WAIT_S = 1.0  # a cancelled start is killed outright and reaped within this
SERVER_KEY_ENV = "LLAMA_API_KEY"  # llama-server's own variable for --api-key (kept off the command line)
MAX_LOG_BYTES = 16 << 20  # checked at each start: a log past it becomes <name>.log.1
STOP_GRACE_S = 5.0
_PATCH_KEY = "clip.vision.patch_size"


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def is_gguf_name(name: str) -> bool:
    return str(name).strip().lower().endswith(GGUF_SUFFIX)


def projectors_beside(model_file: Path) -> list[Path]:
    return sorted(p for p in model_file.parent.glob("*" + GGUF_SUFFIX) if is_gguf_projector(p) and p.is_file())


def find_projector(model_file: Path) -> Path:
    """The one ``mmproj*.gguf`` beside ``model_file``; an error with the fix when there is none or several."""
    found = projectors_beside(model_file)
    if not found:
        raise QwenVLError(f"'{model_file.parent}' holds no projector (mmproj*.gguf) beside '{model_file.name}': a "
                          "Qwen-VL GGUF needs both files. Download the model's mmproj file into the same folder.")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise QwenVLError(f"'{model_file.parent}' holds several projectors ({names}); keep one mmproj*.gguf per "
                          "folder (the one made for this model, e.g. its f16 projector).")
    return found[0]


def _gguf_reader(path: Path) -> Any:
    try:
        import gguf  # lazily: only a GGUF model needs it
    except ImportError as exc:
        raise QwenVLError("Reading a GGUF projector needs the 'gguf' package: pip install 'gguf>=0.10' with "
                          "ComfyUI's Python (it is in requirements.txt).") from exc
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # a truncated or foreign file: numpy/struct errors of every kind
        raise QwenVLError(f"'{path}' cannot be read as GGUF ({type(exc).__name__}: {str(exc)[:200]}): download "
                          "it again.") from exc


def projector_patch_size(mmproj: Path) -> int:
    """``clip.vision.patch_size`` from the projector's metadata, checked to be a Qwen family's."""
    reader = _gguf_reader(mmproj)
    field = reader.get_field(_PATCH_KEY)
    value: Any = None
    if field is not None:
        with contextlib.suppress(Exception):
            value = field.contents()
    if not isinstance(value, int) or isinstance(value, bool) or value not in QWEN_PATCH_SIZES:
        raise QwenVLError(f"The projector '{mmproj.name}' reports {_PATCH_KEY} = {value!r}; Qwen-VL projectors use "
                          f"{' or '.join(map(str, QWEN_PATCH_SIZES))}. Use the mmproj file made for this Qwen-VL "
                          "model.")
    return int(value)


def gguf_bytes(model_file: Path, mmproj: Path | None = None) -> int:
    """Bytes on disk of the model (all its split parts) and its projector (``mmproj``, else the one found beside
    it): what the server will hold."""
    parts = [model_file]
    split = GGUF_SPLIT.search(model_file.name)
    if split is not None:
        stem = model_file.name[: split.start()]
        parts = sorted(model_file.parent.glob(f"{stem}-*-of-{split.group(2)}.gguf"))
    total = sum(p.stat().st_size for p in parts if p.is_file())
    with contextlib.suppress(QwenVLError, OSError):
        total += (mmproj or find_projector(model_file)).stat().st_size
    return total


# ---------------------------------------------------------------------------------------------
# The binary and its settings
# ---------------------------------------------------------------------------------------------


def llama_server_binary() -> str:
    """``$QWENVL_FAST_LLAMA_SERVER``, else ``llama-server`` on PATH; an error with where to get one otherwise."""
    configured = os.environ.get(LLAMA_SERVER_ENV, "").strip()
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise QwenVLError(f"${LLAMA_SERVER_ENV} is '{configured}', which is not an executable file. Point it at the "
                          f"llama-server binary of a llama.cpp release ({RELEASES_URL}: CUDA builds for NVIDIA, "
                          "Metal on macOS, Vulkan for AMD/Intel GPUs, CPU otherwise).")
    found = shutil.which("llama-server")
    if found:
        return found
    raise QwenVLError(f"A .gguf model runs in llama.cpp's llama-server, which was not found: set ${LLAMA_SERVER_ENV} "
                      "to its path, or put llama-server on PATH. Release binaries (CUDA for NVIDIA, Metal on macOS, "
                      f"Vulkan for AMD/Intel GPUs, CPU otherwise) are at {RELEASES_URL}.")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Starting processes that die with ComfyUI
# ---------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _linux_die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGKILL the child when its parent goes (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class _Spawner:
    """Starts every server from one daemon thread that lives as long as the process.

    Linux's parent-death signal fires when the *thread* that forked the child ends. ComfyUI's prompt worker
    lives as long as ComfyUI, but a caller's short-lived thread would take the server down with it.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="QwenVL-Fast llama-server spawner",
                                                daemon=True)
                self._thread.start()
        done: queue.Queue = queue.Queue(maxsize=1)
        self._jobs.put((args, kwargs, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _serve(self) -> None:
        while True:
            args, kwargs, done = self._jobs.get()
            try:
                done.put((True, subprocess.Popen(*args, **kwargs)))
            except BaseException as exc:  # noqa: BLE001 (handed back to the caller's thread)
                done.put((False, exc))


_SPAWNER = _Spawner()

# The pipe watchdog (every platform; on Linux the parent-death signal also ends the direct child): a small Python
# process in its own session that reads its stdin, a pipe whose only writer is the pack's process. The read returns
# at EOF, which the OS delivers when that process dies however it dies; then the server's process group (Windows:
# tree) is killed: a wrapper script and everything it started, not only the direct child.
# A normal stop() kills the watchdog first, so it never acts on a pid that may have been reused.
_WATCHDOG_SOURCE = """
import os, signal, subprocess, sys
pid = int(sys.argv[1])
sys.stdin.buffer.read()
try:
    if os.name == "posix":
        os.killpg(pid, signal.SIGKILL)
    else:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True)
except Exception:
    pass
"""


def _watchdog_mode() -> str:
    mode = os.environ.get(WATCHDOG_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "pipe"):
        raise QwenVLError(f"${WATCHDOG_ENV} must be 'auto' or 'pipe' (it is '{mode[:20]}').")
    if mode == "auto" and not sys.platform.startswith("linux"):
        return "pipe"
    return mode


def _start_watchdog(server_pid: int) -> subprocess.Popen:
    kwargs: dict[str, Any] = dict(stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if os.name == "posix":
        kwargs["start_new_session"] = True  # a Ctrl-C to ComfyUI's process group must not end the watchdog first
    else:
        kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG_SOURCE, str(server_pid)], **kwargs)
_LIVE: weakref.WeakSet[LlamaServerProcess] = weakref.WeakSet()


@atexit.register
def stop_all() -> None:
    """Stop every llama-server this process started (interpreter exit; also usable by a host)."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


# ---------------------------------------------------------------------------------------------
# One llama-server
# ---------------------------------------------------------------------------------------------


class LlamaServerProcess:
    """One ``llama-server`` for one GGUF pair, on a free loopback port."""

    def __init__(self, model_file: Path, mmproj: Path, slots: int, context_per_slot: int | None = None,
                 cache_ram_mb: int | None = None, log_dir: Path | None = None, binary: str | None = None) -> None:
        self.model_file = Path(model_file)
        self.mmproj = Path(mmproj)
        self.slots = max(1, int(slots))
        per_slot = context_per_slot
        if per_slot is None:
            per_slot = env_int(CONTEXT_ENV, DEFAULT_CONTEXT_PER_SLOT, 256)
        self.context = per_slot * self.slots
        self.cache_ram_mb = cache_ram_mb if cache_ram_mb is not None else env_int(CACHE_RAM_ENV,
                                                                                    DEFAULT_CACHE_RAM_MB, 0)
        self.binary = binary or llama_server_binary()
        self._log_dir = log_dir
        self._log_name = f"llama-server-{self.model_file.stem[:80]}-{os.getpid()}.log"
        self.log_path = private_log_dir(log_dir) / self._log_name  # checked again at every start
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self._began = 0.0
        self._log_start = 0
        self.watchdog_mode = _watchdog_mode()
        self.watchdog: subprocess.Popen | None = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def origin(self) -> str:
        return origin_text("http", "127.0.0.1", self.port)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def command(self) -> list[str]:
        return [self.binary, "-m", str(self.model_file), "--mmproj", str(self.mmproj),
                "--host", "127.0.0.1", "--port", str(self.port),
                "-c", str(self.context), "-np", str(self.slots), "--kv-unified",
                "--cache-ram", str(self.cache_ram_mb), "--no-webui"]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def log_tail(self, chars: int = 1500) -> str:
        try:
            with open_log(self.log_path, append=False) as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - chars))
                return f.read().decode("utf-8", "replace").strip()
        except (OSError, QwenVLError):
            return ""

    def _log_since_launch(self) -> str:
        try:
            with open_log(self.log_path, append=False) as f:
                f.seek(self._log_start)
                return f.read(1 << 20).decode("utf-8", "replace")
        except (OSError, QwenVLError):
            return ""

    def died_error(self, when: str) -> ServerError:
        tail = self.log_tail()
        return ServerError(f"llama-server for '{self.model_file.name}' exited (code {self.exit_code()}) {when}; its "
                           f"log is {self.log_path}" + (f". Last lines:\n{tail}" if tail else "."))

    def start(self, should_stop: Callable[[], bool] | None = None, timeout: float | None = None) -> None:
        """Launch and wait for ``/health``; Cancel (``should_stop``) or a failure stops it and raises."""
        if self.alive():
            return
        timeout = float(timeout if timeout is not None else env_int(START_TIMEOUT_ENV, int(DEFAULT_START_TIMEOUT_S),
                                                                    1))
        self.log_path = private_log_dir(self._log_dir) / self._log_name
        for attempt in range(3):  # a port taken between choosing it and the server binding it: choose again
            self.port = _free_port()
            self._launch()
            try:
                self._wait_healthy(should_stop, timeout)
                return
            except _PortTaken:
                self.stop()
                if attempt == 2:
                    raise self.died_error("three times: its port was taken each time") from None

    def _launch(self) -> None:
        with contextlib.suppress(OSError):  # a long session's log is kept to about twice MAX_LOG_BYTES
            if os.lstat(self.log_path).st_size > MAX_LOG_BYTES:
                os.replace(self.log_path, self.log_path.with_suffix(".log.1"))
        self._log_file = open_log(self.log_path)
        self._log_file.write(f"\n=== QwenVL-Fast: {' '.join(self.command())}\n".encode())
        self._log_file.flush()
        self._log_start = self._log_file.tell()
        key = new_server_key()  # fresh at every start; in the environment, never on the command line
        kwargs: dict[str, Any] = dict(stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      cwd=str(self.log_path.parent), env={**os.environ, SERVER_KEY_ENV: key})
        if os.name == "posix":
            kwargs["start_new_session"] = True  # its own process group: stop() reaches all of it
            preexec = _linux_die_with_parent(os.getpid()) if self.watchdog_mode == "auto" else None
            if preexec is not None:
                kwargs["preexec_fn"] = preexec
        else:
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        try:
            self.proc = _SPAWNER.popen(self.command(), **kwargs)
        except OSError as exc:
            self._close_log()
            raise QwenVLError(f"Cannot start llama-server '{self.binary}' ({exc}): set ${LLAMA_SERVER_ENV} to a "
                              f"llama-server built for this machine ({RELEASES_URL}).") from None
        _LIVE.add(self)
        register_server_key(self.origin, key)
        try:  # in every mode: the parent-death signal reaches only the direct child, not a wrapper's children
            self.watchdog = _start_watchdog(self.proc.pid)
        except OSError as exc:  # the server runs; only a killed ComfyUI would leave it behind
            log.warning("[QwenVL-Fast] could not start the llama-server watchdog (%s): a killed ComfyUI may "
                        "leave the server running", exc)
        self._began = time.monotonic()
        log.info("[QwenVL-Fast] started llama-server (pid %d) for %s on 127.0.0.1:%d; log: %s", self.proc.pid,
                 self.model_file.name, self.port, self.log_path)

    def _wait_healthy(self, should_stop: Callable[[], bool] | None, timeout: float) -> None:
        deadline = self._began + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                if "couldn't bind HTTP server socket" in self._log_since_launch():  # llama-server's words
                    raise _PortTaken
                error = self.died_error("while starting")
                self.stop()
                raise error
            if self._cancelled(should_stop):
                raise GenerationInterrupted("Loading was interrupted (llama-server stopped).")
            if self._healthy(should_stop):
                self.start_seconds = time.monotonic() - self._began
                log.info("[QwenVL-Fast] llama-server ready in %.1fs", self.start_seconds)
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"llama-server for '{self.model_file.name}' did not answer /health within "
                                  f"{timeout:g}s (${START_TIMEOUT_ENV}); its log is {self.log_path}.")
            time.sleep(HEALTH_POLL_S)

    def _cancelled(self, should_stop: Callable[[], bool] | None) -> bool:
        """Cancel asked: the starting server is killed outright (it holds nothing worth a graceful stop)."""
        if should_stop is None or not should_stop():
            return False
        self.stop(grace=0.0)
        return True

    def _healthy(self, should_stop: Callable[[], bool] | None = None) -> bool:
        """``GET /health`` answered 200 (503 while the model loads). Read in short slices with Cancel checked
        between them, so a server that accepts the connection and never answers cannot hold Cancel up."""
        deadline = time.monotonic() + HEALTH_PROBE_S
        try:
            with socket.create_connection(("127.0.0.1", int(self.port or 0)), timeout=HEALTH_SLICE_S) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                head = b""
                while b"\r\n" not in head and len(head) < 4096:
                    if (should_stop is not None and should_stop()) or time.monotonic() > deadline:
                        return False
                    try:
                        chunk = sock.recv(4096)
                    except TimeoutError:
                        continue
                    if not chunk:
                        break
                    head += chunk
        except OSError:
            return False
        parts = head.split(b"\r\n", 1)[0].split()
        return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1] == b"200"

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Terminate its process group, then kill it. Safe to call twice, from any thread."""
        proc, self.proc = self.proc, None
        watchdog, self.watchdog = self.watchdog, None
        if watchdog is not None:  # first, so it never kills a process group whose id was reused
            with contextlib.suppress(OSError):
                watchdog.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                watchdog.wait(timeout=max(grace, CANCEL_WAIT_S))
            with contextlib.suppress(OSError):
                watchdog.stdin.close()
        if proc is not None:
            if proc.poll() is None and grace <= 0:
                self._signal(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=CANCEL_WAIT_S)
            elif proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self._signal(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=grace)
            if os.name == "posix":  # anything it started that outlived it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            log.info("[QwenVL-Fast] stopped llama-server (pid %d)", proc.pid)
        _LIVE.discard(self)
        if self.port is not None:
            forget_server_key(self.origin)
        self._close_log()

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if os.name == "posix":
                os.killpg(proc.pid, sig)
            elif sig == signal.SIGTERM:
                proc.terminate()
            else:
                proc.kill()

    def _close_log(self) -> None:
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None


class _PortTaken(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class LlamaServerModel(ServerModel):
    """A GGUF model answered by the llama-server it started; ``close()`` stops that server."""

    owns_server = True  # the model manager registers it with ComfyUI, so Unload / POST /free stop it

    def __init__(self, options: LoadOptions, model_file: Path,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self._usable = False
        model_file = Path(model_file)
        mmproj = find_projector(model_file)
        patch = projector_patch_size(mmproj)  # before starting anything: a wrong projector fails fast
        t0 = time.perf_counter()
        self.process = LlamaServerProcess(model_file, mmproj, slots=max(1, int(options.server_max_in_flight)))
        self.process.start(should_stop)
        try:
            served = dataclasses.replace(options, backend="server", server_url=self.process.url, server_model="")
            super().__init__(served, should_stop=should_stop)
        except BaseException:
            self.process.stop()
            raise
        self.options = options  # the manager reuses this model while the same options are asked for
        self.patch_size, self.merge_size = patch, QWEN_MERGE_SIZE
        self.llama_cpp = True  # whatever its /models says: its grammar field (streams.structured_fields)
        self.uploads = Uploads(self.upload_format, self.factor)  # sized by the projector's patch, not the name
        self.model_file, self.mmproj = model_file, mmproj
        self.dtype = torch.float16  # what ComfyUI's patcher shows; the weights live in llama-server
        self.load_seconds = time.perf_counter() - t0
        self.gguf_bytes = gguf_bytes(model_file, mmproj)
        log.info("[QwenVL-Fast] %s through llama-server (patch %d from %s)", model_file.name, patch, mmproj.name)

    @property
    def usable(self) -> bool:  # type: ignore[override]
        # A server that died between runs is started again by the next run (the manager loads anew).
        return self._usable and self.process.alive()

    @usable.setter
    def usable(self, value: bool) -> None:
        self._usable = value

    def close(self) -> None:
        super().close()
        self.process.stop()

    def server_bytes(self) -> int:
        """Bytes the server holds for this model (its files' size): what ComfyUI is told it takes."""
        return self.gguf_bytes

    def run(self, req: GenerationRequest) -> GenerationResult:
        if self._usable and not self.process.alive():
            raise self.process.died_error("before this run")
        try:
            result = super().run(req)
        except GenerationInterrupted:
            raise
        except QwenVLError:
            if not self.process.alive():
                raise self.process.died_error("during this run") from None
            raise
        if not self.process.alive():  # per-answer errors came back instead of an exception
            raise self.process.died_error("during this run")
        result.record.server["llama_server"] = {"model": self.model_file.name, "mmproj": self.mmproj.name,
                                                "log": str(self.process.log_path)}
        return result
