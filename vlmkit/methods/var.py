"""VAR: visual attention sinks and Visual Attention Redistribution (methods.md §6).

* **Sink dimensions** ``D_sink``: the few residual-stream dimensions with massive activations, found from a few
  prompts by :func:`discover_sink_dims` (never hard-coded). ``VAR(sink_dims=None)`` discovers them from the first
  call's own prompts and keeps them for the model.
* **Sink tokens** at layer ``l``: ``phi(x) = max_{d in D_sink} |x_d| / RMS(x)`` of the layer's input hidden state
  (pre-norm residual) is at least ``tau``; computed in the prefill and reused while decoding (generated tokens are
  never sinks). ``phi`` is at most ``sqrt(D)``, so the paper's ``tau = 20`` (set on 4096-d LLaVA-1.5-7B) is out of
  reach for small models: the threshold used is ``min(tau, tau_cap * sqrt(D))`` (default ``tau_cap = 0.5``; it
  leaves 4096-d, 3584-d and 2048-d models at 20 and gives 5.7 for the 128-d default model). ``tau_cap=None``
  disables the cap.
* **Image-centric heads**, per (layer, head, query row): visual mass ``>= min_visual_mass`` (0.2) and non-sink share
  of the visual mass ``>= rho`` (0.5).
* **Redistribution** (post-softmax, ``probs`` hook): a fraction ``p`` of the attention on every sink token (text and
  visual) moves to the visual non-sink tokens in proportion to their weights; rows still sum to 1. Rows: text
  queries after the sample's last image token in the prefill, and every generated token. Layers: all but the last.

``reference_code_compat=True`` follows the official code instead of the paper: it moves ``1 - p``, selects heads with
sink share ``<= rho`` (i.e. non-sink share ``>= 1 - rho``), uses a strict ``phi > tau``, and edits nothing in a
sample whose image has no visual sink.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmkit.attention.hooks import Batch, Intervention, Site, per_row, register_intervention, resolve_layers
from vlmkit.errors import InputError
from vlmkit.methods.vhr import side_forward

_EPS = 1e-6


def sink_scores(hidden: torch.Tensor, dims) -> torch.Tensor:
    """``phi [...]`` of hidden states ``[..., D]``: largest ``|x_d|`` over ``dims`` divided by ``RMS(x)``."""
    x = hidden.float()
    rms = x.pow(2).mean(-1).add(_EPS).sqrt()
    idx = torch.as_tensor(list(dims), dtype=torch.long, device=x.device)
    return x.index_select(-1, idx).abs().amax(-1) / rms


def sink_threshold(tau: float, hidden_size: int, tau_cap: float | None = 0.5) -> float:
    """The ``tau`` actually used: ``min(tau, tau_cap * sqrt(hidden_size))`` (``tau_cap=None``: ``tau``)."""
    return float(tau) if tau_cap is None else min(float(tau), float(tau_cap) * hidden_size ** 0.5)


def redistribute(probs: torch.Tensor, sink: torch.Tensor, visual: torch.Tensor, p: float, *, rho: float = 0.5,
                 min_visual_mass: float = 0.2, rows: torch.Tensor | None = None,
                 reference_code_compat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Move sink attention to visual non-sink tokens.

    Args:
        probs: ``[B, H, R, Lk]`` post-softmax attention (masked entries 0).
        sink: bool ``[B, Lk]`` sink tokens (text and visual); visual: bool ``[B, Lk]`` image tokens.
        p: fraction of each sink's weight that moves (code compat: ``1 - p``).
        rows: optional bool ``[B, R]``: rows that may be edited (default: all).
    Returns:
        ``(probs' [B, H, R, Lk], selected bool [B, H, R])``. In a selected row every sink weight becomes
        ``(1 - p) a_j`` and every visual non-sink weight ``a_j + budget * a_j / sum_{V\\S} a``, with
        ``budget = p * sum_S a``; the row sum is unchanged and a zero entry stays zero.
    """
    move = (1.0 - p) if reference_code_compat else p
    s = sink[:, None, None, :].to(probs.dtype)
    ns = (visual & ~sink)[:, None, None, :].to(probs.dtype)
    vis = visual[:, None, None, :].to(probs.dtype)
    vis_mass = (probs * vis).sum(-1)
    ns_mass = (probs * ns).sum(-1)
    share = ns_mass / vis_mass.clamp_min(1e-30)
    need = (1.0 - rho) if reference_code_compat else rho
    selected = (vis_mass >= min_visual_mass) & (share >= need) & (ns_mass > 0)
    if rows is not None:
        selected &= rows[:, None, :].to(selected.device)
    if reference_code_compat:  # the code skips samples whose image has no visual sink
        selected &= (sink & visual).any(-1)[:, None, None].to(selected.device)
    budget = move * (probs * s).sum(-1, keepdim=True)
    edited = probs - move * probs * s + budget * probs * ns / ns_mass.clamp_min(1e-30)[..., None]
    return torch.where(selected[..., None], edited, probs), selected


