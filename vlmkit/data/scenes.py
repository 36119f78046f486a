"""Seeded, deterministic generator of shape scenes with full ground truth (shape, colour, box, mask).

A scene is an RGB image with 1-8 coloured shapes on a background that ranges from plain to cluttered. Which objects
appear follows a fixed prior (:data:`PRIOR`): some objects are common, and some pairs co-occur often, so POPE's
"popular" and "adversarial" negatives mean on these scenes what they mean on COCO.

Ground truth per object: ``shape``, ``color``, ``box`` (x0, y0, x1, y1 in pixels, exclusive end, tight to the
*visible* mask) and ``mask`` (bool HxW, the pixels of the object not covered by objects drawn later).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vlmkit.data import scene_variety
from vlmkit.errors import InputError

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "hexagon")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
STYLES = ("plain", "textured", "cluttered")

RGB = {
    "red": (220, 35, 35), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (240, 220, 40),
    "purple": (140, 50, 185), "orange": (250, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15),
}

#: The object prior, as data. An object's weight is ``shape_weights[shape] * color_weights[color]``; each scene draws
#: objects from these weights, and after drawing the first member of a pair in ``pairs`` it adds the second with
#: probability ``p`` (if the scene has room). Pairs share a shape or a colour, so the adversarial negatives (the
#: absent objects that co-occur most with the present ones) look alike.
PRIOR = {
    "shape_weights": {"circle": 0.22, "square": 0.18, "triangle": 0.14, "star": 0.12, "cross": 0.10,
                      "heart": 0.09, "diamond": 0.08, "hexagon": 0.07},
    "color_weights": {"red": 0.20, "blue": 0.18, "green": 0.15, "yellow": 0.12, "white": 0.10, "black": 0.09,
                      "purple": 0.08, "orange": 0.08},
    "pairs": [
        ("red circle", "red square", 0.6), ("blue circle", "blue triangle", 0.6),
        ("green triangle", "green star", 0.6), ("yellow star", "yellow circle", 0.6),
        ("white cross", "black cross", 0.6), ("black heart", "red heart", 0.6),
        ("purple diamond", "orange diamond", 0.6), ("orange hexagon", "purple hexagon", 0.6),
        ("red square", "blue square", 0.5), ("green circle", "green square", 0.5),
    ],
    "style_weights": {"plain": 0.35, "textured": 0.40, "cluttered": 0.25},
}

# Allowed rotation (degrees) per shape, small enough that a square never becomes a diamond.
_MAX_ROT = {"circle": 0, "square": 12, "triangle": 20, "star": 30, "cross": 15, "heart": 15, "diamond": 10,
            "hexagon": 30}


@dataclass
class SceneObject:
    """One object: ``box`` is (x0, y0, x1, y1) px with exclusive end; ``mask`` is bool [H, W] of visible pixels."""
    shape: str
    color: str
    box: tuple[int, int, int, int]
    mask: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        """Centre (x, y) in px of the visible mask."""
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


@dataclass
class Scene:
    """A rendered scene: RGB ``image`` (W x H) and its ``objects`` in drawing order (later ones on top)."""
    image: Image.Image
    objects: list[SceneObject]
    seed: int
    style: str
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]


def object_names() -> list[str]:
    """All 64 object names, "color shape"."""
    return [f"{c} {s}" for s in SHAPES for c in COLORS]


def object_frequencies() -> dict[str, float]:
    """Probability of each object name in one draw from the prior (sums to 1), most frequent first."""
    sw, cw = PRIOR["shape_weights"], PRIOR["color_weights"]
    w = {f"{c} {s}": sw[s] * cw[c] for s in SHAPES for c in COLORS}
    total = sum(w.values())
    return dict(sorted(((k, v / total) for k, v in w.items()), key=lambda kv: -kv[1]))


def cooccurrence_partners() -> dict[str, list[str]]:
    """For each object name, the names the prior pairs it with (both directions), strongest first."""
    out: dict[str, list[tuple[float, str]]] = {}
    for a, b, p in PRIOR["pairs"]:
        out.setdefault(a, []).append((p, b))
        out.setdefault(b, []).append((p * 0.5, a))
    return {k: [n for _, n in sorted(v, reverse=True)] for k, v in out.items()}


def _sample_names(rng: np.random.Generator, n: int) -> list[str]:
    freq = object_frequencies()
    names, probs = list(freq), np.array(list(freq.values()))
    pairs = {}
    for a, b, p in PRIOR["pairs"]:
        pairs.setdefault(a, []).append((b, p))
    out: list[str] = []
    while len(out) < n:
        name = names[rng.choice(len(names), p=probs)]
        out.append(name)
        for partner, p in pairs.get(name, []):
            if len(out) < n and rng.random() < p:
                out.append(partner)
    return out


def _polygon(shape: str, rng: np.random.Generator, vr: np.random.Generator | None = None
             ) -> list[tuple[float, float]] | None:
    """Unit polygon (radius ~1, centred at 0) for ``shape``; None for the circle (drawn as an ellipse). ``vr``: the
    variety stream (:mod:`vlmkit.data.scene_variety` proportions), None for the default drawing."""
    if shape not in SHAPES:
        raise InputError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if shape == "circle":
        return None
    if vr is not None:
        pts = scene_variety.polygon(shape, vr)
    elif shape == "square":
        pts = [(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a) + 0.15) for a in np.deg2rad([-90, 30, 150])]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.42) * math.cos(a), (1.0 if k % 2 == 0 else 0.42) * math.sin(a) + 0.08)
               for k, a in enumerate(np.deg2rad(np.arange(10) * 36 - 90))]
    elif shape == "cross":
        t, r = 0.3, 0.9
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t),
               (-t, -t)]
    elif shape == "heart":
        ts = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        xs = 16 * np.sin(ts) ** 3
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        pts = list(zip(xs / 17.0, (ys + 2.5) / 17.0))
    elif shape == "diamond":
        pts = [(0, -1.0), (0.62, 0), (0, 1.0), (-0.62, 0)]
    else:
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad(np.arange(6) * 60)]
    rot = np.deg2rad(rng.uniform(-_MAX_ROT[shape], _MAX_ROT[shape]))
    c, s = math.cos(rot), math.sin(rot)
    return [(x * c - y * s, x * s + y * c) for x, y in pts]


def _shape_alpha(shape: str, side: int, aa: bool, rng: np.random.Generator,
                 vr: np.random.Generator | None = None) -> np.ndarray:
    """Coverage in [0, 1], float [side, side], of ``shape`` drawn to fill a side x side square."""
    ss = 4 if aa else 1
    big = side * ss
    im = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(im)
    poly = _polygon(shape, rng, vr)
    half = big / 2.0
    if poly is None:
        e = rng.uniform(0.85, 1.0)
        rx, ry = (half * 0.98, half * 0.98 * e) if rng.random() < 0.5 else (half * 0.98 * e, half * 0.98)
        d.ellipse([half - rx, half - ry, half + rx - 1, half + ry - 1], fill=255)
    else:
        d.polygon([(half + x * half * 0.98, half + y * half * 0.98) for x, y in poly], fill=255)
    if aa:
        im = im.resize((side, side), Image.BOX)
    return np.asarray(im, dtype=np.float32) / 255.0


def _jitter(rgb, rng: np.random.Generator, amount: float = 14.0) -> np.ndarray:
    col = np.asarray(rgb, np.float32) * rng.uniform(0.88, 1.06) + rng.uniform(-amount, amount, 3)
    return np.clip(col, 0, 255)


def _fill(color: str, side: int, rng: np.random.Generator, alpha: np.ndarray, style: str,
          vr: np.random.Generator | None = None) -> np.ndarray:
    """RGB float [side, side, 3] paint for one object: solid, textured (stripes/dots/noise) and/or outlined."""
    base = _jitter(RGB[color], rng)
    if vr is not None:
        base = scene_variety.jitter(RGB[color], vr)
    paint = np.broadcast_to(base, (side, side, 3)).copy()
    kind = rng.choice(["solid", "stripes", "dots", "noise"], p=[0.55, 0.15, 0.1, 0.2] if style != "plain"
                      else [0.85, 0.05, 0.05, 0.05])
    yy, xx = np.mgrid[0:side, 0:side]
    if kind == "stripes":
        period = max(3, int(rng.integers(3, 7)))
        band = ((xx + yy * rng.choice([0, 1])) // period) % 2 == 0
        paint[band] *= 0.8 if color != "black" else 1.0
        paint[band] += 0 if color != "black" else 35
    elif kind == "dots":
        period = max(4, int(rng.integers(4, 8)))
        dots = ((xx % period) < 2) & ((yy % period) < 2)
        paint[dots] = paint[dots] * 0.75 + (40 if color == "black" else 0)
    elif kind == "noise":
        paint += rng.normal(0, 10, (side, side, 1))
    if rng.random() < (0.3 if style != "plain" else 0.15) and side >= 10:
        width = max(1, int(round(side * rng.uniform(0.03, 0.07))))
        inner = np.asarray(Image.fromarray((alpha > 0.5).astype(np.uint8) * 255).filter(
            ImageFilter.MinFilter(2 * width + 1))) > 0
        edge = (alpha > 0.5) & ~inner
        if edge.sum() <= 0.35 * (alpha > 0.5).sum():  # the outline must never dominate the fill colour
            dark = {"black": np.array([95, 95, 95.0]), "white": np.array([150, 150, 150.0])}.get(color, base * 0.55)
            paint[edge] = dark
    if vr is not None:
        scene_variety.outline(paint, alpha, color, base, vr)
    return np.clip(paint, 0, 255)


def _background(w: int, h: int, style: str, rng: np.random.Generator) -> np.ndarray:
    """RGB float [h, w, 3] background: muted tone, plus texture (textured) or noise/lines/blobs (cluttered)."""
    grey = rng.uniform(85, 185)
    tone = np.clip(grey + rng.uniform(-18, 18, 3), 0, 255)
    img = np.broadcast_to(tone, (h, w, 3)).astype(np.float32).copy()
    if style == "plain":
        return img
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.choice(["noise", "gradient", "stripes", "checker"])
    if kind == "gradient" or style == "cluttered":
        ang = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(ang) * xx / w + np.sin(ang) * yy / h)
        img += (ramp * rng.uniform(-35, 35))[..., None]
    if kind == "stripes":
        period = rng.uniform(4, 16) * max(w, h) / 128
        img += (np.sin((xx * math.cos(rng.uniform(0, 3)) + yy) / period * np.pi) > 0)[..., None] * rng.uniform(8, 20)
    elif kind == "checker":
        cell = int(rng.integers(6, 20) * max(w, h) / 128) + 1
        img += ((((xx // cell) + (yy // cell)) % 2)[..., None]) * rng.uniform(8, 18)
    if kind == "noise" or style == "cluttered":
        img += rng.normal(0, rng.uniform(5, 16), (h, w, 1))
    if style == "cluttered":
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(3, 10))):
            col = tuple(int(v) for v in np.clip(tone + rng.uniform(-45, 45) + rng.uniform(-10, 10, 3), 65, 205))
            d.line([tuple(rng.uniform(0, [w, h])) for _ in range(2)], fill=col,
                   width=int(rng.integers(1, 3) * max(1, min(w, h) // 128)))
        for _ in range(int(rng.integers(3, 9))):
            col = tuple(int(v) for v in np.clip(tone + rng.uniform(-40, 40) + rng.uniform(-10, 10, 3), 65, 205))
            cx, cy = rng.uniform(0, [w, h])
            r = rng.uniform(0.03, 0.09) * min(w, h)
            pts = [(cx + r * rng.uniform(0.5, 1.3) * math.cos(a), cy + r * rng.uniform(0.5, 1.3) * math.sin(a))
                   for a in np.linspace(0, 2 * np.pi, 9, endpoint=False)]
            d.polygon(pts, fill=col)
        img = np.asarray(pil, np.float32)
    return img


def _resolve_size(size, rng: np.random.Generator) -> tuple[int, int]:
    if size is None:
        w = int(rng.integers(96, 513))
        h = int(np.clip(w * rng.choice([1.0, 1.0, 0.75, 1.333, 0.6, 1.6]), 96, 512))
        return w, h
    w, h = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if not (32 <= w <= 4096 and 32 <= h <= 4096):
        raise InputError(f"size={size!r}: width and height must be within 32..4096 px")
    return int(w), int(h)


def generate_scene(seed: int, *, size: int | tuple[int, int] | None = None, n_objects: int | None = None,
                   style: str | None = None, min_object_px: int | None = None, variety: bool = False) -> Scene:
    """Render the scene for ``seed`` (same arguments -> identical pixels and annotations).

    ``size`` is an int (square) or (width, height); None draws 96..512 px. ``n_objects`` 1..8 (None: drawn, more
    for "cluttered"). ``style`` one of :data:`STYLES` (None: drawn from the prior). ``min_object_px`` is the
    smallest object side in px (default ~12% of the short side, ~7% for cluttered scenes). ``variety`` adds the
    drawing variety of :mod:`vlmkit.data.scene_variety` (its own random stream: the same seed without it gives
    the default scene, unchanged).
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed={seed!r}: expected a non-negative int")
    rng = np.random.default_rng([int(seed), 7919])
    if style is None:
        sw = PRIOR["style_weights"]
        style = str(rng.choice(list(sw), p=list(sw.values())))
    if style not in STYLES:
        raise InputError(f"style={style!r}: expected one of {STYLES}")
    w, h = _resolve_size(size, rng)
    short = min(w, h)
    if n_objects is None:
        n_objects = int(rng.integers(4, 9)) if style == "cluttered" else int(rng.integers(1, 7))
    if not 1 <= n_objects <= 12:
        raise InputError(f"n_objects={n_objects!r}: expected 1..12")
    small = style == "cluttered"
    lo = min_object_px if min_object_px is not None else max(8, int(short * (0.08 if small else 0.13)))
    hi = max(lo + 1, int(short * (0.2 if small else 0.32)))
    if lo > short // 2:
        raise InputError(f"min_object_px={min_object_px!r} too large for a {w}x{h} image")
    aa = bool(rng.random() < 0.7)
    canvas = _background(w, h, style, rng)
    vr = np.random.default_rng([int(seed), 4243]) if variety else None
    if vr is not None and style != "cluttered":
        bg = scene_variety.background(w, h, vr)
        canvas = canvas if bg is None else bg
    full_masks: list[np.ndarray] = []
    placed: list[tuple[str, str]] = []
    for name in _sample_names(rng, n_objects):
        color, shape = name.split(" ")
        for _attempt in range(40):
            side = int(rng.integers(lo, hi + 1))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            alpha = _shape_alpha(shape, side, aa, rng, vr)
            full = np.zeros((h, w), bool)
            full[y0:y0 + side, x0:x0 + side] = alpha >= 0.5
            if full.sum() < max(12, lo * lo * 0.25):
                continue
            # Keep every earlier object at least 65% visible and never let a new object hide it entirely.
            ok = all((m & ~full).sum() >= 0.65 * m.sum() for m in _visible(full_masks))
            if ok:
                break
        else:
            continue
        paint = _fill(color, side, rng, alpha, style, vr)
        if vr is not None:
            scene_variety.shadow(canvas, alpha, x0, y0, vr)
        region = canvas[y0:y0 + side, x0:x0 + side]
        region[:] = region * (1 - alpha[..., None]) + paint * alpha[..., None]
        full_masks.append(full)
        placed.append((shape, color))
    if not placed:
        raise InputError(f"seed={seed}: could not place any object in a {w}x{h} image; lower min_object_px")
    objects = []
    for (shape, color), mask in zip(placed, _visible(full_masks)):
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(SceneObject(shape=shape, color=color, box=box, mask=mask))
    image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")
    return Scene(image=image, objects=objects, seed=int(seed), style=style,
                 meta={"antialiased": aa, **({"variety": True} if variety else {})})


