"""Screenshot tokens for the pointer head: native-resolution tiling, keys at the language-model input, query states.

* :func:`tile_image` cuts a screenshot into tiles of the processor's input size (``native_tile``, 96 px for the
  default model), so small GUI targets span whole image tokens; :func:`tile_geometry` / :func:`tiles_to_grid` put
  every tile's tokens on one regular grid over the screenshot, each with its pixel box in the original image.
* :func:`lm_inputs_embeds` reads the visual token embeddings as they enter the language model (a forward pre-hook on
  ``vlm.adapter.language_model()`` that stops the call before any decoder layer); with ``grad=True`` the graph back
  into the vision tower and projector is kept (backbone fine-tuning).
* :func:`screen_features` = the keys of a whole screenshot (:class:`ScreenFeatures`); :func:`query_states` = the
  last-layer hidden state at the last prompt position for the whole screenshot + instruction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlmkit.errors import VlmkitError

PROBE = "describe the image"  # the prompt beside each tile when its keys are read


@dataclass
class ScreenFeatures:
    """Keys of one screenshot: ``keys [N, d]`` (row-major over ``grid``), ``boxes [N, 4]`` token boxes in original
    pixels, ``valid`` bool ``[N]`` (tokens covering some of the image), ``size`` = (W, H)."""

    keys: torch.Tensor
    boxes: np.ndarray
    valid: np.ndarray
    grid: tuple[int, int]
    size: tuple[int, int]
    tile_grid: tuple[int, int] = (0, 0)  # tokens per tile (rows, cols)

    @property
    def centres(self) -> np.ndarray:
        return np.stack([(self.boxes[:, 0] + self.boxes[:, 2]) / 2, (self.boxes[:, 1] + self.boxes[:, 3]) / 2], 1)

    def pos(self) -> torch.Tensor:
        """Token centres in [0, 1], ``[N, 2]``."""
        W, H = self.size
        return torch.as_tensor(self.centres / np.array([W, H]), dtype=torch.float32)


class _Stop(Exception):
    """Raised by the pre-hook once the language model's inputs are read: the decoder never runs."""


def native_tile(vlm) -> int:
    """The processor's square input size (the default model: 96); 336 if the processor does not say."""
    ip = getattr(vlm.processor, "image_processor", None)
    for attr in ("crop_size", "size"):
        v = getattr(ip, attr, None) or {}
        v = v if isinstance(v, dict) else vars(v) if hasattr(v, "__dict__") else {}
        for key in ("height", "shortest_edge"):
            if v.get(key):
                return int(v[key])
    return 336


def tile_image(image, tile: int, max_tiles: int):
    """Tiles of ``tile`` px over the screenshot (down-scaled only if it needs more than ``max_tiles``).

    Returns ``(tiles, origins [(x, y)] in scaled px, scale, (rows, cols))``; the right/bottom edge is padded with
    the image's corner colour.
    """
    W, H = image.size
    s = min(1.0, math.sqrt(max_tiles * tile * tile / (W * H)))
    while math.ceil(W * s / tile) * math.ceil(H * s / tile) > max_tiles:
        s *= 0.97
    rows, cols = math.ceil(H * s / tile), math.ceil(W * s / tile)
    im = image if s == 1.0 else image.resize((max(1, round(W * s)), max(1, round(H * s))))
    from PIL import Image

    canvas = Image.new("RGB", (cols * tile, rows * tile), image.getpixel((W - 1, H - 1)))
    canvas.paste(im, (0, 0))
    tiles, origins = [], []
    for r in range(rows):
        for c in range(cols):
            tiles.append(canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)))
            origins.append((c * tile, r * tile))
    return tiles, origins, s, (rows, cols)


def image_token_index(layouts, pads) -> list[tuple[np.ndarray, Any]]:
    """Per row: (sequence positions of its image tokens in the finest layout view, that view)."""
    out = []
    for b, lay in enumerate(layouts):
        view = max(lay.images[0].views, key=lambda v: v.positions.size)
        out.append((view.positions + pads[b], view))
    return out


