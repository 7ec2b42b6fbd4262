"""Video files at the edges: a file with no frames is a clear error, and frames are kept small while decoding.

Real files written with PyAV (FFmpeg): an AVI and a Matroska file with a video stream and no frame, and a
1920x1080 lossless clip sampled to many frames.
"""

from __future__ import annotations

import numpy as np
import pytest

from qwenvl_fast.core.errors import QwenVLError
from qwenvl_fast.vision import video

av = pytest.importorskip("av")


def _write(path, frames: list[np.ndarray], codec: str = "ffv1", size: tuple[int, int] = (64, 48)) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height = size
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        container.start_encoding()  # the header even when no frame follows
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize(("name", "codec"), [("empty.avi", "mpeg4"), ("empty.mkv", "ffv1")])
def test_a_video_with_no_frames_is_a_clear_error(tmp_path, name, codec):
    path = tmp_path / name
    _write(path, [], codec)
    with pytest.raises(QwenVLError) as err:
        video.load_video_file(path, 8)
    message = str(err.value)
    assert name in message and ("empty" in message or "0 frames" in message), message


def test_long_high_resolution_clips_are_downscaled_as_they_are_decoded(tmp_path):
    path = tmp_path / "hd.mkv"
    levels = [i * 6 for i in range(40)]
    _write(path, [np.full((1080, 1920, 3), v, np.uint8) for v in levels], size=(1920, 1080))
    few = video.load_video_file(path, 2)  # one temporal patch: a preset can use a full 1080p frame, so kept whole
    assert tuple(few.frames.shape) == (2, 1080, 1920, 3)
    many = video.load_video_file(path, 40)
    t, h, w, _ = many.frames.shape
    with av.open(str(path)) as container:
        bound = video._frame_limit(container.streams.video[0], 40, 2)
    assert t == 40 and h * w <= bound < 1920 * 1080  # bounded while decoding, not after
    assert abs(w / h - 1920 / 1080) < 0.01  # the aspect is kept
    assert [int(many.frames[i, 0, 0, 0]) for i in range(t)] == levels  # the right frames, in order
    assert many.source_indices == list(range(40))


def test_the_bound_is_twice_the_largest_frame_any_preset_makes():
    class Stream:
        frames = 768

    bound = video._frame_limit(Stream(), 768, 2)
    largest = max(video.clip_budget(p, 32, 384)[0].max_pixels for p in video.VIDEO_CLIP_TOKENS)
    assert bound == 2 * largest
    # 768 sampled 4K frames would be about 19 GB as RGB; at the bound they are a few hundred MB at most
    assert 768 * bound * 3 < 400 << 20
