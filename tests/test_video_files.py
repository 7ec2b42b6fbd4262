"""Caption Folder with video files: real files written with PyAV, decoded with PyAV, captioned through the
model's video path beside the folder's images; a broken video file is reported and the folder goes on."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_FAMILIES, load_tiny
from qwenvl_fast import captioning
from qwenvl_fast import qwenvl_loader as ql
from qwenvl_fast.sources import tf_compat
from qwenvl_fast.vision import video

av = pytest.importorskip("av")
pytestmark = pytest.mark.skipif(tf_compat.transformers_version() < (5, 18) or "tiny-qwen2.5-vl" not in TINY_FAMILIES,
                                reason="video needs transformers >= 5.18")


def write_video(path, frames, fps=10, codec="ffv1"):
    """``frames`` uint8 [T,H,W,3] into a real video file (ffv1: lossless, so decoded frames can be compared)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def clip_frames(count=20, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(count, h, w, 3, generator=g) * 255).to(torch.uint8)


def test_load_video_file_samples_evenly_and_exactly(tmp_path):
    frames = clip_frames()
    path = tmp_path / "clip.mkv"
    write_video(path, frames, fps=10)
    clip = video.load_video_file(path, max_frames=6)
    assert clip.fps == pytest.approx(10.0)
    assert clip.source_total == 20
    assert clip.source_indices == video.sample_indices(20, 6, 2) == [0, 3, 6, 10, 13, 16]
    assert torch.equal(clip.frames, frames[clip.source_indices])  # lossless: exactly the sampled frames
    short = video.load_video_file(path, max_frames=64)
    assert short.frames.shape[0] == 20 and short.source_indices == list(range(20))


def test_caption_folder_with_videos(tmp_path, models_dir, cut_answers_count_as_complete):
    folder = tmp_path / "folder"
    folder.mkdir()
    frames = clip_frames(12, 56, 84, seed=1)
    write_video(folder / "b_clip.mkv", frames, fps=6)
    write_video(folder / "c_lossy.mp4", clip_frames(8, 64, 64, seed=2), fps=8, codec="mpeg4")
    (folder / "d_broken.mp4").write_bytes(b"not a video at all")
    from PIL import Image

    Image.fromarray(frames[0].numpy()).save(folder / "a_still.png")
    options = ql.LoadOptions(model=str(models_dir / "tiny-qwen2.5-vl"), dtype="fp32")
    request = ql.GenerationRequest(prompt="Caption.", max_new_tokens=6, min_new_tokens=6, image_quality="fast",
                                   max_frames=8, disk_cache=False)
    images_only = captioning.caption_folder(options, folder, request, write_txt=False)
    assert [r.path.name for r in images_only] == ["a_still.png"]
    results = captioning.caption_folder(options, folder, request, write_txt=True, include_videos=True)
    by_name = {r.path.name: r for r in results}
    assert [r.path.name for r in results] == ["a_still.png", "b_clip.mkv", "c_lossy.mp4", "d_broken.mp4"]
    assert by_name["b_clip.mkv"].status == by_name["c_lossy.mp4"].status == "written"
    assert by_name["d_broken.mp4"].status.startswith("error: cannot read video")
    assert (folder / "b_clip.txt").read_text(encoding="utf-8") == by_name["b_clip.mkv"].caption
    # the clip's caption is the video path's answer for the same sampled frames, not four separate images
    model = load_tiny(models_dir, "tiny-qwen2.5-vl", dtype="fp32")
    indices = video.sample_indices(12, 8, 2)
    direct = model.run(ql.GenerationRequest(
        prompt="Caption.", videos=[video.VideoClip(frames[indices], 6.0, source_indices=indices, source_total=12)],
        max_new_tokens=6, min_new_tokens=6, image_quality="fast", max_frames=8, enable_image_cache=False))
    assert direct.text == by_name["b_clip.mkv"].caption
    assert direct.record.videos[0]["frames"] == 8
    assert direct.text  # a non-empty answer: the equality above compares something


