"""Train the pointer head TOGETHER with the backbone's vision side (``vlmkit train-grounding --finetune-backbone``).

The frozen path (:mod:`vlmkit.grounding.train_grounding`) caches the backbone's outputs once and fits only the head.
Here there is no cache: every step reads the screenshots' tiles through the vision tower and the multimodal
projector **with gradients** (:func:`vlmkit.grounding.screen_tokens.screen_features` with ``grad=True``, the same
tiling and token boxes as at inference), so those parameters train with the head. The language model stays frozen:
the keys are read at its input, and the query (its last hidden state for the whole screenshot + instruction) is
computed without gradient, each step, by the current backbone, exactly as :class:`~vlmkit.grounding.v2p.Grounder`
computes it later.

* Trainable backbone parameters are found through the family adapter: everything of the model outside
  ``adapter.language_model()`` and the input/output token embeddings (LLaVA: ``vision_tower`` +
  ``multi_modal_projector``). A family with nothing there, or whose language-model input carries no gradient back
  to those parameters, is refused with a clear error.
* Same labels, losses, head configuration and schedule as the frozen trainer (warm-up, cosine over the step or
  time budget, progress bar, resumable ``<run>/state.pt`` holding head + trained backbone parameters + optimiser).
  The backbone's learning rate is separate (``--backbone-lr``, default ``0.1 x --lr``, no weight decay).
* Output is a SEPARATE checkpoint: the whole fine-tuned model (``save_pretrained``) and processor in ``<run>/model``
  and its head beside it in ``<run>/model-pointer`` (the place :func:`~vlmkit.grounding.v2p.head_dir_for` looks),
  so ``make_grounder(vlmkit.load("<run>/model"))`` uses it. The head's provenance says ``finetuned_backbone: true``
  with the base backbone's name and weights sha. The shipped default model and head are never written:
  ``--install default`` is refused, as is any destination that is the default or the base checkpoint.

Usage: ``vlmkit train-grounding --finetune-backbone --out runs/gui/ft --minutes 60 [--backbone-lr 1e-4]``, then
``vlmkit ground shot.png "open settings" --model runs/gui/ft/finetune-gaussian-sup1/model``. The backbone runs in
eval mode (no dropout) while it trains; only its parameters' values change.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vlmkit.errors import InputError, VlmkitError
from vlmkit.grounding import train_grounding as tg
from vlmkit.grounding import screen_tokens, v2p


@dataclass
class FinetuneSettings(tg.TrainSettings):
    backbone_lr: float | None = None  # None: 0.1 x lr


def pointer_dir(checkpoint: str | Path) -> Path:
    """``<checkpoint>-pointer``: where :func:`v2p.head_dir_for` finds the head of a checkpoint."""
    p = Path(checkpoint).resolve()
    return p.parent / f"{p.name}-pointer"


def check_args(args) -> None:
    """Refuse option combinations that make no sense with ``--finetune-backbone`` (before loading anything)."""
    if getattr(args, "install", None) == "default":
        raise InputError("--install default is refused with --finetune-backbone: the shipped head belongs to the "
                         "frozen default backbone; the fine-tuned model and head go to a separate checkpoint "
                         "(<out>/<run>/model, or --install PATH)")
    if getattr(args, "cache_only", False) or str(getattr(args, "cache_shard", "0/1")) != "0/1":
        raise InputError("--cache-only / --cache-shard do not apply to --finetune-backbone (no feature cache)")


def _check_dest(vlm, dest: Path) -> None:
    from vlmkit.models.vlm import default_model_path

    d, shipped = dest.resolve(), default_model_path().resolve().parent
    base = Path(getattr(vlm.model.config, "_name_or_path", "") or "/nonexistent").resolve()
    if d == shipped or shipped in d.parents:
        raise InputError(f"{dest}: refusing to write a fine-tuned checkpoint among the shipped default checkpoints")
    if d == base:
        raise InputError(f"{dest}: refusing to overwrite the base checkpoint being fine-tuned")
    cfg = pointer_dir(d) / v2p.CONFIG_FILE
    if (d / "config.json").is_file() and not (cfg.is_file() and json.loads(cfg.read_text()).get(
            "trained", {}).get("finetuned_backbone")):
        raise InputError(f"{dest}: holds a checkpoint not written by --finetune-backbone; choose another path")


def backbone_parameters(vlm) -> dict[str, torch.nn.Parameter]:
    """Named parameters that shape the image tokens at the language-model input (vision tower, projector, ...)."""
    model = vlm.model
    frozen = {id(p) for p in vlm.adapter.language_model().parameters()}
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        if emb is not None:
            frozen |= {id(p) for p in emb.parameters()}
    out = {n: p for n, p in model.named_parameters() if id(p) not in frozen}
    if not out:
        raise VlmkitError(f"{vlm.family}: no vision-tower or projector parameters outside the language model; "
                          "this family cannot be fine-tuned with --finetune-backbone")
    bad = sorted({str(p.dtype) for p in out.values() if p.dtype != torch.float32})
    if bad:
        raise InputError(f"{vlm.family}: backbone weights are {', '.join(bad)}; fine-tuning needs float32 "
                         "(load the model without --dtype)")
    return out


def _screens_by_size(data) -> tuple[Path, dict]:
    """``(images dir, {(W, H): [(file name, samples)]})``: screenshots of one size share a token grid."""
    from PIL import Image

    images, groups = tg._groups(data)
    by_size = defaultdict(list)
    for name, samples in groups:
        with Image.open(images / name) as im:
            by_size[im.size].append((name, samples))
    if not by_size:
        raise InputError(f"{data}: no screenshots to train on")
    return images, dict(by_size)


@dataclass
class _Encoded:
    """One training screenshot, run through the processor once and kept on the model's device, so that a step is
    only model calls. ``T`` tiles of ``n = gr * gc`` tokens each; ``N = rows * gr * cols * gc`` keys; ``k``
    instructions."""

    tiles: tuple  # (inputs, layouts, pads) of the T tiles, each with the probe prompt
    index: torch.Tensor  # [T, n] long: sequence positions of each tile's image tokens
    queries: tuple  # (inputs, layouts, pads) of the k instruction prompts (whole screenshot each), left padded
    layout: tuple  # (rows, cols, gr, gc): tiles down / across, tokens per tile down / across
    pos: torch.Tensor  # [N, 2] token centres in [0, 1]
    valid: torch.Tensor  # [N] bool: tokens covering some of the screenshot
    labels: torch.Tensor  # [k, N] target distributions
    text: list  # k lists of hashed instruction ids


def _encode_screen(vlm, image, samples, cfg: v2p.HeadConfig) -> _Encoded:
    """Encode one screenshot and its instructions for :func:`_batch` (same tiling and token boxes as inference)."""
    tiles, origins, scale, rc = screen_tokens.tile_image(image, cfg.tile, cfg.max_tiles)
    enc = vlm.encode(tiles, [vlm.prompt(screen_tokens.PROBE)] * len(tiles))[:3]
    where = screen_tokens.image_token_index(enc[1], enc[2])
    boxes, valid, _, tile_grid = screen_tokens.tile_geometry([v for _, v in where], origins, scale, rc, image.size)
    prompts = [vlm.prompt(cfg.prompt.format(instruction=s.instruction)) for s in samples]
    queries = vlm.encode([image] * len(samples), prompts)[:3]
    pos = screen_tokens.ScreenFeatures(torch.empty(0), boxes, valid, (0, 0), image.size).pos()  # [N, 2]
    ys, texts = zip(*(tg.targets(boxes, valid, image.size, s.norm_box(image.size), s.instruction, cfg.label_style,
                                 cfg.k, cfg.text_buckets) for s in samples))
    dev = vlm.device
    return _Encoded(enc, torch.as_tensor(np.stack([p for p, _ in where]), device=dev), queries, (*rc, *tile_grid),
                    pos.to(dev), torch.as_tensor(valid, device=dev),
                    torch.as_tensor(np.stack(ys), dtype=torch.float32, device=dev), list(texts))


def _batch(vlm, screens: list[_Encoded]):
    """Keys WITH gradient and targets of screenshots of one size: ``(keys [B, N, d], pos [B, N, 2], valid [B, N],
    query [M, d] (no grad), text [M, L], labels [M, N], image_index [M], grid)`` (M instructions in all)."""
    from vlmkit.models.vlm import merge_encoded

    if len({s.layout for s in screens}) != 1:
        raise VlmkitError("screenshots of one size gave different token grids")
    pad_id = vlm.processor.tokenizer.pad_token_id or 0
    e, _, _ = screen_tokens.lm_inputs_embeds(vlm, grad=True, encoded=merge_encoded([s.tiles for s in screens], pad_id))
    if not e.requires_grad:
        raise VlmkitError(f"{vlm.family}: the language model's input carries no gradient back to the vision tower; "
                          "this family cannot be fine-tuned with --finetune-backbone")
    idx = torch.cat([s.index for s in screens])  # [B*T, n]
    emb = e.gather(1, idx[..., None].expand(-1, -1, e.shape[-1])).float()  # [B*T, n, d]
    rows, cols, gr, gc = screens[0].layout
    keys = screen_tokens.tiles_to_grid(emb.reshape(len(screens), rows * cols, gr * gc, -1), (rows, cols), (gr, gc))
    q = screen_tokens.query_states(vlm, None, None, encoded=merge_encoded([s.queries for s in screens], pad_id),
                                   device_out=True)
    texts = [t for s in screens for t in s.text]
    m = max(len(t) for t in texts)
    dev = keys.device
    text = torch.as_tensor([t + [0] * (m - len(t)) for t in texts], device=dev)
    image_index = torch.as_tensor([b for b, s in enumerate(screens) for _ in s.text], device=dev)
    return (keys, torch.stack([s.pos for s in screens]), torch.stack([s.valid for s in screens]), q, text,
            torch.cat([s.labels for s in screens]), image_index, (rows * gr, cols * gc))


def finetune(vlm, data, out, cfg: v2p.HeadConfig, st: FinetuneSettings, *, resume: bool = True,
             progress: bool = True, log=None, init_head: v2p.PointerHead | None = None) -> v2p.PointerHead:
    """Train head + vision tower + projector of ``vlm`` (in place) on a ScreenSpot-format set; returns the head.

    ``init_head``: start from this head's weights and architecture (e.g. the head of an earlier fine-tune whose
    model is ``vlm``) instead of a random head. ``out/state.pt`` is written every ``save_every`` steps and at the
    end; a later call with ``resume=True`` loads the head, the trained backbone parameters and the optimiser from
    it and continues until the budget is spent.
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, label_style=st.label_style, k=st.k, suppress_weight=st.suppress_weight)
    images, by_size = _screens_by_size(data)
    sizes = sorted(by_size)
    weights = [len(by_size[s]) for s in sizes]
    params = backbone_parameters(vlm)
    dev = vlm.device
    torch.manual_seed(st.seed)
    if init_head is not None:
        keep = ("label_style", "k", "suppress_weight", "prompt", "backbone")
        cfg = replace(init_head.cfg, **{f: getattr(cfg, f) for f in keep}, trained={})
    head = v2p.PointerHead(cfg).to(dev)
    if init_head is not None:
        head.load_state_dict(init_head.state_dict())
    blr = st.backbone_lr if st.backbone_lr is not None else 0.1 * st.lr
    opt = torch.optim.AdamW([{"params": list(head.parameters()), "base_lr": st.lr, "weight_decay": 0.01},
                             {"params": list(params.values()), "base_lr": blr, "weight_decay": 0.0}], lr=st.lr)
    step, spent, rng = 0, 0.0, random.Random(st.seed)
    state_path = out / "state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=True, map_location=dev)
        head.load_state_dict(state["head"])
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["backbone"][n])
        opt.load_state_dict(state["opt"])
        step, spent = state["step"], state["seconds"]
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])

    def save():
        tmp = state_path.with_suffix(".tmp")
        torch.save({"head": head.state_dict(), "backbone": {n: p.detach() for n, p in params.items()},
                    "opt": opt.state_dict(), "step": step, "seconds": spent, "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "cfg": cfg.__dict__}, tmp)
        tmp.replace(state_path)

    from vlmkit.io import load_image

    encoded = {}  # file name -> _Encoded; the processor runs once per screenshot, before the clock starts
    for name, samples in tqdm([x for v in by_size.values() for x in v], desc="encode screenshots",
                              disable=not progress):
        encoded[name] = _encode_screen(vlm, load_image(images / name), samples, cfg)
    flags = {n: p.requires_grad for n, p in vlm.model.named_parameters()}
    keep = {id(p) for p in params.values()}
    for p in vlm.model.parameters():
        p.requires_grad_(id(p) in keep)  # the language model and token embeddings stay frozen
    head.train()
    t0, spent0, ema = time.time(), spent, {}
    bar = tqdm(total=st.steps, initial=step, desc=f"finetune {cfg.label_style}", disable=not progress)
    try:
        while step < st.steps and spent < st.minutes * 60:
            size = rng.choices(sizes, weights)[0]
            screens = rng.sample(by_size[size], min(st.batch, len(by_size[size])))
            keys, pos, valid, q, text, y, idx, grid = _batch(vlm, [encoded[name] for name, _ in screens])
            logits = head(keys, pos, q, grid, valid, text, idx)
            losses = v2p.pointer_losses(logits, y, valid[idx], cfg.suppress_weight)
            opt.zero_grad()
            for g in opt.param_groups:  # the frozen path's schedule
                g["lr"] = g["base_lr"] * tg.lr_scale(step, spent, st.steps, st.minutes)
            losses["total"].backward()
            if all(p.grad is None for p in params.values()):
                raise VlmkitError(f"{vlm.family}: no gradient reached the vision tower or projector; this family "
                                  "cannot be fine-tuned with --finetune-backbone")
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            step += 1
            spent = spent0 + time.time() - t0
            tg.track(ema, losses, logits, y)
            bar.update(1)
            bar.set_postfix(loss=f"{ema['loss']:.3f}", hit=f"{ema['hit']:.2f}", kl=f"{losses['kl'].item():.3f}")
            if step % st.save_every == 0:
                save()
                if log:
                    log(json.dumps({"step": step, "loss": round(ema["loss"], 4), "train_hit": round(ema["hit"], 3),
                                    "seconds": round(spent, 1), "finetune": True}))
    finally:
        bar.close()
        for n, p in vlm.model.named_parameters():
            p.requires_grad_(flags[n])
    save()
    head.cfg = replace(cfg, trained={"steps": step, "seconds": round(spent, 1), "batch": st.batch, "lr": st.lr,
                                     "backbone_lr": float(f"{blr:.6g}"), "screenshots": sum(weights),
                                     "examples": sum(len(s) for v in by_size.values() for _, s in v),
                                     "finetuned_backbone": True})
    return head.cpu().eval()


def language_model_sha256(vlm) -> str:
    """First 16 hex digits of a sha256 over every parameter the fine-tune leaves frozen (the language model and its
    embeddings: all but :func:`backbone_parameters`), by name, in name order: equal for a base model and every
    fine-tune of it."""
    tuned = set(backbone_parameters(vlm))
    h = hashlib.sha256()
    for name, p in sorted(vlm.model.named_parameters()):
        if name not in tuned:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_finetuned(vlm, head: v2p.PointerHead, dest: str | Path, provenance: dict | None = None) -> Path:
    """Write the fine-tuned model + processor to ``dest`` and the head to ``<dest>-pointer``; returns ``dest``.

    ``provenance`` (e.g. ``base_backbone``, ``base_backbone_sha256``, data) is added to the head's ``trained`` record
    with ``finetuned_backbone: true``, ``backbone_sha256`` of the written weights and ``language_model_sha256``
    (:func:`language_model_sha256`: the untouched language model, the same as the base model's).
    """
    dest = Path(dest)
    _check_dest(vlm, dest)
    vlm.model.save_pretrained(dest)
    vlm.processor.save_pretrained(dest)
    w = dest / "model.safetensors"
    sha = hashlib.sha256(w.read_bytes()).hexdigest()[:16] if w.is_file() else None
    trained = {**head.cfg.trained, **(provenance or {}), "finetuned_backbone": True, "backbone_sha256": sha,
               "language_model_sha256": language_model_sha256(vlm)}
    head.cfg = replace(head.cfg, backbone=str(dest), trained=trained)
    v2p.save_head(head, pointer_dir(dest))
    return dest


def cmd_finetune(args, vlm, data: Path, tile: int, log) -> int:
    """``vlmkit train-grounding --finetune-backbone`` (dispatched from :func:`gui_cli.cmd_train`)."""
    from vlmkit.grounding.gui_cli import _provenance

    check_args(args)
    out = Path(args.out)
    run = out / (args.run or f"finetune-{args.labels}-sup{args.suppress:g}")
    dests = [run / "model"] + ([Path(args.install)] if args.install else [])
    for d in dests:  # refuse before training, not after
        _check_dest(vlm, d)
    tile_grid = screen_tokens.lm_input_tokens(vlm, [_blank(tile)])[0][1].grid
    d = vlm.adapter.language_model().config.hidden_size
    cfg = v2p.HeadConfig(d_key=d, d_query=d, text_buckets=0 if args.no_text else 4096, tile=tile,
                         dropout=args.dropout, d_model=args.d_model, pos_freqs=args.pos_freqs,
                         max_tiles=args.max_tiles, prompt=args.prompt, backbone=str(vlm.name),
                         window=(0, 0) if args.global_attention else tuple(tile_grid))
    st = FinetuneSettings(label_style=args.labels, k=args.k, suppress_weight=args.suppress, steps=args.steps,
                          minutes=args.minutes, batch=args.batch, lr=args.lr, seed=args.seed,
                          save_every=args.save_every, backbone_lr=args.backbone_lr)
    base = _provenance(vlm, data)
    prov = {"base_backbone": str(vlm.name), "base_backbone_sha256": base.pop("backbone_sha256"), **base}
    init = None
    if args.init_head:
        init = v2p.load_head(args.init_head)
        if (init.cfg.d_key, init.cfg.d_query, init.cfg.tile) != (d, d, tile):
            raise InputError(f"--init-head {args.init_head}: head reads d_key {init.cfg.d_key}, d_query "
                             f"{init.cfg.d_query}, tile {init.cfg.tile}; this backbone gives {d}, {d}, {tile}")
        prov["init_head"] = str(args.init_head)
    head = finetune(vlm, data, run, cfg, st, resume=not args.restart, progress=not args.quiet, log=log,
                    init_head=init)
    for d in dests:
        save_finetuned(vlm, head, d, prov)
        log(f"saved fine-tuned checkpoint {d} + {pointer_dir(d)} ({head.cfg.trained})")
        print(f"wrote {d} (head: {pointer_dir(d)})")
    return 0


def _blank(tile: int):
    from PIL import Image

    return Image.new("RGB", (tile, tile), (128, 128, 128))
