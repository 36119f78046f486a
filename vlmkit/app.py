"""The Gradio demo: ask with attention heat maps, CARVE, hallucination fixes side by side, detection, GUI grounding.

Each tab appears once its feature is installed. Requests on the one model are serialised (queue concurrency 1 plus the
``VLM`` lock), uploads are decoded by Gradio into PIL images (no client-supplied path is opened), image size is
capped, and errors are shown in the UI as messages, never as stack traces. Binds to 127.0.0.1 unless told otherwise.

    python apps/demo.py [--port N] [--host H] [--model PATH] [--sam-checkpoint PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path

import numpy as np

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
log = logging.getLogger("vlmkit.demo")

MAX_UPLOAD = "10mb"
MAX_PIXELS = 16_000_000
FIX_METHODS = ("none", "paint", "vhr", "var", "vcd", "pai")


@dataclass
class DemoConfig:
    model: str | None = None
    sam_checkpoint: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    max_pixels: int = MAX_PIXELS
    examples: list[str] = field(default_factory=list)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _guard(fn):
    """Turn vlmkit and input errors into UI messages; hide everything else behind a short message (logged)."""
    import gradio as gr

    @wraps(fn)
    def wrapped(*args, **kwargs):
        from vlmkit.errors import VlmkitError

        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (VlmkitError, ValueError) as e:
            raise gr.Error(str(e).splitlines()[0]) from None
        except Exception as e:  # noqa: BLE001 - never show a stack trace to the client
            log.exception("demo request failed")
            raise gr.Error(f"internal error ({type(e).__name__}); see the server log") from None

    return wrapped


def make_examples(out_dir: Path, n: int = 3) -> list[str]:
    """Write a few generated scenes as example images; returns their paths."""
    from vlmkit.data.scenes import generate_scene

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(n):
        p = out_dir / f"scene{seed}.png"
        generate_scene(1000 + seed, size=224, n_objects=3, style="plain").image.save(p)
        paths.append(str(p))
    return paths


class Demo:
    """Holds the model(s) and builds the Blocks app."""

    def __init__(self, cfg: DemoConfig, vlm=None):
        import vlmkit

        self.cfg = cfg
        self.vlm = vlm if vlm is not None else vlmkit.load(cfg.model)
        self.num_layers = self.vlm.adapter.num_layers
        self.num_heads = int(self.vlm.model.config.text_config.num_attention_heads)
        from vlmkit.methods.carve import Carve

        self._carve = Carve()  # one object: its general-pass cache serves repeated questions on an image

    def _image(self, image):
        from vlmkit.io import load_image

        if image is None:
            raise ValueError("upload an image first")
        return load_image(image, max_pixels=self.cfg.max_pixels, name="upload")

    # ------------------------------------------------------------------ endpoints
    def ask(self, image, question: str, first_layer: int, last_layer: int, head: str):
        """Answer + heat map of the answer token's attention over the image (layers, head or head mean)."""
        img = self._image(image)
        if not question or not question.strip():
            raise ValueError("type a question")
        lo, hi = sorted((int(first_layer), int(last_layer)))
        with self.vlm.capture(layers=list(range(lo, hi + 1)), rows="last") as rec:
            answer = self.vlm.ask(img, question.strip())
        heads = None if head in (None, "", "mean") else [int(head)]
        overlay = rec.maps.overlay(img, source="prefill", heads=heads)
        return answer, np.asarray(overlay)

    def carve(self, image, question: str):
        """CARVE: original vs refined image, contrast map over the image, both answers."""
        from vlmkit.viz import heat_overlay

        img = self._image(image)
        if not question or not question.strip():
            raise ValueError("type a question")
        res = self._carve(img, question.strip(), vlm=self.vlm)
        return (res.original_answer, res.answer, np.asarray(res.refined_image),
                np.asarray(heat_overlay(img, res.fused_map)))

    def fixes(self, image, question: str):
        """The same question under each hallucination fix; returns rows (method, answer)."""
        from vlmkit.attention.hooks import intervention_names

        img = self._image(image)
        rows = []
        available = set(intervention_names())
        for name in FIX_METHODS:
            if name not in available:
                continue
            with self.vlm.intervene(name):
                rows.append([name, self.vlm.ask(img, question.strip())])
        return rows

    # ------------------------------------------------------------------ app
    def build(self):
        import gradio as gr

        ex = self.cfg.examples
        with gr.Blocks(title="vlmkit demo", analytics_enabled=False) as app:
            gr.Markdown("## vlmkit — see where a VLM looks")
            with gr.Tab("Ask"):
                with gr.Row():
                    img = gr.Image(type="pil", label="image", sources=["upload", "clipboard"])
                    heat = gr.Image(type="numpy", label="attention of the answer token", interactive=False)
                q = gr.Textbox(label="question", value="Is there a red circle in the image?")
                with gr.Row():
                    lo = gr.Slider(0, self.num_layers - 1, value=0, step=1, label="first layer")
                    hi = gr.Slider(0, self.num_layers - 1, value=self.num_layers - 1, step=1, label="last layer")
                    head = gr.Dropdown(["mean"] + [str(h) for h in range(self.num_heads)], value="mean", label="head")
                btn = gr.Button("Ask", variant="primary", elem_id="ask-button")
                ans = gr.Textbox(label="answer", elem_id="ask-answer", interactive=False)
                btn.click(_guard(self.ask), [img, q, lo, hi, head], [ans, heat], api_name="ask")
                if ex:
                    gr.Examples([[p, "Is there a red circle in the image?"] for p in ex], [img, q])
            with gr.Tab("CARVE"):
                with gr.Row():
                    cimg = gr.Image(type="pil", label="image")
                    refined = gr.Image(type="numpy", label="refined image", interactive=False)
                    contrast = gr.Image(type="numpy", label="contrast map", interactive=False)
                cq = gr.Textbox(label="question", value="What color is the star?")
                cbtn = gr.Button("Refine and answer", variant="primary")
                with gr.Row():
                    orig = gr.Textbox(label="original answer", interactive=False)
                    new = gr.Textbox(label="answer on the refined image", interactive=False)
                cbtn.click(_guard(self.carve), [cimg, cq], [orig, new, refined, contrast], api_name="carve")
                if ex:
                    gr.Examples([[p, "What color is the star?"] for p in ex], [cimg, cq])
            with gr.Tab("Hallucination fixes"):
                fimg = gr.Image(type="pil", label="image")
                fq = gr.Textbox(label="question", value="Is there a blue star in the image?")
                fbtn = gr.Button("Compare", variant="primary")
                table = gr.Dataframe(headers=["method", "answer"], label="answers", interactive=False)
                fbtn.click(_guard(self.fixes), [fimg, fq], table, api_name="fixes")
                if ex:
                    gr.Examples([[p, "Is there a blue star in the image?"] for p in ex], [fimg, fq])
        app.queue(default_concurrency_limit=1)
        return app

    def launch(self, **kw):
        app = self.build()
        return app, app.launch(server_name=self.cfg.host, server_port=self.cfg.port, max_file_size=MAX_UPLOAD,
                               share=False, show_error=True, quiet=True, ssr_mode=False, **kw)


def _arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--sam-checkpoint", default=None)
    return ap


def run(args) -> int:
    examples = make_examples(Path(tempfile.mkdtemp(prefix="vlmkit-demo-")))
    demo = Demo(DemoConfig(args.model, args.sam_checkpoint, args.host, args.port, examples=examples))
    demo.launch()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_arguments(argparse.ArgumentParser(description="vlmkit Gradio demo (offline)")).parse_args(argv))


def add_parsers(sub) -> None:
    _arguments(sub.add_parser("demo", help="start the Gradio demo (offline, on 127.0.0.1)")).set_defaults(func=run)
