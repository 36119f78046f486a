"""CARVE: contrastive attention refinement (methods.md §1), written from the spec.

Recorded on a few chosen layers: the last query row's attention onto the image tokens (head mean), for the question
and for a general instruction (cached per image). The contrast ``A_Q / (A_G + λ)``, summed over layers and weighted
over steps, is painted into image pixels (:meth:`AttentionMaps.to_pixels`: each view of a multi-view family into its
pixel boxes), cut to the top ``keep_fraction`` of pixels and the best ``max_regions`` connected regions; the image is
masked, cropped and enlarged, and the model answers on it (``refined_only``, the paper) or on original + refined in
one prompt (``original_plus_refined``, the official code).

Passes: with ``step_mode="first"`` + ``refined_only`` (defaults), one prefill-only capture (plus the general row in
the same batch on a new image) and one batched generate giving the original and the refined answers. Otherwise the
captured question pass generates the original answer (the general row rides in its batch, stopped after
``general_max_new_tokens``), then the final answer is generated.

Our choices [inferred]: ``lam`` is relative to each general row's mean (``lam_relative=False, lam=1e-8`` gives the
code's absolute λ); each (layer, step) map is normalised to sum 1 before fusion; the crop box keeps an aspect ratio
within 1:8; enlargement is capped at 4x the original area, and ``enlarge="auto"`` skips it for fixed-resolution
LLaVA-1.5-style models (``model_type == "llava"``: the processor resizes to one size, so enlarging first only costs
time); the pixel map is computed at 8 px per token of the finest view (at least 64, at most ``work_max_side`` px long)
and upsampled (nearest) to the image.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmkit.attention.hooks import Intervention, resolve_layers
from vlmkit.attention.maps import AttentionMaps
from vlmkit.errors import InputError
from vlmkit.models._layout import ImageLayout, Layout, View

GENERAL_INSTRUCTION = "Write a general description of the image."
STEP_MODES = ("first", "last", "weighted")
FINAL_INPUTS = ("refined_only", "original_plus_refined")
_MAX_ASPECT = 8.0
_MAX_AREA_FACTOR = 4.0


@dataclass
class CarveResult:
    """What :func:`carve` returns. ``mask`` bool ``[H, W]`` and ``fused_map`` float32 ``[H, W]`` are over the original
    image; ``box`` is ``(x0, y0, x1, y1)`` in pixels with exclusive ends; ``timings`` are seconds per stage."""

    answer: str
    original_answer: str
    refined_image: Image.Image
    mask: np.ndarray
    box: tuple[int, int, int, int]
    fused_map: np.ndarray
    layers: list[int]
    steps: int
    general_cached: bool
    final_prompt: str
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, heatmap_path, image) -> list[Path]:
        """Write the contrast map over ``image`` (the original) to ``heatmap_path``, and next to it
        ``<stem>.refined.png`` (the refined image) and ``<stem>.contrast.png`` (the map alone). Returns the paths."""
        from vlmkit.viz import colorize, heat_overlay

        path = Path(heatmap_path)
        out = [path, path.with_name(path.stem + ".refined.png"), path.with_name(path.stem + ".contrast.png")]
        heat_overlay(image, self.fused_map).save(out[0])
        self.refined_image.save(out[1])
        Image.fromarray(colorize(self.fused_map)).save(out[2])
        return out


# ---------------------------------------------------------------------------------------------- pixel-map utilities
def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a bool ``[H, W]`` mask. Returns int32 labels ``[H, W]`` (0 = background, components
    1..n in raster order of their first pixel) and ``n``. Works on horizontal runs with a union-find."""
    if connectivity not in (4, 8):
        raise InputError(f"connectivity={connectivity!r}: use 4 or 8")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise InputError(f"mask of shape {mask.shape}: expected [H, W]")
    h, w = mask.shape
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)  # [H, W+1]
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # exclusive; same raster order as starts
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    reach = 1 if connectivity == 8 else 0
    first = np.searchsorted(rows, np.arange(h + 1))  # runs of row r: first[r]:first[r+1]
    for r in range(1, h):
        i, i_end = int(first[r - 1]), int(first[r])
        j, j_end = int(first[r]), int(first[r + 1])
        while i < i_end and j < j_end:  # two runs touch if their column spans overlap (diagonally for 8)
            if starts[j] < ends[i] + reach and starts[i] < ends[j] + reach:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    # A root is its set's smallest run index, so numbering roots in order numbers components in raster order.
    roots, ids = np.unique([find(k) for k in range(len(rows))], return_inverse=True)
    length = ends - starts
    offset = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
    labels = np.zeros(h * w, np.int32)
    labels[np.repeat(rows * w + starts, length) + offset] = np.repeat(ids + 1, length)
    return labels.reshape(h, w), len(roots)


