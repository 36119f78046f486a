"""The ``vlmkit`` command line. Each feature module adds its own sub-commands through ``add_parsers``."""

from __future__ import annotations

import argparse
import importlib
import sys

from vlmkit.errors import VlmkitError

#: modules that contribute sub-commands; each exposes ``add_parsers(subparsers)``.
COMMAND_MODULES = ("vlmkit.eval.cli", "vlmkit.default.cli", "vlmkit.grounding.cli", "vlmkit.grounding.gui_cli",
                   "vlmkit.agent", "vlmkit.app")


def parse_layers(spec: str | None) -> list[int] | None:
    """``"8-12"`` -> [8..12], ``"3,5,-1"`` -> [3, 5, -1], None/"all" -> None."""
    if spec is None or spec == "all":
        return None
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-") if not part.startswith("-") else ("", "", "")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(part)])
        except ValueError:
            raise argparse.ArgumentTypeError(f"--layers {spec!r}: use e.g. 8-12, 3,5,7 or -1") from None
    return out


def _ask(args) -> int:
    import vlmkit
    from vlmkit.eval.runner import method_context, parse_method_args

    vlm = vlmkit.load(args.model, device=args.device, dtype=args.dtype)
    layers = parse_layers(args.layers)
    gen = {"max_new_tokens": args.max_new_tokens}
    if args.method == "carve":
        from vlmkit.methods.carve import Carve

        res = Carve(**parse_method_args(args.method_args))(args.image, args.question, vlm=vlm)
        print(res.answer)
        print(f"original answer: {res.original_answer}", file=sys.stderr)
        if args.heatmap:
            res.save(args.heatmap, args.image)
            print(f"heat map: {args.heatmap} (+ .refined.png, .contrast.png)", file=sys.stderr)
        return 0
    with method_context(vlm, args.method, parse_method_args(args.method_args)):
        if args.heatmap or args.maps:
            with vlm.capture(layers=layers, rows="last") as rec:
                answer = vlm.ask(args.image, args.question, **gen)
            maps = rec.maps
            if args.heatmap:
                maps.save_png(args.heatmap, image=args.image, source="prefill")
            if args.maps:
                maps.save(args.maps)
        else:
            answer = vlm.ask(args.image, args.question, **gen)
    print(answer)
    if args.heatmap:
        print(f"heat map: {args.heatmap}", file=sys.stderr)
    return 0


def _explain(args) -> int:
    import json

    import vlmkit
    from vlmkit.methods.saliency import explain

    vlm = vlmkit.load(args.model, device=args.device)
    rep = explain(args.image, args.question, vlm=vlm, ig_steps=args.ig_steps)
    out = rep.save(args.out, image=args.image)
    best = max((k for k in rep.attention if k.startswith("layer") and "." not in k),
               key=lambda k: rep.agreement[k]["occlusion"]["pearson"])
    print(json.dumps({"answer": rep.answer, "target_token": rep.target, "seconds": round(rep.seconds, 2),
                      "pearson_all_mean_vs": {s: round(v["pearson"], 3) for s, v in rep.agreement["all_mean"].items()},
                      "best_layer_vs_occlusion": best, "deletion_auc": {k: round(v, 4) for k, v in
                                                                        rep.auc["deletion"].items()},
                      "out": str(out)}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmkit", description="Open up vision-language models through their attention.")
    p.add_argument("--version", action="version", version=f"vlmkit {__import__('vlmkit').__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    a = sub.add_parser("ask", help="answer a question about an image, optionally writing an attention heat map")
    a.add_argument("image")
    a.add_argument("question")
    a.add_argument("--model", default=None, help="checkpoint directory or cached hub id (default: the embedded model)")
    a.add_argument("--device", default="cpu")
    a.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16")
    a.add_argument("--heatmap", metavar="PNG", help="write the answer token's attention over the image here")
    a.add_argument("--maps", metavar="FILE", help="save the captured AttentionMaps (safetensors)")
    a.add_argument("--layers", default=None, help="layers for capture and heat map, e.g. 8-12 (default: all)")
    a.add_argument("--max-new-tokens", type=int, default=32)
    a.add_argument("--method", default="none", help="method to apply: carve, or an intervention (paint, vhr, var, vcd, pai)")
    a.add_argument("--method-args", default=None, help="k=v,... parameters of the method")
    a.set_defaults(func=_ask)
    e = sub.add_parser("explain", help="attention vs saliency (input x gradient, integrated gradients, occlusion)")
    e.add_argument("image")
    e.add_argument("question")
    e.add_argument("--model", default=None)
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", required=True, help="directory for PNG panels and report.json")
    e.add_argument("--ig-steps", type=int, default=16)
    e.set_defaults(func=_explain)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        mod.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except VlmkitError as e:
        print(f"vlmkit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vlmkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
