"""Point prompts from an attention map (VL-SAM §3.2 step 3) and the small mask utilities VL-SAM needs.

All maps are float ``[H, W]`` over an image's pixels; points are ``(x, y)`` in pixels (pixel centres).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

#: connected components are found on a copy of the map shrunk to at most this many cells on its long side
_CC_SIDE = 64


@dataclass
class PointPair:
    """One positive and one negative point prompt, ``(x, y)`` pixels, with the positive region they came from.

    ``region``: bool ``[H, W]``, the thresholded connected component that holds the positive point.
    """

    positive: tuple[float, float]
    negative: tuple[float, float] | None
    region: np.ndarray
    peak: float

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(points [N, 2] float32, labels [N] int64)`` for :meth:`Segmenter.predict`."""
        pts = [self.positive] + ([self.negative] if self.negative is not None else [])
        return np.asarray(pts, np.float32), np.asarray([1] + [0] * (len(pts) - 1), np.int64)


def normalize(m: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] (a constant map becomes zeros)."""
    m = np.asarray(m, np.float64)
    lo, hi = np.nanmin(m), np.nanmax(m)
    return np.zeros_like(m) if not np.isfinite(hi - lo) or hi - lo <= 1e-12 else (m - lo) / (hi - lo)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool ``[h, w]`` mask: ``(labels int32 [h, w] with 0 = background, count)``."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    queue.append((yy, xx))
    return labels, n


def _shrink(m: np.ndarray, side: int) -> tuple[np.ndarray, int]:
    """Block-max the map so its long side is at most ``side``; returns ``(small, factor)``."""
    h, w = m.shape
    f = max(1, int(np.ceil(max(h, w) / side)))
    if f == 1:
        return m, 1
    ph, pw = -h % f, -w % f
    padded = np.pad(m, ((0, ph), (0, pw)), constant_values=np.nanmin(m))
    return padded.reshape((h + ph) // f, f, (w + pw) // f, f).max(axis=(1, 3)), f


def largest_region(m: np.ndarray, threshold: float) -> np.ndarray:
    """bool ``[H, W]``: the connected component of ``normalize(m) >= threshold`` with the largest attention mass
    (ties: the one with the peak)."""
    n = normalize(m)
    small, f = _shrink(n, _CC_SIDE)
    labels, count = label_components(small >= threshold)
    if count == 0:
        return n >= n.max()
    mass = np.bincount(labels.ravel(), weights=small.ravel(), minlength=count + 1)[1:]
    best = int(np.argmax(mass)) + 1
    region = labels == best
    if f > 1:
        region = np.kron(region, np.ones((f, f), bool))[: m.shape[0], : m.shape[1]]
    return region & (n >= threshold)


def points_from_map(m: np.ndarray, *, threshold: float = 0.5, negative: str = "min", within: np.ndarray | None = None,
                    peak: str = "centroid", peak_band: float = 0.2,
                    rng: np.random.Generator | None = None) -> PointPair | None:
    """VL-SAM's prompt sampling: threshold the map, keep the largest connected component as the positive region,
    positive point = its highest-attention pixel (``peak="max"``) or, by default (``"centroid"``), the
    value-weighted centroid of the region's pixels within ``peak_band`` of that peak (a sub-token estimate: maps are
    piecewise constant over token boxes, so the arg-max alone is a token's corner); negative point = the
    lowest-attention pixel outside it (``negative="min"``), a random pixel outside it (``"random"``), or none
    (``"none"``).

    ``within`` (bool ``[H, W]``, e.g. the current SAM mask for refinement) restricts the map first: the positive
    point is taken inside it and the negative outside it. Returns None for an empty or all-equal map.
    """
    m = np.asarray(m, np.float64)
    if m.size == 0 or not np.isfinite(m).any():
        return None
    m = np.nan_to_num(m, nan=np.nanmin(m))
    if within is not None and within.any():
        inside = np.where(within, m, -np.inf)
        region = within.copy()
        peak_idx = int(np.argmax(inside))
    else:
        if m.max() - m.min() <= 1e-12:
            return None
        region = largest_region(m, threshold)
        peak_idx = int(np.argmax(np.where(region, m, -np.inf)))
    py, px = divmod(peak_idx, m.shape[1])
    if peak == "centroid":  # sub-token estimate: value-weighted centroid of the region's top pixels
        n = normalize(m)
        top = region & (n >= n.ravel()[peak_idx] - peak_band)
        ys, xs = np.nonzero(top)
        wts = n[ys, xs] + 1e-6
        cy, cx = int(np.average(ys, weights=wts)), int(np.average(xs, weights=wts))
        if region[cy, cx]:
            py, px = cy, cx
    elif peak != "max":
        raise ValueError(f"peak={peak!r}: use 'centroid' or 'max'")
    neg = None
    outside = ~region
    if negative != "none" and outside.any():
        if negative == "min":
            ny, nx = divmod(int(np.argmin(np.where(outside, m, np.inf))), m.shape[1])
        elif negative == "random":
            ys, xs = np.nonzero(outside)
            k = int((rng or np.random.default_rng(0)).integers(len(ys)))
            ny, nx = ys[k], xs[k]
        else:
            raise ValueError(f"negative={negative!r}: use 'min', 'random' or 'none'")
        neg = (float(nx) + 0.5, float(ny) + 0.5)
    return PointPair((float(px) + 0.5, float(py) + 0.5), neg, region, float(normalize(m).ravel()[peak_idx]))


def clean_mask(mask: np.ndarray, point: tuple[float, float] | None = None) -> np.ndarray:
    """Keep the 8-connected component of a bool mask that holds ``point`` (else the largest one); SAM's low-res
    logits leave stray specks that would stretch the box. Needs scipy; without it the mask is returned unchanged."""
    try:
        from scipy import ndimage
    except ImportError:
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    keep = 0
    if point is not None:
        x, y = int(point[0]), int(point[1])
        if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1]:
            keep = int(labels[y, x])
    if keep == 0:
        keep = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    return labels == keep


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight ``(x0, y0, x1, y1)`` box (exclusive end) of a bool mask, None if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)


def box_iou(a, b) -> float:
    """IoU of two ``(x0, y0, x1, y1)`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0