def top_fraction_mask(score: np.ndarray, fraction: float) -> np.ndarray:
    """Bool mask of the pixels strictly above the value at rank ``ceil(fraction * N)`` (so at most that many pixels
    and whole ties); if that keeps nothing (the top is one big tie), the first ``k`` pixels in a stable sort."""
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"keep_fraction={fraction!r}: must be in (0, 1]")
    flat = np.asarray(score, dtype=np.float64).ravel()
    k = max(1, int(math.floor(fraction * flat.size + 1e-9)))
    if k >= flat.size:
        return np.ones(score.shape, bool)
    kth = np.partition(flat, flat.size - k)[flat.size - k]
    keep = flat > kth
    if not keep.any():
        keep = np.zeros(flat.size, bool)
        keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep.reshape(score.shape)


def best_regions(score: np.ndarray, keep: np.ndarray, max_regions: int, *, connectivity: int = 8,
                 by: str = "sum") -> np.ndarray:
    """The ``max_regions`` connected components of ``keep`` with the largest summed ``score`` (``by="sum"``) or area
    (``by="area"``). Returns a bool ``[H, W]`` mask, a subset of ``keep``."""
    if max_regions < 1:
        raise InputError(f"max_regions={max_regions!r}: must be >= 1")
    if by not in ("sum", "area"):
        raise InputError(f"region_score={by!r}: use 'sum' or 'area'")
    labels, n = label_components(keep, connectivity)
    if n <= max_regions:
        return labels > 0
    weights = np.asarray(score, np.float64).ravel() if by == "sum" else None
    totals = np.bincount(labels.ravel(), weights=weights, minlength=n + 1)[1:]
    best = np.argsort(-totals, kind="stable")[:max_regions] + 1
    return np.isin(labels, best)


# ------------------------------------------------------------------------------------------------ contrast math
def head_mean_rows(maps: AttentionMaps) -> torch.Tensor:
    """``[steps, layers, image_tokens]``: the last prompt row (step 0) then each decode row, averaged over heads."""
    if maps.prefill.shape[2] < 1:
        raise ValueError("these maps hold no prompt row; capture with rows='last'")
    first = maps.prefill[:, :, -1].mean(1)[None]  # [1, L, C]
    return torch.cat([first, maps.decode.mean(2)]).float()


def step_weights(steps: int, mode: str) -> torch.Tensor:
    """``[steps]`` weights: ``first`` (1, 0, ...), ``last`` (..., 0, 1) or ``weighted`` (w_t = t + 1), sum 1."""
    if mode not in STEP_MODES:
        raise InputError(f"step_mode={mode!r}: use one of {STEP_MODES}")
    w = torch.zeros(steps)
    if mode == "first":
        w[0] = 1.0
    elif mode == "last":
        w[-1] = 1.0
    else:
        w = torch.arange(1, steps + 1, dtype=torch.float32)
    return w / w.sum()


