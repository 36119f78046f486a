"""Training recipe of the embedded default model (``vlmkit train-default``).

Stage A (:data:`STEPS` [0] steps, or 25% of a time budget): dense per-patch pre-training of the vision tower
alone. Linear heads on each of the 64 patch features of the last layer predict the colour (8 + background) and shape
(8 + background) of the object covering the patch (>= 25% of the cell; cells covered 6-25% are ignored, except that
every object labels its own best-covered cell, so objects smaller than a cell are learnt too) and whether the patch
holds an object's centre; the colour and shape losses are added once more over object cells alone
(:data:`OBJECT_WEIGHT`, :func:`stage_a_loss`: background cells dominate, and without it small objects' shapes were
learnt slowly), and optionally the shape loss over object cells once more (:data:`SHAPE_WEIGHT`, 0 in the shipped
recipe: a full run with 2 learnt a better tower but not better answers, see the model card). Random horizontal flips.

Stage B (the rest): the tower is frozen (its features are cached); projector + language model learn every skill from
1-3 turn conversations (loss on the answer tokens), plus an auxiliary attention loss: at the row that predicts each
answer's first token, the head-mean attention of language-model layers :data:`ATTN_LAYERS` over the 64 image tokens
should fall on the patches of the objects the question is about (``-log`` of the fraction that does), weight
:data:`ATTN_WEIGHT`; for an absent object, on its near misses (objects sharing its colour or shape,
:func:`attention_targets`). A list answer gets the same loss at the row before each name, onto the objects of that
name (:func:`list_targets`). ``answer_loss`` chooses how answer tokens are averaged. Questions without such objects
(absent objects with no near miss, describe) get no attention loss. The language model runs SDPA; the probabilities
the loss needs are recomputed exactly for those rows only, and only the batch's real tokens (not its padding) go
through the projections and MLPs (:mod:`vlmkit.default.row_attention`, ``lm_forward(pack=True)``).

Curriculum: most generated objects are small once a scene is resized to 96 px (median ~0.6 of a token cell), and on
such scenes the language model does not discover which image tokens a question is about. So stage B starts on "easy"
scenes only (:func:`is_easy`: at most 3 objects, each covering at least one token cell), then mixes in the rest:
the chance of drawing an easy scene is 1 for the first :data:`CURRICULUM` [0] of the steps and falls linearly to 0
(uniform sampling over all scenes) at :data:`CURRICULUM` [1].

Data: scenes of the seeds ``TRAIN_SEED0 + i``, 96-512 px like the evaluation's, a share :data:`VARIETY` of them
drawn with ``generate_scene(..., variety=True)`` (other proportions, outlines, shadows, backgrounds); evaluation
uses :data:`vlmkit.default.evaluate.EVAL_SEED0` onwards, never used here. Checkpoints every two minutes under
``runs/`` make the run resumable (``--resume``); they hold the optimiser and data-draw states, so a resumed run draws the
same batches as an uninterrupted one (same thread count: the same weights).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlmkit.data.scenes import COLORS, SHAPES, generate_scene
from vlmkit.default.build import (GRID, N_IMAGE_TOKENS, VISION_LAYERS, build_model_and_processor, pad_geometry,
                                  patch_coverage)
from vlmkit.default.qa import (NEGATIVE_KINDS, SKILL_WEIGHTS, SKILLS, TRAIN_NEGATIVES, check_mix, conversation,
                               shared_attributes)
from vlmkit.default.row_attention import image_rows, packed_tokens
from vlmkit.default.row_attention import register as register_row_attention

TRAIN_SEED0 = 1_000_000
ATTN_LAYERS = (1, 2)
ATTN_WEIGHT = 1.0
IMG_START = 2                  # "user", ":" then the 64 image tokens
CKPT_EVERY_S = 120
STAGE_A_SHARE = 0.25
BATCH_A, BATCH_B = 32, 32
N_SCENES = 48000              # training scenes (CLI default)
CURRICULUM = (0.3, 0.6)
MIN_LABEL_COVER = 0.03        # stage A: an object covering this much of its best cell labels that cell
OBJECT_WEIGHT = 1.0           # stage A: extra weight of the loss on object cells (stage_a_loss)
SHAPE_WEIGHT = 0.0            # stage A: extra weight of the shape loss on object cells (stage_a_loss; --shape-weight)
SPREAD = 0.25                 # stage A: an object also labels cells holding this share of its area (build_pool; --spread)
STEPS = (21000, 18000)         # the shipped run's stage A / stage B optimiser steps (CLI default)
PRECISION = "fp32"             # "bf16": matmuls of both stages under bf16 autocast (master weights stay fp32)
VARIETY = 0.5                  # share of training scenes drawn with generate_scene(..., variety=True)
TRAIN_MAX_WIDTH = 512          # training scenes are 96..TRAIN_MAX_WIDTH px wide (the generator's own range)
EMA: tuple[float, ...] = (0.9995,)  # stage B: decays of weight averages kept beside the weights; the first is saved


@dataclass
class Obj:
    shape: str
    color: str
    box: tuple
    center: tuple


@dataclass
class Record:
    """A training scene without pixels: ``coverage`` is float [n_objects, 64] (object share of each token cell)."""
    width: int
    height: int
    objects: list
    coverage: np.ndarray


def _scene_size(rng: np.random.Generator, smoke: bool) -> tuple[int, int]:
    w = int(rng.integers(96, 200 if smoke else TRAIN_MAX_WIDTH + 1))
    h = int(np.clip(w * rng.choice([1.0, 1.0, 0.75, 1.33, 0.6, 1.6]), 96, 512))
    return w, h


def _render(args):
    """One training scene -> (uint8 pixel array [3, S, S], colour / shape / centre labels [64], Record)."""
    seed, smoke, ip, variety, spread = args
    rng = np.random.default_rng([seed, 1])
    size = _scene_size(rng, smoke)
    sc = generate_scene(seed, size=size, variety=bool(variety and rng.random() < variety))
    w, h = sc.image.size
    x = ip(images=sc.image, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"][0]
    cov = np.stack([patch_coverage(o.mask) for o in sc.objects]).astype(np.float32)
    best, arg = cov.max(0), cov.argmax(0)
    obj_c = np.array([COLORS.index(o.color) + 1 for o in sc.objects])      # [objects] class ids (0 = background)
    obj_s = np.array([SHAPES.index(o.shape) + 1 for o in sc.objects])
    c, s = np.where(best >= 0.25, obj_c[arg], 0), np.where(best >= 0.25, obj_s[arg], 0)
    amb = (best >= 0.06) & (best < 0.25)
    c[amb], s[amb] = -100, -100
    # small objects: each labels its own best cell [objects] unless another object covers more of it
    own, k = cov.argmax(1), np.arange(len(sc.objects))
    keep = (arg[own] == k) & (cov[k, own] >= MIN_LABEL_COVER)
    c[own[keep]], s[own[keep]] = obj_c[keep], obj_s[keep]
    if spread:  # also every cell holding >= ``spread`` of an object's area, unless another object covers it more
        share = cov / np.maximum(cov.sum(1, keepdims=True), 1e-6)                         # [objects, 64]
        for k in range(len(sc.objects)):
            cells = (share[k] >= spread) & (arg == k) & (cov[k] >= MIN_LABEL_COVER)
            c[cells], s[cells] = obj_c[k], obj_s[k]
    side, ox, oy = pad_geometry(w, h)
    ce = np.zeros(N_IMAGE_TOKENS, np.int64)
    objs = []
    for o in sc.objects:
        cx, cy = o.center
        r, q = min(GRID - 1, int((cy + oy) / side * GRID)), min(GRID - 1, int((cx + ox) / side * GRID))
        ce[r * GRID + q] = 1
        objs.append(Obj(o.shape, o.color, o.box, (cx, cy)))
    # numpy, not a torch tensor: a tensor returned from a worker holds one file descriptor per scene (fd sharing), and
    # tens of thousands of scenes exhaust the open-file limit
    return x.round().clamp(0, 255).to(torch.uint8).numpy(), c, s, ce, Record(w, h, objs, cov.astype(np.float16))


def build_pool(n: int, processor, *, smoke: bool = False, seed0: int = TRAIN_SEED0, desc: str = "scenes",
               workers: int | None = None, variety: float = 0.0, spread: float = 0.0):
    """Render ``n`` training scenes (in ``workers`` processes; the result does not depend on how many). Returns
    (pixels uint8 [n, 3, S, S] after pad + resize, colour / shape / centre labels int64 [n, 64] (-100 = ambiguous
    cell), records). ``spread`` > 0 (not the shipped recipe; ``bench/stage_a_probe.py --spread``): an object also
    labels every cell that holds at least that share of its area and that no other object covers more."""
    import multiprocessing as mp
    import os

    workers = workers or (min(8, os.cpu_count() or 1) if n >= 500 else 1)  # spawning costs ~10 s
    jobs = [(seed0 + i, smoke, processor.image_processor, variety, spread) for i in range(n)]
    if workers > 1:
        with mp.get_context("spawn").Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            out = list(tqdm(pool.imap(_render, jobs, chunksize=32), total=n, desc=desc, mininterval=5))
    else:
        out = [_render(j) for j in tqdm(jobs, desc=desc, mininterval=5)]
    pix, col, shp, cen, recs = zip(*out)
    return (torch.from_numpy(np.stack(pix)), torch.as_tensor(np.stack(col)), torch.as_tensor(np.stack(shp)),
            torch.as_tensor(np.stack(cen)), list(recs))


def stage_a_loss(heads, hs: torch.Tensor, col: torch.Tensor, shp: torch.Tensor, cen: torch.Tensor, *,
                 object_weight: float = OBJECT_WEIGHT, shape_weight: float = SHAPE_WEIGHT) -> torch.Tensor:
    """Per-patch loss of stage A. ``hs`` [B, 64, 128] patch features; labels [B, 64] (-100 = ambiguous cell).

    Colour + shape cross-entropy over all labelled cells, plus ``object_weight`` x the same over object cells
    only (most cells are background, and without it the shapes of small objects were learnt slowly), plus
    ``shape_weight`` x the shape loss over object cells once more (shape is the harder attribute: colour of
    objects under half a cell was 0.93 after 3000 steps, shape 0.41; ``bench/stage_a_probe.py``), plus 0.5 x the
    object-centre loss."""
    lc, ls = heads["color"](hs).flatten(0, 1), heads["shape"](hs).flatten(0, 1)              # [B * 64, 9]
    col, shp = col.flatten(), shp.flatten()
    loss = F.cross_entropy(lc, col, ignore_index=-100) + F.cross_entropy(ls, shp, ignore_index=-100)
    obj = col > 0
    if (object_weight or shape_weight) and bool(obj.any()):
        shape_obj = F.cross_entropy(ls[obj], shp[obj])
        loss = loss + object_weight * (F.cross_entropy(lc[obj], col[obj]) + shape_obj) + shape_weight * shape_obj
    return loss + 0.5 * F.binary_cross_entropy_with_logits(heads["center"](hs).squeeze(-1), cen.float())


def stage_a_batch(g: torch.Generator, pix, col, shp, cen) -> tuple:
    """A stage-A batch of :data:`BATCH_A` pool scenes drawn with ``g``, half flipped left-right with their labels:
    pixels uint8 [B, 3, S, S], colour / shape / centre labels [B, 64]."""
    idx = torch.randint(0, len(pix), (BATCH_A,), generator=g)
    x, c, s, ce = pix[idx], col[idx], shp[idx], cen[idx]
    flip = torch.rand(BATCH_A, generator=g) < 0.5
    x[flip] = x[flip].flip(-1)
    for lab in (c, s, ce):
        lab[flip] = lab[flip].view(-1, GRID, GRID).flip(-1).reshape(-1, N_IMAGE_TOKENS)
    return x, c, s, ce


def is_easy(record: Record) -> bool:
    """At most 3 objects, each covering at least one of the 64 token cells."""
    return len(record.objects) <= 3 and float(record.coverage.astype(np.float32).sum(1).min()) >= 1.0


def p_easy(frac: float, schedule: tuple[float, float] = CURRICULUM) -> float:
    """Chance of drawing an easy scene at training progress ``frac`` in [0, 1] (``schedule``: hold, end)."""
    hold, end = schedule
    return 1.0 if frac < hold else max(0.0, (end - frac) / (end - hold))


def normalize(pix_u8: torch.Tensor, processor) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float pixel_values exactly as the processor makes them."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    return (pix_u8.float() / 255.0 - mean) / std


class Tokens:
    """Cached word-level encoding of prompt pieces (the tokenizer is pure word lookup, so pieces concatenate)."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.cache[text]


