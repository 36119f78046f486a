"""Qwen2-VL and Qwen2.5-VL adapter: smart_resize (no crop, no pad), tokens row-major over the merged grid."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vlmkit.errors import InputError
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

    # ------------------------------------------------------------------ vision-tower attention (methods: PAINT)
    def _visual(self) -> torch.nn.Module:
        return getattr(self.model, "model", self.model).visual

    def vision_attention_modules(self) -> list[torch.nn.Module]:
        return [block.attn for block in self._visual().blocks]

    def vision_feature_layer(self) -> int:
        return len(self.vision_attention_modules()) - 1  # the merger reads the last block

    def vision_token_scores(self, inputs: dict, layers, kind: str = "auto") -> dict:
        """See :meth:`FamilyAdapter.vision_token_scores`.

        The Qwen towers have no CLS token, so the score is a documented substitute: the mean attention each patch
        receives from the query rows of its attention block (the whole image; a window in Qwen2.5's windowed
        layers), summed over heads, then averaged over the ``merge x merge`` patches that form one LLM token.
        """
        pixels, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        if pixels is None or grid is None:
            raise InputError("vision_token_scores needs processor outputs with pixel_values and image_grid_thw")
        kind = self._vision_kind(kind)
        modules = self.vision_attention_modules()
        specs = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        index = {spec: self._vision_layer_index(spec, len(modules)) for spec in specs}
        visual = self._visual()
        param = next(visual.parameters())
        grid = grid.to(param.device)
        with torch.no_grad(), self._vision_tap(modules, {i: kind for i in index.values()}) as rec:
            visual(pixels.to(device=param.device, dtype=param.dtype), grid_thw=grid)
        unit = self._merge() ** 2
        order = None
        if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5: the tower runs on window-ordered merge units
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                      window_size=visual.window_size, patch_size=visual.patch_size)
            order = torch.argsort(window_index.to(param.device))
        sizes = (grid.prod(-1) // unit).tolist()
        out = {}
        for spec, i in index.items():
            patches = torch.cat([r[0].sum(0) for r in rec[i]])  # [total_patches], tower order
            tokens = patches.reshape(-1, unit).mean(-1)
            if order is not None:
                tokens = tokens[order]
            out[spec] = list(torch.split(tokens.cpu(), sizes))
        return out

    # ------------------------------------------------------------------ text-only branch (methods: PAI, VCD)
    def text_prompt(self, question: str) -> str:
        text = super().text_prompt(question)
        if not getattr(self.processor, "chat_template", None):  # the fallback template wraps an empty image
            text = text.replace("<|vision_start|><|vision_end|>", "")
        return text

    def branch_position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """``[3, B, 1]`` M-RoPE positions of a branch's decode token from its own ``rope_deltas`` (installed with
        :meth:`swap_state`); ``None`` for a text-only branch (no deltas: plain positions from the cache length)."""
        deltas = getattr(getattr(self.model, "model", self.model), "rope_deltas", None)
        if deltas is None:
            return None
        pos = attention_mask.long().sum(-1, keepdim=True) - 1 + deltas.to(attention_mask.device)
        return pos[None].expand(3, -1, -1)
