"""ScreenSpot: format detection on v1/v2/Pro/normalised fixtures, output parsing, point-in-box scoring, tables."""

import json
from pathlib import Path

import pytest
from PIL import Image

from vlmkit.errors import InputError
from vlmkit.eval.screenspot import (ParsedClick, detect_format, load_screenspot, load_screenspot_file,
                                    normalise_click, parse_click, point_in_box, score_screenspot)

FIX = Path(__file__).parent / "fixtures" / "eval"
SIZE = (200, 100)  # W, H used for pixel outputs below

# output -> expected normalised point on a 200x100 image (pixels) or as-is (normalised)
PIXEL_FORMS = [
    ("[50, 25]", (0.25, 0.25)),
    ("(50, 25)", (0.25, 0.25)),
    ("x=50, y=25", (0.25, 0.25)),
    ("x: 50, y: 25", (0.25, 0.25)),
    ("pyautogui.click(x=50, y=25)", (0.25, 0.25)),
    ("<bbox>40 20 60 30</bbox>", (0.25, 0.25)),
    ("<box>[40, 20, 60, 30]</box>", (0.25, 0.25)),
    ("<|box_start|>(40,20),(60,30)<|box_end|>", (0.25, 0.25)),
    ("The element spans (40, 20) to (60, 30).", (0.25, 0.25)),
    ("[40, 20, 60, 30]", (0.25, 0.25)),
    ("40 20 60 30", (0.25, 0.25)),
    ("I would click at 50 and 25 on the screen", (0.25, 0.25)),
    ("Step 1: the button is at (50, 25)", (0.25, 0.25)),
    ([50, 25], (0.25, 0.25)),
    ([40, 20, 60, 30], (0.25, 0.25)),
    ({"x": 50, "y": 25}, (0.25, 0.25)),
]
NORM_FORMS = [
    ("[0.25, 0.5]", (0.25, 0.5)),
    ("(0.25,0.5)", (0.25, 0.5)),
    ("x=0.25, y=0.5", (0.25, 0.5)),
    ("pyautogui.click(x=0.25, y=0.5)", (0.25, 0.5)),
    ("<bbox>0.2 0.4 0.3 0.6</bbox>", (0.25, 0.5)),
    ("[0.2, 0.4, 0.3, 0.6]", (0.25, 0.5)),
    ("0.2, 0.4, 0.3, 0.6", (0.25, 0.5)),
    ("click [25%, 50%]", (0.25, 0.5)),
    ("<point>.25 .5</point>", (0.25, 0.5)),
    ((0.25, 0.5), (0.25, 0.5)),
    ({"point": [0.25, 0.5]}, (0.25, 0.5)),
]


@pytest.mark.parametrize("output,expected", PIXEL_FORMS + NORM_FORMS)
def test_parse_every_form(output, expected):
    click = parse_click(output)
    assert click is not None
    assert normalise_click(click, SIZE) == pytest.approx(expected)


@pytest.mark.parametrize("output", ["", "I cannot find it.", "[1]", None, {"foo": 1}, "number 7"])
def test_unparseable(output):
    assert parse_click(output) is None


def test_explicit_units():
    click = parse_click("[500, 250]")
    assert normalise_click(click, SIZE, "norm1000") == pytest.approx((0.5, 0.25))
    assert normalise_click(click, (1000, 1000), "px") == pytest.approx((0.5, 0.25))
    assert normalise_click(parse_click("[1, 1]"), SIZE, "px") == pytest.approx((0.005, 0.01))
    assert normalise_click(parse_click("[1, 1]"), SIZE, "auto") == (1.0, 1.0)
    with pytest.raises(InputError, match="image size"):
        normalise_click(parse_click("[50, 25]"), None)
    with pytest.raises(InputError, match="units"):
        normalise_click(parse_click("[0.5, 0.5]"), SIZE, "inches")
    assert ParsedClick((0, 0, 10, 20), "box").point == (5, 10)


def test_point_in_box_inclusive():
    box = (0.1, 0.2, 0.3, 0.4)
    assert point_in_box((0.1, 0.2), box) and point_in_box((0.3, 0.4), box) and point_in_box((0.2, 0.3), box)
    assert not point_in_box((0.31, 0.3), box) and not point_in_box((0.2, 0.19), box)


