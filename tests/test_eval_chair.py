"""CHAIR with hand-written captions: mention extraction (synonyms, plurals, colour lists), metrics, COCO path."""

import json
from pathlib import Path

import pytest

from vlmkit.errors import InputError
from vlmkit.eval.chair import (coco_mentions, judge_caption, load_chair_items, load_coco_chair, scene_mentions,
                               score_chair, tokenize)

FIX = Path(__file__).parent / "fixtures" / "eval"


def names(caption, fn=scene_mentions):
    return [m.name for m in fn(caption)]


@pytest.mark.parametrize("caption,expected", [
    ("A red circle.", ["red circle"]),
    ("Two blue squares and three yellow stars", ["blue square", "yellow star"]),
    ("a small bright green disc", ["green circle"]),
    ("red and blue crosses", ["red cross", "blue cross"]),
    ("red, white & black hexagons", ["red hexagon", "white hexagon", "black hexagon"]),
    ("a violet rhombus next to an orange plus sign", ["purple diamond", "orange cross"]),
    ("A purple heart-shaped object", ["purple heart"]),
    ("a large grey rectangle", ["gray square"]),
    ("There is a triangle.", ["triangle"]),
    ("The image shows a pink star and a teal dot", ["pink star", "teal circle"]),
    ("Red circles; the blue one is a square.", ["red circle", "square"]),  # no coreference
    ("The circle is red and the squares are blue and green.", ["red circle", "blue square", "green square"]),
    ("The circle is in the middle and red.", ["circle"]),
    ("A colorful abstract picture.", []),
])
def test_scene_mentions(caption, expected):
    assert names(caption) == expected


def test_tokenize_plurals():
    assert tokenize("Crosses, discs & puppies; rhombi glass") == ["cross", ",", "disc", "&", "puppy", "rhombus",
                                                                  "glass"]


def test_judge_scene_caption():
    gt = ["red circle", "blue square", "green star"]
    r = judge_caption("A red circle, a blue square, a yellow star and a triangle. Another red circle.", gt)
    assert r.mentioned == ["red circle", "blue square", "yellow star", "triangle"]  # each object once
    assert r.hallucinated == ["yellow star", "triangle"]
    assert r.covered == ["blue square", "red circle"]
    bare = judge_caption("A star and a circle.", gt)
    assert bare.hallucinated == [] and bare.covered == []  # bare shapes are fine but do not count for recall


def test_score_chair_by_hand():
    items = [
        ("1", "A red circle and a blue square.", ["red circle", "blue square"]),           # clean, full recall
        ("2", "A green star and a purple heart.", ["green star", "white cross"]),          # 1 of 2 hallucinated
        ("3", "Black hexagons, black hexagons everywhere.", ["black hexagon", "orange diamond", "red star"]),
        ("4", "Nothing recognisable here.", ["yellow triangle"]),
    ]
    s = score_chair(items)
    assert s.n == 4 and s.n_mentions == 2 + 2 + 1 + 0 and s.n_hallucinated == 1
    assert s.chair_s == pytest.approx(1 / 4)
    assert s.chair_i == pytest.approx(1 / 5)
    assert s.recall == pytest.approx((2 + 1 + 1 + 0) / (2 + 2 + 3 + 1))
    assert score_chair([]).chair_i == 0.0


def test_coco_mentions_synonyms_and_phrases():
    assert names("Two men ride bikes past a hot dog stand.", coco_mentions) == ["person", "bicycle", "hot dog"]
    assert names("A puppy sleeps on the sofa near a TV and a cell phone", coco_mentions) == [
        "dog", "couch", "tv", "cell phone"]
    assert names("a teddy bear and a bear", coco_mentions) == ["teddy bear", "bear"]


def test_coco_ground_truth_and_scoring():
    items = load_coco_chair(FIX / "coco_instances_mini.json", FIX / "coco_captions_mini.json")
    gt = {it.id: set(it.objects) for it in items}
    assert gt["1"] == {"person", "bicycle", "dining table"}  # table comes from the reference caption
    assert gt["2"] == {"hot dog"}
    assert items[0].image == "COCO_val2014_000000000001.jpg"
    s = score_chair([("1", "A woman on a bicycle with her dog.", items[0].objects),
                     ("2", "A hot dog with mustard.", items[1].objects)], kind="coco")
    assert s.n_hallucinated == 1 and s.chair_s == 0.5 and s.chair_i == pytest.approx(1 / 4)
    no_caps = load_coco_chair(FIX / "coco_instances_mini.json")
    assert set(no_caps[0].objects) == {"person", "bicycle"}
    with pytest.raises(InputError, match="COCO"):
        load_coco_chair(FIX / "screenspot_mobile.json")


def test_load_chair_items(tmp_path):
    p = tmp_path / "chair.json"
    p.write_text(json.dumps([{"image_id": 7, "image": "a.png", "objects": ["Red Circle", {"name": "blue star"}]},
                             {"image": "b.png"}]))
    items, errors = load_chair_items(p)
    assert items[0].id == "7" and items[0].objects == ["red circle", "blue star"]
    assert len(errors) == 1 and errors[0].line == 2
    with pytest.raises(InputError):
        judge_caption("x", [], kind="klingon")