def attention_targets(qa, record) -> list[int]:
    """Objects the answer row should look at: the question's own objects, or, for an existence question answered
    "no", the near misses (objects sharing the asked colour or shape: the evidence that a "red star" is absent is the
    red circle and the blue star). Empty when there is nothing to look at."""
    if qa.targets or qa.skill != "exist" or qa.answer != "no":
        return list(qa.targets)
    by_colour, by_shape = shared_attributes(qa.question, record.objects)
    return sorted(set(by_colour) | set(by_shape))


def _target_cells(record: Record, objects: list[int]) -> np.ndarray:
    """bool [64]: the token cells objects cover >= 15%, plus the best-covered cell."""
    cov = record.coverage[objects].astype(np.float32).max(0)
    tgt = cov >= 0.15
    tgt[int(cov.argmax())] = True
    return tgt


def list_targets(answer: str, tokens: Tokens, record: Record) -> list[tuple[int, list[int]]]:
    """For a list answer ("red circle, blue star"): (index of each name's first token in the answer's tokens, the
    objects of that name). The row that predicts a name's first token is where the model picks the next object."""
    out, start = [], 0
    for name in answer.split(", "):
        objs = [i for i, o in enumerate(record.objects) if f"{o.color} {o.shape}" == name]
        if objs:
            out.append((start, objs))
        start += len(tokens(name)) + len(tokens(","))
    return out


