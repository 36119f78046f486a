"""VCD — visual contrastive decoding against a noised image (baseline), and the second-branch machinery it shares
with PAI's text-only CFG.

At every decoding step the model also scores the next token for the same prompt with a diffusion-noised copy of the
image (its own incremental forward with its own KV cache); the logits become
``l + α·(l − l_noised)`` (= ``(1+α)·l − α·l_noised``), and tokens whose probability under the clean branch is
below ``β · max prob`` (the adaptive plausibility cutoff ``log β + max l``) are removed. Greedy decoding stays greedy
(argmax of the contrasted logits); sampling samples from them. ``alpha=0, beta=0`` is exactly neutral.

Noise follows a 1000-step diffusion forward process with a sigmoid β schedule:
``x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε`` on the processor's normalised pixel values (an element-wise operation, so
it is the same for LLaVA's image tensors and Qwen's flattened patches). ``noise_step=0`` keeps the clean image.

Branch forwards run as plain attention: no capture records them and no intervention edits them.
"""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor

from vlmkit.attention.hooks import Intervention, register_intervention
from vlmkit.errors import InputError, VlmkitError

NUM_DIFFUSION_STEPS = 1000


def noise_schedule(num_steps: int = NUM_DIFFUSION_STEPS) -> torch.Tensor:
    """float64 ``[num_steps + 1]``: ``ᾱ_t`` for ``t = 0..num_steps`` (``ᾱ_0 = 1``) of a sigmoid β schedule rising
    from 1e-5 to 5e-3."""
    betas = torch.sigmoid(torch.linspace(-6.0, 6.0, num_steps, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, dim=0)])


def add_diffusion_noise(pixels: torch.Tensor, step: int, seed: int = 0) -> torch.Tensor:
    """``pixels`` (any shape, normalised) noised to diffusion step ``step`` in ``[0, 1000]``; deterministic in
    ``seed`` (noise drawn on the CPU)."""
    if not 0 <= int(step) <= NUM_DIFFUSION_STEPS:
        raise InputError(f"noise_step {step}: use an integer in [0, {NUM_DIFFUSION_STEPS}]")
    abar = float(noise_schedule()[int(step)])
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    eps = torch.randn(pixels.shape, generator=gen, dtype=torch.float32).to(pixels.device)
    return (math.sqrt(abar) * pixels.float() + math.sqrt(1.0 - abar) * eps).to(pixels.dtype)


class Branch:
    """A second decoding stream over the same model with its own KV cache and cached model state.

    The first :meth:`step` prefills the branch's own ``inputs`` (its prompt may differ from the main one); each later
    step feeds the token the main generation just chose. Only plain incremental decoding is supported: the main
    ``input_ids`` must grow by exactly one token per call with the same batch size (no beam search).
    """

    def __init__(self, vlm, inputs: dict) -> None:
        self.vlm = vlm
        self.inputs = dict(inputs)
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.state: dict | None = None
        self.main_len: int | None = None

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """float32 ``[B, vocab]`` branch logits for the next token after the main ``input_ids [B, N + s]``."""
        batch = self.inputs["input_ids"].shape[0]
        if input_ids.shape[0] != batch:
            raise VlmkitError(f"contrastive branch: the main generation has {input_ids.shape[0]} rows for {batch} "
                              "prompts; beam search and num_return_sequences > 1 are not supported")
        adapter, model = self.vlm.adapter, self.vlm.model
        if self.cache is None:
            feed = dict(self.inputs)
            mask = feed.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(feed["input_ids"])
                feed["attention_mask"] = mask
        else:
            if input_ids.shape[1] != self.main_len + 1:
                raise VlmkitError("contrastive branch: the main sequence must grow by one token per step "
                                  f"(was {self.main_len}, now {input_ids.shape[1]}); beam search is not supported")
            mask = torch.cat([self.mask, self.mask.new_ones(batch, 1)], dim=1)
            feed = {"input_ids": input_ids[:, -1:], "attention_mask": mask}
        saved = adapter.swap_state(self.state)
        try:
            if self.cache is not None:
                pos = adapter.branch_position_ids(mask)
                if pos is not None:
                    feed["position_ids"] = pos
            with self.vlm.isolated(), torch.inference_mode():
                out = model(**feed, cache=self.cache, use_cache=True)
        finally:
            self.state = adapter.swap_state(saved)
        self.cache, self.mask, self.main_len = out.cache, mask, input_ids.shape[1]
        return out.logits[:, -1].float()


class ContrastiveLogits(LogitsProcessor):
    """``transformers`` logits processor: ``l + α·(l − l_branch)`` with the plausibility cutoff ``log β + max l``.

    Holds the :class:`Branch` (and so its KV cache). ``last`` keeps the latest branch logits for inspection.
    """

    def __init__(self, branch: Branch, alpha: float, beta: float = 0.0) -> None:
        self.branch, self.alpha, self.beta = branch, float(alpha), float(beta)
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        other = self.branch.step(input_ids).to(scores.device)
        self.last = other
        finite = torch.isfinite(scores)
        out = torch.where(finite, scores + self.alpha * (scores - other.to(scores.dtype)), scores)
        if self.beta > 0:
            cutoff = math.log(self.beta) + scores.max(dim=-1, keepdim=True).values
            out = out.masked_fill(scores < cutoff, float("-inf"))
        return out


@register_intervention("vcd")
class VCD(Intervention):
    """Visual contrastive decoding against a diffusion-noised copy of the image.

    Args:
        alpha: contrast strength (VCD's default 1; 0 is neutral).
        beta: plausibility cutoff (keep tokens with ``p ≥ β · max p`` under the clean image; 0 disables it).
        noise_step: diffusion step of the noised image in ``[0, 1000]`` (VCD's 500; 0 = clean image).
        seed: seed of the image noise.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.1, noise_step: int = 500, seed: int = 0) -> None:
        super().__init__(layers=[])  # no attention edits
        if alpha < 0 or not 0 <= beta < 1:
            raise InputError(f"vcd: alpha must be >= 0 and beta in [0, 1) (got alpha={alpha}, beta={beta})")
        if not 0 <= int(noise_step) <= NUM_DIFFUSION_STEPS:
            raise InputError(f"vcd: noise_step {noise_step} outside [0, {NUM_DIFFUSION_STEPS}]")
        self.alpha, self.beta, self.noise_step, self.seed = float(alpha), float(beta), int(noise_step), int(seed)

    def params(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "noise_step": self.noise_step, "seed": self.seed}

    def processors(self, vlm, batch, inputs) -> list:
        if inputs.get("pixel_values") is None:
            raise InputError("vcd needs an image in every prompt (no pixel_values in the inputs)")
        noised = dict(inputs)
        noised["pixel_values"] = add_diffusion_noise(inputs["pixel_values"], self.noise_step, self.seed)
        return [ContrastiveLogits(Branch(vlm, noised), self.alpha, self.beta)]
