"""vlmkit: open up vision-language models through their attention.

Public API::

    vlm = vlmkit.load(path=None)            # None = the embedded default model
    vlm.ask(image, "Is there a red circle in the image?")
    with vlm.capture(rows="last") as rec:
        vlm.ask(image, question)
    rec.maps.overlay(image)                  # heat map over the original image
    vlmkit.explain(image, question)          # attention vs saliency

Heavy modules (torch, transformers) load on first use, so ``import vlmkit`` and ``vlmkit --help`` stay fast.
"""

from __future__ import annotations

import importlib

from vlmkit.errors import InputError, LayoutError, ModelLoadError, VlmkitError

__version__ = "0.1.0"

_LAZY = {
    "AttentionMaps": "vlmkit.attention.maps",
    "VLM": "vlmkit.models.vlm",
    "Generation": "vlmkit.models.vlm",
    "load": "vlmkit.models.vlm",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")


def ask(image, question: str, *, vlm=None, **gen) -> str:
    """Answer ``question`` about ``image`` with ``vlm`` (default: the embedded default model)."""
    from vlmkit.models.vlm import load

    return (vlm or load()).ask(image, question, **gen)


def carve(image, question: str, *, vlm=None, **params):
    """CARVE contrastive attention refinement (see :mod:`vlmkit.methods.carve`); returns a ``CarveResult``."""
    from vlmkit.methods.carve import carve as _carve

    return _carve(image, question, vlm=vlm, **params)


def detect(image, *, vlm=None, **params):
    """VL-SAM open-ended detection and segmentation (see :mod:`vlmkit.grounding.vlsam`); ``list[Detection]``."""
    from vlmkit.grounding.vlsam import detect as _detect

    return _detect(image, vlm=vlm, **params)


def ground(image, instruction: str, *, vlm=None, **params):
    """GUI grounding with the V2P pointer head (see :mod:`vlmkit.grounding.v2p`); a ``GroundingResult``."""
    from vlmkit.grounding.v2p import ground as _ground

    return _ground(image, instruction, vlm=vlm, **params)


def explain(image, question: str, *, vlm=None, **params):
    """Attention vs saliency for the first answer token (see :mod:`vlmkit.methods.saliency`)."""
    from vlmkit.methods.saliency import explain as _explain

    return _explain(image, question, vlm=vlm, **params)


__all__ = ["AttentionMaps", "Generation", "InputError", "LayoutError", "ModelLoadError", "VLM", "VlmkitError", "ask",
           "carve", "detect", "explain", "ground", "load", "__version__"]
