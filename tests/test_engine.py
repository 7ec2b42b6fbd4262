"""The engine's own logic: its parts (engine/), the one out-of-memory policy, releasing without a host copy, the
Backend protocol, the generate skeleton shared by one prompt and batched rows, and the vision attention's bits."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
import torch

from conftest import TINY_FAMILIES, load_tiny, tiny_request
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.backends import openai_server as sb
from qwenvl_fast.core.api import Backend
from qwenvl_fast.engine import decode_compile as dc
from qwenvl_fast.engine import generation, memory
from qwenvl_fast.engine import model as engine
from qwenvl_fast.perf_monitor import RunRecord
from qwenvl_fast.vision import attention as va
from qwenvl_fast.vision import tower_compile as tc

FAMILY = "tiny-qwen2.5-vl"  # windowed vision attention; reuses prefixes on transformers >= 5.18
EACH = ql.BATCH_MODES[1]


def _images(n: int, seed: int = 0, h: int = 90, w: int = 120) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(h, w, 3, generator=g) for _ in range(n)]


# -- small pure parts ------------------------------------------------------------------------------
def test_answer_chunks_and_cut_at_eos():
    assert generation.answer_chunks([10, 10, 10], 6, 48) == [[0, 1, 2]]
    assert generation.answer_chunks([10, 10, 10], 6, 47) == [[0, 1], [2]]
    assert generation.answer_chunks([10, 30, 10], 10, 80) == [[0, 1], [2]]  # the longest prompt sets the width
    assert generation.answer_chunks([100, 5], 10, 50) == [[0], [1]]  # over the budget alone: alone
    assert generation.answer_chunks([], 10, 50) == []
    assert generation.cut_at_eos([1, 2, 9, 0, 9], {9}) == [1, 2, 9]  # up to and with the FIRST eos
    assert generation.cut_at_eos([1, 2, 3], set()) == [1, 2, 3]
    # still importable where the tests and scripts of before the split import them from
    assert engine.answer_chunks is generation.answer_chunks and engine.cut_at_eos is generation.cut_at_eos


# -- the Backend protocol ----------------------------------------------------------------------------
class _ModelsStub(http.server.BaseHTTPRequestHandler):
    """Just enough of an OpenAI-compatible server for ServerModel's constructor: GET /v1/models."""

    def do_GET(self):  # noqa: N802  (http.server's name)
        body = json.dumps({"data": [{"id": "stub-qwen2.5-vl"}]}).encode()
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def models_stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ModelsStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_both_backends_satisfy_the_protocol(models_dir, models_stub):
    local = load_tiny(models_dir, FAMILY)
    assert isinstance(local, Backend) and local.is_remote is False
    served = sb.ServerModel(ql.LoadOptions(model="(served)", backend="server", server_url=models_stub))
    try:
        assert isinstance(served, Backend) and served.is_remote is True
        assert served.tips(RunRecord()) == [] and served.param_bytes() == 0
    finally:
        served.close()
    assert not served.usable
    # run_once asks any backend for its tips: the local one answers through the same method
    result = ql.run_once(local.options, tiny_request(_images(1), monitor=True))
    assert result.record.tips == local.tips(result.record)
    assert ql.MANAGER.current is local


# -- one out-of-memory policy --------------------------------------------------------------------------
def _static_decode(model) -> dc.DecodeCompile:
    """Compiled decode's static cache on the CPU (decoded eagerly), with a compiled callable built but not run."""
    from transformers import CompileConfig

    model.decode_compile.release()
    model.decode_compile = dc.DecodeCompile(model.model, "auto", model.device, force_static=True,
                                            compile_config=None, context_length=model.context_length)
    model.decode_compile._compiled_call(CompileConfig(fullgraph=False))  # torch.compile is lazy: nothing compiles
    return model.decode_compile


