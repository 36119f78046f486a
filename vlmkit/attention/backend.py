"""The ``"vlmkit"`` attention backend registered with transformers, and the per-VLM state it consults.

With no state on a module the backend *is* SDPA. A :class:`AttentionState` is attached to the language model's
attention modules only while a capture or an intervention is active (:meth:`AttentionState.attached`, a context
manager that always detaches it). Rows that an intervention edits are recomputed exactly in fp32 with the edits
applied and replace SDPA's rows; every other row keeps SDPA's output.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from vlmkit.attention.hooks import Batch, Intervention, Site

BACKEND = "vlmkit"


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def vlmkit_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs):
    """Registered attention function. Shapes: ``query [B, H, Lq, D]``, ``key/value [B, H_kv, Lk, D]``;
    returns ``([B, Lq, H, D], None)``."""
    state = getattr(module, "_vlmkit", None)
    if state is None:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return state.attend(module, query, key, value, attention_mask, scaling, causal, dropout, kwargs)


def register_backend() -> str:
    """Register the ``"vlmkit"`` attention function and its mask builder with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(BACKEND, vlmkit_attention)
    AttentionMaskInterface.register(BACKEND, sdpa_mask)
    return BACKEND


def allowed_mask(mask: torch.Tensor | None, lq: int, lk: int, causal: bool, device) -> torch.Tensor:
    """bool ``[B|1, 1|H, Lq, Lk]``: which keys each query row may attend (SDPA's semantics for ``mask=None``)."""
    if mask is not None:
        return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if causal and lq > 1:
        return (torch.arange(lk, device=device)[None, :] <= torch.arange(lq, device=device)[:, None])[None, None]
    return torch.ones(1, 1, lq, lk, dtype=torch.bool, device=device)


def edited_rows(query, key, value, allowed, scaling, site: Site, rows: torch.Tensor,
                edits: list[Intervention]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query rows ``rows [R]`` with ``edits`` applied, in fp32.

    Returns ``(out [B, H, R, D], probs [B, H, R, Lk])``.
    """
    rep = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(rep, dim=1) if rep > 1 else key.float()
    v = value.float().repeat_interleave(rep, dim=1) if rep > 1 else value.float()
    ok = allowed[:, :, rows] if allowed.shape[2] > 1 else allowed
    scores = torch.matmul(query[:, :, rows].float(), k.transpose(-1, -2)) * scaling  # [B, H, R, Lk]
    scores = scores.masked_fill(~ok, float("-inf"))
    for e in edits:
        scores = e.logits(site, scores, ok, rows)
    scores = scores.masked_fill(~ok, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    for e in edits:
        probs = e.probs(site, probs, ok, rows)
    probs = probs.masked_fill(~ok, 0.0)
    return torch.matmul(probs, v), probs


def _modulations(edits: list[Intervention], site: Site):
    """The edits as kernel :class:`~vlmkit.kernels.Modulation` s, or None if any edit cannot be expressed so."""
    mods = []
    for e in edits:
        m = e.modulations(site)
        if m is None:
            return None
        mods.extend(m)
    return mods


class AttentionState:
    """What one VLM's backend calls see: the active recorder, interventions and the current :class:`Batch`."""

    def __init__(self) -> None:
        self.recorder = None
        self.interventions: list[Intervention] = []
        self.batch: Batch | None = None

    @property
    def active(self) -> bool:
        return self.recorder is not None or bool(self.interventions)

    def attend(self, module, query, key, value, mask, scaling: float, causal: bool, dropout: float, kwargs):
        layer = module.layer_idx
        batch = self.batch
        if batch is None:  # a forward outside VLM.generate: behave as plain SDPA
            return _sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=causal,
                         **kwargs)
        step = batch.calls.get(layer, 0)
        batch.calls[layer] = step + 1
        lq, lk = query.shape[2], key.shape[2]
        site = Site(layer, step, batch, torch.arange(lk - lq, lk), lk, module)
        edits = [iv for iv in self.interventions if layer in iv.layers]
        attn_edits = [iv for iv in edits if iv.edits_attention]
        mods = _modulations(attn_edits, site)
        rec = self.recorder if self.recorder is not None and self.recorder.wants(layer) else None
        if attn_edits and mods is None:
            # generic edits: SDPA for every row, the edited rows recomputed exactly in fp32 and swapped in
            out, _ = _sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=causal,
                           **kwargs)
            allowed = allowed_mask(mask, lq, lk, causal, query.device)
            touched = torch.zeros(lq, dtype=torch.bool)
            for e in attn_edits:
                r = e.rows(site)
                touched |= torch.ones(lq, dtype=torch.bool) if r is None else r.cpu()
            rows = torch.nonzero(touched).flatten().to(query.device)
            if rows.numel():
                new, _ = edited_rows(query, key, value, allowed, scaling, site, rows, attn_edits)
                out = out.clone()
                out[:, rows] = new.transpose(1, 2).to(out.dtype)

            def probs_fn(rows, cols):  # rows/cols [B, n], -1 = padding slot
                res = []
                for b in range(query.shape[0]):
                    r, c = rows[b][rows[b] >= 0], cols[b][cols[b] >= 0]
                    res.append(edited_rows(query, key, value, allowed, scaling, site, r, attn_edits)[1][b][:, :, c])
                return res
        elif rec is not None or mods:
            # the kernel dispatch: Triton on CUDA, PyTorch elsewhere; modulations applied inside pass 1 and 2
            from vlmkit.kernels import attention as fused, row_probs

            o, lse = fused(query, key, value, mask=mask, causal=causal and lq > 1, scaling=scaling,
                           modulations=mods or (), return_lse=rec is not None)
            out = o.transpose(1, 2)

            def probs_fn(rows, cols):
                p = row_probs(query, key, lse, rows, cols, mask=mask, causal=causal and lq > 1, scaling=scaling,
                              modulations=mods or ())
                return [p[b][:, rows[b] >= 0][:, :, cols[b] >= 0] for b in range(query.shape[0])]
        else:
            out, _ = _sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=causal,
                           **kwargs)
            probs_fn = None
        if rec is not None:
            rec.record(layer, step, lq, probs_fn)
        for e in edits:
            out = e.heads(site, out)
        return out, None

    @contextmanager
    def attached(self, modules: list[torch.nn.Module], decoder_layers: list[torch.nn.Module] | None = None):
        """Attach this state to ``modules`` (and residual pre-hooks to ``decoder_layers``) for the block."""
        handles = []
        try:
            for m in modules:
                m._vlmkit = self
            for i, layer in enumerate(decoder_layers or []):
                handles.append(layer.register_forward_pre_hook(self._residual_hook(i), with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()
            for m in modules:
                if hasattr(m, "_vlmkit"):
                    del m._vlmkit

    def _residual_hook(self, index: int):
        def hook(module, args, kwargs):
            if self.batch is not None:
                hidden = args[0] if args else kwargs.get("hidden_states")
                self.batch.residual[index] = hidden
        return hook