# ---------------------------------------------------------------- sink dimensions
@dataclass
class SinkDimensions:
    """Result of :func:`discover_sink_dims`.

    Attributes:
        dims: the ``top`` dimensions, strongest first.
        score: ``[D]`` per dimension, the median over layers (the first layer's input, the embeddings, excluded when
            there are more layers) of the largest ``|x_d| / RMS(x)`` over all real tokens of all prompts.
        ratio: ``score[dims[-1]]`` over the median of ``score``: how far the chosen dims stand out (massive
            activations give tens to hundreds; a model without them gives ~1-2 and VAR has no sinks to act on).
    """

    dims: list[int]
    score: torch.Tensor
    ratio: float


class _ResidualStats(Intervention):
    """Reads every layer's input in the prefill: ``[D]`` max over real tokens of ``|x_d| / RMS(x)`` per layer."""

    needs_residual = True

    def __init__(self, num_layers: int) -> None:
        super().__init__(None)
        self.layers = list(range(num_layers))
        self.per_layer: dict[int, torch.Tensor] = {}

    def heads(self, site: Site, out: torch.Tensor) -> torch.Tensor:
        x = site.batch.residual.get(site.layer)
        if site.step == 0 and x is not None:
            x = x.float()
            z = x.abs() / x.pow(2).mean(-1, keepdim=True).add(_EPS).sqrt()  # [B, N, D]
            real = torch.arange(x.shape[1], device=x.device)[None, :] >= torch.as_tensor(
                site.batch.pads, device=x.device)[:, None]
            m = z.masked_fill(~real[..., None], 0.0).amax((0, 1)).cpu()
            old = self.per_layer.get(site.layer)
            self.per_layer[site.layer] = m if old is None else torch.maximum(old, m)
        return out

    def result(self, top: int) -> SinkDimensions:
        if not self.per_layer:
            raise RuntimeError("discover_sink_dims: no residual stream was read")
        keys = sorted(self.per_layer)
        keys = keys[1:] if len(keys) > 1 else keys
        score = torch.stack([self.per_layer[k] for k in keys]).median(0).values
        order = torch.argsort(score, descending=True)[:top]
        ratio = float(score[order[-1]] / score.median().clamp_min(1e-12))
        return SinkDimensions([int(i) for i in order], score, ratio)


def discover_sink_dims(vlm, images: list, questions: list[str], top: int = 2) -> SinkDimensions:
    """Find the model's massive-activation dimensions from a few image + question prompts (one forward)."""
    if top < 1:
        raise InputError(f"discover_sink_dims top={top}: must be >= 1")
    reader = _ResidualStats(vlm.adapter.num_layers)
    with vlm.intervene(reader):
        vlm.forward(images, questions)
    return reader.result(top)


# ---------------------------------------------------------------- the intervention
@dataclass
class _CallState:
    """Per-call state in ``Batch.extras``: visual mask, first editable row per sample, sinks per layer."""

    visual: torch.Tensor  # bool [B, N]
    row_start: torch.Tensor  # int64 [B]: padded position after the sample's last image token
    sinks: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> bool [B, N]
    edited_rows: int = 0


def _per_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    return per_row(t, rows, "VAR")


