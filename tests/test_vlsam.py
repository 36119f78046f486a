"""VL-SAM: attention flow for a generated word, point prompts, name mapping, detect() and the detect CLI."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from vlmkit.grounding.flow import FlowRecorder, rollout, word_maps
from vlmkit.grounding.names import ClipNames, ExactNames, normalize_name, parse_names
from vlmkit.grounding.points import label_components, points_from_map
from vlmkit.models.vlm import VLM

sa = pytest.importorskip("segment_anything")
from vlmkit.grounding.segmenters import SamSegmenter, build_tiny_sam  # noqa: E402
from vlmkit.grounding.train_sam import SMOKE_CONFIG, export  # noqa: E402
from vlmkit.grounding.vlsam import Detection, detect, draw_detections, to_coco  # noqa: E402

Q = "what color is the red circle ?"


_img = tiny.random_image


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def vlm(request):
    return VLM(*tiny.build(request.param))


@pytest.fixture(scope="module")
def seg():
    torch.manual_seed(0)
    return SamSegmenter(build_tiny_sam(SMOKE_CONFIG))


# ------------------------------------------------------------------------------------------------ flow
def _reference(vlm, image, text, rows):
    """Flow rows computed from eager ``output_attentions`` of a second copy of the same weights."""
    model, _ = tiny.build(vlm.family)
    model.load_state_dict(vlm.model.state_dict())
    model.set_attn_implementation("eager")
    inputs, _, _, _ = vlm.encode([image], [text])
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions  # L x [1, H, N, N]
    mats, naive = [], []
    for a in att:
        s = a[0].double()
        w = s.amax(-1).mean(-1)
        mats.append((w[:, None, None] * s).mean(0))
        naive.append(s.mean(0)[rows])
    n = mats[0].shape[0]
    count = torch.tril(torch.ones(n, n)).sum(0)
    return mats, naive, count


def test_flow_matches_eager_reference_and_changes_nothing(vlm):
    image, answer = _img(30, 20), "red circle"
    text = vlm.prompt(Q) + " " + answer
    base = vlm.forward([image], [Q])
    rec = FlowRecorder(vlm.processor.tokenizer, ["red circle"], [answer], rows="name")
    with vlm.intervene(rec):
        vlm.forward([image], [Q])  # a plain forward (no answer) still runs with the recorder: nothing changes
    assert torch.allclose(vlm.forward([image], [Q]), base, atol=1e-5)
    wm = word_maps(vlm, [image], [Q], [answer], ["red circle"], rows="name")[0]
    assert wm.found and len(wm.rows) == 2  # the answer's "red circle", not the question's
    ids = vlm.encode([image], [text])[0]["input_ids"][0].tolist()
    tok = vlm.processor.tokenizer
    assert tok.convert_ids_to_tokens(ids[wm.rows[0]:wm.rows[-1] + 1]) == ["red", "circle"]
    assert wm.rows[0] > len(ids) - 4
    mats, naive, count = _reference(vlm, image, text, wm.rows)
    cols = torch.as_tensor(wm.layout.positions)
    want_flow = rollout(mats, None, wm.rows)[:, cols].mean(0).numpy()
    want_reg = rollout(mats, count, wm.rows)[:, cols].mean(0).numpy()
    want_naive = torch.stack(naive).mean(0).mean(0)[cols].numpy()
    np.testing.assert_allclose(wm.values["flow"], want_flow, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(wm.values["flow_reg"], want_reg, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(wm.values["naive"], want_naive, rtol=1e-3, atol=1e-6)
    assert not np.allclose(want_flow / want_flow.sum(), want_reg / want_reg.sum())
    px = wm.to_pixels("flow_reg")
    assert px.shape == (20, 30) and np.isfinite(px).all()


def test_flow_recorder_holds_one_matrix_per_layer_and_batches(vlm):
    images = [_img(30, 20), _img(20, 26, 1), _img(24, 24, 2)]
    qs = [Q, "is there a blue square ?", "where is the green circle ?"]
    answers = ["yes", "no", "left"]
    words = ["red circle", "blue square", "green circle"]
    rec = FlowRecorder(vlm.processor.tokenizer, words, answers)
    from vlmkit.grounding.flow import _run_forward

    texts = [vlm.prompt(q) + " " + a for q, a in zip(qs, answers)]
    with vlm.intervene(rec):
        _run_forward(vlm, images, texts)
    for b in range(3):
        n = len(vlm.encode([images[b]], [texts[b]])[0]["input_ids"][0])
        assert set(rec.weighted[b]) == set(range(vlm.adapter.num_layers))
        assert all(m.shape == (n, n) for m in rec.weighted[b].values())
        assert rec.col_count[b].tolist() == list(range(n, 0, -1))
    # batched maps equal one-by-one maps (left padding is cropped away)
    together = word_maps(vlm, images, qs, answers, words)
    for b in range(3):
        alone = word_maps(vlm, [images[b]], [qs[b]], [answers[b]], [words[b]])[0]
        for k in ("naive", "flow", "flow_reg"):
            np.testing.assert_allclose(together[b].values[k], alone.values[k], rtol=1e-4, atol=1e-6)


def test_missing_word_falls_back_to_answer_row(vlm):
    wm = word_maps(vlm, [_img(30, 20)], [Q], ["yes"], ["purple hexagon"], rows="name")[0]
    assert not wm.found and len(wm.rows) == 1


# ------------------------------------------------------------------------------------------------ points
def test_points_from_map_takes_largest_region_and_its_peak():
    m = np.full((40, 60), 0.1)
    m[5:10, 5:10] = 1.0  # small but highest
    m[20:35, 30:55] = 0.8  # large
    m[25, 40] = 0.9
    m[39, 0] = 0.0
    pair = points_from_map(m, threshold=0.5, peak="max")
    assert pair.positive == (40.5, 25.5) and pair.negative == (0.5, 39.5)
    centre = points_from_map(m, threshold=0.5).positive  # value-weighted centre of the blob's top band
    assert abs(centre[0] - 42.5) < 1.5 and abs(centre[1] - 27.5) < 1.5
    assert pair.region[25, 40] and not pair.region[7, 7]
    within = np.zeros_like(m, bool)
    within[5:10, 5:10] = True
    p2 = points_from_map(m, within=within)
    assert 5 <= p2.positive[0] < 10 and not within[int(p2.negative[1]), int(p2.negative[0])]
    assert points_from_map(np.ones((5, 5))) is None
    pts, labels = pair.arrays()
    assert pts.shape == (2, 2) and labels.tolist() == [1, 0]


def test_label_components():
    m = np.array([[1, 1, 0, 1], [0, 1, 0, 1], [1, 0, 0, 0]], bool)
    labels, n = label_components(m)
    assert n == 3 and labels[0, 0] == labels[1, 1] != labels[0, 3] and labels[2, 0] not in (0, labels[0, 0])


# ------------------------------------------------------------------------------------------------ names
def test_parse_and_exact_names():
    assert parse_names("red circle, two blue stars and a green square.") == ["red circle", "blue star",
                                                                             "green square"]
    assert parse_names("the image shows three white crosses.") == ["white cross"]
    assert parse_names("yes") == []
    assert normalize_name("The Red Circles!") == "red circle"
    ex = ExactNames(["red circle", "blue star"])
    assert ex("a red circle") == "red circle" and ex("purple circle") is None
    assert ExactNames()("Two Blue Stars") == "blue star"


def test_clip_names_with_tiny_open_clip():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8,
                                                         head_width=16),
                           text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
    tok = open_clip.get_tokenizer("ViT-B-32")
    cats = ["red circle", "blue star", "green square"]
    mapper = ClipNames(cats, model, lambda texts: tok(texts)[:, :16])
    assert mapper("red circle") == "red circle"  # exact match first
    sim = mapper.similarities("crimson disc")
    assert sim.shape == (3,) and mapper("crimson disc") == cats[int(sim.argmax())]
    strict = ClipNames(cats, model, lambda texts: tok(texts)[:, :16], min_similarity=1.01)
    assert strict("crimson disc") is None


# ------------------------------------------------------------------------------------------------ detect
def _check(dets, w, h):
    assert isinstance(dets, list)
    for d in dets:
        assert isinstance(d, Detection) and d.mask.shape == (h, w) and d.mask.dtype == bool and d.mask.any()
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and 0 <= d.score <= 1


def test_detect_open_vocabulary_and_open_ended(vlm, seg):
    image = _img(48, 40)
    dets = detect(image, vlm=vlm, segmenter=seg, names=["red circle", "blue square"], max_new_tokens=4,
                  questions=3, min_sam_score=-9.0, min_area=0.0)  # random SAM: keep whatever it segments
    _check(dets, 48, 40)
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    assert {d.label for d in dets} <= {"red circle", "blue square"}
    assert all(d.source["view"] in ("full", "top_left", "top_right", "bottom_left", "bottom_right") for d in dets)
    assert len(dets) > 0
    _check(detect(image, vlm=vlm, segmenter=seg, max_new_tokens=4, multiscale=False, questions=1), 48, 40)
    only = detect(image, vlm=vlm, segmenter=seg, names=["red circle"], mapper=ExactNames(["blue square"]),
                  max_new_tokens=4, multiscale=False)
    assert only == []  # the mapper drops names outside the category list


def test_degenerate_images(vlm, seg):
    assert detect(_img(1, 1), vlm=vlm, segmenter=seg, names=["red circle"]) == []
    huge = Image.new("RGB", (3000, 2000), (120, 120, 120))
    dets = detect(huge, vlm=vlm, segmenter=seg, names=["red circle"], max_new_tokens=4, questions=1,
                  multiscale=False, work_side=512)
    _check(dets, 3000, 2000)
    blank = detect(Image.new("RGB", (64, 48), (90, 90, 90)), vlm=vlm, segmenter=seg, max_new_tokens=4,
                   questions=2, multiscale=False)
    _check(blank, 64, 48)


def test_coco_output_and_overlay(tmp_path):
    pycoco = pytest.importorskip("pycocotools.coco")
    mask = np.zeros((20, 30), bool)
    mask[5:10, 3:12] = True
    dets = [Detection("red circle", 0.9, (3.0, 5.0, 12.0, 10.0), mask), Detection("odd thing", 0.5,
                                                                                (0, 0, 4, 4), mask)]
    res = to_coco(dets, image_id=7)
    assert res[0]["category_id"] == 1 + __import__("vlmkit.data.scenes", fromlist=["x"]).object_names().index(
        "red circle")
    assert res[1]["category_id"] == 65 and res[0]["bbox"] == [3.0, 5.0, 9.0, 5.0]
    gt = {"images": [{"id": 7, "width": 30, "height": 20}], "categories": [{"id": i, "name": str(i)}
                                                                             for i in range(1, 66)],
          "annotations": []}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    coco = pycoco.COCO(str(tmp_path / "gt.json"))
    loaded = coco.loadRes(res)
    assert loaded.anns[1]["area"] == 45
    out = draw_detections(Image.new("RGB", (30, 20)), dets)
    assert out.size == (30, 20) and np.asarray(out)[7, 5].any()


def test_detect_cli(tmp_path, seg):
    from vlmkit.grounding import cli

    model, proc = tiny.build("llava")
    model.save_pretrained(tmp_path / "vlm")
    proc.save_pretrained(tmp_path / "vlm")
    export(seg.sam, SMOKE_CONFIG, tmp_path / "sam")
    _img(40, 32).save(tmp_path / "in.png")
    p = argparse.ArgumentParser()
    cli.add_parsers(p.add_subparsers())
    args = p.parse_args(["detect", str(tmp_path / "in.png"), "--model", str(tmp_path / "vlm"), "--sam-checkpoint",
                         str(tmp_path / "sam"), "--names", "red circle", "--out", str(tmp_path / "d.json"),
                         "--viz", str(tmp_path / "v.png"), "--no-multiscale"])
    assert args.func(args) == 0
    res = json.loads((tmp_path / "d.json").read_text())
    assert isinstance(res, list) and all(r["label"] == "red circle" for r in res)
    assert Image.open(tmp_path / "v.png").size == (40, 32)
    bad = p.parse_args(["detect", str(tmp_path / "in.png"), "--model", str(tmp_path / "vlm"), "--sam-checkpoint",
                        str(tmp_path / "missing.pth")])
    from vlmkit.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no such file"):
        bad.func(bad)
