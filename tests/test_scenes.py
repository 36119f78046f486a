"""Scene generator: determinism, annotation consistency, the documented prior, COCO round-trip."""
import json

import numpy as np
import pytest

from vlmkit.data.scenes import (COLORS, PRIOR, RGB, SHAPES, STYLES, generate_scene, load_annotations,
                                object_frequencies, rle_decode, rle_encode, save_scenes)
from vlmkit.errors import InputError


def test_vocab_covers_the_issue():
    assert {"circle", "square", "triangle", "star", "cross", "heart", "diamond", "hexagon"} <= set(SHAPES)
    assert {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"} <= set(COLORS)


def test_same_seed_same_scene_and_different_seed_differs():
    a, b = generate_scene(123), generate_scene(123)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert [(o.name, o.box) for o in a.objects] == [(o.name, o.box) for o in b.objects]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    c = generate_scene(124)
    assert a.image.size != c.image.size or not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_arguments_are_honoured():
    sc = generate_scene(5, size=(200, 120), n_objects=3, style="plain")
    assert sc.image.size == (200, 120) and sc.image.mode == "RGB" and sc.style == "plain"
    assert 1 <= len(sc.objects) <= 3
    sizes = {generate_scene(s).image.size for s in range(20)}
    assert all(96 <= w <= 512 and 96 <= h <= 512 for w, h in sizes) and len(sizes) > 10
    assert {generate_scene(s).style for s in range(30)} == set(STYLES)


@pytest.mark.parametrize("kwargs", [dict(style="neon"), dict(size=10), dict(n_objects=0),
                                    dict(size=100, min_object_px=90)])
def test_bad_arguments_name_the_input(kwargs):
    with pytest.raises(InputError) as err:
        generate_scene(1, **kwargs)
    assert list(kwargs)[-1] in str(err.value)


def test_negative_seed_rejected():
    with pytest.raises(InputError, match="seed"):
        generate_scene(-1)


def _nearest_color(rgb):
    return min(COLORS, key=lambda c: float(np.sum((np.asarray(RGB[c], float) - rgb) ** 2)))


def _core_color(arr, mask, r: int):
    """Nearest palette colour of the median pixel of ``mask`` shrunk by ``r`` px; None if too little is left."""
    core = mask & np.roll(mask, r, 0) & np.roll(mask, -r, 0) & np.roll(mask, r, 1) & np.roll(mask, -r, 1)
    return _nearest_color(np.median(arr[core], axis=0)) if core.sum() >= 10 else None


def test_masks_boxes_and_occlusion_are_consistent():
    overlaps = 0
    wrong_color = 0
    total = 0
    for seed in range(40):
        sc = generate_scene(seed, size=(160, 128) if seed % 2 else None)
        arr = np.asarray(sc.image).astype(float)
        w, h = sc.image.size
        cover = np.zeros((h, w), int)
        for o in sc.objects:
            assert o.mask.shape == (h, w) and o.mask.dtype == bool and o.mask.any()
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            inside = np.zeros_like(o.mask)
            inside[y0:y1, x0:x1] = True
            assert not (o.mask & ~inside).any(), "mask leaks outside its box"
            # tight: every edge row / column of the box holds mask pixels
            assert o.mask[y0].any() and o.mask[y1 - 1].any() and o.mask[:, x0].any() and o.mask[:, x1 - 1].any()
            assert o.name == f"{o.color} {o.shape}"
            cover += o.mask
            # the visible pixels show the object's own colour (so occluded parts were removed from the mask)
            seen = _core_color(arr, o.mask, 1)
            if seen is not None:
                total += 1
                wrong_color += seen != o.color
        # visible masks never overlap; boxes of some objects do (occlusion happens)
        assert cover.max() <= 1
        boxes = [o.box for o in sc.objects]
        overlaps += sum(1 for i, a in enumerate(boxes) for b in boxes[i + 1:]
                        if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
    assert overlaps > 0
    assert total > 80 and wrong_color / total < 0.05


def test_object_frequencies_are_a_distribution_following_the_prior():
    freq = object_frequencies()
    assert len(freq) == len(SHAPES) * len(COLORS)
    assert abs(sum(freq.values()) - 1) < 1e-9
    top_shape = max(PRIOR["shape_weights"], key=PRIOR["shape_weights"].get)
    top_color = max(PRIOR["color_weights"], key=PRIOR["color_weights"].get)
    assert next(iter(freq)) == f"{top_color} {top_shape}"


def test_priors_hold_statistically():
    n = 300
    present = [set(generate_scene(10_000 + s, size=96, style="plain").names) for s in range(n)]
    freq = list(object_frequencies())
    count = {k: sum(k in p for p in present) for k in freq}
    common, rare = sum(count[k] for k in freq[:8]), sum(count[k] for k in freq[-8:])
    assert common > 4 * max(1, rare)
    # pairs from the prior co-occur far more often than chance
    for a, b, p in PRIOR["pairs"][:4]:
        with_a = [s for s in present if a in s]
        without_a = [s for s in present if a not in s]
        assert len(with_a) >= 10
        p_with = np.mean([b in s for s in with_a])
        p_without = np.mean([b in s for s in without_a])
        assert p_with > 0.25 and p_with > 3 * p_without


def test_rle_round_trip_and_coco_convention():
    rng = np.random.default_rng(0)
    for m in [rng.random((7, 5)) > 0.5, np.ones((4, 3), bool), np.zeros((3, 3), bool)]:
        rle = rle_encode(m)
        assert sum(rle["counts"]) == m.size and rle["size"] == list(m.shape)
        assert np.array_equal(rle_decode(rle), m)
    m = np.zeros((2, 2), bool)
    m[1, 0] = True  # column-major: [F, T, F, F] -> counts [1, 1, 2]
    assert rle_encode(m)["counts"] == [1, 1, 2]
    assert rle_encode(np.ones((2, 2), bool))["counts"] == [0, 4]


def test_save_and_load_round_trip(tmp_path):
    scenes = [generate_scene(s, size=(120, 100)) for s in range(3)]
    out = save_scenes(scenes, tmp_path / "set", prefix="t")
    coco = json.loads((out / "instances_coco.json").read_text())
    assert len(coco["images"]) == 3 and len(coco["categories"]) == 64
    assert len(coco["annotations"]) == sum(len(s.objects) for s in scenes)
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    objs = [o for s in scenes for o in s.objects]
    for ann, o in zip(coco["annotations"], objs):
        x0, y0, x1, y1 = o.box
        assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
        assert cats[ann["category_id"]] == o.name
        assert np.array_equal(rle_decode(ann["segmentation"]), o.mask)
        assert ann["area"] == int(o.mask.sum())
    loaded = load_annotations(out)
    assert [d["file_name"] for d in loaded] == ["t_00000.png", "t_00001.png", "t_00002.png"]
    for d, sc in zip(loaded, scenes):
        assert d["seed"] == sc.seed and (d["width"], d["height"]) == sc.image.size
        for a, o in zip(d["objects"], sc.objects):
            assert a["name"] == o.name and tuple(a["box"]) == o.box and np.array_equal(a["mask"], o.mask)


def test_load_annotations_missing_dir_is_clear(tmp_path):
    with pytest.raises(InputError, match="save_scenes"):
        load_annotations(tmp_path)


def test_variety_changes_the_drawing_not_the_default_scene_or_the_annotations():
    plain = [generate_scene(s) for s in range(12)]
    again = [generate_scene(s, variety=False) for s in range(12)]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(plain, again))
    varied = [generate_scene(s, variety=True) for s in range(12)]
    twice = generate_scene(3, variety=True)
    assert np.array_equal(np.asarray(twice.image), np.asarray(varied[3].image))           # deterministic
    assert sum(not np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(plain, varied)) >= 10
    assert all(sc.meta.get("variety") for sc in varied) and not any("variety" in sc.meta for sc in plain)
    wrong = total = 0
    for seed in range(40):                                    # masks and colours stay truthful under variety
        sc = generate_scene(seed, variety=True)
        arr = np.asarray(sc.image).astype(float)
        cover = np.zeros(arr.shape[:2], int)
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            assert o.mask.any() and o.mask[y0].any() and o.mask[:, x1 - 1].any()
            cover += o.mask
            seen = _core_color(arr, o.mask, 3)                # inside outlines up to 3 px
            if seen is not None:
                total += 1
                wrong += seen != o.color
        assert cover.max() <= 1
    assert total > 60 and wrong / total < 0.08


def test_variety_proportions_stay_within_each_shape():
    from vlmkit.data import scene_variety

    rng = np.random.default_rng(0)
    for _ in range(50):
        star = np.array(scene_variety.polygon("star", rng))
        radii = np.hypot(star[:, 0], star[:, 1] - 0.05)
        assert len(star) in (10, 12) and radii[::2].min() > 0.99 and 0.29 < radii[1::2].max() < 0.56
        cross = np.array(scene_variety.polygon("cross", rng))
        assert 0.18 <= cross[1, 0] <= 0.42                                   # arm half-width
        diamond = np.array(scene_variety.polygon("diamond", rng))
        assert 0.45 <= diamond[1, 0] <= 0.8 and diamond[0, 1] == -1.0
        square = np.array(scene_variety.polygon("square", rng))
        assert np.abs(square).max() <= 0.78 + 1e-9 and len(square) in (4, 24)
    assert scene_variety.polygon("circle", rng) is None
