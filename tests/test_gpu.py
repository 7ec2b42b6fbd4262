"""CUDA paths: skipped on machines without a GPU (CI), run on the GPU machine by .ci/gpu_check.sh."""

from __future__ import annotations

import gc
import importlib.util

import pytest
import torch

from conftest import load_tiny, tiny_request
from qwenvl_fast import qwenvl_loader as ql

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def load(models_dir, family, **kw):
    return load_tiny(models_dir, family, device="cuda", **kw)


def req(images, **kw):
    return tiny_request(images, **{"monitor": True, **kw})


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-qwen3.5"])
def test_cuda_bf16_same_tokens_reference_fast_and_hit(models_dir, family):
    model = load(models_dir, family)
    assert model.dtype in (torch.bfloat16, torch.float16) and model.device.type == "cuda"
    imgs = [torch.rand(200, 300, 3), torch.rand(90, 120, 3)]
    ref = model.run(req(imgs, enable_image_cache=False, preprocess="reference"))
    miss = model.run(req(imgs))
    hit = model.run(req(imgs))
    assert [i["cache"] for i in hit.record.images] == ["memory", "memory"]
    assert ref.token_ids == miss.token_ids == hit.token_ids
    assert miss.record.stages["encode"] > 0 and "transfer" in miss.record.stages


def test_cuda_upload_is_pinned_and_async(models_dir):
    from qwenvl_fast.vision import fast_preprocess

    host = [torch.randint(0, 255, (64, 80, 3), dtype=torch.uint8) for _ in range(3)]
    out = fast_preprocess.upload(host, "cuda")
    torch.cuda.synchronize()
    assert all(o.is_cuda for o in out)
    assert all(torch.equal(o.cpu(), h) for o, h in zip(out, host))


def test_cuda_no_host_sync_in_fast_preprocess():
    from qwenvl_fast.vision import fast_preprocess

    imgs = fast_preprocess.upload([torch.randint(0, 255, (300, 400, 3), dtype=torch.uint8)], "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pv, grid = fast_preprocess.preprocess_images(
            imgs, [(280, 392)], patch_size=14, merge_size=2, temporal_patch_size=2,
            image_mean=[0.5] * 3, image_std=[0.5] * 3, device="cuda", dtype=torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert pv.is_cuda and not grid.is_cuda


def test_release_frees_vram(models_dir):
    ql.MANAGER.release()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model = load(models_dir, "tiny-qwen2.5-vl")
    model.run(req([torch.rand(100, 100, 3)]))
    assert torch.cuda.memory_allocated() > base
    ql.MANAGER.release()
    assert torch.cuda.memory_allocated() <= base + 1024 * 1024


def test_attention_auto_and_flash_choice(models_dir):
    has_flash = importlib.util.find_spec("flash_attn") is not None
    model = load(models_dir, "tiny-qwen2.5-vl")
    assert model.attention == ("flash_attention_2" if has_flash else "sdpa")
    if not has_flash:
        with pytest.raises(ql.QwenVLError, match="flash-attn is not installed"):
            ql.resolve_attention("flash_attention_2", torch.device("cuda"), torch.bfloat16)


def test_quantization_4bit(models_dir):
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ql.QwenVLError, match="pip install bitsandbytes"):
            load(models_dir, "tiny-qwen2.5-vl", quantization="4-bit")
        return
    model = load(models_dir, "tiny-qwen2.5-vl", quantization="4-bit")
    result = model.run(req([torch.rand(100, 100, 3)]))
    assert len(result.token_ids[0]) == 8


def test_compile_on_cuda_matches_eager_and_bounds_recompiles(models_dir):
    from qwenvl_fast.vision import tower_compile as vision_compile

    ok, why = vision_compile.compiler_status(torch.device("cuda"))
    if not ok:
        pytest.skip(f"no compiler: {why}")
    model = load(models_dir, "tiny-qwen2.5-vl")
    imgs = [torch.rand(200, 300, 3)]
    eager = model.run(req(imgs, enable_image_cache=False))
    model.set_compile("on")
    assert model.compile_report.enabled, model.compile_report.reason
    with vision_compile.count_recompiles() as counter:
        for h, w in [(200, 300), (300, 200), (512, 512), (120, 700), (640, 480)]:
            model.run(req([torch.rand(h, w, 3)], enable_image_cache=False))
    compiled = model.run(req(imgs, enable_image_cache=False))
    assert compiled.token_ids == eager.token_ids
    assert counter.recompiles <= 8, f"{counter.recompiles} recompiles over 5 sizes: {counter.reasons}"


def test_cuda_compiled_decode_is_on_matches_eager_and_reuses_its_graph(models_dir):
    """compile_decode=auto on CUDA: static cache + torch.compile; tokens equal eager decode (fp32); a second prompt
    length in the same bucket does not recompile."""
    if not importlib.util.find_spec("triton"):
        pytest.skip("no Triton: compiled decode stays off by design")
    torch._dynamo.reset()
    eager = load(models_dir, "tiny-qwen2.5-vl", dtype="fp32", compile_decode="off")
    imgs = [torch.rand(90, 120, 3)]
    prompts = ["What is this?", "Describe the colours of this picture in a few words, please."]
    want = [eager.run(req(imgs, prompt=p, enable_image_cache=False)).token_ids for p in prompts]
    ql.MANAGER.release()
    model = load(models_dir, "tiny-qwen2.5-vl", dtype="fp32", compile_decode="auto")
    assert model.decode_compile.enabled and model.decode_compile.compiled, model.decode_compile.reason
    from torch._dynamo.utils import counters

    got = []
    for i, p in enumerate(prompts):
        result = model.run(req(imgs, prompt=p, enable_image_cache=False))
        assert result.record.decode_compile == "on", result.record.decode_compile
        got.append(result.token_ids)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert got == want
    assert counters["stats"]["unique_graphs"] == graphs  # the second prompt length compiled nothing new


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_cuda_video_matches_the_processor_path_and_hits_the_cache(models_dir, family):
    from test_video import processor_inputs, target_hw

    from qwenvl_fast.core.api import VideoClip
    from qwenvl_fast.sources import tf_compat
    from qwenvl_fast.vision.video import sample_indices

    if tf_compat.transformers_version() < (5, 18):
        pytest.skip("video needs transformers >= 5.18")
    model = load(models_dir, family, dtype="fp32")
    h, w = target_hw(model)
    frames = (torch.rand(10, h, w, 3) * 255).to(torch.uint8)
    request = dict(videos=[VideoClip(frames, 5.0)], max_frames=6, prompt="What happens?", min_new_tokens=8)
    first = model.run(req([], **request))
    calls = model.vision_calls
    again = model.run(req([], **request))
    assert again.record.videos[0]["cache"] == "memory" and model.vision_calls == calls
    assert again.token_ids == first.token_ids
    inputs = processor_inputs(model, frames, 5.0, sample_indices(10, 6, 2), "What happens?")
    with torch.inference_mode():
        out = model.model.generate(**{k: v.to("cuda") for k, v in inputs.items()}, max_new_tokens=8,
                                   min_new_tokens=8, do_sample=False)
    assert first.token_ids[0] == out[0, inputs["input_ids"].shape[1]:].tolist()
