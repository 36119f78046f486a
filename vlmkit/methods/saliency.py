"""Attention-vs-saliency checks: do the attention maps explain the answer?

Following "Cross-Attention is Half Explanation" (methods.md §7), transferred to decoder-only VLMs. The explained
quantity is the log-probability of the first answer token, predicted at the last prompt row. Everything is at
image-token resolution (one value per image token of the sample's layout):

* attention: captured probabilities of the last prompt row onto the image tokens, per layer, per head, head-mean,
  layer ranges, all-mean, and a rollout through all prompt rows (``0.5 I + 0.5 A`` per layer, head-mean);
* saliency: input x gradient and integrated gradients on the image-token embeddings entering the language model
  (the paper's encoder-output analogue), and occlusion of each token's pixels in the original image (batched);
* agreement: Pearson on z-normalised maps, Spearman, top-k overlap, and deletion / insertion AUC of the target
  probability when tokens' pixels are occluded in each map's order, against a random order.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from vlmkit.attention.hooks import Intervention

SALIENCY_METHODS = ("input_x_gradient", "integrated_gradients", "occlusion")


# ---------------------------------------------------------------------------------------------------- helpers
class _FullAttention(Intervention):
    """Read-only: keeps the head-mean probabilities ``[B, N, N]`` of every layer of a prefill (for rollout)."""

    edits_attention = True

    def __init__(self):
        super().__init__(None)
        self.mean: dict[int, torch.Tensor] = {}

    def probs(self, site, probs, allowed, rows):
        if site.step == 0:
            self.mean[site.layer] = probs.mean(1).detach()
        return probs


def _occlude(image: Image.Image, boxes: np.ndarray, fill) -> Image.Image:
    """Copy of ``image`` with the pixel boxes ``[K, 4]`` painted with ``fill``."""
    arr = np.array(image)
    b = np.rint(boxes).astype(np.int64)
    for x0, y0, x1, y1 in b:
        arr[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = fill
    return Image.fromarray(arr)


def _token_boxes(layout) -> list[np.ndarray]:
    """For each image-token column, the pixel boxes it covers (one per view it belongs to; none for newlines)."""
    cols = layout.positions
    out = [np.zeros((0, 4)) for _ in cols]
    for v in layout.images[0].views:
        idx = layout.column_index(v.positions)
        for k, c in enumerate(idx):
            if v.valid[k]:
                out[c] = np.vstack([out[c], v.boxes[k]])
    return out


def zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    s = x.std()
    return (x - x.mean()) / s if s > 0 else np.zeros_like(x)


def pearson(a, b) -> float:
    return float(np.mean(zscore(a) * zscore(b)))


def _ranks(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):  # average ranks of ties
        m = x == v
        r[m] = r[m].mean()
    return r


def spearman(a, b) -> float:
    return pearson(_ranks(a), _ranks(b))


def topk_overlap(a, b, frac: float = 0.1) -> float:
    k = max(1, int(round(frac * len(a))))
    return len(set(np.argsort(-np.asarray(a))[:k]) & set(np.argsort(-np.asarray(b))[:k])) / k


# ---------------------------------------------------------------------------------------------------- core
@dataclass
class SaliencyReport:
    """Attention and saliency of one answer, and their agreement (all maps ``[image_tokens]``)."""

    question: str
    answer: str
    target: str
    grid: tuple[int, int]
    attention: dict[str, np.ndarray]
    saliency: dict[str, np.ndarray]
    agreement: dict[str, dict[str, dict[str, float]]]  # attention name -> saliency name -> metric -> value
    curves: dict[str, dict[str, list[float]]]  # "deletion"/"insertion" -> order name -> probabilities
    auc: dict[str, dict[str, float]]
    layers: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer, "target": self.target, "grid": list(self.grid),
                "layers": self.layers, "seconds": round(self.seconds, 3),
                "attention": {k: v.round(6).tolist() for k, v in self.attention.items()},
                "saliency": {k: v.round(6).tolist() for k, v in self.saliency.items()},
                "agreement": self.agreement, "auc": self.auc, "curves": self.curves}

    def save(self, out_dir, image=None):
        """Write ``report.json`` and PNG panels (image, attention, each saliency, agreement by layer)."""
        from vlmkit.methods._panels import write_panels

        return write_panels(self, out_dir, image)


class Explainer:
    """Computes a :class:`SaliencyReport`. ``ig_steps``: integrated-gradient steps; ``curve_steps``: points on the
    deletion/insertion curves; ``random_orders``: random baselines averaged; ``batch``: forwards per batch."""

    def __init__(self, vlm, *, ig_steps: int = 16, curve_steps: int = 10, random_orders: int = 3, batch: int = 16,
                 topk: float = 0.1, seed: int = 0):
        self.vlm, self.ig_steps, self.curve_steps = vlm, ig_steps, curve_steps
        self.random_orders, self.batch, self.topk, self.seed = random_orders, batch, topk, seed

    # ---- the explained quantity
    def _logprob(self, images: list, question: str, target: int) -> np.ndarray:
        """Log-probability of ``target`` at the last prompt row for each image (batched, no grad)."""
        out = []
        for i in range(0, len(images), self.batch):
            chunk = images[i:i + self.batch]
            with self.vlm.session(chunk, [question] * len(chunk)) as (inputs, _, _), torch.inference_mode():
                logits = self.vlm.model(**inputs).logits[:, -1].float()
            out.append(torch.log_softmax(logits, -1)[:, target].cpu().numpy())
        return np.concatenate(out)

    @contextmanager
    def _embeddings(self, scale: torch.Tensor | None, image_cols: torch.Tensor):
        """Make the language model's ``inputs_embeds`` a leaf that requires grad; optionally scale the image rows
        of each batch element by ``scale [B]`` (integrated gradients). Yields a dict that receives the leaf."""
        lm = self.vlm.adapter.language_model()
        box = {}

        def pre(module, args, kwargs):
            emb = kwargs.get("inputs_embeds")
            if emb is None:
                return None
            emb = emb.detach()
            if scale is not None:
                s = torch.ones(emb.shape[:2], dtype=emb.dtype)
                s[:, image_cols] = scale[:, None].to(emb.dtype)
                emb = emb * s[..., None]
            emb.requires_grad_(True)
            box["emb"] = emb
            kwargs["inputs_embeds"] = emb
            return args, kwargs

        h = lm.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            yield box
        finally:
            h.remove()

    def _gradients(self, image, question: str, target: int, scales: torch.Tensor | None):
        """(embeddings [B, C, D], gradients [B, C, D]) of the target log-prob at the image-token rows."""
        n = 1 if scales is None else len(scales)
        with self.vlm.session([image] * n, [question] * n) as (inputs, layouts, pads):
            cols = torch.as_tensor(layouts[0].positions + pads[0])
            with torch.enable_grad(), self._embeddings(scales, cols) as box:
                logits = self.vlm.model(**inputs).logits[:, -1].float()
                lp = torch.log_softmax(logits, -1)[:, target].sum()
                emb = box["emb"]
                (grad,) = torch.autograd.grad(lp, emb)
        return emb.detach()[:, cols], grad[:, cols]

    def input_x_gradient(self, image, question, target) -> np.ndarray:
        emb, grad = self._gradients(image, question, target, None)
        return (emb * grad).sum(-1)[0].numpy()

    def integrated_gradients(self, image, question, target) -> np.ndarray:
        """Riemann (midpoint) integrated gradients from a zero baseline of the image-token embeddings."""
        alphas = (torch.arange(self.ig_steps, dtype=torch.float32) + 0.5) / self.ig_steps
        total = None
        for i in range(0, len(alphas), self.batch):
            a = alphas[i:i + self.batch]
            emb, grad = self._gradients(image, question, target, a)  # emb already scaled by a
            full = emb / a[:, None, None]
            part = (grad * full).sum(-1).sum(0)
            total = part if total is None else total + part
        return (total / self.ig_steps).numpy()

    def occlusion(self, image, question, target, boxes, fill, base: float) -> np.ndarray:
        imgs = [_occlude(image, b, fill) for b in boxes]
        return base - self._logprob(imgs, question, target)

    # ---- attention
    def attention(self, image, question):
        full = _FullAttention()
        vlm = self.vlm
        with vlm.intervene(full), vlm.capture(rows="last") as rec:
            vlm.forward([image], [question])
        maps = rec.maps
        last = maps.prefill[:, :, 0].numpy()  # [L, H, C]
        out = {"all_mean": last.mean((0, 1))}
        nl = last.shape[0]
        for l in range(nl):
            out[f"layer{l}"] = last[l].mean(0)
            for h in range(last.shape[1]):
                out[f"layer{l}.head{h}"] = last[l, h]
        if nl >= 2:
            out["first_half"] = last[:nl // 2].mean((0, 1))
            out["second_half"] = last[nl // 2:].mean((0, 1))
        n = full.mean[min(full.mean)].shape[-1]  # prompt length
        roll = torch.eye(n)
        for l in sorted(full.mean):
            a = full.mean[l][0].cpu()
            roll = (0.5 * torch.eye(n) + 0.5 * a) @ roll
        cols = torch.as_tensor(maps.layout.positions)
        out["rollout"] = roll[-1, cols].numpy()
        return out, maps

    # ---- report
    def explain(self, image, question: str) -> SaliencyReport:
        import time

        from vlmkit.io import load_image

        t0 = time.perf_counter()
        image = load_image(image)
        ans = self.vlm.generate([image], [question], max_new_tokens=8)[0]
        if not ans.token_ids:
            raise ValueError(f"the model gave no answer to {question!r}; nothing to explain")
        target = ans.token_ids[0]
        attn, maps = self.attention(image, question)
        layout = maps.layout
        boxes = _token_boxes(layout)
        fill = tuple(int(c) for c in np.asarray(image).reshape(-1, 3).mean(0))
        base = float(self._logprob([image], question, target)[0])
        sal = {"input_x_gradient": self.input_x_gradient(image, question, target),
               "integrated_gradients": self.integrated_gradients(image, question, target),
               "occlusion": self.occlusion(image, question, target, boxes, fill, base)}
        agreement = {a: {s: {"pearson": pearson(av, sv), "spearman": spearman(av, sv),
                             "topk": topk_overlap(av, sv, self.topk)} for s, sv in sal.items()}
                     for a, av in attn.items()}
        orders = {"attention": attn["all_mean"], **sal}
        rng = np.random.default_rng(self.seed)
        curves = {"deletion": {}, "insertion": {}}
        n = len(boxes)
        ks = np.unique(np.linspace(0, n, self.curve_steps + 1).round().astype(int))

        def curve(order, mode):
            imgs = []
            for k in ks:
                chosen = order[:k] if mode == "deletion" else order[k:]
                bx = [boxes[i] for i in chosen]
                imgs.append(_occlude(image, np.vstack(bx) if bx else np.zeros((0, 4)), fill))
            return np.exp(self._logprob(imgs, question, target))

        for name, m in orders.items():
            order = np.argsort(-np.asarray(m), kind="stable")
            for mode in curves:
                curves[mode][name] = curve(order, mode).tolist()
        for mode in curves:
            rand = [curve(rng.permutation(n), mode) for _ in range(self.random_orders)]
            curves[mode]["random"] = np.mean(rand, 0).tolist()
        auc = {mode: {k: float(np.mean(v)) for k, v in c.items()} for mode, c in curves.items()}
        grid = layout.images[0].views[0].grid
        return SaliencyReport(question, ans.text, ans.tokens[0], tuple(grid), attn, sal, agreement, curves, auc,
                              maps.layers, time.perf_counter() - t0)


def explain(image, question: str, *, vlm=None, **params) -> SaliencyReport:
    """Attention vs saliency for the first answer token of ``question`` about ``image`` (default: the default model)."""
    if vlm is None:
        from vlmkit import load

        vlm = load()
    return Explainer(vlm, **params).explain(image, question)
