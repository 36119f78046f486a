"""Capture through the registered backend equals eager attention; answers unchanged; batches equal singles."""

import threading

import numpy as np
import pytest
import torch

import tiny
from vlmkit.models.vlm import VLM

Q1 = "is there a red circle in the image ?"
Q2 = "what color ?"


_img = tiny.random_image


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def vlm(request):
    model, processor = tiny.build(request.param)
    return VLM(model, processor)


def _eager(vlm, fn):
    """Run ``fn`` with the whole model on eager attention, then restore vlmkit's backend."""
    vlm.model.set_attn_implementation("eager")
    try:
        return fn()
    finally:
        vlm.model.set_attn_implementation({"text_config": "vlmkit"})


def test_prefill_rows_equal_eager(vlm):
    img = _img(40, 20)
    with vlm.capture(rows="prompt_text") as rec:
        vlm.generate([img], [Q1], max_new_tokens=1)
    maps = rec.maps
    inputs, layouts, _, _ = vlm.encode([img], [vlm.prompt(Q1)])

    def run():
        vlm.adapter.reset_state()
        with torch.no_grad():
            return vlm.model(**inputs, output_attentions=True).attentions

    att = _eager(vlm, run)
    assert len(att) == vlm.adapter.num_layers
    cols = torch.as_tensor(layouts[0].positions)
    rows = torch.as_tensor(maps.rows)
    ref = torch.stack([a[0][:, rows][:, :, cols] for a in att])  # [L, H, R, C]
    assert maps.prefill.shape == ref.shape
    assert rows.numel() == inputs["input_ids"].shape[1] - cols.numel()
    torch.testing.assert_close(maps.prefill, ref.float(), atol=1e-5, rtol=0)


def test_decode_steps_equal_eager_and_tokens_unchanged(vlm):
    img = _img(24, 36, seed=1)
    plain = vlm.generate([img], [Q1], max_new_tokens=6)[0]
    with vlm.capture(rows="last") as rec:
        captured = vlm.generate([img], [Q1], max_new_tokens=6)[0]
    assert captured.token_ids == plain.token_ids
    maps = rec.maps
    inputs, layouts, _, _ = vlm.encode([img], [vlm.prompt(Q1)])

    def run():
        vlm.adapter.reset_state()
        with torch.no_grad():
            return vlm.model.generate(**inputs, **vlm._generate_kwargs(vlm.generation.replace(max_new_tokens=6)),
                                      output_attentions=True, return_dict_in_generate=True)

    out = _eager(vlm, run)
    n = inputs["input_ids"].shape[1]
    assert out.sequences[0, n:].tolist()[:len(plain.token_ids)] == plain.token_ids
    cols = torch.as_tensor(layouts[0].positions)
    first = torch.stack([a[0, :, -1, cols] for a in out.attentions[0]])  # [L, H, C]
    torch.testing.assert_close(maps.prefill[:, :, 0], first.float(), atol=1e-5, rtol=0)
    assert maps.decode.shape[0] == len(plain.token_ids) - 1
    for s in range(maps.decode.shape[0]):
        ref = torch.stack([a[0, :, -1, cols] for a in out.attentions[s + 1]])
        torch.testing.assert_close(maps.decode[s], ref.float(), atol=1e-5, rtol=0)


def test_left_padded_batch_equals_single(vlm):
    a, b = _img(40, 20, 2), _img(18, 30, 3)
    with vlm.capture(rows="last") as rec:
        batch = vlm.generate([a, b], [Q1, Q2], max_new_tokens=4)
    with vlm.capture(rows="last") as rec_a:
        single_a = vlm.generate([a], [Q1], max_new_tokens=4)[0]
    with vlm.capture(rows="last") as rec_b:
        single_b = vlm.generate([b], [Q2], max_new_tokens=4)[0]
    assert [x.token_ids for x in batch] == [single_a.token_ids, single_b.token_ids]
    for got, want in zip(rec.samples, [rec_a.maps, rec_b.maps]):
        assert got.rows == want.rows
        np.testing.assert_array_equal(got.layout.positions, want.layout.positions)
        torch.testing.assert_close(got.prefill, want.prefill, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.decode, want.decode, atol=1e-5, rtol=0)


def test_capture_restores_model_and_selects_layers(vlm):
    modules = vlm.adapter.attention_modules()
    last = vlm.adapter.num_layers - 1
    with pytest.raises(RuntimeError, match="boom"):
        with vlm.capture(layers=[-1], rows="generated") as rec:
            assert all(hasattr(m, "_vlmkit") for m in modules)
            vlm.generate([_img(20, 20)], [Q1], max_new_tokens=3)
            raise RuntimeError("boom")
    assert not any(hasattr(m, "_vlmkit") for m in modules)
    maps = rec.maps
    assert maps.layers == [last]
    assert maps.prefill.shape[2] == 0  # "generated": decode rows only
    assert vlm._state.recorder is None and not vlm._state.active
    with pytest.raises(ValueError, match="out of range"):
        with vlm.capture(layers=[99]):
            pass


def test_concurrent_captures_do_not_mix(vlm):
    results = {}

    def worker(key, q, img):
        with vlm.capture(rows="last") as rec:
            vlm.generate([img], [q], max_new_tokens=2)
        results[key] = rec

    threads = [threading.Thread(target=worker, args=(i, q, _img(20 + 4 * i, 20, i))) for i, q in enumerate([Q1, Q2])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results[0].samples) == len(results[1].samples) == 1
    assert results[0].maps.tokens != results[1].maps.tokens
    assert "circle" in results[0].maps.tokens and "circle" not in results[1].maps.tokens


def test_rope_state_reset_between_calls(vlm):
    img_a, img_b = _img(40, 20, 5), _img(16, 44, 6)
    first = vlm.generate([img_b], [Q2], max_new_tokens=4)[0].token_ids
    vlm.generate([img_a], [Q1], max_new_tokens=4)
    assert vlm.generate([img_b], [Q2], max_new_tokens=4)[0].token_ids == first
