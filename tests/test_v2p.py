"""V2P pointer head: labels, losses, read-out, head, save/load, features, grounding, training (tiny models)."""

import numpy as np
import pytest
import tiny
import torch

from vlmkit.errors import InputError, ModelLoadError
from vlmkit.grounding import screen_tokens, v2p


def grid_boxes(rows=8, cols=8, cell=12.0):
    ys, xs = np.mgrid[0:rows, 0:cols]
    return np.stack([xs * cell, ys * cell, (xs + 1) * cell, (ys + 1) * cell], -1).reshape(-1, 4).astype(float)


BOX = (14.0, 26.0, 70.0, 58.0)  # centre (42, 42) lies in cell (row 3, col 3)


def test_gaussian_labels_sum_to_one_zero_outside_and_peak_at_centre():
    b = grid_boxes()
    for k in (1.0, 4.1325):
        y = v2p.token_labels(b, BOX, "gaussian", k=k)
        assert y.sum() == pytest.approx(1.0)
        outside = (b[:, 2] <= BOX[0]) | (b[:, 0] >= BOX[2]) | (b[:, 3] <= BOX[1]) | (b[:, 1] >= BOX[3])
        assert np.all(y[outside] == 0) and np.all(y[~outside] > 0)
        assert int(np.argmax(y)) == 3 * 8 + 3
    # larger k = narrower Gaussian = more mass in the centre cell
    assert v2p.token_labels(b, BOX, "gaussian", k=4.0).max() > v2p.token_labels(b, BOX, "gaussian", k=1.0).max()


def test_binary_and_center_labels():
    b = grid_boxes()
    y = v2p.token_labels(b, BOX, "binary")
    nz = y[y > 0]
    assert y.sum() == pytest.approx(1.0) and np.allclose(nz, nz[0]) and len(nz) == 5 * 3  # cols 1..5 x rows 2..4
    c = v2p.token_labels(b, BOX, "center")
    assert c[3 * 8 + 3] == 1.0 and c.sum() == 1.0
    with pytest.raises(InputError):
        v2p.token_labels(b, BOX, "fuzzy")
    with pytest.raises(InputError):
        v2p.token_labels(b, (5, 5, 5, 9), "gaussian")


