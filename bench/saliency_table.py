"""Attention vs saliency on the default model over generated existence questions about present objects.

Prints two markdown tables: Pearson / Spearman correlation of each layer's head-mean attention (and the all-mean and
rollout) with each saliency map, averaged over questions; and deletion / insertion AUC of the first answer token's
probability for attention, each saliency method and a random order (deletion: lower = more faithful).

    python bench/saliency_table.py [--n 100] [--ig-steps 16] [--seed 777000] [--out runs/saliency]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--ig-steps", type=int, default=16)
    ap.add_argument("--random-orders", type=int, default=3)
    ap.add_argument("--seed", type=int, default=777000, help="scene seeds (held out from training)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="runs/saliency")
    args = ap.parse_args()

    import vlmkit
    from vlmkit.data.pope import question_for
    from vlmkit.data.scenes import generate_scene
    from vlmkit.methods.saliency import Explainer

    vlm = vlmkit.load(args.model)
    ex = Explainer(vlm, ig_steps=args.ig_steps, random_orders=args.random_orders)
    reports, times = [], []
    for i in range(args.n):
        scene = generate_scene(args.seed + i)
        obj = scene.objects[i % len(scene.objects)]
        t0 = time.perf_counter()
        reports.append(ex.explain(scene.image, question_for(obj.name)))
        times.append(time.perf_counter() - t0)
    sal = list(reports[0].saliency)
    att = [k for k in reports[0].attention if "." not in k]
    lines = ["| attention map | " + " | ".join(f"Pearson vs {s} | Spearman vs {s}" for s in sal) + " |",
             "|---|" + "---:|" * (2 * len(sal))]
    summary = {}
    for a in att:
        cells = []
        for s in sal:
            p = float(np.mean([r.agreement[a][s]["pearson"] for r in reports]))
            sp = float(np.mean([r.agreement[a][s]["spearman"] for r in reports]))
            summary[f"{a}|{s}"] = (p, sp)
            cells += [f"{p:.3f}", f"{sp:.3f}"]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    orders = list(reports[0].auc["deletion"])
    lines += ["", "| order | deletion AUC (lower = more faithful) | insertion AUC (higher = more faithful) |",
              "|---|---:|---:|"]
    for o in orders:
        d = float(np.mean([r.auc["deletion"][o] for r in reports]))
        ins = float(np.mean([r.auc["insertion"][o] for r in reports]))
        lines.append(f"| {o} | {d:.4f} | {ins:.4f} |")
    yes = sum(r.answer.lower().startswith("yes") for r in reports)
    head = (f"Default model, {args.n} existence questions about present objects (held-out seeds from {args.seed}); "
            f"answered yes: {yes}/{args.n}; IG steps {args.ig_steps}; median {np.median(times):.2f} s per question "
            "for all methods together.\n")
    table = head + "\n" + "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(table)


if __name__ == "__main__":
    main()
