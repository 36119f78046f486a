"""The Gradio demo: ask with attention heat maps, CARVE, hallucination fixes side by side, detection, GUI grounding.

Tabs (laid out in :mod:`vlmkit._app_tabs`, one named API route each): Ask (/ask), CARVE (/carve), Hallucination
fixes (/fixes), Detect (/detect: VL-SAM masks + boxes; disabled with the reason shown when no SAM loads) and GUI
grounding (/ground: click point, candidates, heat map; attention-only when the model has no pointer head). Requests
on the one model are serialised (queue concurrency 1 per route plus the ``VLM`` lock), uploads are decoded by Gradio
into PIL images (no client-supplied path is opened), image size is capped, and errors are shown in the UI as
messages, never as stack traces. Binds to 127.0.0.1 unless told otherwise.

    python apps/demo.py [--port N] [--host H] [--model PATH] [--sam-checkpoint PATH]
"""

from __future__ import annotations

import argparse
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
    examples: list[str] = field(default_factory=list)  # scene images (Ask, CARVE, fixes, Detect)
    detect_examples: list[tuple[str, str]] = field(default_factory=list)  # (image, comma-separated names or "")
    gui_examples: list[tuple[str, str]] = field(default_factory=list)  # (screenshot, instruction)
    ground_model: str | None = None  # checkpoint of the Ground tab (None: "gui" beside the embedded model, else model)


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


def scene_examples(out_dir: Path, n: int = 3) -> list[tuple[str, str]]:
    """Write a few generated scenes as example images; returns ``(path, comma-separated object names)``."""
    from vlmkit.data.scenes import generate_scene

    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for seed in range(n):
        p = out_dir / f"scene{seed}.png"
        scene = generate_scene(1000 + seed, size=224, n_objects=3, style="plain")
        scene.image.save(p)
        out.append((str(p), ", ".join(dict.fromkeys(scene.names))))
    return out


def make_examples(out_dir: Path, n: int = 3) -> list[str]:
    """Write a few generated scenes as example images; returns their paths."""
    return [p for p, _ in scene_examples(out_dir, n)]


def make_gui_examples(out_dir: Path, n: int = 3) -> list[tuple[str, str]]:
    """Write ``n`` generated screenshots (cycling desktop, web, mobile); returns ``(path, instruction)`` pairs, the
    instruction naming one of the screen's text targets."""
    import random

    from vlmkit.data.gui import N_TEMPLATES, instruction_for, render_screen

    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        platform = ("desktop", "web", "mobile")[i % 3]
        screen = render_screen(platform, i % N_TEMPLATES, 2000 + i)
        targets = [t for t in screen.targets if t.kind == "text"] or screen.targets
        p = out_dir / f"screen{i}-{platform}.png"
        screen.image.save(p)
        out.append((str(p), instruction_for(targets[0], platform, random.Random(i)) if targets else "click OK"))
    return out


