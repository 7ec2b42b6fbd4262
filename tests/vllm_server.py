"""A real vLLM OpenAI-compatible server with a tiny synthetic Qwen2.5-VL, for tests over HTTP.

Not a test module. ``tests/test_vllm_server.py`` imports the session fixture ``vllm_server`` from
here. vLLM itself comes from ``.ci/install_vllm.sh``: vLLM's CPU build in its own virtual
environment (it pins its own torch), ``$QWENVL_FAST_VLLM_VENV``, default ``<repo>/.ci-work/vllm-venv``.
Without it the fixture skips, with the reason.

The server runs ``VENV/bin/python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
script of the ``vllm-cpu`` package does not start) on 127.0.0.1, in its own process group, its
output in a log file. It is stopped by its process group id (terminate, then kill): by ``stop()``,
by the fixture's finalizer and, as a last resort, at interpreter exit.

The model: the synthetic preset ``tiny-qwen2.5-vl-h64`` (vLLM's CPU attention needs head size
64), random weights, the pack's real processor and tokenizer, written at test time.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qwenvl_fast.core.settings import env_float
from server_process import ServerLog, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
VLLM_VENV_ENV = "QWENVL_FAST_VLLM_VENV"
DEFAULT_VLLM_VENV = REPO_ROOT / ".ci-work" / "vllm-venv"
# Written last by .ci/install_vllm.sh: a venv without it is a half-finished install.
INSTALL_MARKER = ".qwenvl_fast_vllm_complete"

VLLM_PRESET = "synthetic:tiny-qwen2.5-vl-h64"
DEFAULT_SERVED_NAME = "tiny-qwen2.5-vl"
# --enforce-eager: no torch.compile warm-up; the server answers /health after about 36 s on 2 cores
# instead of about 80 s (59 s with a warm compile cache), and a tiny model gains nothing from compiling.
DEFAULT_ARGS = ["--max-model-len", "4096", "--dtype", "bfloat16", "--enforce-eager"]
STRUCTURED_OUTPUTS_ARGS = ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']


def vllm_venv() -> Path:
    return Path(os.environ.get(VLLM_VENV_ENV) or DEFAULT_VLLM_VENV).expanduser()


def vllm_python(venv: Path | None = None) -> Path:
    return (venv or vllm_venv()) / "bin" / "python"


def vllm_missing_reason(venv: Path | None = None) -> str | None:
    """Why no vLLM server can be started, or None when its venv is there."""
    venv = venv or vllm_venv()
    if not vllm_python(venv).is_file():
        return f"vLLM not installed at {venv} (run `.ci/install_vllm.sh {venv}`, or set ${VLLM_VENV_ENV})"
    if not (venv / INSTALL_MARKER).is_file():
        return f"vLLM install at {venv} is incomplete (no {INSTALL_MARKER}); run `.ci/install_vllm.sh {venv}` again"
    return None



class VllmHTTPError(RuntimeError):
    """The server answered with an error status."""

    def __init__(self, status: int, body: str, url: str) -> None:
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status} from {url}: {body[:2000]}")


class VllmServer(ServerLog):
    """One ``vllm.entrypoints.openai.api_server`` process; a small HTTP client around it."""

    def __init__(
        self,
        model_dir: str | Path,
        served_name: str = DEFAULT_SERVED_NAME,
        port: int | None = None,
        extra_args: list[str] | None = None,
        base_args: list[str] | None = None,
        venv: str | Path | None = None,
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.served_name = served_name
        self.port = port
        self.extra_args = list(extra_args or [])
        self.base_args = list(DEFAULT_ARGS if base_args is None else base_args)  # replaces DEFAULT_ARGS
        self.venv = Path(venv) if venv else vllm_venv()
        self.log_path = Path(log_path) if log_path else self.model_dir.parent / f"vllm-{served_name}.log"
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None  # from launch to /health answering 200
        self._log_file = None

    # ----------------------------------------------------------------- lifecycle
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI-compatible API root, e.g. for ``OpenAI(base_url=...)``."""
        return f"{self.base_url}/v1"

    def command(self) -> list[str]:
        return [
            str(vllm_python(self.venv)),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.base_args,
            *self.extra_args,
        ]

    def start(self, timeout: float = 300.0) -> VllmServer:
        reason = vllm_missing_reason(self.venv)
        if reason:
            raise RuntimeError(reason)
        if self.alive():
            return self
        if self.port is None:
            self.port = free_port()
        env = dict(os.environ)
        # The project's pip/venv settings must not leak into vLLM's interpreter.
        for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(key, None)
        env.update(
            {
                "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache (the default takes a share of RAM)
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed by stop())
        began = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=str(self.log_path.parent),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: stop() ends the engine core and workers too
        )
        atexit.register(self.stop)
        deadline = began + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"vLLM exited with code {code} while starting:\n{self.log_tail()}")
            if self.healthy():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vLLM did not answer /health within {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.5)
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self, grace: float = 15.0) -> None:
        """Terminate the server's process group, then kill it. Safe to call twice."""
        proc = self.proc
        if proc is not None:
            pgid = proc.pid  # start_new_session: the group id is the leader's pid
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pgid, signal.SIGKILL)
                    proc.wait(timeout=grace)
            # Workers left behind by a leader that already exited.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        atexit.unregister(self.stop)

    def __enter__(self) -> VllmServer:  # noqa: PYI034 (py3.10: no typing.Self)
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=5) as resp:
                return resp.status == 200
        except (OSError, urllib.error.HTTPError):
            return False


    # ----------------------------------------------------------------- HTTP
    def request(self, method: str, path: str, payload: Any = None, timeout: float = 60.0) -> Any:
        """JSON in, JSON out (text where the answer is not JSON). ``path`` is below the server root."""
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        url = self.base_url + path
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise VllmHTTPError(exc.code, exc.read().decode("utf-8", "replace"), url) from None
        text = raw.decode("utf-8", "replace")
        try:
            return json.loads(text)
        except ValueError:
            return text

    def get(self, path: str, timeout: float = 30.0) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, payload: Any, timeout: float = 60.0) -> Any:
        return self.request("POST", path, payload, timeout=timeout)

    def models(self) -> list[str]:
        return [m["id"] for m in self.get("/v1/models")["data"]]

    def chat(self, messages: list[dict], timeout: float = 120.0, **params: Any) -> dict:
        """POST /v1/chat/completions (not streamed); ``params`` go into the body as they are."""
        return self.post("/v1/chat/completions", {"model": self.served_name, "messages": messages, **params}, timeout)

    def metrics_text(self) -> str:
        """GET /metrics (Prometheus text format)."""
        return str(self.get("/metrics"))

    def metric(self, name: str) -> float:
        """The sum of one metric over its label sets (e.g. ``vllm:num_requests_running``)."""
        return metric_value(self.metrics_text(), name)