@pytest.mark.parametrize("name,dataset,box", [
    ("screenspot_mobile.json", "v1", "xywh_px"),
    ("screenspot_web_v2.json", "v2", "xywh_px"),
    ("screenspot_pro/annotations/photoshop_windows.json", "pro", "xyxy_px"),
    ("screenspot_norm_mirror.json", "v1", "xyxy_norm"),
    ("screenspot_norm_xywh.json", "v1", "xywh_norm"),
])
def test_detect_fixture_formats(name, dataset, box):
    _, errors, fmt = load_screenspot_file(FIX / name)
    assert not errors
    assert (fmt.dataset, fmt.box) == (dataset, box)


def test_detection_heuristics_and_override():
    # pixel boxes whose xywh reading overflows img_size must be xyxy even without Pro fields
    recs = [{"bbox": [100, 10, 180, 30], "img_size": [200, 100]}]
    assert detect_format(recs, "x.json").box == "xyxy_px"
    recs = [{"bbox": [100, 10, 20, 5]}]  # x2 < x1 -> can only be xywh
    assert detect_format(recs, "x.json", dataset="pro").box == "xywh_px"
    assert detect_format(recs, "x.json", box_format="xyxy_norm").box == "xyxy_norm"
    with pytest.raises(InputError):
        detect_format(recs, "x.json", dataset="v3")
    s, _, _ = load_screenspot_file(FIX / "screenspot_mobile.json", box_format="xyxy_px")
    assert s[0].box == (10, 20, 30, 40)


def test_load_v1_fields():
    samples, _, _ = load_screenspot(FIX / "screenspot_mobile.json")
    s = samples[0]
    assert s.box == (10, 20, 40, 60) and s.units == "px" and s.ui_type == "text" and s.platform == "mobile"
    assert s.id == "screenspot_mobile/1" and s.instruction == "open settings" and s.data_source == "ios"


def test_load_pro_root_and_groups():
    samples, errors, formats = load_screenspot(FIX / "screenspot_pro")
    assert not errors and set(formats) == {"photoshop_windows.json", "vscode_macos.json"}
    by_id = {s.id: s for s in samples}
    ps = by_id["photoshop_windows/ps_0"]
    assert ps.group == "Creative" and ps.ui_type == "icon" and ps.image_size == (2560, 1440)
    assert ps.box == (1200, 300, 1260, 340) and ps.platform == "windows"


def test_malformed_rows_are_errors(tmp_path):
    p = tmp_path / "screenspot_desktop.json"
    p.write_text(json.dumps([
        {"img_filename": "a.png", "bbox": [1, 2, 3], "instruction": "x", "data_type": "text"},
        {"img_filename": "a.png", "bbox": [1, 2, 3, 4], "instruction": "ok", "data_type": "icon"},
        {"bbox": [1, 2, 3, 4], "instruction": "no image"}]))
    samples, errors, _ = load_screenspot(p)
    assert len(samples) == 1 and [e.line for e in errors] == [1, 3]
    assert "screenspot_desktop.json:1" in str(errors[0]) and "four numbers" in str(errors[0])
    with pytest.raises(InputError, match="does not exist"):
        load_screenspot(tmp_path / "missing")


def test_score_v1_with_images_and_table(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "mob_1.png")
    Image.new("RGB", (400, 200)).save(tmp_path / "mob_2.png")
    samples, _, _ = load_screenspot(FIX / "screenspot_mobile.json")
    outputs = {"screenspot_mobile/1": "[25, 40]",       # px, inside (10..40, 20..60)
               "screenspot_mobile/2": "x=0.5, y=0.5",   # normalised (100, 50): outside (60..68, 5..15)
               "screenspot_mobile/3": "no idea"}        # wrong format
    score = score_screenspot(samples, outputs, images_dir=tmp_path)
    assert score.n == 3 and score.wrong_format == 1 and score.accuracy == pytest.approx(1 / 3)
    assert score.results["screenspot_mobile/1"].correct
    assert score.results["screenspot_mobile/1"].point == pytest.approx((0.125, 0.4))
    assert score.row_key == "platform"
    t = score.table
    assert t["mobile"]["text"] == {"accuracy": 1.0, "n": 1}
    assert t["mobile"]["icon"] == {"accuracy": 0.0, "n": 2}
    assert t["overall"]["average"]["n"] == 3
    missing = score_screenspot(samples, {"screenspot_mobile/1": "[25, 40]"}, images_dir=tmp_path / "none")
    assert missing.results["screenspot_mobile/1"].status == "no_image" and missing.missing == 2


