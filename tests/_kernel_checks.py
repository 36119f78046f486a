"""Triton-kernel checks run in a child process under ``TRITON_INTERPRET=1`` (an out-of-bounds load in the interpreter
kills the process; in a child that fails one test instead of pytest). Also holds the explicit eager reference that
tests/test_kernels.py uses in-process.

    TRITON_INTERPRET=1 VLMKIT_KERNEL=triton python tests/_kernel_checks.py GROUP    # exit 0 = all checks passed
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

NEG = float("-inf")
OUT_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
LSE_TOL = 1e-5
PROB_TOL = 1e-4


# ------------------------------------------------------------------------------------------- shared helpers
def make(b, h, hkv, lq, lk, d, dtype=torch.float32, dv=None, seed=0, spread=1.0):
    """Random ``q [b, h, lq, d]``, ``k [b, hkv, lk, d]``, ``v [b, hkv, lk, dv]`` (non-contiguous q, as in HF)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, lq, h, d, generator=g) * spread).to(dtype).transpose(1, 2)
    k = (torch.randn(b, hkv, lk, d, generator=g) * spread).to(dtype)
    v = torch.randn(b, hkv, lk, dv or d, generator=g).to(dtype)
    return q, k, v


def eager(q, k, v, *, mask=None, causal, scaling, edit=None, post=None):
    """Explicit fp32 attention with the full probability matrix: ``(out, lse, probs [B, H, Lq, Lk])``.

    ``edit(s)`` rewrites the fp32 logits before masking; ``post`` (broadcastable to ``[B, H, Lq, Lk]``) multiplies P in
    ``P @ V`` only. Bottom-right causal alignment; rows that see nothing give 0 / -inf / 0.
    """
    rep = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    s = (q.float() @ kf.transpose(-1, -2)) * scaling
    if edit is not None:
        s = edit(s)
    lq, lk = q.shape[2], k.shape[2]
    if causal:
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq), NEG)
    if mask is not None:
        s = s.masked_fill(~mask, NEG) if mask.dtype == torch.bool else s + mask.float()
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    pv = p if post is None else p * post
    return pv @ vf, lse, p


def close(name, got, want, tol):
    """Assert ``|got - want| <= tol`` with matching infinities."""
    got, want = got.float(), want.float()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    gi, wi = torch.isinf(got), torch.isinf(want)
    assert torch.equal(gi, wi) and torch.equal(got[gi], want[wi]), f"{name}: infinities differ"
    assert not torch.isnan(got).any(), f"{name}: NaN"
    err = (got[~gi] - want[~wi]).abs().max().item() if (~gi).any() else 0.0
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.1g}"
    return err


def left_pad_mask(b, lq, lk, pads):
    """Bool ``[b, 1, lq, lk]``: causal (bottom-right) and each sample's first ``pads[i]`` keys and rows masked."""
    m = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)[None, None].repeat(b, 1, 1, 1)
    for i, p in enumerate(pads):
        m[i, :, :, :p] = False
        m[i, :, : max(0, p - (lk - lq)), :] = False
    return m


# ------------------------------------------------------------------------------------------- triton checks
CHECKS: dict[str, list] = {}


def check(group):
    def deco(fn):
        CHECKS.setdefault(group, []).append(fn)
        return fn
    return deco


def _both(q, k, v, *, blocks=None, splits=None, **kw):
    """Triton pass 1 (directly, optional block / split-K override) and the fp32 torch reference on upcast inputs."""
    from vlmkit.kernels import torch_ref, triton_attn
    from vlmkit.kernels._dispatch import _check_mask
    from vlmkit.kernels.torch_ref import resolve_modulations

    mods, segs = kw.pop("modulations", ()), tuple(kw.pop("segments", ()))
    mask = _check_mask(kw.pop("mask", None), q, k)
    table = resolve_modulations(mods, (*q.shape[:3], k.shape[2]), q.device)
    got = triton_attn.forward(q, k, v, mask=mask, table=table, segments=segs, blocks=blocks, splits=splits, **kw)
    ref = torch_ref.attention(q.float(), k.float(), v.float(), mask=mask, table=table, segments=segs, fast=False,
                              **kw)
    return got, ref


