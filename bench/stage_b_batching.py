"""Cost of a stage-B step of ``vlmkit train-default`` with batches in draw order vs grouped by length (issue 3).

    python bench/stage_b_batching.py --threads 2

Stage B pads every batch of conversations to its longest. This bench draws ``--rounds`` x ``--group`` batches of
conversations on a small scene pool (the recipe's own ``conversation`` / ``encode_conversation``), then times the
same conversations once in draw order and once sorted by length before being cut into batches, running the stage-B
forward (eager attention, attention maps returned as the attention loss needs them), backward and AdamW step on a
freshly built default-architecture model. Prints ms per step of each and the ratio, plus the padding share.
Random features stand in for the cached tower features: the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from vlmkit.default import train as T
    from vlmkit.default.build import build_model_and_processor
    from vlmkit.default.qa import conversation

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=6, help="rounds of --group batches (the first is warm-up)")
    ap.add_argument("--group", type=int, default=8, help="batches drawn together and then sorted by length")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = build_model_and_processor(0)
    model.set_attn_implementation("eager")
    _, _, _, _, recs = T.build_pool(args.scenes, processor, smoke=True)
    tok, pad, B = T.Tokens(processor.tokenizer), processor.tokenizer.pad_token_id, T.BATCH_B
    feats = torch.randn(B, 1 + T.N_IMAGE_TOKENS, 128)  # [B, 65, 128] stand-in tower features
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step(seqs) -> int:
        ids, lab, _, am = T.collate(seqs, pad)  # [B, L] each
        logits, attns = T.lm_forward(model, feats, ids, am, True)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten(), ignore_index=-100)
        loss = loss + sum(attns[i].mean() for i in T.ATTN_LAYERS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return ids.numel()

    rng = np.random.default_rng(0)
    rounds = [[T.encode_conversation(conversation(recs[i], rng), tok, recs[i])
               for i in rng.integers(0, len(recs), B * args.group)] for _ in range(args.rounds)]
    real = sum(len(s[0]) for r in rounds[1:] for s in r)
    ms = {}
    for mode in ("draw order", "grouped by length"):
        t, slots = 0.0, 0
        for k, seqs in enumerate(rounds):
            seqs = sorted(seqs, key=lambda s: len(s[0])) if mode != "draw order" else seqs
            t0 = time.perf_counter()
            n = sum(step(seqs[j * B:(j + 1) * B]) for j in range(args.group))
            if k:
                t, slots = t + time.perf_counter() - t0, slots + n
        ms[mode] = 1000 * t / (args.group * (args.rounds - 1))
        print(f"{mode:>18}: {ms[mode]:.1f} ms/step, padding {1 - real / slots:.0%} of token slots")
    print(f"speed-up of grouping: {ms['draw order'] / ms['grouped by length']:.2f}x ({args.threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
