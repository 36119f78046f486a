"""VHD / VHR: vision-aware head divergence and vision-aware head reinforcement (methods.md §5).

At the first generation step VHR runs one extra forward over a batch of two branches per sample, the prompt *with*
the image and the same prompt *without* it. Layer by layer (ascending), inside that one forward, the ``heads`` hook
sees each head's output before ``o_proj`` at the last prompt position of both branches and

* ``VHD[l, h] = ||O_with[l, h] - O_without[l, h]||_2``, ``TA[l, h] = ||O_without[l, h]||^2``;
* heads with ``VHD > mean + std`` *and* ``TA > mean + std`` (over the layer's heads) get VHD 0 (outlier filter);
* the heads with VHD above the layer median are selected and scaled by ``alpha`` in both branches at once, so later
  layers are measured after earlier layers were reinforced.

Generation then scales the same fixed heads by ``alpha`` at every position of every step (prefill rows included,
which makes the prefill identical to the with-image branch of the measuring forward; [inferred], the paper does not
say which prefill rows its hook scales).

The image-free branch is the same token sequence with each image's tokens removed together with the family's
wrapper tokens next to them (Qwen's ``<|vision_start|>``/``<|vision_end|>``, Idefics3's ``<fake_token_around_image>``,
``<row_i_col_j>``, ``<global-img>``) and no pixels (methods.md §5.3). Working on the ids rather than on the question
text keeps the chat template exactly intact and works for ``messages=`` prompts too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from vlmkit.attention.hooks import Batch, Intervention, Site, per_row, register_intervention, resolve_layers
from vlmkit.errors import InputError
from vlmkit.models._layout import Layout

#: The paper's layers for 32-layer LMs, {1} and the last 14 ({18..31}), as the second layer plus a depth range.
DEFAULT_LAYERS = (1, (18 / 32, 1.0))
def resolve_layer_union(spec, num_layers: int) -> list[int]:
    """Like :func:`~vlmkit.attention.hooks.resolve_layers`, and also a list mixing ints/floats with ``(lo, hi)``
    fraction ranges, e.g. ``(1, (0.5625, 1.0))`` = layer 1 plus the last 44% of layers."""
    if isinstance(spec, (list, tuple)) and any(isinstance(x, (tuple, range)) for x in spec):
        out: set[int] = set()
        for part in spec:
            out.update(resolve_layers(part if isinstance(part, (tuple, range)) else [part], num_layers))
        return sorted(out)
    return resolve_layers(spec, num_layers)


# ---------------------------------------------------------------- side forwards (shared with VAR)
def side_forward(vlm, interventions: list[Intervention], batch: Batch, inputs: dict) -> None:
    """One forward of the model over ``inputs`` seen by ``interventions`` only (no cache, no gradients)."""
    with vlm.isolated(interventions, batch), torch.inference_mode():
        vlm.adapter.reset_state()
        try:
            vlm.model(**inputs, use_cache=False)
        finally:
            vlm.adapter.reset_state()  # the main call must not inherit this forward's rope_deltas


def wrapper_token_ids(vlm) -> set[int]:
    """Ids of the family's tokens that wrap image tokens (never the image token itself)."""
    return set(vlm.adapter.image_wrapper_token_ids())


def image_spans(ids: list[int], layout: Layout, wrappers: set[int]) -> set[int]:
    """Positions (in the unpadded ``ids``) of every image's span, first to last image token, plus the wrapper
    tokens adjacent to it."""
    drop: set[int] = set()
    for im in layout.images:
        pos = im.positions
        if pos.size == 0:
            continue
        lo, hi = int(pos.min()), int(pos.max())
        while lo > 0 and ids[lo - 1] in wrappers:
            lo -= 1
        while hi + 1 < len(ids) and ids[hi + 1] in wrappers:
            hi += 1
        drop.update(range(lo, hi + 1))
    return drop


