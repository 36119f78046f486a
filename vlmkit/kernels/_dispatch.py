"""Public entry points of :mod:`vlmkit.kernels`: input checks, backend choice, and the two passes.

Backend choice (:func:`select_backend`): Triton for CUDA tensors, PyTorch elsewhere. ``VLMKIT_KERNEL=triton|torch``
forces one (``auto`` or unset = the default rule). Triton on CPU tensors runs only under ``TRITON_INTERPRET=1``. Cases
the Triton kernels do not cover (float64, head dim > 256, autograd, more than 8 modulations or 4 segments, ...) run on
the PyTorch path even when Triton is forced: they never give a different answer. Triton is imported lazily.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from vlmkit.errors import InputError, VlmkitError
from vlmkit.kernels import torch_ref
from vlmkit.kernels.torch_ref import ModTable, resolve_modulations

ENV = "VLMKIT_KERNEL"
MAX_MODULATIONS = 8
MAX_SEGMENTS = 4
MAX_HEAD_DIM = 256
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KernelChoice:
    """Which path a call takes (``"triton"`` or ``"torch"``) and why."""

    backend: str
    reason: str


def interpreting() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def requested_backend() -> str:
    """The value of ``VLMKIT_KERNEL``: ``"auto"`` (unset), ``"triton"`` or ``"torch"``."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "triton", "torch"):
        raise InputError(f"{ENV}={value!r}: use 'triton', 'torch' or 'auto'")
    return value


def _unsupported(q, k, v, mask, table, segments) -> str | None:
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} (triton kernels take fp16/bf16/fp32)"
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM}"
    if q.is_cuda and q.dtype == torch.bfloat16 and torch.version.cuda and \
            torch.cuda.get_device_capability(q.device)[0] < 8:
        return "bf16 on a GPU older than sm_80"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask)):
        return "autograd (the triton kernels are forward-only)"
    if table is not None and table.n > MAX_MODULATIONS:
        return f"{table.n} modulations > {MAX_MODULATIONS}"
    if segments and len(segments) > MAX_SEGMENTS:
        return f"{len(segments)} segments > {MAX_SEGMENTS}"
    return None


def select_backend(q, k, v=None, *, mask=None, table: ModTable | None = None, segments=()) -> KernelChoice:
    """Pick the path for one call; raises :class:`VlmkitError` when Triton is forced but cannot run at all."""
    want = requested_backend()
    if want == "torch":
        return KernelChoice("torch", f"{ENV}=torch")
    dev = q.device.type
    has_triton = importlib.util.find_spec("triton") is not None
    if want == "auto":
        if dev != "cuda":
            return KernelChoice("torch", f"tensors on {dev}")
        if not has_triton:
            return KernelChoice("torch", "triton is not installed")
    else:
        if not has_triton:
            raise VlmkitError(f"{ENV}=triton but triton is not installed (pip install triton), or unset {ENV}")
        if dev == "cpu" and not interpreting():
            raise VlmkitError(f"{ENV}=triton with CPU tensors needs TRITON_INTERPRET=1 (Triton's slow CPU "
                              f"interpreter, for tests); move the tensors to CUDA or set {ENV}=torch")
        if dev not in ("cpu", "cuda"):
            raise VlmkitError(f"{ENV}=triton: tensors on {dev} are not supported; set {ENV}=torch")
    reason = _unsupported(q, k, v if v is not None else k, mask, table, segments)
    if reason:
        return KernelChoice("torch", f"fallback: {reason}")
    return KernelChoice("triton", "interpreter" if dev == "cpu" else "cuda")


