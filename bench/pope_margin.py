"""POPE on a validation split beside the test split, and what a "yes" bias would do (issue 3: how far is 0.95?)

    python bench/pope_margin.py --model vlmkit/default/checkpoints/scenes-llava

Scores the first answer token's logit margin ``logit("yes") - logit("no")`` (the token ``generate`` picks when the
margin is positive) for the POPE questions of the 200 test scenes of ``metrics.json`` and of ``--val-scenes`` other
held-out scenes (seeds :data:`~vlmkit.default.evaluate.VAL_SEED0` + 10000 onwards, never used in training or by the
pointing validation), and prints accuracy and yes-ratio per split for each bias added to the margin. Bias 0 equals
``metrics.json``. A bias chosen on the validation rows and applied to the test rows is the usual
"calibrate before use" check: if it moves validation by no more than noise, the test-set gap to a target is noise too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BIASES = (-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


def margins(model, processor, scenes, rng, batch: int = 64) -> dict:
    """{split: (margin [Q], label [Q])} for the POPE questions of ``scenes`` (:func:`~vlmkit.default.evaluate.pope_sets`,
    the draw ``metrics.json`` uses)."""
    import numpy as np
    import torch

    from vlmkit.default.build import prompt_text
    from vlmkit.default.evaluate import pope_sets

    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    out = {}
    for split, qs in pope_sets(scenes, rng).items():
        m = []
        with torch.no_grad():
            for i in range(0, len(qs), batch):
                part = qs[i:i + batch]
                enc = processor(images=[s.image for s, _ in part], text=[prompt_text(q.question) for _, q in part],
                                padding=True, return_tensors="pt")
                logits = model(**enc).logits[:, -1]                      # [B, vocab], the first answer token
                m += (logits[:, yes] - logits[:, no]).tolist()
        out[split] = (np.array(m), np.array([q.answer == "yes" for _, q in qs]))
    return out


def main(argv=None) -> int:
    import numpy as np
    import torch

    from vlmkit.data.scenes import generate_scene
    from vlmkit.default import CHECKPOINT_DIR
    from vlmkit.default.evaluate import EVAL_SEED0, POPE_SPLITS, VAL_SEED0, load

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(CHECKPOINT_DIR), help="scenes checkpoint directory (default: the embedded model)")
    ap.add_argument("--val-scenes", type=int, default=400, help="validation scenes (default 400)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"{args.model}: not a checkpoint directory (no config.json)")
    torch.set_num_threads(args.threads)
    model, processor = load(args.model)
    rows = {}
    for name, seed0, n in (("val", VAL_SEED0 + 10_000, args.val_scenes), ("test", EVAL_SEED0, 200)):
        scenes = [generate_scene(seed0 + i) for i in range(n)]
        rows[name] = margins(model, processor, scenes, np.random.default_rng(2024))
    print("| rows | bias | " + " | ".join(f"{s} acc / yes" for s in POPE_SPLITS) + " |")
    print("|---|---:|" + "---:|" * len(POPE_SPLITS))
    for name, d in rows.items():
        for b in BIASES:
            cells = [f"{((m + b > 0) == y).mean():.4f} / {(m + b > 0).mean():.3f}" for m, y in (d[s] for s in POPE_SPLITS)]
            print(f"| {name} (n {len(d['random'][0])}) | {b:+.2f} | " + " | ".join(cells) + " |")
    val = rows["val"]
    best = max(BIASES, key=lambda b: np.mean([((m + b > 0) == y).mean() for m, y in val.values()]))
    print(f"bias chosen on validation (mean accuracy of the three splits): {best:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
