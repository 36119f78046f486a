"""Held-out evaluation of the default model, through plain transformers (processor + ``generate``).

Scenes come from seeds :data:`EVAL_SEED0` + i (sizes 96..512, all styles) and :data:`CLUTTER_SEED0` + i (style
"cluttered"); training uses ``TRAIN_SEED0`` onwards, so none is seen in training. Pointing is measured on
:data:`VAL_SEED0` scenes (validation split) and on the test scenes.

POPE scoring: the answer counts as "no" if its first word is "no" (or it contains "not"), otherwise "yes";
``yes_ratio`` is computed from the predictions.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image, ImageFilter

from vlmkit.data.scenes import generate_scene
from vlmkit.default.build import patch_coverage, prompt_text, token_boxes
from vlmkit.default.qa import make_qa, ordered_names, pope_questions, shared_attributes

EVAL_SEED0 = 5_000_000
CLUTTER_SEED0 = 5_500_000
VAL_SEED0 = 4_000_000


def load(path):
    """(model, processor) from a saved directory, with plain ``AutoModelForImageTextToText`` / ``AutoProcessor``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(path)).eval()
    processor = AutoProcessor.from_pretrained(str(path))
    processor.tokenizer.padding_side = "left"
    return model, processor


@torch.no_grad()
def answer(model, processor, images, questions, max_new_tokens: int = 4, batch: int = 64) -> list[str]:
    """Greedy answers (lower-case, stripped) to ``questions`` about ``images`` (one image per question)."""
    processor.tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(questions), batch):
        prompts = [prompt_text(q) for q in questions[i:i + batch]]
        enc = processor(images=list(images[i:i + batch]), text=prompts, padding=True, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        texts = processor.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [t.strip().lower() for t in texts]
    return out


def is_yes(text: str) -> bool:
    words = text.replace(",", " ").replace(".", " ").split()
    return not (not words or words[0] == "no" or "not" in words)


def _pope_metrics(preds: list[bool], labels: list[bool]) -> dict:
    p, y = np.array(preds), np.array(labels)
    tp, fp = int((p & y).sum()), int((p & ~y).sum())
    prec = tp / max(1, tp + fp)
    rec = tp / max(1, int(y.sum()))
    return {"accuracy": round(float((p == y).mean()), 4), "yes_ratio": round(float(p.mean()), 4),
            "precision": round(prec, 4), "recall": round(rec, 4),
            "f1": round(2 * prec * rec / max(1e-9, prec + rec), 4), "n": int(len(p))}


def pope_breakdown(qs, preds: list[bool]) -> dict:
    """Accuracy of POPE answers by case: present objects by size (token cells they cover), absent objects by whether
    their colour / shape occurs in the scene (on another object). ``qs``: [(scene, qa)], ``preds``: said "yes"."""
    groups: dict[str, list[bool]] = {}
    for (sc, qa), yes in zip(qs, preds):
        if qa.answer == "yes":
            cells = max(float(patch_coverage(sc.objects[i].mask).sum()) for i in qa.targets)
            key = "present, " + ("< 0.5 cell" if cells < 0.5 else "0.5-1 cell" if cells < 1 else "1-2 cells"
                                 if cells < 2 else ">= 2 cells")
            groups.setdefault(key, []).append(yes)
        else:
            by_colour, by_shape = shared_attributes(qa.question, sc.objects)
            col, shp = bool(by_colour), bool(by_shape)
            key = "absent, " + {(False, False): "colour and shape unseen", (True, False): "colour seen",
                                (False, True): "shape seen", (True, True): "colour and shape seen"}[(col, shp)]
            groups.setdefault(key, []).append(not yes)
    return {k: {"accuracy": round(float(np.mean(v)), 4), "n": len(v)} for k, v in sorted(groups.items())}


def _list_f1(pred: str, scene) -> float:
    gold = set(ordered_names(scene))
    got = {p.strip() for p in pred.replace(".", "").split(",") if p.strip()}
    tp = len(gold & got)
    return 0.0 if tp == 0 else 2 * tp / (len(gold) + len(got))


def _paint_over(scene, idx: list[int]) -> Image.Image:
    """The scene image with objects ``idx`` filled with the median colour of the background around them."""
    arr = np.asarray(scene.image).copy()
    hole = np.zeros(arr.shape[:2], bool)
    for i in idx:
        hole |= scene.objects[i].mask
    grown = np.asarray(Image.fromarray(hole.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(9))) > 0
    occupied = np.zeros_like(hole)
    for o in scene.objects:
        occupied |= o.mask
    ring = grown & ~occupied
    fill = np.median(arr[ring], axis=0) if ring.any() else np.median(arr[~occupied], axis=0)
    others = np.zeros_like(hole)
    for k, o in enumerate(scene.objects):
        if k not in idx:
            others |= o.mask
    hole = np.asarray(Image.fromarray(hole.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 0
    arr[hole & ~others] = fill.astype(np.uint8)
    return Image.fromarray(arr)


@torch.no_grad()
def pointing(model, processor, scenes, rng) -> dict:
    """Pointing game on existence questions about present objects: per layer and head, does the arg-max image token
    (last prompt row) have a pixel box overlapping the object's box? Also head-mean per layer and a random baseline."""
    model.set_attn_implementation("eager")
    img_id = model.config.image_token_id
    hits, base = [], []
    for sc in scenes:
        qa = pope_questions(sc, "random", rng, per_image=1)[0]
        enc = processor(images=[sc.image], text=[prompt_text(qa.question)], return_tensors="pt")
        out = model(**enc, output_attentions=True)
        pos = (enc["input_ids"][0] == img_id).nonzero().squeeze(-1)
        att = torch.stack([a[0, :, -1, pos] for a in out.attentions])          # [layers, heads, 64]
        att = torch.cat([att, att.mean(1, keepdim=True)], 1)                   # last "head" = head mean
        boxes = token_boxes(*sc.image.size)
        boxes_t = torch.as_tensor(boxes)
        ok = torch.zeros(boxes.shape[0], dtype=torch.bool)
        for i in qa.targets:
            x0, y0, x1, y1 = sc.objects[i].box
            ok |= (boxes_t[:, 0] < x1) & (boxes_t[:, 2] > x0) & (boxes_t[:, 1] < y1) & (boxes_t[:, 3] > y0)
        valid = (boxes_t[:, 2] > boxes_t[:, 0]) & (boxes_t[:, 3] > boxes_t[:, 1])
        att = att.masked_fill(~valid, -1)
        hits.append(ok[att.argmax(-1)].float())
        base.append(float(ok[valid].float().mean()))
    model.set_attn_implementation("sdpa")
    h = torch.stack(hits).mean(0)                                              # [layers, heads + 1]
    return {"per_layer_head": [[round(float(v), 3) for v in row[:-1]] for row in h],
            "head_mean_per_layer": [round(float(row[-1]), 3) for row in h],
            "random_baseline": round(float(np.mean(base)), 3), "n": len(scenes)}


SKILLS = (("color", 2), ("shape", 2), ("count", 2), ("location", 3), ("list", 40), ("describe", 48))


POPE_SPLITS = ("random", "popular", "adversarial")


def pope_sets(scenes, rng: np.random.Generator) -> dict:
    """{split: [(scene, QA)]} for each of :data:`POPE_SPLITS`, three questions per scene, drawn in that order."""
    return {split: [(sc, qa) for sc in scenes for qa in pope_questions(sc, split, rng)] for split in POPE_SPLITS}


def question_sets(n_images: int = 200):
    """The scored questions of :func:`evaluate`, drawn in its order: (scenes, cluttered scenes, sets, rng), where
    ``sets`` maps ``pope_random`` / ``pope_popular`` / ``pope_adversarial``, each skill of :data:`SKILLS` and
    ``cluttered_random`` / ``cluttered_adversarial`` to a list of (scene, QA) pairs, and ``rng`` is left where
    :func:`evaluate` goes on drawing (cluttered lists, the swap / paint-over checks, pointing)."""
    rng = np.random.default_rng(2024)
    scenes = [generate_scene(EVAL_SEED0 + i) for i in range(n_images)]
    clutter = [generate_scene(CLUTTER_SEED0 + i, style="cluttered") for i in range(max(8, n_images // 2))]
    sets = {f"pope_{split}": qs for split, qs in pope_sets(scenes, rng).items()}
    for skill, _ in SKILLS:   # one question per scene and skill (when well-posed)
        sets[skill] = [(sc, qa) for sc in scenes for qa in [make_qa(sc, rng, skill)] if qa is not None]
    for split in ("random", "adversarial"):
        sets[f"cluttered_{split}"] = [(sc, qa) for sc in clutter for qa in pope_questions(sc, split, rng)]
    return scenes, clutter, sets, rng


def evaluate(path_or_model, n_images: int = 200, *, processor=None, log=print) -> dict:
    """All held-out metrics of the default model as a JSON-able dict."""
    if processor is None:
        model, processor = load(path_or_model)
    else:
        model = path_or_model.eval()
    t0 = time.time()
    scenes, clutter, sets, rng = question_sets(n_images)
    res: dict = {"eval_seeds": [EVAL_SEED0, EVAL_SEED0 + n_images - 1], "pope": {}}
    for split in POPE_SPLITS:
        qs = sets[f"pope_{split}"]
        preds = answer(model, processor, [s.image for s, _ in qs], [q.question for _, q in qs], 2)
        said_yes = [is_yes(p) for p in preds]
        res["pope"][split] = _pope_metrics(said_yes, [q.answer == "yes" for _, q in qs])
        if split == "random":
            res["pope_random_by_case"] = pope_breakdown(qs, said_yes)
    for skill, n_tok in SKILLS:
        qs = sets[skill]
        preds = answer(model, processor, [s.image for s, _ in qs], [q.question for _, q in qs], n_tok)
        if skill == "list":
            res["list_f1"] = round(float(np.mean([_list_f1(p, s) for p, (s, _) in zip(preds, qs)])), 4)
            res["list_exact"] = round(float(np.mean([p == q.answer for p, (_, q) in zip(preds, qs)])), 4)
        elif skill == "describe":
            res["describe_exact"] = round(float(np.mean([p == q.answer for p, (_, q) in zip(preds, qs)])), 4)
        else:
            res[f"{skill}_acc"] = round(float(np.mean([p == q.answer for p, (_, q) in zip(preds, qs)])), 4)
        res.setdefault("n_questions", {})[skill] = len(qs)
    res["attribute_acc"] = round((res["color_acc"] * res["n_questions"]["color"] + res["shape_acc"]
                                  * res["n_questions"]["shape"]) / max(1, res["n_questions"]["color"]
                                                                        + res["n_questions"]["shape"]), 4)
    # cluttered split
    res["cluttered"] = {}
    for split in ("random", "adversarial"):
        qs = sets[f"cluttered_{split}"]
        preds = answer(model, processor, [s.image for s, _ in qs], [q.question for _, q in qs], 2)
        res["cluttered"][f"pope_{split}"] = _pope_metrics([is_yes(p) for p in preds], [q.answer == "yes" for _, q in qs])
    lq = [make_qa(sc, rng, "list") for sc in clutter]
    preds = answer(model, processor, [s.image for s in clutter], [q.question for q in lq], 40)
    res["cluttered"]["list_f1"] = round(float(np.mean([_list_f1(p, s) for p, s in zip(preds, clutter)])), 4)
    # independent checks: image swapped for another scene; asked object painted over with background
    qs = [(k, qa) for k, sc in enumerate(scenes) for qa in pope_questions(sc, "random", rng)]
    swapped = [scenes[(k + 1) % len(scenes)].image for k, _ in qs]
    preds = answer(model, processor, swapped, [q.question for _, q in qs], 2)
    res["swap_image_pope_acc"] = round(float(np.mean([is_yes(p) == (q.answer == "yes")
                                                     for p, (_, q) in zip(preds, qs)])), 4)
    pos = [(sc, qa) for sc in scenes for qa in pope_questions(sc, "random", rng, per_image=1) if qa.answer == "yes"]
    painted = [_paint_over(sc, qa.targets) for sc, qa in pos]
    preds = answer(model, processor, painted, [q.question for _, q in pos], 2)
    res["paint_over_yes_rate"] = round(float(np.mean([is_yes(p) for p in preds])), 4)
    orig = answer(model, processor, [s.image for s, _ in pos], [q.question for _, q in pos], 2)
    res["paint_over_yes_rate_before"] = round(float(np.mean([is_yes(p) for p in orig])), 4)
    # pointing game: validation split (choose layers) and test scenes
    val = [generate_scene(VAL_SEED0 + i) for i in range(max(8, n_images // 2))]
    res["pointing_val"] = pointing(model, processor, val, rng)
    res["pointing"] = pointing(model, processor, scenes, rng)
    # speed: one short answer, batch 1
    times = []
    for sc in scenes[:20]:
        t = time.perf_counter()
        answer(model, processor, [sc.image], ["Is there a red circle in the image?"], 2)
        times.append(time.perf_counter() - t)
    res["ms_per_short_answer"] = round(1000 * float(np.median(times)), 1)
    res["eval_wall_s"] = round(time.time() - t0, 1)
    log(f"evaluation done in {res['eval_wall_s']}s")
    return res
