"""CARVE latency vs one plain answer: general pass cached (same image, new question) and uncached (new image).

Runs on the embedded default model when it is installed, else on a random-weight model of the same architecture
(said in the output; its answers run to ``max_new_tokens``, so pass ``--max-new-tokens 2`` to mimic a trained model's
one-word answers). Every repetition times plain / cached / uncached for each (image, question) in a rotating order;
the table shows the median per item, summed over items, and the ratio to the plain answer, in wall-clock seconds and
in process CPU seconds (steadier on a shared machine). Issue 5's targets: cached <= 2.0x, uncached <= 3.0x.

    python bench/carve_latency.py [--model PATH] [--device cpu] [--threads N] [--max-new-tokens N] [--repeats 7]
                                  [--items 6] [--all-configs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

QUESTIONS = ["Is there a red circle in the image?", "What color is the star?", "How many objects are there?",
             "Where is the blue square?", "Is there a green triangle?", "What shape is the yellow object?"]
WARM_QUESTION = "What objects are in the image?"


def load_vlm(path, device: str):
    from vlmkit.models.vlm import VLM, default_model_path, load

    if path is not None or (default_model_path() / "config.json").is_file():
        vlm = load(path, device=device)
        return vlm, f"{vlm.name} (trained)"
    from vlmkit.default.build import build_model_and_processor

    model, processor = build_model_and_processor(seed=0)
    vlm = VLM(model.to(device), processor, name="default-architecture, random weights")
    return vlm, "default model NOT installed: random-weight model of the default architecture"


def items(n: int):
    from vlmkit.data.scenes import generate_scene

    return [(generate_scene(1000 + i, size=(160 + 32 * (i % 3), 128 + 32 * (i % 2))).image,
             QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]


def measure(vlm, data, carve_params: dict, repeats: int, max_new_tokens: int | None) -> dict:
    from vlmkit.methods.carve import Carve

    cached = Carve(cache_size=len(data) + 1, max_new_tokens=max_new_tokens, **carve_params)
    uncached = Carve(cache_size=0, max_new_tokens=max_new_tokens, **carve_params)
    max_new = cached.max_new_tokens or vlm.generation.max_new_tokens
    runs = {
        "plain": lambda im, q: vlm.ask(im, q, max_new_tokens=max_new),
        "cached": lambda im, q: cached(im, q, vlm=vlm),
        "uncached": lambda im, q: uncached(im, q, vlm=vlm),
    }
    for im, _ in data:  # warm-up; fills the cache with a different question
        cached(im, WARM_QUESTION, vlm=vlm)
        uncached(im, WARM_QUESTION, vlm=vlm)
        vlm.ask(im, WARM_QUESTION, max_new_tokens=max_new)
    wall = {k: [[] for _ in data] for k in runs}
    cpu = {k: [[] for _ in data] for k in runs}
    order = list(runs)
    for rep in range(repeats):
        rot = order[rep % 3:] + order[:rep % 3]
        for i, (im, q) in enumerate(data):
            for k in rot:
                t, c = time.perf_counter(), time.process_time()
                runs[k](im, q)
                wall[k][i].append(time.perf_counter() - t)
                cpu[k][i].append(time.process_time() - c)
    out = {"cache": cached.cache_info()}
    for name, times in (("wall", wall), ("cpu", cpu)):
        med = {k: sum(statistics.median(v) for v in times[k]) for k in runs}
        out[name] = {"seconds": med, "cached": med["cached"] / med["plain"],
                     "uncached": med["uncached"] / med["plain"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--items", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="answer length cap (default: the VLM's)")
    ap.add_argument("--all-configs", action="store_true", help="also final_batch=True, step_mode=weighted/last "
                                                                "and final_input=original_plus_refined")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    vlm, what = load_vlm(args.model, args.device)
    data = items(args.items)
    configs = [{}]
    if args.all_configs:
        configs += [{"final_batch": True}, {"step_mode": "weighted"}, {"step_mode": "last"},
                    {"final_input": "original_plus_refined"}]
    print(f"model: {what}; device: {args.device}; threads: {torch.get_num_threads()}; max_new_tokens: "
          f"{args.max_new_tokens or vlm.generation.max_new_tokens}; {len(data)} items x {args.repeats} interleaved "
          "repeats; medians per item, summed")
    print("| CARVE params | plain s | cached s | uncached s | cached / plain (wall, cpu) "
          "| uncached / plain (wall, cpu) |")
    print("|---|---|---|---|---|---|")
    results = []
    for cfg in configs:
        r = measure(vlm, data, cfg, args.repeats, args.max_new_tokens)
        s, w, c = r["wall"]["seconds"], r["wall"], r["cpu"]
        name = ", ".join(f"{k}={v}" for k, v in cfg.items()) or "defaults"
        print(f"| {name} | {s['plain']:.3f} | {s['cached']:.3f} | {s['uncached']:.3f} | "
              f"{w['cached']:.2f}x, {c['cached']:.2f}x | {w['uncached']:.2f}x, {c['uncached']:.2f}x |", flush=True)
        results.append({"params": cfg, **r})
    print(json.dumps({"model": what, "device": args.device, "max_new_tokens": args.max_new_tokens,
                      "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
