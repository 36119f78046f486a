"""``vlmkit eval pope|chair|screenspot``, ``vlmkit lm-eval ARGS...`` and ``vlmkit data pope|chair``.

Wire-up: ``vlmkit.cli`` calls :func:`add_parsers` (adds "eval", "lm-eval" and "data"), or :func:`add_eval_parser` /
:func:`add_data_commands` separately when another module also owns "data". Each parser sets
``func(args) -> int``. The task functions (:func:`eval_pope`, ...) take an optional already-loaded ``vlm`` and return
the results dict, so they double as a Python API.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from vlmkit.errors import InputError, VlmkitError
from vlmkit.eval import chair as chair_mod
from vlmkit.eval import pope as pope_mod
from vlmkit.eval import report, runner
from vlmkit.eval import screenspot as ss_mod

CHAIR_PROMPT = "Please describe this image in detail."
SCREENSPOT_PROMPT = ("In this screenshot, where should I click to do this: \"{instruction}\"? "
                     "Answer with the click point as [x, y], coordinates relative to the image between 0 and 1.")
MAX_NEW_TOKENS = {"pope": 32, "chair": 192, "screenspot": 48}


# ------------------------------------------------------------------------------------------------- model
def make_vlm(model: str | None = None, device: str = "cpu", dtype: str | None = None) -> Any:
    """Load a model: ``vlmkit.load(path)``, or ``"package.module:factory"`` for any object with ``ask_batch``."""
    if model and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", model) and not Path(model).exists():
        mod, fn = model.split(":")
        return getattr(importlib.import_module(mod), fn)()
    import vlmkit

    load = getattr(vlmkit, "load", None)
    if load is None:
        raise VlmkitError("vlmkit.load is not available in this build (the model API has not landed yet)")
    return load(model, device=device, dtype=dtype) if dtype else load(model, device=device)


def _run(args: argparse.Namespace, task: str, items: list[runner.EvalItem], vlm: Any, limit: int | None = None):
    """Run the items (``limit`` = first N; tasks that pre-select pass ``None``); returns (result, results head)."""
    gen = {"max_new_tokens": args.max_new_tokens or MAX_NEW_TOKENS[task]}
    method_args = runner.parse_method_args(args.method_args)
    source = vlm if vlm is not None else (
        functools.partial(make_vlm, args.model, args.device, args.dtype) if args.num_processes > 1
        else make_vlm(args.model, args.device, args.dtype))
    res, used = runner.run(source, items, args.out, num_processes=args.num_processes, limit=limit,
                           seed=args.seed, method=args.method, method_args=method_args, batch_size=args.batch_size,
                           resume=args.resume, gen=gen, progress=not args.quiet, max_pixels=args.max_pixels)
    if res is None:  # a non-zero rank under accelerate launch / torchrun: rank 0 reports
        return None, None
    first = next((it.id for it in items if it.id in res.prompts), None)
    name = getattr(used, "name", None) or args.model or "default"
    settings = getattr(used, "generation", None)
    if settings is not None and hasattr(settings, "replace"):  # vlmkit.VLM: record every effective setting
        with contextlib.suppress(TypeError):
            gen = dict(vars(settings.replace(**gen)))
    head = {"task": task, "model": str(name), "method": args.method or "none", "method_args": method_args,
            "prompt": res.prompts.get(first) if first else None, "generation": gen, "seed": args.seed,
            "batch_size": args.batch_size, "num_processes": args.num_processes, "limit": args.limit}
    return res, head


def _finish(args, results: dict, load_errors: list, res: runner.RunResult, n_items: int) -> dict:
    errors = [str(e) for e in [*load_errors, *res.errors]]
    results.update({"n_items": n_items, "n_failed": len(errors), "errors": errors,
                    "seconds": round(res.seconds, 3),
                    "questions_per_s": round(res.generated / res.seconds, 3) if res.seconds > 0 else None,
                    "versions": runner.versions()})
    paths = report.write_report(args.out, results)
    print(report.summary_table(results))
    if errors:
        print(f"{len(errors)} row(s) failed; first: {errors[0]}", file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return results


# ------------------------------------------------------------------------------------------------- tasks
def _rank0_first(make) -> None:
    """Run ``make()`` (write the built-in data set) once: on rank 0 before the others read it under a launcher."""
    rank, world = runner.launcher_rank()
    if world == 1:
        make()
        return
    if rank == 0:
        make()
    runner.barrier()


def eval_pope(args: argparse.Namespace, vlm: Any = None) -> dict:
    """POPE on ``--data`` (file or directory), or on a generated scene set when no data is given."""
    data = args.data
    if data is None:
        from vlmkit.data.pope import build_scene_pope

        data = Path(args.out) / "data"
        _rank0_first(lambda: None if (args.resume and any(data.glob("pope_*.json")))
                     else build_scene_pope(data, num_images=args.num_images, seed=args.seed))
    rows, load_errors = pope_mod.load_pope(data, args.split)
    if not rows:
        raise InputError(f"{data}: no usable POPE rows" + (f" (first error: {load_errors[0]})" if load_errors else ""))
    base = Path(data) if Path(data).is_dir() else Path(data).parent
    images = Path(args.images) if args.images else (base / "images" if (base / "images").is_dir() else base)
    if args.limit:  # the first N rows of every split, so that a quick run still covers all splits
        kept, per_split = [], {}
        for r in rows:
            per_split[r.split] = per_split.get(r.split, 0) + 1
            if per_split[r.split] <= args.limit:
                kept.append(r)
        rows = kept
    template = args.prompt or "{question}"
    if "{question}" not in template:
        raise InputError(f"--prompt {template!r} must contain {{question}}")
    items = [runner.EvalItem(r.id, str(images / r.image), template.format(question=r.question), r.file, r.line)
             for r in rows]
    res, head = _run(args, "pope", items, vlm)
    if res is None:
        return {}
    scored = rows
    scores = pope_mod.score_all_rules(scored, res.answers)
    rule = args.scoring_rule
    results = {**head, "data": str(data), "scoring_rule": rule, "metrics": scores[rule].as_dict(),
               "metrics_by_rule": {k: v.as_dict() for k, v in scores.items()}}
    return _finish(args, results, load_errors, res, len(scored))


def _chair_items(args) -> tuple[list[chair_mod.ChairItem], list, str, Path]:
    data = args.data
    if data is None:
        from vlmkit.data.pope import build_scene_chair

        target = Path(args.out) / "data"
        data = target / "chair.json"
        _rank0_first(lambda: None if (args.resume and data.exists())
                     else build_scene_chair(target, num_images=args.num_images, seed=args.seed))
    path = Path(data)
    try:
        head = json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" else None
    except (OSError, json.JSONDecodeError):
        head = None
    if isinstance(head, dict) and "categories" in head:
        items, errors = chair_mod.load_coco_chair(path, args.captions), []
    else:
        items, errors = chair_mod.load_chair_items(path)
    base = path.parent
    images = Path(args.images) if args.images else (base / "images" if (base / "images").is_dir() else base)
    return items, errors, str(data), images


def eval_chair(args: argparse.Namespace, vlm: Any = None) -> dict:
    """CHAIR: caption each image, then CHAIR_S / CHAIR_I / recall against the ground-truth objects."""
    items, load_errors, data, images = _chair_items(args)
    vocab = args.vocab
    if vocab == "auto":
        scene_names = {f"{c} {s}" for c in chair_mod.SCENE_COLORS for s in chair_mod.SCENE_SHAPES}
        vocab = "scene" if all(o in scene_names for it in items for o in it.objects) else "coco"
    if args.limit and len(items) > args.limit:  # CHAIR papers caption a seeded random sample (e.g. 500 images)
        import random

        items = random.Random(args.seed).sample(items, args.limit)
    run_items = [runner.EvalItem(it.id, str(images / it.image), args.prompt or CHAIR_PROMPT, it.file, it.line)
                 for it in items]
    res, head = _run(args, "chair", run_items, vlm)
    if res is None:
        return {}
    triples = [(it.id, res.answers[it.id], it.objects) for it in items if it.id in res.answers]
    score = chair_mod.score_chair(triples, vocab)
    details = Path(args.out) / "chair_captions.jsonl"
    with details.open("w", encoding="utf-8") as f:
        for r in score.per_caption:
            f.write(json.dumps(r.__dict__) + "\n")
    results = {**head, "data": data, "scoring_rule": f"chair-{vocab}", "metrics": score.as_dict()}
    return _finish(args, results, load_errors, res, len(items))


def eval_screenspot(args: argparse.Namespace, vlm: Any = None) -> dict:
    """ScreenSpot v1/v2/Pro: ask for a click point per instruction, score point-in-box.

    With no ``--data``: a held-out generated ScreenSpot-v2 set (layout templates never used to train the pointer
    head) is written under ``OUT/data`` and the model answers through its pointer head (attention-only fallback).
    With ``--data``, a checkpoint that has a pointer head beside it (``<checkpoint>-pointer``: the default model,
    ``--model gui``) answers through the head too; any other model answers in text (its own coordinate format).
    """
    generated = args.data is None
    if generated:
        from vlmkit.data.gui import build_set

        data = Path(args.out) / "data"
        _rank0_first(lambda: None if any(data.glob("screenspot_*_v2.json"))
                     else build_set(data, screens_per_template=args.screens, templates="heldout", seed=args.seed + 7))
        args.data = str(data)
    if vlm is None and args.num_processes == 1 and ":" not in str(args.model or ""):
        from vlmkit.grounding.v2p import HEAD_FILE, head_dir_for, make_grounder

        vlm = make_vlm(args.model, args.device, args.dtype)
        d = head_dir_for(vlm)
        if generated or (d is not None and (d / HEAD_FILE).is_file()):
            vlm = make_grounder(vlm)
            args.prompt = args.prompt or "{instruction}"
    elif generated:
        args.prompt = args.prompt or "{instruction}"
        if vlm is None and args.model is None:   # each worker builds the default grounder
            args.model = "vlmkit.grounding.v2p:default_grounder"
        elif vlm is None and ":" not in args.model:
            raise InputError("--num-processes with --model PATH and no --data: pass --model package.module:factory "
                             "returning a grounder (e.g. vlmkit.grounding.v2p.make_grounder on your model)")
    samples, load_errors, formats = ss_mod.load_screenspot(args.data, args.format, args.box_format)
    images = Path(args.images) if args.images else ss_mod.default_images_dir(args.data)
    template = args.prompt or SCREENSPOT_PROMPT
    items = [runner.EvalItem(s.id, str(images / s.image), template.format(instruction=s.instruction), s.file, s.line)
             for s in samples]
    res, head = _run(args, "screenspot", items, vlm, args.limit)
    if res is None:
        return {}
    used = {it.id for it in (items[:args.limit] if args.limit else items)}
    score = ss_mod.score_screenspot([s for s in samples if s.id in used], res.answers, images, args.point_units)
    results = {**head, "data": str(args.data), "scoring_rule": f"point_in_box ({args.point_units})",
               "formats": {k: f"{v.dataset} {v.box}" for k, v in formats.items()}, "metrics": score.as_dict()}
    return _finish(args, results, load_errors, res, len(used))


TASKS = {"pope": eval_pope, "chair": eval_chair, "screenspot": eval_screenspot}


def _command(task: str):
    def run_cmd(args: argparse.Namespace) -> int:
        if args.out is None:
            args.out = f"runs/{task}"
        TASKS[task](args)
        return 0
    return run_cmd


# ------------------------------------------------------------------------------------------------ parsers
def _common(p: argparse.ArgumentParser, task: str) -> None:
    ss_help = ("annotation file or directory (v1/v2 json, Pro annotations/; default: a generated held-out GUI set, "
               "answered by the default model's pointer head)")
    p.add_argument("--data", help="data file or directory (default: a generated scene set)"
                   if task != "screenspot" else ss_help)
    p.add_argument("--images", help="image directory (default: next to the data)")
    p.add_argument("--model", help="checkpoint path or hub id for vlmkit.load, or module:factory (default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"default {MAX_NEW_TOKENS[task]}")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images larger than this many pixels (vlmkit.io.load_image)")
    p.add_argument("--out", default=None, help=f"output directory (default runs/{task})")
    p.add_argument("--resume", action="store_true", help="skip ids already in the predictions file")
    p.add_argument("--limit", type=int, default=None,
                   help="only N rows (POPE: the first N of each split; CHAIR: a seeded sample of N images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="none", help="intervention from the methods registry")
    p.add_argument("--method-args", default="", help="k=v,k=v arguments of --method")
    p.add_argument("--num-processes", type=int, default=1, help="worker processes, each with its own model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--prompt", default=None,
                   help={"pope": "question template with {question}, e.g. '{question} Answer yes or no.'",
                         "chair": f"caption request (default {CHAIR_PROMPT!r}; the embedded model was trained on \"Describe the image.\")",
                         "screenspot": "question template with {instruction}"}[task])
    p.set_defaults(func=_command(task))


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` with sub-commands pope, chair, screenspot."""
    ev = subparsers.add_parser("eval", help="run POPE / CHAIR / ScreenSpot on local data")
    sub = ev.add_subparsers(dest="eval_task", required=True)
    p = sub.add_parser("pope", help="POPE yes/no object probing")
    _common(p, "pope")
    p.add_argument("--split", default=None, help="split name for a single file (random/popular/adversarial)")
    p.add_argument("--scoring-rule", choices=pope_mod.RULES, default=pope_mod.DEFAULT_RULE)
    p.add_argument("--num-images", type=int, default=30, help="images in the generated set (no --data)")
    c = sub.add_parser("chair", help="CHAIR caption hallucination")
    _common(c, "chair")
    c.add_argument("--captions", default=None, help="COCO captions_*.json (reference captions add ground truth)")
    c.add_argument("--vocab", choices=("auto", "scene", "coco"), default="auto")
    c.add_argument("--num-images", type=int, default=30, help="images in the generated set (no --data)")
    s = sub.add_parser("screenspot", help="ScreenSpot v1/v2/Pro click grounding")
    _common(s, "screenspot")
    s.add_argument("--format", choices=("auto", *ss_mod.DATASETS), default="auto")
    s.add_argument("--box-format", choices=("auto", *ss_mod.BOX_FORMATS), default="auto")
    s.add_argument("--point-units", choices=ss_mod.POINT_UNITS, default="auto")
    s.add_argument("--screens", type=int, default=18,
                   help="screens per held-out layout template in the generated set (no --data)")
    return ev