def lm_inputs_embeds(vlm, images: list | None = None, grad: bool = False, encoded: tuple | None = None):
    """``(inputs_embeds [B, L, d] at the language-model input, layouts, pads)``; the decoder never runs.

    ``grad=True`` keeps the autograd graph back into the vision tower and projector (backbone fine-tuning);
    ``encoded``: pre-encoded ``(inputs, layouts, pads)`` of ``[PROBE]`` prompts (see :meth:`VLM.session`)."""
    box: dict[str, torch.Tensor] = {}

    def pre(module, args, kwargs):
        box["e"] = kwargs["inputs_embeds"] if grad else kwargs["inputs_embeds"].detach()
        raise _Stop

    qs = None if encoded is not None else [PROBE] * len(images)
    with vlm.session(images, qs, encoded=encoded) as (inputs, layouts, pads), torch.set_grad_enabled(grad):
        h = vlm.adapter.language_model().register_forward_pre_hook(pre, with_kwargs=True)
        try:
            vlm.model(**inputs)
        except _Stop:
            pass
        finally:
            h.remove()
    if "e" not in box:
        raise VlmkitError(f"{vlm.family}: the language model was not called with inputs_embeds")
    return box["e"], layouts, pads


def lm_input_tokens(vlm, images: list, grad: bool = False) -> list[tuple[torch.Tensor, Any]]:
    """For each image: (``[n, d]`` image-token embeddings at the language-model input, the finest layout view)."""
    e, layouts, pads = lm_inputs_embeds(vlm, images, grad)
    return [(e[b, torch.as_tensor(pos)].float(), view) for b, (pos, view) in enumerate(image_token_index(layouts, pads))]


def tile_geometry(views: list, origins: list, scale: float, tiles: tuple[int, int], size: tuple[int, int]):
    """Where a tiled screenshot's keys lie: ``(boxes [N, 4] in original px, valid [N], grid, tile_grid)``.

    ``views``: each tile's layout view (token boxes in tile px), ``origins``: tile corners in scaled px, ``tiles`` =
    (rows, cols) of tiles; keys are in row-major order over ``grid = (rows * gr, cols * gc)`` (see
    :func:`tiles_to_grid`)."""
    gr, gc = views[0].grid
    if any(v.grid != (gr, gc) for v in views):
        raise VlmkitError("tiles of one size gave different token grids")
    rows, cols = tiles
    boxes = np.stack([(v.boxes + np.array([ox, oy, ox, oy])) / scale for v, (ox, oy) in zip(views, origins)])
    boxes = boxes.reshape(rows, cols, gr, gc, 4).transpose(0, 2, 1, 3, 4).reshape(-1, 4)
    W, H = size
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, W)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, H)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes, valid, (rows * gr, cols * gc), (gr, gc)


def tiles_to_grid(emb: torch.Tensor, tiles: tuple[int, int], tile_grid: tuple[int, int]) -> torch.Tensor:
    """``emb [B, rows * cols, gr * gc, d]`` (tile t = r * cols + c, tokens row-major) -> keys ``[B, N, d]`` in
    row-major order over the whole screenshot's grid ``(rows * gr, cols * gc)``."""
    (rows, cols), (gr, gc) = tiles, tile_grid
    B, d = emb.shape[0], emb.shape[-1]
    return emb.reshape(B, rows, cols, gr, gc, d).permute(0, 1, 3, 2, 4, 5).reshape(B, rows * gr * cols * gc, d)


def screen_features(vlm, image, tile: int, max_tiles: int, batch: int = 16, grad: bool = False) -> ScreenFeatures:
    """Keys of the whole screenshot read tile by tile (see module doc); ``grad``: see :func:`lm_input_tokens`."""
    tiles, origins, s, rc = tile_image(image, tile, max_tiles)
    got = []
    for i in range(0, len(tiles), batch):
        got += lm_input_tokens(vlm, tiles[i:i + batch], grad=grad)
    boxes, valid, grid, tile_grid = tile_geometry([v for _, v in got], origins, s, rc, image.size)
    keys = tiles_to_grid(torch.stack([e for e, _ in got])[None], rc, tile_grid)[0].cpu()
    return ScreenFeatures(keys, boxes, valid, grid, image.size, tile_grid)


def query_states(vlm, images: list | None, instructions: list[str] | None, prompt: str = "{instruction}",
                 encoded: tuple | None = None, device_out: bool = False) -> torch.Tensor:
    """``[B, d]`` last-layer hidden state at the last prompt position (whole screenshot + instruction).

    ``encoded``: pre-encoded ``(inputs, layouts, pads)`` (left padded) instead of images + instructions;
    ``device_out``: keep the result on the model's device (default: CPU)."""
    qs = None if encoded is not None else [prompt.format(instruction=t) for t in instructions]
    with vlm.session(images, qs, encoded=encoded) as (inputs, _, _), torch.no_grad():
        out = vlm.model(**inputs, output_hidden_states=True)
    q = out.hidden_states[-1][:, -1].float()
    return q if device_out else q.cpu()
