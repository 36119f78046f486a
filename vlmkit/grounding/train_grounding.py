"""Train a V2P / GUI-Actor pointer head on a FROZEN backbone (``vlmkit train-grounding``).

Because the backbone is frozen, its outputs are computed once: :func:`build_cache` writes, per screenshot, the keys
(image-token embeddings at the language-model input, read tile by tile) and, per instruction, the query hidden state,
in resumable parts under ``<out>/cache/``. :func:`train` then fits only the head on the cache, time-boxed, with a
progress bar and a resumable checkpoint ``<out>/<run>/state.pt``; the final head is written as safetensors + JSON.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vlmkit.errors import InputError
from vlmkit.grounding import screen_tokens, v2p

PART = 40  # screenshots per cache part


@dataclass
class Cached:
    """One cached screenshot: features + its samples ``[(query [d], text ids, target box xyxy px, instruction)]``."""

    feats: screen_tokens.ScreenFeatures
    samples: list


def _groups(data: str | Path):
    from vlmkit.eval import screenspot as ss

    samples, errors, _ = ss.load_screenspot(data)
    if errors:
        raise InputError(f"{data}: {len(errors)} bad annotation rows; first: {errors[0]}")
    images = ss.default_images_dir(data)
    by_image = defaultdict(list)
    for s in samples:
        by_image[s.image].append(s)
    return images, sorted(by_image.items())


def build_cache(vlm, data: str | Path, cache: str | Path, *, tile: int, max_tiles: int, prompt: str,
                progress: bool = True, shard: tuple[int, int] = (0, 1)) -> list[Path]:
    """Featurise every screenshot of a ScreenSpot-format set with the frozen ``vlm``; resumable by parts.

    ``shard = (k, n)``: only write parts ``i`` with ``i % n == k`` (run n processes side by side); all part paths
    are returned either way.
    """
    from tqdm import tqdm

    from vlmkit.io import load_image

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    images, groups = _groups(data)
    parts = []
    bar = tqdm(total=len(groups), desc="features", disable=not progress)
    for start in range(0, len(groups), PART):
        path = cache / f"part_{start // PART:04d}.pt"
        parts.append(path)
        chunk = groups[start:start + PART]
        if path.exists() or (start // PART) % shard[1] != shard[0]:
            bar.update(len(chunk))
            continue
        rows = []
        for name, ss in chunk:
            im = load_image(images / name)
            f = screen_tokens.screen_features(vlm, im, tile, max_tiles)
            q = screen_tokens.query_states(vlm, [im] * len(ss), [s.instruction for s in ss], prompt)
            rows.append({"keys": f.keys.half(), "boxes": f.boxes, "valid": f.valid, "grid": f.grid, "size": f.size,
                         "tile_grid": f.tile_grid,
                         "samples": [(q[i].half(), s.instruction, s.norm_box(f.size), s.platform, s.ui_type)
                                     for i, s in enumerate(ss)]})
            bar.update(1)
        tmp = path.with_suffix(".tmp")
        torch.save(rows, tmp)
        tmp.replace(path)
    bar.close()
    return parts


def load_cache(parts: list[Path]) -> list[dict]:
    rows = []
    for p in parts:
        rows += torch.load(p, weights_only=False)
    return rows


def targets(boxes: np.ndarray, valid: np.ndarray, size: tuple[int, int], norm_box, instruction: str, style: str,
            k: float, buckets: int) -> tuple[np.ndarray, list[int]]:
    """Training targets of one instruction: ``(labels [N] over the keys, hashed instruction ids)`` (``[0]``: none).

    ``boxes [N, 4]`` / ``valid [N]``: the keys' pixel boxes in the screenshot of ``size`` (W, H); ``norm_box``: the
    target box, xyxy in [0, 1]."""
    W, H = size
    box = (norm_box[0] * W, norm_box[1] * H, norm_box[2] * W, norm_box[3] * H)
    y = v2p.token_labels(np.where(valid[:, None], boxes, 0.0), box, style, k)
    return y, (v2p.text_ids(instruction, buckets) if buckets else []) or [0]


def _examples(rows: list[dict], style: str, k: float, buckets: int):
    """Per screenshot: ``(row index, [(query, text ids, labels [N])])``, grouped by token grid."""
    by_grid = defaultdict(list)
    for i, r in enumerate(rows):
        exs = []
        for q, instr, nb, *_ in r["samples"]:
            y, ids = targets(r["boxes"], r["valid"], r["size"], nb, instr, style, k, buckets)
            exs.append((q, ids, torch.as_tensor(y, dtype=torch.float32)))
        by_grid[tuple(r["grid"])].append((i, exs))
    return by_grid


def _batch(rows, screens, pos_cache):
    """Keys of the screenshots and all their instructions: (keys, pos, valid, query, text, labels, image_index)."""
    keys = torch.stack([rows[i]["keys"].float() for i, _ in screens])
    pos = torch.stack([pos_cache[i] for i, _ in screens])
    valid = torch.stack([torch.as_tensor(rows[i]["valid"]) for i, _ in screens])
    exs = [(b, e) for b, (_, es) in enumerate(screens) for e in es]
    q = torch.stack([e[0].float() for _, e in exs])
    m = max(len(e[1]) for _, e in exs)
    text = torch.as_tensor([e[1] + [0] * (m - len(e[1])) for _, e in exs])
    y = torch.stack([e[2] for _, e in exs])
    return keys, pos, valid, q, text, y, torch.as_tensor([b for b, _ in exs])


@dataclass
class TrainSettings:
    label_style: str = "gaussian"
    k: float = 4.1325
    suppress_weight: float = 1.0
    steps: int = 3000
    minutes: float = 40.0
    batch: int = 4  # screenshots per step (each with all its instructions)
    lr: float = 1e-3
    save_every: int = 100
    seed: int = 0


def lr_scale(step: int, spent: float, steps: int, minutes: float) -> float:
    """Learning-rate factor: warm-up over 100 steps, then a cosine over whichever budget (steps or minutes) is
    nearer its end."""
    done = min(1.0, max(step / max(steps, 1), spent / max(minutes * 60, 1e-9)))
    return min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * done))


def track(ema: dict, losses: dict, logits: torch.Tensor, y: torch.Tensor) -> None:
    """Update running averages (0.95) of the total loss and of the arg-max-inside-the-box rate in ``ema``
    (keys ``loss`` / ``hit``; empty on the first step). ``logits``, ``y``: ``[B, N]``."""
    hit = (y.gather(1, logits.argmax(1, keepdim=True)) > 0).float().mean().item()
    for key, value in (("loss", losses["total"].item()), ("hit", hit)):
        ema[key] = value if key not in ema else 0.95 * ema[key] + 0.05 * value


def train(rows: list[dict], cfg: v2p.HeadConfig, out: str | Path, st: TrainSettings, *, resume: bool = True,
          progress: bool = True, log=None) -> v2p.PointerHead:
    """Fit a head on cached rows; checkpoint ``out/state.pt`` every ``save_every`` steps and when time is up.

    Stops after ``st.steps`` steps or ``st.minutes`` of wall time, whichever comes first; the learning rate warms up
    over 100 steps and then follows a cosine over whichever budget is nearer. A later call with ``resume=True``
    continues where it stopped.
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, label_style=st.label_style, k=st.k, suppress_weight=st.suppress_weight)
    torch.manual_seed(st.seed)
    head = v2p.PointerHead(cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=st.lr, weight_decay=0.01)

    def set_lr() -> None:
        for g in opt.param_groups:
            g["lr"] = st.lr * lr_scale(step, spent, st.steps, st.minutes)
    step, spent, rng = 0, 0.0, random.Random(st.seed)
    state_path = out / "state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        step, spent = state["step"], state["seconds"]
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
    by_grid = _examples(rows, cfg.label_style, cfg.k, cfg.text_buckets)
    grids = sorted(by_grid)
    weights = [len(by_grid[g]) for g in grids]
    n_examples = sum(len(e) for g in grids for _, e in by_grid[g])
    pos_cache = {i: screen_tokens.ScreenFeatures(r["keys"], r["boxes"], r["valid"], r["grid"], r["size"]).pos()
                 for i, r in enumerate(rows)}

    def save():
        tmp = state_path.with_suffix(".tmp")
        torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step,
                    "seconds": spent, "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                    "cfg": cfg.__dict__}, tmp)
        tmp.replace(state_path)

    head.train()
    t0, spent0 = time.time(), spent
    bar = tqdm(total=st.steps, initial=step, desc=f"train {cfg.label_style}", disable=not progress)
    ema: dict = {}
    while step < st.steps and spent < st.minutes * 60:
        g = rng.choices(grids, weights)[0]
        screens = rng.sample(by_grid[g], min(st.batch, len(by_grid[g])))
        keys, pos, valid, q, text, y, idx = _batch(rows, screens, pos_cache)
        logits = head(keys, pos, q, g, valid, text, idx)
        losses = v2p.pointer_losses(logits, y, valid[idx], cfg.suppress_weight)
        opt.zero_grad()
        set_lr()
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        spent = spent0 + time.time() - t0
        track(ema, losses, logits, y)
        bar.update(1)
        bar.set_postfix(loss=f"{ema['loss']:.3f}", hit=f"{ema['hit']:.2f}", kl=f"{losses['kl'].item():.3f}", sup=f"{losses['suppress'].item():.3f}")
        if step % st.save_every == 0:
            save()
            if log:
                log(json.dumps({"step": step, "loss": round(ema["loss"], 4), "train_hit": round(ema["hit"], 3),
                                "seconds": round(spent, 1)}))
    bar.close()
    save()
    head.cfg = replace(cfg, trained={"steps": step, "seconds": round(spent, 1), "batch": st.batch, "lr": st.lr,
                                     "examples": n_examples, "screenshots": sum(weights)})
    return head.eval()
