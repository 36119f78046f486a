"""Training recipe of the default small SAM (``vlmkit train-sam``): a ``segment_anything`` ``Sam`` with small widths
(:data:`~vlmkit.grounding.segmenters.TINY_SAM_CONFIG`) trained from scratch on generated scenes with point prompts.

Data: scenes of seeds ``SAM_SEED0 + i`` (never used by the default VLM's training or evaluation), resized exactly as
``SamPredictor`` does (``ResizeLongestSide``); the pool starts with ``pool0`` scenes and grows by one scene per step.
Prompts per object (up to ``objects_per_image`` per image): a positive point inside the mask (15%: anywhere in the
box grown by 30% that is not another object, like a coarse attention peak), a negative point outside the object
(60%), a second positive (15%). A lone positive point is scored against the best of the three multimask outputs (as
in SAM), other prompts against the single-mask output. Then a second round feeds the detached low-res logits back as
``mask_input``, half the time with one correction point from the error region. Loss: BCE + dice on the logits
upsampled to the input frame, plus MSE of the IoU head. AdamW, warm-up then cosine decay over the time budget.
Checkpoints every ``ckpt_every`` seconds make the run resumable; ``export`` writes safetensors + config.json.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmkit.grounding.segmenters import TINY_SAM_CONFIG, SamSegmenter, build_tiny_sam

SAM_SEED0 = 7_000_000
SAM_VAL_SEED0 = 7_900_000
SMOKE_CONFIG = {**TINY_SAM_CONFIG, "img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2,
                "global_attn_indexes": [0], "prompt_dim": 16, "mask_in_chans": 4, "decoder_depth": 1,
                "decoder_mlp_dim": 32, "decoder_heads": 2, "iou_hidden": 16}


def make_example(seed: int, img_size: int, scene_size=None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """One training scene resized like ``SamPredictor``: ``(canvas uint8 [S, S, 3] with the image top-left,
    labels uint8 [S, S] (0 = background, k + 1 = object k), (h, w) of the resized image)``."""
    from PIL import Image
    from segment_anything.utils.transforms import ResizeLongestSide

    from vlmkit.data.scenes import generate_scene

    sc = generate_scene(seed, size=scene_size)
    small = ResizeLongestSide(img_size).apply_image(np.asarray(sc.image))
    h, w = small.shape[:2]
    canvas = np.zeros((img_size, img_size, 3), np.uint8)
    canvas[:h, :w] = small
    labels = np.zeros((img_size, img_size), np.uint8)
    for k, o in enumerate(sc.objects):
        m = np.asarray(Image.fromarray(o.mask.astype(np.float32)).resize((w, h), Image.BILINEAR)) >= 0.5
        labels[:h, :w][m] = k + 1
    return canvas, labels, (h, w)


class Pool:
    """Growing in-memory pool of resized scenes (seeds ``seed0``, ``seed0 + 1``, ...)."""

    def __init__(self, img_size: int, seed0: int = SAM_SEED0, scene_size=None) -> None:
        self.img_size, self.seed0, self.scene_size = img_size, seed0, scene_size
        self.images, self.labels, self.sizes = [], [], []

    def __len__(self) -> int:
        return len(self.images)

    def grow(self, n: int = 1) -> None:
        for _ in range(n):
            c, l, s = make_example(self.seed0 + len(self.images), self.img_size, self.scene_size)
            self.images.append(c)
            self.labels.append(l)
            self.sizes.append(s)


def _sample_point(rng, ys, xs) -> tuple[float, float]:
    k = int(rng.integers(len(ys)))
    return float(xs[k]), float(ys[k])


def _prompts(rng, labels: np.ndarray, size, obj: int) -> tuple[list, list]:
    """Point prompt (coords [(x, y)], labels [1|0]) for object id ``obj`` (label value) of one example."""
    h, w = size
    lab = labels[:h, :w]
    mask = lab == obj
    ys, xs = np.nonzero(mask)
    pts, lbl = [], []
    if rng.random() < 0.15:
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        gy, gx = max(1, int(0.3 * (y1 - y0))), max(1, int(0.3 * (x1 - x0)))
        region = np.zeros_like(mask)
        region[max(0, y0 - gy):y1 + gy, max(0, x0 - gx):x1 + gx] = True
        region &= (lab == 0) | mask
        ry, rx = np.nonzero(region)
        pts.append(_sample_point(rng, ry, rx))
    else:
        pts.append(_sample_point(rng, ys, xs))
    lbl.append(1)
    if rng.random() < 0.15:
        pts.append(_sample_point(rng, ys, xs))
        lbl.append(1)
    if rng.random() < 0.6:
        ny, nx = np.nonzero(~mask)
        if len(ny):
            pts.append(_sample_point(rng, ny, nx))
            lbl.append(0)
    return pts, lbl


def _mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-mask BCE + dice; ``logits [K, C, S, S]``, ``target [K, 1, S, S]`` -> ``[K, C]``."""
    t = target.expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean(dim=(2, 3))
    p = logits.sigmoid()
    dice = 1 - (2 * (p * t).sum(dim=(2, 3)) + 1) / (p.sum(dim=(2, 3)) + t.sum(dim=(2, 3)) + 1)
    return bce + dice


