"""Baseline vs each hallucination method at its default parameters, on the embedded default model, in one run.

POPE random / popular / adversarial (generated scenes built the POPE way), a cluttered POPE split (many distractors,
small objects) and CHAIR on generated scenes. For each method: accuracy, F1, yes-ratio, CHAIR_S / CHAIR_I, and the
latency of one answer relative to the baseline (median of interleaved batch-1 answers, same process; see
:func:`answer_latency`).

    python bench/methods_table.py [--images 30] [--methods none,paint,pai,vhr,var,vcd] [--out runs/methods_table]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def cluttered_pope(out_dir: Path, num_images: int, seed: int) -> Path:
    """A POPE set on cluttered scenes (6-8 objects, cluttered backgrounds)."""
    from vlmkit.data.pope import build_pope, scene_vocabulary, write_pope
    from vlmkit.data.scenes import generate_scene, object_frequencies

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    anns = []
    for i in range(num_images):
        s = generate_scene(seed + i, n_objects=6 + i % 3, style="cluttered")
        name = f"clutter_{i:04d}.png"
        s.image.save(out_dir / "images" / name)
        anns.append({"image": name, "objects": [o.name for o in s.objects]})
    build = build_pope(anns, splits=("random",), seed=seed, vocabulary=scene_vocabulary(),
                       frequencies=object_frequencies())
    paths = write_pope(build, out_dir, prefix="pope_cluttered")
    return paths[0]


def answer_latency(vlm, methods: list[str], seed: int, n: int = 12, rounds: int = 5) -> dict[str, float]:
    """Median seconds of one short answer (``vlm.ask``, batch 1) under each method, divided by the plain answer's.
    Methods are interleaved within every round and the first round is a discarded warm-up, so load drifts on a
    shared machine hit every method alike."""
    import statistics

    from vlmkit.data.scenes import generate_scene

    scenes = [generate_scene(seed + 90_000 + i, n_objects=3) for i in range(n)]
    qs = [f"Is there a {sc.objects[0].name} in the image?" for sc in scenes]
    times: dict[str, list[float]] = {m: [] for m in methods}
    for rnd in range(rounds + 1):
        for m in methods:
            for sc, q in zip(scenes, qs):
                t0 = time.perf_counter()
                if m == "none":
                    vlm.ask(sc.image, q)
                else:
                    with vlm.intervene(m):
                        vlm.ask(sc.image, q)
                if rnd:
                    times[m].append(time.perf_counter() - t0)
    base = statistics.median(times["none"]) if "none" in times else statistics.median(times[methods[0]])
    return {m: statistics.median(v) / base for m, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=30, help="images per generated set")
    ap.add_argument("--methods", default="none,paint,pai,vhr,var,vcd")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="runs/methods_table")
    ap.add_argument("--seed", type=int, default=424242, help="scene seeds (held out from training)")
    ap.add_argument("--chair-prompt", default="Describe the image.", help="the embedded model's trained wording")
    args = ap.parse_args()

    import vlmkit
    from vlmkit.cli import build_parser
    from vlmkit.eval.cli import eval_chair, eval_pope

    vlm = vlmkit.load(args.model)
    out = Path(args.out)
    clutter = cluttered_pope(out / "clutter_data", args.images, args.seed + 50_000)
    parser = build_parser()
    rows = []
    for method in args.methods.split(","):
        common = ["--method", method, "--quiet", "--seed", str(args.seed), "--num-images", str(args.images)]
        t0 = time.perf_counter()
        pope = eval_pope(parser.parse_args(["eval", "pope", "--out", str(out / method / "pope"), *common]), vlm)
        cl = eval_pope(parser.parse_args(["eval", "pope", "--data", str(clutter), "--split", "random", "--out",
                                          str(out / method / "clutter"), "--images", str(clutter.parent / "images"),
                                          *common[:-2]]), vlm)
        ch = eval_chair(parser.parse_args(["eval", "chair", "--out", str(out / method / "chair"), "--prompt",
                                           args.chair_prompt, *common]), vlm)
        m = pope["metrics"]
        rows.append({"method": method, "seconds": time.perf_counter() - t0,
                     "qps": pope["questions_per_s"],
                     **{f"{s}_acc": m[s]["accuracy"] for s in ("random", "popular", "adversarial")},
                     "f1": m["average"]["f1"], "yes_ratio": m["average"]["yes_ratio"],
                     "clutter_acc": cl["metrics"]["random"]["accuracy"],
                     "chair_s": ch["metrics"]["chair_s"], "chair_i": ch["metrics"]["chair_i"]})
    lat = answer_latency(vlm, [r["method"] for r in rows], args.seed)
    lines = ["| method | POPE rand acc | pop acc | adv acc | avg F1 | yes-ratio | cluttered acc | CHAIR_S | CHAIR_I "
             "| latency vs baseline |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        r["latency_ratio"] = lat[r["method"]]
        lines.append(f"| {r['method']} | {r['random_acc']:.3f} | {r['popular_acc']:.3f} | {r['adversarial_acc']:.3f} "
                     f"| {r['f1']:.3f} | {r['yes_ratio']:.3f} | {r['clutter_acc']:.3f} | {r['chair_s']:.3f} "
                     f"| {r['chair_i']:.3f} | {r['latency_ratio']:.2f}x |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    print(f"\nDefault model, {args.images} images per set, seeds from {args.seed}; batch size 8, CPU\n")
    print(table)


if __name__ == "__main__":
    main()