def two_branch_inputs(vlm, batch: Batch, inputs: dict) -> tuple[dict, Batch]:
    """Inputs ``[2B, N]`` (with-image rows, then the same prompts without images) and their :class:`Batch`.

    The image-free rows are left-padded to the same length ``N``, so position ``-1`` is every row's last prompt
    token. Image tensors are passed unchanged: only the first ``B`` rows hold image tokens.
    """
    ids = inputs["input_ids"]
    B, N = ids.shape
    pad_id = vlm.processor.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    wrappers = wrapper_token_ids(vlm)
    kept = []
    for b in range(B):
        row = ids[b, batch.pads[b]:].tolist()
        drop = image_spans(row, batch.layouts[b], wrappers)
        kept.append([i + batch.pads[b] for i in range(len(row)) if i not in drop])
    out = dict(inputs)
    if "attention_mask" not in out:
        out["attention_mask"] = (torch.arange(N, device=ids.device)[None, :]
                                 >= torch.as_tensor(batch.pads, device=ids.device)[:, None]).long()
    for k in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
        v = out.get(k)
        if not torch.is_tensor(v) or v.shape[:2] != (B, N):
            continue
        free = torch.full_like(v, pad_id if k == "input_ids" else 0)
        for b in range(B):
            free[b, N - len(kept[b]):] = v[b, kept[b]]
        out[k] = torch.cat([v, free], 0)
    pads2 = list(batch.pads) + [N - len(k) for k in kept]
    side = Batch(out["input_ids"], pads2, list(batch.layouts) + [Layout([]) for _ in range(B)])
    return out, side


# ---------------------------------------------------------------- head selection
def select_heads(vhd: torch.Tensor, ta: torch.Tensor, outlier_filter: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """VHR's per-layer selection.

    Args:
        vhd: ``[..., H]`` head divergences of one layer; ta: ``[..., H]`` squared norms of the image-free outputs.
    Returns:
        ``(filtered [..., H], selected bool [..., H])``: VHD with outliers (VHD and TA both above mean + std over
        the heads; population std) set to 0, and the heads whose filtered VHD is above the heads' median.
    """
    vhd, ta = vhd.float(), ta.float()
    if outlier_filter:
        hi_v = vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, unbiased=False, keepdim=True)
        hi_t = ta > ta.mean(-1, keepdim=True) + ta.std(-1, unbiased=False, keepdim=True)
        vhd = vhd.masked_fill(hi_v & hi_t, 0.0)
    return vhd, vhd > vhd.median(-1, keepdim=True).values


@dataclass
class HeadSelection:
    """What VHR measured at the first step of one call.

    Attributes:
        layers: the reinforced layers, ascending.
        vhd: ``[B, len(layers), H]`` raw head divergences (before the outlier filter).
        ta: ``[B, len(layers), H]`` squared norms of the image-free head outputs.
        selected: bool ``[B, len(layers), H]`` heads scaled by ``alpha``.
    """

    layers: list[int]
    vhd: torch.Tensor
    ta: torch.Tensor
    selected: torch.Tensor

    def heads(self, sample: int = 0) -> dict[int, list[int]]:
        """``{layer: [head, ...]}`` selected for one sample."""
        return {l: torch.nonzero(self.selected[sample, i]).flatten().tolist() for i, l in enumerate(self.layers)}


@dataclass
class _Measure:
    """Per-call record in ``Batch.extras`` (never on the intervention): per layer ``[B, H]`` tensors."""

    measuring: bool
    vhd: dict[int, torch.Tensor] = field(default_factory=dict)
    ta: dict[int, torch.Tensor] = field(default_factory=dict)
    selected: dict[int, torch.Tensor] = field(default_factory=dict)


def _per_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    return per_row(t, rows, "VHR")