def fuse_contrast(a_q: torch.Tensor, a_g: torch.Tensor, *, step_mode: str = "first", lam: float = 0.05,
                  lam_relative: bool = True, normalize: bool = True) -> torch.Tensor:
    """Fused contrast per image token, ``[image_tokens]``.

    ``a_q``, ``a_g``: ``[steps, layers, image_tokens]`` head-mean rows of the question and general passes; only the
    steps both have are used. Per (step, layer): ``a_q / (a_g + λ)`` with λ times the mean of that ``a_g`` row when
    ``lam_relative``; normalised to sum 1 if ``normalize``; summed over layers, weighted over steps.
    """
    if a_q.shape[1:] != a_g.shape[1:]:
        raise ValueError(f"question rows {tuple(a_q.shape)} and general rows {tuple(a_g.shape)} disagree")
    steps = min(a_q.shape[0], a_g.shape[0])
    q, g = a_q[:steps].double(), a_g[:steps].double()
    eps = lam * g.mean(-1, keepdim=True) if lam_relative else torch.full_like(g[..., :1], lam)
    c = q / (g + eps).clamp_min(1e-30)
    if normalize:
        c = c / c.sum(-1, keepdim=True).clamp_min(1e-30)
    w = step_weights(steps, step_mode).double()
    return torch.einsum("t,tlc->c", w, c).float()


def _scaled_layout(layout: Layout, scale: float) -> Layout:
    """The layout of the same tokens over the image resized by ``scale`` (pixel boxes and sizes scaled)."""
    ims = []
    for im in layout.images:
        w, h = im.size
        views = [View(v.name, v.positions, v.grid, v.boxes * scale) for v in im.views]
        ims.append(ImageLayout((max(1, round(w * scale)), max(1, round(h * scale))), views, im.extra_positions))
    return Layout(ims)


def pixel_map(values: torch.Tensor, layout: Layout, work_max_side: int) -> np.ndarray:
    """``values [image_tokens]`` painted into the first image's pixels, ``[h, w]`` with ``max(h, w) <= work_max_side``
    (the full image when it is smaller)."""
    w, h = layout.images[0].size
    scale = min(1.0, work_max_side / max(w, h))
    lay = layout if scale == 1.0 else _scaled_layout(layout, scale)
    holder = AttentionMaps(prefill=torch.zeros(0, 0, 0, 0), decode=torch.zeros(0, 0, 0, 0), layers=[], rows=[],
                           layout=lay)
    return holder.to_pixels(values)


def _upsample(a: np.ndarray, height: int, width: int) -> np.ndarray:
    if a.shape == (height, width):
        return a
    ys = np.minimum((np.arange(height) + 0.5) * a.shape[0] / height, a.shape[0] - 1).astype(np.int64)
    xs = np.minimum((np.arange(width) + 0.5) * a.shape[1] / width, a.shape[1] - 1).astype(np.int64)
    return np.take(np.take(a, ys, axis=0), xs, axis=1)  # two 1-D takes: ~3x faster than one 2-D index


