"""Reference semantics of vlmkit's attention kernels, in plain PyTorch.

This module defines what the kernels compute (the :class:`Modulation` rules, causal alignment, mask conventions,
fully-masked rows) and is both the CPU path and the test oracle for the Triton kernels.

Conventions shared with the Triton kernels:

* Logits are ``s = scaling * q . k`` in fp32. Modulations edit ``s`` *before* the mask is applied, in list order.
* Causal alignment is bottom-right: query row ``i`` (of ``Lq``) has absolute position ``i + Lk - Lq`` and sees keys
  ``j <= i + Lk - Lq``. With ``Lq == Lk`` this is the usual lower triangle; a single decode row sees every key.
* Masks: bool (True = attend) or additive float, broadcastable to ``[B, 1 | H, Lq, Lk]``.
* A row that can see no key at all gets output 0, LSE ``-inf`` and probabilities 0 (never NaN). With a finite additive
  mask (``finfo.min``, as HF eager uses) such a row is not "masked" but sees all keys at a huge negative logit: its
  output is the uniform average (like eager), but its LSE cannot be represented, so its pass-2 probabilities are not
  normalised. Use bool masks when those rows matter.
* ``lse`` is the natural-log log-sum-exp of the *modulated* logits (fp32); probabilities are ``exp(s' - lse)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from vlmkit.errors import InputError

_NEG_INF = float("-inf")
_BIG = 2**31 - 1
_CHUNK_BYTES = 256 * 2**20  # fp32 logits kept per chunk of query rows in the math path


@dataclass(frozen=True, eq=False)
class Modulation:
    """One edit of the attention of chosen heads, key columns and (optionally) query rows.

    Selected logits ``s`` (see the module docstring) become ``(s + alpha*|s|) * scale + bias``; then ``weight``
    reweights the post-softmax probabilities of the selected keys:

    * ``renormalize=True``: the row is renormalised afterwards, which is exactly adding ``log(weight)`` to the logit
      (``weight >= 0``; 0 removes the keys). The reported LSE and probabilities include it.
    * ``renormalize=False``: ``p * weight`` enters the ``P @ V`` product but not the row sum (equivalently: the selected
      value rows are scaled by ``weight`` for these heads). LSE and probabilities exclude it unless asked for
      (``row_probs(..., weighted=True)``).

    Fields:
        heads: query-head indices, or None for all heads.
        key_start, key_end: selected key range ``[key_start, key_end)``; ``key_end=None`` (or past ``Lk``) = to the end.
        columns: optional bool ``[L]`` key mask, intersected with the range (keys past ``L`` are not selected).
        row_start, row_end: selected *absolute* query positions (``i + Lk - Lq``), so ranges keep their meaning in
            decode steps; ``row_end=None`` = no upper bound.
        scale, bias, alpha, weight: a float, one value per selected head (``len(heads)``, or ``H`` if all), or a
            4-D tensor broadcastable to ``[B, H, Lq, Lk]`` (each dim 1 or full; e.g. per-token values
            ``[B, 1, 1, Lk]``, per-(sample, head) values ``[B, H, 1, 1]``) whose entries apply where the modulation
            selects. A slot with a tensor value stores its four values at their common broadcast shape (x H).
    Several modulations apply in list order.
    """

    heads: Sequence[int] | None = None
    key_start: int = 0
    key_end: int | None = None
    columns: torch.Tensor | None = None
    row_start: int = 0
    row_end: int | None = None
    scale: float | Sequence[float] = 1.0
    bias: float | Sequence[float] = 0.0
    alpha: float | Sequence[float] = 0.0
    weight: float | Sequence[float] = 1.0
    renormalize: bool = True


@dataclass(frozen=True, eq=False)
class ModTable:
    """Modulations resolved for one call (``M`` slots), identical for both paths.

    ``ranges`` int32 ``[M, 4]`` = key_start, key_end, row_start, row_end (``host_ranges`` the same as lists).
    Per-slot values alpha, scale, additive term (bias + log weight), post-softmax weight are either compact,
    ``params`` fp32 ``[M, 4, H]``, or (when any modulation passes a 4-D tensor) dense: ``dense[m]`` fp32
    ``[4, B|1, H, Lq|1, Lk|1]``, also packed for Triton as ``dense_flat`` plus ``dense_meta`` int64 ``[M, 6]`` =
    offset and the strides of value / batch / head / row / column (0 where broadcast). ``columns`` int8 ``[M, Lk]``.
    """

    ranges: torch.Tensor
    params: torch.Tensor | None
    columns: torch.Tensor | None
    has_post: bool
    host_ranges: list = field(default_factory=list)
    dense: tuple = ()
    dense_flat: torch.Tensor | None = None
    dense_meta: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.host_ranges)


def _values(value, heads: list[int], shape: tuple, identity: float, name: str, idx: int, device):
    """A parameter as float64 ``[H]`` (float or per-head values) or fp32 ``[B|1, H, Lq|1, Lk|1]`` (a 4-D tensor)."""
    b, h, lq, lk = shape
    if isinstance(value, torch.Tensor) and value.dim() == 4:
        if not all(d in (1, full) for d, full in zip(value.shape, shape)):
            raise InputError(f"modulations[{idx}].{name} {tuple(value.shape)} does not broadcast to "
                             f"[B, H, Lq, Lk] = {list(shape)} (each dim 1 or full)")
        sel = torch.zeros(h, dtype=torch.bool, device=device)
        sel[heads] = True
        v = value.to(device=device, dtype=torch.float32)
        return torch.where(sel[None, :, None, None], v, torch.tensor(identity, device=device))
    vals = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if vals.numel() == 1:
        vals = vals.expand(len(heads))
    if vals.numel() != len(heads):
        raise InputError(f"modulations[{idx}].{name} has {vals.numel()} values for {len(heads)} heads "
                         "(use a float, one value per head, or a 4-D tensor broadcastable to [B, H, Lq, Lk])")
    out = torch.full((h,), identity, dtype=torch.float64)
    out[heads] = vals
    return out


def resolve_modulations(modulations, shape: tuple, device) -> ModTable | None:
    """Validate ``modulations`` (a Modulation or a sequence of them) for a call with logits of ``shape`` =
    ``(B, H, Lq, Lk)`` and pack them into a :class:`ModTable` (None when there are none)."""
    if modulations is None:
        return None
    if isinstance(modulations, Modulation):
        modulations = [modulations]
    modulations = list(modulations)
    if not modulations:
        return None
    num_heads, num_keys = shape[1], shape[3]
    ranges, slots, cols, has_post = [], [], [], False
    any_cols = any(m.columns is not None for m in modulations if isinstance(m, Modulation))
    for idx, m in enumerate(modulations):
        if not isinstance(m, Modulation):
            raise InputError(f"modulations[{idx}] is a {type(m).__name__}; use vlmkit.kernels.Modulation")
        heads = list(range(num_heads)) if m.heads is None else [int(h) for h in m.heads]
        bad = [h for h in heads if not 0 <= h < num_heads]
        if bad:
            raise InputError(f"modulations[{idx}].heads {bad} out of range for {num_heads} heads")
        key_end = num_keys if m.key_end is None else min(int(m.key_end), num_keys)
        row_end = _BIG if m.row_end is None else int(m.row_end)
        if m.key_start < 0 or m.row_start < 0 or (m.key_end is not None and m.key_end < m.key_start) or \
                row_end < m.row_start:
            raise InputError(f"modulations[{idx}]: key range [{m.key_start}, {m.key_end}) or row range "
                             f"[{m.row_start}, {m.row_end}) is negative or reversed")
        vals = {name: _values(getattr(m, name), heads, shape, ident, name, idx, device)
                for name, ident in (("alpha", 0.0), ("scale", 1.0), ("bias", 0.0), ("weight", 1.0))}
        if any(v.dim() == 4 for v in vals.values()):  # one tensor-valued field: make all four [., H, ., .] tensors
            vals = {n: v if v.dim() == 4 else v.to(device, torch.float32)[None, :, None, None] for n, v in vals.items()}
        weight, add = vals["weight"], vals["bias"]
        if m.renormalize:
            if bool((weight < 0).any()):
                raise InputError(f"modulations[{idx}].weight must be >= 0 with renormalize=True (it is log-added)")
            add = add + torch.log(weight)  # log(1) = 0 exactly, log(0) = -inf
            post = torch.ones_like(weight) if weight.dim() == 4 else torch.ones(num_heads, dtype=torch.float64)
        else:
            post = weight
            has_post = has_post or bool((weight != 1).any())
        ranges.append([int(m.key_start), key_end, int(m.row_start), row_end])
        slots.append([vals["alpha"], vals["scale"], add, post])
        if any_cols:
            c = torch.ones(num_keys, dtype=torch.int8)
            if m.columns is not None:
                sel = torch.as_tensor(m.columns).reshape(-1)
                if sel.dtype != torch.bool:
                    raise InputError(f"modulations[{idx}].columns must be a bool tensor, got {sel.dtype}")
                c.zero_()
                n = min(sel.numel(), num_keys)
                c[:n] = sel[:n].to(torch.int8).cpu()
            cols.append(c)
    common = dict(ranges=torch.tensor(ranges, dtype=torch.int32, device=device),
                  columns=torch.stack(cols).to(device) if any_cols else None, has_post=has_post, host_ranges=ranges)
    if all(v.dim() == 1 for slot in slots for v in slot):
        return ModTable(params=torch.stack([torch.stack(slot) for slot in slots]).to(device, torch.float32), **common)
    dense, meta, flat, offset = [], [], [], 0
    for slot in slots:
        parts = [v.to(device, torch.float32)[None, :, None, None] if v.dim() == 1 else v for v in slot]
        t = torch.stack(torch.broadcast_tensors(*parts)).contiguous()  # [4, B|1, H, Lq|1, Lk|1]
        st = [t.stride(0)] + [t.stride(d) if t.shape[d] > 1 else 0 for d in (1, 2, 3, 4)]
        dense.append(t)
        meta.append([offset] + st)
        flat.append(t.reshape(-1))
        offset += t.numel()
    return ModTable(params=None, dense=tuple(dense), dense_flat=torch.cat(flat),
                    dense_meta=torch.tensor(meta, dtype=torch.int64, device=device), **common)


def _dense_values(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Gather ``t [4, B|1, H, Lq|1, Lk|1]`` at ``rows [B|1, r]`` x ``cols [B|1, c]`` -> ``[4, B|1, H, r, c]``."""
    bx = max(t.shape[1], rows.shape[0], cols.shape[0])
    bi = torch.arange(bx, device=t.device) if t.shape[1] > 1 else torch.zeros(bx, dtype=torch.long, device=t.device)
    ri, ci = rows.expand(bx, -1), cols.expand(bx, -1)
    ri = ri if t.shape[3] > 1 else torch.zeros_like(ri)
    ci = ci if t.shape[4] > 1 else torch.zeros_like(ci)
    g = t.permute(1, 3, 4, 0, 2)[bi[:, None, None], ri[:, :, None], ci[:, None, :]]  # [bx, r, c, 4, H]
    return g.permute(3, 0, 4, 1, 2)


