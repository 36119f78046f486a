"""LLaVA-1.5 adapter: one view, a row-major grid over the (padded / resized / centre-cropped) square."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlmkit.errors import LayoutError
from vlmkit.models._adapter import FamilyAdapter, register_adapter
from vlmkit.models._layout import AxisMap, ImageLayout, View


def _get(size: Any, key: str):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def resized_hw(height: int, width: int, size: Any) -> tuple[int, int]:
    """Output ``(height, width)`` of a transformers image-processor ``resize`` for a ``size`` dict."""
    from transformers.image_transforms import get_size_with_aspect_ratio
    from transformers.image_utils import get_image_size_for_max_height_width

    short_e, long_e = _get(size, "shortest_edge"), _get(size, "longest_edge")
    if short_e and long_e:
        return tuple(get_size_with_aspect_ratio((height, width), short_e, long_e))
    if short_e:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = short_e, int(short_e * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if _get(size, "max_height") and _get(size, "max_width"):
        return tuple(get_image_size_for_max_height_width((height, width), size["max_height"], size["max_width"]))
    if _get(size, "height") and _get(size, "width"):
        return int(size["height"]), int(size["width"])
    raise LayoutError(f"unsupported image-processor size {dict(size)!r}")


def center_crop(amap: AxisMap, crop_h: int, crop_w: int) -> None:
    """Follow transformers' centre crop (which pads first when the crop is larger than the image)."""
    w, h = (int(round(s)) for s in amap.size)
    if crop_w > w or crop_h > h:
        left = (crop_w - w) // 2 if crop_w > w else 0
        top = (crop_h - h) // 2 if crop_h > h else 0
        w2 = max(w, crop_w)
        h2 = max(h, crop_h)
        amap.pad(left, top, w2, h2)
        w, h = w2, h2
    amap.crop(int((w - crop_w) / 2.0), int((h - crop_h) / 2.0), crop_w, crop_h)


@register_adapter("llava")
class LlavaAdapter(FamilyAdapter):
    fallback_template = "USER: {image}\n{question} ASSISTANT:"

    def _extra_tokens(self) -> int:
        proc = self.processor
        n = int(getattr(proc, "num_additional_image_tokens", 0) or 0)
        if getattr(proc, "vision_feature_select_strategy", "default") == "default":
            n -= 1
        if n < 0:
            raise LayoutError("LLaVA processor with the 'default' strategy needs num_additional_image_tokens >= 1")
        return n

    def canvas(self, size: tuple[int, int]) -> AxisMap:
        """The processor's geometry for an original ``(width, height)``: pad-to-square, resize, centre crop."""
        ip = self.processor.image_processor
        w, h = size
        amap = AxisMap(w, h)
        if getattr(ip, "do_pad", False):
            side = max(w, h)
            amap.pad((side - w) // 2, (side - h) // 2, side, side)
        if getattr(ip, "do_resize", True):
            cw, ch = amap.size
            nh, nw = resized_hw(int(ch), int(cw), ip.size)
            amap.resize(nw, nh)
        if getattr(ip, "do_center_crop", False):
            crop = ip.crop_size
            center_crop(amap, int(crop["height"]), int(crop["width"]))
        return amap

    def _grid(self, size: tuple[int, int]) -> tuple[int, int, AxisMap]:
        amap = self.canvas(size)
        p = int(self.processor.patch_size)
        cw, ch = (int(round(s)) for s in amap.size)
        return ch // p, cw // p, amap

    def _num_tokens(self, size: tuple[int, int], info: Any) -> int:
        rows, cols, _ = self._grid(size)
        return rows * cols + self._extra_tokens()

    def _image_layout(self, size: tuple[int, int], positions: np.ndarray, info: Any) -> ImageLayout:
        rows, cols, amap = self._grid(size)
        p = int(self.processor.patch_size)
        extra = self._extra_tokens()
        boxes = amap.cell_boxes(rows, cols, (0.0, 0.0, cols * p, rows * p))
        view = View("image", positions[extra:], (rows, cols), boxes)
        return ImageLayout(tuple(size), [view], positions[:extra])
