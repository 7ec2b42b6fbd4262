"""The server's ``/models``: what it serves, which one to use, and that model's patch geometry (checked)."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from typing import Any

from .errors import ServerError, clip, names_text
from .faults import Faults
from .http_transport import (
    MAX_ERROR_BODY_BYTES,
    SOCKET_SLACK_S,
    Abort,
    Aborted,
    Endpoint,
    read_capped,
    request_headers,
    watchdog,
)

MAX_MODELS_BYTES = 16 << 20
MODELS_TIMEOUT_S = 30.0
QWEN_PATCH_SIZES = (14, 16)  # Qwen2/2.5-VL: 14; Qwen3-VL, Qwen3.5: 16
QWEN_MERGE_SIZE = 2


class ModelList:
    """GETs ``/models`` from ``endpoint``, within ``min(timeout, MODELS_TIMEOUT_S)``, Cancel ending it early."""

    def __init__(self, endpoint: Endpoint, faults: Faults, timeout: float) -> None:
        self.endpoint = endpoint
        self.faults = faults
        self.timeout = timeout

    def get_json(self, path: str, should_stop: Callable[[], bool] | None = None) -> Any:
        abort = Abort()
        limit = min(self.timeout, MODELS_TIMEOUT_S)
        deadline = time.monotonic() + limit
        failure: BaseException | None = None
        status, location, body, over = 0, None, b"", False
        with watchdog(abort, should_stop, deadline):
            conn = self.endpoint.connection(limit + SOCKET_SLACK_S, abort, deadline)
            try:
                conn.request("GET", self.endpoint.prefix + path, headers=request_headers(self.endpoint))
                resp = conn.getresponse()
                status, location = resp.status, resp.getheader("Location")
                body, over = read_capped(resp, MAX_MODELS_BYTES if status == 200 else MAX_ERROR_BODY_BYTES)
                abort.check()  # a shut-down socket reads as a short body
            except (OSError, http.client.HTTPException, Aborted) as exc:
                failure = self.faults.transport(exc, abort, path, limit)
            finally:
                conn.close()
        if failure is not None:
            raise failure
        if status != 200:
            raise self.faults.status(status, location, body, path)
        url = self.endpoint.url
        if over:
            raise ServerError(f"{url}{path} sent more than {MAX_MODELS_BYTES >> 20} MiB: is server_url an "
                              "OpenAI-compatible server?")
        try:
            return json.loads(body.decode("utf-8", "replace"))
        except ValueError:
            pass  # raised below, outside this block: the decoder's error holds the whole body
        raise ServerError(f"{url}{path} did not answer JSON: is server_url the OpenAI-compatible base URL (ending "
                          "in /v1)?")

    def models(self, should_stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
        url = self.endpoint.url
        data = self.get_json("/models", should_stop)
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise ServerError(f"{url}/models did not list models (no 'data' list): is this an OpenAI-compatible "
                              "server?")
        for m in models:
            if not isinstance(m, dict) or not isinstance(m.get("id"), str) or not m["id"]:
                shown = clip(repr(m.get("id") if isinstance(m, dict) else m), 60)
                raise ServerError(f"{url}/models lists a model whose id is not a name ({shown}): is this an "
                                  "OpenAI-compatible server?")
        return models

    def names(self, should_stop: Callable[[], bool] | None = None) -> list[str]:
        return [m["id"] for m in self.models(should_stop)]


def choose_model(url: str, served: list[dict[str, Any]], wanted: str) -> str:
    """``wanted`` if the server serves it; with none wanted, the one it serves."""
    names = [m["id"] for m in served]
    wanted = (wanted or "").strip()
    if wanted:
        if wanted not in names:
            raise ServerError(f"The server at {url} does not serve '{clip(wanted, 100)}'; it serves: "
                              f"{names_text(names) or 'nothing'}. Set server_model to one of those.")
        return wanted
    if len(names) != 1:
        raise ServerError(f"The server at {url} serves {len(names)} models ({names_text(names) or 'none'}): set "
                          "server_model to the one to use.")
    return names[0]


def patch_geometry(url: str, served: list[dict[str, Any]], model: str) -> tuple[int, int]:
    """Patch and merge size of the served family: from the server where it says, else from the name.

    A server's word is checked: it sizes every image (a patch of 50000 asked for terapixel resizes)."""
    entry = next(m for m in served if m["id"] == model)
    name = f"{entry.get('id', '')} {entry.get('root', '')}".lower()
    # Qwen3-VL and Qwen3.5 use 16-pixel patches, Qwen2/2.5-VL 14 (facts file); all merge 2x2.
    patch: Any = 16 if "qwen3" in name else 14
    for key in ("patch_size", "vision_patch_size"):
        if entry.get(key) is not None:
            patch = entry[key]
            break
    merge: Any = entry.get("spatial_merge_size")
    merge = QWEN_MERGE_SIZE if merge is None else merge
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (patch, merge))
    if not ok or patch not in QWEN_PATCH_SIZES or merge != QWEN_MERGE_SIZE:
        raise ServerError(f"The server at {url} reports patch_size {clip(repr(patch), 40)} and "
                          f"spatial_merge_size {clip(repr(merge), 40)} for '{clip(model, 100)}'; Qwen-VL models "
                          f"use patch_size {' or '.join(map(str, QWEN_PATCH_SIZES))} with spatial_merge_size "
                          f"{QWEN_MERGE_SIZE}. Serve a Qwen-VL model, or fix what the server reports.")
    return patch, merge
