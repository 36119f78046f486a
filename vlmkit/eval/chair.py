"""CHAIR: object hallucination in free captions (Rohrbach et al., 2018), for generated scenes and for COCO.

A caption's object mentions are extracted with a vocabulary (synonyms and plurals folded to one canonical name) and
compared with the image's ground-truth objects:

* ``chair_i`` = hallucinated mentions / all mentions (each object counted once per caption);
* ``chair_s`` = captions with at least one hallucinated mention / captions;
* ``recall``  = ground-truth objects mentioned / ground-truth objects.

Scenes: an object is "<colour> <shape>" (``red circle``). A mention with a colour must match an object exactly; a
bare shape ("a circle") is correct when any object has that shape and does not count toward recall. Negations are
not handled ("there is no circle" is a mention), as in the original CHAIR.
COCO: the 80 categories with a small synonym table; ground truth = instance categories plus objects named in the
reference captions (as in the original CHAIR).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from vlmkit.errors import InputError
from vlmkit.eval.pope import RowError

SCENE_SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "hexagon")
SCENE_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
_SHAPE_WORDS = {
    "circle": ["circle", "disc", "disk", "dot", "round shape"], "square": ["square", "rectangle"],
    "triangle": ["triangle"], "star": ["star", "pentagram"], "cross": ["cross", "plus sign", "plus"],
    "heart": ["heart"], "diamond": ["diamond", "rhombus", "lozenge"], "hexagon": ["hexagon"]}
_COLOR_WORDS = {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "purple": "purple",
                "violet": "purple", "orange": "orange", "white": "white", "black": "black", "pink": "pink",
                "brown": "brown", "gray": "gray", "grey": "gray", "cyan": "cyan", "teal": "teal",
                "magenta": "magenta", "gold": "gold", "golden": "gold", "silver": "silver", "beige": "beige",
                "navy": "navy", "maroon": "maroon", "lime": "lime", "turquoise": "turquoise"}
_MODIFIERS = {"small", "large", "big", "tiny", "bright", "dark", "light", "solid", "filled", "little", "medium",
              "pale", "deep", "another", "single", "huge", "vivid", "colored", "coloured", "shaped", "outlined",
              "pure", "smaller", "larger", "bigger"}
_COLOR_JOINERS = {"and", "or", ",", "&"}

# canonical COCO category -> extra words (singular; plurals are folded by _singular)
COCO_SYNONYMS: dict[str, list[str]] = {
    "person": ["people", "man", "woman", "men", "women", "boy", "girl", "child", "children", "kid", "baby", "player",
               "guy", "lady", "person", "persons", "skier", "surfer", "rider", "skateboarder", "pedestrian"],
    "bicycle": ["bike", "cycle"], "car": ["automobile", "taxi", "sedan", "suv"], "motorcycle": ["motorbike", "scooter"],
    "airplane": ["plane", "jet", "aircraft", "airliner", "aeroplane"], "bus": ["buses"], "train": ["locomotive"],
    "truck": ["pickup", "lorry"], "boat": ["ship", "kayak", "canoe", "sailboat", "yacht"],
    "traffic light": ["traffic signal", "stop light", "stoplight"], "fire hydrant": ["hydrant"],
    "stop sign": [], "parking meter": ["meter"], "bench": [], "bird": ["pigeon", "seagull", "duck", "parrot"],
    "cat": ["kitten", "kitty"], "dog": ["puppy", "pup"], "horse": ["pony", "foal"], "sheep": ["lamb", "ram"],
    "cow": ["cattle", "calf", "bull"], "elephant": [], "bear": [], "zebra": [], "giraffe": [],
    "backpack": ["rucksack"], "umbrella": ["parasol"], "handbag": ["purse", "hand bag"], "tie": ["necktie"],
    "suitcase": ["luggage"], "frisbee": [], "skis": ["ski"], "snowboard": [], "sports ball": ["ball", "football",
    "soccer ball", "baseball", "tennis ball"], "kite": [], "baseball bat": ["bat"], "baseball glove": ["glove", "mitt"],
    "skateboard": [], "surfboard": ["surf board"], "tennis racket": ["racket", "racquet"], "bottle": [],
    "wine glass": [], "cup": ["mug"], "fork": [], "knife": [], "spoon": [], "bowl": [], "banana": [], "apple": [],
    "sandwich": ["burger", "sub"], "orange": [], "broccoli": [], "carrot": [], "hot dog": [], "pizza": [],
    "donut": ["doughnut"], "cake": ["cupcake"], "chair": ["stool"], "couch": ["sofa"], "potted plant": ["houseplant",
    "plant"], "bed": [], "dining table": ["table", "desk"], "toilet": [], "tv": ["television", "monitor", "tv screen"],
    "laptop": ["notebook computer"], "mouse": [], "remote": ["remote control", "controller"], "keyboard": [],
    "cell phone": ["phone", "cellphone", "smartphone", "mobile phone"], "microwave": [], "oven": ["stove"],
    "toaster": [], "sink": [], "refrigerator": ["fridge"], "book": ["novel"], "clock": [], "vase": [],
    "scissors": [], "teddy bear": ["teddy", "stuffed animal"], "hair drier": ["hair dryer", "hairdryer"],
    "toothbrush": ["tooth brush"]}
_IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
              "knives": "knife", "teeth": "tooth", "feet": "foot", "geese": "goose", "skis": "skis",
              "scissors": "scissors", "glasses": "glass", "rhombi": "rhombus", "buses": "bus", "sheep": "sheep",
              "octopi": "octopus", "cattle": "cattle", "bus": "bus", "grass": "grass"}
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|[,&]")


def _singular(word: str) -> str:
    """Crude English singular for object nouns (``crosses`` -> ``cross``, ``puppies`` -> ``puppy``)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """Lower-cased words (singular) and the separators "," / "&" (used to join colour lists)."""
    return [_singular(t) for t in _TOKEN.findall(text.lower().replace("-", " "))]


