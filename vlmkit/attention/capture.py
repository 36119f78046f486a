"""Exact attention capture: the :class:`Recorder` that the ``"vlmkit"`` attention backend feeds.

While a capture is active the layer output still comes from SDPA (answers do not change) and exact softmax
probabilities are recomputed only for the requested query rows onto the image-token columns: memory is
``O(layers x heads x rows x image_tokens)``, never ``O(N^2)`` per layer. When an intervention edits a layer, the
recorded probabilities are the edited ones the model actually used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlmkit.attention.maps import AttentionMaps
from vlmkit.models._layout import Layout

ROW_MODES = ("last", "prompt_text", "generated")


def _padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Stack ragged int64 index lists into ``[B, n]`` padded with -1."""
    n = max([len(p) for p in parts] + [0])
    out = torch.full((len(parts), n), -1, dtype=torch.long)
    for b, p in enumerate(parts):
        out[b, :len(p)] = torch.as_tensor(p, dtype=torch.long)
    return out


@dataclass
class _Row:
    """Capture plan for one batch row (positions are in padded coordinates)."""

    pad: int
    rows: torch.Tensor  # int64 [R] prompt rows to capture in the prefill
    cols: torch.Tensor  # int64 [C] image-token columns
    decode: bool


class Recorder:
    """One capture request: which layers and rows, and the :class:`AttentionMaps` recorded so far.

    Use through :meth:`vlmkit.VLM.capture`. ``rows``: ``"last"`` (last prompt row + each decode step), ``"prompt_text"``
    (every text row of the prompt), ``"generated"`` (decode steps only) or explicit prompt positions.
    """

    def __init__(self, num_layers: int, layers=None, rows="last") -> None:
        if isinstance(rows, str) and rows not in ROW_MODES:
            raise ValueError(f"rows={rows!r}: use one of {ROW_MODES} or a list of prompt positions")
        if layers is None:
            self.layers = list(range(num_layers))
        else:
            layers = [layers] if isinstance(layers, int) else list(layers)
            bad = [l for l in layers if not -num_layers <= l < num_layers]
            if bad:
                raise ValueError(f"layers {bad} out of range for a {num_layers}-layer language model")
            self.layers = sorted({l % num_layers for l in layers})
        self.rows = rows if isinstance(rows, str) else [int(r) for r in rows]
        self.samples: list[AttentionMaps] = []
        self._plan: list[_Row] = []
        self._prefill: dict[int, list[torch.Tensor]] = {}
        self._decode: dict[int, list[torch.Tensor]] = {}
        self._meta: list[tuple[Layout, list[str], np.ndarray]] = []

    # ------------------------------------------------------------------ results
    @property
    def maps(self) -> AttentionMaps:
        """The maps of the single recorded sample (use :attr:`samples` after batched or repeated calls)."""
        if len(self.samples) != 1:
            raise ValueError(f"{len(self.samples)} samples were recorded; use rec.samples[i]")
        return self.samples[0]

    # ------------------------------------------------------------------ planning
    def begin(self, input_ids: torch.Tensor, layouts: list[Layout], pads: list[int],
              tokens: list[list[str]]) -> None:
        """Plan one batch: ``input_ids [B, N]`` left-padded, each sample's layout (unpadded positions) and pad."""
        n = input_ids.shape[1]
        self._plan, self._meta = [], []
        self._prefill = {l: [] for l in self.layers}
        self._decode = {l: [] for l in self.layers}
        for b, (layout, pad) in enumerate(zip(layouts, pads)):
            img = layout.positions
            length = n - pad
            if self.rows == "last":
                rows = np.array([length - 1])
            elif self.rows == "generated":
                rows = np.zeros(0, dtype=np.int64)
            elif self.rows == "prompt_text":
                rows = np.setdiff1d(np.arange(length), img)
            else:
                rows = np.asarray(self.rows, dtype=np.int64)
                rows = np.where(rows < 0, rows + length, rows)
                if rows.size and (rows.min() < 0 or rows.max() >= length):
                    raise ValueError(f"rows {self.rows} out of range for a prompt of {length} tokens")
            self._plan.append(_Row(pad, torch.as_tensor(rows + pad), torch.as_tensor(img + pad),
                                   self.rows in ("last", "generated")))
            self._meta.append((layout, tokens[b], rows))

    def wants(self, layer: int) -> bool:
        return layer in self._prefill

    def record(self, layer: int, step: int, lq: int, probs_fn) -> None:
        """Called by the backend for every attention call on a captured layer. ``probs_fn(rows [B, R], cols [B, C])``
        (-1 = padding slot) returns, per sample, the exact probabilities ``[H, R_b, C_b]`` the model used."""
        if step == 0:
            rows = _padded([p.rows for p in self._plan])
        else:
            rows = _padded([torch.tensor([lq - 1] if p.decode else [], dtype=torch.long) for p in self._plan])
        probs = probs_fn(rows, _padded([p.cols for p in self._plan]))
        if step == 0:
            self._prefill[layer].append([p.float().cpu() for p in probs])
        else:
            self._decode[layer].append([p[:, 0].float().cpu() if plan.decode else None
                                        for p, plan in zip(probs, self._plan)])

    def finish(self, generated: list[list[str]]) -> list[AttentionMaps]:
        """Assemble one :class:`AttentionMaps` per sample; ``generated[b]`` are the sample's answer tokens."""
        new = []
        for b, (layout, tokens, rows) in enumerate(self._meta):
            prefill = torch.stack([self._prefill[l][0][b] for l in self.layers])  # [L, H, R, C]
            steps = max(len(generated[b]) - 1, 0) if self._plan[b].decode else 0
            steps = min([steps] + [len(self._decode[l]) for l in self.layers])
            if steps:
                decode = torch.stack([torch.stack([self._decode[l][s][b] for l in self.layers])
                                      for s in range(steps)])  # [S, L, H, C]
            else:
                decode = prefill.new_zeros(0, *prefill.shape[:2], prefill.shape[-1])
            new.append(AttentionMaps(prefill=prefill, decode=decode, layers=list(self.layers),
                                     rows=[int(r) for r in rows], layout=layout, tokens=list(tokens),
                                     generated=list(generated[b])))
        self.samples.extend(new)
        self._plan, self._meta, self._prefill, self._decode = [], [], {}, {}
        return new
