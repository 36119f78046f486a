"""Pass 1: a flash-style attention forward in Triton that also returns the per-row LSE (and segment masses).

One program owns ``BLOCK_M`` "packed" rows of one (batch, KV head): packed row ``v`` in ``[0, G * Lq)`` is query row
``v % Lq`` of query head ``kv_head * G + v // Lq``. For prefill this is the usual row tile of one head; for decode
(``Lq = 1``) the ``G`` query heads that share a KV head share the K/V tiles (GQA packing).

The key sweep runs in two stages: tiles every row of the block fully sees (no masking at all), then the causal band
and the ragged tail with masks. With a user mask every tile takes the masked stage. Softmax state is fp32 in natural
log units (so additive ``finfo.min`` masks never overflow). Modulations follow :mod:`vlmkit.kernels.torch_ref`.
Semantics are those of :func:`vlmkit.kernels.torch_ref.attention`; import this module only when Triton is wanted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmkit.kernels._dispatch import interpreting


@triton.jit
def _modulate(s, pw, cols, pos, rows, hrow, b, ModRng, ModPar, ModCol, ModMeta, H, Lk,
              NMOD: tl.constexpr, HAS_POST: tl.constexpr, USE_COLMASK: tl.constexpr, DENSE: tl.constexpr):
    """Apply NMOD modulation slots to fp32 logits ``s [M, N]``: ``rows [M]`` query indices (``pos`` their absolute
    positions), ``hrow [M]`` their heads, ``cols [N]`` key indices (in range), ``b`` the batch index.
    Returns ``(s, pw)`` (``pw`` the post-softmax weights if HAS_POST). Values: compact ``[M, 4, H]`` or, if DENSE,
    a flat buffer addressed through ``ModMeta [M, 6]`` (offset, value / batch / head / row / column strides)."""
    for mi in tl.static_range(NMOD):
        ks = tl.load(ModRng + mi * 4)
        ke = tl.load(ModRng + mi * 4 + 1)
        rs = tl.load(ModRng + mi * 4 + 2)
        re = tl.load(ModRng + mi * 4 + 3)
        sel = ((cols[None, :] >= ks) & (cols[None, :] < ke)) & ((pos[:, None] >= rs) & (pos[:, None] < re))
        sel = sel & (s > float("-inf"))  # a key removed by an earlier weight 0 stays removed
        if USE_COLMASK:
            cm = tl.load(ModCol + mi * Lk + cols, mask=(cols >= 0) & (cols < Lk), other=0)
            sel = sel & (cm[None, :] != 0)
        if DENSE:
            off = tl.load(ModMeta + mi * 6)
            sv = tl.load(ModMeta + mi * 6 + 1)
            ptr = (ModPar + off + b * tl.load(ModMeta + mi * 6 + 2)
                   + hrow[:, None].to(tl.int64) * tl.load(ModMeta + mi * 6 + 3)
                   + rows[:, None].to(tl.int64) * tl.load(ModMeta + mi * 6 + 4)
                   + cols[None, :].to(tl.int64) * tl.load(ModMeta + mi * 6 + 5))
            ok = (cols[None, :] >= 0) & (cols[None, :] < Lk) & (rows[:, None] >= 0)
            a = tl.load(ptr, mask=ok, other=0.0)
            sc = tl.load(ptr + sv, mask=ok, other=1.0)
            ad = tl.load(ptr + 2 * sv, mask=ok, other=0.0)
            s = tl.where(sel, (s + a * tl.abs(s)) * sc + ad, s)
            if HAS_POST:
                w = tl.load(ptr + 3 * sv, mask=ok, other=1.0)
                pw = tl.where(sel, pw * w, pw)
        else:
            a = tl.load(ModPar + (mi * 4 + 0) * H + hrow)
            sc = tl.load(ModPar + (mi * 4 + 1) * H + hrow)
            ad = tl.load(ModPar + (mi * 4 + 2) * H + hrow)
            s = tl.where(sel, (s + a[:, None] * tl.abs(s)) * sc[:, None] + ad[:, None], s)
            if HAS_POST:
                w = tl.load(ModPar + (mi * 4 + 3) * H + hrow)
                pw = tl.where(sel, pw * w[:, None], pw)
    return s, pw


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, Mass, Mask, ModRng, ModPar, ModCol, ModMeta, SegRng,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, sos, sls,
                smb, smh, smm, smn,
                H, G, Lq, Lk, D, DV, scaling, split_len,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                NMOD: tl.constexpr, HAS_POST: tl.constexpr, USE_COLMASK: tl.constexpr, DENSE: tl.constexpr,
                NSEG: tl.constexpr,
                STORE_LSE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    hkv = H // G
    b = (pid_bh // hkv).to(tl.int64)
    hk = pid_bh % hkv
    vrow = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = vrow < G * Lq
    vrow = tl.where(row_ok, vrow, 0)
    i = vrow % Lq
    hrow = hk * G + vrow // Lq
    off = Lk - Lq
    pos = i + off
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)

    q_ptrs = Q + b * sqb + hrow[:, None].to(tl.int64) * sqh + i[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * skb + hk.to(tl.int64) * skh
    v_base = V + b * svb + hk.to(tl.int64) * svh
    m_base = Mask + b * smb + hrow.to(tl.int64) * smh + i.to(tl.int64) * smm

    # key ranges: [0, full) is seen by every row of the block without masks; [full, hi) needs masks.
    # Split-K (decode): program_id(2) owns keys [k_lo, k_hi) and writes a partial result the wrapper combines.
    split = tl.program_id(2)
    k_lo = split * split_len
    k_hi = tl.minimum(Lk, k_lo + split_len)
    if CAUSAL:
        i_hi = tl.max(tl.where(row_ok, i, 0), axis=0)
        i_lo = tl.min(tl.where(row_ok, i, Lq), axis=0)
        hi = tl.maximum(tl.minimum(Lk, i_hi + off + 1), 0)
        full = tl.maximum(i_lo + off + 1, 0) // BLOCK_N * BLOCK_N
        full = tl.minimum(full, hi)
    else:
        hi = Lk
        full = Lk // BLOCK_N * BLOCK_N
    if HAS_MASK:
        full = 0

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    ms0 = tl.zeros([BLOCK_M], tl.float32)
    ms1 = tl.zeros([BLOCK_M], tl.float32)
    ms2 = tl.zeros([BLOCK_M], tl.float32)
    ms3 = tl.zeros([BLOCK_M], tl.float32)

    for stage in tl.static_range(2):
        if stage == 0:
            lo_s = k_lo
            hi_s = tl.minimum(full, k_hi)
        else:
            lo_s = tl.maximum(full, k_lo)
            hi_s = tl.minimum(hi, k_hi)
        for start_n in range(lo_s, hi_s, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < Lk
            kt = tl.load(k_base + cols[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                         mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=PREC) * scaling
            pw = tl.full([BLOCK_M, BLOCK_N], 1.0, tl.float32)
            if NMOD > 0:
                s, pw = _modulate(s, pw, cols, pos, i, hrow, b, ModRng, ModPar, ModCol, ModMeta, H, Lk,
                                  NMOD, HAS_POST, USE_COLMASK, DENSE)
            if stage == 1:
                valid = col_ok[None, :] & row_ok[:, None]
                if CAUSAL:
                    valid = valid & (cols[None, :] <= pos[:, None])
                if HAS_MASK:
                    mv = tl.load(m_base[:, None] + cols[None, :].to(tl.int64) * smn,
                                 mask=col_ok[None, :] & row_ok[:, None], other=0)
                    if MASK_BOOL:
                        valid = valid & (mv != 0)
                    else:
                        s = s + mv.to(tl.float32)
                s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if NSEG > 0:
                sel0 = (cols >= tl.load(SegRng + 0)) & (cols < tl.load(SegRng + 1))
                ms0 = ms0 * alpha + tl.sum(tl.where(sel0[None, :], p, 0.0), axis=1)
            if NSEG > 1:
                sel1 = (cols >= tl.load(SegRng + 2)) & (cols < tl.load(SegRng + 3))
                ms1 = ms1 * alpha + tl.sum(tl.where(sel1[None, :], p, 0.0), axis=1)
            if NSEG > 2:
                sel2 = (cols >= tl.load(SegRng + 4)) & (cols < tl.load(SegRng + 5))
                ms2 = ms2 * alpha + tl.sum(tl.where(sel2[None, :], p, 0.0), axis=1)
            if NSEG > 3:
                sel3 = (cols >= tl.load(SegRng + 6)) & (cols < tl.load(SegRng + 7))
                ms3 = ms3 * alpha + tl.sum(tl.where(sel3[None, :], p, 0.0), axis=1)
            if HAS_POST:
                p = p * pw
            vt = tl.load(v_base + cols[:, None].to(tl.int64) * svn + offs_dv[None, :] * svd,
                         mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None]
            if UPCAST:
                acc = tl.dot(p, vt.to(tl.float32), acc, input_precision=PREC)
            else:
                acc = tl.dot(p.to(vt.dtype), vt, acc, input_precision=PREC)
            m_i = m_new

    live = l_i > 0
    l_safe = tl.where(live, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = (Out + split.to(tl.int64) * sos + b * sob + hrow[:, None].to(tl.int64) * soh
              + i[:, None].to(tl.int64) * som + offs_dv[None, :] * sod)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    row_id = split.to(tl.int64) * sls + (b * H + hrow) * Lq + i
    if STORE_LSE:
        lse = tl.where(live, m_i + tl.log(l_safe), float("-inf"))
        tl.store(Lse + row_id, lse, mask=row_ok)
    if NSEG > 0:
        tl.store(Mass + row_id * NSEG + 0, ms0 / l_safe, mask=row_ok)
    if NSEG > 1:
        tl.store(Mass + row_id * NSEG + 1, ms1 / l_safe, mask=row_ok)
    if NSEG > 2:
        tl.store(Mass + row_id * NSEG + 2, ms2 / l_safe, mask=row_ok)
    if NSEG > 3:
        tl.store(Mass + row_id * NSEG + 3, ms3 / l_safe, mask=row_ok)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(int(n)))


def config(d: int, dtype: torch.dtype, packed_rows: int) -> dict:
    """Block sizes and launch hints. The interpreter ignores warps/stages and runs faster with large blocks."""
    if interpreting():
        return {"BLOCK_M": 64 if packed_rows > 32 else 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    small = packed_rows <= 64
    if dtype == torch.float32:
        return {"BLOCK_M": 16 if small else 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if d <= 64:
        return {"BLOCK_M": 16 if small else 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    if d <= 128:
        return {"BLOCK_M": 16 if small else 128, "BLOCK_N": 64, "num_warps": 8 if not small else 4, "num_stages": 3}
    return {"BLOCK_M": 16 if small else 64, "BLOCK_N": 32, "num_warps": 8 if not small else 4, "num_stages": 2}


def mod_args(table, dummy):
    """``(ranges, values, columns, meta, NMOD, HAS_POST, USE_COLMASK, DENSE)`` for a
    :class:`~vlmkit.kernels.torch_ref.ModTable` (or None)."""
    if table is None:
        return dummy, dummy, dummy, dummy, 0, False, False, False
    cols = table.columns if table.columns is not None else dummy
    dense = table.params is None
    vals = table.dense_flat if dense else table.params
    meta = table.dense_meta if dense else dummy
    return table.ranges, vals, cols, meta, table.n, table.has_post, table.columns is not None, dense


def mask_args(mask, dummy):
    """``(tensor, strides, HAS_MASK, MASK_BOOL)`` for a ``[B, 1|H, Lq, Lk]`` mask view (or None)."""
    if mask is None:
        return dummy, (0, 0, 0, 0), False, False
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    strides = tuple(mask.stride())
    if mask.shape[1] == 1:
        strides = (strides[0], 0, strides[2], strides[3])
    return mask, strides, True, mask.dtype == torch.uint8


def num_splits(grid_programs: int, lk: int, block_n: int, device) -> int:
    """Split-K factor for few-row calls (decode): enough programs to fill the GPU, at least 4 key tiles each."""
    if interpreting() or device.type != "cuda" or lk < 1024:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(lk, 4 * block_n), (2 * sms) // max(1, grid_programs)))


def forward(q, k, v, *, mask, causal: bool, scaling: float, table, segments=(), return_lse: bool = True,
            blocks: tuple[int, int] | None = None, splits: int | None = None):
    """Launch pass 1. Shapes as :func:`vlmkit.kernels.attention` (validated there); ``mask`` is the 4-D view.

    Returns ``(out [B, H, Lq, Dv] view over [B, Lq, H, Dv], lse [B, H, Lq] fp32 or None, mass [B, H, Lq, S] or None)``.
    ``blocks`` overrides ``(BLOCK_M, BLOCK_N)`` and ``splits`` the split-K factor (tests use both to exercise several
    tiles and the split path on tiny shapes). With splits, each split writes fp32 partial (out, lse, mass) and they
    are combined here in a fixed order (deterministic).
    """
    b, h, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // hkv
    cfg = config(d, q.dtype, g * lq)
    if blocks is not None:
        cfg["BLOCK_M"], cfg["BLOCK_N"] = blocks
    bn = cfg["BLOCK_N"]
    out = torch.empty(b, lq, h, dv, device=q.device, dtype=q.dtype).transpose(1, 2)
    nseg = len(segments)
    if not (lq and b and h):
        empty = torch.empty(b, h, lq, device=q.device, dtype=torch.float32)
        return out, (empty if return_lse else None), (empty[..., None].expand(-1, -1, -1, nseg) if nseg else None)
    if not lk:  # no keys at all: every row is fully masked
        lse = torch.full((b, h, lq), float("-inf"), device=q.device)
        return out.zero_(), (lse if return_lse else None), (lse.new_zeros(b, h, lq, nseg) if nseg else None)
    grid_m = triton.cdiv(g * lq, cfg["BLOCK_M"])
    n_split = splits if splits is not None else (num_splits(grid_m * b * hkv, lk, bn, q.device) if grid_m == 1 else 1)
    split_len = triton.cdiv(triton.cdiv(lk, max(1, n_split)), bn) * bn
    n_split = triton.cdiv(lk, split_len)
    if n_split > 1:  # fp32 partials [S, B, Lq, H, Dv] (viewed as [S, B, H, Lq, Dv]), [S, B, H, Lq], [S, B, H, Lq, NSEG]
        o_buf = torch.empty(n_split, b, lq, h, dv, device=q.device, dtype=torch.float32).transpose(2, 3)
        l_buf = torch.empty(n_split, b, h, lq, device=q.device, dtype=torch.float32)
        m_buf = torch.empty(n_split, b, h, lq, max(nseg, 1), device=q.device, dtype=torch.float32)
        o_strides = o_buf.stride()[1:] + (o_buf.stride(0), l_buf.stride(0))
        store_lse = True
    else:
        o_buf = out
        l_buf = torch.empty(b, h, lq, device=q.device, dtype=torch.float32) if return_lse else out
        m_buf = torch.empty(b, h, lq, nseg, device=q.device, dtype=torch.float32) if nseg else out
        o_strides = out.stride() + (0, 0)
        store_lse = return_lse
    seg = torch.tensor([x for sg in segments for x in sg] or [0], dtype=torch.int32, device=q.device)
    mrng, mpar, mcol, mmeta, nmod, has_post, use_col, dense = mod_args(table, seg)
    mten, mstr, has_mask, mbool = mask_args(mask, seg)
    _fwd_kernel[(grid_m, b * hkv, n_split)](
        q, k, v, o_buf, l_buf, m_buf, mten, mrng, mpar, mcol, mmeta, seg,
        *q.stride(), *k.stride(), *v.stride(), *o_strides, *mstr,
        h, g, lq, lk, d, dv, scaling, split_len,
        CAUSAL=causal, HAS_MASK=has_mask, MASK_BOOL=mbool, NMOD=nmod, HAS_POST=has_post, USE_COLMASK=use_col,
        DENSE=dense, NSEG=nseg, STORE_LSE=store_lse, UPCAST=interpreting() and q.dtype == torch.bfloat16,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if n_split == 1:
        return out, (l_buf if return_lse else None), (m_buf if nseg else None)
    lse = torch.logsumexp(l_buf, dim=0)  # [B, H, Lq]; -inf where no split saw a key
    w = torch.exp(l_buf - lse).nan_to_num(0.0)  # [S, B, H, Lq]
    out.copy_((w[..., None] * o_buf).sum(0))
    mass = (w[..., None] * m_buf[..., :nseg]).sum(0) if nseg else None
    return out, (lse if return_lse else None), mass
