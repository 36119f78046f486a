"""PAINT ("Fixing Imbalanced Attention"): boost the LLM's attention to *informed* image tokens.

Tokens are chosen once per image from the vision tower's own attention (question-independent):

* **summary tokens** — scores ``s_sum`` from the CLS row of the vision feature layer (summed over heads); the number
  kept is the count of Tukey outliers ``s_sum > Q3 + 1.5·IQR``, and the kept tokens are the top ones by ``s_sum``;
* **local tokens** — the top ``local_ratio`` (25%) by the CLS row of the first ViT layer, minus the summary tokens;
  optionally united with a "spatial" stream, the top ``spatial_ratio`` by mean attention *received* in the first layer
  (the released code's row sums are degenerate; column sums are our interpretation; off by default).

On the chosen LLM layers (default: the papers' 2..31 of 32 as fractions of depth), the pre-softmax logit of the last
query row becomes ``z + α|z|`` on local and ``z + β|z|`` on summary columns; masked entries stay masked. The edit
machinery, the ``edit_from`` option and the optional head-specific modulation (our interpretation of the v1 abstract;
the released code has none) are those of :class:`~vlmkit.methods.pai.RowBoost`.

Towers without a CLS token (Qwen2-VL / 2.5-VL) use the documented substitute of
:meth:`~vlmkit.models._adapter.FamilyAdapter.vision_token_scores`: mean attention received per patch, pooled over the
2×2 merge window of each LLM token. Scores are always pooled to the LLM token grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlmkit.errors import InputError, VlmkitError
from vlmkit.methods.pai import DEFAULT_LAYERS, RowBoost
from vlmkit.attention.hooks import register_intervention


@dataclass
class TokenSelection:
    """Tokens chosen for one image, as sorted int64 indices into its LLM token grid (row-major, views in order)."""

    local: torch.Tensor
    summary: torch.Tensor
    fence: float  # the Tukey fence Q3 + k·IQR of the summary scores


def tukey_outliers(scores: torch.Tensor, k: float = 1.5) -> tuple[torch.Tensor, float]:
    """Indices (sorted) of the top-``n`` entries of ``scores [T]`` where ``n = #{s > Q3 + k·IQR}``, and the fence."""
    s = scores.double().flatten()
    if s.numel() == 0:
        return torch.zeros(0, dtype=torch.long), float("nan")
    q1, q3 = torch.quantile(s, torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    fence = q3 + k * (q3 - q1)
    n = int((s > fence).sum())
    return torch.sort(torch.topk(s, n).indices).values, fence


def select_tokens(local_scores: torch.Tensor, summary_scores: torch.Tensor, local_ratio: float = 0.25,
                  spatial_scores: torch.Tensor | None = None, spatial_ratio: float = 0.0,
                  iqr_k: float = 1.5) -> TokenSelection:
    """PAINT's dual-stream selection for one image; all score tensors are ``[T]`` over the image's LLM tokens.

    Summary = Tukey outliers of ``summary_scores``; local = (top ``round(local_ratio·T)`` of ``local_scores`` ∪ top
    ``round(spatial_ratio·T)`` of ``spatial_scores``) minus summary.
    """
    t = int(local_scores.numel())
    if summary_scores.numel() != t or (spatial_scores is not None and spatial_scores.numel() != t):
        raise InputError(f"select_tokens: score vectors differ in length ({t}, {summary_scores.numel()}"
                         f"{'' if spatial_scores is None else ', ' + str(spatial_scores.numel())})")
    if not 0.0 <= local_ratio <= 1.0 or not 0.0 <= spatial_ratio <= 1.0:
        raise InputError(f"select_tokens: ratios must lie in [0, 1] (local {local_ratio}, spatial {spatial_ratio})")
    summary, fence = tukey_outliers(summary_scores, iqr_k)
    local = set(torch.topk(local_scores.double().flatten(), int(round(local_ratio * t))).indices.tolist())
    if spatial_scores is not None and spatial_ratio > 0:
        local |= set(torch.topk(spatial_scores.double().flatten(), int(round(spatial_ratio * t))).indices.tolist())
    local -= set(summary.tolist())
    return TokenSelection(torch.tensor(sorted(local), dtype=torch.long), summary, fence)


@register_intervention("paint")
class PAINT(RowBoost):
    """Boost local (``α``) and summary (``β``) image tokens on the last query row of the chosen LLM layers.

    Args:
        alpha: boost of local tokens (paper code: 0.7; 0 is neutral).
        beta: boost of summary tokens (paper code: 0.3; 0 is neutral).
        local_ratio: fraction of image tokens in the local stream (0.25).
        spatial_ratio: fraction taken from the "spatial" stream (0: off, as in the released code).
        vit_local_layer: vision layer of the local stream (0, the first).
        vit_summary_layer: vision layer of the summary stream (``"feature"``: the layer the LLM reads, LLaVA's −2).
        iqr_k: Tukey fence multiplier (1.5).
        layers, edit_from, head_modulation: see :class:`~vlmkit.methods.pai.RowBoost`.

    After a call, :attr:`selection` holds the chosen tokens (per sample, per image).
    """

    def __init__(self, alpha: float = 0.7, beta: float = 0.3, local_ratio: float = 0.25, spatial_ratio: float = 0.0,
                 vit_local_layer: int | str = 0, vit_summary_layer: int | str = "feature", iqr_k: float = 1.5,
                 layers=DEFAULT_LAYERS, edit_from: int | None = None, head_modulation: float = 0.0) -> None:
        super().__init__(layers, edit_from, head_modulation)
        if alpha < 0 or beta < 0:
            raise InputError(f"paint: alpha and beta must be >= 0 (got {alpha}, {beta})")
        self.alpha, self.beta = float(alpha), float(beta)
        self.local_ratio, self.spatial_ratio, self.iqr_k = float(local_ratio), float(spatial_ratio), float(iqr_k)
        self.vit_local_layer, self.vit_summary_layer = vit_local_layer, vit_summary_layer
        self._selection: list[list[TokenSelection]] = []

    @property
    def selection(self) -> list[list[TokenSelection]]:
        """Tokens chosen in the latest call: ``selection[sample][image]``."""
        return self._selection

    def column_weights(self, vlm, batch, inputs) -> torch.Tensor:
        adapter = vlm.adapter
        local_key, summary_key = self.vit_local_layer, self.vit_summary_layer
        scores = adapter.vision_token_scores(inputs, list(dict.fromkeys([local_key, summary_key])), kind="auto")
        spatial = None
        if self.spatial_ratio > 0:
            spatial = adapter.vision_token_scores(inputs, [local_key], kind="received")[local_key]
        weights = torch.zeros(len(batch.layouts), batch.prompt_len, dtype=torch.float32)
        selections, index = [], 0
        for b, layout in enumerate(batch.layouts):
            chosen = []
            for image in layout.images:
                cols = torch.as_tensor(np.concatenate([v.positions for v in image.views]) + batch.pads[b])
                if index >= len(scores[local_key]):
                    raise VlmkitError(f"paint: the vision tower returned {len(scores[local_key])} images' scores, "
                                      "fewer than the prompts hold")
                loc, summ = scores[local_key][index], scores[summary_key][index]
                if loc.numel() != cols.numel():
                    raise VlmkitError(f"paint: {loc.numel()} vision-token scores for an image with {cols.numel()} "
                                      f"grid tokens ({vlm.family}); the adapter's vision read and layout disagree")
                sel = select_tokens(loc, summ, self.local_ratio, None if spatial is None else spatial[index],
                                    self.spatial_ratio, self.iqr_k)
                weights[b, cols[sel.local]] = self.alpha
                weights[b, cols[sel.summary]] = self.beta
                chosen.append(sel)
                index += 1
            selections.append(chosen)
        self._selection = selections
        return weights
