"""``AttentionMaps``: captured text-to-image attention of one sample, and its way back to image pixels."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vlmkit.models._layout import Layout, View


@dataclass
class AttentionMaps:
    """Attention of one sample's text rows onto its image-token columns.

    Attributes:
        prefill: float32 ``[layers, heads, prompt_rows, image_tokens]`` (prompt rows listed in ``rows``).
        decode: float32 ``[steps, layers, heads, image_tokens]``; step ``s`` is the row that predicts answer token
            ``s + 1`` (empty when nothing was generated or decode rows were not requested).
        layers: language-model layer index of each entry of the ``layers`` axis.
        rows: prompt position of each prefill row (positions in the sample's unpadded sequence).
        layout: image-token layout; column ``j`` is sequence position ``layout.positions[j]``.
        tokens: prompt token strings; generated: answer token strings.
    """

    prefill: torch.Tensor
    decode: torch.Tensor
    layers: list[int]
    rows: list[int]
    layout: Layout
    tokens: list[str] = field(default_factory=list)
    generated: list[str] = field(default_factory=list)

    @property
    def num_heads(self) -> int:
        return int(self.prefill.shape[1])

    # ------------------------------------------------------------------ selection
    def _layer_index(self, layers) -> list[int]:
        if layers is None:
            return list(range(len(self.layers)))
        layers = [layers] if isinstance(layers, int) else list(layers)
        missing = [l for l in layers if l not in self.layers]
        if missing:
            raise ValueError(f"layers {missing} were not captured (captured: {self.layers})")
        return [self.layers.index(l) for l in layers]

    def select(self, *, layers=None, heads=None, source: str = "auto", rows=None, steps=None) -> torch.Tensor:
        """Slice the maps: returns ``[layers, heads, rows_or_steps, image_tokens]``.

        ``source``: ``"prefill"``, ``"decode"`` or ``"auto"`` (prefill if it has rows, else decode). ``rows`` picks
        prefill rows by prompt position (default all); ``steps`` picks decode steps (default all).
        """
        li = self._layer_index(layers)
        if source == "auto":
            source = "prefill" if self.prefill.shape[2] > 0 else "decode"
        if source == "prefill":
            t = self.prefill[li]
            if rows is not None:
                rows = [rows] if isinstance(rows, int) else list(rows)
                t = t[:, :, [self.rows.index(r) for r in rows]]
        elif source == "decode":
            t = self.decode.permute(1, 2, 0, 3)[li]  # [L, H, S, C]
            if steps is not None:
                t = t[:, :, [steps] if isinstance(steps, int) else list(steps)]
        else:
            raise ValueError(f"source={source!r}: use 'prefill', 'decode' or 'auto'")
        if heads is not None:
            t = t[:, [heads] if isinstance(heads, int) else list(heads)]
        return t

    def aggregate(self, *, layers=None, heads=None, source: str = "auto", rows=None, steps=None,
                  reduce: str = "mean") -> torch.Tensor:
        """One value per image token, ``[image_tokens]``: ``reduce`` ("mean" or "max") over layers, heads, rows/steps."""
        t = self.select(layers=layers, heads=heads, source=source, rows=rows, steps=steps)
        if t.numel() == 0:
            raise ValueError("nothing captured for that selection")
        t = t.reshape(-1, t.shape[-1])
        return t.mean(0) if reduce == "mean" else t.max(0).values

    # ------------------------------------------------------------------ grids and pixels
    def _view(self, view, image: int = 0) -> View:
        views = self.layout.images[image].views
        if isinstance(view, str):
            for v in views:
                if v.name == view:
                    return v
            raise ValueError(f"no view {view!r}; views: {[v.name for v in views]}")
        return views[view]

    def to_grid(self, view=0, values: torch.Tensor | None = None, *, image: int = 0, **agg) -> torch.Tensor:
        """``[rows, cols]`` map of one view (index or name); ``values [image_tokens]`` default :meth:`aggregate`."""
        values = self.aggregate(**agg) if values is None else values
        v = self._view(view, image)
        cols = self.layout.column_index(v.positions)
        return values[torch.as_tensor(cols)].reshape(v.grid)

    def to_pixels(self, values: torch.Tensor | None = None, *, image: int = 0, views=None, **agg) -> np.ndarray:
        """``[H, W]`` float32 map over the original image: each view's tokens painted into their pixel boxes,
        averaged where views overlap. ``views``: names or indices to use (default all)."""
        values = self.aggregate(**agg) if values is None else values
        values = values.detach().float().cpu().numpy()
        im = self.layout.images[image]
        width, height = im.size
        acc = np.zeros((height, width), np.float64)
        cnt = np.zeros((height, width), np.float64)
        chosen = im.views if views is None else [self._view(v, image) for v in views]
        for v in chosen:
            cols = self.layout.column_index(v.positions)
            val = values[cols]
            canvas = np.zeros((height, width), np.float64)
            hit = np.zeros((height, width), bool)
            b = np.rint(v.boxes).astype(np.int64)
            for k in np.flatnonzero(v.valid):
                x0, y0, x1, y1 = b[k]
                x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)  # a sub-pixel token still marks its pixel
                canvas[y0:y1, x0:x1] = val[k]
                hit[y0:y1, x0:x1] = True
            acc += canvas
            cnt += hit
        return (acc / np.maximum(cnt, 1)).astype(np.float32)

    def overlay(self, image, *, alpha: float = 0.5, values: torch.Tensor | None = None, **agg):
        """The original image (PIL or path) with the pixel map blended on top as a heat map. Returns a PIL image."""
        from vlmkit.viz import heat_overlay

        return heat_overlay(image, self.to_pixels(values, **agg), alpha=alpha)

    def save_png(self, path, image=None, **agg) -> Path:
        """Write the heat map (over ``image`` when given, else alone, normalised to 0..255) as a PNG."""
        from PIL import Image

        from vlmkit.viz import colorize

        path = Path(path)
        if image is not None:
            self.overlay(image, **agg).save(path)
        else:
            Image.fromarray(colorize(self.to_pixels(**agg))).save(path)
        return path

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Save as one safetensors file (tensors) with the metadata as JSON in its header."""
        from safetensors.torch import save_file

        meta = {"layers": self.layers, "rows": self.rows, "layout": self.layout.to_dict(), "tokens": self.tokens,
                "generated": self.generated}
        path = Path(path)
        save_file({"prefill": self.prefill.contiguous(), "decode": self.decode.contiguous()}, str(path),
                  metadata={"vlmkit.attention_maps": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path) -> "AttentionMaps":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["vlmkit.attention_maps"])
            prefill, decode = f.get_tensor("prefill"), f.get_tensor("decode")
        return cls(prefill=prefill, decode=decode, layers=meta["layers"], rows=meta["rows"],
                   layout=Layout.from_dict(meta["layout"]), tokens=meta["tokens"], generated=meta["generated"])