def apply_modulations(s: torch.Tensor, table: ModTable | None, rows: torch.Tensor, cols: torch.Tensor, off: int):
    """Edit fp32 logits ``s [B, H, r, c]`` (returns a new tensor) of query rows ``rows [B|1, r]`` (indices into Lq;
    absolute positions are ``rows + off``) and key columns ``cols [B|1, c]``.
    Returns ``(s, post)``, ``post`` the post-softmax weight ``[B|1, H, r, c]`` or None."""
    if table is None:
        return s, None
    kc = cols[:, None, None, :]
    rp = (rows + off)[:, None, :, None]
    post = torch.ones((), dtype=s.dtype, device=s.device) if table.has_post else None
    for i, (ks, ke, rs, re) in enumerate(table.host_ranges):
        sel = (kc >= ks) & (kc < ke) & (rp >= rs) & (rp < re)
        if table.columns is not None:
            sel = sel & (table.columns[i][cols] != 0)[:, None, None, :]
        sel = sel & (s > _NEG_INF)  # a key removed by an earlier weight 0 stays removed
        if table.params is not None:
            a, sc, ad, w = (table.params[i, j][None, :, None, None] for j in range(4))
        else:
            a, sc, ad, w = _dense_values(table.dense[i], rows, cols)
        s = torch.where(sel, (s + a * s.abs()) * sc + ad, s)
        if post is not None:
            post = torch.where(sel, post * w, post)
    return s, post


