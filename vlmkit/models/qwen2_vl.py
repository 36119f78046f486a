"""Qwen2-VL and Qwen2.5-VL adapter: smart_resize (no crop, no pad), tokens row-major over the merged grid."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlmkit.models._adapter import FamilyAdapter, register_adapter
from vlmkit.models._layout import AxisMap, ImageLayout, View


@register_adapter("qwen2_vl", "qwen2_5_vl")
class QwenVLAdapter(FamilyAdapter):
    fallback_template = (
        "<|im_start|>user\n<|vision_start|>{image}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    )

    def image_info(self, inputs: dict, index: int) -> tuple[int, int, int]:
        t, h, w = (int(x) for x in inputs["image_grid_thw"][index])
        return t, h, w

    def _merge(self) -> int:
        return int(self.processor.image_processor.merge_size)

    def _num_tokens(self, size: tuple[int, int], info: Any) -> int:
        t, h, w = info
        return t * h * w // self._merge() ** 2

    def _image_layout(self, size: tuple[int, int], positions: np.ndarray, info: Any) -> ImageLayout:
        t, h, w = info
        m = self._merge()
        rows, cols = h // m, w // m
        patch = int(self.processor.image_processor.patch_size)
        amap = AxisMap(*size).resize(w * patch, h * patch)
        views = []
        for k in range(t):  # a still image has t == 1
            pos = positions[k * rows * cols:(k + 1) * rows * cols]
            views.append(View("image" if t == 1 else f"frame{k}", pos, (rows, cols), amap.cell_boxes(rows, cols)))
        return ImageLayout(tuple(size), views)
