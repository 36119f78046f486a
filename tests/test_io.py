"""Tests for vlmkit.io.load_image / image_size: bad inputs give clear InputErrors, modes convert correctly."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from vlmkit.errors import InputError
from vlmkit.io import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, image_size, load_image, resolve_max_pixels


@pytest.fixture(autouse=True)
def _no_env_cap(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming ``width x height`` but only a few bytes of pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _noise(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _arr(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


# ------------------------------------------------------------------------------------------ bad files


def test_missing_path_names_file(tmp_path):
    with pytest.raises(InputError, match="nope.png.*not found"):
        load_image(tmp_path / "nope.png")


def test_url_gets_hint():
    with pytest.raises(InputError, match="URLs are not fetched"):
        load_image("https://example.com/cat.png")


def test_directory_path(tmp_path):
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty.png.*empty"):
        load_image(p)


def test_corrupt_file(tmp_path):
    p = tmp_path / "junk.jpg"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match="junk.jpg.*not a readable image") as info:
        load_image(str(p))
    assert "\n" not in str(info.value)


def test_text_file_renamed_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello, I am not a picture\n")
    with pytest.raises(InputError, match="notes.png.*text file"):
        load_image(p)


def test_html_page_saved_as_jpg(tmp_path):
    p = tmp_path / "download.jpg"
    p.write_text("<!DOCTYPE html><html><body>403</body></html>")
    with pytest.raises(InputError, match="HTML page"):
        load_image(p)


def test_truncated_png(tmp_path):
    data = _png_bytes(Image.fromarray(_noise(64, 64)))
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.png.*truncated") as info:
        load_image(p)
    assert "\n" not in str(info.value)


def test_png_cut_inside_header(tmp_path):
    p = tmp_path / "stub.png"
    data = _png_bytes(Image.new("RGB", (4, 4)))
    p.write_bytes(data[:20])  # cut inside IHDR
    with pytest.raises(InputError, match="stub.png.*truncated"):
        load_image(p)
    p.write_bytes(data[:8] + b"\x00" * 40)  # PNG signature, garbage chunks
    with pytest.raises(InputError, match="stub.png.*like a PNG file.*cut short"):
        load_image(p)


def test_truncated_bytes():
    data = _png_bytes(Image.fromarray(_noise(32, 32)))
    with pytest.raises(InputError, match="<bytes>.*truncated"):
        load_image(data[:-40])
    with pytest.raises(InputError, match="row-7"):
        load_image(data[:-40], name="row-7")


def test_empty_bytes_and_bad_type():
    with pytest.raises(InputError, match="<bytes>"):
        load_image(b"")
    with pytest.raises(InputError, match="unsupported image source type int"):
        load_image(42)


# ------------------------------------------------------------------------------------------ pixel cap


def test_over_cap_names_file(tmp_path):
    p = tmp_path / "big.png"
    Image.new("RGB", (50, 40)).save(p)
    with pytest.raises(InputError, match=r"big.png.*50x40 = 2,000 pixels.*cap of 1,999"):
        load_image(p, max_pixels=1999)
    assert load_image(p, max_pixels=2000).size == (50, 40)


def test_cap_from_env(tmp_path, monkeypatch):
    p = tmp_path / "env.png"
    Image.new("L", (30, 30)).save(p)
    monkeypatch.setenv(MAX_PIXELS_ENV, "800")
    with pytest.raises(InputError, match="env.png.*cap of 800"):
        load_image(p)
    assert load_image(p, max_pixels=900).size == (30, 30)  # explicit argument wins over the env var
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(InputError, match=MAX_PIXELS_ENV):
        load_image(p)
    monkeypatch.delenv(MAX_PIXELS_ENV)
    assert resolve_max_pixels() == DEFAULT_MAX_PIXELS
    with pytest.raises(InputError, match="max_pixels"):
        load_image(p, max_pixels=0)


def test_cap_checked_before_decoding(tmp_path):
    # Header says 8000x6000 (48M px, over the 40M default) and there is no pixel data: decoding would
    # fail as "truncated", so a cap error proves the check happened on the header.
    p = tmp_path / "huge.png"
    p.write_bytes(_header_only_png(8000, 6000))
    with pytest.raises(InputError, match="huge.png.*over the pixel cap"):
        load_image(p)
    assert image_size(p) == (8000, 6000)


def test_pil_bomb_warning_and_error_become_input_errors(tmp_path):
    warn = tmp_path / "warn.png"  # 100M px: past PIL's warning threshold (~89M)
    warn.write_bytes(_header_only_png(10000, 10000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match="warn.png.*pixel cap"):
            load_image(warn)
    bomb = tmp_path / "bomb.png"  # 400M px: past PIL's hard limit (~179M)
    bomb.write_bytes(_header_only_png(20000, 20000))
    with pytest.raises(InputError, match="bomb.png.*400,000,000 pixels.*decompression-bomb"):
        load_image(bomb, max_pixels=10**9)


def test_cap_applies_to_arrays_and_pil():
    with pytest.raises(InputError, match="<array>.*cap"):
        load_image(np.zeros((10, 10), np.uint8), max_pixels=99)
    with pytest.raises(InputError, match="<PIL image>.*cap"):
        load_image(Image.new("RGB", (10, 10)), max_pixels=99)


def test_zero_size_images():
    with pytest.raises(InputError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(InputError, match="zero size"):
        load_image(np.zeros((0, 4, 3), np.uint8))


# ------------------------------------------------------------------------------------------ modes


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent, dark stored colour
    rgba[0, 1] = (200, 0, 0, 255)  # opaque red
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(p)
    out = _arr(load_image(p))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (200, 0, 0)
    assert all(abs(int(v) - 127) <= 1 for v in out[1, 0])


def test_la_composited_on_white(tmp_path):
    p = tmp_path / "la.png"
    Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), mode="LA").save(p)
    out = _arr(load_image(p))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (0, 0, 0)


def test_grey_l(tmp_path):
    p = tmp_path / "grey.png"
    Image.fromarray(np.array([[0, 77, 255]], np.uint8)).save(p)
    out = _arr(load_image(p))
    assert out.shape == (1, 3, 3)
    assert (out == np.array([0, 77, 255])[:, None]).all()


def _palette_image() -> Image.Image:
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    img.putpixel((1, 0), 1)
    img.putpixel((2, 0), 2)
    return img


def test_palette(tmp_path):
    p = tmp_path / "pal.png"
    _palette_image().save(p)
    out = _arr(load_image(p))
    assert [tuple(v) for v in out[0]] == [(0, 0, 0), (255, 0, 0), (0, 0, 255)]


def test_palette_with_transparency(tmp_path):
    p = tmp_path / "pal_t.png"
    _palette_image().save(p, transparency=0)  # index 0 (black) is transparent
    out = _arr(load_image(p))
    assert [tuple(v) for v in out[0]] == [(255, 255, 255), (255, 0, 0), (0, 0, 255)]


def test_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50)
    out = _arr(load_image(p))
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50


def test_cmyk(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p, quality=95)  # pure red in CMYK
    out = _arr(load_image(p)).astype(int)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 50 and out[..., 2].mean() < 50


def test_16bit_png_full_range(tmp_path):
    ramp = np.linspace(0, 65535, 512).round().astype(np.uint16)
    img = Image.fromarray(np.tile(ramp, (4, 1)))
    p = tmp_path / "ramp16.png"
    img.save(p)
    with Image.open(p) as reopened:
        assert reopened.mode.startswith("I")
    out = _arr(load_image(p))[0, :, 0].astype(int)
    assert out.min() <= 1 and out.max() >= 254
    assert (np.diff(out) >= 0).all() and len(np.unique(out)) > 200  # a gradient, not all white


def test_16bit_big_endian_and_narrow_range():
    values = np.array([[1000, 3000, 5000]], dtype=">u2")
    img = Image.frombytes("I;16B", (3, 1), values.tobytes())
    out = _arr(load_image(img))[0, :, 0]
    assert out[0] == 0 and out[2] == 255 and 120 <= out[1] <= 135


def test_float_mode_f(tmp_path):
    values = np.array([[-2.0, 0.0, 6.0]], np.float32)
    p = tmp_path / "float.tif"
    Image.fromarray(values, mode="F").save(p)
    out = _arr(load_image(p))[0, :, 0]
    assert out[0] == 0 and out[2] == 255 and 60 <= out[1] <= 68
    normalised = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F")
    assert list(_arr(load_image(normalised))[0, :, 0]) == [0, 128, 255]


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("LAB", (255, 128, 128), (255, 255, 255)),  # L=100, a=b=0: white
        ("HSV", (0, 255, 255), (255, 0, 0)),  # hue 0, full saturation/value: red
        ("YCbCr", (76, 85, 255), (254, 0, 0)),  # BT.601 red
        ("1", 1, (255, 255, 255)),
        ("La", (0, 0), (255, 255, 255)),  # premultiplied, transparent
        ("RGBa", (0, 0, 0, 0), (255, 255, 255)),
        ("PA", (0, 0), (255, 255, 255)),
    ],
)
def test_other_modes(mode, colour, expected):
    out = _arr(load_image(Image.new(mode, (2, 1), colour)))
    assert all(abs(int(a) - b) <= 2 for a, b in zip(out[0, 0], expected))


def test_int32_mode_i_scaled_by_range():
    img = Image.fromarray(np.array([[-5, 50000, 100000]], np.int32))
    assert img.mode == "I"
    out = _arr(load_image(img))[0, :, 0]
    assert out[0] == 0 and out[2] == 255 and 125 <= out[1] <= 130


def test_exif_orientation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.new("RGB", (40, 20), (0, 128, 0)).save(p, exif=exif)
    assert load_image(p).size == (20, 40)
    assert image_size(p) == (20, 40)


def test_tiny_and_extreme_aspect(tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (9, 8, 7)).save(tiny)
    assert tuple(_arr(load_image(tiny))[0, 0]) == (9, 8, 7)
    wide = tmp_path / "wide.png"
    Image.new("L", (10000, 50), 200).save(wide)
    out = load_image(wide)
    assert out.size == (10000, 50) and out.mode == "RGB"
    assert image_size(wide) == (10000, 50)


def test_pil_input_not_modified():
    src = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    out = load_image(src)
    assert out is not src and src.mode == "RGBA"
    assert tuple(_arr(out)[0, 0]) == (255, 255, 255)
    rgb = Image.new("RGB", (2, 2))
    assert load_image(rgb) is not rgb


def test_bytes_input():
    pixels = _noise(5, 7)
    data = _png_bytes(Image.fromarray(pixels))
    for src in (data, bytearray(data), memoryview(data)):
        assert np.array_equal(_arr(load_image(src)), pixels)
    assert image_size(data) == (7, 5)


# ------------------------------------------------------------------------------------------ arrays


def test_array_uint8_shapes():
    rgb = _noise(3, 5)
    assert np.array_equal(_arr(load_image(rgb)), rgb)
    grey = rgb[:, :, 0]
    assert np.array_equal(_arr(load_image(grey)), np.repeat(grey[:, :, None], 3, axis=2))
    assert np.array_equal(_arr(load_image(grey[:, :, None])), np.repeat(grey[:, :, None], 3, axis=2))
    rgba = np.dstack([rgb, np.zeros((3, 5), np.uint8)])
    rgba[0, 0, 3] = 255
    out = _arr(load_image(rgba))
    assert tuple(out[0, 0]) == tuple(rgb[0, 0]) and tuple(out[1, 1]) == (255, 255, 255)
    assert image_size(rgba) == (5, 3)
    assert np.array_equal(_arr(load_image(rgb[:, ::-1])), rgb[:, ::-1])  # non-contiguous view


def test_array_uint16_bool_float():
    u16 = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    out = _arr(load_image(u16))[..., 0]
    assert out.min() == 0 and out.max() == 255
    u16_rgba = np.zeros((1, 2, 4), np.uint16)
    u16_rgba[0, 1] = (65535, 0, 0, 65535)
    assert [tuple(v) for v in _arr(load_image(u16_rgba))[0]] == [(255, 255, 255), (255, 0, 0)]
    mask = np.array([[True, False]])
    assert [tuple(v) for v in _arr(load_image(mask))[0]] == [(255, 255, 255), (0, 0, 0)]
    flt = np.array([[[0.0, 0.5, 1.0]]], np.float64)
    assert tuple(_arr(load_image(flt))[0, 0]) == (0, 128, 255)
    assert tuple(_arr(load_image(flt.astype(np.float16)))[0, 0]) == (0, 128, 255)


@pytest.mark.parametrize(
    ("arr", "pattern"),
    [
        (np.zeros((3, 8, 8), np.uint8), "channels-first"),
        (np.zeros((1, 8, 8, 3), np.uint8), "batched"),
        (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\)"),
        (np.zeros(8, np.uint8), "shape"),
        (np.zeros((8, 8), np.int64), "dtype int64"),
        (np.zeros((8, 8), np.complex64), "dtype complex64"),
        (np.full((8, 8), 255.0), r"outside \[0, 1\]"),
        (np.full((8, 8), np.nan), "NaN"),
    ],
)
def test_array_rejected(arr, pattern):
    with pytest.raises(InputError, match=pattern) as info:
        load_image(arr)
    assert str(info.value).startswith("<array>:")
    with pytest.raises(InputError, match="frame-3"):
        load_image(arr, name="frame-3")