def _cmp_fwd(name, q, k, v, **kw):
    (o, l, m), (ro, rl, rm) = _both(q, k, v, **kw)
    close(f"{name} out", o, ro, OUT_TOL[q.dtype])
    close(f"{name} lse", l, rl, LSE_TOL)
    if m is not None:
        close(f"{name} mass", m, rm, PROB_TOL)
    return o, l


@check("dtypes")
def dtypes_causal_gqa():
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = make(1, 4, 2, 100, 100, 32, dt)
        for blocks in ((32, 32), None):
            _cmp_fwd(f"{dt} causal", q, k, v, causal=True, scaling=32 ** -0.5, blocks=blocks)


@check("dtypes")
def dtypes_noncausal_peaky():
    for dt in (torch.float16, torch.bfloat16):
        q, k, v = make(2, 2, 1, 70, 70, 16, dt, spread=2.5)
        _cmp_fwd(f"{dt} noncausal", q, k, v, causal=False, scaling=0.25, blocks=(16, 32))


@check("shapes")
def shapes_ragged_and_decode():
    q, k, v = make(1, 4, 4, 40, 100, 32, torch.float16)
    _cmp_fwd("chunked prefill Lq<Lk", q, k, v, causal=True, scaling=0.2, blocks=(16, 32))
    q, k, v = make(2, 8, 2, 1, 77, 32, torch.float16)
    o, _ = _cmp_fwd("decode GQA", q, k, v, causal=True, scaling=0.2)
    assert o.transpose(1, 2).is_contiguous(), "out should be a view of [B, Lq, H, D] memory"
    q, k, v = make(1, 2, 1, 33, 33, 40, torch.float16, dv=24)
    _cmp_fwd("head dim 40, dv 24", q, k, v, causal=True, scaling=40 ** -0.5, blocks=(16, 16))
    q, k, v = make(1, 2, 2, 1, 1, 16)
    _cmp_fwd("single key", q, k, v, causal=True, scaling=1.0)


@check("shapes")
def shapes_rows_without_keys():
    q, k, v = make(1, 2, 1, 50, 20, 16)
    (o, l, _), _ = _both(q, k, v, causal=True, scaling=0.25, blocks=(16, 16))
    _cmp_fwd("Lk<Lq", q, k, v, causal=True, scaling=0.25, blocks=(16, 16))
    assert torch.isinf(l[:, :, :30]).all() and (o[:, :, :30] == 0).all(), "rows that see no key must be 0 / -inf"


@check("shapes")
def shapes_empty():
    from vlmkit.kernels import attention, row_probs

    q, k, v = make(1, 2, 1, 5, 0, 16)
    out, lse, mass = attention(q, k, v, causal=False, segments=[(0, 3)])
    assert (out == 0).all() and torch.isinf(lse).all() and (mass == 0).all(), "no keys: 0 / -inf / 0"
    q, k, v = make(1, 2, 1, 0, 5, 16)
    out, lse = attention(q, k, v, causal=True)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
    p = row_probs(q, k, lse, torch.zeros(0, dtype=torch.long), torch.arange(5), causal=True, row_weights=torch.ones(0))
    assert p.shape == (1, 2, 5) and (p == 0).all()