def _apply_mask(s: torch.Tensor, mask: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor:
    if mask is not None:
        if mask.dtype == torch.bool:
            valid = mask if valid is None else valid & mask
        else:
            s = s + mask.float()
    if valid is not None:
        s = s.masked_fill(~valid, _NEG_INF)
    return s


def _cpu_flash(q, k, v, mask, causal, scaling):
    """SDPA's CPU flash kernel (the op ``F.scaled_dot_product_attention`` uses on CPU), with our conventions."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    rep = h // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    is_causal = causal and lq == lk and mask is None
    if causal and not is_causal and lq > 1:
        vis = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        mask = vis if mask is None else (mask & vis if mask.dtype == torch.bool else mask.masked_fill(~vis, _NEG_INF))
    dead = None
    add = None
    if mask is not None:
        if mask.dtype == torch.bool:
            dead = ~mask.any(-1)
            add = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, _NEG_INF)
        else:
            dead = (mask == _NEG_INF).all(-1)
            add = mask
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=add,
                                                                          scale=scaling)
    if dead is not None and bool(dead.any()):
        lse = lse.masked_fill(dead.expand(b, h, lq), _NEG_INF)
    return out, lse.float()


def _fast_ok(q, k, v, mask, table, segments) -> bool:
    return (q.device.type == "cpu" and table is None and not segments and q.shape[-1] == v.shape[-1]
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and (mask is None or mask.dtype == torch.bool or mask.dtype == q.dtype))


def attention(q, k, v, *, mask=None, causal: bool, scaling: float, table: ModTable | None = None,
              return_lse: bool = True, segments=(), fast: bool = True):
    """Exact attention in PyTorch. Inputs are validated by :mod:`vlmkit.kernels._dispatch`.

    Shapes: ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``v [B, Hkv, Lk, Dv]``, ``mask`` None or ``[B, 1|H, Lq, Lk]``.
    Returns ``(out [B, H, Lq, Dv] q.dtype, lse [B, H, Lq] fp32 or None, mass [B, H, Lq, S] fp32 or None)``.
    ``fast`` uses SDPA's CPU kernel for the output when nothing vlmkit-specific is asked (so answers equal plain SDPA;
    the LSE of fp16/bf16 inputs is then recomputed in fp32); otherwise everything is fp32 math in row chunks.
    """
    b, h, lq, _ = q.shape
    if not (b and h and lq and k.shape[2]):  # empty call (SDPA's CPU kernel crashes on these): rows see no key
        lse = torch.full((b, h, lq), _NEG_INF, device=q.device)
        mass = lse.new_zeros(b, h, lq, len(segments)) if segments else None
        return q.new_zeros(b, h, lq, v.shape[-1]), (lse if return_lse else None), mass
    if fast and _fast_ok(q, k, v, mask, table, segments):
        out, lse = _cpu_flash(q, k, v, mask, causal, scaling)
        if return_lse and q.dtype != torch.float32:  # SDPA's low-precision LSE is ~1e-5 off: recompute it in fp32
            lse = _math(q, k, None, mask=mask, causal=causal, scaling=scaling)[1]
        return out, (lse if return_lse else None), None
    return _math(q, k, v, mask=mask, causal=causal, scaling=scaling, table=table, segments=segments,
                 return_lse=return_lse)


def _math(q, k, v, *, mask, causal, scaling, table=None, segments=(), return_lse=True):
    """fp32 attention in chunks of query rows; ``v=None`` computes only the LSE."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = h // hkv
    kf = k.float()[:, :, None].transpose(-1, -2)  # [B, Hkv, 1, D, Lk]
    vf = v.float()[:, :, None] if v is not None else None  # [B, Hkv, 1, Lk, Dv]
    qf = q.float().reshape(b, hkv, g, lq, d)
    off = lk - lq
    keys = torch.arange(lk, device=q.device)
    step = max(1, _CHUNK_BYTES // max(1, b * h * lk * 4 * 3))
    outs, lses, masses = [], [], []
    for r0 in range(0, lq, step):
        r1 = min(lq, r0 + step)
        s = torch.matmul(qf[:, :, :, r0:r1], kf).reshape(b, h, r1 - r0, lk) * scaling
        pos = torch.arange(r0, r1, device=q.device) + off
        s, post = apply_modulations(s, table, torch.arange(r0, r1, device=q.device)[None], keys[None], off)
        vis = (keys[None, :] <= pos[:, None]) if causal else None
        s = _apply_mask(s, None if mask is None else mask[:, :, r0:r1], vis)
        mx = s.amax(dim=-1, keepdim=True)
        mx = mx.masked_fill(mx == _NEG_INF, 0.0)
        e = torch.exp(s - mx)
        tot = e.sum(dim=-1, keepdim=True)
        lses.append((mx + torch.log(tot))[..., 0])  # log(0) = -inf for rows that see no key
        if vf is None:
            continue
        p = e / tot.clamp_min(torch.finfo(torch.float32).tiny)
        if segments:
            masses.append(torch.stack([p[..., s0:s1].sum(-1) for s0, s1 in segments], dim=-1))
        if post is not None:
            p = p * post
        outs.append(torch.matmul(p.reshape(b, hkv, g, r1 - r0, lk), vf).reshape(b, h, r1 - r0, -1))
    lse = torch.cat(lses, dim=2) if return_lse else None
    if vf is None:
        return None, lse, None
    out = torch.cat(outs, dim=2).to(q.dtype)
    return out, lse, (torch.cat(masses, dim=2) if segments else None)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, H, L, ...]``, ``idx [B, R]`` -> ``x[b, :, idx[b]]`` as ``[B, H, R, ...]``."""
    bidx = torch.arange(x.shape[0], device=x.device)[:, None]
    return x.transpose(1, 2)[bidx, idx].transpose(1, 2)


def row_probs(q, k, lse, rows, cols, *, mask=None, causal: bool, scaling: float, table: ModTable | None = None,
              row_weights=None, weighted: bool = False) -> torch.Tensor:
    """Exact probabilities of rows onto columns from a stored LSE (the two-pass recompute), in PyTorch.

    Shapes: ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``lse [B, H, Lq]``, ``rows [B, R]``, ``cols [B, C]`` int64
    (-1 = padding slot, gives 0), ``mask`` None or ``[B, 1|H, Lq, Lk]``, ``row_weights`` None or ``[B, R]`` fp32.
    Returns fp32 ``[B, H, R, C]``, or ``[B, H, C]`` (the weighted sum over rows) when ``row_weights`` is given.
    """
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = h // hkv
    if rows.shape[1] == 0 or cols.shape[1] == 0 or b * h == 0:
        shape = (b, h, cols.shape[1]) if row_weights is not None else (b, h, rows.shape[1], cols.shape[1])
        return torch.zeros(shape, device=q.device)
    r_ok, c_ok = rows >= 0, cols >= 0
    rc, cc = rows.clamp_min(0), cols.clamp_min(0)
    kc = _gather_rows(k, cc).float()[:, :, None].transpose(-1, -2)  # [B, Hkv, 1, D, C]
    step = rows.shape[1]
    if row_weights is not None:
        step = max(1, _CHUNK_BYTES // max(1, b * h * cols.shape[1] * 4 * 3))
    parts = []
    for r0 in range(0, rows.shape[1], step):
        ri, ok = rc[:, r0:r0 + step], r_ok[:, r0:r0 + step]
        n = ri.shape[1]
        qr = _gather_rows(q, ri).float().reshape(b, hkv, g, n, d)
        s = torch.matmul(qr, kc).reshape(b, h, n, -1) * scaling
        pos = ri + (lk - lq)
        s, post = apply_modulations(s, table, ri, cc, lk - lq)
        valid = ok[:, None, :, None] & c_ok[:, None, None, :]
        if causal:
            valid = valid & (cc[:, None, None, :] <= pos[:, None, :, None])
        m = None
        if mask is not None:
            bidx = torch.arange(b, device=q.device)[:, None, None]
            m = mask.permute(0, 2, 3, 1)[bidx, ri[:, :, None], cc[:, None, :]].permute(0, 3, 1, 2)
        s = _apply_mask(s, m, valid)
        lr = _gather_rows(lse.float()[..., None], ri)[..., 0]  # [B, H, n]
        p = torch.exp(s - lr[..., None]).masked_fill(~torch.isfinite(lr)[..., None], 0.0)
        if weighted and post is not None:
            p = p * post
        if row_weights is not None:
            w = row_weights[:, r0:r0 + step].float()
            p = (p * w[:, None, :, None]).sum(dim=2)
        parts.append(p)
    if row_weights is not None:
        return torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]
    return torch.cat(parts, dim=2)
