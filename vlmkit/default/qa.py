"""Questions and answers about a scene, for every skill of the default model, and POPE-style existence sets.

Skills: ``exist`` (yes/no), ``color`` ("What color is the star?"), ``shape`` ("What shape is the blue object?"),
``count``, ``list`` ("What objects are in the image?" -> "red circle, blue star"), ``describe`` and ``location``
("Where is the red circle?" -> "top left"). Each :class:`QA` names the objects it is about (``targets``, indices into
the scene's objects), which the training recipe uses for its attention loss and the evaluation for pointing.

Works on anything with ``.objects`` whose items have ``shape``, ``color``, ``box`` and ``center`` (a :class:`Scene`
or the light records the trainer keeps) plus ``width`` / ``height`` (or an ``image``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from vlmkit.data.scenes import COLORS, SHAPES, _sample_names, object_frequencies, object_names
from vlmkit.default.tokenizer import NUMBER_WORDS, PLURALS

SKILLS = ("exist", "color", "shape", "count", "list", "describe", "location")
SKILL_WEIGHTS = {"exist": 0.34, "color": 0.12, "shape": 0.08, "count": 0.15, "list": 0.1, "describe": 0.07,
                 "location": 0.14}
LOCATIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# how training existence questions pick their absent object ("binding": colour and shape both in the scene, on
# different objects -- the commonest POPE error of the 16000-scene checkpoint; "partial": exactly one of them in
# the scene -- run 7's commonest false "yes"; see negatives())
TRAIN_NEGATIVES = {"random": 0.3, "popular": 0.1, "adversarial": 0.2, "binding": 0.2, "partial": 0.2}
NEGATIVE_KINDS = ("random", "popular", "adversarial", "binding", "partial")   # see negatives()
EXIST_TEMPLATES = ("Is there a {o} in the image?", "Is there a {o} in the image?", "Is there a {o}?",
                   "Do you see a {o} in the image?", "Is there any {o} in this picture?")


@dataclass
class QA:
    """One question with its reference answer; ``targets`` are indices of the objects the question is about."""
    skill: str
    question: str
    answer: str
    targets: list[int] = field(default_factory=list)
    label: str = ""          # for existence: "yes"/"no"; for POPE sets: the negative split too


def _size(scene) -> tuple[int, int]:
    if hasattr(scene, "image"):
        return scene.image.size
    return scene.width, scene.height


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def location_word(center: tuple[float, float], width: int, height: int, margin: float = 0.0) -> str | None:
    """Coarse 3 x 3 region of a point; None when it lies within ``margin`` (fraction) of a third-line."""
    fx, fy = center[0] / width, center[1] / height
    for f in (fx, fy):
        if min(abs(f - 1 / 3), abs(f - 2 / 3)) < margin:
            return None
    col, row = min(2, int(fx * 3)), min(2, int(fy * 3))
    return LOCATIONS[row * 3 + col]


def shared_attributes(question: str, objects) -> tuple[list[int], list[int]]:
    """Indices of ``objects`` whose colour, and of those whose shape, the question names (word match)."""
    words = set(question.lower().replace("?", " ").split())
    return ([k for k, o in enumerate(objects) if o.color in words],
            [k for k, o in enumerate(objects) if o.shape in words])


def ordered_names(scene) -> list[str]:
    """Unique object names, left to right by the first instance's centre (the order ``list`` answers use)."""
    firsts: dict[str, float] = {}
    for o in scene.objects:
        x = o.center[0]
        name = f"{o.color} {o.shape}"
        firsts[name] = min(firsts.get(name, x), x)
    return sorted(firsts, key=lambda n: firsts[n])


def describe_answer(scene) -> str:
    """"the image shows two red circles, a blue star and a green square.\""""
    names = ordered_names(scene)
    counts = {n: sum(1 for o in scene.objects if f"{o.color} {o.shape}" == n) for n in names}
    parts = []
    for n in names:
        color, shape = n.split(" ")
        k = counts[n]
        parts.append(f"{_article(color)} {n}" if k == 1 else f"{NUMBER_WORDS[k]} {color} {PLURALS[shape]}")
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"the image shows {body}."


