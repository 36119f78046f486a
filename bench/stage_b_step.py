"""Cost of one stage-B step of ``vlmkit train-default`` under its speed options (issue 3's 90-minute budget).

    python bench/stage_b_step.py --threads 2

Draws ``--rounds`` x ``--group`` batches of conversations on a small scene pool (the recipe's own ``conversation`` /
``encode_conversation``), then times the same conversations through the stage-B forward, the attention loss on the
answer rows, backward and AdamW step of a freshly built default-architecture model, once per variant:

- ``eager maps``: eager attention returning every layer's ``[B, H, L, L]`` probabilities (the recipe up to f129b2e);
- ``row attention``: SDPA in every layer, only the answer rows' probabilities recomputed (``row_attention.py``;
  the recipe from f129b2e until packing);
- ``row attention, bf16``: the same under CPU bf16 autocast;
- ``row attention, grouped``: batches grouped by length (``--group-by-length``; draw order otherwise);
- ``row attention, packed``: the same batches as ``row attention``, only their real tokens through the language
  model's projections and MLPs (``lm_forward(pack=True)``, the current recipe: the same numbers).

Variants run interleaved, ``--repeats`` times, and the median ms per step of each is printed with its ratio to the
first. Random features stand in for the cached tower features: the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import statistics
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
    from vlmkit.default.row_attention import image_rows, register

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --group batches per timing")
    ap.add_argument("--group", type=int, default=8, help="batches drawn together (and sorted, when grouped)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timings of every variant")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = build_model_and_processor(0)
    _, _, _, _, recs = T.build_pool(args.scenes, processor, smoke=True, workers=1)
    tok, pad, B = T.Tokens(processor.tokenizer), processor.tokenizer.pad_token_id, T.BATCH_B
    feats = torch.randn(B, 1 + T.N_IMAGE_TOKENS, 128)  # [B, 65, 128] stand-in tower features
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    opt = torch.optim.AdamW(params, lr=1e-3)
    lm, cols = model.model.language_model, slice(T.IMG_START, T.IMG_START + T.N_IMAGE_TOKENS)
    rows_impl = register()

    def step(seqs, mode: str) -> None:
        ids, lab, _, am = T.collate(seqs, pad)  # [B, L] each
        bi = torch.tensor([b for b, s in enumerate(seqs) for _ in s[3]], dtype=torch.long)
        ri = torch.tensor([r for s in seqs for r, _ in s[3]], dtype=torch.long)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in mode):
            if mode == "eager maps":
                logits, attns = T.lm_forward(model, feats, ids, am, True)
                maps = [attns[i][bi, :, ri, cols] for i in T.ATTN_LAYERS]      # [Q, H, 64] each
            else:
                with image_rows(lm, T.ATTN_LAYERS, bi, ri, cols) as probs:
                    logits, _ = T.lm_forward(model, feats, ids, am, False, pack="packed" in mode)
                maps = [probs[i] for i in T.ATTN_LAYERS]
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), lab[:, 1:].flatten(), ignore_index=-100)
            loss = loss - sum(torch.log(m.float().mean(1)[:, :8].sum(-1) + 1e-6).mean() for m in maps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rng = np.random.default_rng(0)
    rounds = [[T.encode_conversation(conversation(recs[i], rng), tok, recs[i])
               for i in rng.integers(0, len(recs), B * args.group)] for _ in range(args.rounds)]
    modes = ["eager maps", "row attention", "row attention, bf16", "row attention, grouped", "row attention, packed"]
    impl = {"eager maps": "eager"}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(args.repeats + 1):                     # the first repeat is a warm-up
        for mode in modes:
            model.set_attn_implementation({"text_config": impl.get(mode, rows_impl)})
            t0 = time.perf_counter()
            for seqs in rounds:
                seqs = sorted(seqs, key=lambda s: len(s[0])) if "grouped" in mode else seqs
                for j in range(args.group):
                    step(seqs[j * B:(j + 1) * B], mode)
            if rep:
                times[mode].append(1000 * (time.perf_counter() - t0) / (args.group * args.rounds))
    base = statistics.median(times[modes[0]])
    for mode in modes:
        ms = statistics.median(times[mode])
        print(f"{mode:>24}: {ms:6.1f} ms/step (median of {args.repeats}), {base / ms:.2f}x vs {modes[0]}")
    print(f"({args.threads} threads, batch {B}, {args.rounds * args.group} batches per timing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