def test_oom_drops_prefixes_static_cache_and_compiled_call(models_dir, monkeypatch):
    model = load_tiny(models_dir, FAMILY, dtype="fp32")
    decode = _static_decode(model)
    model.run(tiny_request(_images(1, seed=1)))
    if not model.prefix_reuse_off_reason:
        assert len(model.prefix_cache) == 1
    assert decode.cache is not None and decode._guarded is not None
    policy = []
    monkeypatch.setattr(engine, "free_after_oom", lambda m: (policy.append(m), memory.free_after_oom(m)))

    def out_of_memory(**kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(model.model, "generate", out_of_memory)
    with pytest.raises(ql.QwenVLError, match=r"Out of memory\."):
        model.run(tiny_request(_images(1, seed=1), prompt="Another question?"))
    assert policy == [model]
    assert len(model.prefix_cache) == 0
    assert decode.cache is None and decode._guarded is None  # rebuilt at the next call, not kept with its graphs
    assert decode.enabled and decode.status == "off (static cache without compile)"  # still on: only freed
    monkeypatch.undo()
    assert model.run(tiny_request(_images(1, seed=1))).texts  # the next call allocates anew


def test_oom_in_a_batch_applies_the_same_policy_then_answers_one_by_one(models_dir, monkeypatch):
    model = load_tiny(models_dir, FAMILY, dtype="fp32")
    imgs = _images(3, seed=2)
    alone = model.run(tiny_request(imgs, batch_mode=EACH, answer_batch_tokens=0))
    decode = _static_decode(model)
    policy = []
    monkeypatch.setattr(engine, "free_after_oom", lambda m: (policy.append(m), memory.free_after_oom(m)))
    real = model.model.generate

    def small_memory(**kwargs):
        if kwargs["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(**kwargs)

    monkeypatch.setattr(model.model, "generate", small_memory)
    result = model.run(tiny_request(imgs, batch_mode=EACH))
    assert policy == [model] and result.token_ids == alone.token_ids
    assert decode._guarded is None


def test_compiled_tower_out_of_memory_is_raised_not_taken_for_a_compile_failure():
    report = tc.CompileReport(enabled=True, mode=tc.MODE_REGIONAL, reason="", setting="on", device="cpu")
    state = tc._TowerState(report=report, regions=[])
    visual = torch.nn.Module()
    eager_calls = []

    def compiled(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    call = tc._guarded_call(compiled, lambda *a, **k: eager_calls.append(a) or "eager", visual, state)
    with pytest.raises(torch.OutOfMemoryError):
        call(1)
    assert eager_calls == [] and not state.failed and report.enabled  # compiling stays on

    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded")

    call = tc._guarded_call(broken, lambda *a, **k: "eager", visual, state)
    assert call(1) == "eager" and state.failed and not report.enabled  # a compiler failure: eager for good


# -- releasing the model -------------------------------------------------------------------------------
def test_close_frees_the_weights_without_a_host_copy(models_dir, monkeypatch):
    model = ql.load_model(ql.LoadOptions(model=str(models_dir / FAMILY)))  # its own, not the manager's
    net = model.model
    params = list(net.parameters())
    buffers = [b for b in net.buffers() if b.numel()]
    assert params and sum(p.numel() for p in params) > 0
    if model.device.type == "cpu":
        # The release path for a GPU model, taken on the CPU: close() must not branch on the device into a copy.
        monkeypatch.setattr(model, "device", torch.device("cuda"))
    moves = []
    real_to = torch.nn.Module.to

    def watching_to(self, *args, **kwargs):
        moves.append((type(self).__name__, args, kwargs))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", watching_to)
    for name in ("cpu", "cuda"):
        monkeypatch.setattr(torch.nn.Module, name, lambda self, *a, _n=name, **k: moves.append((_n, a, k)))
    model.close()
    assert moves == [], "close() moved the model (a host copy of every weight)"
    assert not model.usable and model.model is None
    assert all(p.numel() == 0 for p in params), "a parameter still holds its weights"
    assert all(p.numel() == 0 for p in net.parameters()) and all(b.numel() == 0 for b in buffers)
    assert all(p.device == params[0].device for p in params)  # emptied where they were
    with pytest.raises(ql.QwenVLError, match="unloaded"):
        model.run(tiny_request(_images(1)))


# -- the generate skeleton both paths share -----------------------------------------------------------
@pytest.fixture
def skeleton_calls(monkeypatch):
    calls = []
    real = generation.Generator._generate

    def counting(self, req, mon, inputs, *args, **kwargs):
        calls.append(int(inputs["input_ids"].shape[0]))
        return real(self, req, mon, inputs, *args, **kwargs)

    monkeypatch.setattr(generation.Generator, "_generate", counting)
    return calls


@pytest.mark.parametrize("mode", ["one prompt", "rows"])
def test_one_prompt_and_rows_go_through_one_skeleton(models_dir, skeleton_calls, mode):
    model = load_tiny(models_dir, FAMILY, dtype="fp32")
    imgs = _images(3, seed=4)
    req = (tiny_request(imgs[:1], monitor=True, enable_image_cache=False) if mode == "one prompt"
           else tiny_request(imgs, monitor=True, batch_mode=EACH))
    result = model.run(req)
    rows = 1 if mode == "one prompt" else 3
    assert skeleton_calls == [rows]
    rec = result.record
    assert rec.new_tokens == 8 * rows and rec.stages["prefill"] > 0 and rec.stages["decode"] > 0
    assert rec.decode_compile == model.decode_compile.last_status
    assert rec.decode_tokens_per_s is not None  # one first token per row counted in prefill, the rest in decode
    # Cancel after the first streamed token: the same skeleton stops the call and raises
    skeleton_calls.clear()
    stop, steps = [False], []

    def progress(done, total):
        steps.append(done)
        stop[0] = True

    req.should_stop = lambda: stop[0]
    req.on_progress = progress
    with pytest.raises(ql.GenerationInterrupted):
        model.run(req)
    assert skeleton_calls == [rows] and len(steps) <= 2, "generation went on after Cancel"


# -- the vision attention and the embedding cache key --------------------------------------------------
@pytest.mark.parametrize("family", [f for f in ("tiny-qwen2.5-vl", "tiny-qwen3-vl") if f in TINY_FAMILIES])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_grouped_vision_attention_gives_the_same_bits(models_dir, family, dtype):
    """Grouped SDPA and transformers' per-window SDPA loop give bit-identical embeddings (max abs difference 0.0
    measured), which is why the vision attention is not in the embedding cache key (VisionEncoder.cache_key_extra)."""
    from qwenvl_fast.perf_monitor import RunMonitor
    from qwenvl_fast.vision.images import canonicalize_image, pixel_values_for

    model = load_tiny(models_dir, family, dtype=dtype)
    if model.vision_attention != "grouped sdpa":
        pytest.skip("this transformers routes no cu_seqlens to custom attention (4.x)")
    imgs = [torch.rand(300, 400, 3), torch.rand(150, 500, 3), torch.rand(448, 448, 3)]  # several window counts
    req = ql.GenerationRequest(prompt="x", images=imgs, image_quality="balanced")
    prepared = model._prepare(imgs, req, None, RunMonitor(enabled=False))
    for p in prepared:
        p.canonical = canonicalize_image(imgs[p.index])
    pixel_values, grid = pixel_values_for(prepared, model.image_spec, "fast", RunMonitor(enabled=False))
    key = model.cache_key_extra
    with torch.inference_mode():
        grouped = model.encode(pixel_values, grid)
        va.disable_grouped_vision_attention(model.model)
        try:
            assert model.cache_key_extra == key
            per_window = model.encode(pixel_values, grid)
        finally:
            va.enable_grouped_vision_attention(model.model)
    for a, b in zip(grouped, per_window, strict=True):
        assert a.grid == b.grid
        assert torch.equal(a.embeds, b.embeds), f"max abs diff {(a.embeds - b.embeds).abs().max().item()}"
        assert all(torch.equal(x, y) for x, y in zip(a.deepstack, b.deepstack, strict=True))
