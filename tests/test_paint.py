"""PAINT and the last-row boost it shares with PAI: vision-tower reads, token selection, neutrality, masking, cached
vs uncached equality, restoration."""

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from vlmkit.attention.hooks import Intervention, make_intervention
from vlmkit.errors import InputError, VlmkitError
from vlmkit.methods.pai import PAI
from vlmkit.methods.paint import PAINT, select_tokens, tukey_outliers
from vlmkit.models._adapter import FamilyAdapter
from vlmkit.models.vlm import VLM

Q = "is there a red circle in the image ?"


_img = tiny.random_image


class Probe(Intervention):
    """Sees the scores / probabilities of the last query row after the edits listed before it."""

    edits_attention = True

    def __init__(self):
        super().__init__(None)
        self.logit_rows, self.prob_rows = [], []

    def rows(self, site):
        r = torch.zeros(site.q_pos.numel(), dtype=torch.bool)
        r[-1] = True
        return r

    def logits(self, site, scores, allowed, rows):
        self.logit_rows.append((scores[:, :, -1].clone(), allowed[:, :, -1].expand_as(scores[:, :, -1]).clone()))
        return scores

    def probs(self, site, probs, allowed, rows):
        self.prob_rows.append(probs[:, :, -1].clone())
        return probs


class Scores(Intervention):
    """Records the scores ``generate`` sees at each step (through a logits processor)."""

    def __init__(self):
        super().__init__([])
        self.steps = []

    def processors(self, vlm, batch, inputs):
        probe = self

        class Record:
            def __call__(self, input_ids, scores):
                probe.steps.append(scores.clone())
                return scores

        return [Record()]


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def vlm(request):
    model, proc = tiny.build(request.param)
    return VLM(model, proc)


