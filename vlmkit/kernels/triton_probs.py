"""Pass 2: exact probabilities of chosen rows onto chosen key columns from pass 1's LSE, in Triton.

Column-owned grid: program ``(c, b * Hkv + kv_head)`` loads one tile of gathered key columns once, then loops over
the ``G`` query heads sharing that KV head and over tiles of the requested rows, recomputing
``P = exp(scaling * Q_R K_C^T (+ modulation, mask) - LSE_R)`` in fp32. It stores the ``[R, C]`` map, or reduces over
rows with the row weights in registers in a fixed order and stores ``[C]`` per head: no atomics, so the result is
bitwise reproducible. Semantics are those of :func:`vlmkit.kernels.torch_ref.row_probs`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmkit.kernels._dispatch import interpreting
from vlmkit.kernels.triton_attn import _modulate, _pow2, mask_args, mod_args


@triton.jit
def _probs_kernel(Q, K, Lse, Rows, Cols, W, Out, Mask, ModRng, ModPar, ModCol, ModMeta,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, smb, smh, smm, smn,
                  srb, scb, swb, sob, soh, sor, soc,
                  H, G, Lq, Lk, R, C, D, scaling,
                  CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                  NMOD: tl.constexpr, HAS_POST: tl.constexpr, USE_COLMASK: tl.constexpr, DENSE: tl.constexpr,
                  REDUCE: tl.constexpr, WEIGHTED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    hkv = H // G
    b = (pid_bh // hkv).to(tl.int64)
    hk = pid_bh % hkv
    offs_d = tl.arange(0, BLOCK_D)
    cidx = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cin = cidx < C
    cols = tl.load(Cols + b * scb + cidx, mask=cin, other=-1)
    c_ok = cin & (cols >= 0)
    cols = tl.where(c_ok, cols, 0)
    kt = tl.load(K + b * skb + hk.to(tl.int64) * skh + cols[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                 mask=c_ok[None, :] & (offs_d[:, None] < D), other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    off = Lk - Lq
    for g in range(0, G):
        h = hk * G + g
        acc = tl.zeros([BLOCK_C], tl.float32)
        for r0 in range(0, R, BLOCK_R):
            ridx = r0 + tl.arange(0, BLOCK_R)
            rin = ridx < R
            rows = tl.load(Rows + b * srb + ridx, mask=rin, other=-1)
            r_ok = rin & (rows >= 0)
            rows = tl.where(r_ok, rows, 0)
            q = tl.load(Q + b * sqb + h.to(tl.int64) * sqh + rows[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd,
                        mask=r_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            s = tl.dot(q, kt, input_precision=PREC) * scaling
            pos = rows + off
            pw = tl.full([BLOCK_R, BLOCK_C], 1.0, tl.float32)
            if NMOD > 0:
                hrow = tl.zeros([BLOCK_R], tl.int32) + h
                s, pw = _modulate(s, pw, cols, pos, rows, hrow, b, ModRng, ModPar, ModCol, ModMeta, H, Lk,
                                  NMOD, HAS_POST, USE_COLMASK, DENSE)
            valid = r_ok[:, None] & c_ok[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= pos[:, None])
            if HAS_MASK:
                mv = tl.load(Mask + b * smb + h.to(tl.int64) * smh + rows[:, None].to(tl.int64) * smm
                             + cols[None, :].to(tl.int64) * smn, mask=r_ok[:, None] & c_ok[None, :], other=0)
                if MASK_BOOL:
                    valid = valid & (mv != 0)
                else:
                    s = s + mv.to(tl.float32)
            lse = tl.load(Lse + (b * H + h) * Lq + rows, mask=r_ok, other=float("-inf"))
            valid = valid & (lse[:, None] > float("-inf"))
            lse = tl.where(lse > float("-inf"), lse, 0.0)
            p = tl.where(valid, tl.exp(tl.where(valid, s, 0.0) - lse[:, None]), 0.0)
            if WEIGHTED:
                p = p * pw
            if REDUCE:
                w = tl.load(W + b * swb + ridx, mask=r_ok, other=0.0)
                acc += tl.sum(p * w[:, None], axis=0)
            else:
                o_ptrs = Out + b * sob + h.to(tl.int64) * soh + ridx[:, None].to(tl.int64) * sor + cidx[None, :] * soc
                tl.store(o_ptrs, p, mask=rin[:, None] & cin[None, :])
        if REDUCE:
            tl.store(Out + b * sob + h.to(tl.int64) * soh + cidx * soc, acc, mask=cin)


def config(r: int, dtype: torch.dtype) -> dict:
    """Block sizes: ``BLOCK_R`` rows per step (16 for decode-like requests), ``BLOCK_C`` columns per program."""
    if interpreting():
        return {"BLOCK_R": 16 if r <= 16 else 64, "BLOCK_C": 64, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_R": 16 if r <= 16 else 32, "BLOCK_C": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_R": 16 if r <= 16 else 64, "BLOCK_C": 64, "num_warps": 4, "num_stages": 2}


def row_probs(q, k, lse, rows, cols, *, mask, causal: bool, scaling: float, table, row_weights=None,
              weighted: bool = False, blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """Launch pass 2. ``rows [B, R]``, ``cols [B, C]`` int64 (stride 0 over B when shared), ``row_weights [B, R]``
    fp32 or None, ``mask`` the 4-D view; other shapes as :func:`vlmkit.kernels.row_probs`. ``blocks`` overrides
    ``(BLOCK_R, BLOCK_C)``. Returns fp32 ``[B, H, R, C]`` or ``[B, H, C]``."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = h // hkv
    n_r, n_c = rows.shape[1], cols.shape[1]
    cfg = config(n_r, q.dtype)
    if blocks is not None:
        cfg["BLOCK_R"], cfg["BLOCK_C"] = blocks
    reduce = row_weights is not None
    if reduce:
        out = torch.empty(b, h, n_c, device=q.device, dtype=torch.float32)
        osr = (out.stride(0), out.stride(1), 0, out.stride(2))
        w = row_weights.contiguous() if row_weights.stride(-1) != 1 else row_weights
        swb = w.stride(0)
    else:
        out = torch.empty(b, h, n_r, n_c, device=q.device, dtype=torch.float32)
        osr = out.stride()
        w, swb = out, 0
    if out.numel() == 0:
        return out
    if n_r == 0:
        return out.zero_()
    lse = lse.float().contiguous()
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    cols = cols if cols.stride(-1) == 1 else cols.contiguous()
    mrng, mpar, mcol, mmeta, nmod, has_post, use_col, dense = mod_args(table, lse)
    mten, mstr, has_mask, mbool = mask_args(mask, lse)
    grid = (triton.cdiv(n_c, cfg["BLOCK_C"]), b * hkv)
    _probs_kernel[grid](q, k, lse, rows, cols, w, out, mten, mrng, mpar, mcol, mmeta,
                        *q.stride(), *k.stride(), *mstr, rows.stride(0), cols.stride(0), swb, *osr,
                        h, g, lq, lk, n_r, n_c, d, scaling,
                        CAUSAL=causal, HAS_MASK=has_mask, MASK_BOOL=mbool, NMOD=nmod, HAS_POST=has_post,
                        USE_COLMASK=use_col, DENSE=dense, REDUCE=reduce, WEIGHTED=bool(weighted and has_post),
                        UPCAST=interpreting() and q.dtype == torch.bfloat16,
                        PREC="ieee" if q.dtype == torch.float32 else "tf32",
                        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], BLOCK_D=_pow2(d),
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
