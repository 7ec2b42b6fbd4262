"""Video through the model's own video path (video.py): a clip is sampled, sized by a budget for the whole clip,
encoded in chunks and cached; the pack's answers and embeddings equal those of transformers' processor + model
path on every tiny family that takes video; a repeated clip skips the vision tower (memory and disk tiers);
a new question about a seen clip reuses its prefix; cancel works between chunks."""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_FAMILIES, load_tiny
from qwenvl_fast import embedding_cache as ec
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.core.errors import GenerationInterrupted, QwenVLError
from qwenvl_fast.sources import tf_compat
from qwenvl_fast.vision import fast_preprocess, video

pytestmark = pytest.mark.skipif(tf_compat.transformers_version() < (5, 18),
                                reason="video needs transformers >= 5.18 (mm_encoder_outputs)")
FAMILIES = [f for f in ("tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-qwen2-vl", "tiny-qwen3-vl-moe", "tiny-qwen3.5")
            if f in TINY_FAMILIES]
TIMESTAMPED = ("qwen3",)  # families whose prompt carries "<t seconds>" per temporal patch


def frames_u8(count, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(count, h, w, 3, generator=g) * 255).to(torch.uint8)


def target_hw(model):
    """A frame size both paths keep as is: a multiple of the factor, within the `fast` per-frame budget."""
    f = model.image_spec.factor
    return 10 * f, 14 * f  # 140 tokens per temporal patch


def ask(model, clip, prompt="What happens in this video?", images=(), **overrides):
    base = dict(prompt=prompt, videos=[clip], images=list(images), max_frames=6, max_new_tokens=8,
                min_new_tokens=8, image_quality="fast", disk_cache=False, monitor=True)
    base.update(overrides)
    return model.run(ql.GenerationRequest(**base))


def processor_inputs(model, clip_frames, fps, indices, prompt, images=(), size=None):
    """transformers' own path: chat template + the model's processor over the sampled frames (uint8 TCHW)."""
    from transformers.video_utils import VideoMetadata

    content = [{"type": "image"} for _ in images] + [{"type": "video"}, {"type": "text", "text": prompt}]
    text = model.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
    if model.family.model_type.startswith(TIMESTAMPED):
        # Qwen's processors replace the template's whole <|vision_start|><|video_pad|><|vision_end|> slot with the
        # per-patch spans; the refactored processor of transformers 5.24 replaces only the pad and so nests
        # vision markers. Handing it the bare pad gives the official prompt.
        text = text.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")
    metadata = VideoMetadata(total_num_frames=int(clip_frames.shape[0]), fps=fps, frames_indices=list(indices))
    kwargs = dict(size=size) if size is not None else {}
    if model.family.model_type.startswith(TIMESTAMPED) and size is None:
        kwargs["size"] = {"shortest_edge": 1, "longest_edge": 10 ** 9}  # its budget counts all frames: no resize
    return model.processor(
        text=[text], images=[im.numpy() for im in images] or None,
        videos=[clip_frames[list(indices)].permute(0, 3, 1, 2)], video_metadata=[metadata],
        do_sample_frames=False, return_tensors="pt", cap_pixels_per_frame=False, **kwargs)