def _iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = logits > 0
    t = target.expand_as(logits) > 0.5
    inter = (pred & t).sum(dim=(2, 3)).float()
    union = (pred | t).sum(dim=(2, 3)).float()
    return inter / union.clamp_min(1)


def _decode(sam, emb, which, pe, coords, plabels, masks=None):
    """All prompts of the batch in one decoder call. ``emb [B, C, g, g]``, ``which [N]`` image of each prompt.

    The decoder adds ``dense_prompt_embeddings`` to the (repeated) image embedding, so passing a zero image
    embedding and folding each prompt's own image embedding into the dense term is the same computation, batched.
    Returns ``(low-res logits [N, 4, s, s], iou predictions [N, 4])``.
    """
    sparse, dense = sam.prompt_encoder(points=(coords, plabels), boxes=None, masks=masks)
    dense = dense.expand(len(which), -1, -1, -1) + emb[which]
    zero = torch.zeros_like(emb[:1])
    return sam.mask_decoder.predict_masks(zero, pe, sparse, dense)


def train_step(sam, pool: Pool, rng: np.random.Generator, batch: int, objects_per_image: int) -> dict:
    """Loss of one batch (not yet backpropagated) and its statistics."""
    S = pool.img_size
    idx = rng.integers(len(pool), size=batch)
    imgs = torch.as_tensor(np.stack([pool.images[i] for i in idx])).permute(0, 3, 1, 2).float()
    x = (imgs - sam.pixel_mean) / sam.pixel_std
    which, prompts, targets = [], [], []
    for b, i in enumerate(idx):
        h, w = pool.sizes[i]
        x[b, :, h:, :] = 0
        x[b, :, :, w:] = 0
        labels = pool.labels[i]
        present = [v for v in np.unique(labels[:h, :w]) if v > 0 and (labels == v).sum() >= 4]
        if not present:
            continue
        for o in rng.choice(present, size=min(objects_per_image, len(present)), replace=False):
            which.append(b)
            prompts.append(_prompts(rng, labels, (h, w), int(o)))
            targets.append(labels == o)
    if not which:
        return {"loss": x.sum() * 0.0, "iou": 0.0}
    n = len(which)
    which = torch.as_tensor(which)
    P = max(len(p[0]) for p in prompts)
    coords = torch.zeros(n, P, 2)
    plabels = -torch.ones(n, P, dtype=torch.int64)
    for k, (pts, lbl) in enumerate(prompts):
        coords[k, : len(pts)] = torch.tensor(pts)
        plabels[k, : len(lbl)] = torch.tensor(lbl)
    target = torch.as_tensor(np.stack(targets))[:, None].float()
    emb = sam.image_encoder(x)
    pe = sam.prompt_encoder.get_dense_pe()
    low, iou_pred = _decode(sam, emb, which, pe, coords, plabels)  # [N, 4, s, s], [N, 4]
    up = F.interpolate(low, (S, S), mode="bilinear", align_corners=False)
    loss = _mask_loss(up, target)  # [N, 4]
    single = (plabels >= 0).sum(1) == 1
    choice = torch.where(single, loss[:, 1:].argmin(1) + 1, torch.zeros(n, dtype=torch.int64))
    ar = torch.arange(n)
    true_iou = _iou(up.detach(), target)[ar, choice]
    total = loss[ar, choice].sum() + F.mse_loss(iou_pred[ar, choice], true_iou, reduction="sum")
    # round 2: the chosen logits come back as the mask prompt (cascade), half the time with a correction point
    prev = low[ar, choice][:, None].detach()
    if rng.random() < 0.5:
        wrong = ((up[ar, choice] > 0) != (target[:, 0] > 0.5)).numpy()
        extra = torch.zeros(n, 1, 2)
        elab = -torch.ones(n, 1, dtype=torch.int64)
        for k in range(n):
            ys, xs = np.nonzero(wrong[k])
            if len(ys):
                px, py = _sample_point(rng, ys, xs)
                extra[k, 0] = torch.tensor([px, py])
                elab[k, 0] = int(targets[k][int(py), int(px)])
        coords, plabels = torch.cat([coords, extra], 1), torch.cat([plabels, elab], 1)
    low2, iou2 = _decode(sam, emb, which, pe, coords, plabels, masks=prev)
    up2 = F.interpolate(low2[:, :1], (S, S), mode="bilinear", align_corners=False)
    true2 = _iou(up2.detach(), target)[:, 0]
    total = total + _mask_loss(up2, target)[:, 0].sum() + F.mse_loss(iou2[:, 0], true2, reduction="sum")
    return {"loss": total / (2 * n), "iou": float(true_iou.mean())}


