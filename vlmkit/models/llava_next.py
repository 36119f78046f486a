"""LLaVA-NeXT (LLaVA-1.6) adapter: a squashed base view plus the unpadded, stitched high-resolution tile grid.

Token order of one image (transformers 5.x ``LlavaNextModel.pack_image_features``)::

    [extra (CLS, only with the "full" strategy)] base side x side (row-major)
    then for each row of the unpadded high-res grid: its cols tokens, then one ``image_newline`` token

The high-res grid comes from: ``select_best_resolution`` -> aspect-preserving resize (``get_patch_output_size``) ->
centred zero pad to the best resolution -> crop-size tiles (row-major) -> per-tile resize / centre crop -> patch grid
per tile -> tiles stitched into one ``(nph*ph) x (npw*pw)`` map -> ``unpad_image`` drops whole rows or columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlmkit.errors import LayoutError
from vlmkit.models._adapter import FamilyAdapter, register_adapter
from vlmkit.models._layout import AxisMap, ImageLayout, View
from vlmkit.models.llava import _get, center_crop, resized_hw


@dataclass
class _Plan:
    """Geometry of one image. Sizes are ``(height, width)`` unless named otherwise."""

    orig: tuple[int, int]  # original (H, W), as the model sees it (``image_sizes``)
    tile: tuple[int, int]  # processed tile shape (pixel_values[..., h, w])
    cells: tuple[int, int]  # patch grid of one tile (ph, pw)
    best: tuple[int, int]  # best pinpoint resolution
    tiles: tuple[int, int]  # (nph, npw)
    keep: np.ndarray  # int64 [h' * w'], kept cells of the stitched grid (row-major flat indices)
    grid: tuple[int, int]  # (h', w') after unpadding
    extra: int  # leading extra tokens (CLS kept by the "full" strategy)

    @property
    def num_tokens(self) -> int:
        ph, pw = self.cells
        rows, cols = self.grid
        return self.extra + ph * pw + rows * (cols + 1)


@register_adapter("llava_next")
class LlavaNextAdapter(FamilyAdapter):
    fallback_template = "[INST] {image}\n{question} [/INST]"

    # ------------------------------------------------------------------ processor facts
    def _extra_tokens(self) -> int:
        proc = self.processor
        n = int(getattr(proc, "num_additional_image_tokens", 0) or 0)
        if getattr(proc, "vision_feature_select_strategy", None) == "default":
            n -= 1
        if n < 0:
            raise LayoutError("LLaVA-NeXT processor with the 'default' strategy needs num_additional_image_tokens >= 1")
        return n

    def _tile_pixels(self) -> int:
        """Side of the square tiles cut from the padded best-resolution image (the processor's ``patch_size``)."""
        ip = self.processor.image_processor
        crop, size = getattr(ip, "crop_size", None), ip.size
        if crop is not None and _get(crop, "height"):
            return int(_get(crop, "height"))
        if _get(size, "height"):
            return int(_get(size, "height"))
        return int(_get(size, "shortest_edge"))

    def _base_size(self) -> tuple[int, int]:
        """``(height, width)`` the whole image is squashed to for the base view."""
        size = self.processor.image_processor.size
        if _get(size, "height") and _get(size, "width"):
            return int(_get(size, "height")), int(_get(size, "width"))
        e = int(_get(size, "shortest_edge"))
        return e, e

    def _finish_tile(self, amap: AxisMap) -> AxisMap:
        """The per-tile ``resize(size)`` and ``center_crop(crop_size)`` that ``_preprocess`` applies to every tile."""
        ip = self.processor.image_processor
        if getattr(ip, "do_resize", True):
            w, h = (int(round(s)) for s in amap.size)
            nh, nw = resized_hw(h, w, ip.size)
            amap.resize(nw, nh)
        if getattr(ip, "do_center_crop", False):
            crop = ip.crop_size
            center_crop(amap, int(_get(crop, "height")), int(_get(crop, "width")))
        return amap

    # ------------------------------------------------------------------ layout
    def image_info(self, inputs: dict, index: int) -> dict:
        """``image_sizes`` row ``(H, W)`` of image ``index`` and the processed tile shape ``(h, w)``."""
        info: dict = {}
        sizes = inputs.get("image_sizes")
        if sizes is not None:
            row = sizes[index]
            info["orig"] = tuple(int(x) for x in (row.tolist() if hasattr(row, "tolist") else row))
        pv = inputs.get("pixel_values")
        if pv is not None:
            shape = pv.shape if hasattr(pv, "shape") else np.asarray(pv[0][0]).shape
            info["tile"] = (int(shape[-2]), int(shape[-1]))
        return info

    def _plan(self, size: tuple[int, int], info: Any) -> _Plan:
        from transformers.image_processing_utils import select_best_resolution
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        info = info or {}
        w, h = size
        orig = info.get("orig", (h, w))
        if tuple(orig) != (h, w):
            raise LayoutError(f"image of size {w}x{h} (WxH) but the processor saw {orig[1]}x{orig[0]} (image_sizes)")
        p = int(self.processor.patch_size)
        if "tile" in info:
            tile = info["tile"]
        else:
            crop = getattr(self.processor.image_processor, "crop_size", None)
            tile = (int(_get(crop, "height")), int(_get(crop, "width"))) if crop else (self._tile_pixels(),) * 2
        pinpoints = [list(x) for x in self.processor.image_processor.image_grid_pinpoints]
        best = tuple(int(x) for x in select_best_resolution([h, w], pinpoints))
        nph, npw = best[0] // tile[0], best[1] // tile[1]
        ph, pw = tile[0] // p, tile[1] // p
        if min(nph, npw, ph, pw) < 1:
            raise LayoutError(f"LLaVA-NeXT: pinpoint {best} / tile {tile} / patch {p} give an empty grid")
        stitched = torch.arange(nph * ph * npw * pw).view(1, nph * ph, npw * pw)
        kept = unpad_image(stitched, [h, w])[0]
        return _Plan((h, w), tile, (ph, pw), best, (nph, npw), kept.flatten().numpy().astype(np.int64),
                     (int(kept.shape[0]), int(kept.shape[1])), self._extra_tokens())

    def _num_tokens(self, size: tuple[int, int], info: Any) -> int:
        return self._plan(size, info).num_tokens

    def _highres_boxes(self, size: tuple[int, int], plan: _Plan) -> np.ndarray:
        """Boxes ``[nph*ph * npw*pw, 4]`` of the full stitched grid (before unpadding), row-major."""
        from transformers.image_processing_utils import get_patch_output_size
        from transformers.image_utils import ChannelDimension

        w, h = size
        (bh, bw), (nph, npw), (ph, pw) = plan.best, plan.tiles, plan.cells
        p = int(self.processor.patch_size)
        side = self._tile_pixels()
        shape_only = np.broadcast_to(np.zeros((), np.uint8), (1, h, w))  # no pixels, just the (C, H, W) shape
        new_h, new_w = get_patch_output_size(shape_only, (bh, bw), ChannelDimension.FIRST)
        paste_x, paste_y = (bw - new_w) // 2, (bh - new_h) // 2
        full = np.zeros((nph, ph, npw, pw, 4))
        for i in range(nph):
            for j in range(npw):
                amap = AxisMap(w, h).resize(new_w, new_h).pad(paste_x, paste_y, bw, bh)
                amap.crop(j * side, i * side, side, side)
                self._finish_tile(amap)
                full[i, :, j, :, :] = amap.cell_boxes(ph, pw, (0.0, 0.0, pw * p, ph * p)).reshape(ph, pw, 4)
        return full.reshape(-1, 4)

    def _image_layout(self, size: tuple[int, int], positions: np.ndarray, info: Any) -> ImageLayout:
        plan = self._plan(size, info)
        if positions.shape[0] != plan.num_tokens:
            raise LayoutError(f"LLaVA-NeXT image {size[0]}x{size[1]}: expected {plan.num_tokens} image tokens, "
                              f"found {positions.shape[0]}")
        w, h = size
        (ph, pw), (rows, cols), extra = plan.cells, plan.grid, plan.extra
        p = int(self.processor.patch_size)
        bh, bw = self._base_size()
        base_map = self._finish_tile(AxisMap(w, h).resize(bw, bh))
        base_boxes = base_map.cell_boxes(ph, pw, (0.0, 0.0, pw * p, ph * p))
        base = View("base", positions[extra:extra + ph * pw], (ph, pw), base_boxes)

        hr = positions[extra + ph * pw:].reshape(rows, cols + 1)
        highres = View("highres", hr[:, :cols].reshape(-1), (rows, cols), self._highres_boxes(size, plan)[plan.keep])
        newlines = hr[:, cols]
        return ImageLayout(tuple(size), [base, highres], np.concatenate([positions[:extra], newlines]))
