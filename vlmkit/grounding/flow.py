"""Attention of a generated word onto the image: head-weighted, regularised attention flow (VL-SAM §3.2 step 2).

The prompt + answer is run once more through the model with a read-only :class:`FlowRecorder`. In each layer the
recorder sees the exact post-softmax attention ``S [H, N, N]`` of every sample, computes the head weights
``W[h] = mean over query rows of (max over keys of S[h])`` and keeps only the weighted head mean
``S' = mean_h W[h] S[h]`` (one ``N x N`` per layer; never ``L x H x N x N``), plus the plain head mean at the target
rows (for the "naive" map). Afterwards the flow is the residual rollout ``R = prod_l (I + S'_l)`` (rescaled by a
scalar after each product), optionally with each layer's columns multiplied by ``1 - (L0_j - 1) / N`` where ``L0_j``
is the number of query rows allowed to see key ``j`` (the causal-collapse regulariser). Row(s) of the word, image
columns -> values per image token -> per-view maps pasted into the original image's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vlmkit.attention.hooks import Intervention
from vlmkit.attention.maps import AttentionMaps
from vlmkit.models._layout import Layout

VARIANTS = ("naive", "flow", "flow_reg")
ROW_MODES = ("auto", "name", "answer", "name+answer", "predict")


@dataclass
class WordMap:
    """Attention of one word of one sample onto its image.

    Attributes:
        word: the word (object name) the map is for.
        values: variant -> float32 ``[image_tokens]`` (column ``j`` is sequence position ``layout.positions[j]``).
        layout: the sample's image-token layout.
        rows: sequence positions (unpadded) whose rows were used.
        found: False when the word is not in the text (the rows then fell back to the answer row).
    """

    word: str
    values: dict[str, np.ndarray]
    layout: Layout
    rows: list[int] = field(default_factory=list)
    found: bool = True

    def to_pixels(self, variant: str = "flow_reg") -> np.ndarray:
        """float32 ``[H, W]`` over the original image; each view is scaled to mean 1 before pasting, so views with
        different token counts are comparable (a uniform map is 1 everywhere)."""
        vals = np.asarray(self.values[variant], np.float64).copy()
        for im in self.layout.images:
            for v in im.views:
                cols = self.layout.column_index(v.positions)
                s = vals[cols].mean()
                if s > 0:
                    vals[cols] = vals[cols] / s
        empty = torch.zeros(0, 0, 0, len(vals))
        maps = AttentionMaps(prefill=empty, decode=empty, layers=[], rows=[], layout=self.layout)
        return maps.to_pixels(torch.as_tensor(vals, dtype=torch.float32))


def _find_last(seq: list[int], sub: list[int]) -> int:
    """Start index of the last occurrence of ``sub`` in ``seq`` (-1 if absent)."""
    n = len(sub)
    if n == 0:
        return -1
    for i in range(len(seq) - n, -1, -1):
        if seq[i:i + n] == sub:
            return i
    return -1


def word_positions(tokenizer, ids: list[int], word: str) -> list[int]:
    """Positions of the last occurrence of ``word``'s tokens in ``ids`` (tried with and without a leading space);
    empty list if not found."""
    for t in (word, " " + word):
        sub = tokenizer(t, add_special_tokens=False)["input_ids"]
        if sub and tokenizer.unk_token_id not in sub:
            i = _find_last(ids, sub)
            if i >= 0:
                return list(range(i, i + len(sub)))
    return []


class FlowRecorder(Intervention):
    """Read-only intervention: probabilities pass through unchanged; per layer it accumulates the head-weighted
    head mean ``[N, N]`` of each sample and the plain head mean at the sample's target rows.

    ``words[b]``, ``answers[b]``: the object word and the answer text of sample ``b`` (target rows are found in
    :meth:`setup` from the token ids). ``rows``: one of :data:`ROW_MODES`: ``"name"`` the word's tokens (last
    occurrence), ``"answer"`` the last prompt row (the one that generates the answer), ``"name+answer"`` both,
    ``"predict"`` the row before the word, ``"auto"`` the word's tokens when the word was generated (it lies in the
    answer, e.g. a listed object) and otherwise the answer row (the word is in the question, and the answer is
    generated about it).
    """

    edits_attention = True

    def __init__(self, tokenizer, words: list[str], answers: list[str], rows: str = "auto") -> None:
        super().__init__(None)
        if rows not in ROW_MODES:
            raise ValueError(f"rows={rows!r}: use one of {ROW_MODES}")
        self._tok = tokenizer
        self.words, self.answers, self.row_mode = list(words), list(answers), rows
        self.targets: list[list[int]] = []
        self.found: list[bool] = []
        self.layouts: list[Layout] = []
        self.weighted: list[dict[int, torch.Tensor]] = []  # per sample: layer -> [N, N]
        self.naive: list[dict[int, torch.Tensor]] = []  # per sample: layer -> [T, N]
        self.col_count: list[torch.Tensor | None] = []  # per sample: [N] allowed rows per key column

    def setup(self, vlm, batch, inputs) -> None:
        ids = batch.input_ids.cpu()
        self.targets, self.found = [], []
        self.layouts = list(batch.layouts)
        for b, pad in enumerate(batch.pads):
            seq = ids[b, pad:].tolist()
            n_ans = len(self._tok(" " + self.answers[b], add_special_tokens=False)["input_ids"]) \
                if self.answers[b] else 0
            answer_row = max(0, len(seq) - n_ans - 1)
            name = word_positions(self._tok, seq, self.words[b])
            self.found.append(bool(name))
            if self.row_mode == "answer" or not name or (self.row_mode == "auto" and name[0] <= answer_row):
                rows = [answer_row]
            elif self.row_mode == "name":
                rows = name
            elif self.row_mode == "predict":
                rows = [max(0, name[0] - 1)]
            else:
                rows = sorted(set(name) | {answer_row})
            self.targets.append(rows)
        self.weighted = [{} for _ in batch.pads]
        self.naive = [{} for _ in batch.pads]
        self.col_count = [None for _ in batch.pads]

    def probs(self, site, probs, allowed, rows):
        """``probs [B, H, R, Lk]`` of every query row (prefill): record, return unchanged."""
        if site.step != 0 or probs.shape[2] != probs.shape[3]:
            return probs
        for b, pad in enumerate(site.batch.pads):
            s = probs[b, :, pad:, pad:]  # [H, N, N]; rows are all query positions
            w = s.amax(dim=-1).mean(dim=-1)  # [H]
            self.weighted[b][site.layer] = (w[:, None, None] * s).mean(0).cpu()
            self.naive[b][site.layer] = s.mean(0)[self.targets[b]].cpu()
            if self.col_count[b] is None:
                ok = allowed[b if allowed.shape[0] > 1 else 0, 0, pad:, pad:]
                self.col_count[b] = ok.sum(0).float().cpu()
        return probs

    # ------------------------------------------------------------------ results
    def values(self, b: int, layout: Layout, variants=VARIANTS) -> dict[str, np.ndarray]:
        """variant -> ``[image_tokens]`` values of sample ``b`` (target rows averaged)."""
        cols = torch.as_tensor(layout.positions)
        rows = self.targets[b]
        out = {}
        layers = sorted(self.weighted[b])
        if not layers:
            raise RuntimeError("the flow recorder saw no attention call; was it active during the forward?")
        for var in variants:
            if var == "naive":
                v = torch.stack([self.naive[b][l] for l in layers]).mean(0).mean(0)[cols]
            elif var in ("flow", "flow_reg"):
                v = rollout([self.weighted[b][l] for l in layers], self.col_count[b] if var == "flow_reg" else None,
                            rows)[:, cols].mean(0)
            else:
                raise ValueError(f"unknown variant {var!r}; use {VARIANTS}")
            out[var] = v.float().numpy()
        return out


def rollout(mats: list[torch.Tensor], col_count: torch.Tensor | None, rows: list[int]) -> torch.Tensor:
    """Rows ``rows`` of ``prod_l (I + S_l)`` (later layers on the left), ``[len(rows), N]``.

    ``col_count [N]`` (optional): allowed rows per key column; each ``S_l`` column ``j`` is then scaled by
    ``1 - (col_count[j] - 1) / N``. The running product is divided by its maximum after each layer (a scalar, so
    the result is the exact product up to scale).
    """
    n = mats[0].shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    scale = None if col_count is None else (1.0 - (col_count.double() - 1.0) / n).clamp_min(0.0)
    r = eye
    for s in mats:
        s = s.double()
        if scale is not None:
            s = s * scale[None, :]
        r = (eye + s) @ r
        r = r / r.max()
    return r[rows]


def _run_forward(vlm, images: list, texts: list[str]) -> None:
    """One forward pass over full texts (prompt + answer) with the VLM's active interventions applied."""
    vlm.forward(images, prompts=texts)


def word_maps(vlm, images: list, questions: list[str], answers: list[str], words: list[str], *,
              rows: str = "auto", variants=VARIANTS, batch_size: int = 16) -> list[WordMap]:
    """One :class:`WordMap` per ``(image, question, answer, word)``: re-runs ``vlm.prompt(question) + " " + answer``
    with a :class:`FlowRecorder` and returns the word's attention maps (all ``variants``)."""
    if not (len(images) == len(questions) == len(answers) == len(words)):
        raise ValueError("word_maps needs one question, answer and word per image")
    out: list[WordMap] = []
    tok = vlm.processor.tokenizer
    for i in range(0, len(images), batch_size):
        sl = slice(i, i + batch_size)
        texts = [vlm.prompt(q) + (" " + a if a else "") for q, a in zip(questions[sl], answers[sl])]
        rec = FlowRecorder(tok, words[sl], answers[sl], rows=rows)
        with vlm.intervene(rec):
            _run_forward(vlm, images[sl], texts)
        for b, layout in enumerate(rec.layouts):
            out.append(WordMap(words[sl][b], rec.values(b, layout, variants), layout, rec.targets[b],
                               rec.found[b] or rows == "answer"))
    return out