def validate(sam, n: int = 60, seed0: int = SAM_VAL_SEED0, scene_size=None) -> dict:
    """Mean mask IoU through ``SamPredictor`` at the original resolution, one prompt per object: its most interior
    pixel (oracle point); ``iou_random`` uses a random pixel of the object instead."""
    from scipy import ndimage

    from vlmkit.data.scenes import generate_scene

    seg = SamSegmenter(sam)
    rng = np.random.default_rng(0)
    centre, rand = [], []
    was_training = sam.training
    sam.eval()
    for i in range(n):
        sc = generate_scene(seed0 + i, size=scene_size)
        seg.set_image(np.asarray(sc.image))
        for o in sc.objects:
            d = ndimage.distance_transform_edt(o.mask)
            y, x = np.unravel_index(int(np.argmax(d)), d.shape)
            ys, xs = np.nonzero(o.mask)
            k = int(rng.integers(len(ys)))
            for (px, py), acc in (((x, y), centre), ((xs[k], ys[k]), rand)):
                r = seg.predict(np.array([[px + 0.5, py + 0.5]]), np.array([1]), multimask=True)
                m = r.masks[r.best()]
                acc.append(float((m & o.mask).sum() / max(1, (m | o.mask).sum())))
    sam.train(was_training)
    return {"iou_center": float(np.mean(centre)), "iou_random": float(np.mean(rand)), "objects": len(centre)}


def export(sam, config: dict, out_dir, metrics: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``metrics.json``) loadable by ``load_segmenter(out_dir)``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in sam.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**config, "format": "vlmkit-sam"}, indent=1))
    if metrics is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return out


def train(*, minutes: float, run_dir, out_dir, config: dict | None = None, batch: int = 8,
          objects_per_image: int = 4, lr: float = 1e-3, pool0: int = 1000, pool_max: int = 12000,
          resume: bool = False, ckpt_every: float = 120.0, val_scenes: int = 60, scene_size=None,
          seed: int = 0, log=print) -> dict:
    """Train for ``minutes`` of wall time (data generation included) and export to ``out_dir``."""
    cfg = {**TINY_SAM_CONFIG, **(config or {})}
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sam = build_tiny_sam(cfg).train()
    opt = torch.optim.AdamW(sam.parameters(), lr=lr, weight_decay=0.01)
    step, spent, pool_n = 0, 0.0, pool0
    ckpt = run / "ckpt.pt"
    if resume and ckpt.is_file():
        state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        sam.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, spent, pool_n = int(state["step"]), float(state["spent"]), int(state["pool"])
        log(f"resumed at step {step}, {spent / 60:.1f} min spent")
    budget = minutes * 60.0
    t0 = time.time() - spent
    t_pool = time.time()
    pool = Pool(cfg["img_size"], scene_size=scene_size)
    pool.grow(min(pool_n, pool_max))
    log(f"pool of {len(pool)} scenes ready after {time.time() - t_pool:.0f}s")
    rng = np.random.default_rng(seed + step)
    warm = 100
    last_ckpt, hist = time.time(), []

    def save():
        torch.save({"model": sam.state_dict(), "opt": opt.state_dict(), "step": step,
                    "spent": time.time() - t0, "pool": len(pool)}, str(ckpt))

    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        out = train_step(sam, pool, rng, batch, objects_per_image)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        step += 1
        hist.append((out["loss"].detach().item(), out["iou"]))
        if len(pool) < pool_max:
            pool.grow(1)
        if step % 25 == 0:
            l, i = np.mean(hist, axis=0)
            hist = []
            log(f"step {step} {(time.time() - t0) / 60:.1f}min loss {l:.4f} train-iou {i:.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} pool {len(pool)}")
        if time.time() - last_ckpt > ckpt_every:
            save()
            last_ckpt = time.time()
    save()
    sam.eval()
    metrics = {"steps": step, "minutes": (time.time() - t0) / 60, "pool": len(pool), "batch": batch,
               **validate(sam, val_scenes, scene_size=scene_size)}
    log(f"validation: {metrics}")
    export(sam, cfg, out_dir, metrics)
    return metrics
