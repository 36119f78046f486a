"""Segmenter backends: a tiny random SAM through segment-anything and through transformers, safe loading."""

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("segment_anything")

from vlmkit.errors import ModelLoadError  # noqa: E402
from vlmkit.grounding.segmenters import (HFSamSegmenter, SamSegmenter, Segmenter, build_tiny_sam,  # noqa: E402
                                         load_segmenter, load_state_dict)
from vlmkit.grounding.train_sam import SMOKE_CONFIG, export  # noqa: E402


def _img(w=40, h=30, seed=0):
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    return build_tiny_sam(SMOKE_CONFIG)


class Evil:
    """Unpickling this runs code: the loader must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_sam_backend_shapes_and_mask_feedback(tiny_sam):
    seg = SamSegmenter(tiny_sam)
    assert isinstance(seg, Segmenter)
    seg.set_image(_img(40, 30))
    r = seg.predict(np.array([[10.5, 5.5]]), np.array([1]), multimask=True)
    assert r.masks.shape == (3, 30, 40) and r.masks.dtype == bool and r.scores.shape == (3,)
    s = seg.mask_input_size
    assert r.logits.shape == (3, s, s)
    r2 = seg.predict(np.array([[10.5, 5.5], [30.0, 20.0]]), np.array([1, 0]), mask_input=r.logits[r.best()][None],
                     multimask=False)
    assert r2.masks.shape == (1, 30, 40)


def test_bad_image_is_rejected(tiny_sam):
    seg = SamSegmenter(tiny_sam)
    with pytest.raises(ValueError, match="uint8"):
        seg.set_image(np.zeros((10, 10), np.uint8))


def test_checkpoint_roundtrip_pth_safetensors_and_dir(tiny_sam, tmp_path):
    ref = SamSegmenter(tiny_sam)
    img, pt = _img(), np.array([[12.0, 9.0]])
    ref.set_image(img)
    want = ref.predict(pt, np.array([1])).logits
    export(tiny_sam, SMOKE_CONFIG, tmp_path / "d")  # vlmkit directory: config.json + model.safetensors
    torch.save(tiny_sam.state_dict(), tmp_path / "d" / "weights.pth")  # plain state dict next to the config
    for src in (tmp_path / "d", tmp_path / "d" / "weights.pth", tmp_path / "d" / "model.safetensors"):
        seg = load_segmenter(src)
        seg.set_image(img)
        np.testing.assert_allclose(seg.predict(pt, np.array([1])).logits, want, atol=1e-5)


def test_pickle_with_code_is_refused(tmp_path):
    bad = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(ModelLoadError, match="refused"):
        load_state_dict(bad)
    (tmp_path / "config.json").write_text(json.dumps({**SMOKE_CONFIG, "format": "vlmkit-sam"}))
    with pytest.raises(ModelLoadError, match="refused"):
        load_segmenter(bad)


def test_missing_and_wrong_checkpoints_give_clear_errors(tmp_path, tiny_sam):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_segmenter(tmp_path / "nope.pth")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_segmenter(tmp_path)
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(7, 3, 16, 16)}, tmp_path / "odd.pth")
    with pytest.raises(ModelLoadError, match="model_type"):
        load_segmenter(tmp_path / "odd.pth")
    torch.save(tiny_sam.state_dict(), tmp_path / "tiny.pth")  # no config next to it, not an official size
    with pytest.raises(ModelLoadError):
        load_segmenter(tmp_path / "tiny.pth")


def test_official_registry_model_is_built_for_vit_b_weights(monkeypatch, tmp_path):
    """A state dict with ViT-B's patch embedding is routed to ``sam_model_registry['vit_b']`` (stubbed here: the
    real ViT-B is too slow to build in a unit test)."""
    import segment_anything

    built = {}

    def fake_builder(checkpoint=None):
        built["checkpoint"] = checkpoint
        return build_tiny_sam(SMOKE_CONFIG)

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", fake_builder)
    state = dict(build_tiny_sam(SMOKE_CONFIG).state_dict())
    state["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 3, 16, 16)
    torch.save(state, tmp_path / "sam_vit_b.pth")
    with pytest.raises(ModelLoadError, match="do not fit"):  # the stub is tiny, so the weights cannot fit
        load_segmenter(tmp_path / "sam_vit_b.pth")
    assert built == {"checkpoint": None}  # built without letting segment-anything call torch.load itself


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    cfg = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16, mlp_dim=64, window_size=2, global_attn_indexes=[1],
                           num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=32))
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hfsam")
    SamModel(cfg).save_pretrained(d)
    SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16})).save_pretrained(d)
    return d


def test_transformers_backend(hf_dir):
    seg = load_segmenter(hf_dir)
    assert isinstance(seg, HFSamSegmenter) and isinstance(seg, Segmenter)
    seg.set_image(_img(50, 30))
    r = seg.predict(np.array([[10.0, 10.0], [40.0, 20.0]]), np.array([1, 0]), multimask=True)
    assert r.masks.shape == (3, 30, 50) and r.masks.dtype == bool and r.scores.shape == (3,)
    assert r.logits.shape[-1] == seg.mask_input_size
    r2 = seg.predict(np.array([[10.0, 10.0]]), np.array([1]), mask_input=r.logits[0][None], multimask=False)
    assert r2.masks.shape == (1, 30, 50)
    # the point is scaled into the processor's frame: a different point gives different logits
    r3 = seg.predict(np.array([[45.0, 25.0]]), np.array([1]), multimask=False)
    assert not np.allclose(r3.logits, seg.predict(np.array([[5.0, 5.0]]), np.array([1]), multimask=False).logits)


def test_shipped_small_sam_loads_and_is_small():
    from vlmkit.grounding.segmenters import default_sam_path

    d = default_sam_path()
    if not (d / "model.safetensors").is_file():
        pytest.skip("the small SAM has not been trained into the package yet")
    assert (d / "model.safetensors").stat().st_size < 8_000_000
    seg = load_segmenter()
    assert isinstance(seg, SamSegmenter)
    seg.set_image(_img(60, 45))
    assert seg.predict(np.array([[30.0, 20.0]]), np.array([1])).masks.shape == (3, 45, 60)


@pytest.mark.slow
def test_train_sam_smoke_run_exports_a_loadable_checkpoint(tmp_path):
    from vlmkit.grounding.train_sam import train

    m = train(minutes=0.05, run_dir=tmp_path / "run", out_dir=tmp_path / "out", config=SMOKE_CONFIG, batch=2,
              pool0=4, val_scenes=1, scene_size=48, log=lambda *a: None)
    assert m["steps"] >= 1 and 0.0 <= m["iou_center"] <= 1.0
    assert isinstance(load_segmenter(tmp_path / "out"), SamSegmenter)
    again = train(minutes=0.06, run_dir=tmp_path / "run", out_dir=tmp_path / "out", config=SMOKE_CONFIG, batch=2,
                  pool0=4, val_scenes=1, scene_size=48, resume=True, log=lambda *a: None)
    assert again["steps"] >= m["steps"]  # resumed from the checkpoint (read with weights_only=True)