@register_intervention("var")
class VAR(Intervention):
    """Visual Attention Redistribution.

    Args:
        p: fraction of sink attention moved (paper semantics; ``0``: neutral).
        rho: minimum non-sink share of a row's visual attention for the (head, row) to be image-centric.
        tau: sink threshold on ``phi``; tau_cap: cap the threshold at ``tau_cap * sqrt(D)`` (None: no cap).
        min_visual_mass: minimum attention on the image for a (head, row) to be considered.
        sink_dims: the massive-activation dimensions (list or :class:`SinkDimensions`); None: discovered from the
            first call's prompts with :func:`discover_sink_dims`.
        layers: edited layers (default: all but the last).
        reference_code_compat: follow the official code instead of the paper (see the module docstring).
    """

    needs_residual = True
    edits_attention = True

    def __init__(self, p: float = 0.6, rho: float = 0.5, tau: float = 20.0, tau_cap: float | None = 0.5,
                 min_visual_mass: float = 0.2, sink_dims=None, layers=None, top_dims: int = 2,
                 reference_code_compat: bool = False) -> None:
        super().__init__(layers)
        for name, v in (("p", p), ("rho", rho), ("min_visual_mass", min_visual_mass)):
            if not 0.0 <= float(v) <= 1.0:
                raise InputError(f"VAR {name}={v}: must be in [0, 1]")
        if not float(tau) > 0:
            raise InputError(f"VAR tau={tau}: must be > 0")
        self.p, self.rho, self.tau = float(p), float(rho), float(tau)
        self.tau_cap = None if tau_cap is None else float(tau_cap)
        self.min_visual_mass = float(min_visual_mass)
        self.top_dims = int(top_dims)
        self.reference_code_compat = bool(reference_code_compat)
        if isinstance(sink_dims, SinkDimensions):
            sink_dims = sink_dims.dims
        self.sink_dims = None if sink_dims is None else [int(d) for d in sink_dims]
        self._found: dict[int, list[int]] = {}  # id(model) -> discovered dims
        self._threshold = self.tau
        self._key = f"var:{id(self)}"

    def params(self) -> dict:
        return {"p": self.p, "rho": self.rho, "tau": self.tau, "tau_cap": self.tau_cap,
                "min_visual_mass": self.min_visual_mass, "sink_dims": self.sink_dims, "layers": self.layers_spec,
                "reference_code_compat": self.reference_code_compat}

    def bind(self, vlm) -> None:
        n = vlm.adapter.num_layers
        self.layers = list(range(n - 1)) if self.layers_spec is None else resolve_layers(self.layers_spec, n)
        hidden = int(vlm.model.config.get_text_config().hidden_size)
        bad = [d for d in (self.sink_dims or []) if not 0 <= d < hidden]
        if bad:
            raise InputError(f"VAR sink_dims {bad}: outside the hidden size {hidden} of {vlm.name}")
        self._threshold = sink_threshold(self.tau, hidden, self.tau_cap)

    def dims_for(self, vlm) -> list[int]:
        return self.sink_dims if self.sink_dims is not None else self._found.get(id(vlm.model), [])

    def setup(self, vlm, batch: Batch, inputs: dict) -> None:
        if self.sink_dims is None and id(vlm.model) not in self._found:
            reader = _ResidualStats(vlm.adapter.num_layers)
            side_forward(vlm, [reader], Batch(batch.input_ids, batch.pads, batch.layouts), inputs)
            self._found[id(vlm.model)] = reader.result(self.top_dims).dims
        n = batch.prompt_len
        visual = batch.image_mask(n)
        start = torch.full((len(batch.layouts),), n, dtype=torch.long)
        for b in range(len(batch.layouts)):
            cols = batch.image_columns(b)
            if cols.numel():
                start[b] = int(cols.max()) + 1
        batch.extras[self._key] = _CallState(visual, start)
        batch.extras[self._key + ":dims"] = self.dims_for(vlm)

    def _sinks(self, site: Site, st: _CallState) -> torch.Tensor | None:
        """bool ``[B, N]`` sinks of this layer: computed at the prefill from the layer input, then reused."""
        layer = site.layer
        if site.step == 0 and layer not in st.sinks:
            x = site.batch.residual.get(layer)
            dims = site.batch.extras.get(self._key + ":dims") or []
            if x is None or not dims or x.shape[1] != st.visual.shape[1]:
                return None
            phi = sink_scores(x, dims)  # [B, N]
            hit = phi > self._threshold if self.reference_code_compat else phi >= self._threshold
            real = torch.arange(x.shape[1], device=x.device)[None, :] >= torch.as_tensor(
                site.batch.pads, device=x.device)[:, None]
            st.sinks[layer] = (hit & real).cpu()
        return st.sinks.get(layer)

    def rows(self, site: Site) -> torch.Tensor:
        lq = int(site.q_pos.numel())
        st = site.batch.extras.get(self._key)
        sinks = None if st is None else self._sinks(site, st)
        if sinks is None or not sinks.any():
            return torch.zeros(lq, dtype=torch.bool)
        return site.q_pos.cpu() >= int(st.row_start.min())

    def probs(self, site: Site, probs: torch.Tensor, allowed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        st = site.batch.extras.get(self._key)
        sinks = None if st is None else st.sinks.get(site.layer)
        if sinks is None or not sinks.any():
            return probs
        B, _, _, lk = probs.shape
        dev = probs.device

        def widen(m):  # [B0, N] -> [B, Lk]: generated positions are neither sinks nor image tokens
            m = _per_row(m, B).to(dev)
            return torch.cat([m, m.new_zeros(B, lk - m.shape[1])], 1) if lk > m.shape[1] else m[:, :lk]

        q = site.q_pos.to(dev)[rows.to(dev)]  # [R]
        ok_rows = q[None, :] >= _per_row(st.row_start, B).to(dev)[:, None]
        out, sel = redistribute(probs, widen(sinks), widen(st.visual), self.p, rho=self.rho,
                                min_visual_mass=self.min_visual_mass, rows=ok_rows,
                                reference_code_compat=self.reference_code_compat)
        st.edited_rows += int(sel.sum())
        return out