def test_score_pro_groups_without_reading_images():
    samples, _, _ = load_screenspot(FIX / "screenspot_pro")
    outputs = {"photoshop_windows/ps_0": [1230 / 2560, 320 / 1440],  # grounding head: normalised point
               "photoshop_windows/ps_1": "pyautogui.click(x=100, y=20)",  # pixels
               "vscode_macos/vs_0": "[0.9, 0.9]"}
    score = score_screenspot(samples, outputs)
    assert score.row_key == "group"
    assert [r for r in score.table] == ["Dev", "Creative", "overall"]
    assert score.table["Creative"]["average"]["accuracy"] == 1.0
    assert score.table["Dev"]["text"]["accuracy"] == 0.0
    assert score.as_dict()["overall"]["accuracy"] == pytest.approx(2 / 3)


def test_score_normalised_mirror_needs_no_image():
    samples, _, _ = load_screenspot(FIX / "screenspot_norm_mirror.json")
    score = score_screenspot(samples, {samples[0].id: "[0.2, 0.3]", samples[1].id: "(0.64, 0.1)"})
    assert score.accuracy == 1.0 and score.table["mobile"]["icon"]["n"] == 1


def test_no_data_generates_heldout_set_and_uses_pointer_head(tmp_path):
    """`vlmkit eval screenspot` with no --data: generated held-out screens, default model + its pointer head."""
    import json

    from vlmkit.cli import main

    assert main(["eval", "screenspot", "--screens", "1", "--limit", "6", "--out", str(tmp_path), "--quiet"]) == 0
    data = tmp_path / "data"
    rows = [r for f in sorted(data.glob("screenspot_*_v2.json")) for r in json.loads(f.read_text())]
    from vlmkit.data.gui import TRAIN_TEMPLATES

    assert rows and all(r["template"] >= TRAIN_TEMPLATES for r in rows)  # held-out layout templates only
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["metrics"]["overall"]["n"] == 6 and res["prompt"] is not None
    preds = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all(p["answer"].startswith("[") for p in preds)  # the head answers with points


def test_no_data_with_processes_and_a_model_path_asks_for_a_grounder_factory(tmp_path, capsys):
    from vlmkit.cli import main

    rc = main(["eval", "screenspot", "--screens", "1", "--limit", "2", "--num-processes", "2", "--model",
               str(tmp_path / "some-model"), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 1 and "factory" in capsys.readouterr().err  # not text answers scored silently


def test_size_thirds_ranks_targets_by_box_area_and_reports_them():
    from types import SimpleNamespace

    from vlmkit.eval import report
    from vlmkit.eval.screenspot import size_thirds

    # areas 1, 4, 9, ..., 81 (squares of side 1..9); the 3 smallest right, the 3 largest wrong
    samples = [SimpleNamespace(id=f"s{k}", box=(0, 0, k, k)) for k in range(9, 0, -1)]
    correct = {f"s{k}": k <= 3 or 4 <= k <= 5 for k in range(1, 10)}
    size = size_thirds(samples + [SimpleNamespace(id="unscored", box=(0, 0, 50, 50))], correct)
    assert size["small"] == {"accuracy": 1.0, "n": 3} and size["large"] == {"accuracy": 0.0, "n": 3}
    assert size["medium"]["accuracy"] == pytest.approx(2 / 3) and size["cuts"] == [16, 49]
    text = report.screenspot_table({"table": {"overall": {"average": {"accuracy": 0.5, "n": 9}}},
                                    "rows": "platform", "by_size": size})
    assert "By target size" in text and "| accuracy | 100.00 (3) | 66.67 (3) | 0.00 (3) |" in text