def make_qa(scene, rng: np.random.Generator, skill: str | None = None, *, first: bool = True,
            negative_mix: dict[str, float] | None = None, skill_mix: dict[str, float] | None = None) -> QA | None:
    """A random question of ``skill`` (None: drawn by ``skill_mix``, skill -> share; None = :data:`SKILL_WEIGHTS`,
    the shipped recipe) about ``scene``; None if ill-posed. ``negative_mix``: how absent objects of existence
    questions are picked, kind -> share (:func:`negatives`; None = :data:`TRAIN_NEGATIVES`, the shipped recipe)."""
    mix = TRAIN_NEGATIVES if negative_mix is None else negative_mix
    if skill is None:
        skills = SKILL_WEIGHTS if skill_mix is None else skill_mix
        skill = str(rng.choice(list(skills), p=list(skills.values())))
    objs = scene.objects
    names = [f"{o.color} {o.shape}" for o in objs]
    w, h = _size(scene)
    if skill == "exist":
        if rng.random() < 0.5:
            i = int(rng.integers(len(objs)))
            name, ans = names[i], "yes"
        else:
            kind = str(rng.choice(list(mix), p=list(mix.values())))
            negs = negatives(scene, kind, 1, rng) or negatives(scene, "random", 1, rng)
            if not negs:
                return None
            name, ans = negs[0], "no"
        if rng.random() < 0.1:  # shape-only or colour-only existence
            color, shape = name.split(" ")
            if rng.random() < 0.5:
                idx = [k for k, o in enumerate(objs) if o.shape == shape]
                o = shape
            else:
                idx = [k for k, o in enumerate(objs) if o.color == color]
                o = f"{color} object"
            q = str(rng.choice(EXIST_TEMPLATES)).format(o=o)
            return QA("exist", q, "yes" if idx else "no", idx, "yes" if idx else "no")
        q = str(rng.choice(EXIST_TEMPLATES)).format(o=name)
        idx = [k for k, n in enumerate(names) if n == name]
        return QA("exist", q, ans, idx, ans)
    if skill == "color":
        shapes = [o.shape for o in objs]
        uniq = [k for k, s in enumerate(shapes) if shapes.count(s) == 1]
        if not uniq:
            return None
        i = int(rng.choice(uniq))
        return QA("color", f"What color is the {objs[i].shape}?", objs[i].color, [i])
    if skill == "shape":
        colors = [o.color for o in objs]
        uniq = [k for k, c in enumerate(colors) if colors.count(c) == 1]
        if not uniq:
            return None
        i = int(rng.choice(uniq))
        return QA("shape", f"What shape is the {objs[i].color} object?", objs[i].shape, [i])
    if skill == "count":
        r = rng.random()
        if r < 0.6:
            shape = str(rng.choice(SHAPES)) if rng.random() < 0.25 else objs[int(rng.integers(len(objs)))].shape
            idx = [k for k, o in enumerate(objs) if o.shape == shape]
            q = f"How many {PLURALS[shape]} are there?"
        elif r < 0.85:
            color = str(rng.choice(COLORS)) if rng.random() < 0.25 else objs[int(rng.integers(len(objs)))].color
            idx = [k for k, o in enumerate(objs) if o.color == color]
            q = f"How many {color} objects are there?"
        else:
            idx, q = list(range(len(objs))), "How many objects are there?"
        return QA("count", q, str(len(idx)), idx)
    if skill == "list":
        return QA("list", "What objects are in the image?", ", ".join(ordered_names(scene)), [])
    if skill == "describe":
        return QA("describe", "Describe the image.", describe_answer(scene), [])
    if skill == "location":
        uniq = [k for k, n in enumerate(names) if names.count(n) == 1]
        rng.shuffle(uniq)
        for i in uniq:
            word = location_word(objs[i].center, w, h, margin=0.04)
            if word is not None:
                return QA("location", f"Where is the {names[i]}?", word, [i])
        return None
    raise ValueError(f"unknown skill {skill!r}; expected one of {SKILLS}")


def conversation(scene, rng: np.random.Generator, max_turns: int = 3, negative_mix: dict[str, float] | None = None,
                 skill_mix: dict[str, float] | None = None) -> list[QA]:
    """1..max_turns question/answer turns; any skill can be the first turn (``negative_mix``, ``skill_mix``: see
    :func:`make_qa`)."""
    n = int(rng.integers(1, max_turns + 1)) if rng.random() < 0.5 else 1
    turns: list[QA] = []
    for t in range(n * 3):
        qa = make_qa(scene, rng, first=not turns, negative_mix=negative_mix, skill_mix=skill_mix)
        if qa is not None:
            turns.append(qa)
        if len(turns) >= n:
            break
    return turns


# ------------------------------------------------------------------------------------------------ POPE negatives

@lru_cache(maxsize=4)
def cooccurrence(n_scenes: int = 4000, seed: int = 12345) -> dict[str, dict[str, int]]:
    """Empirical co-occurrence counts between object names under the prior (names only, no rendering; cached,
    treat as read-only)."""
    rng = np.random.default_rng(seed)
    co: dict[str, dict[str, int]] = {n: {} for n in object_names()}
    for _ in range(n_scenes):
        present = set(_sample_names(rng, int(rng.integers(1, 9))))
        for a in present:
            for b in present:
                if a != b:
                    co[a][b] = co[a].get(b, 0) + 1
    return co


