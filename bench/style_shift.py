"""Robustness of a scenes model to a drawing style it never saw (issue 3: "scenes drawn by a different renderer").

    python3 bench/style_shift.py --scenes 200 [--model DIR] [--out runs/style_shift]

Issue 3 says the default model will also be checked on scenes from a renderer kept outside the project. That
renderer is not here, so this script brings its own: :func:`render`, written apart from
:mod:`vlmkit.data.scenes` and sharing none of its drawing code. Shapes are PIL polygons / ellipses with their own
proportions (5- or 6-point stars, thin or fat crosses, rounded squares), colours are its own palette with hue and
lightness jitter, outlines are 0-5 px in a darker or lighter shade, objects cast soft shadows, and backgrounds are
smooth "photo" noise, ruled paper, wood grain, dark slate or a vertical gradient; images are 128-640 px with aspect
ratios up to 1.5. Object names are drawn uniformly (no co-occurrence prior), sizes 12-30% of the short side.

A second style, :func:`render_sketch` ("sketch style"), was added after ``generate_scene(..., variety=True)`` had
been written for training, whose drawing variety was chosen knowing the first style above, so the first style no
longer checks a variety-trained model independently. The sketch style varies what neither the generator nor its
variety does: hand-drawn wobbly contours, fills shaded from light to dark, saturated / split / blurred-clutter /
vignetted backgrounds, blur and JPEG compression.

For each split (POPE random / popular / adversarial, the same question builder as the model card) and for colour
and shape questions it prints accuracy on the project's own held-out scenes and on the outside-style scenes, in the
same run, and the ratio; by-case rows split the outside-style answers as the model card does (object size in
token cells, absent objects by shared colour / shape) and by background style.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PALETTE = {  # (hue 0-1, saturation, value): not the generator's RGB table
    "red": (0.995, 0.80, 0.85), "green": (0.36, 0.70, 0.62), "blue": (0.61, 0.75, 0.85),
    "yellow": (0.15, 0.80, 0.95), "purple": (0.78, 0.62, 0.68), "orange": (0.075, 0.88, 0.97),
}
NEUTRAL = {"white": (242, 242, 238), "black": (28, 28, 32)}
BACKGROUNDS = ("photo", "paper", "wood", "slate", "gradient")


def _colour(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    if name in NEUTRAL:
        return tuple(int(np.clip(c + rng.integers(-10, 11), 0, 255)) for c in NEUTRAL[name])
    h, s, v = PALETTE[name]
    h = (h + rng.uniform(-0.02, 0.02)) % 1.0
    s, v = np.clip(s + rng.uniform(-0.12, 0.1), 0.35, 1), np.clip(v + rng.uniform(-0.15, 0.05), 0.4, 1)
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))


def _background(w: int, h: int, kind: str, rng: np.random.Generator) -> Image.Image:
    if kind == "photo":  # smooth low-frequency colour noise
        small = rng.uniform(60, 200, (4, 4, 3)).astype(np.uint8)
        return Image.fromarray(small).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(6))
    if kind == "gradient":
        a, b = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
        t = np.linspace(0, 1, h)[:, None, None]
        return Image.fromarray(np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).astype(np.uint8))
    if kind == "slate":
        base = rng.uniform(45, 75)
        arr = base + rng.normal(0, 6, (h, w, 1)) + np.array([0, 3, 8])
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if kind == "wood":
        y = np.arange(h)[:, None]
        x = np.arange(w)[None, :]
        grain = np.sin((y + 6 * np.sin(x / rng.uniform(20, 40))) / rng.uniform(3, 7))
        base = np.array([150, 110, 70]) + rng.uniform(-20, 20, 3)
        return Image.fromarray(np.clip(base + 18 * grain[..., None], 0, 255).astype(np.uint8))
    im = Image.new("RGB", (w, h), (236, 234, 226))  # ruled paper
    d = ImageDraw.Draw(im)
    step = int(rng.integers(14, 26))
    for y in range(step, h, step):
        d.line([(0, y), (w, y)], fill=(170, 190, 215), width=1)
    d.line([(int(w * 0.1), 0), (int(w * 0.1), h)], fill=(220, 120, 120), width=2)
    return im


def _points(shape: str, cx: float, cy: float, r: float, rot: float, rng: np.random.Generator) -> list:
    def ring(n, radii, phase=0.0):
        return [(cx + radii[i % len(radii)] * math.cos(rot + phase + 2 * math.pi * i / n),
                 cy + radii[i % len(radii)] * math.sin(rot + phase + 2 * math.pi * i / n)) for i in range(n)]

    if shape == "triangle":
        return ring(3, [r], -math.pi / 2)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.62 * r, cy), (cx, cy + r), (cx - 0.62 * r, cy)]
    if shape == "hexagon":
        return ring(6, [r])
    if shape == "star":
        n = int(rng.choice([5, 6]))
        return ring(2 * n, [r, r * rng.uniform(0.38, 0.5)], -math.pi / 2)
    if shape == "cross":
        t = r * rng.uniform(0.25, 0.42)
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t),
               (-t, -t)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    raise ValueError(shape)


def _draw(d: ImageDraw.ImageDraw, shape: str, box: tuple, fill, outline, width: int, pts) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        d.rounded_rectangle(box, radius=int((x1 - x0) * 0.12), fill=fill, outline=outline, width=width)
    elif shape == "heart":
        r = (x1 - x0) / 4
        d.ellipse([x0, y0, x0 + 2 * r, y0 + 2 * r], fill=fill)
        d.ellipse([x1 - 2 * r, y0, x1, y0 + 2 * r], fill=fill)
        d.polygon([(x0 + 0.15 * r, y0 + 1.4 * r), (x1 - 0.15 * r, y0 + 1.4 * r), ((x0 + x1) / 2, y1)], fill=fill)
    else:
        d.polygon(pts, fill=fill, outline=outline, width=width)


def render(seed: int):
    """One outside-style scene: a :class:`vlmkit.data.scenes.Scene` (image, objects with box + visible mask)."""
    from vlmkit.data.scenes import COLORS, SHAPES, Scene, SceneObject

    rng = np.random.default_rng([seed, 31337])
    w = int(rng.integers(128, 641))
    h = int(np.clip(w * rng.choice([1.0, 0.75, 1.25, 0.67, 1.5]), 128, 640))
    kind = str(rng.choice(BACKGROUNDS))
    img = _background(w, h, kind, rng).convert("RGB")
    short = min(w, h)
    names = [(str(rng.choice(COLORS)), str(rng.choice(SHAPES))) for _ in range(int(rng.integers(1, 7)))]
    masks, placed = [], []
    for color, shape in dict.fromkeys(names):  # unique names
        for _ in range(30):
            side = int(rng.uniform(0.12, 0.30) * short)
            x0, y0 = int(rng.integers(2, w - side - 1)), int(rng.integers(2, h - side - 1))
            box = (x0, y0, x0 + side, y0 + side)
            m = Image.new("L", (w, h), 0)
            pts = _points(shape, x0 + side / 2, y0 + side / 2, side / 2, rng.uniform(-0.5, 0.5), rng) \
                if shape not in ("circle", "square", "heart") else None
            _draw(ImageDraw.Draw(m), shape, box, 255, None, 0, pts)
            full = np.asarray(m) > 127
            if all((v & ~full).sum() >= 0.7 * v.sum() for v in masks) and full.sum() > 40:
                break
        else:
            continue
        if rng.random() < 0.5:  # soft shadow
            sh = Image.new("L", (w, h), 0)
            _draw(ImageDraw.Draw(sh), shape, tuple(v + 3 for v in box), 90, None, 0,
                  [(x + 3, y + 3) for x, y in pts] if pts else None)
            img = Image.composite(Image.new("RGB", (w, h), (0, 0, 0)), img, sh.filter(ImageFilter.GaussianBlur(2)))
        fill = _colour(color, rng)
        width = int(rng.integers(0, 6))
        shade = 0.55 if color != "black" else 2.5
        outline = tuple(int(np.clip(c * shade + (60 if color == "black" else 0), 0, 255)) for c in fill) \
            if width else None
        _draw(ImageDraw.Draw(img), shape, box, fill, outline, width, pts)
        masks = [v & ~full for v in masks] + [full]
        placed.append((shape, color))
    objects = []
    for (shape, color), m in zip(placed, masks):
        ys, xs = np.nonzero(m)
        objects.append(SceneObject(shape=shape, color=color, box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                                                   int(ys.max()) + 1), mask=m))
    return Scene(image=img, objects=objects, seed=seed, style=kind, meta={"renderer": "bench/style_shift.py"})


SKETCH_BACKGROUNDS = ("pastel", "split", "desk", "vignette")


def _sketch_background(w: int, h: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Float [h, w, 3]: saturated pastel, two-tone diagonal split, blurred desk clutter or a vignetted tone."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tone = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.15, 0.45), rng.uniform(0.55, 0.95))) * 255
    img = np.broadcast_to(tone, (h, w, 3)).astype(np.float32).copy()
    if kind == "split":
        other = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.9))) * 255
        img[(xx / w + yy / h) > rng.uniform(0.6, 1.4)] = other
    elif kind == "desk":
        pil = Image.fromarray(img.astype(np.uint8))
        d = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(4, 10))):
            x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
            x1, y1 = x0 + rng.uniform(0.2, 0.6) * w, y0 + rng.uniform(0.2, 0.6) * h
            d.rectangle([x0, y0, x1, y1], fill=tuple(int(v) for v in np.clip(tone + rng.uniform(-50, 50, 3), 0, 255)))
        img = np.asarray(pil.filter(ImageFilter.GaussianBlur(max(w, h) / 60)), np.float32)
    elif kind == "vignette":
        r = np.hypot(xx / w - 0.5, yy / h - 0.5)
        img *= (1.0 - rng.uniform(0.3, 0.6) * r ** 2 * 2)[..., None]
    return img


def _wobbly(shape: str, cx: float, cy: float, r: float, rng: np.random.Generator) -> list:
    """A hand-drawn outline: the shape's contour resampled densely with a slow random wobble of the radius."""
    if shape == "circle":
        base = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
    elif shape == "square":
        base = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        base = list(zip(np.sin(ts) ** 3, -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts)
                                            - np.cos(4 * ts)) / 16 + 0.15))
    else:
        base = [((x - cx) / r, (y - cy) / r) for x, y in _points(shape, cx, cy, r, rng.uniform(-0.3, 0.3), rng)]
    dense = []
    for (x0, y0), (x1, y1) in zip(base, base[1:] + base[:1]):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) * 12))
        dense += [(x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n) for k in range(n)]
    phase, amp = rng.uniform(0, 2 * math.pi, 3), rng.uniform(0.02, 0.06)
    out = []
    for k, (x, y) in enumerate(dense):
        t = 2 * math.pi * k / len(dense)
        f = 1 + amp * sum(math.sin((j + 2) * t + phase[j]) for j in range(3)) / 3
        out.append((cx + r * x * f, cy + r * y * f))
    return out