def _visible(full_masks: list[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask given that later masks are drawn on top."""
    out, cover = [], None
    for m in reversed(full_masks):
        out.append(m if cover is None else m & ~cover)
        cover = m.copy() if cover is None else cover | m
    return out[::-1]


# ----------------------------------------------------------------------------------------------- saving / loading

def rle_encode(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a bool [H, W] mask (column-major runs, starting with a run of zeros)."""
    flat = np.asarray(mask, bool).flatten(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict) -> np.ndarray:
    """Inverse of :func:`rle_encode`: bool [H, W]."""
    h, w = rle["size"]
    flat = np.zeros(h * w, bool)
    pos, val = 0, False
    for c in rle["counts"]:
        if val:
            flat[pos:pos + c] = True
        pos += c
        val = not val
    return flat.reshape((h, w), order="F")


def save_scenes(scenes, out_dir, *, prefix: str = "scene") -> Path:
    """Write ``{prefix}_{i:05d}.png`` + ``.json`` per scene and ``instances_coco.json``; returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = object_names()
    cats = [{"id": i + 1, "name": n, "supercategory": n.split(" ")[1]} for i, n in enumerate(names)]
    coco = {"info": {"description": "vlmkit generated scenes", "prior": PRIOR}, "images": [], "annotations": [],
            "categories": cats}
    ann_id = 1
    for i, sc in enumerate(scenes):
        stem = f"{prefix}_{i:05d}"
        sc.image.save(out / f"{stem}.png")
        w, h = sc.image.size
        objs = []
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            rec = {"shape": o.shape, "color": o.color, "name": o.name, "box": list(o.box),
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(o.mask.sum()), "segmentation": rle_encode(o.mask)}
            objs.append(rec)
            coco["annotations"].append({"id": ann_id, "image_id": i + 1, "category_id": names.index(o.name) + 1,
                                        "bbox": rec["bbox"], "area": rec["area"], "segmentation": rec["segmentation"],
                                        "iscrowd": 0, "attributes": {"shape": o.shape, "color": o.color}})
            ann_id += 1
        meta = {"file_name": f"{stem}.png", "width": w, "height": h, "seed": sc.seed, "style": sc.style,
                "objects": objs}
        (out / f"{stem}.json").write_text(json.dumps(meta))
        coco["images"].append({"id": i + 1, "file_name": f"{stem}.png", "width": w, "height": h, "seed": sc.seed,
                               "style": sc.style})
    (out / "instances_coco.json").write_text(json.dumps(coco))
    return out


def load_annotations(directory) -> list[dict]:
    """Read the per-image JSON files written by :func:`save_scenes`; each object gains a decoded ``mask``."""
    d = Path(directory)
    files = sorted(p for p in d.glob("*.json") if p.name != "instances_coco.json")
    if not files:
        raise InputError(f"{d}: no scene annotation JSON files found (expected output of save_scenes)")
    out = []
    for p in files:
        meta = json.loads(p.read_text())
        meta["image_path"] = str(d / meta["file_name"])
        for o in meta["objects"]:
            o["mask"] = rle_decode(o["segmentation"])
            o["box"] = tuple(o["box"])
        out.append(meta)
    return out