def mask_box(mask: np.ndarray, margin: float = 0.0) -> tuple[int, int, int, int]:
    """Bounding box ``(x0, y0, x1, y1)`` (exclusive ends) of a non-empty mask, grown by ``margin`` of its size on
    each side and until its aspect ratio is within 1:8, clipped to the image."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    x0, x1, y0, y1 = float(xs[0]), float(xs[-1] + 1), float(ys[0]), float(ys[-1] + 1)
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    x0, x1, y0, y1 = x0 - mx, x1 + mx, y0 - my, y1 + my
    need_w, need_h = (y1 - y0) / _MAX_ASPECT - (x1 - x0), (x1 - x0) / _MAX_ASPECT - (y1 - y0)
    if need_w > 0:
        x0, x1 = x0 - need_w / 2, x1 + need_w / 2
    if need_h > 0:
        y0, y1 = y0 - need_h / 2, y1 + need_h / 2
    return (max(0, math.floor(x0)), max(0, math.floor(y0)), min(width, math.ceil(x1)), min(height, math.ceil(y1)))


def refine_image(image: Image.Image, mask: np.ndarray, box, *, enlarge: bool = True, fill=(0, 0, 0)) -> Image.Image:
    """Pixels outside ``mask`` set to ``fill``, cropped to ``box``, then (``enlarge``) resized with Lanczos so it
    covers the original size (scale ``max(W/w, H/h)``, capped at 4x the original area)."""
    x0, y0, x1, y1 = box
    keep = Image.fromarray(mask[y0:y1, x0:x1].astype(np.uint8) * 255, mode="L")
    out = Image.new("RGB", (x1 - x0, y1 - y0), tuple(int(c) for c in fill))
    out.paste(image.convert("RGB").crop(box), (0, 0), keep)
    if enlarge:
        big_w, big_h = image.size
        w, h = out.size
        scale = min(max(big_w / w, big_h / h), math.sqrt(_MAX_AREA_FACTOR * big_w * big_h / (w * h)))
        if scale > 1.0:
            out = out.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    return out


# ------------------------------------------------------------------------------------------------ generation helpers
class _RowStops(Intervention):
    """Per-row stops inside one batched generate: row ``b`` is sent to EOS after ``caps[b]`` tokens, and row ``f``
    of ``follow = {f: lead}`` once row ``lead`` has produced EOS. Edits no attention (``layers=[]``): attention rows
    computed before a forced token are those of an unforced run."""

    def __init__(self, caps: dict[int, int], follow: dict[int, int], eos: list[int]) -> None:
        super().__init__(layers=[])
        self.caps, self.follow, self.eos = caps, follow, eos

    def processors(self, vlm, batch, inputs) -> list:
        from transformers import LogitsProcessor

        start, caps, follow, eos = batch.prompt_len, self.caps, self.follow, self.eos

        class Stop(LogitsProcessor):
            def __call__(self, input_ids, scores):
                made = input_ids[:, start:]
                done = [b for b, cap in caps.items() if made.shape[1] >= cap - 1]
                if follow:
                    ended = torch.isin(made, torch.tensor(eos, device=made.device)).any(1)
                    done += [f for f, lead in follow.items() if bool(ended[lead])]
                if done:
                    scores = scores.clone()
                    scores[done] = float("-inf")
                    scores[done, eos[0]] = 0.0
                return scores

        return [Stop()]


def _eos_ids(vlm) -> list[int]:
    eos = vlm.model.generation_config.eos_token_id
    return [int(e) for e in ([eos] if isinstance(eos, int) else (eos or []))]


def _answer_multi_image(vlm, images: list, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer to one prompt holding several images. ``VLM.generate`` takes one image per sample, so this
    runs the processor and ``model.generate`` directly (no capture, no interventions)."""
    tok = vlm.processor.tokenizer
    settings = vlm.generation.replace(max_new_tokens=max_new_tokens)
    with vlm._lock:
        inputs = vlm.adapter.encode([list(images)], [prompt]).to(vlm.device)
        vlm.adapter.reset_state()
        try:
            with torch.inference_mode():
                out = vlm.model.generate(**inputs, **vlm._generate_kwargs(settings))
        finally:
            vlm.adapter.reset_state()
    new, stops = out[0, inputs["input_ids"].shape[1]:].tolist(), set(_eos_ids(vlm))
    for i, t in enumerate(new):
        if t in stops:
            new = new[:i + 1]
            break
    return tok.decode(new, skip_special_tokens=True).strip()


@dataclass
class _General:
    rows: torch.Tensor  # [steps, layers, image_tokens]
    complete: bool  # the general answer ended before its cap: no more rows exist
    features: dict = field(default_factory=dict)  # the image's encoder output (FamilyAdapter.reuse_image_features)


