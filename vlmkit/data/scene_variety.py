"""Extra drawing variety for generated scenes (``generate_scene(..., variety=True)``).

The default scenes keep one drawing of each shape, a fixed palette with small jitter, thin outlines and a handful of
background textures. A model trained only on those learns the drawing, not the shape: on scenes drawn differently
(other proportions, line widths, backgrounds) it misses objects. With ``variety`` a scene also varies what the
names do not fix:

- **proportions**: star points 5 or 6 and inner radius 0.30-0.55, cross arm width, diamond and heart aspect,
  triangle squash, rounded square corners, hexagon stretch;
- **colour**: wider lightness / per-channel jitter (the colour name stays unambiguous);
- **outlines**: 1-5 px, dark, black or light, on up to half the objects;
- **shadows**: soft drop shadows under some objects;
- **backgrounds**: darker and lighter tones, smooth blotches, fine grids and ruled lines, warped grain, speckle.

These draws come from their own random stream, so ``variety=False`` scenes are unchanged, pixel for pixel.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter


def polygon(shape: str, vr: np.random.Generator) -> list[tuple[float, float]] | None:
    """Unit polygon (radius ~1, centred at 0) of a varied ``shape`` before rotation; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        r, h = vr.uniform(0.0, 0.35) if vr.random() < 0.5 else 0.0, 0.78
        if r == 0.0:
            return [(-h, -h), (h, -h), (h, h), (-h, h)]
        pts, c = [], h - r * h
        for (sx, sy), a0 in zip(((1, -1), (1, 1), (-1, 1), (-1, -1)), (-90, 0, 90, 180)):
            for a in np.deg2rad(np.linspace(a0, a0 + 90, 6)):
                pts.append((sx * c + r * h * math.cos(a), sy * c + r * h * math.sin(a)))
        return pts
    if shape == "triangle":
        sy = vr.uniform(0.8, 1.1)
        return [(math.cos(a), (math.sin(a) + 0.15) * sy) for a in np.deg2rad([-90, 30, 150])]
    if shape == "star":
        k, inner = (5 if vr.random() < 0.7 else 6), vr.uniform(0.30, 0.55)
        step = 180.0 / k
        return [((1.0 if j % 2 == 0 else inner) * math.cos(a), (1.0 if j % 2 == 0 else inner) * math.sin(a) + 0.05)
                for j, a in enumerate(np.deg2rad(np.arange(2 * k) * step - 90))]
    if shape == "cross":
        t, r = vr.uniform(0.18, 0.42), 0.9
        return [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t),
                (-t, -t)]
    if shape == "heart":
        ts = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        sx = vr.uniform(0.85, 1.1)
        xs = 16 * np.sin(ts) ** 3 * sx
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        return list(zip(xs / 17.0, (ys + 2.5) / 17.0))
    if shape == "diamond":
        w = vr.uniform(0.45, 0.8)
        return [(0, -1.0), (w, 0), (0, 1.0), (-w, 0)]
    if shape == "hexagon":
        s = vr.uniform(0.85, 1.0)
        return [(math.cos(a), math.sin(a) * s) for a in np.deg2rad(np.arange(6) * 60)]
    return None


def jitter(rgb, vr: np.random.Generator) -> np.ndarray:
    """Wider colour jitter than the default: lightness x0.8-1.1 and +-22 per channel. RGB float [3]."""
    col = np.asarray(rgb, np.float32) * vr.uniform(0.8, 1.1) + vr.uniform(-22, 22, 3)
    return np.clip(col, 0, 255)


def outline(paint: np.ndarray, alpha: np.ndarray, color: str, base: np.ndarray, vr: np.random.Generator) -> None:
    """Maybe draw a 1-5 px outline into ``paint`` (float [side, side, 3], in place) along the edge of ``alpha``."""
    side = alpha.shape[0]
    if vr.random() >= 0.45 or side < 8:
        return
    width = int(min(vr.integers(1, 6), max(1, side // 6)))
    solid = alpha > 0.5
    inner = np.asarray(Image.fromarray(solid.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * width + 1))) > 0
    edge = solid & ~inner
    if edge.sum() > 0.35 * max(1, solid.sum()):      # the outline must never dominate the fill colour
        return
    kind = vr.choice(["dark", "black", "light"], p=[0.45, 0.35, 0.2])
    if color in ("black", "white") or kind == "dark":
        tone = {"black": np.array([110, 110, 110.0]), "white": np.array([120, 120, 120.0])}.get(color, base * 0.5)
    else:
        tone = np.array([20, 20, 20.0]) if kind == "black" else np.clip(base * 0.5 + 120, 0, 255)
    paint[edge] = tone


def shadow(canvas: np.ndarray, alpha: np.ndarray, x0: int, y0: int, vr: np.random.Generator) -> None:
    """Maybe darken ``canvas`` (float [H, W, 3], in place) under a blurred, offset copy of ``alpha`` at (x0, y0)."""
    if vr.random() >= 0.25:
        return
    side, (h, w) = alpha.shape[0], canvas.shape[:2]
    off, blur = int(vr.integers(1, max(2, side // 8) + 1)), float(vr.uniform(0.5, 2.5))
    soft = np.asarray(Image.fromarray((alpha * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur)),
                      np.float32) / 255.0
    ys, xs = y0 + off, x0 + off
    y1, x1 = min(h, ys + side), min(w, xs + side)
    if y1 <= ys or x1 <= xs:
        return
    region = canvas[ys:y1, xs:x1]
    region *= 1.0 - vr.uniform(0.25, 0.5) * soft[:y1 - ys, :x1 - xs, None]


def background(w: int, h: int, vr: np.random.Generator) -> np.ndarray | None:
    """A varied background, RGB float [h, w, 3], or None (keep the default one) half of the time."""
    if vr.random() < 0.5:
        return None
    tone = np.clip(vr.uniform(30, 225) + vr.uniform(-25, 25, 3), 0, 255).astype(np.float32)
    img = np.broadcast_to(tone, (h, w, 3)).astype(np.float32).copy()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = vr.choice(["blotches", "grid", "ruled", "grain", "speckle"])
    if kind == "blotches":                                 # smooth low-frequency noise
        g = vr.normal(0, 1, (int(vr.integers(3, 9)), int(vr.integers(3, 9)), 3)).astype(np.float32)
        up = np.asarray(Image.fromarray(((g - g.min()) / (np.ptp(g) + 1e-6) * 255).astype(np.uint8)).resize(
            (w, h), Image.BICUBIC), np.float32) / 255.0 - 0.5
        img += up * vr.uniform(30, 70)
    elif kind in ("grid", "ruled"):                        # thin lines every few px
        period = vr.uniform(8, 24) * max(w, h) / 256
        lw = max(1.0, vr.uniform(0.5, 2.0) * max(w, h) / 256)
        lines = (yy % period) < lw
        if kind == "grid":
            lines |= (xx % period) < lw
        img[lines] += vr.uniform(-45, 45)
    elif kind == "grain":                                  # warped stripes, like wood or brushed metal
        period = vr.uniform(3, 12) * max(w, h) / 256
        warp = np.sin(xx / (w * vr.uniform(0.1, 0.4)) + vr.uniform(0, 6)) * vr.uniform(2, 10)
        img += (np.sin((yy + warp) / period * np.pi) * vr.uniform(8, 25))[..., None]
    else:                                                  # speckle: sparse dots of other tones
        dots = vr.random((h, w)) < vr.uniform(0.01, 0.06)
        img[dots] += vr.uniform(-70, 70, 3).astype(np.float32)
    img += vr.normal(0, vr.uniform(0, 8), (h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255)
