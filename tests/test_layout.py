"""Image-token layouts of all six families, with tiny processors and with real-size processor settings.

Every case runs the real transformers processor on a grey image with a red rectangle. Checks: the layout covers
exactly the image tokens of ``input_ids``; pixel boxes lie inside the original image, do not overlap within a view and
tile the region they cover; and each token's box predicts how red the processor's own pixels of that token are
(the token order is rebuilt from ``pixel_values`` the way each model consumes it). Real-size processors run without
a model (the tiny model only supplies the config's token ids).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from vlmkit.errors import LayoutError
from vlmkit.models import adapter_class
from vlmkit.models._layout import image_token_positions

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm")
SIZES = [(301, 37), (45, 290), (97, 97)]  # (width, height): very wide, very tall, square not divisible by patches
KINDS = ("tiny", "real")
GREY, RED = (128, 128, 128), (255, 0, 0)


def rect_for(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The painted rectangle ``(x0, y0, x1, y1)`` for an image of ``size``."""
    w, h = size
    return round(0.3 * w), round(0.2 * h), round(0.75 * w), round(0.6 * h)


def painted(size: tuple[int, int]) -> Image.Image:
    img = Image.new("RGB", size, GREY)
    img.paste(RED, rect_for(size))
    return img


@pytest.fixture(scope="module")
def adapters():
    """``get(family, kind)`` -> adapter over the tiny model (config only) and a tiny or real-size processor."""
    models, made = {}, {}

    def get(family: str, kind: str):
        if (family, kind) not in made:
            if family not in models:
                models[family] = tiny.build(family)
            model, proc = models[family]
            if kind == "real":
                proc = tiny.real_processor(family)
            made[family, kind] = adapter_class(model.config.model_type)(model, proc)
        return made[family, kind]

    return get


@pytest.fixture(scope="module")
def cases(adapters):
    """``get(family, kind, size)`` -> ``(adapter, inputs, layout)`` for one painted image, cached per module."""
    done = {}

    def get(family: str, kind: str, size: tuple[int, int]):
        if (family, kind, size) not in done:
            ad = adapters(family, kind)
            inputs = ad.encode([painted(size)], [ad.prompt("what color is the square ?")])
            layouts, pads = ad.layouts(inputs, [[size]])
            assert pads == [0]
            done[family, kind, size] = (ad, inputs, layouts[0])
        return done[family, kind, size]

    return get


ALL = [pytest.param(f, k, s, id=f"{f}-{k}-{s[0]}x{s[1]}") for f in FAMILIES for k in KINDS for s in SIZES]


# ---------------------------------------------------------------- token counts


@pytest.mark.parametrize("family,kind,size", ALL)
def test_layout_covers_exactly_the_image_tokens(cases, family, kind, size):
    ad, inputs, layout = cases(family, kind, size)
    found = image_token_positions(inputs["input_ids"][0].numpy(), ad.image_token_id)
    assert found.size > 0
    layout.check(found)  # raises LayoutError on any mismatch
    assert layout.positions.size == found.size
    assert np.array_equal(layout.positions, found)
    (im,) = layout.images
    assert im.size == size
    assert len(np.unique(im.positions)) == im.positions.size  # no position claimed twice


