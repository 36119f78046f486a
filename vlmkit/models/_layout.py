"""Image-token layouts: where each image token sits in the sequence and which pixels of the original image it covers.

A family adapter returns one :class:`Layout` per sample. Each image of the sample has one or more
:class:`View` s (LLaVA-1.5 and Qwen: one; LLaVA-NeXT: base + high-res; Idefics3/SmolVLM: tiles + global). A view is a
``rows x cols`` grid of tokens in row-major order; ``boxes[k]`` is the ``(x0, y0, x1, y1)`` pixel box of token ``k`` in
the *original* image (floats, clipped to the image; a token that covers only padding has a zero-area box).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlmkit.errors import LayoutError


@dataclass
class View:
    """One grid of image tokens.

    Attributes:
        name: "image", "base", "highres", "tile_r0_c1", "global", ...
        positions: int64 array ``[rows*cols]``, sequence positions of the grid's tokens in row-major order.
        grid: ``(rows, cols)``.
        boxes: float64 array ``[rows*cols, 4]``, ``(x0, y0, x1, y1)`` in original-image pixels.
    """

    name: str
    positions: np.ndarray
    grid: tuple[int, int]
    boxes: np.ndarray

    def __post_init__(self) -> None:
        self.positions = np.asarray(self.positions, dtype=np.int64)
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        rows, cols = self.grid
        if self.positions.shape != (rows * cols,) or self.boxes.shape != (rows * cols, 4):
            raise LayoutError(
                f"view {self.name!r}: grid {rows}x{cols} needs {rows * cols} positions and boxes, "
                f"got {self.positions.shape[0]} and {self.boxes.shape[0]}"
            )

    @property
    def valid(self) -> np.ndarray:
        """Bool ``[rows*cols]``: tokens whose box covers some of the original image."""
        return (self.boxes[:, 2] > self.boxes[:, 0]) & (self.boxes[:, 3] > self.boxes[:, 1])

    def to_dict(self) -> dict:
        return {"name": self.name, "positions": self.positions.tolist(), "grid": list(self.grid),
                "boxes": self.boxes.round(4).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "View":
        return cls(d["name"], np.array(d["positions"]), tuple(d["grid"]), np.array(d["boxes"]))


@dataclass
class ImageLayout:
    """All views of one image. ``extra_positions`` are image-token columns in no grid (LLaVA-NeXT newlines)."""

    size: tuple[int, int]  # original (width, height)
    views: list[View]
    extra_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        self.extra_positions = np.asarray(self.extra_positions, dtype=np.int64)

    @property
    def positions(self) -> np.ndarray:
        """All image-token positions of this image, sorted."""
        parts = [v.positions for v in self.views] + [self.extra_positions]
        return np.sort(np.concatenate(parts))

    def to_dict(self) -> dict:
        return {"size": list(self.size), "views": [v.to_dict() for v in self.views],
                "extra_positions": self.extra_positions.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageLayout":
        return cls(tuple(d["size"]), [View.from_dict(v) for v in d["views"]], np.array(d["extra_positions"]))


@dataclass
class Layout:
    """The image-token layout of one sample (positions relative to the sample's own, unpadded sequence)."""

    images: list[ImageLayout]

    @property
    def positions(self) -> np.ndarray:
        """int64 ``[image_tokens]``: every image-token position of the sample, sorted. Columns of attention maps."""
        if not self.images:
            return np.zeros(0, dtype=np.int64)
        return np.sort(np.concatenate([im.positions for im in self.images]))

    def column_index(self, positions: np.ndarray) -> np.ndarray:
        """Map sequence positions to column indices of ``self.positions``."""
        cols = np.searchsorted(self.positions, positions)
        return cols

    def shifted(self, offset: int) -> "Layout":
        """The same layout with every position moved by ``offset`` (e.g. the left padding of a batch row)."""
        def move(v: View) -> View:
            return View(v.name, v.positions + offset, v.grid, v.boxes)
        return Layout([ImageLayout(im.size, [move(v) for v in im.views], im.extra_positions + offset)
                       for im in self.images])

    def check(self, image_positions: np.ndarray) -> None:
        """Raise :class:`LayoutError` unless the layout covers exactly ``image_positions`` (from ``input_ids``)."""
        mine = self.positions
        image_positions = np.sort(np.asarray(image_positions, dtype=np.int64))
        if mine.shape != image_positions.shape or not np.array_equal(mine, image_positions):
            raise LayoutError(
                f"layout has {mine.size} image tokens but input_ids hold {image_positions.size}; "
                "the processor settings and the adapter disagree (please report this with the image size)"
            )

    def to_dict(self) -> dict:
        return {"images": [im.to_dict() for im in self.images]}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls([ImageLayout.from_dict(im) for im in d["images"]])


class AxisMap:
    """A per-axis affine map ``canvas = scale * original + offset``, composed through the processor's steps.

    Adapters follow an image through pad / resize / crop, then map token cells of the final canvas back with
    :meth:`cell_boxes`.
    """

    def __init__(self, width: int, height: int) -> None:
        self.orig = (width, height)
        self.size = (float(width), float(height))  # current canvas (w, h)
        self.sx, self.sy, self.ox, self.oy = 1.0, 1.0, 0.0, 0.0

    def pad(self, left: float, top: float, new_w: float, new_h: float) -> "AxisMap":
        self.ox += left
        self.oy += top
        self.size = (float(new_w), float(new_h))
        return self

    def resize(self, new_w: float, new_h: float) -> "AxisMap":
        fx, fy = new_w / self.size[0], new_h / self.size[1]
        self.sx, self.ox, self.sy, self.oy = self.sx * fx, self.ox * fx, self.sy * fy, self.oy * fy
        self.size = (float(new_w), float(new_h))
        return self

    def crop(self, left: float, top: float, new_w: float, new_h: float) -> "AxisMap":
        return self.pad(-left, -top, new_w, new_h)

    def cell_boxes(self, rows: int, cols: int, region: tuple[float, float, float, float] | None = None) -> np.ndarray:
        """Boxes ``[rows*cols, 4]`` in original pixels of a ``rows x cols`` grid laid over ``region`` of the canvas.

        ``region`` is ``(x0, y0, x1, y1)`` in canvas pixels (default: the whole canvas). Boxes are clipped to the image.
        """
        x0, y0, x1, y1 = region if region is not None else (0.0, 0.0, self.size[0], self.size[1])
        xs = np.linspace(x0, x1, cols + 1)
        ys = np.linspace(y0, y1, rows + 1)
        ox = np.clip((xs - self.ox) / self.sx, 0.0, self.orig[0])
        oy = np.clip((ys - self.oy) / self.sy, 0.0, self.orig[1])
        gx0, gy0 = np.meshgrid(ox[:-1], oy[:-1])
        gx1, gy1 = np.meshgrid(ox[1:], oy[1:])
        return np.stack([gx0, gy0, gx1, gy1], axis=-1).reshape(-1, 4)


def image_token_positions(input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """Positions of ``image_token_id`` in a 1-D id sequence."""
    return np.flatnonzero(np.asarray(input_ids) == image_token_id).astype(np.int64)


def split_runs(positions: np.ndarray) -> list[np.ndarray]:
    """Split sorted positions into maximal runs of consecutive integers."""
    if positions.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    return np.split(positions, breaks)