def test_suppression_loss_is_zero_when_all_mass_is_in_the_box():
    y = torch.as_tensor(v2p.token_labels(grid_boxes(), BOX, "gaussian"), dtype=torch.float32)[None]
    logits = torch.where(y > 0, torch.log(y.clamp_min(1e-30)), torch.full_like(y, -1e4))
    out = v2p.pointer_losses(logits, y)
    assert out["suppress"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["kl"].item() == pytest.approx(0.0, abs=1e-5)
    flat = v2p.pointer_losses(torch.zeros_like(y), y, suppress_weight=2.0)
    assert flat["suppress"].item() == pytest.approx(1 - 15 / 64, abs=1e-6)  # 15 of 64 tokens overlap the box
    assert flat["total"].item() == pytest.approx(flat["kl"].item() + 2 * flat["suppress"].item(), rel=1e-6)


def test_readout_regions_are_4_connected_and_ranked_by_max_or_mean():
    s = np.zeros((4, 4))
    s[0, 0], s[0, 1] = 1.0, 0.4  # region A: max 1.0, mean 0.7
    s[3, 3] = 0.9  # region B: max = mean = 0.9
    s[2, 2] = 0.5  # diagonal to B only: its own region
    s[1, 3] = 0.2  # below 0.3 * max: ignored
    centres = np.stack(np.meshgrid(np.arange(4) + 0.5, np.arange(4) + 0.5), -1).reshape(-1, 2)
    by_max = v2p.click_from_scores(s.ravel(), (4, 4), centres, rank="max", top_k=5)
    assert len(by_max) == 3
    assert by_max[0] == pytest.approx(((0.5 * 1.0 + 1.5 * 0.4) / 1.4, 0.5, 1.0))
    assert [c[2] for c in by_max] == pytest.approx([1.0, 0.9, 0.5])
    by_mean = v2p.click_from_scores(s.ravel(), (4, 4), centres, rank="mean")
    assert by_mean[0] == pytest.approx((3.5, 3.5, 0.9))
    assert len(v2p.click_from_scores(s.ravel(), (4, 4), centres, top_k=1)) == 1


def _head(**kw):
    torch.manual_seed(0)
    kw.setdefault("pos_freqs", 2)  # with the optional absolute-position code (default off)
    return v2p.PointerHead(v2p.HeadConfig(d_key=16, d_query=8, d_model=16, n_heads=4, text_buckets=64,
                                          text_dim=8, **kw)).eval()


def test_head_shapes_masking_window_and_save_load(tmp_path):
    head = _head()
    keys, pos = torch.randn(2, 32, 16), torch.rand(2, 32, 2)
    q, text = torch.randn(2, 8), torch.tensor([[1, 5, 0], [7, 0, 0]])
    valid = torch.ones(2, 32, dtype=torch.bool)
    valid[1, -4:] = False
    out = head(keys, pos, q, (4, 8), valid, text)
    assert out.shape == (2, 32) and torch.isinf(out[1, -4:]).all() and torch.isfinite(out[0]).all()
    # a window covering the whole grid is the global attention
    win = _head(window=(4, 8))
    win.load_state_dict(head.state_dict())
    assert torch.allclose(win(keys, pos, q, (4, 8), valid, text), out, atol=1e-5)
    local = _head(window=(2, 4))
    local.load_state_dict(head.state_dict())
    assert not torch.allclose(local(keys, pos, q, (4, 8), valid, text)[0], out[0], atol=1e-4)
    with pytest.raises(InputError):
        head(keys, pos, q, (5, 8), valid, text)
    v2p.save_head(local, tmp_path)
    again = v2p.load_head(tmp_path)
    assert again.cfg.window == (2, 4)
    assert torch.allclose(again(keys, pos, q, (4, 8), valid, text), local(keys, pos, q, (4, 8), valid, text))
    with pytest.raises(ModelLoadError):
        v2p.load_head(tmp_path / "missing")


def test_text_ids_are_stable_and_instruction_dependent():
    a = v2p.text_ids("click Save", 4096)
    assert a == v2p.text_ids("CLICK save!", 4096) and all(1 <= i <= 4096 for i in a)
    assert a != v2p.text_ids("click Open", 4096)


@pytest.fixture(scope="module")
def vlm():
    from vlmkit.models.vlm import VLM

    return VLM(*tiny.build_llava(pad=True))


def test_tiles_cover_the_screenshot_and_keys_are_local(vlm):
    from PIL import Image

    im = Image.new("RGB", (40, 24), (200, 200, 200))
    f = screen_tokens.screen_features(vlm, im, tile=16, max_tiles=40)
    assert f.grid == (2 * 4, 3 * 4) and f.keys.shape == (96, 32) and f.tile_grid == (4, 4)
    area = ((f.boxes[:, 2] - f.boxes[:, 0]) * (f.boxes[:, 3] - f.boxes[:, 1]))[f.valid].sum()
    assert area == pytest.approx(40 * 24)
    assert not f.valid.all()  # the padded right/bottom edge
    im2 = im.copy()
    im2.paste((0, 0, 0), (0, 0, 8, 8))  # inside tile (0, 0) only
    g = screen_tokens.screen_features(vlm, im2, tile=16, max_tiles=40)
    changed = (g.keys - f.keys).abs().sum(-1).reshape(f.grid) > 1e-6
    assert changed[:4, :4].any() and not changed[:, 4:].any() and not changed[4:, :].any()
    big = Image.new("RGB", (400, 300))
    assert np.prod(screen_tokens.screen_features(vlm, big, tile=16, max_tiles=12).grid) <= 12 * 16


def test_ground_with_a_head_and_attention_fallback(vlm):
    from vlmkit.data import gui

    s = gui.render_screen("mobile", 0, 1).image
    d = vlm.model.config.text_config.hidden_size
    head = v2p.PointerHead(v2p.HeadConfig(d_key=d, d_query=d, d_model=16, n_heads=4, tile=16, max_tiles=20,
                                          window=(4, 4))).eval()
    res = v2p.Grounder(vlm, head, top_k=2).ground(s, "open settings")
    W, H = s.size
    assert res.source == "pointer-head" and res.heatmap.shape == (H, W)
    assert 0 <= res.point[0] <= W and 0 <= res.point[1] <= H and 1 <= len(res.candidates) <= 2
    assert res.candidates == sorted(res.candidates, key=lambda c: -c[2])
    assert res.action() == {"action": "click", "x": round(res.point[0]), "y": round(res.point[1])}
    ans = v2p.Grounder(vlm, head).ask_batch([s], ["open settings"])[0]
    assert ans.startswith("[") and all(0 <= float(v) <= 1 for v in ans.strip("[]").split(","))
    fb = v2p.make_grounder(vlm)  # a random tiny model has no head beside its checkpoint
    r2 = fb.ground(s, "open settings")
    assert r2.source == "attention" and r2.heatmap.shape == (H, W) and len(r2.candidates) == 3
    with pytest.raises(ModelLoadError, match="no trained pointer head"):
        v2p.make_grounder(vlm, fallback=False)
    with pytest.raises(InputError):
        fb.ground(s, "  ")


def test_training_learns_resumes_and_saves(vlm, tmp_path):
    from vlmkit.data import gui
    from vlmkit.grounding import train_grounding as tg

    gui.build_set(tmp_path / "d", screens_per_template=1, templates=[0], seed=0, max_targets=4)
    parts = tg.build_cache(vlm, tmp_path / "d", tmp_path / "c", tile=16, max_tiles=12, prompt="{instruction}",
                           progress=False)
    again = tg.build_cache(vlm, tmp_path / "d", tmp_path / "c", tile=16, max_tiles=12, prompt="{instruction}",
                           progress=False)
    assert parts == again
    rows = tg.load_cache(parts)
    d = rows[0]["keys"].shape[-1]
    cfg = v2p.HeadConfig(d_key=d, d_query=d, d_model=16, n_heads=4, tile=16, max_tiles=12,
                         window=tuple(rows[0]["tile_grid"]))
    st = tg.TrainSettings(steps=6, batch=4, save_every=3, lr=3e-3)
    h = tg.train(rows, cfg, tmp_path / "r", tg.TrainSettings(**{**st.__dict__, "steps": 3}), progress=False)
    assert h.cfg.trained["steps"] == 3
    h = tg.train(rows, cfg, tmp_path / "r", st, progress=False)
    assert h.cfg.trained["steps"] == 6 and (tmp_path / "r" / "state.pt").is_file()
    v2p.save_head(h, tmp_path / "head")
    assert v2p.load_head(tmp_path / "head").cfg.trained["steps"] == 6


def test_ground_cli_finds_the_head_beside_the_checkpoint(vlm, tmp_path, capsys):
    import argparse
    import json

    from vlmkit.data import gui
    from vlmkit.grounding import gui_cli

    ckpt = tmp_path / "m"
    vlm.model.save_pretrained(ckpt)
    vlm.processor.save_pretrained(ckpt)
    img = tmp_path / "s.png"
    gui.render_screen("web", 2, 0).image.save(img)
    parser = argparse.ArgumentParser()
    gui_cli.add_parsers(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["ground", str(img), "click Save", "--model", str(ckpt), "--viz", str(tmp_path / "v.png")])
    assert args.func(args) == 0
    out = capsys.readouterr()
    res = json.loads(out.out.strip().splitlines()[-1])
    assert res["source"] == "attention" and "attention-only" in out.err
    assert (tmp_path / "v.png").is_file()
    d = vlm.model.config.text_config.hidden_size
    v2p.save_head(v2p.PointerHead(v2p.HeadConfig(d_key=d, d_query=d, d_model=16, n_heads=4, tile=16, max_tiles=20,
                                                 window=(4, 4))), tmp_path / "m-pointer")
    assert args.func(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["source"] == "pointer-head" and res["action"]["action"] == "click"
    assert len(res["candidates"]) >= 1 and 0 <= res["point_norm"][0] <= 1


def test_eval_screenspot_with_data_uses_the_head_beside_the_checkpoint(vlm, tmp_path):
    """``vlmkit eval screenspot --data DIR --model CKPT``: text answers without a head, the pointer head with one."""
    import json

    from vlmkit.cli import main
    from vlmkit.data import gui

    ckpt = tmp_path / "m"
    vlm.model.save_pretrained(ckpt)
    vlm.processor.save_pretrained(ckpt)
    gui.build_set(tmp_path / "data", screens_per_template=1, templates=[0], platforms=("web",), max_targets=2)
    argv = ["eval", "screenspot", "--data", str(tmp_path / "data"), "--model", str(ckpt), "--limit", "2", "--quiet",
            "--max-new-tokens", "4"]
    assert main(argv + ["--out", str(tmp_path / "text")]) == 0
    assert json.loads((tmp_path / "text" / "results.json").read_text())["model"] == str(ckpt)
    d = vlm.model.config.text_config.hidden_size
    v2p.save_head(v2p.PointerHead(v2p.HeadConfig(d_key=d, d_query=d, d_model=16, n_heads=4, tile=16, max_tiles=20,
                                                 window=(4, 4))), tmp_path / "m-pointer")
    assert main(argv + ["--out", str(tmp_path / "head")]) == 0
    res = json.loads((tmp_path / "head" / "results.json").read_text())
    assert res["model"].endswith("+pointer")
    preds = [json.loads(x) for x in (tmp_path / "head" / "predictions.jsonl").read_text().splitlines()]
    assert preds and all(p["answer"].startswith("[") for p in preds)