@dataclass(frozen=True)
class Mention:
    """An object mention: ``name`` is canonical ("red circle", "circle", "dog"); ``index`` is the token position."""

    name: str
    index: int
    color: str | None = None
    shape: str | None = None


class Vocabulary:
    """Phrase table mapping token sequences (1..3 words, singular) to canonical object names."""

    def __init__(self, table: Mapping[str, Iterable[str]]):
        self.phrases: dict[tuple[str, ...], str] = {}
        for canon, words in table.items():
            for w in [canon, *words]:
                self.phrases[tuple(tokenize(w))] = canon
        self.max_len = max(len(k) for k in self.phrases)

    def match(self, tokens: Sequence[str], i: int) -> tuple[str, int] | None:
        """Longest phrase starting at ``tokens[i]``: (canonical name, length)."""
        for n in range(min(self.max_len, len(tokens) - i), 0, -1):
            canon = self.phrases.get(tuple(tokens[i:i + n]))
            if canon is not None:
                return canon, n
        return None

    def mentions(self, text: str) -> list[Mention]:
        tokens = tokenize(text)
        out, i = [], 0
        while i < len(tokens):
            m = self.match(tokens, i)
            if m is None:
                i += 1
                continue
            out.append(Mention(m[0], i))
            i += m[1]
        return out


SCENE_SHAPE_VOCAB = Vocabulary(_SHAPE_WORDS)
COCO_VOCAB = Vocabulary(COCO_SYNONYMS)


def _colors_before(tokens: Sequence[str], i: int) -> list[str]:
    """Colours in the noun phrase ending before ``tokens[i]``: "small red and blue" -> [red, blue]."""
    colors: list[str] = []
    j = i - 1
    while j >= 0:
        t = tokens[j]
        if t in _COLOR_WORDS:
            colors.append(_COLOR_WORDS[t])
        elif t in _MODIFIERS or (t in _COLOR_JOINERS and colors):
            pass
        else:
            break
        j -= 1
    return list(dict.fromkeys(reversed(colors)))


def _colors_after(tokens: Sequence[str], j: int) -> list[str]:
    """Predicate colours after a bare shape: "the circle is red", "squares are blue and green"."""
    if j >= len(tokens) or tokens[j] not in ("is", "are"):
        return []
    j += 1
    while j < len(tokens) and tokens[j] in ("colored", "coloured", "painted", "in", "all", "both"):
        j += 1
    colors: list[str] = []
    while j < len(tokens):
        t = tokens[j]
        if t in _COLOR_WORDS:
            colors.append(_COLOR_WORDS[t])
        elif not (t in _MODIFIERS or (t in _COLOR_JOINERS and colors and j + 1 < len(tokens)
                                      and tokens[j + 1] in _COLOR_WORDS)):
            break
        j += 1
    return list(dict.fromkeys(colors))


def scene_mentions(caption: str) -> list[Mention]:
    """Object mentions in a caption over the scene vocabulary; each colour before a shape ("red and blue circles")
    or, for a bare shape, in a predicate after it ("the square is blue") gives one mention."""
    tokens = tokenize(caption)
    out, i = [], 0
    while i < len(tokens):
        m = SCENE_SHAPE_VOCAB.match(tokens, i)
        if m is None:
            i += 1
            continue
        shape = m[0]
        colors = _colors_before(tokens, i) or _colors_after(tokens, i + m[1])
        if colors:
            out += [Mention(f"{c} {shape}", i, c, shape) for c in colors]
        else:
            out.append(Mention(shape, i, None, shape))
        i += m[1]
    return out


def coco_mentions(caption: str) -> list[Mention]:
    """COCO category mentions (longest phrase wins: "hot dog" is not a "dog")."""
    return COCO_VOCAB.mentions(caption)


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass
class CaptionResult:
    """Per-caption result: unique mentioned names, which of them are hallucinated, ground truth covered."""

    id: str
    mentioned: list[str]
    hallucinated: list[str]
    covered: list[str]
    n_gt: int