def encode_conversation(turns, tokens: Tokens, record: Record):
    """ids, labels (-100 outside answers), per-label weights (each answer's tokens share weight 1, so a one-word
    yes/no answer counts as much as a long description), [(row, target cell mask [64])] for the attention loss."""
    ids, labels, weights, rows = [], [], [], []
    for t, qa in enumerate(turns):
        head = tokens("USER:") + ([tokens.image_id] * N_IMAGE_TOKENS if t == 0 else []) + tokens(qa.question) \
            + tokens("ASSISTANT:")
        ids += head
        labels += [-100] * len(head)
        weights += [0.0] * len(head)
        look = attention_targets(qa, record)
        if look:
            rows.append((len(ids) - 1, _target_cells(record, look)))
        if qa.skill == "list":
            rows += [(len(ids) - 1 + start, _target_cells(record, look))
                     for start, look in list_targets(qa.answer, tokens, record)]
        ans = tokens(qa.answer) + [tokens.tok.eos_token_id]
        ids += ans
        labels += ans
        weights += [1.0 / len(ans)] * len(ans)
    return ids, labels, weights, rows


def draw_batches(rng: np.random.Generator, recs: list, easy: np.ndarray, p: float, tok, group: int = 1,
                 negative_mix: dict[str, float] | None = None, skill_mix: dict[str, float] | None = None) -> list:
    """``group`` stage-B batches of :data:`BATCH_B` encoded conversations as a list of (scene indices, sequences).

    Each scene is an easy one (``easy``: indices) with probability ``p``, else uniform. ``group`` = 1 is the
    shipped recipe (one batch, in draw order). ``group`` > 1 draws ``group`` batches at once, sorts them by
    length before cutting them into batches (less padding: ``bench/stage_b_step.py``) and returns the batches
    in random order; consume them with ``pop()``. ``negative_mix``: how existence questions pick absent objects,
    ``skill_mix``: the share of each skill's questions (:func:`vlmkit.default.qa.make_qa`; None = the shipped mixes).
    """
    m = BATCH_B * group
    idx = rng.integers(0, len(recs), m)
    if len(easy):
        pick = rng.random(m) < p
        idx[pick] = easy[rng.integers(0, len(easy), int(pick.sum()))]
    seqs = [encode_conversation(conversation(recs[i], rng, negative_mix=negative_mix, skill_mix=skill_mix), tok,
                                recs[i]) for i in idx]
    if group == 1:
        return [(idx, seqs)]
    order = np.argsort([len(sq[0]) for sq in seqs], kind="stable")
    batches = [(idx[order[j:j + BATCH_B]], [seqs[k] for k in order[j:j + BATCH_B]]) for j in range(0, m, BATCH_B)]
    return [batches[j] for j in rng.permutation(group)]