def _data_pope(args: argparse.Namespace) -> int:
    from vlmkit.data.pope import build_scene_pope

    build, paths = build_scene_pope(args.out, num_images=args.num_images, seed=args.seed)
    for p in paths:
        print(f"wrote {p} ({len(build.rows[p.stem.split('_')[-1]])} questions)")
    return 0


def _data_chair(args: argparse.Namespace) -> int:
    from vlmkit.data.pope import build_scene_chair

    print(f"wrote {build_scene_chair(args.out, num_images=args.num_images, seed=args.seed)}")
    return 0


def add_data_commands(data_subparsers) -> None:
    """Add ``pope`` and ``chair`` under an existing ``data`` sub-command group."""
    for name, fn, hlp in (("pope", _data_pope, "generated POPE set (official JSON-lines format)"),
                          ("chair", _data_chair, "generated CHAIR set (images + chair.json)")):
        p = data_subparsers.add_parser(name, help=hlp)
        p.add_argument("--out", required=True)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--num-images", type=int, default=30)
        p.set_defaults(func=fn)
    importlib.import_module("vlmkit.data.gui").add_data_screenspot(data_subparsers)  # generated GUI set (issue 7)


def _lm_eval(args: argparse.Namespace) -> int:
    try:
        from vlmkit.eval.lm_eval import run_cli
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        raise VlmkitError("vlmkit lm-eval needs lm-eval 0.4.13: pip install 'vlmkit[eval]'") from None
    return run_cli(args.lm_eval_args)


