"""VL-SAM: open-ended detection and segmentation from a VLM's attention used as point prompts for SAM.

``detect(image)`` asks the VLM which objects it sees (or takes ``names``), computes each object word's attention
flow map (:mod:`vlmkit.grounding.flow`) for an ensemble of templated questions, turns every map into a positive /
negative point pair (:mod:`vlmkit.grounding.points`), segments with SAM, refines twice (mask cascade, then points
re-sampled inside the mask), repeats on the four corner crops, and merges everything with per-label box NMS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vlmkit.errors import InputError
from vlmkit.grounding.names import ExactNames, NameMapper, parse_names
from vlmkit.grounding.points import box_iou, clean_mask, mask_box, points_from_map

LIST_QUESTION = "What objects are in the image?"
#: The question ensemble: ``{name}`` is the object name, ``{first}`` / ``{last}`` its first / last word (templates
#: that need two words are skipped for one-word names). The default model answers all of these.
QUESTIONS = (LIST_QUESTION, "Is there a {name} in the image?", "Where is the {name}?", "What color is the {last}?",
             "What shape is the {first} object?")
EXIST_QUESTION = "Is there a {name} in the image?"


@dataclass
class Detection:
    """One detected object.

    Attributes:
        label: object name (after the name mapper). score: confidence in [0, 1].
        box: ``(x0, y0, x1, y1)`` pixels of the original image, exclusive end.
        mask: bool ``[H, W]`` at the original image size.
        point: the positive point prompt ``(x, y)`` of the kept candidate; source: where it came from.
    """

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray
    point: tuple[float, float] | None = None
    source: dict = field(default_factory=dict)

    def to_coco(self, image_id: int, category_id: int) -> dict:
        """A COCO result dict (``bbox`` as x, y, w, h; ``segmentation`` as RLE)."""
        x0, y0, x1, y1 = self.box
        return {"image_id": int(image_id), "category_id": int(category_id), "label": self.label,
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "score": round(float(self.score), 5), "segmentation": encode_rle(self.mask)}


@dataclass
class _Candidate:
    label: str
    score: float
    box: tuple[float, float, float, float]  # work-image pixels
    mask: np.ndarray  # bool, view pixels
    offset: tuple[int, int]
    point: tuple[float, float]
    source: dict
    votes: int = 1


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE of a bool mask: compressed (pycocotools) when available, else uncompressed counts."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        from vlmkit.data.scenes import rle_encode

        return rle_encode(mask)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _templates(questions) -> list[str]:
    if questions is None:
        return list(QUESTIONS)
    if isinstance(questions, int):
        if questions < 1:
            raise InputError(f"questions={questions}: need at least one question")
        return list(QUESTIONS[:questions])
    return list(questions)


def _fill(template: str, name: str) -> str | None:
    words = name.split()
    if ("{first}" in template or "{last}" in template) and len(words) < 2:
        return None
    return template.format(name=name, first=words[0], last=words[-1])


def _views(image: Image.Image, multiscale: bool, min_side: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """``(name, (x0, y0, x1, y1))`` of the full image and, with ``multiscale``, its four half-size corner crops."""
    w, h = image.size
    views = [("full", (0, 0, w, h))]
    if multiscale and min(w, h) >= 2 * min_side:
        hw, hh = (w + 1) // 2, (h + 1) // 2
        views += [("top_left", (0, 0, hw, hh)), ("top_right", (w - hw, 0, w, hh)),
                  ("bottom_left", (0, h - hh, hw, h)), ("bottom_right", (w - hw, h - hh, w, h))]
    return views


def _segment(seg, m: np.ndarray, *, threshold: float, negative: str, refine: int, multimask: str):
    """Point pair from map ``m`` -> SAM -> up to two refinement rounds. Returns ``(mask, score, point)`` or None."""
    pair = points_from_map(m, threshold=threshold, negative=negative)
    if pair is None:
        return None
    pts, lab = pair.arrays()
    multi = multimask == "always" or (multimask == "auto" and len(pts) == 1)
    res = seg.predict(pts, lab, multimask=multi)
    k = res.best()
    mask, score, logit = res.masks[k], float(res.scores[k]), res.logits[k][None]
    if refine >= 1 and mask.any():  # cascade: the mask goes back in as a prompt
        res = seg.predict(pts, lab, mask_input=logit, multimask=False)
        mask, score, logit = res.masks[0], float(res.scores[0]), res.logits[0][None]
    if refine >= 2 and mask.any():  # attention restricted to the mask, points sampled again
        pair2 = points_from_map(m, negative=negative, within=mask)
        if pair2 is not None:
            pts, lab = pair2.arrays()
            res = seg.predict(pts, lab, mask_input=logit, multimask=False)
            mask, score = res.masks[0], float(res.scores[0])
    return mask, score, (float(pts[0, 0]), float(pts[0, 1]))


def _ask(vlm, images, questions, max_new_tokens):
    return [a.text for a in vlm.generate(images, questions, max_new_tokens=max_new_tokens)]


def _view_candidates(vlm, seg, view_img: Image.Image, vname: str, offset, names, templates, *, open_ended, verify,
                     opts, max_new_tokens) -> list[_Candidate]:
    from vlmkit.grounding.flow import word_maps

    listed = None
    if open_ended or LIST_QUESTION in templates:
        listed = _ask(vlm, [view_img], [LIST_QUESTION], max_new_tokens)[0]
    if open_ended:
        names = parse_names(listed)
    if not names:
        return []
    jobs = []  # [name, question, answer or None]
    for n in names:
        for t in templates:
            q = _fill(t, n)
            if q is not None:
                jobs.append([n, q, listed if q == LIST_QUESTION else None])
    if verify:
        exist = _ask(vlm, [view_img] * len(names), [EXIST_QUESTION.format(name=n) for n in names], max_new_tokens)
        keep = {n for n, a in zip(names, exist) if not a.strip().lower().startswith("no")}
        jobs = [j for j in jobs if j[0] in keep]
    todo = [j for j in jobs if j[2] is None]
    if todo:
        for j, a in zip(todo, _ask(vlm, [view_img] * len(todo), [j[1] for j in todo], max_new_tokens)):
            j[2] = a
    if not jobs:
        return []
    maps = word_maps(vlm, [view_img] * len(jobs), [j[1] for j in jobs], [j[2] for j in jobs], [j[0] for j in jobs],
                     rows=opts["rows"], variants=(opts["variant"],))
    seg.set_image(np.asarray(view_img))
    out = []
    for (name, q, a), wm in zip(jobs, maps):
        if not wm.found:
            continue
        got = _segment(seg, wm.to_pixels(opts["variant"]), threshold=opts["threshold"], negative=opts["negative"],
                       refine=opts["refine"], multimask=opts["multimask"])
        if got is None:
            continue
        mask, score, point = got
        if opts["clean"]:
            mask = clean_mask(mask, point)
        box = mask_box(mask)
        area = mask.mean()
        if box is None or not opts["min_area"] <= area <= opts["max_area"] or mask.sum() < opts["min_pixels"] \
                or score < opts["min_sam_score"]:
            continue
        ox, oy = offset
        out.append(_Candidate(name, score, (box[0] + ox, box[1] + oy, box[2] + ox, box[3] + oy), mask, offset,
                              (point[0] + ox, point[1] + oy), {"view": vname, "question": q, "answer": a}))
    return out


def _nms(cands: list[_Candidate], iou: float) -> list[_Candidate]:
    """Greedy per-label box NMS by score; each kept candidate counts the candidates it suppressed as votes."""
    kept: list[_Candidate] = []
    for c in sorted(cands, key=lambda c: -c.score):
        for k in kept:
            if k.label == c.label and box_iou(k.box, c.box) > iou:
                k.votes += 1
                break
        else:
            kept.append(c)
    return kept


def detect(image, *, vlm=None, segmenter=None, names: list[str] | None = None, mapper: NameMapper | None = None,
           questions=None, variant: str = "flow_reg", rows: str = "auto", threshold: float = 0.5,
           negative: str = "min", refine: int = 2, multiscale: bool = True, multimask: str = "auto",
           nms_iou: float = 0.5, min_score: float = 0.0, min_sam_score: float = 0.5, min_area: float = 0.001,
           max_area: float = 0.9, min_pixels: int = 4, clean: bool = True,
           verify: bool = False, work_side: int = 1024, min_side: int = 8,
           max_new_tokens: int = 48) -> list[Detection]:
    """Detect and segment objects in ``image`` (path, PIL image or array).

    Open-ended when ``names`` is None (the VLM lists the objects of every view); open-vocabulary when ``names`` is
    given. ``questions``: None (the whole ensemble :data:`QUESTIONS`), an int (the first k templates) or a list of
    templates. ``variant``: "naive" | "flow" | "flow_reg" attention (see :mod:`vlmkit.grounding.flow`); ``rows``:
    which rows give the word's map (see :class:`~vlmkit.grounding.flow.FlowRecorder`). ``threshold``: map
    threshold (fraction of its range) for the positive region; ``negative``: "min" | "random" | "none".
    ``refine``: 0, 1 (mask cascade) or 2 (+ points re-sampled inside the mask). ``multiscale``: also the four
    half-size corner crops. ``multimask``: "auto" (three masks only for a lone positive point), "always", "never".
    ``mapper``: maps generated names to categories (default: keep names; see :mod:`vlmkit.grounding.names`);
    unmapped names are dropped. ``verify``: drop, in each view, the names the VLM answers "no" to when asked whether
    they are in it. ``clean``: keep only the mask component that holds the positive point. Candidates whose SAM
    predicted IoU is below ``min_sam_score`` or whose mask covers less than ``min_area`` / more than ``max_area`` of
    its view are dropped before NMS. Images smaller than ``min_side`` px give ``[]``; images larger than
    ``work_side`` are processed at that size and masks scaled back.

    Returns detections sorted by score: SAM's predicted IoU x votes / (votes + 1), where votes counts the
    candidates (questions x views) merged into the detection by NMS.
    """
    from vlmkit.io import load_image

    if variant not in ("naive", "flow", "flow_reg"):
        raise InputError(f"variant={variant!r}: use 'naive', 'flow' or 'flow_reg'")
    if refine not in (0, 1, 2):
        raise InputError(f"refine={refine!r}: use 0, 1 or 2")
    img = load_image(image)
    W, H = img.size
    if min(W, H) < min_side:
        return []
    if vlm is None:
        from vlmkit.models.vlm import load

        vlm = load()
    if segmenter is None:
        from vlmkit.grounding.segmenters import load_segmenter

        segmenter = load_segmenter()
    scale = min(1.0, work_side / max(W, H))
    work = img if scale == 1.0 else img.resize((max(1, round(W * scale)), max(1, round(H * scale))), Image.BILINEAR)
    templates = _templates(questions)
    opts = dict(variant=variant, rows=rows, threshold=threshold, negative=negative, refine=refine,
                multimask=multimask, min_area=min_area, max_area=max_area, min_pixels=min_pixels, clean=clean,
                min_sam_score=min_sam_score)
    given = None if names is None else [n for n in dict.fromkeys(str(n).strip().lower() for n in names) if n]
    cands: list[_Candidate] = []
    for vname, (x0, y0, x1, y1) in _views(work, multiscale, min_side):
        view = work.crop((x0, y0, x1, y1)) if vname != "full" else work
        try:
            cands += _view_candidates(vlm, segmenter, view, vname, (x0, y0), given, templates,
                                      open_ended=given is None, verify=verify, opts=opts,
                                      max_new_tokens=max_new_tokens)
        except InputError:
            if vname == "full":
                raise
    mapper = mapper or ExactNames()
    mapped = []
    for c in cands:
        lab = mapper(c.label)
        if lab is not None:
            c.label = lab
            mapped.append(c)
    dets = [d for d in (_finish(c, work.size, (W, H)) for c in _nms(mapped, nms_iou)) if d.score >= min_score]
    return sorted(dets, key=lambda d: -d.score)


def _finish(c: _Candidate, work_size, orig_size) -> Detection:
    """Paste the candidate's view mask into the full image at its original size."""
    ww, wh = work_size
    full = np.zeros((wh, ww), bool)
    ox, oy = c.offset
    mh, mw = c.mask.shape
    full[oy:oy + mh, ox:ox + mw] = c.mask
    if (ww, wh) != tuple(orig_size):
        full = np.asarray(Image.fromarray(full).resize(orig_size, Image.NEAREST))
    sx, sy = orig_size[0] / ww, orig_size[1] / wh
    box = mask_box(full) or (c.box[0] * sx, c.box[1] * sy, c.box[2] * sx, c.box[3] * sy)
    score = c.score * c.votes / (c.votes + 1)
    return Detection(c.label, float(np.clip(score, 0, 1)), box, full, (c.point[0] * sx, c.point[1] * sy),
                     {**c.source, "votes": c.votes, "sam_score": c.score})