def test_cli_video_file_through_the_disk_cache_across_processes(tmp_path, models_dir, isolated_cache):
    """`cli.py --video`: a real file, decoded in one process, is a disk-cache hit in the next (same sampled frames)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "clip.mkv"
    write_video(path, clip_frames(14, 56, 84, seed=3), fps=7)
    cli = Path(__file__).resolve().parents[1] / "cli.py"
    cmd = [sys.executable, str(cli), "--model", str(models_dir / "tiny-qwen3-vl"), "--video", str(path),
           "--max-frames", "6", "--max-new-tokens", "4", "--quality", "fast", "--json"]
    env = {**os.environ, "QWENVL_FAST_CACHE_DIR": str(isolated_cache)}
    runs = []
    for _ in range(2):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    clips = [r["timing"]["videos"][0] for r in runs]
    assert runs[0]["timing"]["images"] == []  # no demo picture beside a video
    assert [c["cache"] for c in clips] == ["miss", "disk"]
    assert (clips[0]["frames"], clips[0]["source_frames"], clips[0]["fps"]) == (6, 14, 7.0)
    assert runs[0]["texts"] == runs[1]["texts"]
    bad = subprocess.run(cmd[:5] + [str(tmp_path / "missing.mp4")] + cmd[6:], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2 and "missing.mp4" in bad.stderr


class FileVideo:
    """The shape of ComfyUI's VideoFromFile (a path or BytesIO behind get_stream_source); its get_components, which
    decodes every frame to float32, must not be called for a file-backed VIDEO."""

    def __init__(self, source):
        self.source = source

    def get_stream_source(self):
        if hasattr(self.source, "seek"):
            self.source.seek(0)
        return self.source

    def get_components(self):
        raise AssertionError("get_components decodes the whole video; the sampled frames were enough")


def test_file_backed_video_decodes_only_the_sampled_frames(tmp_path):
    import io

    frames = clip_frames(20, 48, 64, seed=4)
    path = tmp_path / "clip.mkv"
    write_video(path, frames, fps=12)
    for source in (str(path), io.BytesIO(path.read_bytes())):
        clip = video.as_clip(FileVideo(source), 24.0, max_frames=8)
        assert clip.fps == pytest.approx(12.0) and clip.source_total == 20
        assert clip.source_indices == video.sample_indices(20, 8, 2)
        assert torch.equal(clip.frames, frames[clip.source_indices])


def test_file_backed_video_on_the_node_matches_the_same_frames_as_images(tmp_path, models_dir, monkeypatch):
    """Through the Run node: a file-backed VIDEO gives the clip (and the cache entry) of the same frames on `video`
    at the file's rate; a stream PyAV cannot read falls back to ComfyUI's own decoding."""
    monkeypatch.setenv("QWENVL_FAST_MODELS_DIR", str(models_dir))
    from qwenvl_fast import nodes

    frames = clip_frames(12, 56, 84, seed=5)
    path = tmp_path / "clip.mkv"
    write_video(path, frames, fps=6)
    base = dict(model="tiny-qwen2.5-vl", quantization="none", attention_mode="auto", prompt="What happens?",
                system_prompt="", image_quality="fast", enable_image_cache=True, max_new_tokens=4, do_sample=False,
                temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0, seed=0,
                batch_mode="one prompt, all images", keep_model_loaded=True, max_frames=6)
    as_file = nodes.QwenVLFastRun().run(video_clip=FileVideo(str(path)), **base)["result"]
    as_frames = nodes.QwenVLFastRun().run(video=frames.float() / 255.0, video_fps=6.0, **base)["result"]
    import json

    first, second = json.loads(as_file[2])["videos"][0], json.loads(as_frames[2])["videos"][0]
    assert (first["frames"], first["source_frames"], first["fps"]) == (6, 12, 6.0)
    assert first["cache"] == "miss" and second["cache"] == "memory"  # the same sampled frames, the same key
    assert as_file[0] == as_frames[0]

    class Unreadable(FileVideo):
        def get_components(self):
            from types import SimpleNamespace

            return SimpleNamespace(images=frames.float() / 255.0, frame_rate=6)

    fallback = nodes.QwenVLFastRun().run(video_clip=Unreadable(str(tmp_path / "nope.mp4")), **base)["result"]
    assert json.loads(fallback[2])["videos"][0]["cache"] == "memory" and fallback[0] == as_file[0]


def write_cut_mp4(path, frames, fps, keep=None):
    """An mp4 whose header (moov, written first) counts every frame, cut after the first ``keep`` frames' data
    (None: not cut): what a download or a recording cut short leaves."""
    full = path.with_name(path.stem + "-full.mp4")
    with av.open(str(full), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(full)) as container:
        starts = [p.pos for p in container.demux(container.streams.video[0]) if p.size]
    data = full.read_bytes()
    path.write_bytes(data if keep is None else data[:starts[keep]])


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_a_video_whose_header_overstates_its_frames_is_timed_by_the_frames_it_has(tmp_path, models_dir, family):
    """16 frames claimed, 10 decodable: sampled, timed and given second_per_grid_ts as the 10-frame video it is."""
    if family not in TINY_FAMILIES:
        pytest.skip(f"needs {family}")
    from qwenvl_fast.perf_monitor import RunMonitor

    frames = clip_frames(16, 64, 96, seed=6)
    cut = tmp_path / "cut.mp4"
    write_cut_mp4(cut, frames, fps=10, keep=10)
    with av.open(str(cut)) as container:
        stream = container.streams.video[0]
        assert stream.frames == 16  # the header still claims them all
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == 10
    clip = video.load_video_file(cut, max_frames=8)
    assert clip.source_total == 10 and clip.source_indices == video.sample_indices(10, 8, 2) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert torch.equal(clip.frames, torch.stack([torch.from_numpy(decoded[i]) for i in clip.source_indices]))

    truthful = tmp_path / "ten.mp4"
    write_cut_mp4(truthful, frames[:10], fps=10)  # whole: a header that counts its 10 frames
    honest = video.load_video_file(truthful, max_frames=8)
    assert (honest.source_total, honest.source_indices) == (10, clip.source_indices)

    model = load_tiny(models_dir, family, dtype="fp32")

    def prompt_inputs(c):
        [prepared] = video.prepare_videos([c], "fast", 8, model.image_spec, None, RunMonitor(enabled=False))
        return prepared, model.build_inputs("What happens?", "", [], [prepared])

    prepared, inputs = prompt_inputs(clip)
    _, honest_inputs = prompt_inputs(honest)
    assert torch.equal(inputs["input_ids"], honest_inputs["input_ids"])
    assert prepared.times == pytest.approx([0.05, 0.25, 0.55, 0.75])  # (first + last frame of a patch) / 2 / fps
    if family == "tiny-qwen2.5-vl":
        # 8 of 10 frames at 10 fps: 8 frames a second sampled, 2 per temporal patch (not 2 / (4 / 16 * 10) = 0.8)
        assert inputs["second_per_grid_ts"].tolist() == pytest.approx([0.25])
        assert honest_inputs["second_per_grid_ts"].tolist() == pytest.approx([0.25])
    else:
        text = model.tokenizer.decode(inputs["input_ids"][0])
        assert [f"<{t:.1f} seconds>" in text for t in (0.05, 0.25, 0.55, 0.75)] == [True] * 4
        assert "<1.5 seconds>" not in text
