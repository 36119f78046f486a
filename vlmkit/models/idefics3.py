"""Idefics3 and SmolVLM adapter: row-major tiles of the resized image plus a squashed global view.

Text layout of one split image (``Idefics3Processor.replace_image_token`` / SmolVLM's ``_prompt_split_image``)::

    <fake><row_1_col_1><image>*L <fake><row_1_col_2><image>*L ... \\n ... \\n\\n<fake><global-img><image>*L<fake>

so an image's tokens are ``rows*cols + 1`` runs of ``L = image_seq_len`` consecutive positions: tiles row-major, then
the global image. An unsplit image is the global run alone. Within a run, tokens are row-major over a
``sqrt(L) x sqrt(L)`` grid (``pixel_shuffle`` keeps raster order).

Geometry (``Idefics3ImageProcessor._preprocess``; SmolVLM's image processor is identical): resize so the longest edge is
``size.longest_edge`` (``_resize_output_size_rescale_to_max_len``, capped at ``MAX_IMAGE_SIZE``), then
``resize_for_vision_encoder`` rounds both sides up to multiples of ``M = max_image_size.longest_edge``; the result is
cut into ``M x M`` tiles when it is larger than ``M``, and the whole image is squashed to ``M x M`` for the global view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmkit.errors import LayoutError
from vlmkit.models._adapter import FamilyAdapter, register_adapter
from vlmkit.models._layout import AxisMap, ImageLayout, View
from vlmkit.models.llava import _get


def _resize_helpers():
    try:
        from transformers.models.idefics3 import image_processing_idefics3 as m
    except ImportError:  # torchvision missing: the PIL backend has the same functions
        from transformers.models.idefics3 import image_processing_pil_idefics3 as m
    return m._resize_output_size_rescale_to_max_len, m._resize_output_size_scale_below_upper_bound, m.MAX_IMAGE_SIZE


@dataclass
class _Split:
    """How one image is cut: ``rows x cols`` tiles of ``tile`` pixels over a ``width x height`` canvas."""

    rows: int  # 0 when the image is not split
    cols: int
    width: int
    height: int
    tile: int


@register_adapter("idefics3")
class Idefics3Adapter(FamilyAdapter):
    fallback_template = "<|begin_of_text|>User:{image}{question}<end_of_utterance>\nAssistant:"

    def language_model(self):
        """Idefics3 / SmolVLM keep the language model at ``model.model.text_model``."""
        inner = getattr(self.model, "model", self.model)
        lm = getattr(inner, "text_model", None)
        return lm if lm is not None else super().language_model()

    def encode(self, images: list, prompts: list[str]) -> dict:
        """As :meth:`FamilyAdapter.encode`, images nested per prompt (SmolVLM's processor needs ``[[img], ...]``)."""
        nested = [im if isinstance(im, (list, tuple)) else [im] for im in images]
        return super().encode(nested, prompts)

    def _seq_len(self) -> int:
        return int(self.processor.image_seq_len)

    def _side(self) -> int:
        n = self._seq_len()
        side = math.isqrt(n)
        if side * side != n:
            raise LayoutError(f"{type(self.processor).__name__}: image_seq_len={n} is not a square grid")
        return side

    def split(self, size: tuple[int, int]) -> _Split:
        """Rows/cols of tiles for an original ``(width, height)``, recomputed exactly as the image processor does."""
        rescale_to_max_len, scale_below_upper_bound, max_side = _resize_helpers()
        ip = self.processor.image_processor
        tile = int(_get(ip.max_image_size, "longest_edge"))
        w, h = size
        if getattr(ip, "do_resize", True):
            longest = _get(ip.size, "longest_edge")
            if longest:
                h, w = rescale_to_max_len(h, w, max_len=int(longest))
                h, w = scale_below_upper_bound(h, w, max_len=max_side)
            elif _get(ip.size, "height") and _get(ip.size, "width"):
                h, w = int(_get(ip.size, "height")), int(_get(ip.size, "width"))
            else:
                raise LayoutError(f"unsupported Idefics3 image-processor size {dict(ip.size)!r}")
        if not getattr(ip, "do_image_splitting", True):
            return _Split(0, 0, tile, tile, tile)
        aspect = w / h  # resize_for_vision_encoder
        if w >= h:
            w = math.ceil(w / tile) * tile
            h = math.ceil(int(w / aspect) / tile) * tile
        else:
            h = math.ceil(h / tile) * tile
            w = math.ceil(int(h * aspect) / tile) * tile
        if h > tile or w > tile:
            return _Split(math.ceil(h / tile), math.ceil(w / tile), w, h, tile)
        return _Split(0, 0, w, h, tile)

    def _num_tokens(self, size: tuple[int, int], info: Any) -> int:
        s = self.split(size)
        return (s.rows * s.cols + 1) * self._seq_len()

    def _image_layout(self, size: tuple[int, int], positions: np.ndarray, info: Any) -> ImageLayout:
        s, n, side = self.split(size), self._seq_len(), self._side()
        runs = [positions[k * n:(k + 1) * n] for k in range(s.rows * s.cols + 1)]
        for k, run in enumerate(runs):
            if run.shape[0] != n or run[-1] - run[0] != n - 1:
                raise LayoutError(f"image {size[0]}x{size[1]}: image-token run {k} is not {n} consecutive positions; "
                                  "the processor's row/col split and the adapter disagree")
        w, h = size
        views = []
        for r in range(s.rows):
            for c in range(s.cols):
                amap = AxisMap(w, h).resize(s.width, s.height).crop(c * s.tile, r * s.tile, s.tile, s.tile)
                views.append(View(f"tile_r{r}_c{c}", runs[r * s.cols + c], (side, side), amap.cell_boxes(side, side)))
        glob = AxisMap(w, h).resize(s.tile, s.tile)
        views.append(View("global", runs[-1], (side, side), glob.cell_boxes(side, side)))
        return ImageLayout(tuple(size), views)


@register_adapter("smolvlm")
class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: Idefics3's layout (same image processor and prompt expansion); only the prompt wrapper differs."""

    fallback_template = "<|im_start|>User:{image}{question}<end_of_utterance>\nAssistant:"