def render_sketch(seed: int):
    """A second outside style, written after the generator's ``variety`` option and sharing nothing with it:
    hand-drawn wobbly contours, fills shaded from light to dark, saturated / split / blurred-clutter / vignetted
    backgrounds, then blur and JPEG compression of the whole image; 100-720 px, objects 10-35% of the short side."""
    import io

    from vlmkit.data.scenes import COLORS, SHAPES, Scene, SceneObject

    rng = np.random.default_rng([seed, 2718])
    w = int(rng.integers(100, 721))
    h = int(np.clip(w * rng.choice([1.0, 0.8, 1.25, 0.6]), 100, 720))
    kind = str(rng.choice(SKETCH_BACKGROUNDS))
    canvas = _sketch_background(w, h, kind, rng)
    short = min(w, h)
    names = [(str(rng.choice(COLORS)), str(rng.choice(SHAPES))) for _ in range(int(rng.integers(1, 7)))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    masks, placed = [], []
    for color, shape in dict.fromkeys(names):
        for _ in range(30):
            side = rng.uniform(0.10, 0.35) * short
            cx, cy = rng.uniform(side / 2 + 2, w - side / 2 - 2), rng.uniform(side / 2 + 2, h - side / 2 - 2)
            pts = _wobbly(shape, cx, cy, side / 2, rng)
            m = Image.new("L", (w, h), 0)
            ImageDraw.Draw(m).polygon(pts, fill=255)
            full = np.asarray(m) > 127
            if all((v & ~full).sum() >= 0.7 * v.sum() for v in masks) and full.sum() > 40:
                break
        else:
            continue
        fill = np.array(_colour(color, rng), np.float32)
        ang = rng.uniform(0, 2 * math.pi)
        ramp = ((xx - cx) * math.cos(ang) + (yy - cy) * math.sin(ang)) / side           # about -0.5..0.5 inside
        shade = 1.0 + rng.uniform(0.1, 0.3) * np.clip(ramp, -0.6, 0.6) * (-1 if color == "white" else 1)
        lift = 25 * np.clip(ramp, 0, 0.6)[..., None] if color == "black" else 0.0   # black shades towards grey
        paint = np.clip(fill * shade[..., None] + lift, 0, 255)
        soft = np.asarray(m.filter(ImageFilter.GaussianBlur(0.7)), np.float32)[..., None] / 255.0
        canvas = canvas * (1 - soft) + paint * soft
        masks = [v & ~full for v in masks] + [full]
        placed.append((shape, color))
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.0) * max(w, h) / 400))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(25, 76)))
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    objects = []
    for (shape, color), m in zip(placed, masks):
        ys, xs = np.nonzero(m)
        objects.append(SceneObject(shape=shape, color=color, box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                                                   int(ys.max()) + 1), mask=m))
    return Scene(image=img, objects=objects, seed=seed, style=f"sketch {kind}",
                 meta={"renderer": "bench/style_shift.py sketch"})


