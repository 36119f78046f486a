"""Questions/s of the eval runner (batched) vs a one-question-at-a-time SDPA loop, same model and data, one run.

Data: the built-in generated POPE set (``vlmkit.data.pope.build_scene_pope``). Model: ``--model PATH``, else the
embedded default model (``vlmkit.load()``) when its checkpoint exists, else the default architecture with random
weights (noted in the output; its answers run to ``--max-new-tokens`` instead of stopping after "Yes."/"No.").

Rows (each measured over all questions in every round; rounds rotate the order, so the methods interleave):

* ``runner bN``  -- :func:`vlmkit.eval.runner.run_items` with ``--batch-size N`` (image loading, prompts, the
  predictions file with its per-batch fsync included: what ``vlmkit eval pope`` does);
* ``vlm.ask loop`` -- ``vlm.ask`` per question (vlmkit's path at batch size 1: shows what batching alone buys);
* ``sdpa loop`` -- the baseline users write: per question, ``processor(...)`` + ``model.generate`` with
  transformers' own ``sdpa`` attention and the same prompt, greedy, same ``max_new_tokens``.

The ratio is ``runner q/s / sdpa-loop q/s``; answers of the runner and the SDPA loop are compared too.

    python bench/eval_throughput.py [--batch-size 8] [--questions 96] [--rounds 2] [--device cpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_model(args):
    """``(vlm, note)``: ``--model``, the embedded default checkpoint, or the default architecture untrained."""
    import vlmkit
    from vlmkit.models.vlm import VLM, default_model_path

    kw = {"device": args.device, **({"dtype": args.dtype} if args.dtype else {})}
    if args.model:
        return vlmkit.load(args.model, **kw), ""
    if (default_model_path() / "config.json").is_file():
        return vlmkit.load(None, **kw), ""
    note = (f"NOTE: no default checkpoint at {default_model_path()}: using the default architecture with random "
            "weights (answers do not stop early, every question decodes --max-new-tokens tokens)")
    try:
        from vlmkit.default.build import build_model_and_processor

        model, proc = build_model_and_processor(seed=0)
        name = "default-architecture (random weights)"
    except ImportError:
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny

        model, proc = tiny.build("llava")
        name = "tests/tiny llava (random weights)"
    vlm = VLM(model.to(args.device), proc, name=name)
    return vlm, note


def make_items(args, workdir: Path):
    """The first ``--questions`` POPE questions (round-robin over the three splits) as runner items."""
    from vlmkit.data.pope import build_scene_pope
    from vlmkit.eval import pope as pope_mod
    from vlmkit.eval.runner import EvalItem

    data = workdir / "data"
    build_scene_pope(data, num_images=args.num_images, seed=args.seed)
    rows, errors = pope_mod.load_pope(data)
    if errors:
        raise SystemExit(f"data errors: {errors[:3]}")
    by_split: dict[str, list] = {}
    for r in rows:
        by_split.setdefault(r.split, []).append(r)
    mixed = [r for group in zip(*by_split.values()) for r in group]
    items = [EvalItem(r.id, str(data / "images" / r.image), r.question, r.file, r.line) for r in mixed]
    return items[:args.questions]


@contextlib.contextmanager
def stock_sdpa(vlm):
    """The language model on transformers' own SDPA attention for the block (vlmkit's backend restored after)."""
    vlm.model.set_attn_implementation({"text_config": "sdpa"})
    try:
        yield
    finally:
        vlm.model.set_attn_implementation({"text_config": "vlmkit"})


def sdpa_loop(vlm, items, max_new_tokens: int) -> dict[str, str]:
    """One question at a time with plain transformers: processor -> generate -> decode."""
    import torch
    from PIL import Image

    proc, tok, model = vlm.processor, vlm.processor.tokenizer, vlm.model
    cfg = model.generation_config
    out = {}
    with stock_sdpa(vlm), torch.inference_mode():
        for it in items:
            with Image.open(it.image) as im:
                image = im.convert("RGB")
            inputs = proc(images=[image], text=[vlm.prompt(it.question)], return_tensors="pt").to(vlm.device)
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
            out[it.id] = tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return out


def ask_loop(vlm, items, max_new_tokens: int) -> dict[str, str]:
    return {it.id: vlm.ask(it.image, it.question, max_new_tokens=max_new_tokens) for it in items}


def runner_pass(vlm, items, max_new_tokens: int, batch_size: int, out_dir: Path) -> dict[str, str]:
    from vlmkit.eval.runner import run_items

    res = run_items(vlm, items, out_dir, batch_size=batch_size, gen={"max_new_tokens": max_new_tokens},
                    progress=False)
    if res.errors:
        raise SystemExit(f"runner errors: {[str(e) for e in res.errors[:3]]}")
    return res.answers


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded default model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="as `vlmkit eval pope` (32)")
    ap.add_argument("--num-images", type=int, default=8, help="images in the generated POPE set")
    ap.add_argument("--questions", type=int, default=96, help="questions per method per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-ask-loop", action="store_true", help="skip the vlm.ask row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vlm, note = load_model(args)
    work = Path(tempfile.mkdtemp(prefix="vlmkit-eval-bench-"))
    items = make_items(args, work)
    n, mnt = len(items), args.max_new_tokens
    methods = {f"runner b{args.batch_size}": lambda its: runner_pass(vlm, its, mnt, args.batch_size, work / "run"),
               "sdpa loop": lambda its: sdpa_loop(vlm, its, mnt)}
    if not args.no_ask_loop:
        methods["vlm.ask loop"] = lambda its: ask_loop(vlm, its, mnt)
    for fn in methods.values():  # warm-up (allocator, kernels, lazy imports), not timed
        fn(items[:2])
    seconds = {k: 0.0 for k in methods}
    answers: dict[str, dict] = {}
    names = list(methods)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each round
            sync(args.device)
            t0 = time.perf_counter()
            answers[k] = methods[k](items)
            sync(args.device)
            seconds[k] += time.perf_counter() - t0
    qps = {k: n * args.rounds / s for k, s in seconds.items()}
    base = qps["sdpa loop"]
    runner_key = names[0]
    same = sum(answers[runner_key][i] == answers["sdpa loop"][i] for i in answers["sdpa loop"])

    print(f"model: {vlm.name} ({vlm.family}, {sum(p.numel() for p in vlm.model.parameters()) / 1e6:.2f} M params)"
          f" on {args.device}{' ' + args.dtype if args.dtype else ''}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    if note:
        print(note)
    print(f"data: {n} generated POPE questions ({args.num_images} images), max_new_tokens={mnt}, "
          f"{args.rounds} interleaved rounds")
    print()
    print("| method | questions | seconds | questions/s | vs sdpa loop |")
    print("|---|---:|---:|---:|---:|")
    for k in names:
        print(f"| {k} | {n * args.rounds} | {seconds[k]:.2f} | {qps[k]:.2f} | {qps[k] / base:.2f}x |")
    print()
    ratio = qps[runner_key] / base
    print(f"runner (batch {args.batch_size}) / one-at-a-time SDPA loop: {ratio:.2f}x (target >= 3x: "
          f"{'met' if ratio >= 3 else 'NOT met'}); identical answers: {same}/{n}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": vlm.name, "note": note, "device": args.device,
                                               "questions": n, "rounds": args.rounds, "max_new_tokens": mnt,
                                               "batch_size": args.batch_size, "seconds": seconds, "qps": qps,
                                               "ratio": ratio, "identical_answers": same}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