def metric_value(metrics: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of ``name`` in Prometheus text whose labels include ``labels``."""
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$")
    total = 0.0
    for line in metrics.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        if labels and not all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            continue
        total += float(m.group(2))
    return total


# The session's one server. Each test module that imports the fixture gets its own copy of it (pytest
# keys fixtures by the module that holds them), so the copies share the server through this dict.
_SESSION: dict[str, Any] = {}


def session_server(tmp_path_factory: pytest.TempPathFactory) -> VllmServer:
    """The session's server: started on first use, then the same one (or the same start error)."""
    server = _SESSION.get("server")
    if server is not None and server.alive():
        return server
    if "error" in _SESSION:
        raise RuntimeError(f"the vLLM server failed to start earlier in this session: {_SESSION['error']}")
    from qwenvl_fast.sources import synthetic  # the tests' conftest imported the pack (pack_path)

    base = tmp_path_factory.mktemp("vllm")
    model_dir = synthetic.save_synthetic(VLLM_PRESET, base / "tiny-qwen2.5-vl-h64")
    # Compact JSON for structured output (tests/test_structured_server.py): vLLM 0.32 takes it only as a server
    # setting, and only with an explicit xgrammar or guidance backend.
    server = VllmServer(model_dir, served_name=DEFAULT_SERVED_NAME, log_path=base / "vllm-server.log",
                        extra_args=STRUCTURED_OUTPUTS_ARGS)
    try:
        server.start(timeout=env_float("QWENVL_FAST_VLLM_START_TIMEOUT", 300.0, 1.0))
    except Exception as exc:
        _SESSION["error"] = exc
        raise
    _SESSION["server"] = server
    return server


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """One vLLM server for the session, serving the tiny Qwen2.5-VL as ``tiny-qwen2.5-vl``.

    Skips (with the reason) when vLLM's venv is absent. Stopped at the end of the session, also on
    failure (and at interpreter exit, should the finalizer never run).
    """
    reason = vllm_missing_reason()
    if reason:
        pytest.skip(reason)
    server = session_server(tmp_path_factory)
    try:
        yield server
    finally:
        server.stop()  # all copies finish at the session's end; stop() is idempotent
