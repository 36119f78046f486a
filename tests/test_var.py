"""VAR: sink scores, discovery of massive-activation dims, redistribution semantics on constructed probabilities, and
on tiny models with injected massive activations: p=0 is neutral, edited rows sum to 1, mass moves only from sinks to
visual non-sinks, masked entries stay 0, the model is restored."""

from contextlib import contextmanager

import pytest
import torch

import tiny
from vlmkit.attention.hooks import Intervention
from vlmkit.errors import InputError
from vlmkit.methods.var import VAR, discover_sink_dims, redistribute, sink_scores, sink_threshold
from vlmkit.models.vlm import VLM

QS = ["what color is the circle ?", "is there a red square in the image ?"]
DIMS = (5, 17)


_img = tiny.random_image


IMGS = [_img(30, 20), _img(20, 34, 1)]


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def vlm(request):
    model, proc = tiny.build(request.param, layers=3)
    return VLM(model, proc)


@contextmanager
def massive(vlm, dims=DIMS, k=3, size=40.0):
    """Give the first real token and the first ``k`` image tokens of every prompt massive activations in ``dims``
    (set at the first decoder layer's input, carried by the residual stream), like a real LM's sink tokens."""
    seen = {}

    def top(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            seen["ids"], seen["mask"] = ids, kwargs.get("attention_mask")

    def first_layer(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        ids = seen.get("ids")
        if ids is None or h.shape[:2] != ids.shape:
            return None
        h = h.clone()
        mask = seen["mask"] if seen["mask"] is not None else torch.ones_like(ids)
        for b in range(ids.shape[0]):
            pos = [int(torch.argmax(mask[b]))] + torch.nonzero(ids[b] == vlm.adapter.image_token_id)[:k, 0].tolist()
            rms = h[b].pow(2).mean(-1).sqrt().mean()
            for d in dims:
                h[b, pos, d] = size * rms
        if args:
            return (h,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handles = [vlm.model.register_forward_pre_hook(top, with_kwargs=True),
               vlm.adapter.decoder_layers()[0].register_forward_pre_hook(first_layer, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Spy(Intervention):
    """Records the probabilities it sees on the rows other edits touch (touches no row itself)."""

    edits_attention = True

    def __init__(self, layers):
        super().__init__(list(layers))
        self.seen = []

    def rows(self, site):
        return torch.zeros(site.q_pos.numel(), dtype=torch.bool)

    def probs(self, site, probs, allowed, rows):
        self.seen.append((site, probs.clone(), allowed.expand_as(probs).clone(), rows.clone()))
        return probs


def _var(**kw):
    return VAR(sink_dims=DIMS, tau=3.5, tau_cap=None, **kw)  # phi <= sqrt(32 / 2) = 4 in a 32-d model


# ---------------------------------------------------------------- pure functions
def test_sink_scores_and_threshold():
    x = torch.randn(3, 64) * 0.1
    x[1, 7] = 50.0
    phi = sink_scores(x, [7, 9])
    assert phi[1] > 7.5 and phi[0] < 4 and phi[2] < 4
    expected = 50.0 / x[1].pow(2).mean().add(1e-6).sqrt()
    torch.testing.assert_close(phi[1], expected)
    assert sink_threshold(20, 4096) == 20 and sink_threshold(20, 128) == pytest.approx(0.5 * 128 ** 0.5)
    assert sink_threshold(20, 128, tau_cap=None) == 20


def _constructed():
    torch.manual_seed(0)
    B, H, R, L = 2, 3, 4, 10
    sink = torch.zeros(B, L, dtype=torch.bool)
    sink[:, 0] = True  # a text sink (BOS-like; masked in the padded sample 1)
    sink[:, 3] = True  # a visual sink
    visual = torch.zeros(B, L, dtype=torch.bool)
    visual[:, 2:8] = True
    allowed = torch.ones(B, H, R, L, dtype=torch.bool)
    allowed[1, :, :, :2] = False  # sample 1 is left-padded by two positions
    logits = 0.3 * torch.randn(B, H, R, L)
    logits[:, :, :, 2:8] += 1.5  # image-heavy rows
    logits[:, 1, :, 2:8] -= 6.0  # head 1 barely looks at the image (visual mass < 0.2)
    logits[:, 2, :, 3] += 6.0  # head 2 is dominated by the visual sink (non-sink share < 0.5)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    return probs, sink, visual, allowed


def test_redistribution_semantics():
    probs, sink, visual, allowed = _constructed()
    rows = torch.ones(2, 4, dtype=torch.bool)
    rows[0, 0] = False
    new, sel = redistribute(probs, sink, visual, 0.6, rows=rows)
    torch.testing.assert_close(new.sum(-1), torch.ones_like(new.sum(-1)))
    assert torch.all(new[~allowed] == 0)
    assert sel[:, 0, 1:].all() and not sel[0, 0, 0]  # row mask respected
    assert not sel[:, 1].any() and not sel[:, 2].any()  # low visual mass / sink-dominated heads untouched
    torch.testing.assert_close(new[~sel], probs[~sel], rtol=0, atol=0)
    s = sel[..., None].expand_as(probs)
    ns = (visual & ~sink)[:, None, None, :].expand_as(probs)
    sk = sink[:, None, None, :].expand_as(probs)
    text = ~visual[:, None, None, :].expand_as(probs) & ~sk
    torch.testing.assert_close(new[s & sk], 0.4 * probs[s & sk])  # sinks keep 1 - p
    torch.testing.assert_close(new[s & text], probs[s & text], rtol=0, atol=0)  # other text untouched
    ratio = new / probs.clamp_min(1e-30)  # visual non-sinks all grow by the same factor in a row
    for b, h, r in torch.nonzero(sel).tolist():
        g = ratio[b, h, r][ns[b, h, r]]
        assert (g > 1).all() and torch.allclose(g, g[0].expand_as(g))
    # compat: the official code moves 1 - p and asks for a sink share <= rho
    old, _ = redistribute(probs, sink, visual, 0.6, reference_code_compat=True)
    torch.testing.assert_close(old[s & sk], 0.6 * probs[s & sk])
    zero, _ = redistribute(probs, sink, visual, 0.0)
    torch.testing.assert_close(zero, probs, rtol=0, atol=0)


def test_validation():
    for bad in (dict(p=1.5), dict(rho=-0.1), dict(tau=0)):
        with pytest.raises(InputError):
            VAR(**bad)


# ---------------------------------------------------------------- on tiny models
def test_discovers_the_massive_dims(vlm):
    plain = discover_sink_dims(vlm, IMGS, QS)
    with massive(vlm):
        found = discover_sink_dims(vlm, IMGS, QS, top=2)
    assert sorted(found.dims) == sorted(DIMS)
    assert found.ratio > plain.ratio and found.score.shape == (vlm.model.config.text_config.hidden_size,)


def test_neutral_p_changes_nothing(vlm):
    with massive(vlm):
        base_logits = vlm.forward(IMGS, QS)
        base = [a.token_ids for a in vlm.generate(IMGS, QS, max_new_tokens=5)]
        iv = _var(p=0.0)
        spy = Spy(range(vlm.adapter.num_layers))
        with vlm.intervene(iv, spy):
            logits = vlm.forward(IMGS, QS)
            toks = [a.token_ids for a in vlm.generate(IMGS, QS, max_new_tokens=5)]
    assert spy.seen and any(r.numel() for _, _, _, r in spy.seen)  # the edit path ran
    assert toks == base
    _, _, pads, _ = vlm.encode(IMGS, [vlm.prompt(q) for q in QS])
    for b, pad in enumerate(pads):
        assert (logits[b, pad:] - base_logits[b, pad:]).abs().max() < 1e-6


def test_edited_rows_sum_to_one_and_only_sinks_give(vlm):
    layers = list(range(vlm.adapter.num_layers - 1))
    before, after = Spy(layers), Spy(layers)
    iv = _var(p=0.6)
    with massive(vlm), vlm.intervene(before, iv, after):
        answers = vlm.generate(IMGS, QS, max_new_tokens=4)
        assert iv.dims_for(vlm) == list(DIMS)
    assert len(before.seen) == len(after.seen) > 0
    changed = 0
    for (site, p0, allowed, rows), (_, p1, _, _) in zip(before.seen, after.seen):
        st = site.batch.extras[iv._key]
        lk = p0.shape[-1]
        pad = lambda m: torch.cat([m, m.new_zeros(m.shape[0], lk - m.shape[1])], 1)[:, None, None, :]  # noqa: E731
        sinks, visual = pad(st.sinks[site.layer]), pad(st.visual)
        assert torch.all(p1[~allowed] == 0)  # left padding: masked stays masked
        live = allowed.any(-1)
        torch.testing.assert_close(p1.sum(-1)[live], torch.ones(int(live.sum())))
        diff = p1 - p0
        assert torch.all(sinks.expand_as(diff)[diff < -1e-7])  # only sinks lose
        assert torch.all((visual & ~sinks).expand_as(diff)[diff > 1e-7])  # only visual non-sinks gain
        changed += int((diff.abs() > 1e-6).any(-1).sum())
        if site.step == 0:  # prefill: only rows after the sample's image
            q = site.q_pos[rows.cpu()]
            before_image = q[None, :] < st.row_start[:, None]
            assert (diff.abs().amax((1, 3)).cpu()[before_image] == 0).all()
    assert changed > 0 and len(answers) == 2


def test_left_padded_batch_equals_single(vlm):
    with massive(vlm), vlm.intervene(_var(p=0.6)):
        batch = [a.token_ids for a in vlm.generate(IMGS, QS, max_new_tokens=5)]
        single = [vlm.generate(IMGS[b:b + 1], QS[b:b + 1], max_new_tokens=5)[0].token_ids for b in range(2)]
    assert batch == single


def test_auto_discovery_and_restore_on_raise(vlm):
    base = vlm.forward(IMGS[:1], QS[:1])
    iv = VAR(tau=3.5, tau_cap=None)  # no sink dims given
    with massive(vlm):
        with pytest.raises(KeyError):
            with vlm.intervene(iv):
                vlm.generate(IMGS, QS, max_new_tokens=2)
                raise KeyError("body")
    assert sorted(iv.dims_for(vlm)) == sorted(DIMS)
    assert not any(hasattr(m, "_vlmkit") for m in vlm.adapter.attention_modules())
    assert all(len(l._forward_pre_hooks) == 0 for l in vlm.adapter.decoder_layers())
    assert not vlm._state.active and vlm._state.batch is None
    torch.testing.assert_close(vlm.forward(IMGS[:1], QS[:1]), base, rtol=0, atol=0)


def test_composes_with_vhr_and_capture(vlm):
    from vlmkit.methods.vhr import VHR

    with massive(vlm):
        with vlm.capture(rows="last") as plain:
            vlm.ask(IMGS[0], QS[0], max_new_tokens=3)
        with vlm.intervene(VHR(alpha=1.0), _var(p=0.0)), vlm.capture(rows="last") as neutral:
            vlm.ask(IMGS[0], QS[0], max_new_tokens=3)
        with vlm.intervene(VHR(alpha=2.0), _var(p=0.6)), vlm.capture(rows="last") as edited:
            vlm.ask(IMGS[0], QS[0], max_new_tokens=3)
    # the side forwards (VHR's two branches) never reach the recorder; neutral parameters change no map
    torch.testing.assert_close(neutral.maps.prefill, plain.maps.prefill, rtol=0, atol=1e-6)
    torch.testing.assert_close(neutral.maps.decode, plain.maps.decode, rtol=0, atol=1e-6)
    assert edited.maps.prefill.shape == plain.maps.prefill.shape
    assert (edited.maps.prefill - plain.maps.prefill).abs().max() > 1e-4
