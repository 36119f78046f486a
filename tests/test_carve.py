"""CARVE: labeller, top-p and best-K masks, the contrast, the general-pass cache, result fields, final prompts."""

import functools
import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from vlmkit.attention.maps import AttentionMaps
from vlmkit.errors import InputError
from vlmkit.methods.carve import (Carve, best_regions, fuse_contrast, head_mean_rows, label_components,
                                  top_fraction_mask)
from vlmkit.models._layout import ImageLayout, Layout, View
from vlmkit.models.vlm import VLM

Q1, Q2 = "is there a red circle in the image ?", "what color is the square ?"
N = 4  # max_new_tokens: short answers keep the file fast


_img = tiny.random_image


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def vlm(request):
    model, processor = tiny.build(request.param)
    return VLM(model, processor)


class Counter:
    """Wraps ``vlm.generate`` and records the number of samples of every call."""

    def __init__(self, vlm, monkeypatch):
        self.calls = []
        real = vlm.generate

        def generate(images, questions=None, **kw):
            self.calls.append(list(questions))
            return real(images, questions, **kw)

        monkeypatch.setattr(vlm, "generate", generate)


# ---------------------------------------------------------------------------------------------- pure functions
def test_label_components_hand_made():
    diag = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], bool)
    assert label_components(diag, 8)[1] == 1
    labels, n = label_components(diag, 4)
    assert n == 3 and sorted(np.unique(labels)) == [0, 1, 2, 3]
    # A "U": the two arms are separate runs until the bottom row joins them.
    u = np.array([[1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    labels, n = label_components(u, 4)
    assert n == 1 and (labels[u] == 1).all() and (labels[~u] == 0).all()
    # A "W"-like shape whose merge happens only after a later run: three arms joined at the bottom.
    w = np.array([[1, 0, 1, 0, 1], [1, 0, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 0, 0, 1]], bool)
    labels, n = label_components(w, 4)
    assert n == 3
    assert labels[0, 0] == 1 and labels[4, 0] == 2 and labels[4, 4] == 3  # raster order of first pixels
    assert label_components(np.zeros((3, 4), bool))[1] == 0
    full, n = label_components(np.ones((2, 5), bool))
    assert n == 1 and (full == 1).all()
    with pytest.raises(InputError):
        label_components(diag, 6)


def test_label_components_matches_scipy_on_random_masks():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.RandomState(0)
    for trial in range(20):
        m = rng.rand(rng.randint(1, 30), rng.randint(1, 30)) < rng.uniform(0.2, 0.7)
        for conn, structure in ((4, None), (8, np.ones((3, 3)))):
            ours, n = label_components(m, conn)
            ref, n_ref = ndimage.label(m, structure=structure)
            assert n == n_ref
            # Same partition: a one-to-one map between label values.
            pairs = set(zip(ours[m].tolist(), ref[m].tolist()))
            assert len(pairs) == n and len({a for a, _ in pairs}) == n and len({b for _, b in pairs}) == n


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_mask_keeps_top_fraction_and_at_most_k_regions(p):
    rng = np.random.RandomState(1)
    score = rng.rand(37, 23)
    keep = top_fraction_mask(score, p)
    assert 0 < keep.sum() <= int(p * score.size)
    assert score[keep].min() > score[~keep].max()  # the kept pixels are the highest ones
    for k in (1, 2, 3):
        mask = best_regions(score, keep, k, connectivity=8)
        labels, n = label_components(mask, 8)
        assert 1 <= n <= k and not (mask & ~keep).any()
        # The kept components are the k with the largest summed score.
        all_labels, n_all = label_components(keep, 8)
        sums = sorted((score[all_labels == i].sum() for i in range(1, n_all + 1)), reverse=True)
        np.testing.assert_allclose(sorted((score[labels == i].sum() for i in range(1, n + 1)), reverse=True),
                                   sums[:n])
    # Blocky maps have ties: whole tied blocks are dropped rather than exceeding the fraction.
    blocky = np.kron(rng.rand(4, 4), np.ones((5, 5)))
    assert top_fraction_mask(blocky, 0.2).sum() <= 0.2 * blocky.size
    flat = np.ones((10, 10))
    assert top_fraction_mask(flat, 0.2).sum() == 20  # one big tie: still exactly the budget


def _maps(rows: torch.Tensor, layout: Layout) -> AttentionMaps:
    """AttentionMaps from head-mean rows ``[steps, layers, C]`` (two identical heads)."""
    heads = rows[:, :, None].repeat(1, 1, 2, 1)  # [S, L, H, C]
    return AttentionMaps(prefill=heads[0][:, :, None], decode=heads[1:], layers=list(range(rows.shape[1])),
                         rows=[20], layout=layout)


def _grid_layout(side=4, px=4):
    boxes = [(c * px, r * px, (c + 1) * px, (r + 1) * px) for r in range(side) for c in range(side)]
    view = View("image", np.arange(3, 3 + side * side), (side, side), np.array(boxes, float))
    return Layout([ImageLayout((side * px, side * px), [view])])


def test_contrast_picks_the_region_the_question_adds():
    layout = _grid_layout()
    sink, target = 5, 10  # token 5 takes half the attention under both prompts; the question adds token 10
    g = torch.full((16,), 0.5 / 15)
    g[sink] = 0.5
    q = torch.full((16,), 0.3 / 14)
    q[sink], q[target] = 0.5, 0.2
    a_g = head_mean_rows(_maps(g.repeat(1, 2, 1), layout))  # 1 step, 2 layers
    a_q = head_mean_rows(_maps(q.repeat(1, 2, 1), layout))
    assert a_q.shape == (1, 2, 16)
    fused = fuse_contrast(a_q, a_g, lam=0.05)
    assert int(fused.argmax()) == target and int(q.argmax()) == sink
    ratio = q / (g + 0.05 * g.mean())
    torch.testing.assert_close(fused, 2 * ratio / ratio.sum())  # each layer normalised, summed over 2 layers
    raw = fuse_contrast(a_q, a_g, lam=1e-8, lam_relative=False, normalize=False)
    torch.testing.assert_close(raw, 2 * q / (g + 1e-8))  # summed over the 2 layers
    fused_map, mask = Carve(keep_fraction=1 / 16, max_regions=1).localize(a_q, a_g, layout)
    r, c = divmod(target, 4)
    expect = np.zeros((16, 16), bool)
    expect[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] = True
    np.testing.assert_array_equal(mask, expect)
    assert fused_map.shape == (16, 16) and fused_map[expect].min() > fused_map[~expect].max()


def test_step_modes_weight_the_right_steps():
    layout = _grid_layout()
    g = torch.full((3, 1, 16), 1 / 16)
    q = torch.full((3, 1, 16), 0.5 / 15)
    for t, tok in enumerate([1, 7, 12]):  # each step of the question pass looks at another token
        q[t, 0, tok] = 0.5
    a_q, a_g = head_mean_rows(_maps(q, layout)), head_mean_rows(_maps(g[:2], layout))  # general has 2 steps
    assert int(fuse_contrast(a_q, a_g, step_mode="first").argmax()) == 1
    assert int(fuse_contrast(a_q, a_g, step_mode="last").argmax()) == 7  # last step both passes have
    w = fuse_contrast(a_q, a_g, step_mode="weighted")
    assert w[7] > w[1] > w[12]  # w_t = t + 1 over the 2 shared steps; step 3 unused
    with pytest.raises(InputError):
        Carve(step_mode="middle")


# ---------------------------------------------------------------------------------------------- on tiny models
def test_cache_hit_on_second_question_same_image(vlm, monkeypatch):
    carver = Carve(cache_size=1, max_new_tokens=N)
    count = Counter(vlm, monkeypatch)
    img, other = _img(40, 28), _img(30, 36, 1)
    first = carver(img, Q1, vlm=vlm)
    assert not first.general_cached
    assert len(count.calls[0]) == 2 and carver.general_instruction in count.calls[0][1]  # Q + G in one batch
    n = len(count.calls)
    second = carver(img.copy(), Q2, vlm=vlm)  # same pixels, new object: still a hit
    assert second.general_cached and carver.cache_info()["hits"] == 1
    assert all(carver.general_instruction not in t for call in count.calls[n:] for t in call)
    # Cached and fresh runs give the same map (the general rows do not depend on the batch they ran in).
    fresh = Carve(max_new_tokens=N)(img, Q2, vlm=vlm)
    np.testing.assert_allclose(second.fused_map, fresh.fused_map, rtol=1e-4, atol=1e-6)
    assert second.answer == fresh.answer and second.box == fresh.box
    carver(other, Q1, vlm=vlm)  # cache_size=1: the first image is evicted
    assert carver.cache_info()["size"] == 1
    again = carver(img, Q1, vlm=vlm)
    assert not again.general_cached and carver.cache_info()["misses"] == 3
    np.testing.assert_allclose(again.fused_map, first.fused_map, rtol=1e-4, atol=1e-6)


def test_result_fields_consistent(vlm):
    img = _img(48, 30, 3)
    res = Carve(keep_fraction=0.25, max_regions=2, max_new_tokens=N, enlarge=True)(img, Q1, vlm=vlm)
    H, W = 30, 48
    x0, y0, x1, y1 = res.box
    assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
    assert res.mask.shape == (H, W) and res.mask.dtype == bool and res.mask.any()
    assert res.mask.sum() <= 0.25 * H * W
    assert not res.mask[:y0].any() and not res.mask[y1:].any()
    assert not res.mask[:, :x0].any() and not res.mask[:, x1:].any()
    assert label_components(res.mask, 8)[1] <= 2
    assert res.fused_map.shape == (H, W) and res.fused_map.dtype == np.float32
    kth = np.sort(res.fused_map.ravel())[::-1][int(0.25 * H * W) - 1]
    assert res.fused_map[res.mask].min() >= kth  # only top-p pixels are kept
    assert res.refined_image.width >= W - 1 and res.refined_image.height >= H - 1  # enlarged to cover
    assert res.layers == [vlm.adapter.num_layers - 1] and res.steps == 1
    assert res.original_answer == vlm.ask(img, Q1, max_new_tokens=N)
    assert res.answer == vlm.ask(res.refined_image, Q1, max_new_tokens=N)
    assert {"capture", "map", "final", "total"} <= set(res.timings)
    small = Carve(keep_fraction=0.25, max_regions=2, enlarge=False, max_new_tokens=N)(img, Q1, vlm=vlm)
    assert small.refined_image.size == (small.box[2] - small.box[0], small.box[3] - small.box[1])
    auto = Carve(keep_fraction=0.25, max_regions=2, max_new_tokens=N)(img, Q1, vlm=vlm)  # fixed-size LLaVA: no
    assert (auto.refined_image.size == small.refined_image.size) == (vlm.family == "llava")  # enlargement needed
    crop = np.asarray(small.refined_image)
    outside = ~small.mask[small.box[1]:small.box[3], small.box[0]:small.box[2]]
    assert (crop[outside] == 0).all()


def test_final_prompt_shapes(vlm, monkeypatch):
    one = Carve()
    two = Carve(final_input="original_plus_refined", step_mode="weighted", general_max_new_tokens=3,
                max_new_tokens=N)
    placeholder = vlm.adapter.image_token
    assert one.final_prompt(vlm, Q1).count(placeholder) == 1
    assert two.final_prompt(vlm, Q1).count(placeholder) == 2
    assert Q1 in one.final_prompt(vlm, Q1) and Q1 in two.final_prompt(vlm, Q1)
    count = Counter(vlm, monkeypatch)
    img = _img(36, 36, 4)
    res = two(img, Q1, vlm=vlm)
    assert res.final_prompt.count(placeholder) == 2 and isinstance(res.answer, str)
    assert len(count.calls) == 1  # the captured question pass; the two-image answer is its own call
    assert res.original_answer == vlm.ask(img, Q1, max_new_tokens=N)  # the captured pass is the original answer
    assert res.steps <= 3


def test_unbatched_final_reuses_question_pass(vlm, monkeypatch, tmp_path):
    carver = Carve(final_batch=False, max_new_tokens=N)
    img = _img(30, 42, 6)
    carver(img, Q2, vlm=vlm)
    count = Counter(vlm, monkeypatch)
    res = carver(img, Q1, vlm=vlm)  # cached: the captured question pass, then the refined answer
    assert count.calls == [[Q1], [Q1]]
    assert res.original_answer == vlm.ask(img, Q1, max_new_tokens=N)
    assert res.answer == vlm.ask(res.refined_image, Q1, max_new_tokens=N)
    paths = res.save(tmp_path / "heat.png", img)
    assert [p.name for p in paths] == ["heat.png", "heat.refined.png", "heat.contrast.png"]
    assert Image.open(paths[0]).size == img.size and Image.open(paths[1]).size == res.refined_image.size


def _long_prompt(vlm, img, n):
    """A prompt the random model answers with ``n`` tokens and no EOS (so stops are ours, not the model's)."""
    eos = set(vlm.model.generation_config.eos_token_id)
    for text in ["describe the image .", "what is in the image ?", Q1, Q2, "where is the blue square ?", "how many ?"]:
        ids = vlm.generate([img], [text], max_new_tokens=n)[0].token_ids
        if len(ids) == n and not eos & set(ids):
            return text
    pytest.skip("the tiny model ends every candidate prompt early")


@pytest.fixture(scope="module")
def llava():
    return VLM(*tiny.build("llava"))


def test_general_rows_in_batch_equal_solo_and_short_entries_are_extended(llava, monkeypatch):
    # Family-independent logic; the tiny random Qwen ends every answer at once, so this runs on LLaVA only.
    vlm, img = llava, _img(32, 40, 5)
    general, question = _long_prompt(vlm, img, 3), _long_prompt(vlm, img, N)
    carver = Carve(step_mode="weighted", general_max_new_tokens=3, max_new_tokens=1, general_instruction=general)
    res = carver(img, question, vlm=vlm)  # a 1-token answer: the general row stops one step after it
    entry = next(iter(carver._cache.values()))
    assert entry.rows.shape[0] == 2 and not entry.complete and res.steps == 1
    with vlm.capture(layers=res.layers, rows="last") as rec:
        vlm.generate([img], [general], max_new_tokens=3)
    solo = head_mean_rows(rec.maps)
    torch.testing.assert_close(entry.rows, solo[:2], atol=1e-5, rtol=0)  # same rows as a solo run
    carver.max_new_tokens = N  # a longer answer needs 3 general rows: one solo general pass extends the entry
    count = Counter(vlm, monkeypatch)
    res = carver(img, question, vlm=vlm)
    assert count.calls == [[question], [general], [question]]  # Q, G alone, refined answer
    assert not res.general_cached and res.steps == 3
    entry = next(iter(carver._cache.values()))
    torch.testing.assert_close(entry.rows, solo, atol=1e-5, rtol=0)
    assert carver(img, Q1, vlm=vlm).general_cached
    assert res.original_answer == vlm.ask(img, question, max_new_tokens=N)


def test_bad_inputs(vlm):
    with pytest.raises(InputError):
        Carve(final_input="both")
    with pytest.raises(InputError):
        Carve(keep_fraction=0)
    with pytest.raises(InputError):
        Carve()(_img(20, 20), "  ", vlm=vlm)


def test_reuse_image_features_encodes_each_image_once_and_restores(vlm):
    """The adapter's feature reuse: same logits, the encoder runs once per distinct image, the model is restored."""
    base = vlm.model.base_model
    calls = []
    real = base.get_image_features

    @functools.wraps(real)
    def counting(*a, **kw):
        calls.append(kw["pixel_values"].shape if "pixel_values" in kw else a[0].shape)
        return real(*a, **kw)

    base.get_image_features = counting
    try:
        img, other = _img(40, 32, 0), _img(40, 32, 1)
        want = vlm.forward([img, img], [Q1, Q2])
        want_other = vlm.forward([other], [Q1])
        calls.clear()
        store = {}
        with vlm.adapter.reuse_image_features(store):
            got = vlm.forward([img, img], [Q1, Q2])        # one image repeated: encoded once (LLaVA's [B,C,H,W])
            again = vlm.forward([img], [Q2])               # same pixels: not encoded again
            third = vlm.forward([other], [Q1])             # new pixels: encoded
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(again[0, -1], want[1, -1], atol=1e-5)
        assert torch.allclose(third, want_other, atol=1e-5)
        if vlm.family == "llava":
            assert [s[0] for s in calls] == [1, 1] and "pooler" in store
            calls.clear()
            with vlm.adapter.reuse_image_features(store):      # kept pixels + a new image: only the new one runs
                mixed = vlm.forward([img, other], [Q1, Q1])
            assert [s[0] for s in calls] == [1]
            assert torch.allclose(mixed[0, -1], want[0, -1], atol=1e-5)
            assert torch.allclose(mixed[1, -1], want_other[0, -1], atol=1e-5)
        assert base.get_image_features is counting          # the earlier override is back
    finally:
        del base.get_image_features
    assert "get_image_features" not in vars(base)


def test_cached_carve_call_skips_the_vision_encoder(vlm):
    carver = Carve(max_new_tokens=N)
    img = _img(48, 40, 3)
    first = carver(img, Q1, vlm=vlm)
    base = vlm.model.base_model
    calls = []
    real = base.get_image_features
    base.get_image_features = functools.wraps(real)(lambda *a, **kw: calls.append(1) or real(*a, **kw))
    try:
        second = carver(img, Q1, vlm=vlm)
    finally:
        del base.get_image_features
    assert second.general_cached and second.answer == first.answer
    assert second.original_answer == first.original_answer
    if vlm.family == "llava":  # original image: reused in both passes; only the refined image is encoded
        assert len(calls) == 1


def test_batched_final_answers_original_and_refined_together(vlm, monkeypatch):
    carver = Carve(final_batch=True, max_new_tokens=N)
    img = _img(30, 42, 7)
    carver(img, Q2, vlm=vlm)
    count = Counter(vlm, monkeypatch)
    res = carver(img, Q1, vlm=vlm)  # cached: a one-token question pass, then [original, refined] in one batch
    assert count.calls == [[Q1], [Q1, Q1]]
    assert res.original_answer == vlm.ask(img, Q1, max_new_tokens=N)
    assert res.answer == vlm.ask(res.refined_image, Q1, max_new_tokens=N)


def test_reuse_processed_image_runs_the_image_processor_once(vlm):
    img, other = _img(40, 32, 8), _img(40, 32, 9)
    proc = vlm.processor
    real = proc.image_processor
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, images, *a, **kw):
            calls.append(len(images) if isinstance(images, (list, tuple)) else 1)
            return real(images, *a, **kw)

    want = vlm.forward([img], [Q1])
    proc.image_processor = Counting()
    try:
        store = {}
        with vlm.adapter.reuse_processed_image(img, store):
            first = vlm.forward([img], [Q1])
            second = vlm.forward([img.copy()], [Q2])    # same pixels: the kept output is reused
            vlm.forward([other], [Q1])                  # another image: processed as usual
            vlm.forward([img, img], [Q1, Q2])           # several images: processed as usual
        assert calls == [1, 1, 2] and "processed" in store
        assert isinstance(proc.image_processor, Counting)   # restored
    finally:
        proc.image_processor = real
    assert torch.allclose(first, want, atol=1e-6) and second.shape[0] == 1
