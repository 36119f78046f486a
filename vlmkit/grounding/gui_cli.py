"""``vlmkit ground IMAGE "INSTRUCTION"`` and ``vlmkit train-grounding``; ``add_data_screenspot`` for ``vlmkit data``.

Wire-up: ``add_parsers(subparsers)`` adds ``ground`` and ``train-grounding``; :func:`add_data_screenspot` (from
:mod:`vlmkit.data.gui`) adds ``screenspot`` under an existing ``data`` group.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vlmkit.data.gui import add_data_screenspot  # re-exported for vlmkit/cli.py
from vlmkit.errors import InputError


def _load(model: str | None, device: str = "cpu"):
    import vlmkit

    return vlmkit.load(model, device=device)


def cmd_ground(args: argparse.Namespace) -> int:
    from vlmkit.grounding import v2p
    from vlmkit.io import load_image

    image = load_image(args.image)
    vlm = _load(args.model, args.device)
    g = v2p.make_grounder(vlm, args.head, fallback=not args.no_fallback, top_k=args.top_k)
    res = g.ground(image, args.instruction)
    if res.source == "attention":
        print("note: no trained pointer head for this model; attention-only grounding "
              "(last-token attention arg-max)", file=sys.stderr)
    out = {"point": [round(v, 1) for v in res.point], "point_norm": [round(v, 4) for v in res.point_norm],
           "candidates": [[round(x, 1), round(y, 1), round(s, 4)] for x, y, s in res.candidates],
           "source": res.source, "action": res.action()}
    print(json.dumps(out))
    if args.viz:
        save_viz(image, res, args.viz)
        print(f"wrote {args.viz}", file=sys.stderr)
    return 0


def save_viz(image, res, path: str | Path) -> Path:
    """Heat map over the screenshot, candidates as rings, the click as a filled dot."""
    import numpy as np
    from PIL import Image, ImageDraw

    h = res.heatmap / max(float(res.heatmap.max()), 1e-12)
    red = np.zeros((*h.shape, 3), np.uint8)
    red[..., 0] = 255
    over = Image.composite(Image.fromarray(red), image.convert("RGB"),
                           Image.fromarray((h * 160).astype(np.uint8), "L"))
    d = ImageDraw.Draw(over)
    for x, y, _ in res.candidates[1:]:
        d.ellipse([x - 6, y - 6, x + 6, y + 6], outline=(255, 200, 0), width=2)
    x, y = res.point
    d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=(0, 200, 0), outline=(0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    over.save(path)
    return Path(path)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from vlmkit.data import gui
    from vlmkit.grounding import train_grounding as tg
    from vlmkit.grounding import screen_tokens, v2p

    if args.finetune_backbone:
        from vlmkit.grounding import finetune_grounding as fg

        fg.check_args(args)  # e.g. --install default is refused
    elif args.init_head:
        raise InputError("--init-head continues a fine-tune: use it with --finetune-backbone")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_f = (out / "train.log").open("a", encoding="utf-8")

    def log(msg: str) -> None:
        log_f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        log_f.flush()

    vlm = _load(args.model, args.device)
    data = Path(args.data) if args.data else out / "data"
    if not args.data and not any(data.glob("screenspot_*_v2.json")):
        paths = gui.build_set(data, screens_per_template=args.screens, templates="train", seed=args.seed + 1000)
        log(f"generated training set {data} ({sum(len(json.loads(p.read_text())) for p in paths.values())} rows)")
    tile = args.tile or screen_tokens.native_tile(vlm)
    if args.finetune_backbone:
        return fg.cmd_finetune(args, vlm, data, tile, log)
    k, n = (int(v) for v in args.cache_shard.split("/"))
    parts = tg.build_cache(vlm, data, out / "cache", tile=tile, max_tiles=args.max_tiles, prompt=args.prompt,
                           progress=not args.quiet, shard=(k, n))
    if n > 1:
        return 0
    rows = tg.load_cache(parts)
    log(f"cache: {len(rows)} screenshots, {sum(len(r['samples']) for r in rows)} instructions, tile {tile}")
    if args.cache_only:
        return 0
    cfg = v2p.HeadConfig(d_key=rows[0]["keys"].shape[-1], d_query=rows[0]["samples"][0][0].shape[-1],
                         text_buckets=0 if args.no_text else 4096, tile=tile, dropout=args.dropout,
                         d_model=args.d_model, pos_freqs=args.pos_freqs, max_tiles=args.max_tiles,
                         prompt=args.prompt, backbone=str(vlm.name),
                         window=(0, 0) if args.global_attention else tuple(rows[0]["tile_grid"]))
    st = tg.TrainSettings(label_style=args.labels, k=args.k, suppress_weight=args.suppress, steps=args.steps,
                          minutes=args.minutes, batch=args.batch, lr=args.lr, seed=args.seed,
                          save_every=args.save_every)
    run = out / (args.run or f"{args.labels}-sup{args.suppress:g}")
    head = tg.train(rows, cfg, run, st, resume=not args.restart, progress=not args.quiet, log=log)
    head.cfg.trained.update(_provenance(vlm, data))
    v2p.save_head(head, run / "head")
    log(f"saved {run / 'head'} ({head.cfg.trained})")
    print(f"wrote {run / 'head'}")
    if args.install:
        dest = v2p.default_head_dir() if args.install == "default" else Path(args.install)
        v2p.save_head(head, dest)
        print(f"installed {dest}")
    return 0


def _provenance(vlm, data: Path) -> dict:
    """Which backbone weights and data the head was trained on (sha256 prefixes)."""
    import hashlib

    src = Path(getattr(vlm.model.config, "_name_or_path", "") or ".")
    w = src / "model.safetensors"
    sha = hashlib.sha256(w.read_bytes()).hexdigest()[:16] if w.is_file() else None
    ann = b"".join(p.read_bytes() for p in sorted(Path(data).glob("*.json")))
    return {"backbone_sha256": sha, "data": str(data), "data_sha256": hashlib.sha256(ann).hexdigest()[:16]}


def add_parsers(subparsers) -> None:
    """Add ``ground`` and ``train-grounding``."""
    g = subparsers.add_parser("ground", help="click point for an instruction on a screenshot (pointer head)")
    g.add_argument("image")
    g.add_argument("instruction")
    g.add_argument("--model", default=None,
                   help="checkpoint (default: the embedded model; 'gui': its shipped GUI fine-tune, more accurate)")
    g.add_argument("--head", default=None, help="pointer-head directory (default: <checkpoint>-pointer)")
    g.add_argument("--top-k", type=int, default=3)
    g.add_argument("--viz", default=None, help="write a heat-map PNG here")
    g.add_argument("--no-fallback", action="store_true", help="error instead of attention-only grounding")
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=cmd_ground)

    t = subparsers.add_parser("train-grounding", help="train a V2P pointer head on a frozen backbone (or, with "
                              "--finetune-backbone, together with the vision tower + projector)")
    t.add_argument("--model", default=None, help="backbone checkpoint (default: the embedded model)")
    t.add_argument("--data", default=None, help="ScreenSpot-format training set (default: generated, train "
                                                "templates only)")
    t.add_argument("--screens", type=int, default=100, help="generated screens per platform and template")
    t.add_argument("--out", default="runs/gui/train")
    t.add_argument("--run", default=None, help="run name under --out (default <labels>-sup<w>)")
    t.add_argument("--labels", choices=("binary", "center", "gaussian"), default="gaussian")
    t.add_argument("--k", type=float, default=4.1325, help="gaussian sigma = box side / k")
    t.add_argument("--suppress", type=float, default=1.0, help="weight of the background-suppression loss")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--minutes", type=float, default=40.0,
                   help="total wall-time budget of the run; a resumed run trains until it is spent")
    t.add_argument("--batch", type=int, default=4, help="screenshots per step (with all their instructions)")
    t.add_argument("--dropout", type=float, default=0.1)
    t.add_argument("--d-model", type=int, default=128)
    t.add_argument("--pos-freqs", type=int, default=0, help="Fourier frequencies of the absolute token position "
                                                             "(0: none; content and the tile's own code only)")
    t.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--tile", type=int, default=None, help="tile size (default: the processor's input size)")
    t.add_argument("--max-tiles", type=int, default=40)
    t.add_argument("--prompt", default="{instruction}")
    t.add_argument("--global-attention", action="store_true",
                   help="GUI-Actor's global self-attention (default: within each tile, affordable on CPU)")
    t.add_argument("--no-text", action="store_true", help="no own instruction embedding (query = LM state only)")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--cache-only", action="store_true", help="only build the feature cache")
    t.add_argument("--cache-shard", default="0/1", help="K/N: build only cache part K of every N, then stop "
                                                         "(run N processes side by side)")
    t.add_argument("--restart", action="store_true", help="ignore an existing state.pt")
    t.add_argument("--install", default=None, help="also save the head here ('default': beside the default model; "
                                                    "refused with --finetune-backbone)")
    t.add_argument("--finetune-backbone", action="store_true",
                   help="also train the vision tower and projector (language model frozen, no feature cache); writes "
                        "a SEPARATE checkpoint <out>/<run>/model (+ <run>/model-pointer head; --install PATH: also "
                        "there), never the shipped default")
    t.add_argument("--init-head", default=None,
                   help="with --finetune-backbone: start from this pointer-head directory (e.g. the head beside "
                        "--model when continuing an earlier fine-tune) instead of a random head")
    t.add_argument("--backbone-lr", type=float, default=None,
                   help="learning rate of the backbone with --finetune-backbone (default 0.1 x --lr)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry until ``vlmkit/cli.py`` wires this in: ``python -m vlmkit.grounding.gui_cli ground ...``."""
    from vlmkit.errors import VlmkitError

    parser = argparse.ArgumentParser(prog="vlmkit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_parsers(sub)
    add_data_screenspot(sub.add_parser("data").add_subparsers(dest="data_cmd", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (VlmkitError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