@check("shapes")
def shapes_split_k():
    q, k, v = make(2, 8, 2, 1, 100, 32, torch.float16)
    for sp in (2, 7):
        _cmp_fwd(f"decode split-K {sp}", q, k, v, causal=True, scaling=0.2, splits=sp, blocks=(16, 16),
                 segments=[(0, 10), (10, 90)], modulations=_mods(100))
    m = left_pad_mask(2, 1, 100, [0, 40])
    m[1, ..., :70] = False  # the first splits of sample 1 see no key
    _cmp_fwd("decode split-K + mask", q, k, v, mask=m, causal=True, scaling=0.2, splits=4, blocks=(16, 16))
    q, k, v = make(1, 2, 1, 45, 64, 16, torch.float16)
    _cmp_fwd("prefill split-K", q, k, v, causal=True, scaling=0.25, splits=3, blocks=(16, 16))


@check("masks")
def masks_padding_and_additive():
    q, k, v = make(3, 4, 2, 48, 48, 16, torch.float16)
    m = left_pad_mask(3, 48, 48, [0, 5, 20])
    o, l = _cmp_fwd("bool padding mask", q, k, v, mask=m, causal=False, scaling=0.25, blocks=(16, 16))
    assert (o[2, :, :20] == 0).all() and torch.isinf(l[2, :, :20]).all(), "fully masked rows must be 0 / -inf"
    add = torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)
    _cmp_fwd("additive finfo.min mask", q, k, v, mask=add, causal=False, scaling=0.25)
    add16 = torch.zeros(m.shape, dtype=torch.float16).masked_fill(~m, NEG)
    _cmp_fwd("additive -inf fp16 mask + causal", q, k, v, mask=add16, causal=True, scaling=0.25)
    heads = torch.rand(3, 4, 48, 48, generator=torch.Generator().manual_seed(1)) > 0.3
    _cmp_fwd("per-head bool mask", q, k, v, mask=heads, causal=True, scaling=0.25, blocks=(32, 16))
    keypad = torch.ones(3, 1, 1, 48, dtype=torch.bool)
    keypad[1, ..., :7] = False
    _cmp_fwd("key padding [B,1,1,Lk]", q, k, v, mask=keypad, causal=True, scaling=0.25)
    _cmp_fwd("2-D mask", q, k, v, mask=heads[0, 0], causal=False, scaling=0.25)


def _mods(lk):
    from vlmkit.kernels import Modulation

    cols = torch.zeros(lk, dtype=torch.bool)
    cols[3:9] = True
    cols[30:31] = True
    return [Modulation(heads=[1, 3], key_start=5, key_end=40, scale=[1.5, 0.5], bias=0.3, alpha=0.2),
            Modulation(columns=cols, weight=2.5, renormalize=True, row_start=20),
            Modulation(heads=[0], key_start=10, key_end=60, weight=0.25, renormalize=False),
            Modulation(heads=[2], key_start=0, key_end=4, weight=0.0)]


def dense_mods(b, h, lq, lk, seed=0):
    """Modulations with tensor values: per-token alpha [B,1,1,Lk], per-(batch, head) post weight [B,H,1,1],
    per-row bias [1,1,Lq,1], mixed with a compact one."""
    from vlmkit.kernels import Modulation

    g = torch.Generator().manual_seed(seed)
    alpha = torch.rand(b, 1, 1, lk, generator=g) * 0.5
    post = 0.5 + torch.rand(b, h, 1, 1, generator=g)
    bias = torch.randn(1, 1, lq, 1, generator=g) * 0.3
    return [Modulation(key_start=2, key_end=lk - 3, alpha=alpha),
            Modulation(heads=[0, h - 1], key_start=1, weight=post, renormalize=False),
            Modulation(heads=[1], bias=bias, scale=1.3)]


@check("modulations")
def modulations_match_torch():
    q, k, v = make(2, 4, 2, 64, 64, 16, torch.float16)
    mods = _mods(64)
    _cmp_fwd("all modulation kinds", q, k, v, modulations=mods, causal=True, scaling=0.25, blocks=(16, 32))
    _cmp_fwd("modulations + decode", q[:, :, -1:], k, v, modulations=mods, causal=True, scaling=0.25)
    _cmp_fwd("tensor-valued modulations", q, k, v, modulations=dense_mods(2, 4, 64, 64), causal=True, scaling=0.25,
             blocks=(16, 32), segments=[(0, 20)])
    _cmp_fwd("tensor-valued + decode split-K", q[:, :, -1:], k, v, modulations=dense_mods(2, 4, 1, 64),
             causal=True, scaling=0.25, splits=3, blocks=(16, 16))