def reference_ids(model, inputs, new=8):
    with torch.inference_mode():
        out = model.model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_equals_transformers_video_path(models_dir, family):
    model = load_tiny(models_dir, family, dtype="fp32")
    h, w = target_hw(model)
    clip = frames_u8(10, h, w, seed=1)
    result = ask(model, video.VideoClip(clip, 5.0))
    rec = result.record.videos[0]
    indices = video.sample_indices(10, 6, model.family.temporal_patch_size)
    assert rec["frames"] == 6 and rec["source_frames"] == 10 and rec["size_resized"] == [h, w]
    inputs = processor_inputs(model, clip, 5.0, indices, "What happens in this video?")
    assert inputs["video_grid_thw"].tolist() == [[3, h // model.family.patch_size, w // model.family.patch_size]]
    assert result.record.prompt_tokens == inputs["input_ids"].shape[1]
    assert result.token_ids[0] == reference_ids(model, inputs), f"{family}: the pack's video answer differs"
    assert rec["tokens"] == 3 * rec["tokens_per_frame_pair"] == 3 * 140


def test_resized_clip_equals_processor_pixels_and_answer(models_dir):
    """A clip that must be resized: the per-frame limits of the clip budget, given to the processor, give its
    size; pixels are bit-identical and the answers equal (Qwen2.5-VL's processor budgets per frame)."""
    model = load_tiny(models_dir, "tiny-qwen2.5-vl", dtype="fp32")
    clip = frames_u8(9, 150, 250, seed=2)
    result = ask(model, video.VideoClip(clip, 3.0), max_frames=4)
    indices = video.sample_indices(9, 4, 2)
    assert indices == [0, 2, 4, 6]
    budget, _ = video.clip_budget("fast", model.image_spec.factor, 2)
    size = {"shortest_edge": budget.min_pixels, "longest_edge": budget.max_pixels}
    inputs = processor_inputs(model, clip, 3.0, indices, "What happens in this video?", size=size)
    rec = result.record.videos[0]
    t, gh, gw = inputs["video_grid_thw"][0].tolist()
    assert [gh * 14, gw * 14] == rec["size_resized"] != [150, 250]
    ours, grid = fast_preprocess.preprocess_video(
        [clip[i] for i in indices], tuple(rec["size_resized"]), patch_size=14, merge_size=2, temporal_patch_size=2,
        image_mean=model.image_spec.image_mean, image_std=model.image_spec.image_std, device="cpu")
    assert grid.tolist() == inputs["video_grid_thw"].tolist()
    assert torch.equal(ours, inputs["pixel_values_videos"])
    assert result.token_ids[0] == reference_ids(model, inputs)
    # Qwen2.5-VL places the clip in time with second_per_grid_ts: 2 frames every 2 source frames at 3 fps
    assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2 / (4 / 9 * 3.0)])


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_embedding_equals_model_video_features_and_chunks_agree(models_dir, family, monkeypatch):
    model = load_tiny(models_dir, family, dtype="fp32")
    h, w = target_hw(model)
    clip = frames_u8(12, h, w, seed=3)
    indices = video.sample_indices(12, 12, 2)
    inputs = processor_inputs(model, clip, 6.0, indices, "x")
    with torch.inference_mode():
        theirs = model.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    reference = torch.cat(list(theirs.pooler_output))
    embeddings = {}
    for chunk in (1, 4, 100):  # 6 temporal patches in chunks of 1, 4 (4 + 2) and all at once
        monkeypatch.setattr(video, "ENCODE_CHUNK_PATCHES", chunk)
        monkeypatch.setattr(video.chunk_bounds, "__defaults__", (chunk,))
        calls = model.vision_calls
        result = ask(model, video.VideoClip(clip, 6.0), max_frames=12, enable_image_cache=True, disk_cache=False)
        assert model.vision_calls - calls == len(video.chunk_bounds(6))
        assert result.record.videos[0]["cache"] == "miss"
        cached = ec.get_cache(False).get(_clip_key(model, clip, 6.0, 12), model.device)[0]
        embeddings[chunk] = cached
        ec.clear_memory_caches()
    for chunk, emb in embeddings.items():
        assert emb.grid == (6, h // model.family.patch_size, w // model.family.patch_size)
        assert torch.allclose(emb.embeds, reference, atol=1e-5, rtol=1e-4), f"chunk {chunk} differs from the model"
        if model.family.deepstack_levels:
            ref_deep = [torch.cat(list(level)) if isinstance(level, (list, tuple)) else level
                        for level in theirs.deepstack_features]
            assert len(emb.deepstack) == len(ref_deep)
            for ours, ref in zip(emb.deepstack, ref_deep):
                assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)


def _clip_key(model, frames, fps, max_frames, quality="fast"):
    from qwenvl_fast.perf_monitor import RunMonitor

    prepared = video.prepare_videos([video.VideoClip(frames, fps)], quality, max_frames, model.image_spec,
                                    ec.get_cache(False), RunMonitor(enabled=False), model.cache_key_extra)
    return prepared[0].key


def test_repeated_clip_skips_the_vision_tower_memory_and_disk(models_dir):
    model = load_tiny(models_dir, "tiny-qwen3-vl", dtype="fp32")
    h, w = target_hw(model)
    clip = video.VideoClip(frames_u8(8, h, w, seed=4).float() / 255.0, 8.0)  # a ComfyUI IMAGE batch (float)
    first = ask(model, clip, disk_cache=True)
    calls = model.vision_calls
    second = ask(model, clip, disk_cache=True, prompt="Another question?")
    assert second.record.videos[0]["cache"] == "memory" and model.vision_calls == calls
    ec.clear_memory_caches()
    third = ask(model, clip, disk_cache=True)
    assert third.record.videos[0]["cache"] == "disk" and model.vision_calls == calls
    assert third.token_ids == first.token_ids
    # what changes the clip's embedding misses: other sampling, other frames, another preset
    assert ask(model, clip, max_frames=4).record.videos[0]["cache"] == "miss"
    other = video.VideoClip(clip.frames.flip(0), 8.0)
    assert ask(model, other).record.videos[0]["cache"] == "miss"
    balanced = ask(model, clip, image_quality="balanced").record.videos[0]
    # 3 frame pairs: `fast` allows 256 tokens a pair, `balanced` 512, so the frames are sized apart: another key
    assert balanced["size_resized"] != first.record.videos[0]["size_resized"] and balanced["cache"] == "miss"


