"""PAI — uniform boost of image-token attention on the last query row (baseline), optional text-only CFG.

On the chosen LLM layers, the pre-softmax logit ``z`` of the row that predicts the next token becomes
``z + α·|z|`` for every image-token column (it always rises, whatever its sign); masked entries (padding, future
positions) stay masked. Editing only that row keeps the KV cache consistent: in cached generation each position is
edited exactly once, when it is the last row. :class:`RowBoost` is the shared mechanism; PAINT reuses it with
per-token weights.

The optional CFG contrasts with a text-only prompt (the same prompt with the image and its wrapper tokens removed)
run as a second branch with its own KV cache: ``out = l + γ·(log p − log q)`` where ``p`` and ``q`` are the softmaxes
of the image and text-only logits. Up to a per-row constant this is PAI's ``γ'·(log p − log q) + log q`` with
``γ' = 1 + γ``: PAI's default 1.1 is ``gamma=0.1`` here, and ``gamma=0`` is neutral.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from vlmkit.attention.hooks import Intervention, Site, register_intervention
from vlmkit.errors import InputError
from vlmkit.methods.vcd import Branch

DEFAULT_LAYERS = (2 / 32, 1.0)  # the papers' layers 2..31 of 32, as fractions of depth


class RowBoost(Intervention):
    """Base class: ``z ← z + w[col]·f[head]·|z|`` on the edited query rows of the chosen layers.

    Subclasses provide the column weights in :meth:`column_weights` (float ``[B, N]`` over the padded prompt).

    Args:
        layers: LLM layers (see :func:`~vlmkit.attention.hooks.resolve_layers`).
        edit_from: ``None`` edits the last query row of every attention call (what cached generation needs).
            An int ``p`` edits every query row at padded position ``>= p``: an uncached forward over the prompt plus
            the generated tokens with ``p = prompt length - 1`` reproduces cached generation.
        head_modulation: strength ``s`` in ``[0, 1]`` of the per-head modulation (our interpretation of PAINT's
            "head-specific modulation"; 0 disables it). Each head's visual sensitivity is its attention mass on
            image tokens at the first edited row of the first step (before this edit); heads are ranked within
            their layer and the boost is multiplied by ``1 + s·(2·rank/(H−1) − 1)`` — from ``1 − s`` for the least
            visual head to ``1 + s`` for the most visual one (mean 1), fixed for the rest of the generation.
    """

    edits_attention = True

    def __init__(self, layers=DEFAULT_LAYERS, edit_from: int | None = None, head_modulation: float = 0.0) -> None:
        super().__init__(layers)
        if not 0.0 <= head_modulation <= 1.0:
            raise InputError(f"head_modulation {head_modulation}: use a value in [0, 1]")
        self.edit_from = edit_from
        self.head_modulation = float(head_modulation)

    # ---------------------------------------------------------------- per-call state
    @property
    def _key(self) -> str:
        return f"{self.name}:{id(self)}"

    def column_weights(self, vlm, batch, inputs) -> torch.Tensor:
        """float32 ``[B, N]``: boost weight of each padded prompt column (0: not boosted)."""
        raise NotImplementedError

    def setup(self, vlm, batch, inputs) -> None:
        device = batch.input_ids.device
        weights = self.column_weights(vlm, batch, inputs).float().to(device)
        batch.extras[self._key] = {"weights": weights, "image": batch.image_mask(batch.prompt_len, device),
                                   "heads": {}}

    # ---------------------------------------------------------------- the edit
    def rows(self, site: Site) -> torch.Tensor:
        lq = int(site.q_pos.numel())
        if self.edit_from is None:
            rows = torch.zeros(lq, dtype=torch.bool)
            rows[-1] = True
            return rows
        return site.q_pos.cpu() >= int(self.edit_from)

    def modulations(self, site: Site):
        """The plain boost (last row, no head modulation) as a kernel modulation, so it runs inside the fused kernel:
        ``alpha`` per key column ``[B, 1, 1, Lk]`` on query rows from the last one on."""
        if self.head_modulation or self.edit_from is not None:
            return None
        from vlmkit.kernels import Modulation

        state = site.batch.extras.get(self._key)
        if state is None:
            return []
        w = state["weights"].to(site.batch.input_ids.device)
        w = torch.nn.functional.pad(w, (0, site.kv_len - w.shape[1]))[:, None, None, :]
        return [Modulation(alpha=w, row_start=int(site.q_pos[-1]))]

    def _head_factor(self, site: Site, state: dict, z: torch.Tensor, ok: torch.Tensor) -> torch.Tensor | None:
        """float32 ``[B, H, 1, 1]`` per-head multipliers (``None`` when modulation is off)."""
        if self.head_modulation == 0.0:
            return None
        heads = state["heads"]
        if site.layer not in heads:
            # first edited row of the first call that reaches this layer (step 0: the last prompt row)
            probs = torch.softmax(z[:, :, :1].masked_fill(~ok[:, :, :1], float("-inf")), dim=-1)[:, :, 0]
            image = state["image"].to(z.device)
            image = torch.nn.functional.pad(image, (0, z.shape[-1] - image.shape[1]))
            mass = (probs * image[:, None, :]).sum(-1)  # [B, H]
            h = mass.shape[1]
            rank = mass.argsort(dim=-1).argsort(dim=-1).float()
            spread = 2.0 * rank / (h - 1) - 1.0 if h > 1 else torch.zeros_like(rank)
            heads[site.layer] = (1.0 + self.head_modulation * spread)[:, :, None, None]
        return heads[site.layer].to(z.device)

    def logits(self, site: Site, scores: torch.Tensor, allowed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        state = site.batch.extras.get(self._key)
        if state is None:
            return scores
        pick = self.rows(site)[rows.cpu()].to(scores.device)  # which of the recomputed rows this edit touches
        if not bool(pick.any()):
            return scores
        z = scores[:, :, pick]  # [B, H, R', Lk]
        ok = (allowed[:, :, pick.to(allowed.device)] if allowed.shape[2] > 1 else allowed).to(z.device)
        ok = ok.expand(z.shape)
        w = state["weights"].to(z.device)
        w = torch.nn.functional.pad(w, (0, z.shape[-1] - w.shape[1]))[:, None, None, :]  # [B, 1, 1, Lk]
        factor = self._head_factor(site, state, z, ok)
        if factor is not None:
            w = w * factor
        edited = torch.where(ok, z + w * z.abs().nan_to_num(posinf=0.0), z)
        out = scores.clone()
        out[:, :, pick] = edited
        return out


class TextOnlyCFG(LogitsProcessor):
    """``transformers`` logits processor: ``l + γ·(log softmax(l) − log softmax(l_text))`` where ``l_text`` comes
    from a text-only :class:`~vlmkit.methods.vcd.Branch` (which holds its own KV cache)."""

    def __init__(self, branch: Branch, gamma: float) -> None:
        self.branch, self.gamma = branch, float(gamma)
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        text = self.branch.step(input_ids).to(scores.device)
        self.last = text
        delta = torch.log_softmax(scores.float(), dim=-1) - torch.log_softmax(text, dim=-1)
        return torch.where(torch.isfinite(scores), scores + (self.gamma * delta).to(scores.dtype), scores)


@register_intervention("pai")
class PAI(RowBoost):
    """PAI: ``z + α|z|`` on every image token of the last query row of the chosen layers; optional text-only CFG.

    Args:
        alpha: boost (PAI's 0.2; 0 is neutral).
        gamma: ``None`` — no CFG branch; a float — CFG weight (PAI's γ' = 1 + gamma, so its 1.1 is 0.1 here).
        layers, edit_from, head_modulation: see :class:`RowBoost`.
    """

    def __init__(self, alpha: float = 0.2, gamma: float | None = None, layers=DEFAULT_LAYERS,
                 edit_from: int | None = None, head_modulation: float = 0.0) -> None:
        super().__init__(layers, edit_from, head_modulation)
        if alpha < 0:
            raise InputError(f"pai: alpha must be >= 0 (got {alpha})")
        self.alpha = float(alpha)
        self.gamma = None if gamma is None else float(gamma)

    def column_weights(self, vlm, batch, inputs) -> torch.Tensor:
        return batch.image_mask(batch.prompt_len).float() * self.alpha

    def processors(self, vlm, batch, inputs) -> list:
        if self.gamma is None:
            return []
        text = vlm.adapter.strip_image(inputs["input_ids"], inputs.get("attention_mask"))
        return [TextOnlyCFG(Branch(vlm, text), self.gamma)]
