"""POPE scoring rules, metrics, loading of both row styles, and the POPE-set builder."""

import json
from pathlib import Path

import pytest

from vlmkit.data.pope import build_pope, question_for, write_pope
from vlmkit.errors import InputError
from vlmkit.eval.pope import (RULES, PopeRow, binary_metrics, load_pope, parse_answer, score_all_rules, score_pope,
                              split_from_name)

FIX = Path(__file__).parent / "fixtures" / "eval"

# answer -> expected (pope, pope_nt, strict); None = unparsed. First block is the table.
TABLE = [
    ("Yes.", ("yes", "yes", "yes")),
    ("Yes, there is a dog.", ("yes", "yes", None)),
    ("No, there is not.", ("no", "no", None)),
    ("There is no dog.", ("no", "no", None)),
    ("I don't think so", ("yes", "no", None)),
    ("NO", ("yes", "no", "no")),
    ("", ("yes", "yes", None)),
    # more: first-sentence cut (pope) vs whole answer (pope_nt)
    ("Yes. There is no cat though.", ("yes", "no", None)),
    ("no", ("no", "no", "no")),
    (" Yes! ", ("yes", "yes", "yes")),
    ("No.", ("no", "no", "no")),
    ("There isn't a dog.", ("yes", "no", None)),
    ("Not really", ("yes", "yes", None)),  # "Not" is in neither official list
    ("no,", ("no", "no", "no")),
    ("Nope", ("yes", "yes", None)),
    ("yes\nno", ("yes", "yes", None)),  # the rules split on single spaces only
]


@pytest.mark.parametrize("answer,expected", TABLE)
def test_rules_table(answer, expected):
    assert tuple(parse_answer(answer, r) for r in RULES) == expected


def test_unknown_rule_and_non_string():
    with pytest.raises(InputError, match="rule"):
        parse_answer("yes", "exact")
    with pytest.raises(InputError, match="string"):
        parse_answer(None, "pope")


def test_binary_metrics_by_hand():
    m = binary_metrics(["yes", "yes", "no", None, "no"], ["yes", "no", "no", "yes", "yes"])
    assert (m.tp, m.fp, m.tn, m.fn, m.unparsed, m.n) == (1, 1, 1, 2, 1, 5)
    assert m.accuracy == pytest.approx(2 / 5)
    assert m.precision == pytest.approx(1 / 2)
    assert m.recall == pytest.approx(1 / 3)
    assert m.f1 == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert m.yes_ratio == pytest.approx(2 / 5)


def test_yes_ratio_comes_from_predictions_not_labels():
    rows = [PopeRow(str(i), str(i), "x.png", "q", "yes" if i % 2 else "no", "random") for i in range(10)]
    score = score_pope(rows, {r.id: "Yes, I see it." for r in rows})
    m = score.metrics["random"]
    assert m.yes_ratio == 1.0 and m.recall == 1.0 and m.precision == 0.5 and m.accuracy == 0.5


def test_no_yes_predictions_gives_zero_not_crash():
    rows = [PopeRow("1", "1", "x", "q", "yes", "random"), PopeRow("2", "2", "x", "q", "no", "random")]
    m = score_pope(rows, {"1": "No", "2": "No"}).metrics["random"]
    assert m.precision == 0.0 and m.f1 == 0.0 and m.accuracy == 0.5


def test_load_official_rows_with_malformed_lines():
    rows, errors = load_pope(FIX / "pope_official.jsonl")
    assert [r.question_id for r in rows] == ["1", "2", "3", "6"]
    assert rows[-1].label == "no"  # "NO" normalised
    assert {r.split for r in rows} == {"pope_official"}  # no split in the name: the file stem
    assert [e.line for e in errors] == [4, 5]
    assert "pope_official.jsonl:4" in str(errors[0]) and "JSON" in str(errors[0])
    assert "pope_official.jsonl:5" in str(errors[1]) and "maybe" in str(errors[1])
    rows2, _ = load_pope(FIX / "pope_official.jsonl", split="adv")
    assert {r.split for r in rows2} == {"adversarial"}


def test_load_lmms_style_uses_category_as_split():
    rows, errors = load_pope(FIX / "pope_lmms.jsonl")
    assert [(r.split, r.question_id, r.label) for r in rows] == [
        ("adversarial", "100", "yes"), ("adversarial", "101", "no"), ("popular", "102", "no")]
    assert rows[0].id == "adversarial/100" and rows[0].question == "Is there a dog in the image?"
    assert len(errors) == 1 and errors[0].line == 4 and "label/answer" in errors[0].message


def test_load_directory_of_split_files_and_score_average():
    rows, errors = load_pope(FIX / "pope_dir")
    assert not errors
    assert sorted({r.split for r in rows}) == ["adversarial", "popular", "random"]
    assert len({r.id for r in rows}) == len(rows) == 6  # question ids repeat across splits, ids do not
    answers = {r.id: ("Yes" if r.label == "yes" else "No") for r in rows}
    answers["popular/2"] = "Yes, a purple star."  # one false positive in popular
    scores = score_all_rules(rows, answers)
    pope = scores["pope"].metrics
    assert list(pope) == ["random", "popular", "adversarial", "average"]
    assert pope["random"].accuracy == 1.0 and pope["popular"].accuracy == 0.5
    assert pope["average"].accuracy == pytest.approx((1 + 0.5 + 1) / 3)
    assert pope["average"].n == 6
    assert scores["strict"].metrics["popular"].unparsed == 1
    partial = score_pope(rows, {k: v for k, v in answers.items() if not k.startswith("random")})
    assert partial.missing == 2 and "random" not in partial.metrics