# ------------------------------------------------------------------------------------------------- output
def to_coco(detections: list[Detection], image_id: int = 1, categories: dict[str, int] | None = None) -> list[dict]:
    """COCO results for one image. ``categories`` maps labels to ids (labels missing from it get new ids after the
    largest one, in order of appearance); default: vlmkit's scene object names (ids 1..64, as ``save_scenes``)."""
    if categories is None:
        from vlmkit.data.scenes import object_names

        categories = {n: i + 1 for i, n in enumerate(object_names())}
    cats = dict(categories)
    out = []
    for d in detections:
        if d.label not in cats:
            cats[d.label] = max(cats.values(), default=0) + 1
        out.append(d.to_coco(image_id, cats[d.label]))
    return out


def draw_detections(image, detections: list[Detection], *, alpha: float = 0.45) -> Image.Image:
    """The image with each detection's mask tinted, its box outlined and its label written."""
    from PIL import ImageDraw

    from vlmkit.io import load_image

    base = np.asarray(load_image(image), np.float64).copy()
    rng = np.random.default_rng(3)
    colors = [tuple(int(v) for v in rng.integers(40, 256, 3)) for _ in detections]
    for d, col in zip(detections, colors):
        if d.mask.shape == base.shape[:2]:
            base[d.mask] = base[d.mask] * (1 - alpha) + np.array(col) * alpha
    out = Image.fromarray(base.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for d, col in zip(detections, colors):
        x0, y0, x1, y1 = d.box
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=col, width=2)
        draw.text((x0 + 2, max(0, y0 - 11)), f"{d.label} {d.score:.2f}", fill=col)
    return out
