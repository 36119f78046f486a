"""Saliency methods peak where the answer depends on the image by construction; agreement metrics; report files."""

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from vlmkit.attention.hooks import Intervention
from vlmkit.methods.saliency import Explainer, pearson, spearman, topk_overlap
from vlmkit.models.vlm import VLM

Q = "what color ?"


class OnlyToken(Intervention):
    """Every row attends only to itself, except the last prompt row, which also attends to one image token."""

    edits_attention = True

    def __init__(self, column):
        super().__init__(None)
        self.column = column

    def logits(self, site, scores, allowed, rows):
        keep = torch.zeros_like(scores, dtype=torch.bool)
        q_pos = site.q_pos[rows.cpu()]
        keep[..., torch.arange(len(rows)), q_pos] = True
        if site.step == 0:
            keep[..., -1, self.column] = True
        return scores.masked_fill(~keep, float("-inf"))


@pytest.fixture(scope="module")
def constructed():
    """A tiny LLaVA whose first answer token depends on exactly one image token."""
    model, proc = tiny.build("llava", pad=True)
    with torch.no_grad():
        for name, mod in model.model.vision_tower.named_modules():
            if name.endswith("self_attn.out_proj"):  # no mixing between patches in the vision tower
                mod.weight.zero_()
                mod.bias.zero_()
    vlm = VLM(model, proc)
    img = Image.fromarray((np.random.RandomState(3).rand(16, 16, 3) * 255).astype("uint8"))
    with vlm.capture() as rec:
        vlm.forward([img], [Q])
    positions = rec.maps.layout.positions
    k = 6
    return vlm, img, k, int(positions[k])


def test_every_saliency_method_peaks_on_the_token_the_answer_reads(constructed):
    vlm, img, k, column = constructed
    with vlm.intervene(OnlyToken(column)):
        rep = Explainer(vlm, ig_steps=8, curve_steps=4, random_orders=1).explain(img, Q)
    for name, sal in rep.saliency.items():
        assert np.argmax(np.abs(sal)) == k, name
        others = np.delete(np.abs(sal), k)
        assert others.max() < 1e-4 * max(np.abs(sal[k]), 1e-12) + 1e-7, name
    # attention of the last row onto image tokens sits entirely on token k
    assert np.argmax(rep.attention["all_mean"]) == k
    assert rep.agreement["all_mean"]["occlusion"]["topk"] == 1.0


def test_report_structure_and_files(constructed, tmp_path):
    vlm, img, _, _ = constructed
    rep = Explainer(vlm, ig_steps=4, curve_steps=4, random_orders=2).explain(img, "is there a red circle ?")
    n = 16
    assert all(v.shape == (n,) for v in rep.saliency.values())
    assert {"all_mean", "rollout", "layer0", "layer1.head3"} <= set(rep.attention)
    for mode in ("deletion", "insertion"):
        assert set(rep.curves[mode]) == {"attention", "random", *rep.saliency}
        assert all(0 <= p <= 1 for c in rep.curves[mode].values() for p in c)
    # deletion of nothing == insertion of everything: the unmodified image
    assert np.isclose(rep.curves["deletion"]["random"][0], rep.curves["insertion"]["random"][-1], atol=1e-6)
    out = rep.save(tmp_path / "x", image=img)
    for f in ("report.json", "image.png", "attention.png", "occlusion.png", "agreement_by_layer.png"):
        assert (out / f).is_file(), f


def test_agreement_metrics():
    a = np.array([0.1, 0.5, 0.2, 0.9])
    assert pearson(a, 3 * a + 1) == pytest.approx(1.0)
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert topk_overlap(a, a, 0.5) == 1.0
    assert topk_overlap(a, -a, 0.5) == 0.0
