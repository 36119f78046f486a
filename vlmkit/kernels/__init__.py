"""Exact attention with tracked weights: a fused forward that keeps the log-sum-exp (pass 1) and an exact recompute
of chosen rows x columns from it (pass 2), with optional in-kernel modulation.

    out, lse = attention(q, k, v, mask=mask, causal=True, scaling=s, modulations=[Modulation(...)])
    probs = row_probs(q, k, lse, rows, cols, mask=mask, causal=True, scaling=s, modulations=[...])   # [B, H, R, C]

Triton kernels run on CUDA tensors, PyTorch everywhere else (``VLMKIT_KERNEL=triton|torch`` forces one). Importing
this package never imports Triton.

As a transformers attention function (``query [B, H, Lq, D]``, ``key/value [B, Hkv, Lk, D]``, the mask transformers
built, bool or additive, or None)::

    out, lse = attention(query, key, value, mask=attention_mask, causal=is_causal, scaling=scaling,
                         modulations=mods, return_lse=capturing)
    maps = row_probs(query, key, lse, rows, cols, mask=attention_mask, causal=is_causal, scaling=scaling,
                     modulations=mods)                      # [B, H, R, C] fp32; rows/cols may be [B, n], -1 = pad
    return out.transpose(1, 2), None                        # [B, Lq, H, D]; contiguous on the Triton path

``causal`` is bottom-right aligned, so it may be passed together with a mask that already encodes causality.
"""

from vlmkit.kernels._dispatch import (ENV, KernelChoice, attention, interpreting, requested_backend, row_probs,
                                      select_backend)
from vlmkit.kernels.torch_ref import ModTable, Modulation, resolve_modulations

__all__ = ["ENV", "KernelChoice", "ModTable", "Modulation", "attention", "interpreting", "requested_backend",
           "resolve_modulations", "row_probs", "select_backend"]
