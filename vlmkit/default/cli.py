"""``vlmkit train-default``: reproduce the embedded default model from scratch (see :mod:`vlmkit.default.train`)."""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path(__file__).parent / "checkpoints" / "scenes-llava"


def _mix(parse_name: str):
    """An argparse type: the text parsed by ``vlmkit.default.qa.<parse_name>``; a bad mix is a usage error."""
    def parse(text: str) -> dict[str, float]:
        from vlmkit.default import qa

        try:
            return getattr(qa, parse_name)(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _train(args) -> int:
    import torch

    from vlmkit.default.train import train

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(torch.get_num_threads(), args.threads)))
    from vlmkit.default.train import STEPS

    minutes = args.minutes if args.minutes is not None else (0.7 if args.smoke else 68.0)
    steps_a, steps_b = args.steps_a, args.steps_b
    if not args.smoke and args.minutes is None and steps_a is None and steps_b is None:
        steps_a, steps_b = STEPS          # the shipped recipe: fixed step counts
    out = args.out or (Path(args.run_dir) / "smoke-model" if args.smoke else DEFAULT_OUT)
    train(out, minutes=minutes, smoke=args.smoke, resume=args.resume, run_dir=args.run_dir,
          n_scenes=args.scenes, eval_images=args.eval_images, steps_a=steps_a,
          steps_b=steps_b, answer_loss=args.answer_loss, group_by_length=args.group_by_length,
          precision=args.precision, variety=args.variety, shape_weight=args.shape_weight,
          curriculum=tuple(args.curriculum), spread=args.spread, vision_layers=args.vision_layers,
          negatives=args.negatives, ema=tuple(args.ema), tower_from=args.tower_from, skills=args.skills)
    print(f"saved model + metrics.json to {out}")
    return 0


def add_parsers(subparsers) -> None:
    """Register ``train-default`` on an ``argparse`` sub-parsers object."""
    # literal numbers (importing train.py here would load torch for every vlmkit command); a test keeps them in sync
    N_SCENES, STEPS, PRECISION, VARIETY, SHAPE_WEIGHT = 48000, (21000, 18000), "fp32", 0.5, 0.0
    CURRICULUM, SPREAD, VISION_LAYERS, EMA = (0.3, 0.6), 0.25, 3, (0.9995,)
    NEGATIVES = "random=0.3,popular=0.1,adversarial=0.2,binding=0.2,partial=0.2"
    SKILLS = "exist=0.34,color=0.12,shape=0.08,count=0.15,list=0.1,describe=0.07,location=0.14"
    p = subparsers.add_parser("train-default", help="train the embedded default model from scratch",
                              description="Train the small LLaVA default model on generated scenes "
                                          f"({N_SCENES} scenes, two stages: {STEPS[0]} + {STEPS[1]} steps, or "
                                          "--minutes), save it and evaluate it on held-out scenes.")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output directory (default: the packaged checkpoint {DEFAULT_OUT}; with --smoke: "
                        "RUN_DIR/smoke-model)")
    p.add_argument("--smoke", action="store_true", help="tiny run (~1 minute) to check the recipe end to end")
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget in minutes instead of the shipped step counts (smoke: 0.7)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/ckpt.pt")
    p.add_argument("--run-dir", default="runs/default", help="scratch dir for checkpoints (default runs/default)")
    p.add_argument("--scenes", type=int, default=None, help=f"training scenes (default {N_SCENES}; smoke 300)")
    p.add_argument("--eval-images", type=int, default=None, help="held-out scenes to evaluate on (default 200)")
    p.add_argument("--steps-a", type=int, default=None, help="fix stage A to this many steps (overrides time)")
    p.add_argument("--steps-b", type=int, default=None, help="fix stage B to this many steps (overrides time)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--answer-loss", choices=("token", "answer"), default="token",
                   help="average the answer loss over tokens (shipped recipe) or over answers")
    p.add_argument("--group-by-length", type=int, default=1, metavar="G",
                   help="stage B: draw G batches at once and batch them by conversation length (less padding, "
                        "bench/stage_b_step.py); 1 = the shipped recipe")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=PRECISION,
                   help=f"bf16: matmuls under bf16 autocast, fp32 master weights (default {PRECISION}; "
                        "bench/stage_b_step.py)")
    p.add_argument("--variety", type=float, default=VARIETY, metavar="SHARE",
                   help=f"share of training scenes drawn with generate_scene(..., variety=True) (default {VARIETY})")
    p.add_argument("--shape-weight", type=float, default=SHAPE_WEIGHT, metavar="W",
                   help=f"stage A: extra weight of the shape loss on object cells (default {SHAPE_WEIGHT}; "
                        "bench/stage_a_probe.py)")
    p.add_argument("--curriculum", type=float, nargs=2, default=list(CURRICULUM), metavar=("HOLD", "END"),
                   help="stage B: draw only easy scenes for the first HOLD of the steps, then fewer and fewer until "
                        f"END (fractions; default {CURRICULUM[0]} {CURRICULUM[1]})")
    p.add_argument("--spread", type=float, default=SPREAD, metavar="SHARE",
                   help="stage A: an object also labels every token cell holding this share of its area (default "
                        f"{SPREAD}; 0 = its best-covered cell only; bench/stage_a_probe.py --spread)")
    p.add_argument("--vision-layers", type=int, default=VISION_LAYERS, metavar="N",
                   help=f"depth of the vision tower (default {VISION_LAYERS})")
    p.add_argument("--negatives", type=_mix("parse_negative_mix"), default=None, metavar="KIND=SHARE,...",
                   help="stage B: how existence questions pick their absent object, shares of random, popular, "
                        "adversarial, binding (colour and shape both in the scene) and partial (exactly one of them) "
                        f"(default {NEGATIVES.replace(',', ', ')})")
    p.add_argument("--skills", type=_mix("parse_skill_mix"), default=None, metavar="SKILL=SHARE,...",
                   help="stage B: share of the questions of each skill: exist, color, shape, count, list, describe, "
                        f"location (default {SKILLS.replace(',', ', ')})")
    p.add_argument("--ema", type=float, nargs="+", default=list(EMA), metavar="DECAY",
                   help="stage B: keep exponential moving averages of the weights with these decays; the model "
                        "saved holds the first, RUN_DIR/raw the raw weights, RUN_DIR/ema-<decay> the others "
                        f"(default {' '.join(map(str, EMA)) or 'none'})")
    p.add_argument("--tower-from", default=None, metavar="RUN_DIR",
                   help="skip stage A: start stage B on the vision tower of that run (past stage A; same stage-A "
                        "options; its scene pool is reused), e.g. to try a stage-B change without re-running stage A")
    p.set_defaults(func=_train)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlmkit-default")
    add_parsers(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