@dataclass
class ChairScore:
    chair_s: float
    chair_i: float
    recall: float
    n: int
    n_mentions: int
    n_hallucinated: int
    per_caption: list[CaptionResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"chair_s": self.chair_s, "chair_i": self.chair_i, "recall": self.recall, "n": self.n,
                "n_mentions": self.n_mentions, "n_hallucinated": self.n_hallucinated}


def judge_caption(caption: str, objects: Iterable[str], kind: str = "scene", cid: str = "") -> CaptionResult:
    """Compare one caption with ground-truth object names (``kind`` = "scene" or "coco")."""
    gt = {o.strip().lower() for o in objects}
    if kind == "scene":
        mentions = scene_mentions(caption)
        shapes = {g.split()[-1] for g in gt}
        ok = lambda m: (m.name in gt) if m.color else (m.shape in shapes)  # noqa: E731
    elif kind == "coco":
        mentions = coco_mentions(caption)
        ok = lambda m: m.name in gt  # noqa: E731
    else:
        raise InputError(f"unknown CHAIR vocabulary {kind!r}; choose 'scene' or 'coco'")
    uniq = list({m.name: m for m in mentions}.values())
    return CaptionResult(id=cid, mentioned=[m.name for m in uniq], hallucinated=[m.name for m in uniq if not ok(m)],
                         covered=sorted(gt & {m.name for m in uniq}), n_gt=len(gt))


def score_chair(items: Iterable[tuple[str, str, Iterable[str]]], kind: str = "scene") -> ChairScore:
    """Score ``(id, caption, ground-truth names)`` triples; see the module docstring for the definitions."""
    per = [judge_caption(cap, objs, kind, cid) for cid, cap, objs in items]
    n_m = sum(len(r.mentioned) for r in per)
    n_h = sum(len(r.hallucinated) for r in per)
    n_gt = sum(r.n_gt for r in per)
    return ChairScore(chair_s=sum(bool(r.hallucinated) for r in per) / len(per) if per else 0.0,
                      chair_i=n_h / n_m if n_m else 0.0,
                      recall=sum(len(r.covered) for r in per) / n_gt if n_gt else 0.0,
                      n=len(per), n_mentions=n_m, n_hallucinated=n_h, per_caption=per)


# ---------------------------------------------------------------------------------------------------- loading
@dataclass
class ChairItem:
    """An image to caption and its ground-truth objects (canonical names)."""

    id: str
    image: str
    objects: list[str]
    file: str = ""
    line: int = 0


def _object_name(o) -> str:
    name = o.get("name") if isinstance(o, dict) else (o if isinstance(o, str) else getattr(o, "name", None))
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"object without a name: {o!r}")
    return name.strip().lower()


def load_chair_items(path: str | Path) -> tuple[list[ChairItem], list[RowError]]:
    """Scene-style CHAIR file: JSON array or lines of ``{image_id, image, objects: [names or {name}]}``."""
    f = Path(path)
    if not f.is_file():
        raise InputError(f"CHAIR data {f} does not exist")
    text = f.read_text(encoding="utf-8")
    items, errors = [], []
    if text.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise InputError(f"{f}: not valid JSON ({e})") from e
    else:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    errors.append(RowError(str(f), n, f"malformed JSON: {e}"))
    for n, rec in records:
        try:
            if not isinstance(rec, dict) or "image" not in rec or "objects" not in rec:
                raise ValueError("expected {image_id, image, objects}")
            ident = str(rec.get("image_id", rec.get("id", n)))
            items.append(ChairItem(ident, str(rec["image"]), [_object_name(o) for o in rec["objects"]], str(f), n))
        except (ValueError, TypeError) as e:
            errors.append(RowError(str(f), n, str(e)))
    return items, errors


def load_coco_chair(instances: str | Path, captions: str | Path | None = None) -> list[ChairItem]:
    """COCO ground truth from local ``instances_*.json`` (+ optional ``captions_*.json`` reference captions)."""
    def read(p):
        try:
            return json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read COCO file {p}: {e}") from e

    inst = read(instances)
    try:
        cats = {c["id"]: c["name"] for c in inst["categories"]}
        images = {im["id"]: im["file_name"] for im in inst["images"]}
        objs: dict[int, set[str]] = {i: set() for i in images}
        for a in inst["annotations"]:
            objs.setdefault(a["image_id"], set()).add(cats[a["category_id"]])
    except (KeyError, TypeError) as e:
        raise InputError(f"{instances}: not a COCO instances file (missing {e})") from e
    if captions is not None:
        for a in read(captions).get("annotations", []):
            if a.get("image_id") in objs:
                objs[a["image_id"]].update(m.name for m in coco_mentions(str(a.get("caption", ""))))
    return [ChairItem(str(i), images[i], sorted(objs[i]), str(instances), 0) for i in sorted(images)]
