"""Second-branch methods: VCD (noised image) and PAI's text-only CFG, each with its own KV cache."""

import pytest
import torch

import tiny
from vlmkit.attention.hooks import Intervention, make_intervention
from vlmkit.errors import InputError, VlmkitError
from vlmkit.methods.pai import PAI
from vlmkit.methods.vcd import VCD, add_diffusion_noise, noise_schedule
from vlmkit.models.vlm import VLM

Q = "is there a red circle in the image ?"


_img = tiny.random_image


class Scores(Intervention):
    """Records, per step, the scores ``generate`` passes to it and the latest branch logits of ``spy`` (place it
    after ``spy``)."""

    def __init__(self, spy=None):
        super().__init__([])
        self.spy, self.steps, self.branch = spy, [], []

    def processors(self, vlm, batch, inputs):
        rec = self

        class Record:
            def __call__(self, input_ids, scores):
                rec.steps.append(scores.clone())
                if rec.spy is not None:
                    rec.branch.append(rec.spy.procs[0].last.clone())
                return scores

        return [Record()]


class Spy:
    """Mixin keeping the logits processors an intervention made for the latest call."""

    def processors(self, vlm, batch, inputs):
        self.procs = super().processors(vlm, batch, inputs)
        return self.procs


class SpyVCD(Spy, VCD):
    pass


class SpyPAI(Spy, PAI):
    pass


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def vlm(request):
    model, proc = tiny.build(request.param)
    return VLM(model, proc)


IMGS, QS = [_img(30, 20), _img(20, 34, 1)], [Q + " what shape of the image ?", "describe the image"]


def test_neutral_parameters_change_nothing(vlm):
    raw = Scores()
    with vlm.intervene(raw):
        base = [a.token_ids for a in vlm.generate(IMGS, QS, max_new_tokens=4)]
    assert len(raw.steps) == 4  # decode steps are exercised
    for neutral in (VCD(alpha=0.0, beta=0.0), PAI(alpha=0.0, gamma=0.0)):
        seen = Scores()
        with vlm.intervene(neutral, seen):
            toks = [a.token_ids for a in vlm.generate(IMGS, QS, max_new_tokens=4)]
        assert toks == base
        for a, b in zip(seen.steps, raw.steps):
            assert (a - b).abs().max() < 1e-6
    seen = Scores()
    with vlm.intervene(VCD(alpha=0.0, beta=0.7), seen):  # the cutoff alone only removes implausible tokens
        assert [a.token_ids for a in vlm.generate(IMGS, QS, max_new_tokens=4)] == base
    removed = 0
    for a, b in zip(seen.steps, raw.steps):
        keep = torch.isfinite(a)
        removed += int((~keep).sum())
        assert (a[keep] - b[keep]).abs().max() < 1e-6
    assert removed > 0


def test_clean_branch_reproduces_main_generation(vlm):
    """With noise_step=0 the VCD branch sees the same prompt and image: its own cached decoding (positions, Qwen's
    rope deltas, left padding) must give the main generation's logits at every step."""
    spy = SpyVCD(alpha=1.0, beta=0.0, noise_step=0)
    raw, seen = Scores(), Scores(spy)
    with vlm.intervene(raw, spy, seen):
        answers = vlm.generate(IMGS, QS, max_new_tokens=4)
    assert len(seen.branch) == 4
    for main, branch in zip(raw.steps, seen.branch):
        torch.testing.assert_close(branch, main, atol=1e-4, rtol=0)
    with vlm.intervene(VCD(alpha=0.0, beta=0.0)):  # contrast with an identical branch changes nothing
        assert [a.token_ids for a in vlm.generate(IMGS, QS, max_new_tokens=4)] == [a.token_ids for a in answers]


def test_vcd_formula_and_greedy(vlm):
    spy = SpyVCD(alpha=1.0, beta=0.7, noise_step=500)
    raw, out = Scores(), Scores(spy)
    with vlm.intervene(raw, spy, out):
        answers = vlm.generate(IMGS, QS, max_new_tokens=4)
    for s, (l, branch, o) in enumerate(zip(raw.steps, out.branch, out.steps)):
        assert (branch - l).abs().max() > 1e-4  # the noised image changes the branch
        keep = torch.softmax(l, -1) >= 0.7 * torch.softmax(l, -1).max(-1, keepdim=True).values
        assert (~keep).any()
        torch.testing.assert_close(o[keep], (2 * l - branch)[keep], atol=1e-5, rtol=0)
        assert torch.isneginf(o[~keep]).all()
        for b, a in enumerate(answers):  # greedy stays greedy: the argmax of the contrasted logits
            if s < len(a.token_ids):
                assert int(o[b].argmax()) == a.token_ids[s]


def test_cfg_branch_is_the_text_only_prompt(vlm):
    inputs, _, _, _ = vlm.encode(IMGS[:1], [vlm.prompt(Q)])
    stripped = vlm.adapter.strip_image(inputs["input_ids"], inputs["attention_mask"])
    direct = vlm.adapter.text_only_inputs(Q)
    assert torch.equal(stripped["input_ids"].cpu(), direct["input_ids"])
    spy = SpyPAI(alpha=0.0, gamma=0.5)
    raw, out = Scores(), Scores(spy)
    with vlm.intervene(raw, spy, out):
        (answer,) = vlm.generate(IMGS[:1], [Q], max_new_tokens=3)
    n = direct["input_ids"].shape[1]
    ids = torch.cat([direct["input_ids"], torch.tensor([answer.token_ids[:-1]])], dim=1)
    with torch.inference_mode():  # uncached text-only forward over the prompt + generated tokens
        text_logits = vlm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, n - 1:]
    for s, (l, branch, o) in enumerate(zip(raw.steps, out.branch, out.steps)):
        torch.testing.assert_close(branch[0], text_logits[s], atol=1e-4, rtol=0)
        want = l + 0.5 * (torch.log_softmax(l, -1) - torch.log_softmax(branch, -1))
        torch.testing.assert_close(o, want, atol=1e-5, rtol=0)
        assert int(o[0].argmax()) == answer.token_ids[s]


def test_diffusion_noise():
    abar = noise_schedule()
    assert abar[0] == 1.0 and bool((abar[1:] < abar[:-1]).all()) and abar[-1] < 0.1
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(add_diffusion_noise(x, 0), x)
    assert torch.equal(add_diffusion_noise(x, 500, seed=3), add_diffusion_noise(x, 500, seed=3))
    mid, late = add_diffusion_noise(x, 500), add_diffusion_noise(x, 1000)
    corr = [float(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1]) for y in (mid, late)]
    assert corr[0] > corr[1] and corr[1] < 0.5
    with pytest.raises(InputError):
        add_diffusion_noise(x, 1001)


def test_branch_errors_restore_the_model(vlm):
    with pytest.raises(VlmkitError, match="beam search"):
        with vlm.intervene(VCD()):
            vlm.generate(IMGS[:1], [Q], max_new_tokens=2, num_beams=2)
    with pytest.raises(KeyError):
        with vlm.intervene(make_intervention("vcd"), make_intervention("pai", gamma=0.1)):
            vlm.generate(IMGS[:1], [Q], max_new_tokens=2)
            raise KeyError("x")
    assert not vlm._state.active and vlm._state.batch is None
    assert not any(hasattr(m, "_vlmkit") for m in vlm.adapter.attention_modules())
    assert getattr(vlm.model.model, "rope_deltas", None) is None
    with pytest.raises(InputError):
        VCD(beta=1.5)