def test_real_size_token_counts(cases):
    """The settings of the real checkpoints give their known per-view grids."""
    for size in SIZES:
        assert cases("llava", "real", size)[2].positions.size == 576
        base, highres = cases("llava_next", "real", size)[2].images[0].views
        assert base.grid == (24, 24) and highres.grid[0] <= 3 * 24 and highres.grid[1] <= 3 * 24
        assert {v.grid for v in cases("idefics3", "real", size)[2].images[0].views} == {(13, 13)}
        assert {v.grid for v in cases("smolvlm", "real", size)[2].images[0].views} == {(8, 8)}
        for fam in ("qwen2_vl", "qwen2_5_vl"):
            _, inputs, layout = cases(fam, "real", size)
            t, h, w = inputs["image_grid_thw"][0].tolist()
            assert layout.images[0].views[0].grid == (h // 2, w // 2)
            assert 56 * 56 <= h * w * 14 * 14 <= 28 * 28 * 1280


def test_view_structure(cases):
    """LLaVA-NeXT: base + highres with one newline per highres row; Idefics3/SmolVLM: row-major tiles + global last."""
    for kind in KINDS:
        for size in SIZES:
            im = cases("llava_next", kind, size)[2].images[0]
            base, hr = im.views
            assert (base.name, hr.name) == ("base", "highres")
            assert im.extra_positions.size == hr.grid[0]  # "default" strategy: CLS dropped, one newline per row
            assert base.positions.max() < hr.positions.min()
            rows = np.concatenate([hr.positions.reshape(hr.grid), im.extra_positions[:, None]], axis=1)
            assert np.array_equal(rows.reshape(-1), np.arange(rows.size) + rows.min())  # newline ends each row
            for fam in ("idefics3", "smolvlm"):
                views = cases(fam, kind, size)[2].images[0].views
                assert views[-1].name == "global"
                names = [v.name for v in views[:-1]]
                r = max((int(n.split("_")[1][1:]) for n in names), default=-1) + 1
                c = max((int(n.split("_")[2][1:]) for n in names), default=-1) + 1
                assert names == [f"tile_r{i}_c{j}" for i in range(r) for j in range(c)]
                starts = [v.positions[0] for v in views]
                assert starts == sorted(starts)
                for v in views:
                    assert np.array_equal(v.positions, np.arange(v.positions.size) + v.positions[0])


# ---------------------------------------------------------------- pixel boxes


def _cover_counts(boxes: np.ndarray):
    """Coordinate-compressed coverage: ``(xs, ys, count[len(ys)-1, len(xs)-1])`` of how many boxes cover each cell."""
    b = np.round(boxes, 6)
    xs, ys = np.unique(b[:, [0, 2]]), np.unique(b[:, [1, 3]])
    count = np.zeros((ys.size - 1, xs.size - 1), dtype=np.int64)
    ix, iy = np.searchsorted(xs, b[:, [0, 2]]), np.searchsorted(ys, b[:, [1, 3]])
    for (x0, x1), (y0, y1) in zip(ix, iy):
        count[y0:y1, x0:x1] += 1
    return xs, ys, count


@pytest.mark.parametrize("family,kind,size", ALL)
def test_boxes_inside_disjoint_and_tiling(cases, family, kind, size):
    _, _, layout = cases(family, kind, size)
    w, h = size
    (im,) = layout.images
    union = []
    for v in im.views:
        b = v.boxes
        assert np.all(b[:, 0] >= 0) and np.all(b[:, 1] >= 0) and np.all(b[:, 2] <= w) and np.all(b[:, 3] <= h)
        assert np.all(b[:, 2] >= b[:, 0]) and np.all(b[:, 3] >= b[:, 1])
        valid = b[v.valid]
        assert valid.shape[0] > 0, f"view {v.name} covers nothing"
        _, _, count = _cover_counts(valid)
        # every elementary cell of the bounding box is covered exactly once: no overlap, no gap
        assert count.min() == 1 and count.max() == 1, f"view {v.name}: boxes overlap or leave holes"
        union.append(valid)
    if family == "llava":  # centre crop: one rectangle inside the image, already checked
        return
    whole = [np.concatenate(union)]
    if family in ("idefics3", "smolvlm") and len(im.views) > 1:
        whole.append(np.concatenate([v.boxes[v.valid] for v in im.views[:-1]]))  # the tiles alone
    for boxes in whole:
        xs, ys, count = _cover_counts(boxes)
        assert (xs[0], ys[0], xs[-1], ys[-1]) == (0, 0, w, h)
        assert count.min() >= 1
    if len(whole) == 2:
        assert _cover_counts(whole[1])[2].max() == 1  # tiles do not overlap each other


# ---------------------------------------------------------------- paint a known region


def _redness(pixels: torch.Tensor, ip) -> torch.Tensor:
    """``R - G`` in [0, 1] units of un-normalised ``pixels [..., 3, h, w]`` -> ``[..., h, w]`` (grey 0, red 1)."""
    mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(ip.image_std, dtype=torch.float32).view(3, 1, 1)
    x = pixels.float() * std + mean
    return x[..., 0, :, :] - x[..., 1, :, :]


def _cells(red: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Mean of ``red [..., h, w]`` over a ``rows x cols`` grid -> ``[..., rows, cols]``."""
    *lead, h, w = red.shape
    return red.reshape(*lead, rows, h // rows, cols, w // cols).mean(dim=(-3, -1))


def measured_redness(family: str, proc, inputs) -> np.ndarray:
    """Redness of every grid token of sample 0, in sequence order, read from the processor's ``pixel_values``."""
    ip, pv = proc.image_processor, inputs["pixel_values"]
    if family == "llava":
        side = pv.shape[-1] // proc.patch_size
        return _cells(_redness(pv[0], ip), side, side).reshape(-1).numpy()
    if family == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        tile = pv.shape[-1]
        side = tile // proc.patch_size
        image_size = inputs["image_sizes"][0].tolist()
        nph, npw = get_anyres_image_grid_shape(image_size, ip.image_grid_pinpoints, tile)
        red = _cells(_redness(pv[0, :1 + nph * npw], ip), side, side)  # [1 + tiles, side, side]
        stitched = red[1:].reshape(nph, npw, side, side).permute(0, 2, 1, 3).reshape(1, nph * side, npw * side)
        return torch.cat([red[0].reshape(-1), unpad_image(stitched, image_size).reshape(-1)]).numpy()
    if family in ("qwen2_vl", "qwen2_5_vl"):
        t, h, w = inputs["image_grid_thw"][0].tolist()
        p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        patches = pv[: t * h * w].reshape(-1, 3, tp, p, p)[:, :, 0]  # [patches, 3, p, p], merge blocks consecutive
        return _redness(patches, ip).mean(dim=(-2, -1)).reshape(-1, m * m).mean(dim=1).numpy()
    side = math.isqrt(proc.image_seq_len)  # idefics3 / smolvlm: tiles in pixel_values order = text order
    real = pv[0].flatten(1).abs().sum(dim=1) > 0
    return _cells(_redness(pv[0][real], ip), side, side).reshape(-1).numpy()


def geometric_redness(layout, rect, cell: float | None = None) -> np.ndarray:
    """Per grid token, in sequence order: area of its box inside ``rect`` over the area of a whole cell of its view.

    ``cell``: the area of an unclipped cell in original pixels; by default the largest box of the view (cells of one
    view all have the same area under the affine map, so this holds whenever one cell lies fully inside the image).
    """
    pos, frac = [], []
    for v in layout.images[0].views:
        b = v.boxes
        area = cell if cell is not None else ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).max()
        ox = np.clip(np.minimum(b[:, 2], rect[2]) - np.maximum(b[:, 0], rect[0]), 0, None)
        oy = np.clip(np.minimum(b[:, 3], rect[3]) - np.maximum(b[:, 1], rect[1]), 0, None)
        pos.append(v.positions)
        frac.append(ox * oy / area)
    order = np.argsort(np.concatenate(pos))
    return np.concatenate(frac)[order]


@pytest.mark.parametrize("family,kind,size", ALL)
def test_painted_region_lands_on_the_predicted_tokens(cases, family, kind, size):
    ad, inputs, layout = cases(family, kind, size)
    want = geometric_redness(layout, rect_for(size))
    got = measured_redness(family, ad.processor, inputs)
    assert got.shape == want.shape
    assert want.max() > 0.3, "the rectangle should cover a good part of some token"
    # tokens clearly inside / outside the rectangle by geometry are red / grey in the processed pixels
    inside, outside = want > 0.8, want < 0.2
    assert outside.any()  # (tiny grids and Qwen's real 1-token-tall grid may have no token fully inside)
    assert np.all(got[inside] > 0.5) and np.all(got[outside] < 0.5)
    # the sets "mostly red" agree except on tokens the edge cuts near the middle; resampling blurs about a pixel
    sure = np.abs(want - 0.5) > 0.25
    assert np.array_equal((got > 0.5)[sure], (want > 0.5)[sure])
    assert np.abs(got - want).mean() < 0.05
    assert np.abs(got - want).max() < 0.25


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_llava_pad_to_square(size):
    """LLaVA with ``do_pad`` (the original repo's ``expand2square``): the grid covers the whole image, padding cells
    have zero-area boxes, and the painted region still lands on the predicted tokens."""
    model, proc = tiny.build("llava", pad=True)
    ad = adapter_class("llava")(model, proc)
    inputs = ad.encode([painted(size)], [ad.prompt("what ?")])
    (layout,), _ = ad.layouts(inputs, [[size]])
    (view,) = layout.images[0].views
    assert view.valid.all() == (size[0] == size[1])  # a far-from-square image leaves padding-only cells
    xs, ys, count = _cover_counts(view.boxes[view.valid])
    assert (xs[0], ys[0], xs[-1], ys[-1]) == (0, 0) + size and count.min() == 1 and count.max() == 1
    want = geometric_redness(layout, rect_for(size), cell=(max(size) / view.grid[1]) ** 2)  # square canvas
    got = measured_redness("llava", proc, inputs)  # padding is the mean colour: redness 0.02
    assert np.abs(got - want).max() < 0.25 and np.abs(got - want).mean() < 0.05


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics_unsplit_image_is_global_only(family):
    model, proc = tiny.build(family)
    proc.image_processor.do_image_splitting = False
    ad = adapter_class(family)(model, proc)
    size = SIZES[0]
    inputs = ad.encode([painted(size)], [ad.prompt("what ?")])
    (layout,), _ = ad.layouts(inputs, [[size]])
    assert [v.name for v in layout.images[0].views] == ["global"]
    assert layout.positions.size == proc.image_seq_len == int((inputs["input_ids"] == ad.image_token_id).sum())
    want, got = geometric_redness(layout, rect_for(size)), measured_redness(family, proc, inputs)
    assert np.abs(got - want).max() < 0.25


# ---------------------------------------------------------------- batches, models, errors


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_matches_single(adapters, family, kind):
    ad = adapters(family, kind)
    sizes = [SIZES[0], SIZES[2]]
    prompts = [ad.prompt("what color is the square in the image ?"), ad.prompt("what ?")]
    inputs = ad.encode([painted(s) for s in sizes], prompts)
    layouts, pads = ad.layouts(inputs, [[s] for s in sizes])
    assert max(pads) > 0 and min(pads) == 0  # one row is left-padded
    for b, (size, prompt) in enumerate(zip(sizes, prompts)):
        alone_inputs = ad.encode([painted(size)], [prompt])
        alone = ad.layouts(alone_inputs, [[size]])[0][0]
        assert layouts[b].to_dict() == alone.to_dict()
        ids = inputs["input_ids"][b].numpy()
        assert np.all(ids[layouts[b].positions + pads[b]] == ad.image_token_id)
        assert np.array_equal(ids[pads[b]:], alone_inputs["input_ids"][0].numpy())


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_accepts_the_tiny_processor(cases, family):
    """The tiny builders are consistent: the model's image features match the processor's token count."""
    ad, inputs, layout = cases(family, "tiny", SIZES[2])
    with torch.no_grad():
        out = ad.model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert ad.model.config.text_config.num_hidden_layers == 2


@pytest.mark.parametrize("family", ["llava_next", "idefics3", "smolvlm"])
def test_wrong_image_size_is_a_clear_error(cases, family):
    ad, inputs, _ = cases(family, "tiny", SIZES[2])
    with pytest.raises(LayoutError):
        ad.layouts(inputs, [[SIZES[0]]])
