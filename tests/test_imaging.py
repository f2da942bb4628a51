"""Every decoding case of issue 2 §5: orientation, modes, bit depths, bombs, corrupt files, masks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from raydefect.errors import CorruptImageError, ImageTooLargeError
from raydefect.imaging import decode_image, decode_image_sized, decode_mask, decode_png_mask, encode_png, read_info
from raydefect.inference import resize_rgb


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_and_gray_roundtrip():
    rgb = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    data = _save(Image.fromarray(rgb), "PNG")
    assert np.array_equal(decode_image(data), rgb)
    gray = decode_image(data, mode="L")
    assert gray.shape == (12, 20) and gray.dtype == np.uint8


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(200, dtype=np.uint8).reshape(10, 20)
    out = decode_image(_save(Image.fromarray(gray), "PNG"))
    assert out.shape == (10, 20, 3)
    assert all(np.array_equal(out[..., c], gray) for c in range(3))


def test_exif_orientation_is_applied_to_pixels_and_header_size():
    arr = np.zeros((10, 30, 3), dtype=np.uint8)
    arr[:, :5] = 255  # a white band on the left
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _save(img, "JPEG", exif=exif.tobytes(), quality=95)
    info = read_info(data)
    assert (info.width, info.height) == (10, 30)
    out = decode_image(data)
    assert out.shape == (30, 10, 3)
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the band is now at the top


def _camera_jpeg(width: int, height: int, orientation: int = 1) -> bytes:
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)).copy()
    arr[: height // 4, : width // 8] = 255  # a bright block at the top left, to check orientation
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    return _save(img, "JPEG", quality=92, exif=exif.tobytes())


def test_reduced_jpeg_decode_keeps_the_full_size_and_the_models_input():
    data = _camera_jpeg(1024, 768)
    full, full_size = decode_image_sized(data)
    small, size = decode_image_sized(data, reduce_to=112)
    assert full.shape == (768, 1024, 3) and full_size == size == (1024, 768)
    assert small.shape == (192, 256, 3)  # 1/4 scale: the smallest whose sides stay >= 112
    diff = np.abs(resize_rgb(full, 112).astype(int) - resize_rgb(small, 112).astype(int))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 6  # JPEG's own noise is larger


def test_reduced_jpeg_decode_follows_exif_orientation():
    data = _camera_jpeg(1024, 768, orientation=6)  # displayed rotated 90 degrees clockwise
    small, size = decode_image_sized(data, reduce_to=100)
    assert size == (768, 1024) and small.shape[:2] == (256, 192)
    assert small[:20, -20:].mean() > 200  # the block, top left when stored, is top right on display
    assert decode_image_sized(data)[0].shape == (1024, 768, 3)


@pytest.mark.parametrize("fmt,side", [("PNG", 1024), ("JPEG", 200)])
def test_reduced_decode_is_full_for_other_formats_and_small_jpegs(fmt, side):
    rgb = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    arr, size = decode_image_sized(_save(Image.fromarray(rgb), fmt), reduce_to=112)
    assert arr.shape == (side, side, 3) and size == (side, side)  # PNG has no reduced decode; 200 < 2 x 112


def test_palette_with_transparency_and_rgba_composite_onto_black():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    out = decode_image(_save(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out.shape == (4, 4, 3)
    assert (out[:2, :, 0] == 200).all() and (out[2:] == 0).all()
    pal = Image.fromarray(rgba, "RGBA").convert("P")
    out_p = decode_image(_save(pal, "PNG"))
    assert out_p.shape == (4, 4, 3)


def test_palette_without_transparency():
    img = Image.new("P", (5, 3))
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((1, 1), 1)
    out = decode_image(_save(img, "PNG"))
    assert tuple(out[1, 1]) == (10, 200, 30) and tuple(out[0, 0]) == (0, 0, 0)


def test_16bit_png_scaled_by_full_range():
    arr = np.array([[0, 256, 65535, 32768]], dtype=np.uint16)
    data = _save(Image.fromarray(arr), "PNG")
    out = decode_image(data, mode="L")
    assert out.tolist() == [[0, 1, 255, 128]]
    assert decode_image(data).shape == (1, 4, 3)


def test_cmyk_jpeg_converts_to_rgb():
    img = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(_save(img, "JPEG", quality=95))
    assert out.shape == (6, 8, 3)
    r, g, b = out[3, 4].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_multiframe_gif_and_tiff_use_first_frame():
    frames = [Image.new("L", (6, 4), v) for v in (10, 200)]
    for fmt in ("GIF", "TIFF"):
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:])
        data = buf.getvalue()
        assert read_info(data).frames == 2
        out = decode_image(data, mode="L")
        assert out.shape == (4, 6) and abs(int(out.mean()) - 10) <= 2


def test_truncated_files_raise_typed_error(tmp_path):
    data = _save(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match=r"cut\.jpg: truncated"):
        decode_image(path)
    png = _save(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8)), "PNG")
    with pytest.raises(CorruptImageError):
        decode_image(png[: len(png) - 40], path="cut.png")


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"", "empty file"),
        (b"hello, I am text", "not a recognised image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "fake.png"),
    ],
)
def test_not_images_raise_typed_error(tmp_path, content, reason):
    path = tmp_path / "fake.png"
    path.write_bytes(content)
    with pytest.raises(CorruptImageError, match=reason) as info:
        decode_image(path)
    assert info.value.path == str(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CorruptImageError, match="not found"):
        decode_image(tmp_path / "nope.png")
    with pytest.raises(CorruptImageError, match="directory"):
        decode_image(tmp_path)


def test_decompression_bomb_rejected_before_decoding():
    data = _save(Image.new("L", (4000, 4000)), "PNG")
    with pytest.raises(ImageTooLargeError, match=r"4000x4000.*decompression bomb.*max_image_pixels"):
        decode_image(data, max_pixels=1_000_000, path="big.png")
    with pytest.raises(ImageTooLargeError):
        read_info(data, max_pixels=1_000_000)
    assert read_info(data).width == 4000


def test_mask_binarised_at_128_and_soft_pixels_counted():
    arr = np.array([[0, 127, 128, 255, 5]], dtype=np.uint8)
    mask = decode_mask(_save(Image.fromarray(arr), "PNG"))
    assert mask.array.tolist() == [[False, False, True, True, False]]
    assert mask.soft_pixels == 3 and mask.area == 2
    assert mask.fraction == pytest.approx(0.4)


def test_mask_png_roundtrip():
    mask = np.random.default_rng(3).random((37, 53)) > 0.7
    data = encode_png(mask)
    assert np.array_equal(decode_png_mask(data), mask)
    assert decode_mask(data).array.tolist() == mask.tolist()
