"""``vlmkit train-grounding --finetune-backbone``: head + vision tower + projector train, the language model does not,
and a separate checkpoint (model + ``-pointer`` head) is written; the shipped default is never touched."""

import argparse
import hashlib
import json

import pytest
import tiny
import torch

import vlmkit
from vlmkit.errors import InputError, VlmkitError
from vlmkit.grounding import finetune_grounding as fg
from vlmkit.grounding import gui_cli, screen_tokens, v2p
from vlmkit.models.vlm import default_model_path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved tiny LLaVA and a one-screen generated ScreenSpot set."""
    from vlmkit.data import gui

    root = tmp_path_factory.mktemp("ft")
    model, proc = tiny.build("llava", pad=True)
    model.save_pretrained(root / "base")
    proc.save_pretrained(root / "base")
    gui.build_set(root / "data", screens_per_template=1, templates=[0], platforms=("desktop",), max_targets=2)
    return root


def _shipped() -> dict:
    """sha256 of every file of the shipped default model and its head."""
    from vlmkit.default import CHECKPOINT_DIR

    files = [p for d in (CHECKPOINT_DIR, v2p.default_head_dir()) if d.is_dir() for p in sorted(d.iterdir())]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def _cfg(vlm):
    d = vlm.adapter.language_model().config.hidden_size
    grid = screen_tokens.lm_input_tokens(vlm, [fg._blank(16)])[0][1].grid
    return v2p.HeadConfig(d_key=d, d_query=d, d_model=16, n_heads=4, tile=16, max_tiles=8, window=tuple(grid))


def test_backbone_trains_language_model_does_not_resume_and_checkpoint_loads(base, tmp_path):
    vlm = vlmkit.load(base / "base")
    names = set(fg.backbone_parameters(vlm))
    assert any("vision_tower" in n for n in names) and any("projector" in n for n in names)
    assert not any("language_model" in n or "lm_head" in n for n in names)
    before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    lm_before = fg.language_model_sha256(vlm)
    st = fg.FinetuneSettings(steps=2, batch=1, lr=3e-3, backbone_lr=1e-2, save_every=1)
    head = fg.finetune(vlm, base / "data", tmp_path / "run", _cfg(vlm), st, progress=False)
    assert head.cfg.trained["steps"] == 2 and head.cfg.trained["finetuned_backbone"] is True
    after = dict(vlm.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= names and any("vision_tower" in n for n in changed)
    assert all(p.requires_grad for p in vlm.model.parameters())  # flags restored after training
    head = fg.finetune(vlm, base / "data", tmp_path / "run", _cfg(vlm), fg.FinetuneSettings(**{**st.__dict__,
                                                                                            "steps": 3}),
                       progress=False)
    assert head.cfg.trained["steps"] == 3  # resumed from state.pt, not restarted

    out = fg.save_finetuned(vlm, head, tmp_path / "ft", {"base_backbone_sha256": "abc"})
    assert (tmp_path / "ft-pointer" / v2p.HEAD_FILE).is_file()
    again = vlmkit.load(out)
    loaded = dict(again.model.named_parameters())
    assert all(torch.equal(loaded[n], after[n].detach()) for n in changed)  # the fine-tuned weights were saved
    g = v2p.make_grounder(again)
    assert g.head is not None and g.head.cfg.trained["finetuned_backbone"] is True
    assert g.head.cfg.trained["base_backbone_sha256"] == "abc"
    assert g.head.cfg.trained["language_model_sha256"] == lm_before == fg.language_model_sha256(again)
    fresh = vlmkit.load(base / "base")
    assert fg.language_model_sha256(fresh) == lm_before
    with torch.no_grad():
        fresh.adapter.language_model().layers[0].mlp.up_proj.weight[0, 0] += 1.0
    assert fg.language_model_sha256(fresh) != lm_before
    assert all(torch.equal(a, b) for a, b in zip(g.head.state_dict().values(), head.state_dict().values()))
    from PIL import Image

    im = Image.open(next((base / "data" / "screenspot_imgs").iterdir()))
    res = g.ground(im, "click save")
    assert res.source == "pointer-head"
    assert 0 <= res.point[0] <= im.width and 0 <= res.point[1] <= im.height
    with pytest.raises(InputError, match="base checkpoint"):
        fg.save_finetuned(vlm, head, base / "base")


def _args(base, out, *extra):
    parser = argparse.ArgumentParser()
    gui_cli.add_parsers(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(["train-grounding", "--finetune-backbone", "--model", str(base / "base"), "--data",
                              str(base / "data"), "--out", str(out), "--steps", "1", "--batch", "1", "--tile", "16",
                              "--max-tiles", "8", "--d-model", "16", "--quiet", *extra])


def test_cli_writes_separate_checkpoint_and_never_the_shipped_default(base, tmp_path, capsys):
    shipped = _shipped()
    args = _args(base, tmp_path / "o", "--install", "default")
    with pytest.raises(InputError, match="--install default is refused"):
        args.func(args)
    assert not (tmp_path / "o").exists()  # refused before anything was written
    args = _args(base, tmp_path / "o2", "--install", str(default_model_path()))
    with pytest.raises(InputError, match="shipped default"):
        args.func(args)
    args = _args(base, tmp_path / "o3", "--run", "r", "--backbone-lr", "0.01")
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    model, ptr = tmp_path / "o3" / "r" / "model", tmp_path / "o3" / "r" / "model-pointer"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    info = json.loads((ptr / v2p.CONFIG_FILE).read_text())["trained"]
    base_sha = hashlib.sha256((base / "base" / "model.safetensors").read_bytes()).hexdigest()[:16]
    new_sha = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert info["finetuned_backbone"] is True and info["base_backbone_sha256"] == base_sha
    assert info["backbone_sha256"] == new_sha != base_sha and info["backbone_lr"] == 0.01
    assert v2p.head_dir_for(vlmkit.load(model)) == ptr.resolve()
    assert _shipped() == shipped


def test_continuing_a_finetune_starts_from_the_given_head(base, tmp_path):
    first = _args(base, tmp_path / "a", "--run", "r")
    assert first.func(first) == 0
    model, ptr = tmp_path / "a" / "r" / "model", tmp_path / "a" / "r" / "model-pointer"
    init = v2p.load_head(ptr)
    # no steps: the written head IS the init head, with the init head's architecture (not --d-model 32)
    cont = _args(base, tmp_path / "b", "--run", "r", "--d-model", "32", "--init-head", str(ptr), "--steps", "0")
    cont.model = str(model)
    assert cont.func(cont) == 0
    out = v2p.load_head(tmp_path / "b" / "r" / "model-pointer")
    assert out.cfg.d_model == init.cfg.d_model == 16
    assert all(torch.equal(x, y) for x, y in zip(out.state_dict().values(), init.state_dict().values()))
    assert out.cfg.trained["init_head"] == str(ptr)
    # one step moves it away from the init head; a head for another tile size is refused before training
    cont = _args(base, tmp_path / "c", "--run", "r", "--init-head", str(ptr), "--lr", "0.05")
    cont.model = str(model)
    assert cont.func(cont) == 0
    moved = v2p.load_head(tmp_path / "c" / "r" / "model-pointer")
    assert any(not torch.equal(x, y) for x, y in zip(moved.state_dict().values(), init.state_dict().values()))
    bad = _args(base, tmp_path / "d", "--run", "r", "--init-head", str(ptr))
    bad.model, bad.tile = str(model), 32
    with pytest.raises(InputError, match="--init-head"):
        bad.func(bad)
    assert not (tmp_path / "d" / "r" / "model").exists()


def test_families_without_a_trainable_vision_side_are_refused(base):
    vlm = vlmkit.load(base / "base")

    class OnlyLM(torch.nn.Module):  # a "VLM" whose every parameter belongs to the language model
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def get_input_embeddings(self):
            return self.lm.embed_tokens

        def get_output_embeddings(self):
            return None

    lm = vlm.adapter.language_model()
    fake = argparse.Namespace(model=OnlyLM(lm), adapter=argparse.Namespace(language_model=lambda: lm), family="x")
    with pytest.raises(VlmkitError, match="cannot be fine-tuned"):
        fg.backbone_parameters(fake)
    fake.model.proj = torch.nn.Linear(2, 2).half()
    with pytest.raises(InputError, match="float32"):
        fg.backbone_parameters(fake)


def test_batched_step_reads_the_same_keys_and_queries_as_inference(base):
    """The fine-tuning step encodes each screenshot once and runs all tiles of a batch in one call; its keys and
    queries must equal what :func:`screen_tokens.screen_features` / :func:`screen_tokens.query_states` give at
    inference."""
    from vlmkit.eval import screenspot as ss
    from vlmkit.io import load_image

    vlm = vlmkit.load(base / "base")
    cfg = _cfg(vlm)
    samples, _, _ = ss.load_screenspot(base / "data")
    images = ss.default_images_dir(base / "data")
    name = samples[0].image
    mine = [s for s in samples if s.image == name]
    im = load_image(images / name)
    enc = fg._encode_screen(vlm, im, mine, cfg)
    keys, pos, valid, q, text, y, idx, grid = fg._batch(vlm, [enc, enc])
    f = screen_tokens.screen_features(vlm, im, cfg.tile, cfg.max_tiles)
    assert grid == f.grid and keys.shape == (2, *f.keys.shape) and keys.requires_grad
    torch.testing.assert_close(keys[1].detach(), f.keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pos[0], f.pos())
    ref = screen_tokens.query_states(vlm, [im] * len(mine), [s.instruction for s in mine], cfg.prompt)
    torch.testing.assert_close(q, torch.cat([ref, ref]), atol=1e-5, rtol=1e-5)
    assert idx.tolist() == [0] * len(mine) + [1] * len(mine) and y.shape == (2 * len(mine), f.keys.shape[0])
    torch.testing.assert_close(y.sum(1), torch.ones(2 * len(mine)))
    assert torch.equal(valid[0], torch.as_tensor(f.valid))


def test_merge_encoded_left_pads_to_the_longest_row(base):
    from vlmkit.models.vlm import merge_encoded

    vlm = vlmkit.load(base / "base")
    im = fg._blank(16)
    short = vlm.encode([im], [vlm.prompt("a")])[:3]
    long = vlm.encode([im], [vlm.prompt("a much longer instruction with many words")])[:3]
    pad = vlm.processor.tokenizer.pad_token_id
    inputs, layouts, pads = merge_encoded([short, long], pad)
    L = long[0]["input_ids"].shape[1]
    extra = L - short[0]["input_ids"].shape[1]
    assert extra > 0 and inputs["input_ids"].shape == (2, L) and len(layouts) == 2
    assert inputs["input_ids"][0, :extra].eq(pad).all() and inputs["attention_mask"][0, :extra].eq(0).all()
    assert torch.equal(inputs["input_ids"][0, extra:], short[0]["input_ids"][0]) and pads == [extra, 0]
    one = screen_tokens.query_states(vlm, None, None, encoded=short)
    both = screen_tokens.query_states(vlm, None, None, encoded=(inputs, layouts, pads))
    torch.testing.assert_close(both[0], one[0], atol=1e-5, rtol=1e-5)


def test_shipped_gui_checkpoint_loads_by_name_and_beats_the_frozen_default_head(tmp_path):
    """The shipped GUI fine-tune: loads by name and with plain transformers, changed only the vision side of the
    default model, carries its head, and grounds held-out screens better than the frozen default head."""
    from transformers import AutoModelForImageTextToText

    from vlmkit.data import gui
    from vlmkit.default import CHECKPOINT_DIR, shipped_dir
    from vlmkit.eval import screenspot as ss

    path = shipped_dir("gui")
    if not (path / "config.json").is_file():
        pytest.skip("GUI checkpoint not shipped")
    plain = AutoModelForImageTextToText.from_pretrained(str(path))
    vlm = vlmkit.load("gui")
    grounder = v2p.make_grounder(vlm, fallback=False)
    trained = grounder.head.cfg.trained
    # the language model is its base's (the default model it was fine-tuned from), bit for bit
    assert fg.language_model_sha256(vlm) == trained["language_model_sha256"]
    default = vlmkit.load()
    if fg.language_model_sha256(default) == trained["language_model_sha256"]:   # that base is still the default
        base = AutoModelForImageTextToText.from_pretrained(str(CHECKPOINT_DIR))
        changed = {n for (n, a), b in zip(plain.state_dict().items(), base.state_dict().values())
                   if not torch.equal(a, b)}
        assert changed and all("vision_tower" in n or "multi_modal_projector" in n for n in changed)
    assert trained["finetuned_backbone"] is True
    assert trained["backbone_sha256"] == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:16]
    paths = gui.build_set(tmp_path / "held", screens_per_template=1, templates="heldout", seed=99)
    samples, errors, _ = ss.load_screenspot(tmp_path / "held")
    assert not errors and paths
    images = ss.default_images_dir(tmp_path / "held")

    def accuracy(g):
        hits = []
        for s in samples:
            x, y = g.ground(images / s.image, s.instruction).point
            hits.append(s.box[0] <= x <= s.box[2] and s.box[1] <= y <= s.box[3])
        return sum(hits) / len(hits)

    tuned, frozen = accuracy(grounder), accuracy(v2p.make_grounder(default, fallback=False))
    assert tuned >= 0.45 and tuned > frozen, (tuned, frozen, len(samples))
