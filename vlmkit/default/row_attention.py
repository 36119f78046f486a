"""Stage-B attention of the default model's recipe: SDPA for every row, exact probabilities for a few rows.

The attention loss of :mod:`vlmkit.default.train` needs, in a few language-model layers, only the attention that the
rows predicting answers pay to the 64 image tokens. Those probabilities are recomputed from the rows' queries and
all keys (same mask as SDPA): ``[Q, H, L]`` scores instead of eager attention's ``[B, H, L, L]`` probabilities (and
their backward) in every layer. The layer outputs come from SDPA as usual.

:func:`packed_tokens` runs the language model on the real tokens of a right-padded batch only (``[1, T, D]``
hidden states, no padding rows through the projections and MLPs); each layer's attention scatters its queries, keys
and values back to the padded ``[B, H, L, D]`` layout, runs there exactly as above and gathers the ``T`` output rows.

Usage (the language model must run with :data:`NAME` as its attention implementation, :func:`register`)::

    with image_rows(lm, layers=(1, 2), batch=bi, rows=ri, cols=slice(2, 66)) as probs:
        lm(inputs_embeds=..., attention_mask=...)
    probs[1]        # [Q, H, 64]: attention of query row ri[q] of sample bi[q] on the image columns, layer 1
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

NAME = "vlmkit_rows"


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               **kwargs):
    """``query [B, H, L, D]``, ``key/value [B, H_kv, L, D]`` -> (SDPA output ``[B, L, H, D]``, None); records the
    requested rows' probabilities on the requested columns when a request is attached to ``module``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vlmkit.attention.backend import allowed_mask

    pack = getattr(module, "_vlmkit_pack", None)
    if pack is not None:                      # [1, H, T, D] packed tokens -> [B, H, L, D] padded layout
        index, (nb, nl) = pack
        query, key, value = (_unpack(t, index, nb, nl) for t in (query, key, value))
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    **kwargs)
    req = getattr(module, "_vlmkit_rows", None)
    if req is not None:
        bi, ri, cols, store = req
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        # index_select, not advanced indexing: its backward (index_add) is deterministic on a multi-threaded CPU,
        # while the backward of key[bi] (index_put with accumulate) made 2-thread training runs differ in the last bits
        b, h, lq, d = query.shape
        k = key.index_select(0, bi)                                           # [Q, H_kv, L, D]
        if k.shape[1] != h:
            k = k.repeat_interleave(h // k.shape[1], dim=1)                   # [Q, H, L, D]
        q = query.transpose(1, 2).reshape(b * lq, h, d).index_select(0, bi * lq + ri)   # [Q, H, D]
        scores = torch.einsum("qhd,qhld->qhl", q.float(), k.float()) * scale  # [Q, H, L]
        lk = key.shape[2]
        ok = allowed_mask(attention_mask, lq, lk, getattr(module, "is_causal", True), query.device)
        ok = ok[bi if ok.shape[0] > 1 else torch.zeros_like(bi), 0, ri]       # [Q, L]
        probs = scores.masked_fill(~ok[:, None], float("-inf")).softmax(-1)  # [Q, H, L]
        store[module.layer_idx] = probs[:, :, cols]
    if pack is not None:                      # [B, L, H, D] -> the packed tokens' rows [1, T, H, D]
        out = out.reshape(nb * nl, *out.shape[2:]).index_select(0, index).unsqueeze(0)
    return out, None


def _unpack(t: torch.Tensor, index: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """``[1, H, T, D]`` packed rows -> ``[B, H, L, D]`` with row ``index[i]`` (flat ``b * L + l``) = packed row ``i``
    and zeros at padding (index_copy: its backward is index_select, deterministic)."""
    rows = t[0].transpose(0, 1)                                               # [T, H, D]
    full = rows.new_zeros(b * length, *rows.shape[1:]).index_copy(0, index, rows)
    return full.view(b, length, *rows.shape[1:]).transpose(1, 2)


def register() -> str:
    """Register :data:`NAME` with transformers' attention and mask registries (idempotent); returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


@contextmanager
def packed_tokens(language_model, index: torch.Tensor, shape: tuple[int, int]):
    """Inside the block the language model takes packed inputs: ``inputs_embeds [1, T, D]`` holding the tokens at
    flat positions ``index [T]`` (``b * L + l``) of a right-padded batch of ``shape`` (B, L), ``position_ids [1, T]``
    (each token's position in its own sequence) and the padded batch's 4-D ``attention_mask [B, 1, L, L]``; its
    output rows are those tokens'. Every layer's attention runs in the padded layout (so :func:`image_rows` rows and
    the mask keep their padded coordinates). The modules are restored on exit, also on error."""
    with _attached([layer.self_attn for layer in language_model.layers], "_vlmkit_pack", (index, tuple(shape))):
        yield


@contextmanager
def image_rows(language_model, layers, batch, rows, cols: slice):
    """Record, for every layer in ``layers``, the softmax over columns ``cols`` of the query rows
    ``(batch[q], rows[q])`` (index tensors ``[Q]``) during the forwards inside the block. Yields a dict
    ``{layer: [Q, H, C]}`` filled by them; the modules are restored on exit, also on error."""
    store: dict[int, torch.Tensor] = {}
    with _attached([language_model.layers[i].self_attn for i in layers], "_vlmkit_rows", (batch, rows, cols, store)):
        yield store


@contextmanager
def _attached(modules, name: str, value):
    """Set attribute ``name`` = ``value`` on every module for the block; removed on exit, also on error."""
    try:
        for m in modules:
            setattr(m, name, value)
        yield
    finally:
        for m in modules:
            if hasattr(m, name):
                delattr(m, name)
