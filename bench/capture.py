"""Memory and time of vlmkit's attention capture vs eager ``output_attentions`` and plain SDPA, in one run.

A tiny-width LLaVA with a 28-layer language model sees one image of ~2100 tokens (sequence length > 2048).
Peak-memory figures come from separate child processes (ru_maxrss high-water mark minus the plain-SDPA child's);
retained bytes are the tensors each method keeps; times are medians of interleaved runs in one process.

    python bench/capture.py [--layers 28] [--image 368] [--patch 8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

QUESTION = "is there a red circle in the image ?"


def build(args):
    import numpy as np
    from PIL import Image

    import tiny
    from vlmkit.models.vlm import VLM

    model, proc = tiny.build_llava(image_size=args.image, patch=args.patch, layers=args.layers, hidden=64, heads=4,
                                   kv=4)
    vlm = VLM(model, proc)
    img = Image.fromarray((np.random.RandomState(0).rand(args.image, args.image, 3) * 255).astype("uint8"))
    return vlm, img


def run_mode(mode: str, args) -> dict:
    """One forward in ``mode``; returns retained bytes and this process's peak RSS."""
    import torch

    vlm, img = build(args)
    inputs, layouts, _, _ = vlm.encode([img], [vlm.prompt(QUESTION)])
    seq = int(inputs["input_ids"].shape[1])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    retained = 0
    with torch.inference_mode():
        if mode == "sdpa":
            vlm.model(**inputs)
        elif mode == "eager":
            vlm.model.set_attn_implementation("eager")
            att = vlm.model(**inputs, output_attentions=True).attentions
            retained = sum(a.numel() * a.element_size() for a in att)
        else:
            with vlm.capture(rows=mode) as rec:
                vlm.generate([img], [QUESTION], max_new_tokens=1)
            m = rec.maps
            retained = m.prefill.numel() * 4 + m.decode.numel() * 4
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "seq": seq, "image_tokens": int(layouts[0].positions.size), "retained": retained,
            "peak_kb": peak, "start_kb": base}


def timings(args) -> dict:
    import torch

    vlm, img = build(args)
    t = {"sdpa": [], "capture_last": []}
    for _ in range(args.repeats + 1):  # first round is warm-up
        for key in t:
            start = time.perf_counter()
            with torch.inference_mode():
                if key == "sdpa":
                    vlm.generate([img], [QUESTION], max_new_tokens=1)
                else:
                    with vlm.capture(rows="last"):
                        vlm.generate([img], [QUESTION], max_new_tokens=1)
            t[key].append(time.perf_counter() - start)
    return {k: statistics.median(v[1:]) for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--image", type=int, default=368)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args)))
        return
    rows = {}
    for mode in ("sdpa", "eager", "last", "prompt_text"):
        cmd = [sys.executable, __file__, "--child", mode, "--layers", str(args.layers), "--image", str(args.image),
               "--patch", str(args.patch)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[mode] = json.loads(out)
    base_peak = rows["sdpa"]["peak_kb"]
    t = timings(args)
    seq, n_img = rows["sdpa"]["seq"], rows["sdpa"]["image_tokens"]
    print(f"LLaVA-architecture, {args.layers} LM layers x 4 heads (d=16), sequence {seq}, {n_img} image tokens, "
          f"CPU, torch {__import__('torch').__version__}\n")
    print("| method | retained bytes | peak RSS increase over plain SDPA | retained vs eager |")
    print("|---|---:|---:|---:|")
    eager_ret = rows["eager"]["retained"]
    for mode, label in (("eager", "eager output_attentions"), ("last", 'capture(rows="last")'),
                        ("prompt_text", 'capture(rows="prompt_text")')):
        r = rows[mode]
        inc = (r["peak_kb"] - base_peak) / 1024
        ratio = eager_ret / r["retained"] if r["retained"] else float("inf")
        print(f"| {label} | {r['retained']:,} | {inc:,.1f} MiB | {ratio:,.0f}x less |")
    print(f"\nforward time, median of {args.repeats} interleaved runs: plain SDPA {t['sdpa'] * 1e3:.1f} ms, "
          f"capture(rows=\"last\") {t['capture_last'] * 1e3:.1f} ms -> ratio {t['capture_last'] / t['sdpa']:.3f}x")


if __name__ == "__main__":
    main()
