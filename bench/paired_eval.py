"""Two default-model checkpoints on the same held-out questions, question by question (issue 3: is a new run better?)

    python bench/paired_eval.py --a vlmkit/default/checkpoints/scenes-llava --b runs/r6/model

Asks both models the scored questions of ``metrics.json`` (:func:`vlmkit.default.evaluate.question_sets`: POPE
random / popular / adversarial, colour, shape, count, location, the cluttered POPE splits; 200 test scenes) and prints,
per set, each model's accuracy, how many questions only one of them gets right, and the exact two-sided McNemar
p-value of that split (a sign test on the discordant questions). Accuracies equal the ``metrics.json`` figures of
the same checkpoints; a difference with a large p is within what two runs of one recipe can differ by.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETS = ("pope_random", "pope_popular", "pope_adversarial", "color", "shape", "count", "location",
        "cluttered_random", "cluttered_adversarial")


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: P(a split at least this uneven) of ``only_a + only_b`` fair coin flips."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main(argv=None) -> int:
    import numpy as np
    import torch

    from vlmkit.default.evaluate import SKILLS, answer, is_yes, load, question_sets

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="first checkpoint directory (e.g. the shipped one)")
    ap.add_argument("--b", required=True, help="second checkpoint directory")
    ap.add_argument("--scenes", type=int, default=200, help="test scenes (default 200, as metrics.json)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for d in (args.a, args.b):
        if not (Path(d) / "config.json").is_file():
            ap.error(f"{d}: not a checkpoint directory (no config.json)")
    _, _, sets, _ = question_sets(args.scenes)
    tokens = dict(SKILLS)
    models = [load(args.a), load(args.b)]
    rows = []
    print(f"| set | n | A | B | only A right | only B right | McNemar p |\n|---|---:|---:|---:|---:|---:|---:|")
    for name in SETS:
        qs = sets[name]
        yes_no = name.startswith(("pope", "cluttered"))
        right = []
        for model, processor in models:
            preds = answer(model, processor, [s.image for s, _ in qs], [q.question for _, q in qs],
                           2 if yes_no else tokens[name])
            right.append(np.array([(is_yes(p) == (q.answer == "yes")) if yes_no else p == q.answer
                                   for p, (_, q) in zip(preds, qs)]))                       # bool [questions]
        a, b = right
        only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
        row = {"set": name, "n": len(qs), "a": round(float(a.mean()), 4), "b": round(float(b.mean()), 4),
               "only_a": only_a, "only_b": only_b, "p": round(mcnemar_p(only_a, only_b), 3)}
        rows.append(row)
        print(f"| {name} | {row['n']} | {row['a']:.3f} | {row['b']:.3f} | {only_a} | {only_b} | {row['p']:.3f} |",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"a": args.a, "b": args.b, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