@register_intervention("vhr")
class VHR(Intervention):
    """Vision-aware head reinforcement.

    Args:
        alpha: scale of the selected heads' outputs (``1``: neutral; the paper warns that ``alpha > 3`` degrades text).
        layers: reinforced layers (default: the second layer plus the last 14/32 of the depth).
        outlier_filter: zero the VHD of heads whose VHD and TA are both above mean + std before selecting.

    After each call, ``last`` holds the :class:`HeadSelection` of that call (for inspection only; the per-call state
    lives in the call's ``Batch``).
    """

    def __init__(self, alpha: float = 2.0, layers=DEFAULT_LAYERS, outlier_filter: bool = True) -> None:
        super().__init__(layers)
        alpha = float(alpha)
        if not alpha > 0:
            raise InputError(f"VHR alpha={alpha}: must be > 0 (1 is neutral, the paper uses 2)")
        if alpha > 3:
            warnings.warn(f"VHR alpha={alpha} > 3: the paper reports that generation breaks down", stacklevel=2)
        self.alpha = alpha
        self.outlier_filter = bool(outlier_filter)
        self.last: HeadSelection | None = None
        self._key = f"vhr:{id(self)}"

    def params(self) -> dict:
        return {"alpha": self.alpha, "layers": self.layers_spec, "outlier_filter": self.outlier_filter}

    def bind(self, vlm) -> None:
        self.layers = resolve_layer_union(self.layers_spec, vlm.adapter.num_layers)

    def setup(self, vlm, batch: Batch, inputs: dict) -> None:
        """Measure VHD layer by layer in one two-branch forward and fix the selected heads for this call."""
        batch.extras[self._key] = self.measure(vlm, batch, inputs)

    def measure(self, vlm, batch: Batch, inputs: dict) -> _Measure:
        two, side = two_branch_inputs(vlm, batch, inputs)
        rec = _Measure(measuring=True)
        side.extras[self._key] = rec
        side_forward(vlm, [self], side, two)
        if self.layers and set(rec.selected) != set(self.layers):
            raise RuntimeError(f"VHR: the side forward reached layers {sorted(rec.selected)}, not {self.layers}")
        rec.measuring = False
        if self.layers:
            stack = lambda d: torch.stack([d[l] for l in self.layers], 1).cpu()  # noqa: E731
            self.last = HeadSelection(list(self.layers), stack(rec.vhd), stack(rec.ta), stack(rec.selected))
        return rec

    def heads(self, site: Site, out: torch.Tensor) -> torch.Tensor:
        """``out [B, Lq, H, D]``: measure and select (side forward), or scale the fixed heads (generation)."""
        rec = site.batch.extras.get(self._key)
        if rec is None:
            return out
        layer = site.layer
        if rec.measuring:
            b = out.shape[0] // 2
            last = out[:, -1].float()  # [2B, H, D]
            vhd = (last[:b] - last[b:]).norm(dim=-1)
            ta = last[b:].pow(2).sum(-1)
            _, sel = select_heads(vhd, ta, self.outlier_filter)
            rec.vhd[layer], rec.ta[layer], rec.selected[layer] = vhd, ta, sel
            sel = torch.cat([sel, sel], 0)
        else:
            sel = rec.selected.get(layer)
            if sel is None:
                return out
            sel = _per_row(sel, out.shape[0])
        factor = torch.where(sel, torch.tensor(self.alpha), torch.tensor(1.0)).to(out.device, out.dtype)
        return out * factor[:, None, :, None]


def head_divergence(vlm, image, question: str, layers=None, *, alpha: float = 1.0) -> torch.Tensor:
    """VHD ``[len(layers), H]`` of one image + question at the first generation step (``layers=None``: all).

    With ``alpha != 1`` the selected heads of each layer are reinforced before later layers are measured, as VHR
    does; the default measures the unmodified model.
    """
    iv = VHR(alpha=alpha, layers=layers)
    with vlm.intervene(iv):
        inputs, layouts, pads, _ = vlm.encode([image], [vlm.prompt(question)])
        iv.measure(vlm, Batch(inputs["input_ids"], pads, layouts), inputs)
    return iv.last.vhd[0]
