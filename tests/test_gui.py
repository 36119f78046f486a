"""Generated GUI screenshots: layouts, targets, pictograms, ScreenSpot-v2 annotations and the data CLI."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlmkit.data import gui
from vlmkit.eval import screenspot as ss


def _check_screen(s, platform: str, template: int) -> None:
    """Right size, unique target names, every box inside the screen and at least MIN_SIDE on each side."""
    W, H = s.image.size
    assert (W, H) == gui.SIZES[platform] and s.template == template
    names = [x.name.lower() for x in s.targets]
    assert len(names) == len(set(names)), f"duplicate target on {platform} template {template}: {names}"
    for x in s.targets:
        x1, y1, x2, y2 = x.box
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H, x
        assert min(x2 - x1, y2 - y1) >= gui.MIN_SIDE, x


@pytest.mark.parametrize("platform", gui.PLATFORMS)
def test_every_template_renders_valid_unique_targets(platform):
    for t in range(gui.N_TEMPLATES):
        s = gui.render_screen(platform, t, seed=3)
        _check_screen(s, platform, t)
        assert len(s.targets) >= 5, (platform, t)


@pytest.mark.parametrize("platform", gui.PLATFORMS)
def test_composed_layouts_are_valid_and_vary(platform):
    shapes, counts = set(), []
    for seed in range(40):
        s = gui.render_screen(platform, gui.COMPOSED, seed)
        _check_screen(s, platform, gui.COMPOSED)
        W, H = s.image.size
        counts.append(len(s.targets))
        # the arrangement: which roles sit in which cell of a coarse 3x3 grid
        shapes.add(frozenset((x.role, 3 * (x.box[0] + x.box[2]) // (2 * W), 3 * (x.box[1] + x.box[3]) // (2 * H))
                             for x in s.targets))
    assert len(shapes) >= 35  # nearly every composed screen is arranged differently
    assert sum(counts) / len(counts) >= 8
    assert {x.kind for seed in range(5) for x in gui.render_screen(platform, gui.COMPOSED, seed).targets} == {
        "text", "icon"}


def test_template_sets_keep_composed_layouts_out_of_held_out(tmp_path):
    assert gui.template_indices("heldout") == [4, 5] and gui.COMPOSED not in gui.template_indices("all")
    assert gui.template_indices("varied") == [0, 1, 2, 3, gui.COMPOSED]
    assert gui.template_indices("mixed") == [0, 1, 2, 3, gui.COMPOSED, gui.DIALOG]
    assert gui.DIALOG not in gui.template_indices("all") + gui.template_indices("varied")
    with pytest.raises(Exception, match="out of range"):
        gui.render_screen("web", gui.DIALOG + 1, 0)
    paths = gui.build_set(tmp_path, screens_per_template=1, templates="varied", composed_screens=3,
                          platforms=("web",))
    rows = json.loads(paths["web"].read_text())
    per = {t: len({r["img_filename"] for r in rows if r["template"] == t}) for t in {r["template"] for r in rows}}
    assert per == {0: 1, 1: 1, 2: 1, 3: 1, gui.COMPOSED: 3}
    rows = json.loads(gui.build_set(tmp_path / "m", screens_per_template=1, templates="mixed", composed_screens=0,
                                    dialog_screens=2, platforms=("web",))["web"].read_text())
    assert {t: len({r["img_filename"] for r in rows if r["template"] == t}) for t in {r["template"] for r in rows}
            } == {0: 1, 1: 1, 2: 1, 3: 1, gui.DIALOG: 2}


def test_dialog_covers_the_screen_and_holds_the_only_new_targets():
    from random import Random

    from vlmkit.data import gui_layouts

    under = gui.render_screen("desktop", 0, seed=3)
    box = (80, 44, 400, 272)
    out = gui_layouts.dialog(under, Random(0), box, "Settings", avoid={"Apply"}, checks=(3, 3))
    _check_screen(out, "desktop", 0)
    assert sum(x.role == "check" for x in out.targets) == 3 and out.targets[-1].role == "button"
    assert not {x.name.lower() for x in out.targets} & ({x.name.lower() for x in under.targets} | {"apply"})
    for x in out.targets:
        assert box[0] <= x.box[0] and x.box[2] <= box[2] and box[1] <= x.box[1] and x.box[3] <= box[3], x
    a, b = np.asarray(under.image, float), np.asarray(out.image, float)
    assert b[:40].mean() < 0.7 * a[:40].mean()  # the screen behind the dialog is dimmed
    assert out.image.tobytes() == gui_layouts.dialog(under, Random(0), box, "Settings", avoid={"Apply"},
                                                     checks=(3, 3)).image.tobytes()


@pytest.mark.parametrize("platform", gui.PLATFORMS)
def test_dialog_screens_are_valid_vary_and_sit_on_training_layouts(platform, monkeypatch):
    from vlmkit.data import gui_layouts

    behind, render = [], gui.render_screen
    monkeypatch.setattr(gui, "render_screen", lambda pl, t, seed: behind.append(t) or render(pl, t, seed))
    screens = [gui_layouts.dialog_screen(platform, seed) for seed in range(15)]
    assert set(behind) <= set(gui.template_indices("varied")) and len(set(behind)) >= 2
    for s in screens:
        _check_screen(s, platform, gui.DIALOG)
    assert sum(len(s.targets) >= 2 for s in screens) >= 12
    assert len({tuple(s.targets[0].box) for s in screens if s.targets}) >= 10  # dialogs at different places
    assert {x.role for s in screens for x in s.targets} >= {"check", "button"}


def test_vocabulary_sizes_and_icons_are_distinct_pictograms():
    assert len(set(gui.WORDS)) >= 40
    assert len(gui.ICONS) >= 20
    drawn = {}
    for name in gui.ICONS:
        im = Image.new("RGB", (24, 24), (0, 0, 0))
        gui.draw_icon(ImageDraw.Draw(im), name, (0, 0, 24, 24), (255, 0, 0))
        a = np.asarray(im)[..., 0] > 0
        assert 10 < a.sum() < 24 * 24, name
        drawn[name] = a
    names = list(drawn)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (drawn[a] != drawn[b]).sum() > 10, f"icons {a} and {b} look the same"
    with pytest.raises(Exception, match="unknown icon"):
        gui.draw_icon(ImageDraw.Draw(Image.new("RGB", (8, 8))), "nope", (0, 0, 8, 8), (1, 1, 1))


def test_render_is_deterministic_and_seed_dependent():
    a = gui.render_screen("web", 1, 5).image.tobytes()
    assert a == gui.render_screen("web", 1, 5).image.tobytes()
    assert a != gui.render_screen("web", 1, 6).image.tobytes()


def test_build_set_writes_screenspot_v2_that_the_loader_reads(tmp_path):
    paths = gui.build_set(tmp_path, screens_per_template=2, templates="heldout", seed=1)
    assert set(paths) == set(gui.PLATFORMS)
    samples, errors, formats = ss.load_screenspot(tmp_path)
    assert not errors and samples
    assert all(f.dataset == "v2" and f.box == "xywh_px" for f in formats.values())
    rows = [r for p in paths.values() for r in json.loads(p.read_text())]
    assert {r["template"] for r in rows} == set(range(gui.TRAIN_TEMPLATES, gui.N_TEMPLATES))
    assert {r["data_type"] for r in rows} == {"text", "icon"}
    assert {s.platform for s in samples} == set(gui.PLATFORMS)
    for r in rows:
        assert set(r) >= {"img_filename", "bbox", "instruction", "data_type", "data_source"}
        assert r["data_source"] in gui.SOURCES[next(p for p in gui.PLATFORMS if p in r["img_filename"])]
    # boxes read back as the rendered targets, and a text instruction names its target
    s = samples[0]
    W, H = ss.image_size(s, ss.default_images_dir(tmp_path))
    assert (W, H) == gui.SIZES[s.platform]
    for r in rows:
        if r["data_type"] == "text":
            assert any(w.lower() in r["instruction"].lower() for w in gui.WORDS + gui.FIELDS + gui.CHECKS + gui.MENUS)


def test_train_and_heldout_templates_are_disjoint(tmp_path):
    tr = gui.build_set(tmp_path / "tr", screens_per_template=1, templates="train")
    rows = [r for p in tr.values() for r in json.loads(p.read_text())]
    assert max(r["template"] for r in rows) < gui.TRAIN_TEMPLATES
    with pytest.raises(Exception, match="templates"):
        gui.build_set(tmp_path / "x", templates="bogus")


def test_data_screenspot_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    gui.add_data_screenspot(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["screenspot", "--out", str(tmp_path), "--screens", "1", "--seed", "2"])
    assert args.func(args) == 0
    assert (tmp_path / "screenspot_mobile_v2.json").is_file()
    assert "instructions" in capsys.readouterr().out
    args = parser.parse_args(["screenspot", "--out", str(tmp_path / "c"), "--templates", "composed",
                              "--composed-screens", "2"])
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "c" / "screenspot_desktop_v2.json").read_text())
    assert {r["template"] for r in rows} == {gui.COMPOSED} and len({r["img_filename"] for r in rows}) == 2
