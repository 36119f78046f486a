"""vlmkit: open up vision-language models through their attention.

Public API::

    vlm = vlmkit.load(path=None)            # None = the embedded default model
    vlm.ask(image, "Is there a red circle in the image?")
    with vlm.capture(rows="last") as rec:
        vlm.ask(image, question)
    rec.maps.overlay(image)                  # heat map over the original image
"""

from __future__ import annotations

from vlmkit.attention.maps import AttentionMaps
from vlmkit.errors import InputError, LayoutError, ModelLoadError, VlmkitError
from vlmkit.models.vlm import VLM, Generation, load

__version__ = "0.1.0"


def ask(image, question: str, *, vlm: VLM | None = None, **gen) -> str:
    """Answer ``question`` about ``image`` with ``vlm`` (default: the embedded default model)."""
    return (vlm or load()).ask(image, question, **gen)


def explain(image, question: str, *, vlm: VLM | None = None, **params):
    """Attention vs saliency for the first answer token (see :mod:`vlmkit.methods.saliency`)."""
    from vlmkit.methods.saliency import explain as _explain

    return _explain(image, question, vlm=vlm, **params)


__all__ = ["AttentionMaps", "Generation", "InputError", "LayoutError", "ModelLoadError", "VLM", "VlmkitError", "ask", "explain",
           "load"]
