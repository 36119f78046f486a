"""Are the default model's POPE misses the language model's or the vision tower's? (issue 3)

    python bench/pope_tower_readout.py --model vlmkit/default/checkpoints/scenes-llava --run runs/r5

Builds the evaluation's POPE-random set (200 test scenes, the same questions as ``metrics.json``), takes the
model's yes/no decision from the first answer token's logits, and reads each question's object off the vision tower
with the stage-A per-patch heads of a ``train-default`` run (``RUN/ckpt.pt``: the heads are not shipped, and the
run's tower must be the model's -- the script checks it bit for bit). For present objects, by size (token cells
covered): how often the heads read the object's colour and shape at its best-covered cell and its name in any cell,
separately for questions the model answers right and wrong. For absent objects: how often the heads read the absent
name somewhere in the image. If the model's misses are where the heads misread, the tower's features are the limit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    import numpy as np
    import torch

    from vlmkit.data.scenes import COLORS, SHAPES, generate_scene
    from vlmkit.default.build import patch_coverage, prompt_text
    from vlmkit.default.evaluate import EVAL_SEED0, load
    from vlmkit.default.qa import pope_questions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--run", required=True, type=Path, help="train-default --run-dir holding ckpt.pt (stage-A heads)")
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ckpt = a.run / "ckpt.pt"
    if not ckpt.is_file():
        ap.error(f"{ckpt}: no train-default checkpoint there")
    model, proc = load(a.model)
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    sd = model.state_dict()
    tower = {k: v for k, v in ck["model"].items() if "vision_tower" in k}
    if not tower or not all(k in sd and torch.equal(sd[k], v) for k, v in tower.items()):
        ap.error(f"{ckpt}: its vision tower is not the one in {a.model}; its heads would not read this tower")
    heads = torch.nn.ModuleDict({"color": torch.nn.Linear(128, 9), "shape": torch.nn.Linear(128, 9),
                                 "center": torch.nn.Linear(128, 1)})
    heads.load_state_dict(ck["heads"])
    scenes = [generate_scene(EVAL_SEED0 + i) for i in range(a.scenes)]
    rng = np.random.default_rng(2024)                       # evaluate()'s generator: random is its first split
    qs = [(sc, qa) for sc in scenes for qa in pope_questions(sc, "random", rng)]
    yes_id, no_id = (proc.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no"))
    present, absent = [], []
    with torch.no_grad():
        for i in range(0, len(qs), 64):
            batch = qs[i:i + 64]
            enc = proc(images=[s.image for s, _ in batch], text=[prompt_text(q.question) for _, q in batch],
                       padding=True, return_tensors="pt")
            logits = model(**enc).logits[:, -1].float()                                   # [B, vocab]
            said_yes = (logits[:, yes_id] > logits[:, no_id]).tolist()
            hs = model.model.vision_tower(enc["pixel_values"]).last_hidden_state[:, 1:]   # [B, 64, 128]
            pc, ps = heads["color"](hs).argmax(-1), heads["shape"](hs).argmax(-1)         # [B, 64] class ids
            for j, (sc, qa) in enumerate(batch):
                color, shape = qa.question.removeprefix("Is there a ").removesuffix(" in the image?").split(" ")
                cid, sid = COLORS.index(color) + 1, SHAPES.index(shape) + 1              # 0 = background
                anywhere = bool(((pc[j] == cid) & (ps[j] == sid)).any())
                if qa.answer == "no":
                    absent.append({"right": not said_yes[j], "anywhere": anywhere})
                    continue
                cov = max((patch_coverage(sc.objects[t].mask) for t in qa.targets), key=lambda c: c.max())  # [64]
                cell = int(cov.argmax())
                present.append({"right": said_yes[j], "cells": float(cov.sum()), "anywhere": anywhere,
                                "colour": int(pc[j, cell]) == cid, "shape": int(ps[j, cell]) == sid})
    report = {"n_questions": len(qs), "present": {}, "absent": {}}
    print(f"{len(qs)} POPE-random questions; model accuracy "
          f"{np.mean([r['right'] for r in present + absent]):.4f}\n")
    print("| present object | model | n | heads: colour at best cell | shape at best cell | name in any cell |")
    print("|---|---|---:|---:|---:|---:|")
    for lo, hi, name in ((0, 0.5, "< 0.5 cell"), (0.5, 1, "0.5-1 cell"), (1, 1e9, ">= 1 cell")):
        for right in (True, False):
            rows = [r for r in present if lo <= r["cells"] < hi and r["right"] == right]
            if rows:
                m = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in ("colour", "shape", "anywhere")}
                report["present"][f"{name}, model {'right' if right else 'wrong'}"] = {"n": len(rows), **m}
                print(f"| {name} | {'right' if right else 'wrong'} | {len(rows)} | {m['colour']} | {m['shape']} | "
                      f"{m['anywhere']} |")
    print("\n| absent object | model | n | heads read the absent name somewhere |\n|---|---|---:|---:|")
    for right in (True, False):
        rows = [r for r in absent if r["right"] == right]
        if rows:
            share = round(float(np.mean([r["anywhere"] for r in rows])), 3)
            report["absent"][f"model {'right' if right else 'wrong'}"] = {"n": len(rows), "anywhere": share}
            print(f"| absent | {'right' if right else 'wrong'} | {len(rows)} | {share} |")
    print("\n" + json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
