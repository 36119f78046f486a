"""Two-step agent tasks on generated screens (issue 7.5): success rate and per-step accuracy of the agent loop.

    python3 bench/agent_tasks.py --tasks 60 --out runs/agent

First screens come from the held-out layout templates (4, 5: never used to train the pointer head) with screen seeds
``vlmkit.agent.SEED_BASE + task seed`` (>= 1e9; the head's training screens use seeds (seed+1000)*100003+i, i < 100
for the default --seed 0); the follow-up dialogs sit at a fixed place per platform over those held-out screens (the
GUI fine-tune trained on dialog screens of random place, size and contents over training layouts, template
``gui.DIALOG``; the default model's head never saw a dialog). Grounders: the oracle (box centre:
checks the environment, must be 1.0), uniform random clicks (chance), the default model's pointer head
(``v2p.default_grounder()``) and the attention-only fallback (``v2p.Grounder(vlm, None)``).

Besides the closed-loop numbers (a step is attempted only if the earlier ones hit), "open-loop" per-step accuracy
grounds every step on the screen it is meant for, whether or not the agent would have got there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def open_loop(tasks, grounder) -> list[float]:
    """Per-step point-in-box accuracy with every step grounded on its own screen."""
    from vlmkit import agent

    hits = defaultdict(list)
    for t in tasks:
        tr = agent.run_task(t, grounder, dry_run=True, echo=lambda *a: None)
        for s in tr.steps:
            hits[s.index].append(agent.inside(s.action["x"], s.action["y"], s.box))
    return [sum(hits[i]) / len(hits[i]) for i in sorted(hits)]


def by_platform(rep) -> dict:
    out = defaultdict(list)
    for t in rep.traces:
        out[t.platform].append(bool(t.success))
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(out.items())}


def main(argv=None) -> int:
    import torch

    import vlmkit
    from vlmkit import agent
    from vlmkit.grounding import v2p

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=60)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--templates", default="heldout", choices=("heldout", "train", "all"),
                    help="first-screen layout templates (train: a diagnostic of the layout shift only)")
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the VLM runs (the pointer head stays on CPU)")
    ap.add_argument("--out", default=None, help="write <grounder>/trace.jsonl and results.json here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    tasks = agent.make_tasks(args.tasks, args.seed, n_steps=args.steps, templates=args.templates)
    vlm = vlmkit.load(args.model, device=args.device)
    grounders = {"oracle": agent.OracleGrounder(tasks), "random": agent.RandomGrounder(args.seed),
                 "pointer-head": v2p.make_grounder(vlm), "attention-only": v2p.Grounder(vlm, None)}
    if grounders["pointer-head"].head is None:
        print("note: this model has no pointer head; 'pointer-head' is the attention fallback", file=sys.stderr)
    results = {}
    print(f"{len(tasks)} {args.steps}-step tasks, {args.templates} templates, model {vlm.name}")
    for name, g in grounders.items():
        t0 = time.time()
        out = Path(args.out) / name if args.out else None
        rep = agent.run_agent(tasks, g, out=out)
        ol = open_loop(tasks, g)
        results[name] = {"success_rate": rep.success_rate, "step_accuracy": rep.step_accuracy,
                         "attempts": rep.attempts, "open_loop_step_accuracy": ol, "by_platform": by_platform(rep),
                         "seconds": round(time.time() - t0, 1)}
        print(agent.format_report(rep, name) + "; open-loop per-step: "
              + ", ".join(f"{a:.3f}" for a in ol) + f"; by platform {results[name]['by_platform']}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps({"tasks": len(tasks), "steps": args.steps,
                                                                  "seed": args.seed, "templates": args.templates, "model": str(vlm.name),
                                                                  "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
