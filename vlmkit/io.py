"""Image loading for vlmkit: any reasonable image source in, one RGB ``PIL.Image`` out.

``load_image`` accepts a file path (``str`` / ``os.PathLike``), encoded bytes, a PIL image or a numpy
array and returns a fresh 8-bit RGB image (``mode == "RGB"``, shape ``[H, W, 3]`` as an array). It
does the conversions that a bare ``.convert("RGB")`` gets wrong:

* transparency (RGBA, LA, PA, premultiplied modes, palette / grey / RGB images with a ``tRNS``
  transparent colour) is composited on white instead of dropping alpha (which turns transparent
  pixels into whatever colour they happen to store, often black);
* 16-bit (``I;16``, ``I;16B``, ``I;16L``), 32-bit integer (``I``) and 32-bit float (``F``) images are
  scaled by their actual value range into 0..255 instead of being clipped at 255;
* EXIF orientation is applied (``ImageOps.exif_transpose``), animated files give their first frame.

Problems raise :class:`vlmkit.errors.InputError` with a one-line message naming the input and saying
what to do. Size is checked against a pixel cap from the header, before any pixel data is decoded:
``DEFAULT_MAX_PIXELS`` unless the call passes ``max_pixels`` or the ``VLMKIT_MAX_PIXELS`` environment
variable is set (read at call time). Tiny and extreme-aspect images are not rejected here; model
adapters decide whether they can take them. ``image_size`` reads only the header of files.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmkit.errors import InputError

DEFAULT_MAX_PIXELS = 40_000_000
MAX_PIXELS_ENV = "VLMKIT_MAX_PIXELS"

_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_TRNS_MODES = {"1", "L", "P", "RGB"}  # modes whose info["transparency"] marks a transparent colour
_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that turn W x H into H x W
_EXIF_ORIENTATION_TAG = 0x0112
_URL_PREFIXES = ("http://", "https://", "ftp://", "s3://", "gs://", "data:")
_MAGIC = {
    b"\x89PNG": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def resolve_max_pixels(max_pixels: int | None = None) -> int:
    """Return the pixel cap to use: ``max_pixels`` if given, else ``$VLMKIT_MAX_PIXELS``, else the default.

    Raises ``InputError`` if the value is not a positive integer.
    """
    if max_pixels is None:
        raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not raw:
            return DEFAULT_MAX_PIXELS
        try:
            value = int(raw)
        except ValueError:
            raise InputError(
                f"${MAX_PIXELS_ENV}={raw!r}: not an integer; set it to a pixel count such as 40000000 or unset it"
            ) from None
        if value <= 0:
            raise InputError(f"${MAX_PIXELS_ENV}={raw!r}: must be a positive pixel count; unset it to use the default")
        return value
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise InputError(f"max_pixels={max_pixels!r}: must be a positive integer pixel count")
    return int(max_pixels)


def load_image(source: Any, *, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """Load ``source`` as a new 8-bit RGB ``PIL.Image`` (``[H, W, 3]`` once turned into an array).

    Args:
        source: a path (``str`` / ``os.PathLike``) to an image file; encoded image bytes (``bytes``,
            ``bytearray``, ``memoryview``); a ``PIL.Image.Image`` (its current frame is used and it is
            not modified); or a numpy array of shape ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` (RGB) or
            ``[H, W, 4]`` (RGBA) with dtype ``uint8``, ``uint16`` (colour scaled by its value range,
            alpha by 65535), ``bool`` or float with values in ``[0, 1]``.
        max_pixels: largest ``W * H`` accepted; ``None`` uses ``$VLMKIT_MAX_PIXELS`` or
            ``DEFAULT_MAX_PIXELS``. Checked from the header before decoding pixels.
        name: label used in error messages (e.g. a dataset row id); for paths it is shown with the path.

    Returns:
        A new ``PIL.Image.Image`` in mode ``"RGB"``, EXIF orientation applied, transparency on white.

    Raises:
        InputError: missing / unreadable / empty / corrupt / truncated file, not an image, over the pixel
            cap, zero-size image, or an array with an unsupported shape or dtype.
    """
    cap = resolve_max_pixels(max_pixels)
    if isinstance(source, np.ndarray):
        label = name or "<array>"
        return _array_to_rgb(source, label, cap)
    if isinstance(source, Image.Image):
        label = name or "<PIL image>"
        _check_size(source.size, label, cap)
        try:
            source.load()
        except Exception as exc:  # lazily opened images can fail here (truncated, closed file)
            raise InputError(f"{label}: pixel data could not be read ({_reason(exc)}); reload the image") from exc
        return _to_rgb(source, label)
    label, opener = _opener(source, name)
    with opener() as img:
        _check_size(img.size, label, cap)
        try:
            img.load()
        except Exception as exc:
            raise InputError(
                f"{label}: image data is corrupt or truncated ({_reason(exc)}); re-download or re-export the file"
            ) from exc
        return _to_rgb(img, label)


def image_size(source: Any, *, name: str | None = None) -> tuple[int, int]:
    """Return ``(width, height)`` of the image ``load_image(source)`` would give, after EXIF orientation.

    For paths and bytes only the header is read (no pixel data is decoded, no pixel cap is applied).
    Arrays must have one of the shapes ``load_image`` accepts. Raises ``InputError`` like ``load_image``.
    """
    if isinstance(source, np.ndarray):
        height, width = _array_hw(source, name or "<array>")
        return width, height
    if isinstance(source, Image.Image):
        return _oriented_size(source)
    _, opener = _opener(source, name)
    with opener() as img:
        return _oriented_size(img)


# ---------------------------------------------------------------------------------------------- opening


def _opener(source: Any, name: str | None):
    """Validate a path / bytes source; return ``(label, open_fn)`` where ``open_fn()`` opens the header."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        data = bytes(source)
        if not data:
            raise InputError(f"{label}: no image data (0 bytes); pass the encoded file contents")
        return label, lambda: _open(io.BytesIO(data), label)
    if isinstance(source, (str, os.PathLike)):
        raw = os.fspath(source)
        if isinstance(raw, bytes):
            raw = os.fsdecode(raw)
        label = f"{name} ({raw})" if name else raw
        path = Path(raw).expanduser()
        if not path.exists():
            if raw.lower().startswith(_URL_PREFIXES):
                raise InputError(f"{label}: URLs are not fetched; download the image and pass the local file path")
            raise InputError(f"{label}: file not found; check the path (relative to {os.getcwd()})")
        if path.is_dir():
            raise InputError(f"{label}: is a directory, not an image file; pass one of the image files inside it")
        try:
            nbytes = path.stat().st_size
        except OSError as exc:
            raise InputError(f"{label}: cannot be read ({_reason(exc)}); check its permissions") from exc
        if nbytes == 0:
            raise InputError(f"{label}: file is empty (0 bytes); re-download or re-export it")
        return label, lambda: _open(path, label)
    label = name or f"<{type(source).__name__}>"
    hint = "; for a torch tensor pass tensor.cpu().numpy() as [H, W, C]" if hasattr(source, "detach") else ""
    raise InputError(
        f"{label}: unsupported image source type {type(source).__name__}; "
        f"pass a file path, encoded bytes, a PIL image or a numpy array{hint}"
    )


def _open(fp: Path | io.BytesIO, label: str) -> Image.Image:
    """``Image.open`` (header only) with PIL's failures turned into one-line ``InputError``s."""
    try:
        with warnings.catch_warnings():
            # Sizes past PIL's warning threshold are judged by our own cap right after opening.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as exc:
        match = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(match.group(1)):,} pixels, " if match else ""
        raise InputError(
            f"{label}: image is too large ({size}over Pillow's decompression-bomb limit of "
            f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels); downscale it before loading"
        ) from exc
    except UnidentifiedImageError as exc:
        raise InputError(
            f"{label}: not a readable image ({_sniff(fp)}); pass an intact PNG, JPEG, WebP, GIF, BMP or TIFF file"
        ) from exc
    except PermissionError as exc:
        raise InputError(f"{label}: cannot be read (permission denied); check the file's permissions") from exc
    except Exception as exc:
        raise InputError(
            f"{label}: image header is corrupt or truncated ({_reason(exc)}); re-download or re-export the file"
        ) from exc


def _sniff(fp: Path | io.BytesIO) -> str:
    """Describe what a file that PIL could not identify seems to contain."""
    try:
        if isinstance(fp, io.BytesIO):
            head = fp.getvalue()[:256]
        else:
            with open(fp, "rb") as fh:
                head = fh.read(256)
    except OSError:
        return "unknown format"
    for magic, fmt in _MAGIC.items():
        if head.startswith(magic):
            return f"starts like a {fmt} file but its header is corrupt or cut short"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "starts like a WebP file but its header is corrupt or cut short"
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "looks like an HTML page, perhaps a failed download"
    if lowered.startswith(b"<svg") or (lowered.startswith(b"<?xml") and b"<svg" in lowered):
        return "looks like SVG, which is not supported; rasterise it to PNG"
    try:
        head.decode("utf-8")
        return "looks like a text file"
    except UnicodeDecodeError:
        return f"unknown format, starts with {head[:8]!r}"


def _reason(exc: BaseException) -> str:
    """One-line description of an exception."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_size(size: tuple[int, int], label: str, cap: int) -> None:
    """Reject zero-size images and ones with more than ``cap`` pixels (``size`` is ``(W, H)``)."""
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(f"{label}: image has zero size ({width}x{height}); pass an image with at least one pixel")
    if width * height > cap:
        raise InputError(
            f"{label}: image is {width}x{height} = {width * height:,} pixels, over the pixel cap of {cap:,}; "
            f"downscale it, or raise the cap with max_pixels=... or ${MAX_PIXELS_ENV}"
        )


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """``img.size`` with width and height swapped when its EXIF orientation rotates by 90 degrees."""
    width, height = img.size
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION_TAG)
    except Exception:  # malformed EXIF: load_image ignores it too
        orientation = None
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


# ------------------------------------------------------------------------------------------ conversion


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    """Turn a loaded image of any mode into a new RGB image (EXIF orientation applied, alpha on white)."""
    try:
        oriented = ImageOps.exif_transpose(img)  # always a new image (a copy when nothing to do)
    except Exception:  # malformed EXIF should not make an otherwise good image unloadable
        oriented = img.copy()
    mode = oriented.mode
    try:
        if mode == "RGB" and "transparency" not in oriented.info:
            return oriented
        if mode in _HIGH_DEPTH_MODES:
            return _high_depth_to_rgb(oriented)
        if mode == "La":  # premultiplied grey+alpha: PIL only unpremultiplies it to LA
            oriented = oriented.convert("LA")
        if mode in _ALPHA_MODES or ("transparency" in oriented.info and mode in _TRNS_MODES):
            return _on_white(oriented.convert("RGBA"))
        return oriented.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InputError(
            f"{label}: image mode {mode!r} cannot be converted to RGB ({_reason(exc)}); save it as 8-bit RGB"
        ) from exc


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite an RGBA image on an opaque white background; returns RGB."""
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return out


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float grey image -> RGB, scaled by its value range (see ``_scale_to_u8``)."""
    values = np.asarray(img)
    grey = _scale_to_u8(values, normalized_float=True)
    rgb = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    key = img.info.get("transparency")
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        alpha = np.where(values == key, 0, 255).astype(np.uint8)
        rgb = _on_white(Image.fromarray(np.dstack([np.asarray(rgb), alpha])))
    return rgb


def _scale_to_u8(values: np.ndarray, *, normalized_float: bool) -> np.ndarray:
    """Map values linearly from ``[min, max]`` to ``uint8`` ``[0, 255]`` (same shape).

    Float data whose finite values all lie in ``[0, 1]`` is taken as already normalised (times 255)
    when ``normalized_float``. NaN maps to 0 and +-inf to the ends of the finite range. A constant
    image keeps its level: 16-bit data relative to 65535, other data clipped to ``[0, 255]``.
    """
    if values.size == 0:
        return np.zeros(values.shape, np.uint8)
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        values = values.astype(np.uint16, copy=False)  # native byte order for I;16B
        lo, hi = int(values.min()), int(values.max())
        if lo == hi:
            return np.full(values.shape, round(lo * 255 / 65535), np.uint8)
        ramp = np.clip((np.arange(65536, dtype=np.float64) - lo) * (255.0 / (hi - lo)), 0, 255)
        return np.rint(ramp).astype(np.uint8)[values]  # lookup table: no float copy of the image
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    data = values.astype(np.float32, copy=False)
    lo, hi = float(data[finite].min()), float(data[finite].max())
    if values.dtype.kind == "f" and normalized_float and lo >= 0.0 and hi <= 1.0:
        scaled = data * 255.0
    elif lo == hi:
        scaled = np.full(values.shape, lo, np.float32)
    else:
        scaled = (np.clip(data, lo, hi) - lo) * (255.0 / (hi - lo))
    scaled = np.where(np.isnan(scaled), 0.0, scaled)
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- arrays


def _array_hw(arr: np.ndarray, label: str) -> tuple[int, int]:
    """Validate an array's shape and dtype kind; return ``(H, W)``."""
    shape = tuple(arr.shape)
    ok_shape = arr.ndim == 2 or (arr.ndim == 3 and shape[2] in (1, 3, 4))
    if not ok_shape:
        hint = ""
        if arr.ndim == 3 and shape[0] in (1, 3, 4):
            hint = " (looks channels-first; use arr.transpose(1, 2, 0))"
        elif arr.ndim == 4 and shape[0] == 1:
            hint = " (looks batched; pass arr[0])"
        raise InputError(
            f"{label}: array shape {shape} is not an image{hint}; pass [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]"
        )
    if shape[0] == 0 or shape[1] == 0:
        raise InputError(f"{label}: array shape {shape} has zero size; pass an image with at least one pixel")
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if not (kind == "b" or kind == "f" or (kind == "u" and size in (1, 2))):
        raise InputError(
            f"{label}: array dtype {arr.dtype} is not supported; use uint8 (0..255), uint16, bool "
            f"or float in [0, 1], e.g. arr.astype(np.uint8)"
        )
    return shape[0], shape[1]


def _array_to_rgb(arr: np.ndarray, label: str, cap: int) -> Image.Image:
    """Convert a validated numpy image array (see ``load_image``) into a new RGB image."""
    height, width = _array_hw(arr, label)
    _check_size((width, height), label, cap)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    kind = arr.dtype.kind
    if kind == "b":
        u8 = arr.astype(np.uint8) * 255
    elif kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            raise InputError(f"{label}: float array contains NaN or infinity; replace them (np.nan_to_num) first")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise InputError(
                f"{label}: float array values span [{lo:g}, {hi:g}], outside [0, 1]; "
                f"divide by the maximum (e.g. arr / 255) or pass uint8"
            )
        u8 = np.rint(np.clip(arr.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    elif arr.dtype.itemsize == 2:  # uint16: colour by its value range, alpha relative to 65535
        colour = arr[:, :, :3] if arr.shape[2] == 4 else arr
        u8 = _scale_to_u8(colour, normalized_float=False)
        if arr.shape[2] == 4:
            alpha = np.rint(arr[:, :, 3:].astype(np.float32) * (255.0 / 65535)).astype(np.uint8)
            u8 = np.concatenate([u8, alpha], axis=2)
    else:
        u8 = arr
    u8 = np.ascontiguousarray(u8, dtype=np.uint8)
    channels = u8.shape[2]
    if channels == 1:
        return Image.fromarray(np.repeat(u8, 3, axis=2))
    if channels == 3:
        return Image.fromarray(u8)
    return _on_white(Image.fromarray(u8))