# ---------------------------------------------------------------- token selection
def test_select_tokens_on_constructed_scores():
    local = torch.zeros(16)
    local[[3, 7, 8, 12]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    summary = torch.linspace(0.0, 0.1, 16)  # a spread background, no outliers by itself...
    summary[[7, 15]] = torch.tensor([5.0, 6.0])  # ...plus two outliers
    sel = select_tokens(local, summary, local_ratio=0.25)
    assert sel.summary.tolist() == [7, 15]
    assert sel.local.tolist() == [3, 8, 12]  # top-4 local minus the summary token 7
    spatial = torch.zeros(16)
    spatial[[0, 1]] = 1.0
    both = select_tokens(local, summary, 0.25, spatial_scores=spatial, spatial_ratio=2 / 16)
    assert both.local.tolist() == [0, 1, 3, 8, 12]
    idx, fence = tukey_outliers(torch.ones(10))
    assert idx.numel() == 0 and fence == 1.0  # a flat score has no summary tokens
    with pytest.raises(InputError):
        select_tokens(local, summary[:4])


def _constructed_llava():
    """Tiny LLaVA whose CLIP attention is set by hand: image-independent embeddings (one-hot positions), layer 0's
    CLS row prefers patches LOCAL, layer 1's (the feature layer) prefers SUMMARY by a wide margin."""
    model, proc = tiny.build("llava")
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    d = tower.config.hidden_size
    with torch.no_grad():
        tower.embeddings.patch_embedding.weight.zero_()
        tower.embeddings.class_embedding.zero_()
        n_pos = tower.embeddings.position_embedding.weight.shape[0]
        tower.embeddings.position_embedding.weight.copy_(torch.eye(n_pos, d) * 10.0)
        for ln in [tower.pre_layrnorm] + [l.layer_norm1 for l in layers]:
            ln.weight.fill_(1.0)
            ln.bias.zero_()
        for p in (layers[0].self_attn.out_proj, layers[0].mlp.fc2):  # layer 1 sees the embeddings again
            p.weight.zero_()
            p.bias.zero_()

        def prefer(attn, gains):  # every query is the constant u; key of position i is gains[i] * u
            attn.q_proj.weight.zero_()
            attn.q_proj.bias.fill_(1.0)
            attn.k_proj.weight.zero_()
            attn.k_proj.bias.zero_()
            attn.k_proj.weight[:, 1:n_pos] = gains[None, :]

        background = torch.arange(n_pos - 1) * 0.01
        local, summary = background.clone(), background.clone()
        local[[2, 5, 11, 14]] = torch.tensor([1.0, 0.9, 0.8, 0.7])
        summary[[5, 9]] = 1.0
        prefer(layers[0].self_attn, local)
        prefer(layers[1].self_attn, summary)
    return VLM(model, proc)


def test_selection_from_constructed_vision_attention():
    vlm = _constructed_llava()
    with vlm.intervene(PAINT()) as (paint,):
        vlm.forward([_img(30, 20), _img(20, 20, 1)], [Q, "what color ?"])
    assert len(paint.selection) == 2
    for (sel,) in paint.selection:
        assert sel.summary.tolist() == [5, 9]
        assert sel.local.tolist() == [2, 11, 14]  # top 25% of 16 = {2, 5, 11, 14}, minus summary token 5


def _qwen_reference(vlm, inputs, layer):
    """Mean attention received per patch (summed over heads) recomputed from the block's own q/k, pooled 2x2 and
    put back in LLM-token order (Qwen2.5 runs its tower on window-ordered merge units)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    attn = vlm.model.model.visual.blocks[layer].attn
    seen = {}

    def hook(module, args, kwargs):
        seen.update(h=args[0], cu=kwargs["cu_seqlens"], pe=kwargs["position_embeddings"])

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            vlm.model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        handle.remove()
    h = seen["h"]
    q, k, _ = attn.qkv(h).reshape(h.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *seen["pe"])
    cu = seen["cu"].tolist()
    parts = []
    for s, e in zip(cu[:-1], cu[1:]):
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * attn.scaling, dim=-1)
        parts.append(p.mean(1).sum(0))
    tokens = torch.cat(parts).reshape(-1, 4).mean(-1)
    visual = vlm.model.model.visual
    if hasattr(visual, "fullatt_block_indexes"):
        order, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=2,
                                           window_size=visual.window_size, patch_size=visual.patch_size)
        unpermuted = torch.empty_like(tokens)
        unpermuted[order] = tokens
        tokens = unpermuted
    return list(torch.split(tokens, (inputs["image_grid_thw"].prod(-1) // 4).tolist()))


def test_vision_scores_match_reference(vlm):
    imgs = [_img(30, 20), _img(20, 34, 1)]
    inputs, layouts, _, _ = vlm.encode(imgs, [vlm.prompt(Q)] * 2)
    scores = vlm.adapter.vision_token_scores(inputs, [0, "feature"])
    last = len(vlm.adapter.vision_attention_modules()) - 1
    for b, layout in enumerate(layouts):
        assert scores[0][b].numel() == sum(v.positions.size for im in layout.images for v in im.views)
    if vlm.family == "llava":
        tower = vlm.model.model.vision_tower
        old = tower.config._attn_implementation
        tower.config._attn_implementation_internal = "eager"
        try:
            with torch.no_grad():
                ref = tower(inputs["pixel_values"], output_attentions=True).attentions
        finally:
            tower.config._attn_implementation_internal = old
        for spec, layer in [(0, 0), ("feature", last)]:
            torch.testing.assert_close(torch.stack(scores[spec]), ref[layer][:, :, 0].sum(1)[:, 1:], atol=1e-6,
                                       rtol=0)
    else:
        with pytest.raises(InputError, match="no CLS"):
            vlm.adapter.vision_token_scores(inputs, 0, kind="cls")
        for spec, layer in [(0, 0), ("feature", last)]:
            for got, want in zip(scores[spec], _qwen_reference(vlm, inputs, layer)):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="out of range"):
        vlm.adapter.vision_token_scores(inputs, 99)
    with pytest.raises(VlmkitError, match="not implemented for this family"):
        FamilyAdapter.vision_token_scores(vlm.adapter, inputs, 0)


def test_qwen2_5_windowed_vision_scores():
    model, proc = tiny.build("qwen2_5_vl")
    vlm = VLM(model, proc)
    inputs, layouts, _, _ = vlm.encode([_img(40, 24), _img(20, 34, 1)], [vlm.prompt(Q)] * 2)
    scores = vlm.adapter.vision_token_scores(inputs, [0, -1])  # block 0 windowed, block 1 full attention
    for spec, layer in [(0, 0), (-1, 1)]:
        for got, want, layout in zip(scores[spec], _qwen_reference(vlm, inputs, layer), layouts):
            assert got.numel() == layout.positions.size
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the LLM edit
def _real_rows(vlm, imgs, qs):
    _, _, pads, _ = vlm.encode(imgs, [vlm.prompt(q) for q in qs])
    return pads


@pytest.mark.parametrize("method", ["paint", "pai"])
def test_neutral_parameters_change_nothing(vlm, method):
    imgs, qs = [_img(30, 20), _img(20, 34, 1)], [Q, "what color ?"]
    pads = _real_rows(vlm, imgs, qs)
    base_logits = vlm.forward(imgs, qs)
    base = [a.token_ids for a in vlm.generate(imgs, qs, max_new_tokens=4)]
    neutral = PAINT(alpha=0.0, beta=0.0, head_modulation=0.5) if method == "paint" else PAI(alpha=0.0)
    with vlm.intervene(neutral):
        logits = vlm.forward(imgs, qs)
        toks = [a.token_ids for a in vlm.generate(imgs, qs, max_new_tokens=4)]
    assert toks == base
    for b, pad in enumerate(pads):
        assert (logits[b, pad:] - base_logits[b, pad:]).abs().max() < 1e-6
    strong = PAINT(alpha=3.0, beta=3.0) if method == "paint" else PAI(alpha=3.0)
    with vlm.intervene(strong):  # not a no-op: the last prompt row's logits move, earlier rows do not
        edited = vlm.forward(imgs, qs)
    assert (edited[:, -1] - base_logits[:, -1]).abs().max() > 1e-4
    for b, pad in enumerate(pads):
        assert (edited[b, pad:-1] - base_logits[b, pad:-1]).abs().max() < 1e-6


def test_masked_entries_stay_masked_in_left_padded_batch(vlm):
    imgs, qs = [_img(30, 20), _img(20, 34, 1)], [Q + " what shape of the image ?", "describe the image"]
    pads = _real_rows(vlm, imgs, qs)
    assert max(pads) > 0
    probe = Probe()
    with vlm.intervene(PAINT(alpha=50.0, beta=50.0, head_modulation=1.0), PAI(alpha=50.0), probe):
        vlm.generate(imgs, qs, max_new_tokens=3)
    assert len(probe.logit_rows) == 3 * vlm.adapter.num_layers == len(probe.prob_rows)  # prefill + 2 decode steps
    for (scores, allowed), probs in zip(probe.logit_rows, probe.prob_rows):
        assert torch.isneginf(scores[~allowed]).all()  # every masked entry is still -inf after the boosts
        assert torch.isfinite(scores[allowed]).all()
        assert (probs[~allowed] == 0).all()
        for b, pad in enumerate(pads):
            assert (probs[b, :, :pad] == 0).all()  # padding columns get exactly zero probability
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


@pytest.mark.parametrize("modulation", [0.0, 0.7])
def test_cached_generation_equals_uncached_forward(vlm, modulation):
    img = _img(30, 20)
    scores = Scores()
    with vlm.intervene(scores, PAINT(alpha=2.0, beta=1.0, head_modulation=modulation)):
        (answer,) = vlm.generate([img], [Q], max_new_tokens=4)
    with vlm.intervene(scores_plain := Scores()):
        vlm.generate([img], [Q], max_new_tokens=4)
    inputs, layouts, pads, _ = vlm.encode([img], [vlm.prompt(Q)])
    n = inputs["input_ids"].shape[1]
    new = torch.tensor([answer.token_ids[:-1]], dtype=inputs["input_ids"].dtype)
    ext = dict(inputs)
    ext["input_ids"] = torch.cat([inputs["input_ids"], new], dim=1)
    ext["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new)], dim=1)
    if "mm_token_type_ids" in ext:
        ext["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new)], dim=1)
    uncached = PAINT(alpha=2.0, beta=1.0, head_modulation=modulation, edit_from=n - 1)
    with vlm.intervene(uncached), vlm._session(ext, layouts, pads), torch.inference_mode():
        logits = vlm.model(**ext).logits[0, n - 1:]
    assert len(scores.steps) == len(answer.token_ids)
    for s, step in enumerate(scores.steps):
        torch.testing.assert_close(logits[s], step[0], atol=1e-5, rtol=0)
        assert int(logits[s].argmax()) == answer.token_ids[s]
    moved = max((a - b).abs().max().item() for a, b in zip(scores.steps, scores_plain.steps))
    assert moved > 1e-4  # the edit did something


def test_context_restores_model_when_body_raises(vlm):
    tower_cfg = vlm.adapter.vision_attention_modules()[0].config
    impl = tower_cfg._attn_implementation
    with pytest.raises(KeyError):
        with vlm.intervene(make_intervention("paint", alpha=0.5), make_intervention("pai", gamma=0.1)):
            vlm.generate([_img(20, 20)], [Q], max_new_tokens=2)
            raise KeyError("x")
    inputs, _, _, _ = vlm.encode([_img(20, 20)], [vlm.prompt(Q)])
    bad = dict(inputs)
    bad["pixel_values"] = inputs["pixel_values"][..., :3]  # the tower fails inside the tap
    with pytest.raises(Exception):
        vlm.adapter.vision_token_scores(bad, [0])
    assert tower_cfg._attn_implementation == impl
    assert not any(hasattr(m, "_vlmkit_vision_tap") for m in vlm.adapter.vision_attention_modules())
    assert not any(hasattr(m, "_vlmkit") for m in vlm.adapter.attention_modules())
    assert not vlm._state.active and vlm._state.batch is None
    assert getattr(vlm.model.model, "rope_deltas", None) is None


def test_registry_and_parameters():
    p = make_intervention("paint", alpha=0.5, layers=(0.5, 1.0))
    assert isinstance(p, PAINT) and p.params()["alpha"] == 0.5
    assert make_intervention("pai").alpha == 0.2
    with pytest.raises(InputError):
        PAINT(alpha=-1.0)
    with pytest.raises(InputError):
        PAI(head_modulation=2.0)


def test_fused_modulation_path_equals_generic_edit_path(monkeypatch):
    """PAI/PAINT's boost runs inside the kernel dispatch as a Modulation; the generic fp32 row edit must agree."""
    from vlmkit.methods.pai import PAI, RowBoost

    model, proc = tiny.build("llava")
    vlm = VLM(model, proc)
    img = Image.fromarray((np.random.RandomState(4).rand(24, 40, 3) * 255).astype("uint8"))
    with vlm.intervene(PAI(alpha=0.8, layers=None)), vlm.capture() as fused_rec:
        fused = vlm.generate([img], ["what color ?"], max_new_tokens=4)[0]
        fused_logits = vlm.forward([img], ["what color ?"])
    monkeypatch.setattr(RowBoost, "modulations", lambda self, site: None)
    with vlm.intervene(PAI(alpha=0.8, layers=None)), vlm.capture() as generic_rec:
        generic = vlm.generate([img], ["what color ?"], max_new_tokens=4)[0]
        generic_logits = vlm.forward([img], ["what color ?"])
    assert fused.token_ids == generic.token_ids
    torch.testing.assert_close(fused_logits, generic_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused_rec.samples[0].prefill, generic_rec.samples[0].prefill, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused_rec.samples[0].decode, generic_rec.samples[0].decode, atol=1e-5, rtol=0)