# ------------------------------------------------------------------------------------------------ the method
class Carve:
    """CARVE with fixed parameters and a per-image cache of the general-instruction pass (bounded LRU, on this
    object). ``Carve(**params)(image, question, vlm=vlm) -> CarveResult``.

    Parameters: ``layers`` (resolve_layers spec; default the paper's 20..25 of 32 as a fraction of depth, at least
    one layer), ``lam`` / ``lam_relative``, ``normalize``, ``step_mode`` (first | last | weighted),
    ``keep_fraction`` (top-p), ``max_regions`` (K), ``connectivity`` (4 | 8), ``region_score`` (sum | area),
    ``margin``, ``enlarge``, ``fill``, ``final_input`` (refined_only | original_plus_refined),
    ``general_instruction``, ``answer_suffix`` (appended to both prompts), ``max_new_tokens`` (None: the VLM's),
    ``general_max_new_tokens`` (steps recorded for the general pass), ``final_batch`` (default False: the question
    pass generates the original answer, then the refined answer alone; True with first + refined_only: a
    prefill-only question pass, then original and refined answers in one batch — slower on the default model:
    ``bench/carve_latency.py --all-configs``), ``work_max_side``, ``cache_size``.
    """

    def __init__(self, *, layers=(20 / 32, 26 / 32), lam: float = 0.05, lam_relative: bool = True,
                 normalize: bool = True, step_mode: str = "first", keep_fraction: float = 0.2, max_regions: int = 3,
                 connectivity: int = 8, region_score: str = "sum", margin: float = 0.0, enlarge="auto",
                 fill=(0, 0, 0), final_input: str = "refined_only", general_instruction: str = GENERAL_INSTRUCTION,
                 answer_suffix: str = "", max_new_tokens: int | None = None, general_max_new_tokens: int = 8,
                 final_batch: bool = False, work_max_side: int = 256, cache_size: int = 32) -> None:
        given = dict(locals())
        rules = {"step_mode": (step_mode in STEP_MODES, f"one of {STEP_MODES}"),
                 "final_input": (final_input in FINAL_INPUTS, f"one of {FINAL_INPUTS}"),
                 "keep_fraction": (0.0 < keep_fraction <= 1.0, "in (0, 1]"), "max_regions": (max_regions >= 1, ">= 1"),
                 "connectivity": (connectivity in (4, 8), "4 or 8"),
                 "region_score": (region_score in ("sum", "area"), "'sum' or 'area'"), "lam": (lam >= 0, ">= 0"),
                 "margin": (margin >= 0, ">= 0"), "enlarge": (enlarge in (True, False, "auto"), "True/False/'auto'"),
                 "general_max_new_tokens": (general_max_new_tokens >= 1, ">= 1"),
                 "work_max_side": (work_max_side >= 8, ">= 8"), "cache_size": (cache_size >= 0, ">= 0")}
        bad = [f"{k}={given[k]!r} (use {want})" for k, (ok, want) in rules.items() if not ok]
        if bad:
            raise InputError("bad CARVE parameter: " + "; ".join(bad))
        self.layers, self.lam, self.lam_relative, self.normalize = layers, float(lam), lam_relative, normalize
        self.step_mode, self.keep_fraction, self.max_regions = step_mode, float(keep_fraction), int(max_regions)
        self.connectivity, self.region_score, self.margin = connectivity, region_score, float(margin)
        self.enlarge, self.fill, self.final_input = enlarge, tuple(fill), final_input
        self.general_instruction, self.answer_suffix = general_instruction, answer_suffix
        self.max_new_tokens, self.general_max_new_tokens = max_new_tokens, int(general_max_new_tokens)
        self.final_batch, self.work_max_side, self.cache_size = final_batch, int(work_max_side), int(cache_size)
        self._cache: OrderedDict[tuple, _General] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._vlm = None
        self.hits = self.misses = 0

    def params(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("hits", "misses")}

    def __repr__(self) -> str:
        return "Carve(" + ", ".join(f"{k}={v!r}" for k, v in self.params().items()) + ")"

    # ------------------------------------------------------------------ cache
    def cache_info(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache), "max_size": self.cache_size}

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def _get(self, key: tuple) -> _General | None:
        with self._cache_lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
            return entry

    def _store(self, key: tuple, entry: _General) -> None:
        with self._cache_lock:
            self._cache[key] = entry
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    # ------------------------------------------------------------------ pieces
    def resolve_layers(self, num_layers: int) -> list[int]:
        """Chosen layer indices for a model of ``num_layers`` layers (never empty)."""
        chosen = resolve_layers(self.layers, num_layers)
        if not chosen and isinstance(self.layers, tuple):
            chosen = [min(max(int(round(self.layers[0] * num_layers)), 0), num_layers - 1)]
        if not chosen:
            raise InputError(f"layers={self.layers!r} selects no layer of a {num_layers}-layer model")
        return chosen

    def final_prompt(self, vlm, question: str) -> str:
        """The exact prompt of the final answer: one image (refined) or two (original, then refined)."""
        images = 2 if self.final_input == "original_plus_refined" else 1
        content = [{"type": "image"}] * images + [{"type": "text", "text": question + self.answer_suffix}]
        return vlm.prompt(messages=[{"role": "user", "content": content}])

    def work_side(self, layout: Layout) -> int:
        """Long side of the working map: the map is constant over each token's box, so 8 px per token of the finest
        view (at least 64 px) keeps every token boundary; never above ``work_max_side``."""
        width, height = layout.images[0].size
        finest = max(max(v.grid[0] * height / max(1e-9, np.ptp(v.boxes[:, [1, 3]])),
                         v.grid[1] * width / max(1e-9, np.ptp(v.boxes[:, [0, 2]])))
                     for v in layout.images[0].views)
        return int(min(self.work_max_side, max(64, 8 * math.ceil(finest))))

    def localize(self, a_q: torch.Tensor, a_g: torch.Tensor, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
        """Fused map and mask over the image of ``layout``: ``(fused [H, W] float32, mask [H, W] bool)`` from the
        head-mean rows ``[steps, layers, image_tokens]`` of the question and general passes."""
        values = fuse_contrast(a_q, a_g, step_mode=self.step_mode, lam=self.lam, lam_relative=self.lam_relative,
                               normalize=self.normalize)
        small = pixel_map(values, layout, self.work_side(layout))
        keep = top_fraction_mask(small, self.keep_fraction)
        small_mask = best_regions(small, keep, self.max_regions, connectivity=self.connectivity,
                                  by=self.region_score)
        width, height = layout.images[0].size
        return _upsample(small.astype(np.float32), height, width), _upsample(small_mask, height, width)

    # ------------------------------------------------------------------ the call
    def __call__(self, image, question: str, *, vlm=None) -> CarveResult:
        """Run CARVE on one image and question (see the module docstring for the passes)."""
        from vlmkit.io import load_image

        if not isinstance(question, str) or not question.strip():
            raise InputError(f"question={question!r}: expected a non-empty string")
        if vlm is None:
            if self._vlm is None:
                from vlmkit.models.vlm import load

                self._vlm = load()
            vlm = self._vlm
        t_start = time.perf_counter()
        pil = load_image(image)
        q_text, g_text = question + self.answer_suffix, self.general_instruction + self.answer_suffix
        layers = self.resolve_layers(vlm.adapter.num_layers)
        digest = hashlib.sha256(pil.tobytes()).hexdigest()[:32]  # SHA-NI: ~2x faster than blake2b here
        key = (id(vlm.model), vlm.name, pil.size, digest, g_text, tuple(layers))
        cap = 1 if self.step_mode == "first" else self.general_max_new_tokens  # general rows ever needed
        entry = self._get(key)
        fast = self.step_mode == "first" and self.final_input == "refined_only" and self.final_batch
        max_new = self.max_new_tokens or vlm.generation.max_new_tokens
        q_cap = 1 if fast else max_new
        # New image: the general row rides in the question's batch, stopped at its cap or one step after the
        # question ends (later steps would not be used). A cached entry shorter than ``cap`` may still suffice.
        texts, caps = ([q_text], [q_cap]) if entry is not None else ([q_text, g_text], [q_cap, cap])
        longest = max(caps)
        short = {b: c for b, c in enumerate(caps) if c < longest}
        follow = {1: 0} if entry is None and cap > 1 else {}
        extra = [_RowStops(short, follow, _eos_ids(vlm))] if short or follow else []
        t0 = time.perf_counter()
        rows = [-1] if self.step_mode == "first" else "last"  # "first" needs only the last prompt row
        features = entry.features if entry is not None else {}
        with vlm.capture(layers=layers, rows=rows) as rec, vlm.intervene(*extra), \
                vlm.adapter.reuse_image_features(features), vlm.adapter.reuse_processed_image(pil, features):
            answers = vlm.generate([pil] * len(texts), texts, max_new_tokens=longest)
        a_q = head_mean_rows(rec.samples[0])
        general_cached = entry is not None
        if entry is None:
            n_g, n_q = len(answers[1].token_ids), len(answers[0].token_ids)
            entry = _General(head_mean_rows(rec.samples[1])[:cap], complete=n_g < cap and n_g <= n_q,
                             features=features)
            self._store(key, entry)
        elif not entry.complete and entry.rows.shape[0] < min(cap, a_q.shape[0]):  # too short for this answer
            with vlm.capture(layers=layers, rows="last") as rec_g, vlm.adapter.reuse_image_features(features):
                n_g = len(vlm.generate([pil], [g_text], max_new_tokens=cap)[0].token_ids)
            entry = _General(head_mean_rows(rec_g.maps)[:cap], complete=n_g < cap, features=features)
            self._store(key, entry)
            general_cached = False
        with self._cache_lock:
            self.hits, self.misses = self.hits + general_cached, self.misses + (not general_cached)
        timings = {"prepare": t0 - t_start, "capture": time.perf_counter() - t0}
        t0 = time.perf_counter()
        fused, mask = self.localize(a_q, entry.rows, rec.samples[0].layout)
        box = mask_box(mask, self.margin)
        enlarge = self.enlarge if self.enlarge != "auto" else vlm.family != "llava"
        refined = refine_image(pil, mask, box, enlarge=enlarge, fill=self.fill)
        timings["map"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prompt = self.final_prompt(vlm, question)
        if fast:  # the original and the refined answer in one batch (the original's encoder output reused)
            with vlm.adapter.reuse_image_features(entry.features):
                both = vlm.generate([pil, refined], [q_text, q_text], max_new_tokens=max_new)
            original, answer = both[0].text, both[1].text
        else:
            original = answers[0].text
            if self.final_input == "refined_only":
                answer = vlm.generate([refined], [q_text], max_new_tokens=max_new)[0].text
            else:
                answer = _answer_multi_image(vlm, [pil, refined], prompt, max_new)
        timings["final"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        steps = min(a_q.shape[0], entry.rows.shape[0])
        return CarveResult(answer=answer, original_answer=original, refined_image=refined, mask=mask, box=box,
                           fused_map=fused, layers=layers, steps=steps, general_cached=general_cached,
                           final_prompt=prompt, timings=timings)


def carve(image, question: str, *, vlm=None, **params) -> CarveResult:
    """CARVE on one image and question with ``vlm`` (None: the embedded default model); ``params`` as for
    :class:`Carve`. To reuse the general-instruction pass across questions on the same image, keep one
    :class:`Carve` object and call it."""
    return Carve(**params)(image, question, vlm=vlm)


class CarveVLM:
    """A VLM whose answers go through CARVE, for the eval runner (``vlmkit eval pope --method carve``).

    One :class:`Carve` object serves the whole run, so its general-pass cache covers repeated images.
    """

    def __init__(self, vlm, carver: "Carve") -> None:
        self.vlm, self.carver = vlm, carver
        self.name = f"{getattr(vlm, 'name', 'vlm')}+carve"
        self.generation = getattr(vlm, "generation", None)

    def prompt(self, question: str) -> str:
        return self.vlm.prompt(question)

    def ask_batch(self, images, questions, **gen) -> list[str]:
        return [self.carver(im, q, vlm=self.vlm).answer for im, q in zip(images, questions)]

    def ask(self, image, question, **gen) -> str:
        return self.ask_batch([image], [question], **gen)[0]