@check("modulations")
def modulations_identity_and_equivalence():
    from vlmkit.kernels import Modulation, attention

    q, k, v = make(1, 4, 4, 40, 40, 16, torch.float16)
    base = attention(q, k, v, causal=True, scaling=0.25)
    ident = attention(q, k, v, causal=True, scaling=0.25,
                      modulations=[Modulation(key_start=3, key_end=30, scale=1.0, bias=0.0, alpha=0.0, weight=1.0),
                                   Modulation(heads=[1], weight=1.0, renormalize=False)])
    assert torch.equal(base[0], ident[0]) and torch.equal(base[1], ident[1]), "identity modulation must be bitwise none"
    w = attention(q, k, v, causal=True, scaling=0.25, modulations=[Modulation(key_start=5, key_end=20, weight=3.0)])
    bias = attention(q, k, v, causal=True, scaling=0.25,
                     modulations=[Modulation(key_start=5, key_end=20, bias=float(torch.tensor(3.0).log()))])
    close("renorm weight == log-w bias (out)", w[0], bias[0], 1e-3)
    close("renorm weight == log-w bias (lse)", w[1], bias[1], LSE_TOL)


@check("pass2")
def pass2_maps_and_reductions():
    from vlmkit.kernels import attention, row_probs, torch_ref
    from vlmkit.kernels._dispatch import _check_mask
    from vlmkit.kernels.torch_ref import resolve_modulations

    q, k, v = make(2, 4, 2, 64, 64, 16, torch.float16)
    m = left_pad_mask(2, 64, 64, [0, 9])
    mods = _mods(64)
    kw = dict(mask=m, causal=True, scaling=0.25, modulations=mods)
    _, lse = attention(q, k, v, **kw)
    rows = torch.tensor([[0, 5, 20, 63, -1], [3, 10, 40, 63, 62]])
    cols = torch.tensor([1, 4, 5, 8, 30, 31, 50, 63, -1])
    got = row_probs(q, k, lse, rows, cols, **kw)
    tab = resolve_modulations(mods, (2, 4, 64, 64), "cpu")
    mm = _check_mask(m, q, k)
    ref = torch_ref.row_probs(q.float(), k.float(), lse, rows, cols[None].expand(2, -1), mask=mm, causal=True,
                              scaling=0.25, table=tab)
    close("row map", got, ref, PROB_TOL)
    assert (got[..., -1] == 0).all() and (got[0, :, -1] == 0).all(), "padding slots must be 0"
    assert (got[1, :, 0, :3] == 0).all(), "masked (padded) columns must be exactly 0"
    wts = torch.tensor([0.5, 1.0, 2.0, 0.25, 7.0])
    red = row_probs(q, k, lse, rows, cols, row_weights=wts, **kw)
    close("weighted row sum", red, (got * wts[None, None, :, None]).sum(2), PROB_TOL)
    again = row_probs(q, k, lse, rows, cols, row_weights=wts, **kw)
    assert torch.equal(red, again), "pass 2 must be bitwise reproducible"
    dm = dense_mods(2, 4, 64, 64, seed=1)
    _, lse_d = attention(q, k, v, mask=m, causal=True, scaling=0.25, modulations=dm)
    got_d = row_probs(q, k, lse_d, rows, cols, mask=m, causal=True, scaling=0.25, modulations=dm, weighted=True)
    ref_d = torch_ref.row_probs(q.float(), k.float(), lse_d, rows, cols[None].expand(2, -1), mask=mm, causal=True,
                                scaling=0.25, table=resolve_modulations(dm, (2, 4, 64, 64), "cpu"), weighted=True)
    close("row map, tensor-valued modulations", got_d, ref_d, PROB_TOL)
    eff = row_probs(q, k, lse, rows, cols, weighted=True, **kw)
    ref_eff = torch_ref.row_probs(q.float(), k.float(), lse, rows, cols[None].expand(2, -1), mask=mm, causal=True,
                                  scaling=0.25, table=tab, weighted=True)
    close("weighted=True", eff, ref_eff, PROB_TOL)


