"""PNG panels and the JSON file for a :class:`~vlmkit.methods.saliency.SaliencyReport` (PIL only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlmkit.viz import colorize, heat_overlay


def _grid_to_pixels(values: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Token values of the first view ``[rows*cols]`` spread over an image of ``size`` (nearest)."""
    rows, cols = grid
    v = np.asarray(values[: rows * cols], dtype=np.float64).reshape(rows, cols)
    w, h = size
    yi = np.minimum((np.arange(h) * rows) // h, rows - 1)
    xi = np.minimum((np.arange(w) * cols) // w, cols - 1)
    return v[yi][:, xi]


def _bar_chart(title: str, series: dict[str, list[float]], labels: list[str], size=(520, 260)) -> Image.Image:
    """Grouped bars, values in [-1, 1]; one colour per series."""
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((8, 4), title, fill="black")
    colors = [(60, 90, 200), (220, 120, 30), (40, 160, 90), (150, 60, 160)]
    top, bottom, left = 24, size[1] - 40, 30
    zero = (top + bottom) / 2
    d.line([(left, zero), (size[0] - 8, zero)], fill=(120, 120, 120))
    n, m = max(len(labels), 1), max(len(series), 1)
    slot = (size[0] - left - 8) / n
    bw = max(slot / (m + 1), 1)
    for j, (name, vals) in enumerate(series.items()):
        for i, v in enumerate(vals):
            x = left + i * slot + j * bw
            y = zero - float(np.clip(v, -1, 1)) * (bottom - top) / 2
            d.rectangle([x, min(y, zero), x + bw - 1, max(y, zero)], fill=colors[j % len(colors)])
        d.text((left + j * 150, size[1] - 16), name, fill=colors[j % len(colors)])
    for i, lab in enumerate(labels):
        d.text((left + i * slot, bottom + 2), lab[:8], fill="black")
    return img


def write_panels(report, out_dir, image=None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
    maps = {"attention": report.attention["all_mean"], **report.saliency}
    if image is not None:
        from vlmkit.io import load_image

        base = load_image(image)
        base.save(out / "image.png")
        for name, vals in maps.items():
            heat_overlay(base, _grid_to_pixels(vals, report.grid, base.size)).save(out / f"{name}.png")
    else:
        for name, vals in maps.items():
            Image.fromarray(colorize(np.asarray(vals[: report.grid[0] * report.grid[1]]).reshape(report.grid))) \
                .resize((report.grid[1] * 16, report.grid[0] * 16), Image.NEAREST).save(out / f"{name}.png")
    layers = [k for k in report.attention if k.startswith("layer") and "." not in k]
    series = {s: [report.agreement[l][s]["pearson"] for l in layers] for s in report.saliency}
    _bar_chart("Pearson(attention of layer, saliency)", series, layers).save(out / "agreement_by_layer.png")
    return out
