"""``vlmkit detect`` (VL-SAM detection + segmentation to COCO json and an overlay) and ``vlmkit train-sam``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _categories(spec: str | None) -> list[str] | None:
    """Category names from a COCO json (``categories[].name``), a text file (one per line) or "a,b,c"."""
    if not spec:
        return None
    p = Path(spec)
    if p.is_file():
        if p.suffix == ".json":
            return [c["name"] for c in json.loads(p.read_text())["categories"]]
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    return [s.strip() for s in spec.split(",") if s.strip()]


def _detect(args) -> int:
    import vlmkit
    from vlmkit.grounding.names import ExactNames, clip_names
    from vlmkit.grounding.segmenters import load_segmenter
    from vlmkit.grounding.vlsam import detect, draw_detections, to_coco

    vlm = vlmkit.load(args.model, device=args.device)
    seg = load_segmenter(args.sam_checkpoint, model_type=args.sam_type, device=args.device)
    cats = _categories(args.categories)
    mapper = None
    if cats is not None:
        mapper = (clip_names(cats, model_name=args.clip_model, checkpoint=args.clip_checkpoint)
                  if args.clip_checkpoint else ExactNames(cats))
    names = [n.strip() for n in args.names.split(",") if n.strip()] if args.names else None
    dets = detect(args.image, vlm=vlm, segmenter=seg, names=names, mapper=mapper,
                  multiscale=not args.no_multiscale, refine=args.refine, min_score=args.min_score)
    ids = {n: i + 1 for i, n in enumerate(cats)} if cats is not None else None
    results = to_coco(dets, image_id=args.image_id, categories=ids)
    if args.out:
        Path(args.out).write_text(json.dumps(results))
    if args.viz:
        draw_detections(args.image, dets).save(args.viz)
    for d in dets:
        x0, y0, x1, y1 = d.box
        print(f"{d.label}\t{d.score:.3f}\t{x0:.0f},{y0:.0f},{x1:.0f},{y1:.0f}")
    if not dets:
        print("no objects detected", file=sys.stderr)
    return 0


def _train_sam(args) -> int:
    import torch

    from vlmkit.grounding.train_sam import SMOKE_CONFIG, train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or str(Path(__file__).resolve().parent.parent / "default" / "checkpoints" / "sam-tiny")
    metrics = train(minutes=args.minutes, run_dir=args.run_dir, out_dir=out, batch=args.batch,
                    resume=args.resume, config=SMOKE_CONFIG if args.smoke else None,
                    scene_size=64 if args.smoke else None, pool0=20 if args.smoke else args.pool,
                    val_scenes=3 if args.smoke else args.val_scenes,
                    log=lambda m: print(m, flush=True))
    print(json.dumps(metrics))
    return 0


def add_parsers(sub) -> None:
    d = sub.add_parser("detect", help="open-ended detection + segmentation (VL-SAM): COCO json and an overlay")
    d.add_argument("image")
    d.add_argument("--model", default=None, help="VLM checkpoint directory (default: the embedded model)")
    d.add_argument("--sam-checkpoint", default=None,
                   help="SAM: .pth/.safetensors file (official vit_b/l/h), a transformers SamModel directory or a "
                        "vlmkit sam directory (default: the shipped small SAM)")
    d.add_argument("--sam-type", default=None, help="vit_b | vit_l | vit_h (default: inferred from the weights)")
    d.add_argument("--names", default=None, help="comma-separated object names (open-vocabulary); default: the "
                                                 "VLM lists the objects (open-ended)")
    d.add_argument("--categories", default=None, help="category list (COCO json, text file or a,b,c) that names "
                                                      "are mapped to; unmapped names are dropped")
    d.add_argument("--clip-checkpoint", default=None, help="local open_clip weights: map names to categories by "
                                                           "CLIP text similarity instead of exact match")
    d.add_argument("--clip-model", default="ViT-B-32")
    d.add_argument("--out", default=None, help="write COCO results (list of dicts, RLE masks) here")
    d.add_argument("--viz", default=None, help="write an overlay PNG here")
    d.add_argument("--image-id", type=int, default=1)
    d.add_argument("--refine", type=int, default=2, choices=(0, 1, 2))
    d.add_argument("--no-multiscale", action="store_true")
    d.add_argument("--min-score", type=float, default=0.0)
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=_detect)

    t = sub.add_parser("train-sam", help="train the default small SAM on generated scenes (point prompts)")
    t.add_argument("--minutes", type=float, default=40.0)
    t.add_argument("--run-dir", default="runs/sam/train")
    t.add_argument("--out", default=None, help="export directory (default: the package's sam-tiny checkpoint)")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--pool", type=int, default=1000, help="scenes generated before the first step")
    t.add_argument("--val-scenes", type=int, default=60)
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--smoke", action="store_true", help="tiny model and images, for tests")
    t.set_defaults(func=_train_sam)