@check("pass2")
def pass2_rows_sum_to_one_all_dtypes():
    from vlmkit.kernels import attention, row_probs

    for dt in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = make(1, 6, 2, 90, 90, 32, dt, spread=2.0)
        _, lse = attention(q, k, v, causal=True, scaling=32 ** -0.5)
        rows = torch.arange(0, 90, 7)
        p = row_probs(q, k, lse, rows, torch.arange(90), causal=True, scaling=32 ** -0.5)
        _, _, ref = eager(q, k, v, causal=True, scaling=32 ** -0.5)
        close(f"{dt} probs vs eager", p, ref[:, :, rows], PROB_TOL)
        close(f"{dt} row sums", p.sum(-1), torch.ones(p.shape[:-1]), 1e-5)
        upper = torch.arange(90)[None, :] > rows[:, None]
        assert (p[:, :, upper] == 0).all(), "causally masked columns must be exactly 0"
    q, k, v = make(1, 8, 2, 1, 50, 16, torch.float16)
    _, lse = attention(q, k, v, causal=True, scaling=0.25)
    p = row_probs(q, k, lse, torch.tensor([0]), torch.arange(50), causal=True, scaling=0.25)
    close("decode row sums", p.sum(-1), torch.ones(1, 8, 1), 1e-5)


@check("segments")
def segments_mass():
    q, k, v = make(2, 4, 2, 64, 64, 16, torch.float16)
    segs = [(0, 10), (10, 50), (50, 64), (5, 6)]
    _cmp_fwd("segment masses", q, k, v, causal=True, scaling=0.25, segments=segs, blocks=(16, 16))
    _cmp_fwd("segments + mask + mods", q, k, v, causal=False, scaling=0.25, segments=segs[:2],
             mask=left_pad_mask(2, 64, 64, [0, 3]), modulations=_mods(64))
    from vlmkit.kernels import attention

    _, _, mass = attention(q, k, v, causal=True, scaling=0.25, segments=[(0, 64)])
    close("mass on all keys", mass[..., 0], torch.ones(2, 4, 64), 1e-5)


