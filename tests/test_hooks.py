"""The intervention mechanism: neutral edits change nothing, masks stay masked, edits compose, models restored."""

import pytest
import torch

import tiny
from vlmkit.attention.backend import allowed_mask, edited_rows
from vlmkit.attention.hooks import Intervention, Site, make_intervention, resolve_layers
from vlmkit.models.vlm import VLM

Q = "is there a red circle in the image ?"


_img = tiny.random_image


class LogitEdit(Intervention):
    edits_attention = True

    def __init__(self, add=0.0, scale=1.0, layers=None):
        super().__init__(layers)
        self.add, self.scale = add, scale

    def logits(self, site, scores, allowed, rows):
        return scores * self.scale + self.add


class HeadScale(Intervention):
    def __init__(self, factor=1.0, layers=None):
        super().__init__(layers)
        self.factor = factor

    def heads(self, site, out):
        return out * self.factor


class ResidualProbe(Intervention):
    needs_residual = True

    def __init__(self):
        super().__init__(None)
        self.seen = []

    def heads(self, site, out):
        self.seen.append(tuple(site.batch.residual[site.layer].shape))
        return out


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def vlm(request):
    model, proc = tiny.build(request.param)
    return VLM(model, proc)


def test_neutral_edits_change_nothing(vlm):
    imgs, qs = [_img(30, 20), _img(20, 34, 1)], [Q, "what color ?"]
    base_logits = vlm.forward(imgs, qs)
    base = [a.token_ids for a in vlm.generate(imgs, qs, max_new_tokens=5)]
    with vlm.intervene(LogitEdit(), HeadScale(1.0)):
        logits = vlm.forward(imgs, qs)
        toks = [a.token_ids for a in vlm.generate(imgs, qs, max_new_tokens=5)]
    assert toks == base
    _, _, pads, _ = vlm.encode(imgs, [vlm.prompt(q) for q in qs])
    mask = torch.ones(base_logits.shape[:2], dtype=torch.bool)
    for b, pad in enumerate(pads):  # compare real (non-padding) positions
        mask[b, :pad] = False
    assert (logits[mask] - base_logits[mask]).abs().max() < 1e-5
    # the softmax is shift-invariant per row: a constant added to every allowed logit is also neutral
    with vlm.intervene(LogitEdit(add=3.0)):
        assert [a.token_ids for a in vlm.generate(imgs, qs, max_new_tokens=5)] == base


def test_edits_change_outputs_and_compose(vlm):
    img = _img(30, 20)
    base = vlm.forward([img], [Q])
    with vlm.intervene(HeadScale(0.0)):
        zeroed = vlm.forward([img], [Q])
    assert (zeroed - base).abs().max() > 1e-3
    with vlm.intervene(HeadScale(2.0), HeadScale(0.5)):
        composed = vlm.forward([img], [Q])
    torch.testing.assert_close(composed, base, atol=1e-5, rtol=0)
    last = vlm.adapter.num_layers - 1
    with vlm.intervene(HeadScale(0.0, layers=[last])) as (iv,):
        assert iv.layers == [last]
        one_layer = vlm.forward([img], [Q])
    assert not torch.allclose(one_layer, base) and not torch.allclose(one_layer, zeroed)


def test_capture_records_edited_probabilities(vlm):
    img = _img(30, 20)
    with vlm.capture(rows="last") as plain:
        vlm.forward([img], [Q])
    with vlm.intervene(LogitEdit(scale=0.0)), vlm.capture(rows="last") as edited:
        vlm.forward([img], [Q])
    p = edited.maps.prefill  # scale 0: uniform over the allowed keys
    n = len(edited.maps.tokens)
    torch.testing.assert_close(p, torch.full_like(p, 1.0 / n))
    assert not torch.allclose(plain.maps.prefill, p)


def test_masked_entries_stay_masked():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    allowed = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    allowed[1, :, :, :2] = False  # sample 1 is left-padded by two positions
    allowed &= allowed_mask(None, 6, 6, True, "cpu")
    site = Site(0, 0, None, torch.arange(6), 6)
    out, probs = edited_rows(q, k, v, allowed, 0.35, site, torch.arange(6), [LogitEdit(add=1e4, scale=50.0)])
    assert torch.all(probs[~allowed.expand_as(probs)] == 0)
    torch.testing.assert_close(probs.sum(-1)[1, :, 2:], torch.ones(4, 4))


def test_context_restores_model_when_body_raises(vlm):
    modules = vlm.adapter.attention_modules()
    layers = vlm.adapter.decoder_layers()
    probe = ResidualProbe()
    with pytest.raises(KeyError):
        with vlm.intervene(probe):
            assert all(len(l._forward_pre_hooks) == 1 for l in layers)
            vlm.forward([_img(20, 20)], [Q])
            raise KeyError("x")
    hidden = vlm.model.config.text_config.hidden_size
    assert probe.seen and all(s[-1] == hidden for s in probe.seen)
    assert not any(hasattr(m, "_vlmkit") for m in modules)
    assert all(len(l._forward_pre_hooks) == 0 for l in layers)
    assert not vlm._state.active


def test_registry_and_layer_specs():
    assert make_intervention("none").name == "none"
    with pytest.raises(ValueError, match="unknown method"):
        make_intervention("nope")
    assert resolve_layers(None, 4) == [0, 1, 2, 3]
    assert resolve_layers([-1, 0], 4) == [0, 3]
    assert resolve_layers((0.5, 1.0), 32) == list(range(16, 32))
    assert resolve_layers([0.5], 3) == [2]
