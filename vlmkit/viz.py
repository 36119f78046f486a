"""Heat-map colouring and overlays (no matplotlib needed)."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Control points of a perceptually ordered dark-blue -> teal -> yellow ramp (our own choice of colours).
_RAMP = np.array([[20, 12, 60], [50, 40, 150], [30, 120, 170], [40, 180, 120], [190, 220, 50], [255, 240, 40]],
                 dtype=np.float64)


def colorize(values: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """``[H, W]`` floats -> ``[H, W, 3]`` uint8 colours, min-max normalised unless ``vmin``/``vmax`` are given."""
    v = np.asarray(values, dtype=np.float64)
    lo = np.nanmin(v) if vmin is None else vmin
    hi = np.nanmax(v) if vmax is None else vmax
    t = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(v)
    t = np.nan_to_num(t) * (len(_RAMP) - 1)
    i = np.minimum(t.astype(np.int64), len(_RAMP) - 2)
    f = (t - i)[..., None]
    return (_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).round().astype(np.uint8)


def heat_overlay(image, values: np.ndarray, *, alpha: float = 0.5) -> Image.Image:
    """Blend ``colorize(values)`` over ``image`` (PIL image or path; ``values`` is ``[H, W]`` at the image's size)."""
    from vlmkit.io import load_image

    base = load_image(image)
    heat = colorize(values)
    if heat.shape[:2] != (base.height, base.width):
        raise ValueError(f"heat map is {heat.shape[1]}x{heat.shape[0]} but the image is {base.width}x{base.height}")
    out = np.asarray(base, dtype=np.float64) * (1 - alpha) + heat * alpha
    return Image.fromarray(out.round().astype(np.uint8))