def measure(model, processor, scenes, seed: int) -> dict:
    from vlmkit.default.evaluate import answer, is_yes, pope_breakdown
    from vlmkit.default.qa import make_qa, pope_questions

    rng = np.random.default_rng(seed)
    out: dict = {}
    for split in ("random", "popular", "adversarial"):
        qs = [(sc, qa) for sc in scenes for qa in pope_questions(sc, split, rng)]
        pred = [is_yes(p) for p in answer(model, processor, [s.image for s, _ in qs], [q.question for _, q in qs], 2)]
        truth = [q.answer == "yes" for _, q in qs]
        out[f"pope_{split}"] = round(float(np.mean([p == t for p, t in zip(pred, truth)])), 4)
        out[f"yes_ratio_{split}"] = round(float(np.mean(pred)), 4)
        if split == "random":  # the model card's cases (object size in token cells, ...) + one row per style
            by = {k: [v["accuracy"], v["n"]] for k, v in pope_breakdown(qs, pred).items()}
            for style in sorted({sc.style for sc in scenes}):
                ok = [p == t for (sc, _), p, t in zip(qs, pred, truth) if sc.style == style]
                by[f"style {style}"] = [round(float(np.mean(ok)), 3), len(ok)]
            out["random_by_case"] = by
    for skill in ("color", "shape"):
        qs = [(sc, qa) for sc in scenes for qa in [make_qa(sc, rng, skill)] if qa is not None]
        pred = answer(model, processor, [s.image for s, _ in qs], [q.question for _, q in qs], 2)
        out[f"{skill}_acc"] = round(float(np.mean([p == q.answer for p, (_, q) in zip(pred, qs)])), 4)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--model", default=None, help="scenes checkpoint directory (default: the embedded model)")
    ap.add_argument("--out", default=None, help="write results.json and a few sample PNGs here")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from vlmkit.data.scenes import generate_scene
    from vlmkit.default.evaluate import EVAL_SEED0, load
    from vlmkit.models.vlm import default_model_path

    torch.set_num_threads(args.threads)
    model, processor = load(args.model or default_model_path())
    t0 = time.time()
    own = measure(model, processor, [generate_scene(EVAL_SEED0 + i) for i in range(args.scenes)], 11)
    styles = {"outside style": [render(i) for i in range(args.scenes)],
              "sketch style": [render_sketch(i) for i in range(args.scenes)]}
    res = {name: measure(model, processor, scenes, 11) for name, scenes in styles.items()}
    print(f"{args.scenes} scenes each, {time.time() - t0:.0f} s\n")
    print("| metric | own generator | " + " | ".join(f"{n} | ratio" for n in res) + " |")
    print("|---|---|" + "---|---|" * len(res))
    for k, v in own.items():
        if isinstance(v, float):
            print(f"| {k} | {v:.3f} | " + " | ".join(f"{r[k]:.3f} | {r[k] / max(v, 1e-9):.2f}" for r in res.values())
                  + " |")
    for name, r in res.items():
        print(f"\n{name}, POPE random by case (accuracy, questions):")
        for k, v in r["random_by_case"].items():
            print(f"  {k}: {v[0]:.3f} ({v[1]})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"own": own, **res}, indent=1))
        for name, scenes in styles.items():
            for sc in scenes[:6]:
                sc.image.save(out / f"{name.split()[0]}_{sc.seed}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