def collate(seqs: list, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad encoded conversations (:func:`encode_conversation`) to the longest: token ids [B, L] (``pad``),
    labels [B, L] (-100 = no loss), answer-token weights [B, L] and the attention mask [B, L]."""
    B, L = len(seqs), max(len(s[0]) for s in seqs)
    ids, lab = torch.full((B, L), pad), torch.full((B, L), -100)
    wt, am = torch.zeros((B, L)), torch.zeros((B, L), dtype=torch.long)
    for b, (si, sl, sw, _) in enumerate(seqs):
        ids[b, :len(si)], lab[b, :len(sl)], am[b, :len(si)] = torch.tensor(si), torch.tensor(sl), 1
        wt[b, :len(sw)] = torch.tensor(sw)
    return ids, lab, wt, am


def _ema_update(avg: list[torch.Tensor], params: list[torch.Tensor], decay: float, step: int) -> None:
    """Move the running average ``avg`` of ``params`` towards them; the decay ramps up over the first steps
    (``min(decay, (1 + step) / (10 + step))``) so that the average soon forgets the initial weights."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(avg, [q.detach() for q in params], 1.0 - d)


def _lr(frac: float, base: float, warm: float = 0.05) -> float:
    if frac < warm:
        return base * frac / warm
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warm) / (1 - warm)))))


def lm_forward(model, feats: torch.Tensor, ids: torch.Tensor, am: torch.Tensor, attn: bool, pack: bool = False):
    """Language-model pass on cached tower features [B, 65, 128] (CLS first), as the LLaVA forward does it; ids and
    the attention mask ``am`` are [B, L] (right-padded). Returns logits [B, L, vocab] and (with ``attn``) the
    attention maps. ``pack`` (needs the :mod:`~vlmkit.default.row_attention` implementation; the stage-B recipe):
    only the real tokens go through the projections and MLPs (:func:`~vlmkit.default.row_attention.packed_tokens`),
    the same numbers without the padding's work; padding rows of the logits are 0."""
    proj = model.model.multi_modal_projector(feats[:, 1:])
    emb = model.get_input_embeddings()(ids)
    emb = torch.cat([emb[:, :IMG_START], proj.to(emb.dtype), emb[:, IMG_START + N_IMAGE_TOKENS:]], 1)   # [B, L, D]
    lm = model.model.language_model
    if pack and attn:
        raise ValueError("lm_forward: pack=True returns no attention maps (attn=True needs the padded pass)")
    if not pack:
        out = lm(inputs_embeds=emb, attention_mask=am, output_attentions=attn)
        return model.lm_head(out.last_hidden_state), out.attentions
    b, length = ids.shape
    real = am.flatten().bool()
    index = real.nonzero().squeeze(1)                                                   # [T] flat b * L + l
    pos = (am.cumsum(1) - 1).flatten().index_select(0, index)[None]                     # [1, T]
    causal = torch.ones(length, length, dtype=torch.bool, device=am.device).tril()
    mask = causal[None, None] & am.bool()[:, None, None, :]                             # [B, 1, L, L]
    with packed_tokens(lm, index, (b, length)):
        out = lm(inputs_embeds=emb.flatten(0, 1).index_select(0, index)[None], attention_mask=mask,
                 position_ids=pos)                                                      # [1, T, D]
    logits = model.lm_head(out.last_hidden_state[0])                                    # [T, vocab]
    full = logits.new_zeros(b * length, logits.shape[-1]).index_copy(0, index, logits)
    return full.view(b, length, -1), None


def _bar(desc: str, steps: int | None, budget_s: float, state: dict):
    """Progress in optimiser steps when the stage has a fixed step count, else in seconds of its time budget."""
    if steps:
        return tqdm(total=steps, desc=desc, unit="step", initial=state["step"])
    return tqdm(total=int(budget_s), desc=desc, unit="s", initial=int(state["elapsed"]))


