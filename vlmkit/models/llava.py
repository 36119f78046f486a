"""LLaVA-1.5 adapter: one view, a row-major grid over the (padded / resized / centre-cropped) square."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vlmkit.errors import InputError, LayoutError
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

    # ------------------------------------------------------------------ vision-tower attention (methods: PAINT)
    @property
    def has_cls_token(self) -> bool:
        """CLIP towers prepend a CLS token; other towers (e.g. SigLIP) have none."""
        return getattr(self.config.vision_config, "model_type", "") == "clip_vision_model"

    def _vision_tower(self) -> torch.nn.Module:
        return getattr(self.model, "model", self.model).vision_tower

    def vision_attention_modules(self) -> list[torch.nn.Module]:
        tower = self._vision_tower()
        tower = getattr(tower, "vision_model", tower)  # transformers 5 flattens CLIPVisionModel; older nests it
        return [layer.self_attn for layer in tower.encoder.layers]

    def vision_feature_layer(self) -> int:
        """The ViT layer producing ``hidden_states[vision_feature_layer]`` (the deepest one for a list)."""
        depth = len(self.vision_attention_modules())
        spec = self.config.vision_feature_layer
        hs = max((int(x) % (depth + 1) for x in spec), default=depth) if isinstance(spec, (list, tuple)) \
            else int(spec) % (depth + 1)
        return max(hs - 1, 0)  # hidden_states[0] is the embedding output, hidden_states[i] follows layer i - 1

    def vision_token_scores(self, inputs: dict, layers, kind: str = "auto") -> dict:
        """See :meth:`FamilyAdapter.vision_token_scores`. One ViT pass over ``pixel_values [n_images, 3, H, W]``;
        the CLS column is dropped so each image's scores cover its ``rows * cols`` patch tokens."""
        pixels = inputs.get("pixel_values")
        if pixels is None:
            raise InputError("vision_token_scores needs processor outputs with pixel_values (an image)")
        kind = self._vision_kind(kind)
        modules = self.vision_attention_modules()
        specs = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        index = {spec: self._vision_layer_index(spec, len(modules)) for spec in specs}
        tower = self._vision_tower()
        with torch.no_grad(), self._vision_tap(modules, {i: kind for i in index.values()}) as rec:
            tower(pixels.to(device=next(tower.parameters()).device, dtype=next(tower.parameters()).dtype))
        first = 1 if self.has_cls_token else 0
        return {spec: list(rec[i][0].sum(1)[:, first:].cpu()) for spec, i in index.items()}

    # ------------------------------------------------------------------ text-only branch (methods: PAI)