class Demo:
    """Holds the model(s) and builds the Blocks app."""

    def __init__(self, cfg: DemoConfig, vlm=None, segmenter=None, grounder=None):
        import vlmkit

        self.cfg = cfg
        self.vlm = vlm if vlm is not None else vlmkit.load(cfg.model)
        self.num_layers = self.vlm.adapter.num_layers
        self.num_heads = int(self.vlm.model.config.text_config.num_attention_heads)
        from vlmkit.methods.carve import Carve

        self._carve = Carve()  # one object: its general-pass cache serves repeated questions on an image
        self.segmenter, self.segmenter_error = segmenter, None
        if segmenter is None:
            self._load_segmenter()
        self._grounder = grounder if grounder is not None else self._load_grounder(own_vlm=vlm is None)
        self.grounder_name = self._grounder.name

    def _load_segmenter(self) -> None:
        """The SAM of ``--sam-checkpoint`` (a bad path stops the start) or the shipped small SAM (if it is missing,
        only the Detect tab is disabled, with the reason shown)."""
        from vlmkit.grounding.segmenters import load_segmenter

        try:
            self.segmenter = load_segmenter(self.cfg.sam_checkpoint)
        except Exception as e:  # the shipped SAM may be missing or being rewritten
            if self.cfg.sam_checkpoint is not None:
                raise
            self.segmenter_error = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("Detect tab disabled: %s", self.segmenter_error)

    def _load_grounder(self, own_vlm: bool = True):
        """The pointer-head grounder of ``cfg.ground_model`` — by default the shipped GUI fine-tune when the demo runs
        the embedded model, else the demo's model — with the head beside the checkpoint; attention-only if there is
        none or it does not load."""
        import vlmkit
        from vlmkit.errors import ModelLoadError
        from vlmkit.grounding.v2p import Grounder, make_grounder

        src = self.cfg.ground_model or ("gui" if own_vlm and self.cfg.model is None else None)
        vlm = self.vlm
        if src is not None:
            try:
                vlm = vlmkit.load(src)
            except ModelLoadError as e:
                if self.cfg.ground_model is not None:
                    raise
                log.warning("GUI checkpoint not usable (%s); the Ground tab uses the demo's model", e)
        try:
            return make_grounder(vlm)
        except Exception as e:  # noqa: BLE001 - a head being rewritten or of another model: keep the demo up
            log.warning("pointer head not usable (%s: %s); GUI grounding falls back to attention",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return Grounder(self.vlm, None)

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

    def detect(self, image, names: str = "", questions: int = 5, multiscale: bool = False):
        """VL-SAM detection: ``(AnnotatedImage value, rows)`` (see ``_app_tabs.detections_view``); ``names`` is
        comma-separated (empty: open-ended), ``questions`` how many question templates (1..5) per object."""
        import vlmkit
        from vlmkit._app_tabs import detections_view, parse_names

        img = self._image(image)
        if self.segmenter is None:
            raise ValueError(f"detection is unavailable: {self.segmenter_error or 'no segmenter'}")
        q = int(questions)
        if not 1 <= q <= 5:
            raise ValueError(f"questions={q}: use 1..5")
        dets = vlmkit.detect(img, vlm=self.vlm, segmenter=self.segmenter, names=parse_names(names), questions=q,
                             multiscale=bool(multiscale))
        return detections_view(img, dets)

    def ground(self, image, instruction: str):
        """GUI grounding: screenshot with the click marked, heat-map overlay, action text, details dict."""
        from vlmkit._app_tabs import mark_points
        from vlmkit.viz import heat_overlay

        img = self._image(image)
        if not instruction or not instruction.strip():
            raise ValueError("type an instruction")
        res = self._grounder.ground(img, instruction.strip())
        act = res.action()
        cands = [[round(x, 1), round(y, 1), round(s, 5)] for x, y, s in res.candidates]
        details = {"action": act, "point": [round(v, 1) for v in res.point],
                   "point_norm": [round(v, 4) for v in res.point_norm], "candidates": cands, "source": res.source,
                   "size": list(res.size)}
        return (np.asarray(mark_points(img, res.candidates, res.point)),
                np.asarray(mark_points(heat_overlay(img, res.heatmap), res.candidates, res.point)),
                f"{act['action']}(x={act['x']}, y={act['y']})", details)

    # ------------------------------------------------------------------ app
    def build(self):
        import gradio as gr

        from vlmkit import _app_tabs as tabs

        with gr.Blocks(title="vlmkit demo", analytics_enabled=False) as app:
            gr.Markdown("## vlmkit — see where a VLM looks")
            for title, builder in (("Ask", tabs.ask_tab), ("CARVE", tabs.carve_tab),
                                   ("Hallucination fixes", tabs.fixes_tab), ("Detect", tabs.detect_tab),
                                   ("GUI grounding", tabs.ground_tab)):
                with gr.Tab(title):
                    builder(self, gr, _guard)
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
    ap.add_argument("--sam-checkpoint", default=None,
                    help="SAM for the Detect tab: a .pth/.safetensors file or a directory (default: the shipped one)")
    ap.add_argument("--ground-model", default=None,
                    help="checkpoint of the Ground tab (default: the shipped GUI fine-tune 'gui' with the embedded "
                         "model, else --model)")
    return ap


def run(args) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="vlmkit-demo-"))
    scenes = scene_examples(tmp)
    cfg = DemoConfig(args.model, args.sam_checkpoint, args.host, args.port, examples=[p for p, _ in scenes],
                     detect_examples=[(p, "") for p, _ in scenes] + scenes[:1], gui_examples=make_gui_examples(tmp),
                     ground_model=args.ground_model)
    app, (_, url, _) = Demo(cfg).launch(prevent_thread_lock=True)
    print(f"vlmkit demo running on {url} (Ctrl+C to stop)", flush=True)
    app.block_thread()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_arguments(argparse.ArgumentParser(description="vlmkit Gradio demo (offline)")).parse_args(argv))


def add_parsers(sub) -> None:
    _arguments(sub.add_parser("demo", help="start the Gradio demo (offline, on 127.0.0.1)")).set_defaults(func=run)