# ---------------------------------------------------------------------------------------------------- validation
def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k)) + ((("v", v),) if v is not None else ()):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InputError(f"{name} must be a 4-D tensor [B, heads, L, D], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise InputError(f"{name} must be floating point, got {t.dtype}")
        if t.device != q.device:
            raise InputError(f"{name} is on {t.device} but q is on {q.device}")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[-1] != d:
        raise InputError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (batch and head dim must agree)")
    if k.shape[1] == 0 or h % k.shape[1]:
        raise InputError(f"{h} query heads are not a multiple of {k.shape[1]} key/value heads")
    if v is not None and (v.shape[:3] != k.shape[:3]):
        raise InputError(f"v {tuple(v.shape)} does not match k {tuple(k.shape)} in [B, Hkv, Lk]")


def _check_mask(mask, q, k):
    """Return ``mask`` as a 4-D view broadcast to ``[B, 1|H, Lq, Lk]`` (no copy), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"mask must be a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise InputError(f"mask must be bool (True = attend) or an additive float mask, got {mask.dtype}")
    if mask.device != q.device:
        raise InputError(f"mask is on {mask.device} but q is on {q.device}")
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    if mask.dim() > 4:
        raise InputError(f"mask has {mask.dim()} dims; expected at most 4 ([B, 1|H, Lq, Lk])")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    ok = m.shape[0] in (1, b) and m.shape[1] in (1, h) and m.shape[2] in (1, lq) and m.shape[3] in (1, lk)
    if not ok:
        raise InputError(f"mask {tuple(mask.shape)} does not broadcast to [B, 1|H, Lq, Lk] = [{b}, 1|{h}, {lq}, {lk}]")
    return m.expand(b, m.shape[1], lq, lk)


def _check_segments(segments, lk):
    if not segments:
        return ()
    out = []
    for i, seg in enumerate(segments):
        try:
            s0, s1 = (int(x) for x in seg)
        except (TypeError, ValueError):
            raise InputError(f"segments[{i}]={seg!r}: use (start, end) key ranges") from None
        if not 0 <= s0 <= s1:
            raise InputError(f"segments[{i}]=({s0}, {s1}) is negative or reversed")
        out.append((s0, min(s1, lk)))
    return tuple(out)


def _check_index(x, name, batch, limit, device):
    t = torch.as_tensor(x, device=device)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise InputError(f"{name} must be an integer tensor, got {t.dtype}")
    t = t.long()
    if t.dim() == 1:
        t = t[None].expand(batch, -1)
    if t.dim() != 2 or t.shape[0] != batch:
        raise InputError(f"{name} must be [n] or [B={batch}, n], got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < -1 or int(t.max()) >= limit):
        raise InputError(f"{name} values must lie in [0, {limit}) (or -1 for a padding slot)")
    return t


# ---------------------------------------------------------------------------------------------------- public API
def attention(q, k, v, *, mask=None, causal: bool, scaling: float | None = None, modulations=(),
              return_lse: bool = True, segments=None):
    """Attention output and per-row log-sum-exp in one pass (pass 1).

    Args:
        q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]`` (``H % Hkv == 0``, GQA).
        mask: None, bool (True = attend) or additive float, broadcastable to ``[B, 1|H, Lq, Lk]``.
        causal: bottom-right aligned causal mask (row ``i`` sees keys ``<= i + Lk - Lq``; a decode row sees all).
        scaling: logit scale; None = ``D ** -0.5``.
        modulations: :class:`Modulation` or a sequence of them (see its docstring).
        return_lse: also return the LSE (otherwise the second item is None).
        segments: optional ``[(start, end), ...]`` key ranges (at most 4 on the Triton path): adds the per-row mass
            of the modulated softmax on each range as a third output.
    Returns:
        ``(out [B, H, Lq, Dv] in q.dtype, lse [B, H, Lq] fp32 natural log)``, plus ``mass [B, H, Lq, S] fp32`` when
        ``segments`` is given. On the Triton path ``out`` is a view of ``[B, Lq, H, Dv]`` memory, so
        ``out.transpose(1, 2)`` (transformers' layout) is contiguous.
    """
    _check_qkv(q, k, v)
    scaling = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    m = _check_mask(mask, q, k)
    table = resolve_modulations(modulations, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q.device)
    segs = _check_segments(segments, k.shape[2])
    choice = select_backend(q, k, v, mask=m, table=table, segments=segs)
    if choice.backend == "triton":
        from vlmkit.kernels import triton_attn

        out, lse, mass = triton_attn.forward(q, k, v, mask=m, causal=bool(causal), scaling=scaling, table=table,
                                             segments=segs, return_lse=return_lse)
    else:
        out, lse, mass = torch_ref.attention(q, k, v, mask=m, causal=bool(causal), scaling=scaling, table=table,
                                             return_lse=return_lse, segments=segs)
    return (out, lse, mass) if segments is not None else (out, lse)


def row_probs(q, k, lse, rows, cols, *, mask=None, causal: bool, scaling: float | None = None, modulations=(),
              row_weights=None, weighted: bool = False) -> torch.Tensor:
    """Exact softmax probabilities of chosen rows onto chosen key columns, from pass 1's LSE (pass 2).

    Args:
        q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]``; lse: ``[B, H, Lq]`` from :func:`attention` with the *same*
            mask, causal flag, scaling and modulations.
        rows: int ``[R]`` or ``[B, R]`` query indices in ``[0, Lq)``; cols: int ``[C]`` or ``[B, C]`` key indices in
            ``[0, Lk)``. ``-1`` marks a padding slot (its probabilities are 0), for ragged batches.
        row_weights: None, or ``[R]`` / ``[B, R]``: return ``sum_r w_r P[r, c]`` instead of the per-row map.
            The reduction is deterministic (fixed order, no atomics).
        weighted: multiply by the non-renormalised post-softmax weights of ``modulations`` (the effective weights
            in ``P @ V``) instead of returning the softmax probabilities.
    Returns:
        fp32 ``[B, H, R, C]``, or ``[B, H, C]`` with ``row_weights``.
    """
    _check_qkv(q, k, None)
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (b, h, lq):
        raise InputError(f"lse must be [B, H, Lq] = [{b}, {h}, {lq}], got "
                         f"{tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__}")
    scaling = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    rows = _check_index(rows, "rows", b, lq, q.device)
    cols = _check_index(cols, "cols", b, lk, q.device)
    if row_weights is not None:
        w = torch.as_tensor(row_weights, device=q.device)
        if not w.is_floating_point():
            w = w.float()
        w = w[None].expand(b, -1) if w.dim() == 1 else w
        if tuple(w.shape) != tuple(rows.shape):
            raise InputError(f"row_weights {tuple(w.shape)} must be [R] or [B, R] like rows {tuple(rows.shape)}")
        row_weights = w.float()
    m = _check_mask(mask, q, k)
    table = resolve_modulations(modulations, (b, h, lq, lk), q.device)
    choice = select_backend(q, k, None, mask=m, table=table)
    if choice.backend == "triton":
        from vlmkit.kernels import triton_probs

        return triton_probs.row_probs(q, k, lse, rows, cols, mask=m, causal=bool(causal), scaling=scaling,
                                      table=table, row_weights=row_weights, weighted=weighted)
    return torch_ref.row_probs(q, k, lse, rows, cols, mask=m, causal=bool(causal), scaling=scaling, table=table,
                               row_weights=row_weights, weighted=weighted)
