"""vlmkit.load, generation settings, bad inputs, AttentionMaps persistence and the `vlmkit ask` command."""


import numpy as np
import pytest
import torch
from PIL import Image

import tiny
import vlmkit
from vlmkit.cli import main, parse_layers
from vlmkit.errors import InputError, ModelLoadError


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    """A tiny LLaVA saved with save_pretrained, whose shipped generation_config asks for sampling."""
    from transformers import GenerationConfig

    model, proc = tiny.build("llava", pad=True)
    model.generation_config = GenerationConfig(do_sample=True, temperature=5.0, max_new_tokens=1, top_k=3)
    d = tmp_path_factory.mktemp("ckpt") / "tiny-llava"
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def vlm(saved_llava):
    return vlmkit.load(saved_llava)


@pytest.fixture
def png(tmp_path):
    p = tmp_path / "img.png"
    Image.fromarray((np.random.RandomState(0).rand(30, 50, 3) * 255).astype("uint8")).save(p)
    return p


def test_load_round_trip_is_greedy_and_ignores_shipped_generation_config(vlm, png):
    assert vlm.family == "llava"
    assert not vlm.model.generation_config.do_sample
    answers = {vlm.ask(png, "is there a red circle ?", max_new_tokens=5) for _ in range(3)}
    assert len(answers) == 1  # greedy: deterministic despite do_sample=True in the checkpoint
    ids = vlm.generate([png], ["is there a red circle ?"], max_new_tokens=5)[0].token_ids
    assert 1 < len(ids) <= 5  # our max_new_tokens, not the checkpoint's 1
    with pytest.raises(TypeError, match="unknown generation settings"):
        vlm.ask(png, "hi", beams=3)


def test_load_errors_are_one_line_and_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="no such directory"):
        vlmkit.load(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*hf download"):
        vlmkit.load("someorg/some-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        vlmkit.load(tmp_path / "empty")
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(
        tmp_path / "bert")
    with pytest.raises(ModelLoadError, match="unsupported architecture 'bert'.*llava"):
        vlmkit.load(tmp_path / "bert")


def test_load_refuses_pickle_weights(saved_llava, tmp_path):
    import shutil

    d = tmp_path / "pickled"
    shutil.copytree(saved_llava, d)
    state = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        d / "model.safetensors").items()}
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        vlmkit.load(d)


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "img"),
    (lambda p: None, "img"),
])
def test_bad_images_name_the_input(vlm, tmp_path, make, match):
    p = tmp_path / "img.png"
    make(p)
    with pytest.raises(InputError, match=match):
        vlm.ask(p, "hi")


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16"])
def test_non_rgb_modes_work(vlm, mode):
    img = Image.new("RGB", (33, 21), (200, 30, 30)).convert(mode) if mode != "I;16" else \
        Image.fromarray((np.arange(33 * 21).reshape(21, 33) * 90).astype(np.uint16))
    assert isinstance(vlm.ask(img, "what color ?", max_new_tokens=2), str)


@pytest.mark.parametrize("size", [(1, 1), (10000, 50)])
def test_extreme_sizes_work_with_maps(vlm, size):
    img = Image.new("RGB", size, (10, 200, 10))
    with vlm.capture() as rec:
        vlm.ask(img, "what color ?", max_new_tokens=2)
    heat = rec.maps.to_pixels()
    assert heat.shape == (size[1], size[0])
    assert np.isfinite(heat).all()


def test_pixel_cap(vlm, monkeypatch):
    monkeypatch.setenv("VLMKIT_MAX_PIXELS", "100")
    with pytest.raises(InputError, match="pixel"):
        vlm.ask(Image.new("RGB", (20, 20)), "hi")


def test_attention_maps_grid_pixels_and_round_trip(vlm, png, tmp_path):
    with vlm.capture(rows="last") as rec:
        vlm.ask(png, "is there a red circle ?", max_new_tokens=3)
    maps = rec.maps
    L, H = vlm.adapter.num_layers, vlm.model.config.text_config.num_attention_heads
    assert maps.prefill.shape[:3] == (L, H, 1)
    grid = maps.to_grid(0)
    view = maps.layout.images[0].views[0]
    assert tuple(grid.shape) == view.grid
    torch.testing.assert_close(grid.flatten(), maps.aggregate())  # LLaVA: every image token is in the grid
    heat = maps.to_pixels()
    assert heat.shape == (30, 50)
    # the pixel map takes exactly the token values (padding tokens excluded)
    assert np.isclose(heat.max(), grid.flatten()[torch.as_tensor(view.valid)].max().item(), atol=1e-6)
    maps.save(tmp_path / "maps.safetensors")
    back = vlmkit.AttentionMaps.load(tmp_path / "maps.safetensors")
    torch.testing.assert_close(back.prefill, maps.prefill)
    torch.testing.assert_close(back.decode, maps.decode)
    assert back.tokens == maps.tokens and back.generated == maps.generated
    np.testing.assert_allclose(back.to_pixels(), heat, atol=1e-4)
    over = maps.overlay(png)
    assert over.size == (50, 30)


def test_cli_ask_writes_heatmap(saved_llava, png, tmp_path, capsys):
    out = tmp_path / "heat.png"
    assert main(["ask", str(png), "is there a red circle ?", "--model", str(saved_llava), "--heatmap", str(out),
                 "--layers", "0-1", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert Image.open(out).size == (50, 30)
    assert main(["ask", str(tmp_path / "nope.png"), "q", "--model", str(saved_llava)]) == 1
    assert "nope.png" in capsys.readouterr().err


def test_parse_layers():
    assert parse_layers("8-10") == [8, 9, 10]
    assert parse_layers("3,5,-1") == [3, 5, -1]
    assert parse_layers(None) is None


def test_cli_ask_with_method(saved_llava, png, capsys):
    assert main(["ask", str(png), "what color ?", "--model", str(saved_llava), "--method", "pai",
                 "--method-args", "alpha=0.0", "--max-new-tokens", "3"]) == 0
    neutral = capsys.readouterr().out
    assert main(["ask", str(png), "what color ?", "--model", str(saved_llava), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == neutral  # alpha=0 is no edit
    assert main(["ask", str(png), "q", "--model", str(saved_llava), "--method", "nope"]) == 1
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_cli_ask_with_carve_writes_refined_and_contrast(saved_llava, png, tmp_path, capsys):
    out = tmp_path / "carve.png"
    assert main(["ask", str(png), "what color ?", "--model", str(saved_llava), "--method", "carve", "--heatmap",
                 str(out), "--max-new-tokens", "3"]) == 0
    assert "original answer" in capsys.readouterr().err
    for p in (out, tmp_path / "carve.refined.png", tmp_path / "carve.contrast.png"):
        assert p.is_file(), p


def test_forward_takes_questions_or_full_prompts(vlm, png):
    q = "Is there a red circle in the image?"
    by_question = vlm.forward([png], [q])
    by_prompt = vlm.forward([png], prompts=[vlm.prompt(q)])
    assert torch.equal(by_question, by_prompt)
    longer = vlm.forward([png], prompts=[vlm.prompt(q) + " yes"])
    assert longer.shape[1] > by_prompt.shape[1]
    with pytest.raises(ValueError, match="either questions or prompts"):
        vlm.forward([png], [q], prompts=[vlm.prompt(q)])
