"""Parsing object names out of a VLM's answer, and mapping them to a dataset's category list.

:class:`ExactNames` (the offline default) normalises a name (lower case, articles and counts dropped, plurals made
singular) and keeps it only if it equals a category. :class:`ClipNames` is VL-SAM's evaluation mapping: each name
goes to the category whose CLIP text embedding of ``"a {category}"`` is closest to that of ``"a {name}"``, if the
cosine similarity reaches ``min_similarity``. It takes any open_clip model built locally (no download):
``open_clip.create_model_and_transforms("ViT-B-32", pretrained="/path/to/weights.safetensors")`` or a tiny random
``open_clip.CLIP`` in tests.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Protocol

_ARTICLES = {"a", "an", "the", "some", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
             "eleven", "twelve", "several", "many", "few"}
_LEADS = ("the image shows", "the picture shows", "there is", "there are", "i see", "i can see", "it shows", "it is")
_IRREGULAR = {"crosses": "cross", "boxes": "box", "glasses": "glass", "buses": "bus", "people": "person",
              "children": "child", "mice": "mouse", "knives": "knife", "leaves": "leaf", "men": "man",
              "women": "woman", "teeth": "tooth", "feet": "foot", "geese": "goose", "dishes": "dish"}


def singular(word: str) -> str:
    """Crude English singular of one word ("circles" -> "circle", "crosses" -> "cross", "glass" -> "glass")."""
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith(("ches", "shes", "xes", "sses", "zes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def normalize_name(name: str) -> str:
    """Lower case, NFKC, no punctuation, leading articles / counts removed, last word singular."""
    s = unicodedata.normalize("NFKC", name).lower()
    s = re.sub(r"[^\w\s-]", " ", s).replace("_", " ")
    words = s.split()
    while words and (words[0] in _ARTICLES or words[0].isdigit()):
        words = words[1:]
    if not words:
        return ""
    words[-1] = singular(words[-1])
    return " ".join(words)


def parse_names(answer: str, *, max_names: int = 32) -> list[str]:
    """Object names listed in a free-text answer ("red circle, two blue stars and a green square." ->
    ["red circle", "blue star", "green square"]), de-duplicated in order of appearance."""
    s = unicodedata.normalize("NFKC", answer or "").lower().strip()
    for lead in _LEADS:
        if s.startswith(lead):
            s = s[len(lead):]
    parts = re.split(r",|;|\.|\band\b|\bwith\b|\n", s)
    out: list[str] = []
    for p in parts:
        n = normalize_name(p)
        if n and n not in ("yes", "no", "nothing", "none", "object", "objects") and n not in out:
            out.append(n)
        if len(out) >= max_names:
            break
    return out


class NameMapper(Protocol):
    """Maps a generated name to a category name (or None: no category fits)."""

    def __call__(self, name: str) -> str | None: ...


class ExactNames:
    """Exact matching after :func:`normalize_name`; with ``categories=None`` every non-empty name is kept."""

    def __init__(self, categories: list[str] | None = None) -> None:
        self.categories = list(categories) if categories is not None else None
        self._index = None if categories is None else {normalize_name(c): c for c in categories}

    def __call__(self, name: str) -> str | None:
        n = normalize_name(name)
        if not n:
            return None
        return n if self._index is None else self._index.get(n)


class ClipNames:
    """Nearest category by open_clip text similarity (VL-SAM's LVIS mapping).

    ``model``: an open_clip model (``encode_text``); ``tokenizer``: its tokenizer (``open_clip.get_tokenizer``);
    ``template``: prompt wrapped around both names and categories.
    """

    def __init__(self, categories: list[str], model, tokenizer, *, template: str = "a {}",
                 min_similarity: float = 0.0, exact_first: bool = True) -> None:
        import torch

        if not categories:
            raise ValueError("ClipNames needs a non-empty category list")
        self.categories = list(categories)
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, template
        self.min_similarity, self.exact_first = float(min_similarity), exact_first
        self._exact = ExactNames(categories)
        with torch.no_grad():
            self._cat = self._embed(self.categories)

    def _embed(self, names: list[str]):
        import torch

        with torch.no_grad():
            e = self.model.encode_text(self.tokenizer([self.template.format(n) for n in names])).float()
        return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def similarities(self, name: str):
        """float ``[n_categories]`` cosine similarity of ``name`` to every category."""
        return (self._embed([normalize_name(name) or name]) @ self._cat.T)[0]

    def __call__(self, name: str) -> str | None:
        if self.exact_first:
            hit = self._exact(name)
            if hit is not None:
                return hit
        sim = self.similarities(name)
        k = int(sim.argmax())
        return self.categories[k] if float(sim[k]) >= self.min_similarity else None


def clip_names(categories: list[str], *, model_name: str = "ViT-B-32", checkpoint=None, **kw) -> ClipNames:
    """:class:`ClipNames` with an open_clip architecture built offline and, if given, local weights
    (``checkpoint``: a file read by :func:`vlmkit.grounding.segmenters.load_state_dict`, i.e. safetensors or a
    weights-only pickle). Without weights the model is random (useful only for tests)."""
    try:
        import open_clip
    except ImportError as e:
        from vlmkit.errors import ModelLoadError

        raise ModelLoadError("CLIP name mapping needs `pip install open_clip_torch`") from e
    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=None)
    if checkpoint is not None:
        from vlmkit.grounding.segmenters import load_state_dict

        model.load_state_dict(load_state_dict(checkpoint, what="CLIP checkpoint"))
    return ClipNames(categories, model, open_clip.get_tokenizer(model_name), **kw)