def test_new_question_on_a_seen_clip_reuses_its_prefix(models_dir):
    model = load_tiny(models_dir, "tiny-qwen2.5-vl", dtype="fp32")
    if model.prefix_reuse_off_reason:
        pytest.skip(model.prefix_reuse_off_reason)
    h, w = target_hw(model)
    clip = video.VideoClip(frames_u8(8, h, w, seed=5), 4.0)
    questions = ["What happens?", "Describe the motion in this clip, please."]
    refs = [ask(model, clip, q, enable_image_cache=False).token_ids for q in questions]
    first = ask(model, clip, questions[0])
    assert first.token_ids == refs[0] and first.record.prefix_tokens_prefilled > 0
    second = ask(model, clip, questions[1])
    assert second.record.prefix_tokens_reused == first.record.prefix_tokens_prefilled
    assert second.token_ids == refs[1]


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_images_and_a_video_in_one_prompt(models_dir, family):
    model = load_tiny(models_dir, family, dtype="fp32")
    h, w = target_hw(model)
    clip = frames_u8(6, h, w, seed=6)
    pictures = [frames_u8(1, h, w, seed=7)[0], frames_u8(1, w, h, seed=8)[0]]
    result = ask(model, video.VideoClip(clip, 2.0), images=pictures, prompt="Compare.")
    assert len(result.record.images) == 2 and len(result.record.videos) == 1
    inputs = processor_inputs(model, clip, 2.0, video.sample_indices(6, 6, 2), "Compare.", images=pictures)
    assert result.token_ids[0] == reference_ids(model, inputs)


def test_cancel_between_chunks_leaves_the_model_usable(models_dir, monkeypatch):
    model = load_tiny(models_dir, "tiny-qwen2.5-vl", dtype="fp32")
    monkeypatch.setattr(video.chunk_bounds, "__defaults__", (1,))
    h, w = target_hw(model)
    clip = video.VideoClip(frames_u8(8, h, w, seed=9), 4.0)
    progress = []
    stop = {"now": False}

    def on_progress(done, total):
        progress.append((done, total))
        stop["now"] = True  # cancel after the first chunk

    calls = model.vision_calls
    with pytest.raises(GenerationInterrupted):
        ask(model, clip, max_frames=8, on_progress=on_progress, should_stop=lambda: stop["now"])
    assert model.vision_calls - calls == 1 and progress == [(1, 4)]
    assert ec.get_cache(False).memory.get(_clip_key(model, clip.frames, 4.0, 8)) is None
    done = ask(model, clip, max_frames=8)  # nothing half-cached, the model answers
    assert done.record.videos[0]["cache"] == "miss" and len(done.token_ids[0]) == 8


def test_sampling_budget_and_inputs():
    assert video.sample_indices(10, 6, 2) == [0, 1, 3, 5, 6, 8]
    assert video.sample_indices(10, 7, 2) == video.sample_indices(10, 6, 2)  # a multiple of the temporal patch
    assert video.sample_indices(3, 16, 2) == [0, 1]
    assert video.sample_indices(1, 16, 2) == [0]
    assert video.sample_indices(100, 16, 2) == [round(i * 6.25 - 0.49) for i in range(16)]
    with pytest.raises(QwenVLError):
        video.sample_indices(0, 16, 2)
    with pytest.raises(QwenVLError):
        video.sample_indices(10, 0, 2)
    # the whole clip within its budget; fewer tokens per frame as frames are added
    from qwenvl_fast import quality_presets as qp

    for preset in ("fast", "balanced", "high", "ultra"):
        per_frame = []
        for patches in (1, 2, 4, 8, 16, 32):
            budget, clip_tokens = video.clip_budget(preset, 28, patches)
            h, w = qp.target_size(1080, 1920, 28, budget)
            tokens = (h // 28) * (w // 28)
            per_frame.append(tokens)
            if clip_tokens // patches >= 2 * video.MIN_FRAME_TOKENS:
                assert tokens * patches <= clip_tokens, (preset, patches, tokens)
        assert per_frame == sorted(per_frame, reverse=True) and per_frame[0] > per_frame[-1]
    assert video.timestamps([0, 1, 3, 5, 6, 8], 5.0, 2) == pytest.approx([0.1, 0.8, 1.4])


def test_node_style_inputs_and_errors(models_dir):
    clip = video.as_clip(torch.rand(4, 32, 32, 3), 12.0)
    assert clip.fps == 12.0 and clip.frames.shape[0] == 4
    comfy_video = SimpleNamespace(get_components=lambda: SimpleNamespace(
        images=torch.rand(5, 32, 32, 3), audio=None, frame_rate=Fraction(30000, 1001)))
    assert video.as_clip(comfy_video, 24.0).fps == pytest.approx(29.97, abs=1e-2)
    assert video.as_clip(None) is None
    with pytest.raises(QwenVLError):
        video.as_clip(torch.rand(2, 3, 4, 5, 6))
    model = load_tiny(models_dir, "tiny-qwen2.5-vl", dtype="fp32")
    with pytest.raises(QwenVLError, match="video_fps"):
        ask(model, video.VideoClip(torch.rand(4, 56, 56, 3), 0.0))
    with pytest.raises(QwenVLError, match="one answer per image"):
        ask(model, video.VideoClip(torch.rand(4, 56, 56, 3), 8.0), images=[torch.rand(56, 56, 3)] * 2,
            batch_mode="one answer per image")
    assert ask(model, video.VideoClip(torch.rand(4, 56, 56, 3), 8.0)).record.videos  # still usable
