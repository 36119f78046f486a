"""The one hooking mechanism: per-call context, the attention state a VLM attaches to its language model, and the
:class:`Intervention` base class with its registry.

An intervention may edit, on the layers it names,
(a) pre-softmax logits (``logits``), (b) post-softmax probabilities (``probs``; renormalised or not, its choice),
(c) per-head outputs before ``o_proj`` (``heads``), and may read (d) each decoder layer's residual input
(``needs_residual``) and anything it computes in :meth:`Intervention.setup` (e.g. the vision tower's attention).
Methods that need a second branch (VCD, PAI's CFG) return a logits processor from :meth:`Intervention.processors`;
that branch keeps its own KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlmkit.models._layout import Layout

_INTERVENTIONS: dict[str, type["Intervention"]] = {}


def register_intervention(name: str):
    """Class decorator: make an intervention available by ``name`` (CLI ``--method NAME``)."""

    def wrap(cls):
        cls.name = name
        _INTERVENTIONS[name] = cls
        return cls

    return wrap


def intervention_names() -> list[str]:
    import vlmkit.methods  # noqa: F401  (registers the built-in methods)

    return sorted(_INTERVENTIONS)


def make_intervention(name: str, **params) -> "Intervention":
    """Build a registered intervention from its name and keyword parameters."""
    import vlmkit.methods  # noqa: F401

    if name not in _INTERVENTIONS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_INTERVENTIONS))}")
    return _INTERVENTIONS[name](**params)


def resolve_layers(spec, num_layers: int) -> list[int]:
    """Layer indices from a spec: None (all), ints (negative from the end), floats in [0, 1] (fractions of depth),
    a ``(start, end)`` pair of fractions as a half-open range, or a ``range``."""
    if spec is None:
        return list(range(num_layers))
    if isinstance(spec, range):
        spec = list(spec)
    if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(x, float) for x in spec):
        lo, hi = (int(round(f * num_layers)) for f in spec)
        return list(range(max(lo, 0), min(hi, num_layers)))
    out = set()
    for x in ([spec] if isinstance(spec, (int, float)) else spec):
        i = int(round(x * num_layers)) if isinstance(x, float) else int(x)
        i = min(i, num_layers - 1) if isinstance(x, float) else i
        if not -num_layers <= i < num_layers:
            raise ValueError(f"layer {x} out of range for {num_layers} layers")
        out.add(i % num_layers)
    return sorted(out)


def per_row(t: torch.Tensor, rows: int, what: str = "intervention") -> torch.Tensor:
    """Repeat a per-sample ``[B, ...]`` tensor for ``rows`` batch rows (beam search expands each sample)."""
    if t.shape[0] == rows:
        return t
    if rows % t.shape[0]:
        raise RuntimeError(f"{what}: batch of {rows} rows does not match the {t.shape[0]} prompts")
    return t.repeat_interleave(rows // t.shape[0], dim=0)


@dataclass
class Batch:
    """Context of one ``generate`` call, shared by capture and interventions (positions are padded)."""

    input_ids: torch.Tensor  # [B, N] left-padded prompt ids
    pads: list[int]
    layouts: list[Layout]
    calls: dict[int, int] = field(default_factory=dict)  # forward calls seen per layer
    residual: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> input hidden [B, Lq, D] (this call)
    extras: dict[str, Any] = field(default_factory=dict)  # per-call data computed by interventions' setup

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[1])

    def image_columns(self, b: int) -> torch.Tensor:
        """int64 ``[C_b]``: padded positions of sample ``b``'s image tokens."""
        return torch.as_tensor(self.layouts[b].positions + self.pads[b])

    def image_mask(self, length: int, device=None) -> torch.Tensor:
        """bool ``[B, length]``: True at image-token columns."""
        m = torch.zeros(len(self.layouts), length, dtype=torch.bool, device=device)
        for b in range(len(self.layouts)):
            m[b, self.image_columns(b).to(device)] = True
        return m


@dataclass
class Site:
    """One attention call as an edit sees it."""

    layer: int
    step: int  # 0: prefill; s > 0: decode step s
    batch: Batch
    q_pos: torch.Tensor  # int64 [Lq] padded positions of the query rows
    kv_len: int
    module: Any = None


class Intervention:
    """Base class. Subclasses override the hooks they need; the defaults change nothing.

    ``layers`` follows :func:`resolve_layers`; :meth:`bind` resolves it for a model.
    """

    name: ClassVar[str] = "none"
    needs_residual: ClassVar[bool] = False
    edits_attention: ClassVar[bool] = False  # True if ``logits`` or ``probs`` are overridden

    def __init__(self, layers=None) -> None:
        self.layers_spec = layers
        self.layers: list[int] = []

    def params(self) -> dict:
        """The parameters that define this intervention (for reports)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("layers",)}

    def bind(self, vlm) -> None:
        self.layers = resolve_layers(self.layers_spec, vlm.adapter.num_layers)

    def setup(self, vlm, batch: Batch, inputs: dict) -> None:
        """Called before each generate call with its inputs (e.g. select tokens, measure heads)."""

    def processors(self, vlm, batch: Batch, inputs: dict) -> list:
        """Logits processors to add to ``generate`` (second-branch methods)."""
        return []

    def rows(self, site: Site) -> torch.Tensor | None:
        """bool ``[Lq]`` query rows this edit touches at ``site`` (None: every row)."""
        return None

    def modulations(self, site: Site) -> list | None:
        """This edit at ``site`` as kernel modulations (``vlmkit.kernels.Modulation``), so that it runs inside the
        fused kernel; None (the default) means it is applied by :meth:`logits` / :meth:`probs` instead."""
        return None

    def logits(self, site: Site, scores: torch.Tensor, allowed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Edit pre-softmax scores ``[B, H, R, Lk]`` (fp32) of the query rows ``rows [R]``; ``allowed`` is the
        bool mask ``[B, 1|H, R, Lk]``. Masked entries are re-masked afterwards."""
        return scores

    def probs(self, site: Site, probs: torch.Tensor, allowed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Edit post-softmax probabilities ``[B, H, R, Lk]`` (fp32)."""
        return probs

    def heads(self, site: Site, out: torch.Tensor) -> torch.Tensor:
        """Edit per-head outputs ``[B, Lq, H, D]`` before ``o_proj``."""
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


@register_intervention("none")
class NoIntervention(Intervention):
    """The baseline: no edit."""
