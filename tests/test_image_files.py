"""Image files for Caption Folder and the CLI (``images.load_image_file``), on real files written here: the pixel
limit is checked from the header before decoding (a JPEG is decoded reduced instead), 16-bit, 32-bit and float
images load at their true values, transparency is composited onto white like the node does, and an 8-bit image
comes back as uint8 with the same cache key and answer as its float version. Video files get the same limit."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from conftest import TINY_FAMILIES, load_tiny, tiny_request
from qwenvl_fast import embedding_cache as ec
from qwenvl_fast.core.errors import QwenVLError
from qwenvl_fast.vision import images, video

ENV = images.MAX_IMAGE_PIXELS_ENV


@pytest.fixture(autouse=True)
def default_limit(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


@pytest.fixture
def decodes(monkeypatch):
    """Counts Pillow decodes (``ImageFile.load`` calls that actually read pixel data)."""
    calls = []
    real = ImageFile.ImageFile.load

    def counting(self):
        if getattr(self, "tile", None):  # there is still data to decode
            calls.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting)
    return calls


def legacy_float(path) -> torch.Tensor:
    """What Caption Folder's loader returned before: float32 RGB(A) in [0, 1], alpha kept for the node."""
    with Image.open(path) as im:
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).float() / 255.0


def random_rgb(h=48, w=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# -- the pixel limit -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """12000 x 12000 (144 Mpx) that compresses to a few hundred KB."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("L", (12000, 12000), 0).save(path)
    assert path.stat().st_size < 1 << 20
    return path


def test_default_limit_lets_8192_square_through_and_refuses_12000_square():
    assert 8192 * 8192 <= images.DEFAULT_MAX_IMAGE_PIXELS < 12000 * 12000
    assert images.max_image_pixels() == images.DEFAULT_MAX_IMAGE_PIXELS
    images.check_pixel_limit("a.png", 8192, 8192)
    with pytest.raises(images.ImageTooLargeError):
        images.check_pixel_limit("a.png", 12000, 12000)


def test_a_huge_png_is_refused_before_it_is_decoded(huge_png, decodes):
    with pytest.raises(images.ImageTooLargeError) as err:
        images.load_image_file(huge_png)
    message = str(err.value)
    assert isinstance(err.value, QwenVLError)
    for part in ("'huge.png'", "12000x12000", "144.0 megapixels", "limit for an image file of 89,478,485 pixels",
                 ENV, "not decoded"):
        assert part in message, (part, message)
    assert decodes == []


def test_an_8192_square_png_decodes_under_the_default_limit(tmp_path, decodes):
    path = tmp_path / "big.png"
    Image.new("L", (8192, 8192), 77).save(path)
    t = images.load_image_file(path)
    assert t.shape == (8192, 8192, 3) and t.dtype == torch.uint8
    assert int(t[0, 0, 0]) == 77 and int(t[-1, -1, 2]) == 77
    assert decodes == [(8192, 8192)]


def test_the_limit_follows_the_environment_variable(tmp_path, monkeypatch, decodes):
    path = tmp_path / "p.png"
    Image.fromarray(random_rgb(30, 40)).save(path)  # 1,200 pixels
    monkeypatch.setenv(ENV, "1199")
    with pytest.raises(images.ImageTooLargeError, match=r"40x30 .* limit"):
        images.load_image_file(path)
    assert decodes == []
    monkeypatch.setenv(ENV, "1_200")
    assert images.load_image_file(path).shape == (30, 40, 3)
    monkeypatch.setenv(ENV, "0")  # no limit
    assert images.max_image_pixels() == 0 and images.load_image_file(path).shape == (30, 40, 3)
    assert images.load_image_file(path, max_pixels=0).shape == (30, 40, 3)
    with pytest.raises(images.ImageTooLargeError):
        images.load_image_file(path, max_pixels=100)  # an explicit limit wins over the variable
    monkeypatch.setenv(ENV, "lots")
    with pytest.raises(QwenVLError, match=f"{ENV}='lots' is not a pixel count"):
        images.load_image_file(path)


def test_a_jpeg_over_the_limit_is_decoded_reduced_to_fit(tmp_path, caplog, decodes):
    yy, xx = np.mgrid[0:800, 0:1000]
    rgb = np.stack([xx * 255 // 999, yy * 255 // 799, (xx + yy) * 255 // 1798], -1).astype(np.uint8)
    path = tmp_path / "wide.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    full = images.load_image_file(path, max_pixels=0)
    assert full.shape == (800, 1000, 3)
    with caplog.at_level(logging.INFO, logger="QwenVL-Fast"):
        half = images.load_image_file(path, max_pixels=300_000)
        eighth = images.load_image_file(path, max_pixels=12_500)
    assert half.shape == (400, 500, 3) and half.dtype == torch.uint8  # 1/2 is enough for 300,000
    assert eighth.shape == (100, 125, 3)  # 1/4 (50,000) is not enough for 12,500: 1/8
    with pytest.raises(images.ImageTooLargeError, match="even decoded at 1/8 size"):
        images.load_image_file(path, max_pixels=12_000)
    assert decodes == [(1000, 800), (500, 400), (125, 100)]  # the refused one was not decoded
    with Image.open(path) as im:  # libjpeg's own reduced decode, exactly
        im.draft("RGB", (500, 400))
        assert torch.equal(half, torch.from_numpy(np.asarray(im).copy()))
    # The same picture, only smaller: close to the full decode averaged over 2x2 blocks.
    pooled = full.float().reshape(400, 2, 500, 2, 3).mean((1, 3))
    assert (half.float() - pooled).abs().mean() < 2.0
    notes = [r.getMessage() for r in caplog.records if "decoded at" in r.getMessage()]
    assert len(notes) == 2 and notes[0].startswith("[QwenVL-Fast]") and "(1/2)" in notes[0]


def test_a_huge_png_renamed_mp4_is_refused_before_decoding(huge_png, tmp_path, monkeypatch):
    pytest.importorskip("av")
    fake = tmp_path / "clip.mp4"
    shutil.copy(huge_png, fake)

    def no_decoding(*args, **kwargs):
        raise AssertionError("frames were decoded")

    with monkeypatch.context() as m:
        m.setattr(video, "_decode_frames", no_decoding)
        with pytest.raises(images.ImageTooLargeError) as err:
            video.load_video_file(fake, max_frames=16)
    for part in ("'clip.mp4'", "12000x12000", "video frame", ENV):
        assert part in str(err.value)
    small = tmp_path / "small.mp4"  # a still image under the limit still opens as a one-frame clip
    Image.fromarray(random_rgb(48, 64)).save(tmp_path / "small.png")
    shutil.copy(tmp_path / "small.png", small)
    clip = video.load_video_file(small, max_frames=16)
    assert torch.equal(clip.frames[0], torch.from_numpy(random_rgb(48, 64)))


def test_a_file_backed_video_over_the_limit_is_not_decoded_by_comfyui_instead(huge_png, tmp_path):
    """A VIDEO input (Load Video) whose frames are over the limit is refused; ComfyUI's whole-clip decode, the
    fallback for streams PyAV cannot read, is never called for it."""
    pytest.importorskip("av")
    fake = tmp_path / "clip.mp4"
    shutil.copy(huge_png, fake)

    class FileVideo:  # the two methods of ComfyUI's VideoInput that as_clip uses
        def get_stream_source(self):
            return str(fake)

        def get_components(self):
            raise AssertionError("ComfyUI's whole-clip decode was called for a frame over the limit")

    with pytest.raises(images.ImageTooLargeError):
        video.as_clip(FileVideo(), max_frames=16)


def test_a_real_video_over_the_limit_is_refused(tmp_path, monkeypatch):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mkv"
    frames = np.random.default_rng(0).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    with pytest.raises(images.ImageTooLargeError, match=r"64x48"):
        video.load_video_file(path, max_frames=4, max_pixels=64 * 48 - 1)
    monkeypatch.setenv(ENV, str(64 * 48 - 1))
    with pytest.raises(images.ImageTooLargeError):
        video.load_video_file(path, max_frames=4)
    monkeypatch.setenv(ENV, "0")
    assert torch.equal(video.load_video_file(path, max_frames=4).frames, torch.from_numpy(frames))


# -- true values ---------------------------------------------------------------------------------------------


def test_16_bit_grey_png_keeps_its_values(tmp_path):
    values = np.linspace(0, 65535, 64 * 96).round().astype(np.uint16).reshape(64, 96)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")
    t = images.load_image_file(path)
    assert t.dtype == torch.float32 and t.shape == (64, 96, 1)
    assert torch.equal(t[..., 0], torch.from_numpy(values.astype(np.float32) / np.float32(65535.0)))
    assert float(t.mean()) == pytest.approx(0.5, abs=1e-4)  # the old loader clipped this to 0.998
    assert float(t.min()) == 0.0 and float(t.max()) == 1.0
    # Older Pillow opens a 16-bit PNG as mode "I": the same values.
    with Image.open(path) as im:
        as_i = im.convert("I")
        as_i.format = "PNG"
        assert torch.equal(images._image_to_tensor(as_i, "g16.png"), t)


def test_16_bit_big_endian_tiff_keeps_its_values(tmp_path):
    values = np.array([[0, 1000, 32768], [40000, 65534, 65535]], dtype=">u2")
    path = tmp_path / "g16b.tif"
    Image.frombytes("I;16B", (3, 2), values.tobytes()).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16B"
    t = images.load_image_file(path)
    assert torch.equal(t[..., 0], torch.from_numpy(values.astype(np.float32) / np.float32(65535.0)))


def test_32_bit_integer_tiff_uses_the_full_range(tmp_path):
    values = np.array([[-5, 0, 1 << 30, (1 << 31) - 1]], dtype=np.int32)
    path = tmp_path / "i32.tif"
    Image.fromarray(values, mode="I").save(path)
    t = images.load_image_file(path)
    assert t.shape == (1, 4, 1) and t.dtype == torch.float32
    assert t[0, :, 0].tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0], abs=1e-6)


def test_float_tiff_is_clamped_to_0_1_not_black(tmp_path):
    values = np.linspace(-0.5, 1.5, 5 * 8, dtype=np.float32).reshape(5, 8)
    path = tmp_path / "f.tif"
    Image.fromarray(values, mode="F").save(path)
    t = images.load_image_file(path)
    assert t.dtype == torch.float32 and t.shape == (5, 8, 1)
    assert torch.equal(t[..., 0], torch.from_numpy(np.clip(values, 0.0, 1.0)))
    assert float(t.mean()) > 0.4  # the old loader's uint8 conversion made it black
    nan = values.copy()
    nan[2, 3] = np.nan
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(QwenVLError, match="NaN or infinite"):
        images.load_image_file(tmp_path / "nan.tif")


# -- transparency: composited onto white like the node ---------------------------------------------------------


def test_palette_png_transparent_index_is_white(tmp_path):
    im = Image.new("P", (6, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    im.putpixel((2, 1), 1)
    path = tmp_path / "p.png"
    im.save(path, transparency=0)
    t = images.load_image_file(path)
    assert t.dtype == torch.uint8 and t.shape == (4, 6, 3)
    assert t[0, 0].tolist() == [255, 255, 255]  # the transparent index: white, not black
    assert t[1, 2].tolist() == [255, 0, 0]
    assert int((t == 255).all(-1).sum()) == 23


def test_gif_transparency_and_only_the_first_frame(tmp_path):
    first = Image.new("P", (5, 5), 0)
    first.putpalette([0, 0, 0, 0, 0, 255, 0, 255, 0] + [0, 0, 0] * 253)
    first.putpixel((0, 0), 1)
    second = first.copy()
    second.paste(2, (0, 0, 5, 5))
    path = tmp_path / "anim.gif"
    first.save(path, save_all=True, append_images=[second], transparency=0, duration=100, disposal=2)
    t = images.load_image_file(path)
    assert t[0, 0].tolist() == [0, 0, 255] and t[4, 4].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA-like"])
def test_alpha_is_composited_exactly_like_the_node(tmp_path, mode):
    rng = np.random.default_rng(3)
    if mode == "LA":
        arr = rng.integers(0, 256, (20, 30, 2), dtype=np.uint8)
        im = Image.fromarray(arr, mode="LA")
    else:
        arr = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
        arr[0, 0, 3] = 0
        arr[0, 1, 3] = 255
        im = Image.fromarray(arr, mode="RGBA")
        if mode == "PA-like":  # a palette image with per-entry alpha (tRNS with many values), as PNG writes it
            im = im.quantize(64)
            im.info["transparency"] = bytes(range(0, 256, 4))
    path = tmp_path / f"{mode}.png"
    im.save(path, **({"transparency": im.info["transparency"]} if mode == "PA-like" else {}))
    t = images.load_image_file(path)
    assert t.dtype == torch.uint8 and t.shape == (20, 30, 3)
    # The node gets the float RGBA (or grey+alpha) and composites in canonicalize_image: the same bytes.
    with Image.open(path) as reopened:
        rgba = reopened.convert("RGBA")
        node_input = torch.from_numpy(np.asarray(rgba).copy()).float() / 255.0
    assert torch.equal(images.canonicalize_image(node_input), images.canonicalize_image(t))
    assert torch.equal(images.canonicalize_image(t), t)
    if mode == "RGBA":
        assert t[0, 0].tolist() == [255, 255, 255] and t[0, 1].tolist() == arr[0, 1, :3].tolist()


def test_large_rgba_is_composited_in_blocks_identically(tmp_path):
    arr = np.random.default_rng(4).integers(0, 256, (700, 6100, 4), dtype=np.uint8)  # several blocks of rows
    t = images._composite_on_white(torch.from_numpy(arr))
    whole = torch.from_numpy(arr).float() / 255.0
    assert torch.equal(t, images.canonicalize_image(whole)[: 700, : 6100])


# -- orientation, frames, broken files ----------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    arr = random_rgb(20, 40, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    path = tmp_path / "sideways.png"
    Image.fromarray(arr).save(path, exif=exif)
    t = images.load_image_file(path)
    assert t.shape == (40, 20, 3)
    assert torch.equal(t, torch.from_numpy(np.rot90(arr, k=-1).copy()))


def test_multi_page_tiff_gives_its_first_page(tmp_path):
    pages = [Image.fromarray(random_rgb(10, 12, seed=s)) for s in range(3)]
    path = tmp_path / "pages.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert torch.equal(images.load_image_file(path), torch.from_numpy(random_rgb(10, 12, seed=0)))


def test_broken_and_truncated_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(QwenVLError, match="Cannot read the image 'junk.png'"):
        images.load_image_file(tmp_path / "junk.png")
    Image.fromarray(random_rgb(200, 200)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(QwenVLError, match="'cut.png'"):
        images.load_image_file(tmp_path / "cut.png")


# -- uint8 and its float version: the same canonical bytes, key and answer -------------------------------------


def test_uint8_and_float_of_the_same_file_give_the_same_digest(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(random_rgb(37, 53, seed=6)).save(path)
    u8 = images.load_image_file(path)
    f32 = legacy_float(path)
    assert u8.dtype == torch.uint8 and u8.element_size() * 4 == f32.element_size()
    assert torch.equal(images.canonicalize_image(u8), images.canonicalize_image(f32))
    assert ec.canonical_digest(images.canonicalize_image(u8)) == ec.canonical_digest(images.canonicalize_image(f32))
    every_value = torch.arange(256, dtype=torch.uint8).reshape(16, 16, 1).expand(16, 16, 3)
    assert torch.equal(images.canonicalize_image(every_value.float() / 255.0), every_value)


@pytest.mark.skipif("tiny-qwen2.5-vl" not in TINY_FAMILIES, reason="needs the tiny Qwen2.5-VL")
@pytest.mark.parametrize("kind", ["rgb", "rgba", "grey"])
def test_uint8_file_and_its_float_version_share_the_cache_entry_and_the_answer(models_dir, tmp_path, kind):
    arr = random_rgb(90, 120, seed=7)
    if kind == "rgba":
        alpha = np.random.default_rng(8).integers(0, 256, (90, 120, 1), dtype=np.uint8)
        im = Image.fromarray(np.concatenate([arr, alpha], -1), mode="RGBA")
    elif kind == "grey":
        im = Image.fromarray(arr[..., 0], mode="L")
    else:
        im = Image.fromarray(arr)
    path = tmp_path / f"{kind}.png"
    im.save(path)
    model = load_tiny(models_dir, "tiny-qwen2.5-vl")
    old = model.run(tiny_request([legacy_float(path)]))
    new = model.run(tiny_request([images.load_image_file(path)]))
    assert old.record.images[0]["cache"] == "miss"
    assert new.record.images[0]["cache"] == "memory"  # the same cache key
    assert new.token_ids == old.token_ids
    ec.clear_memory_caches()
    uncached = model.run(tiny_request([images.load_image_file(path)], enable_image_cache=False))
    assert uncached.token_ids == old.token_ids
