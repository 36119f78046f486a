"""V2P ablation on a generated held-out ScreenSpot-v2 set, through the ``vlmkit eval screenspot`` machinery.

    python3 bench/screenspot_eval.py --heads gaussian=runs/gui/train/gaussian-sup1/head \
        binary=runs/gui/train/binary-sup0/head --attention --shuffled gaussian --out runs/gui/eval

Generates the held-out set (layout templates never used in training) unless ``--data`` is given, evaluates every
variant with :func:`vlmkit.eval.cli.eval_screenspot` (point-in-box, platform x type table), adds accuracy by target
size (thirds of box area), and writes ``<out>/ablation.md`` + ``ablation.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _args(data: Path, out: Path, limit: int | None) -> argparse.Namespace:
    return argparse.Namespace(data=str(data), images=None, format="auto", box_format="auto", point_units="auto",
                              prompt="{instruction}", out=str(out), limit=limit, method="none", method_args="",
                              num_processes=1, batch_size=8, resume=False, quiet=True, max_new_tokens=None, seed=0,
                              max_pixels=None, model=None, device="cpu", dtype=None)


def shuffled_copy(data: Path, dest: Path) -> Path:
    """The same set with each instruction replaced by another instruction of the same screenshot."""
    dest.mkdir(parents=True, exist_ok=True)
    link = dest / "screenspot_imgs"
    if not link.exists():
        link.symlink_to((data / "screenspot_imgs").resolve())
    for f in sorted(data.glob("screenspot_*_v2.json")):
        rows = json.loads(f.read_text())
        by_img: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by_img.setdefault(r["img_filename"], []).append(i)
        new = [dict(r) for r in rows]
        for idx in by_img.values():
            for a, b in zip(idx, idx[1:] + idx[:1]):
                new[a]["instruction"] = rows[b]["instruction"]
        (dest / f.name).write_text(json.dumps(new), encoding="utf-8")
    return dest


def size_thirds(data: Path, out: Path) -> dict:
    """Accuracy by thirds of the targets ranked by box area (``vlmkit.eval.screenspot.size_thirds``)."""
    from vlmkit.eval import runner
    from vlmkit.eval import screenspot as ss

    samples, _, _ = ss.load_screenspot(data)
    preds = {r["id"]: r.get("answer") for r in runner.read_predictions(out / runner.PREDICTIONS) if "answer" in r}
    return ss.score_screenspot(samples, preds, ss.default_images_dir(data)).by_size


def main(argv=None) -> int:
    import torch

    import vlmkit
    from vlmkit.data import gui
    from vlmkit.eval.cli import eval_screenspot
    from vlmkit.grounding import v2p

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--heads", nargs="*", default=[], help="name=DIR pointer heads")
    ap.add_argument("--attention", action="store_true", help="also the attention-only fallback")
    ap.add_argument("--shuffled", default=None, help="head name to also run with shuffled instructions")
    ap.add_argument("--out", default="runs/gui/eval")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="where the VLM runs (the pointer head stays on CPU)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    data = Path(a.data) if a.data else out / "data"
    if not a.data and not any(data.glob("screenspot_*_v2.json")):
        gui.build_set(data, screens_per_template=18, templates="heldout", seed=7)
    vlm = vlmkit.load(a.model, device=a.device)
    variants = [(name, v2p.load_head(d), data) for name, d in (h.split("=", 1) for h in a.heads)]
    if a.attention:
        variants.append(("attention-only", None, data))
    if a.shuffled:
        head = {n: h for n, h, _ in variants}[a.shuffled]
        variants.append((f"{a.shuffled}, shuffled instructions", head, shuffled_copy(data, out / "shuffled-data")))
    report = {}
    for name, head, d in variants:
        t0 = time.time()
        run_out = out / re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
        res = eval_screenspot(_args(d, run_out, a.limit), vlm=v2p.Grounder(vlm, head))
        report[name] = {"table": res["metrics"]["table"], "overall": res["metrics"]["overall"],
                        "by_size": size_thirds(d, run_out), "seconds": round(time.time() - t0, 1),
                        "head": None if head is None else {k: getattr(head.cfg, k) for k in
                                                           ("label_style", "k", "suppress_weight", "trained")}}
    (out / "ablation.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    cols = ["mobile text", "mobile icon", "desktop text", "desktop icon", "web text", "web icon", "overall",
            "small", "medium", "large"]
    lines = ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in report.items():
        t = r["table"]
        cells = [t.get(p, {}).get(ty, {}).get("accuracy") for p in ("mobile", "desktop", "web") for ty in ("text",
                                                                                                          "icon")]
        cells += [r["overall"]["accuracy"]] + [r["by_size"][k]["accuracy"] for k in ("small", "medium", "large")]
        lines.append(f"| {name} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")
    n = next(iter(report.values()))["overall"]["n"] if report else 0
    md = f"Held-out generated ScreenSpot-v2 set ({n} instructions), point-in-box accuracy\n\n" + "\n".join(lines)
    (out / "ablation.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