def _load_pool(path: Path) -> tuple:
    """A cached scene pool, loaded with ``weights_only=True`` (only the record classes and numpy arrays allowed)."""
    from numpy._core.multiarray import _reconstruct

    allowed = [Obj, Record, np.ndarray, np.dtype, _reconstruct] + [type(np.dtype(t)) for t in "efdlibB?"]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _save_ckpt(path: Path, state: dict):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train(out_dir, *, minutes: float = 68.0, smoke: bool = False, resume: bool = False, run_dir="runs/default",
          n_scenes: int | None = None, eval_images: int | None = None, seed: int = 0,
          steps_a: int | None = None, steps_b: int | None = None, answer_loss: str = "token",
          curriculum: tuple[float, float] = CURRICULUM, group_by_length: int = 1, precision: str = PRECISION,
          variety: float = VARIETY, shape_weight: float = SHAPE_WEIGHT, spread: float = SPREAD,
          vision_layers: int = VISION_LAYERS, negatives: dict[str, float] | None = None,
          ema: tuple[float, ...] = EMA, tower_from=None, skills: dict[str, float] | None = None, log=print) -> dict:
    """Train from scratch (or resume), save the model + processor into ``out_dir``, evaluate, write metrics.json.

    The budget is wall-clock ``minutes`` (25% stage A, 75% stage B) unless ``steps_a`` / ``steps_b`` fix the number
    of optimiser steps of a stage (then its learning-rate schedule runs over steps, and time does not matter).
    Resuming a finished run with a larger budget continues stage B; a resume with other recipe options (scenes,
    seed, losses, curriculum, grouping, precision, variety, mixes) is refused with an error naming them.
    ``answer_loss``: "token" (every answer token counts once: the shipped recipe) or "answer" (every answer counts
    once, so a yes/no answer weighs as much as a description). ``curriculum``: (hold, end) of the easy-scene
    schedule, see :func:`p_easy`. ``group_by_length``: stage-B batches drawn together and grouped by length
    (:func:`draw_batches`; 1 = the shipped recipe).
    ``precision``: "bf16" runs both stages' matmuls under bf16 autocast (``bench/stage_b_step.py``). ``variety``: the
    share of training scenes drawn with the generator's extra drawing variety. ``shape_weight``: stage A's extra
    shape loss on object cells (:func:`stage_a_loss`). ``spread``: stage A's multi-cell labels for objects
    (:func:`build_pool`). ``vision_layers``: depth of the vision tower. ``negatives``: stage B's mix of absent-object
    kinds for existence questions (:func:`vlmkit.default.qa.parse_negative_mix`; None = ``TRAIN_NEGATIVES``).
    ``skills``: stage B's share of questions of each skill (:func:`vlmkit.default.qa.parse_skill_mix`; None =
    ``SKILL_WEIGHTS``). ``ema``: decays of exponential moving averages of the stage-B weights; with any, the model
    saved (and evaluated) holds the first average, the raw weights go to ``run_dir/raw`` and every other average to
    ``run_dir/ema-<decay>`` (each a full checkpoint, for comparison). ``tower_from``: the ``run_dir`` of a run past
    stage A; this run skips stage A and starts stage B on that run's tower and stage-A heads (stage B freezes the
    tower, so with the same options it replays that run's stage B exactly; options that shape stage A must match).
    Its scene pool is used when ``run_dir`` has none.
    """
    if group_by_length < 1:
        raise ValueError(f"group_by_length={group_by_length}: use 1 (no grouping) or more")
    if not 0.0 <= variety <= 1.0:
        raise ValueError(f"variety={variety!r}: the share of varied training scenes is within 0..1")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: use 'fp32' or 'bf16'")
    if not 0.0 <= curriculum[0] < curriculum[1] <= 1.0:
        raise ValueError(f"curriculum={tuple(curriculum)!r}: (hold, end) with 0 <= hold < end <= 1")
    if not 0.0 <= spread <= 1.0:
        raise ValueError(f"spread={spread!r}: a share of an object's area, within 0..1 (0 = off)")
    negatives = check_mix(TRAIN_NEGATIVES if negatives is None else negatives, NEGATIVE_KINDS,
                          "negatives: negative mix")
    skills = check_mix(SKILL_WEIGHTS if skills is None else skills, SKILLS, "skills: skill mix")
    if vision_layers < 1:
        raise ValueError(f"vision_layers={vision_layers!r}: the tower needs at least one layer")
    ema = tuple(float(d) for d in ema)
    if not all(0.0 < d < 1.0 for d in ema) or len(set(ema)) != len(ema):
        raise ValueError(f"ema={ema!r}: distinct decays strictly between 0 and 1")
    if answer_loss not in ("token", "answer"):
        raise ValueError(f"answer_loss={answer_loss!r}: use 'token' or 'answer'")
    from vlmkit.default.evaluate import evaluate

    t_start = time.time()
    torch.manual_seed(seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ckpt_path = run / "ckpt.pt"
    model, processor = build_model_and_processor(seed, vision_layers=vision_layers)
    model.set_attn_implementation("sdpa")
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    tok = Tokens(processor.tokenizer)
    n = n_scenes or (300 if smoke else N_SCENES)
    budget = minutes * 60.0
    budget_a, budget_b = STAGE_A_SHARE * budget, (1 - STAGE_A_SHARE) * budget
    heads = torch.nn.ModuleDict({"color": torch.nn.Linear(128, 9), "shape": torch.nn.Linear(128, 9),
                                 "center": torch.nn.Linear(128, 1)})
    state, ck = {"stage": "A", "elapsed": 0.0, "step": 0}, None      # ck: the checkpoint resumed from, if any
    # options a resumed run must share with the run it continues (budgets may grow, the recipe may not change)
    recipe = {"n_scenes": n, "seed": seed, "answer_loss": answer_loss, "curriculum": [float(c) for c in curriculum],
              "group_by_length": group_by_length, "precision": precision, "variety": float(variety),
              "shape_weight": float(shape_weight), "spread": float(spread), "vision_layers": vision_layers,
              "negatives": negatives, "skills": skills, **({"ema": list(ema)} if ema else {})}
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        changed = _changed_options(ck.get("recipe", {}), recipe, recipe)
        if changed:
            raise ValueError(f"cannot resume {ckpt_path}: it was trained with other options ({changed}); pass the "
                             "same options or start a new --run-dir")
        model.load_state_dict(ck["model"]), heads.load_state_dict(ck["heads"])
        state = ck["state"]
        log(f"resumed from {ckpt_path}: stage {state['stage']} step {state['step']} ({state['elapsed']:.0f}s)")
    elif tower_from is not None:
        state = _tower_from(Path(tower_from), recipe, model, heads)
        log(f"stage B on the tower of {tower_from} (stage A: {state['steps_a']} steps)")
    resumed_in = ck["state"]["stage"] if ck is not None else None        # "A", "B" or "done"

    def checkpoint(**extra):
        """Write the resume state: weights, heads and progress, plus the stage's ``opt`` / ``rng`` states if given."""
        _save_ckpt(ckpt_path, {"model": model.state_dict(), "heads": heads.state_dict(), "state": dict(state),
                               "recipe": recipe, **extra})
    model.to(dev), heads.to(dev)
    pool_path = run / (f"pool_{n}{'_smoke' if smoke else ''}{f'_variety{variety:g}' if variety else ''}"
                       f"{f'_spread{spread:g}' if spread else ''}.pt")
    if not pool_path.exists() and tower_from is not None and (Path(tower_from) / pool_path.name).exists():
        pool_path = Path(tower_from) / pool_path.name                    # the tower's own scenes
    if pool_path.exists():
        pix, col, shp, cen, recs = _load_pool(pool_path)
    else:
        pix, col, shp, cen, recs = build_pool(n, processor, smoke=smoke, variety=variety, spread=spread)
        _save_ckpt(pool_path, (pix, col, shp, cen, recs))
    log(f"pool: {n} scenes in {time.time() - t_start:.0f}s")
    tower = model.model.vision_tower
    # ---------------------------------------------------------------- stage A: dense per-patch tower pre-training
    if state["stage"] == "A":
        params = list(tower.parameters()) + list(heads.parameters())
        opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
        if resumed_in == "A" and "opt" in ck:
            opt.load_state_dict(ck["opt"])
        bar = _bar("stage A (vision tower)", steps_a, budget_a, state)
        t0, last_ck, g = time.time() - state["elapsed"], time.time(), torch.Generator().manual_seed(seed + state["step"])
        if resumed_in == "A" and "rng" in ck:
            g.set_state(ck["rng"])          # the same batches as an uninterrupted run
        while (state["step"] < steps_a) if steps_a else (time.time() - t0 < budget_a):
            frac = state["step"] / steps_a if steps_a else (time.time() - t0) / budget_a
            for grp in opt.param_groups:
                grp["lr"] = _lr(frac, 2e-3)
            x, c, s, ce = stage_a_batch(g, pix, col, shp, cen)
            with amp:
                hs = tower(normalize(x, processor).to(dev)).last_hidden_state[:, 1:].float()   # [B, 64, 128]
            loss = stage_a_loss(heads, hs, c.to(dev), s.to(dev), ce.to(dev), shape_weight=shape_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            state["step"] += 1
            bar.n = state["step"] if steps_a else int(time.time() - t0)
            bar.set_postfix(loss=f"{loss.item():.3f}", step=state["step"], refresh=False)
            bar.update(0)
            if state["step"] % 50 == 0:
                log(f"A step {state['step']} loss {loss.item():.4f} t {time.time() - t0:.0f}s")
            if time.time() - last_ck > CKPT_EVERY_S:
                state["elapsed"] = time.time() - t0
                checkpoint(opt=opt.state_dict(), rng=g.get_state())
                last_ck = time.time()
        bar.close()
        acc = _patch_accuracy(tower, heads, pix, col, shp, processor, dev, k=64 if smoke else 512, smoke=smoke)
        state = {"stage": "B", "elapsed": 0.0, "step": 0, "steps_a": state["step"], "stage_a": acc}
        log(f"stage A done: {state['stage_a']}")
        checkpoint()
    # ---------------------------------------------------------------- stage B: QA + attention loss, frozen tower
    tower.requires_grad_(False)
    # SDPA in every layer; the answer rows' image attention of ATTN_LAYERS recomputed exactly (row_attention.py)
    model.set_attn_implementation({"text_config": register_row_attention()})
    lm, image_cols = model.model.language_model, slice(IMG_START, IMG_START + N_IMAGE_TOKENS)
    with torch.no_grad():
        feats = torch.cat([tower(normalize(pix[i:i + 256], processor).to(dev)).last_hidden_state.cpu()
                           for i in range(0, n, 256)])
    params = [p for nm, p in model.named_parameters() if "vision_tower" not in nm]
    opt = torch.optim.AdamW(params, lr=1.5e-3, weight_decay=0.01)
    avgs = {d: [q.detach().clone() for q in params] for d in ema}     # stage-B weight averages, by decay
    if resumed_in in ("B", "done") and "ema" in ck:
        avgs = {d: [a.to(dev) for a in ck["ema"][f"{d:g}"]] for d in ema}
    fresh_from = state["step"]          # a new optimiser mid-stage (no saved state) warms up over 50 steps
    if resumed_in in ("B", "done") and "opt" in ck and state["step"] > 0:
        opt.load_state_dict(ck["opt"])
        fresh_from = 0                  # its warm-up, if any, continues from the start of stage B
    rng = np.random.default_rng([seed, 99, state["step"]])
    if resumed_in in ("B", "done") and "rng" in ck:
        rng.bit_generator.state = ck["rng"]     # the same conversations as an uninterrupted run
    easy = np.array([i for i, r in enumerate(recs) if is_easy(r)])
    log(f"curriculum: {len(easy)} easy scenes of {n}")
    bar = _bar("stage B (QA + attention)", steps_b, budget_b, state)
    t0, last_ck = time.time() - state["elapsed"], time.time()
    pad = processor.tokenizer.pad_token_id
    queue: list = []
    while (state["step"] < steps_b) if steps_b else (time.time() - t0 < budget_b):
        frac = state["step"] / steps_b if steps_b else (time.time() - t0) / budget_b
        for grp in opt.param_groups:
            grp["lr"] = _lr(frac, 1.5e-3) * min(1.0, (state["step"] - fresh_from + 1) / 50)
        if not queue:
            queue = draw_batches(rng, recs, easy, p_easy(frac, curriculum), tok, group_by_length, negatives, skills)
        idx, seqs = queue.pop()
        ids, lab, wt, am = collate(seqs, pad)
        bi, ri, tg = [], [], []
        for b, (_, _, _, rows) in enumerate(seqs):
            for r, t in rows:
                bi.append(b), ri.append(r), tg.append(t)
        with image_rows(lm, ATTN_LAYERS, torch.as_tensor(bi, dtype=torch.long, device=dev),
                        torch.as_tensor(ri, dtype=torch.long, device=dev), image_cols) as probs, amp:
            logits, _ = lm_forward(model, feats[torch.as_tensor(idx)].to(dev), ids.to(dev), am.to(dev), False,
                                   pack=True)
        logits = logits.float()                                                             # [B, L, vocab]
        tok_ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten().to(dev), ignore_index=-100,
                                 reduction="none")                                            # [B * (L-1)]
        if answer_loss == "answer":                # mean over answers of each answer's mean token loss
            w = wt[:, 1:].flatten().to(dev)
        else:                                      # "token" (the shipped recipe): mean over answer tokens
            w = (lab[:, 1:] != -100).flatten().float().to(dev)
        ce = (tok_ce * w).sum() / w.sum()
        al = torch.zeros((), device=dev)
        if bi:
            tgt = torch.as_tensor(np.stack(tg), dtype=torch.float32, device=dev)
            for layer in ATTN_LAYERS:
                a = probs[layer].float().mean(1)                                         # [Q, 64] head mean
                al = al + (-torch.log((a * tgt).sum(-1) / (a.sum(-1) + 1e-8) + 1e-6)).mean() / len(ATTN_LAYERS)
        loss = ce + ATTN_WEIGHT * al
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for d, avg in avgs.items():
            _ema_update(avg, params, d, state["step"])
        state["step"] += 1
        bar.n = state["step"] if steps_b else int(time.time() - t0)
        bar.set_postfix(ce=f"{ce.item():.3f}", attn=f"{al.item():.3f}", step=state["step"], refresh=False)
        bar.update(0)
        if state["step"] % 50 == 0:
            log(f"B step {state['step']} ce {ce.item():.4f} attn {al.item():.4f} t {time.time() - t0:.0f}s")
        if time.time() - last_ck > CKPT_EVERY_S and not queue:     # between draws: the rng state is all there is
            state["elapsed"] = time.time() - t0
            checkpoint(opt=opt.state_dict(), rng=rng.bit_generator.state, **_ema_ck(avgs))
            last_ck = time.time()
    bar.close()
    state["elapsed"], state["stage"] = time.time() - t0, "done"
    checkpoint(opt=opt.state_dict(), rng=rng.bit_generator.state, **_ema_ck(avgs))
    # ---------------------------------------------------------------- save + held-out evaluation
    out = Path(out_dir)
    model.set_attn_implementation("sdpa")
    model.to("cpu")
    saves = [(out, None)]
    if ema:     # the first average is the model; the raw weights and the other averages go beside the run
        saves = [(run / "raw", None)] + [(run / f"ema-{d:g}", avgs[d]) for d in ema[1:]] + [(out, avgs[ema[0]])]
    for where, avg in saves:
        if avg is not None:
            with torch.no_grad():
                torch._foreach_copy_(params, [a.to("cpu") for a in avg])
        where.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(where)
        processor.save_pretrained(where)
    train_info = {"minutes_budget": minutes, "smoke": smoke, "n_train_scenes": n,
                  "train_seeds": [TRAIN_SEED0, TRAIN_SEED0 + n - 1], "stage_a": state.get("stage_a"),
                  "stage_a_steps": state.get("steps_a"), "stage_b_steps": state["step"],
                  "stage_b_minutes": round(state["elapsed"] / 60, 2),
                  "attn_layers": list(ATTN_LAYERS), "curriculum": list(curriculum), "attn_weight": ATTN_WEIGHT,
                  "answer_loss": answer_loss, "group_by_length": group_by_length, "precision": precision,
                  "variety": variety, "object_weight": OBJECT_WEIGHT, "shape_weight": shape_weight,
                  "spread": spread, "vision_layers": vision_layers, "negatives": negatives, "skills": skills,
                  "ema": list(ema),
                  "device": str(dev),
                  "wall_s_train": round(time.time() - t_start, 1)}
    metrics = evaluate(out, n_images=eval_images or (24 if smoke else 200), log=log)
    metrics["training"] = train_info
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log(json.dumps({k: v for k, v in metrics.items() if k != "pointing"}, indent=1))
    return metrics


def _changed_options(saved: dict, recipe: dict, keys) -> str:
    """``"k: <saved> there, <now> now, ..."`` for the ``keys`` whose value in the ``saved`` recipe differs from
    ``recipe`` (keys the saved recipe lacks count as unchanged); empty when none differ."""
    return ", ".join(f"{k}: {saved[k]!r} there, {recipe[k]!r} now" for k in keys
                     if k in saved and saved[k] != recipe[k])


STAGE_A_OPTIONS = ("n_scenes", "seed", "variety", "spread", "vision_layers", "shape_weight")


def _tower_from(run: Path, recipe: dict, model, heads) -> dict:
    """Load the vision tower and stage-A heads of the run in ``run`` (past stage A) into ``model`` / ``heads``; return
    the progress state of a stage B at step 0. Refuses a run still in stage A or one whose stage-A options differ."""
    src = run / "ckpt.pt"
    if not src.is_file():
        raise FileNotFoundError(f"tower_from={str(run)!r}: no ckpt.pt there (pass a train-default --run-dir)")
    ck = torch.load(src, map_location="cpu", weights_only=True)
    if ck["state"]["stage"] == "A":
        raise ValueError(f"tower_from={str(run)!r}: that run is still in stage A (step {ck['state']['step']})")
    changed = _changed_options(ck["recipe"], recipe, STAGE_A_OPTIONS)
    if changed:
        raise ValueError(f"tower_from={str(run)!r}: its tower was trained with other options ({changed})")
    missing, _ = model.load_state_dict({k: v for k, v in ck["model"].items() if "vision_tower" in k}, strict=False)
    missing = [k for k in missing if "vision_tower" in k]
    if missing:
        raise ValueError(f"tower_from={str(run)!r}: its checkpoint lacks tower weights ({missing[0]}, ...)")
    heads.load_state_dict(ck["heads"])
    return {"stage": "B", "elapsed": 0.0, "step": 0, "steps_a": ck["state"].get("steps_a"),
            "stage_a": ck["state"].get("stage_a")}


def _ema_ck(avgs: dict[float, list[torch.Tensor]]) -> dict:
    """The checkpoint entry of the stage-B weight averages (none without ``ema``)."""
    return {"ema": {f"{d:g}": avg for d, avg in avgs.items()}} if avgs else {}


@torch.no_grad()
def _patch_accuracy(tower, heads, pix, col, shp, processor, dev, k: int = 512, smoke: bool = False) -> dict:
    """Stage-A per-patch colour+shape accuracy, overall and on object cells: on the last ``k`` pool scenes (seen in
    training) and on ``k`` held-out scenes rendered the same way from the validation seeds."""
    from vlmkit.default.evaluate import VAL_SEED0

    vpix, vcol, vshp, _, _ = build_pool(k, processor, smoke=smoke, seed0=VAL_SEED0, desc="held-out scenes")
    out = {}
    for name, (p, cc, ss) in {"": (pix[-k:], col[-k:], shp[-k:]), "_heldout": (vpix, vcol, vshp)}.items():
        hs = tower(normalize(p, processor).to(dev)).last_hidden_state[:, 1:]                # [k, 64, 128]
        c, s = heads["color"](hs).argmax(-1).cpu(), heads["shape"](hs).argmax(-1).cpu()
        ok = (c == cc) & (s == ss)
        valid, obj = cc >= 0, cc > 0
        out[f"patch_acc_all{name}"] = round(float(ok[valid].float().mean()), 4)
        out[f"patch_acc_object{name}"] = round(float(ok[obj].float().mean()), 4)
        out[f"shape_acc_object{name}"] = round(float((s == ss)[obj].float().mean()), 4)
    return out