@check("dispatch")
def dispatch_routes_and_falls_back():
    from vlmkit.kernels import attention, select_backend

    q, k, v = make(1, 2, 1, 20, 20, 16, torch.float16)
    assert select_backend(q, k, v).backend == "triton"
    out, lse = attention(q, k, v, causal=True, scaling=0.25)
    ro, rl, _ = eager(q, k, v, causal=True, scaling=0.25)
    close("public attention", out, ro, OUT_TOL[torch.float16])
    close("public lse", lse, rl, LSE_TOL)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    choice = select_backend(q64, k64, v64)
    assert choice.backend == "torch" and "float64" in choice.reason, choice
    out64, lse64 = attention(q64, k64, v64, causal=True, scaling=0.25)
    close("float64 fallback", out64, ro, 1e-5)
    segs = [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    from vlmkit.kernels._dispatch import _check_segments

    assert select_backend(q, k, v, segments=_check_segments(segs, 20)).backend == "torch", "5 segments: fallback"
    _, _, mass = attention(q, k, v, causal=True, scaling=0.25, segments=segs)
    _, _, p = eager(q, k, v, causal=True, scaling=0.25)
    close("5 segments via fallback", mass, torch.stack([p[..., a:b].sum(-1) for a, b in segs], -1), PROB_TOL)
    qg = q.float().requires_grad_()
    assert select_backend(qg, k.float(), v.float()).backend == "torch"
    og, _ = attention(qg, k.float(), v.float(), causal=True, scaling=0.25)
    og.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


@check("slow")
def slow_larger_shapes():
    for dt in (torch.float16, torch.bfloat16):
        q, k, v = make(1, 8, 2, 256, 256, 64, dt)
        _cmp_fwd(f"{dt} H8 N256 D64", q, k, v, causal=True, scaling=0.125)
    from vlmkit.kernels import attention, row_probs

    q, k, v = make(1, 8, 2, 256, 256, 64, torch.float16)
    _, lse = attention(q, k, v, causal=True, scaling=0.125)
    rows = torch.arange(100, 256)
    p = row_probs(q, k, lse, rows, torch.arange(10, 200), causal=True, scaling=0.125)
    _, _, ref = eager(q, k, v, causal=True, scaling=0.125)
    close("pass2 156x190", p, ref[:, :, 100:][..., 10:200], PROB_TOL)


@check("transformers")
def transformers_models_same_answers_and_maps():
    """The kernels as a transformers attention function on tiny LLaVA / Qwen2-VL (left-padded batch, prefill and
    decode): torch and triton paths give the same answers as SDPA and the same last-row maps."""
    import numpy as np
    from PIL import Image
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import tiny
    from vlmkit.kernels import attention, row_probs, select_backend

    rec = []

    def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out, lse = attention(query, key, value, mask=attention_mask, causal=causal, scaling=scaling)
        rows, cols = torch.tensor([query.shape[2] - 1]), torch.arange(key.shape[2])
        rec.append((select_backend(query, key, value).backend,
                    row_probs(query, key, lse, rows, cols, mask=attention_mask, causal=causal, scaling=scaling)))
        return out.transpose(1, 2), None

    AttentionInterface.register("vlmkit_kernel_check", attend)
    AttentionMaskInterface.register("vlmkit_kernel_check", sdpa_mask)
    imgs = [Image.fromarray((np.random.RandomState(s).rand(20, 28, 3) * 255).astype("uint8")) for s in (0, 1)]
    for family in ("llava", "qwen2_vl"):
        runs = {}
        for mode in ("sdpa", "torch", "triton"):
            os.environ["VLMKIT_KERNEL"] = "torch" if mode == "sdpa" else mode
            torch.manual_seed(0)
            model, proc = tiny.build(family)
            model.set_attn_implementation("sdpa" if mode == "sdpa" else "vlmkit_kernel_check")
            msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}]
                    for t in ("is there a red circle ?", "what color ?")]
            texts = [proc.apply_chat_template(m, add_generation_prompt=True) for m in msgs]
            proc.tokenizer.padding_side = "left"
            inputs = proc(images=imgs, text=texts, return_tensors="pt", padding=True)
            rec.clear()
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            runs[mode] = (out, list(rec))
        assert torch.equal(runs["sdpa"][0], runs["torch"][0]), f"{family}: torch path changed the answers"
        assert torch.equal(runs["torch"][0], runs["triton"][0]), f"{family}: triton path changed the answers"
        (_, a), (_, b) = runs["torch"], runs["triton"]
        assert len(a) == len(b) > 0 and {x for x, _ in a} == {"torch"} and {x for x, _ in b} == {"triton"}
        for (_, pa), (_, pb) in zip(a, b):
            close(f"{family} maps torch vs triton", pa, pb, 1e-5)


def main(argv) -> int:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VLMKIT_KERNEL", "triton")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    groups = argv[1:] or sorted(CHECKS)
    for group in groups:
        if group not in CHECKS:
            print(f"unknown group {group!r}; known: {sorted(CHECKS)}", file=sys.stderr)
            return 2
        for fn in CHECKS[group]:
            fn()
            print(f"ok {group}.{fn.__name__}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
