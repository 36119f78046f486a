"""Tab builders and result renderers of the Gradio demo (private to :mod:`vlmkit.app`).

Each ``*_tab(demo, gr)`` function lays out one tab inside the ``gr.Blocks`` context opened by ``Demo.build`` and wires
its button to the matching ``Demo`` endpoint under a named API route. The renderers turn endpoint results into plain
arrays / dicts (no Gradio types), so they can be tested without a server.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

#: Colours of grounding candidates (cycled).
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990",
           "#9a6324", "#800000", "#000075")
MAX_NAMES, MAX_NAME_CHARS = 16, 64


# ------------------------------------------------------------------------------------------------- renderers
def parse_names(text: str | None) -> list[str] | None:
    """Comma-separated object names -> list (``None`` when empty: open-ended detection)."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        return None
    if len(names) > MAX_NAMES:
        raise ValueError(f"{len(names)} names given; at most {MAX_NAMES}")
    long = [n for n in names if len(n) > MAX_NAME_CHARS]
    if long:
        raise ValueError(f"name {long[0][:20]!r}... is longer than {MAX_NAME_CHARS} characters")
    return names


def detection_layer(mask: np.ndarray, box, size: tuple[int, int], fill: float = 0.45) -> np.ndarray:
    """One detection as an AnnotatedImage layer: float32 ``[H, W]`` alpha, ``fill`` inside the mask, 1 on the box
    outline (``box`` = (x0, y0, x1, y1) px, exclusive end; ``size`` = (W, H))."""
    W, H = size
    layer = np.zeros((H, W), np.float32)
    if mask is not None and np.shape(mask) == (H, W):
        layer[np.asarray(mask, bool)] = fill
    x0, y0 = (int(np.clip(np.floor(v), 0, n - 1)) for v, n in zip(box[:2], (W, H)))
    x1, y1 = (int(np.clip(np.ceil(v), lo + 1, n)) for v, lo, n in zip(box[2:], (x0, y0), (W, H)))
    t = max(1, min(W, H) // 120 + 1)  # outline width in px
    layer[y0:y1, x0:min(x1, x0 + t)] = layer[y0:y1, max(x0, x1 - t):x1] = 1.0
    layer[y0:min(y1, y0 + t), x0:x1] = layer[max(y0, y1 - t):y1, x0:x1] = 1.0
    return layer


def detections_view(image: Image.Image, detections) -> tuple[tuple, list[dict]]:
    """``(AnnotatedImage value, rows)`` for VL-SAM detections on ``image``.

    The value is ``(uint8 [H, W, 3], [(layer [H, W], label), ...])`` with one layer per detection (mask + box);
    labels are ``"k. name score"`` so that each detection has its own legend entry (the browser gives each layer its
    own hue). Rows are JSON-ready
    dicts: label, score, box [x0, y0, x1, y1] px (exclusive end), point [x, y] (the positive prompt) and mask area
    in pixels.
    """
    size = image.size
    layers, rows = [], []
    for k, d in enumerate(detections, 1):
        layers.append((detection_layer(d.mask, d.box, size), f"{k}. {d.label} {d.score:.2f}"))
        rows.append({"label": d.label, "score": round(float(d.score), 4),
                     "box": [round(float(v), 1) for v in d.box],
                     "point": None if d.point is None else [round(float(v), 1) for v in d.point],
                     "area": int(np.asarray(d.mask, bool).sum()) if d.mask is not None else 0})
    return (np.asarray(image.convert("RGB")), layers), rows


def mark_points(image: Image.Image, candidates, point=None) -> Image.Image:
    """A copy of ``image`` with the candidate clicks ``[(x, y, score), ...]`` as numbered rings and ``point`` (the
    chosen click, default the first candidate) as a cross-hair."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    r = max(4, min(out.size) // 40)
    for k, (x, y, *_) in reversed(list(enumerate(candidates, 1))):
        col = PALETTE[(k - 1) % len(PALETTE)]
        draw.ellipse([x - r, y - r, x + r, y + r], outline=col, width=2)
        draw.text((x + r + 1, y - r - 1), str(k), fill=col)
    if point is None and candidates:
        point = candidates[0][:2]
    if point is not None:
        x, y = point
        for w, col in ((4, "white"), (2, "#e6194b")):
            draw.line([x - 2 * r, y, x + 2 * r, y], fill=col, width=w)
            draw.line([x, y - 2 * r, x, y + 2 * r], fill=col, width=w)
    return out


# ------------------------------------------------------------------------------------------------- tabs
def ask_tab(demo, gr, guard) -> None:
    ex = demo.cfg.examples
    with gr.Row():
        img = gr.Image(type="pil", label="image", sources=["upload", "clipboard"])
        heat = gr.Image(type="numpy", label="attention of the answer token", interactive=False)
    q = gr.Textbox(label="question", value="Is there a red circle in the image?")
    with gr.Row():
        lo = gr.Slider(0, demo.num_layers - 1, value=0, step=1, label="first layer")
        hi = gr.Slider(0, demo.num_layers - 1, value=demo.num_layers - 1, step=1, label="last layer")
        head = gr.Dropdown(["mean"] + [str(h) for h in range(demo.num_heads)], value="mean", label="head")
    btn = gr.Button("Ask", variant="primary", elem_id="ask-button")
    ans = gr.Textbox(label="answer", elem_id="ask-answer", interactive=False)
    btn.click(guard(demo.ask), [img, q, lo, hi, head], [ans, heat], api_name="ask")
    if ex:
        gr.Examples([[p, "Is there a red circle in the image?"] for p in ex], [img, q])


def carve_tab(demo, gr, guard) -> None:
    ex = demo.cfg.examples
    with gr.Row():
        img = gr.Image(type="pil", label="image")
        refined = gr.Image(type="numpy", label="refined image", interactive=False)
        contrast = gr.Image(type="numpy", label="contrast map", interactive=False)
    q = gr.Textbox(label="question", value="What color is the star?")
    btn = gr.Button("Refine and answer", variant="primary")
    with gr.Row():
        orig = gr.Textbox(label="original answer", interactive=False)
        new = gr.Textbox(label="answer on the refined image", interactive=False)
    btn.click(guard(demo.carve), [img, q], [orig, new, refined, contrast], api_name="carve")
    if ex:
        gr.Examples([[p, "What color is the star?"] for p in ex], [img, q])


def fixes_tab(demo, gr, guard) -> None:
    ex = demo.cfg.examples
    img = gr.Image(type="pil", label="image")
    q = gr.Textbox(label="question", value="Is there a blue star in the image?")
    btn = gr.Button("Compare", variant="primary")
    table = gr.Dataframe(headers=["method", "answer"], label="answers", interactive=False)
    btn.click(guard(demo.fixes), [img, q], table, api_name="fixes")
    if ex:
        gr.Examples([[p, "Is there a blue star in the image?"] for p in ex], [img, q])


def detect_tab(demo, gr, guard) -> None:
    if demo.segmenter_error:
        gr.Markdown(f"**Detection is unavailable:** {demo.segmenter_error}")
    gr.Markdown("VL-SAM: the model's attention to each object word becomes point prompts for SAM. Leave *names* "
                "empty to let the model list the objects (open-ended), or give comma-separated names.")
    with gr.Row():
        img = gr.Image(type="pil", label="image", sources=["upload", "clipboard"])
        shown = gr.AnnotatedImage(label="detections (mask + box)", format="png")
    with gr.Row():
        names = gr.Textbox(label="names (comma-separated; empty = open-ended)", value="")
        questions = gr.Slider(1, 5, value=5, step=1, label="questions per object")
        multiscale = gr.Checkbox(value=False, label="also the four corner crops (slower)")
    btn = gr.Button("Detect", variant="primary", elem_id="detect-button")
    table = gr.JSON(label="detections (label, score, box x0 y0 x1 y1, point, mask area)")

    btn.click(guard(demo.detect), [img, names, questions, multiscale], [shown, table], api_name="detect")
    rows = demo.cfg.detect_examples or [(p, "") for p in demo.cfg.examples]
    if rows:
        gr.Examples([[p, n] for p, n in rows], [img, names])


def ground_tab(demo, gr, guard) -> None:
    gr.Markdown(f"Click prediction for an instruction on a screenshot ({demo.grounder_name}). The cross-hair is the "
                "click; numbered rings are the next candidates.")
    with gr.Row():
        img = gr.Image(type="pil", label="screenshot", sources=["upload", "clipboard"])
        marked = gr.Image(type="numpy", label="click point", interactive=False, format="png")
        heat = gr.Image(type="numpy", label="heat map", interactive=False, format="png")
    instr = gr.Textbox(label="instruction", value="click Save")
    btn = gr.Button("Ground", variant="primary", elem_id="ground-button")
    with gr.Row():
        action = gr.Textbox(label="action", elem_id="ground-action", interactive=False)
        details = gr.JSON(label="point, candidates, source")
    btn.click(guard(demo.ground), [img, instr], [marked, heat, action, details], api_name="ground")
    if demo.cfg.gui_examples:
        gr.Examples([[p, t] for p, t in demo.cfg.gui_examples], [img, instr])