def check_mix(mix: dict[str, float], kinds: tuple[str, ...], what: str = "mix") -> dict[str, float]:
    """``mix`` (kind -> share) as a plain dict if its kinds are among ``kinds`` and its shares are >= 0 and sum to
    1; else ``ValueError`` naming ``what`` and the offending entry."""
    for kind, share in mix.items():
        if kind not in kinds or not float(share) >= 0:
            raise ValueError(f"{what} {mix!r}: bad entry {kind}={share!r}; kinds are {kinds}, shares >= 0")
    if abs(sum(mix.values()) - 1.0) > 1e-9:            # numpy's choice() allows ~1.5e-8
        raise ValueError(f"{what} {mix!r}: the shares sum to {sum(mix.values()):g}, not 1")
    return {k: float(v) for k, v in mix.items()}


def parse_mix(text: str, kinds: tuple[str, ...], what: str = "mix") -> dict[str, float]:
    """``"random=0.4,binding=0.6"`` -> ``{"random": 0.4, "binding": 0.6}``, checked by :func:`check_mix` (each kind
    once; ``ValueError`` naming ``what`` and the offending part otherwise)."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        kind, _, share = part.strip().partition("=")
        try:
            value = float(share)
        except ValueError:
            value = None
        if value is None or kind in mix:
            raise ValueError(f"{what} {text!r}: bad part {part.strip()!r}; expected KIND=SHARE, each kind once")
        mix[kind] = value
    return check_mix(mix, kinds, what)


def parse_negative_mix(text: str) -> dict[str, float]:
    """``--negatives`` text (``"random=0.4,binding=0.6"``) as a checked mix of :data:`NEGATIVE_KINDS`."""
    return parse_mix(text, NEGATIVE_KINDS, "negative mix")


def parse_skill_mix(text: str) -> dict[str, float]:
    """``--skills`` text (``"exist=0.5,color=0.5"``) as a checked mix of :data:`SKILLS` (question shares)."""
    return parse_mix(text, SKILLS, "skill mix")


def negatives(scene, kind: str, k: int, rng: np.random.Generator) -> list[str]:
    """``k`` absent object names, POPE style: ``random`` (uniform), ``popular`` (most frequent under the prior),
    ``adversarial`` (most co-occurring with the present objects); or ``binding`` (uniform among absent objects whose
    colour and shape both occur in the scene, on different objects) or ``partial`` (uniform among absent objects that
    share exactly one of colour and shape with the scene's objects); the last two give fewer than ``k``, maybe none,
    if there are not enough."""
    present = {f"{o.color} {o.shape}" for o in scene.objects}
    absent = [n for n in object_names() if n not in present]
    if kind == "random":
        return [str(x) for x in rng.choice(absent, size=min(k, len(absent)), replace=False)]
    if kind == "popular":
        freq = object_frequencies()
        return sorted(absent, key=lambda n: -freq[n])[:k]
    if kind == "adversarial":
        co, freq = cooccurrence(), object_frequencies()
        score = {n: sum(co[p].get(n, 0) for p in present) + freq[n] for n in absent}
        return sorted(absent, key=lambda n: -score[n])[:k]
    if kind in ("binding", "partial"):
        colors, shapes = {o.color for o in scene.objects}, {o.shape for o in scene.objects}
        seen = [(n, n.split(" ")[0] in colors, n.split(" ")[1] in shapes) for n in absent]
        cand = [n for n, c, s in seen if (c and s if kind == "binding" else c != s)]
        return [str(x) for x in rng.choice(cand, size=min(k, len(cand)), replace=False)] if cand else []
    raise ValueError(f"unknown POPE split {kind!r}; expected one of {NEGATIVE_KINDS}")


def pope_questions(scene, kind: str, rng: np.random.Generator, per_image: int = 3) -> list[QA]:
    """POPE-style balanced existence questions for one scene: up to ``per_image`` present objects (yes) and as many
    absent ones (no) chosen by ``kind``. Question text: "Is there a {object} in the image?"."""
    names = [f"{o.color} {o.shape}" for o in scene.objects]
    uniq = list(dict.fromkeys(names))
    pos = [str(x) for x in rng.choice(uniq, size=min(per_image, len(uniq)), replace=False)]
    neg = negatives(scene, kind, len(pos), rng)
    out = [QA("exist", f"Is there a {n} in the image?", "yes", [k for k, m in enumerate(names) if m == n], kind)
           for n in pos]
    out += [QA("exist", f"Is there a {n} in the image?", "no", [], kind) for n in neg]
    return out