def add_lm_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``lm-eval ARGS...``: every argument goes to lm-eval's own command line, with model "vlmkit" registered
    (and ``--model vlmkit`` when no ``--model`` is given); ``vlmkit lm-eval --help`` prints lm-eval's help."""
    # No option prefix: argparse would otherwise claim lm-eval's options (--model, -h) for this parser.
    p = subparsers.add_parser("lm-eval", add_help=False, prefix_chars="\0",
                              help="run lm-eval (EleutherAI harness) with vlmkit models: --model_args "
                                   "pretrained=PATH,method=NAME,k=v --tasks ...")
    p.add_argument("lm_eval_args", nargs="*", metavar="LM_EVAL_ARGS")
    p.set_defaults(func=_lm_eval)
    return p


def add_parsers(subparsers) -> None:
    """Add ``eval``, ``lm-eval`` and ``data`` (with ``pope``/``chair``) to the top-level sub-parsers."""
    add_eval_parser(subparsers)
    add_lm_eval_parser(subparsers)
    data = subparsers.add_parser("data", help="write generated data sets")
    add_data_commands(data.add_subparsers(dest="data_cmd", required=True))


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m vlmkit.eval.cli eval pope ...``) until the top-level CLI wires this in."""
    parser = argparse.ArgumentParser(prog="vlmkit")
    add_parsers(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VlmkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