def test_duplicate_ids_and_bad_paths(tmp_path):
    p = tmp_path / "pope_random.json"
    p.write_text('{"question_id": 1, "image": "a.png", "text": "q?", "label": "yes"}\n' * 2)
    rows, errors = load_pope(p)
    assert len(rows) == 1 and errors[0].line == 2 and "duplicate" in errors[0].message
    with pytest.raises(InputError, match="does not exist"):
        load_pope(tmp_path / "nope.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .json"):
        load_pope(tmp_path / "empty")


def test_split_from_name():
    assert split_from_name("coco_pope_adversarial.json") == "adversarial"
    assert split_from_name("pope_pop.jsonl") == "popular"
    assert split_from_name("aokvqa_pope_random.json") == "random"
    assert split_from_name("answers.json") is None


# ---------------------------------------------------------------------------------------------- builder
def _anns():
    objs = [["red circle", "blue square", "green star"], ["red circle", "blue square", "yellow heart", "red circle"],
            ["red circle", "green star", "white cross"], ["black hexagon", "purple diamond"],
            ["red circle", "blue square", "orange triangle"]]
    return [{"image": f"im{i}.png", "objects": o} for i, o in enumerate(objs)]


class _Obj:
    def __init__(self, name):
        self.name = name


def test_build_pope_structure_and_strategies():
    vocab = sorted({o for a in _anns() for o in a["objects"]} | {"white star", "black circle"})
    b = build_pope(_anns(), seed=3, vocabulary=vocab)
    assert b.skipped == [(3, "2 distinct objects < 3")]
    for split, rows in b.rows.items():
        assert len(rows) == 4 * 6
        assert [r["label"] for r in rows[:6]] == ["yes", "no"] * 3
        assert [r["question_id"] for r in rows] == list(range(1, 25))
        for r in rows:  # positives present, negatives absent
            objs = next(a["objects"] for a in _anns() if a["image"] == r["image"])
            name = r["text"].split(" ", 3)[3].rsplit(" in the image?", 1)[0]
            assert (name in objs) == (r["label"] == "yes")
    # popular: the most frequent absent objects; blue square (3 images) is the most frequent one absent from im2
    img2 = [r["text"] for r in b.rows["popular"] if r["image"] == "im2.png" and r["label"] == "no"]
    assert img2[0] == question_for("blue square")
    # adversarial negatives are the absent objects that co-occur with im0's objects -- never the unrelated ones
    adv = [r["text"] for r in b.rows["adversarial"] if r["image"] == "im0.png" and r["label"] == "no"]
    assert set(adv) == {question_for(n) for n in ("yellow heart", "white cross", "orange triangle")}


def test_build_pope_deterministic_and_object_styles(tmp_path):
    anns = _anns()
    as_objs = [{"image": a["image"], "objects": [_Obj(n) for n in a["objects"]]} for a in anns]
    assert build_pope(anns, seed=1).rows == build_pope(as_objs, seed=1).rows
    assert build_pope(anns, seed=1).rows != build_pope(anns, seed=2).rows
    paths = write_pope(build_pope(anns, seed=1), tmp_path)
    rows, errors = load_pope(tmp_path)
    assert not errors and len(rows) == sum(1 for p in paths for _ in p.open())
    assert question_for("orange heart") == "Is there an orange heart in the image?"
    with pytest.raises(InputError, match="split"):
        build_pope(anns, splits=["weird"])
    with pytest.raises(InputError, match="no name"):
        build_pope([{"objects": [{"shape": "circle"}]}])


def test_scene_pope_set_if_generator_present(tmp_path):
    pytest.importorskip("vlmkit.data.scenes")
    from vlmkit.data.pope import build_scene_pope

    build, paths = build_scene_pope(tmp_path, num_images=3, seed=5)
    assert all(len(r) == 18 for r in build.rows.values())
    rows, errors = load_pope(tmp_path)
    assert not errors and len(rows) == 54
    assert all((tmp_path / "images" / r.image).exists() for r in rows)
    meta = json.loads((tmp_path / "images" / "scene_00000.json").read_text())
    names = {o["name"] for o in meta["objects"]}
    for r in rows:
        if r.image == "scene_00000.png":
            name = r.question.split(" ", 3)[3].rsplit(" in the image?", 1)[0]
            assert (name in names) == (r.label == "yes")


def test_build_pope_from_scene_objects():
    scenes = pytest.importorskip("vlmkit.data.scenes")
    sc = [scenes.generate_scene(s, n_objects=5, size=96) for s in range(4)]
    b = build_pope(sc, splits=["random"], seed=0, vocabulary=scenes.object_names())
    usable = [i for i, s in enumerate(sc) if len(set(s.names)) >= 3]
    assert {r["image"] for r in b.rows["random"]} == {f"scene_{i:05d}.png" for i in usable}  # save_scenes names
    for r in b.rows["random"]:
        names = set(sc[int(r["image"][6:11])].names)
        name = r["text"].split(" ", 3)[3].rsplit(" in the image?", 1)[0]
        assert (name in names) == (r["label"] == "yes")
