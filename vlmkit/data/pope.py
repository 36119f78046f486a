"""Build POPE question sets the POPE way from annotated images (generated scenes or any object lists).

Per image: ``num_pos`` ground-truth objects (sampled) and ``num_neg`` absent objects, asked as
"Is there a/an {object} in the image?", alternating yes / no (official order). Negatives per split:

* ``random``      -- uniformly among vocabulary objects absent from the image;
* ``popular``     -- the most frequent objects over the whole set (or given frequencies) that are absent;
* ``adversarial`` -- for each positive in turn, the absent object that co-occurs with it most often.

Images with fewer than ``num_pos`` distinct objects or fewer than ``num_neg`` possible negatives are skipped (POPE
samples images with >= 3 objects). Rows are ``{question_id, image, text, label}`` (the official format).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from vlmkit.errors import InputError

SPLITS = ("random", "popular", "adversarial")


def object_names(item: Any) -> list[str]:
    """Distinct object names of an annotation (an object with ``.objects`` or a dict with "objects"), in order.

    Objects may be strings, dicts with "name", or objects with ``.name`` (e.g. ``SceneObject``).
    """
    objs = item.get("objects") if isinstance(item, Mapping) else getattr(item, "objects", None)
    if objs is None:
        raise InputError(f"annotation {item!r:.80} has no 'objects'")
    names = []
    for o in objs:
        if isinstance(o, str):
            name = o
        elif isinstance(o, Mapping):
            name = o.get("name")
        else:
            name = getattr(o, "name", None)
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"object {o!r:.80} has no name")
        names.append(name.strip().lower())
    return list(dict.fromkeys(names))


def image_name(item: Any, index: int) -> str:
    """File name of an annotation's image: "image"/"file_name" key or attribute, else ``scene_{index:05d}.png``."""
    for key in ("image", "file_name", "image_path"):
        v = item.get(key) if isinstance(item, Mapping) else getattr(item, key, None)
        if isinstance(v, (str, Path)):
            return Path(v).name if isinstance(v, Path) else v
    return f"scene_{index:05d}.png"


def question_for(name: str) -> str:
    """The POPE template with the right article."""
    art = "an" if name[:1].lower() in "aeiou" else "a"
    return f"Is there {art} {name} in the image?"


@dataclass
class PopeBuild:
    """Rows per split and the images skipped (index, reason)."""

    rows: dict[str, list[dict]] = field(default_factory=dict)
    skipped: list[tuple[int, str]] = field(default_factory=list)


def cooccurrence(object_lists: Iterable[Sequence[str]]) -> dict[str, Counter]:
    """``co[a][b]`` = number of images holding both ``a`` and ``b``."""
    co: dict[str, Counter] = {}
    for objs in object_lists:
        for a in objs:
            c = co.setdefault(a, Counter())
            c.update(b for b in objs if b != a)
    return co


def _ranked(counter: Mapping[str, float]) -> list[str]:
    return [k for k, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]


def build_pope(annotations: Sequence[Any], splits: Iterable[str] = SPLITS, seed: int = 0, num_pos: int = 3,
               num_neg: int = 3, vocabulary: Iterable[str] | None = None,
               frequencies: Mapping[str, float] | None = None,
               partners: Mapping[str, Sequence[str]] | None = None) -> PopeBuild:
    """POPE rows for each split from ``annotations`` (see :func:`object_names`).

    ``vocabulary`` (default: every object seen) is the pool for random negatives; ``frequencies`` (default: counts
    over the annotations) ranks popular negatives; ``partners`` (name -> names, strongest first) extends the
    data's co-occurrence ranking for adversarial negatives. The same positives are used in every split; everything is
    deterministic given ``seed``.
    """
    splits = list(splits)
    for s in splits:
        if s not in SPLITS:
            raise InputError(f"unknown POPE split {s!r}; choose from {', '.join(SPLITS)}")
    lists = [object_names(a) for a in annotations]
    vocab = sorted(set(vocabulary or ())) if vocabulary is not None else sorted({o for objs in lists for o in objs})
    vocab = [v.lower() for v in vocab]
    freq = {k.lower(): v for k, v in frequencies.items()} if frequencies is not None else Counter(
        o for objs in lists for o in objs)
    popular = _ranked(freq)
    co = {a: _ranked(c) for a, c in cooccurrence(lists).items()}
    for a, extra in (partners or {}).items():
        ranked = co.setdefault(a.lower(), [])
        ranked += [b.lower() for b in extra if b.lower() not in ranked]
    rng = random.Random(seed)
    out = PopeBuild(rows={s: [] for s in splits})
    for idx, (item, objs) in enumerate(zip(annotations, lists)):
        if len(objs) < num_pos:
            out.skipped.append((idx, f"{len(objs)} distinct objects < {num_pos}"))
            continue
        present = set(objs)
        absent = [v for v in vocab if v not in present]
        if len(absent) < num_neg:
            out.skipped.append((idx, f"only {len(absent)} absent objects < {num_neg}"))
            continue
        positives = rng.sample(objs, num_pos)
        rand_neg = rng.sample(absent, num_neg)
        negs: dict[str, list[str]] = {"random": rand_neg}
        negs["popular"] = [o for o in popular if o not in present][:num_neg]
        adv: list[str] = []
        anchors = positives + [o for o in objs if o not in positives]
        while len(adv) < num_neg:
            before = len(adv)
            for p in anchors:
                cand = next((o for o in co.get(p, []) if o not in present and o not in adv), None)
                if cand is not None and len(adv) < num_neg:
                    adv.append(cand)
            if len(adv) == before:
                break
        fill = [o for o in popular if o not in present and o not in adv]
        negs["adversarial"] = (adv + fill)[:num_neg]
        image = image_name(item, idx)
        for s in splits:
            neg = negs[s]
            if len(neg) < num_neg:  # frequency table lacks absent objects: top up from the random draw
                neg = neg + [o for o in rand_neg if o not in neg][:num_neg - len(neg)]
            rows = out.rows[s]
            for k in range(max(num_pos, num_neg)):
                for name, label in ((positives, "yes"), (neg, "no")):
                    if k < len(name):
                        rows.append({"question_id": len(rows) + 1, "image": image,
                                     "text": question_for(name[k]), "label": label})
    return out


def write_pope(build: PopeBuild, out_dir: str | Path, prefix: str = "pope") -> list[Path]:
    """Write ``{prefix}_{split}.json`` files (JSON lines, like the official ``coco_pope_*.json``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, rows in build.rows.items():
        p = out / f"{prefix}_{split}.json"
        with p.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        paths.append(p)
    return paths


def scene_vocabulary() -> list[str]:
    """All "colour shape" names of the scene generator."""
    from vlmkit.data import scenes  # lazy: the generator lives in its own module

    return list(scenes.object_names())


def generate_scene_set(out_dir: str | Path, num_images: int = 30, seed: int = 0, min_objects: int = 3) -> list[dict]:
    """Generate ``num_images`` scenes holding >= ``min_objects`` distinct objects and save them with
    ``vlmkit.data.scenes.save_scenes`` into ``out_dir/images`` (PNG + per-image JSON + ``instances_coco.json``).

    Returns annotations ``{image_id, image, objects: [names]}`` (``image`` relative to ``images/``).
    """
    from vlmkit.data import scenes

    rng = random.Random(seed)
    chosen = []
    k = 0
    while len(chosen) < num_images:
        if k > 50 * num_images:
            raise InputError(f"could not draw {num_images} scenes with >= {min_objects} distinct objects")
        sc = scenes.generate_scene(seed * 1_000_003 + k, n_objects=rng.randint(min_objects, 6))
        k += 1
        if len(set(sc.names)) >= min_objects:
            chosen.append(sc)
    scenes.save_scenes(chosen, Path(out_dir) / "images")
    return [{"image_id": i + 1, "image": f"scene_{i:05d}.png", "objects": list(dict.fromkeys(sc.names))}
            for i, sc in enumerate(chosen)]


def build_scene_pope(out_dir: str | Path, num_images: int = 30, seed: int = 0) -> tuple[PopeBuild, list[Path]]:
    """The built-in POPE set: scenes under ``out_dir/images`` and ``pope_{split}.json`` in ``out_dir``."""
    from vlmkit.data import scenes

    anns = generate_scene_set(out_dir, num_images, seed)
    build = build_pope(anns, seed=seed, vocabulary=scenes.object_names(), frequencies=scenes.object_frequencies(),
                       partners=scenes.cooccurrence_partners())
    return build, write_pope(build, out_dir)


def build_scene_chair(out_dir: str | Path, num_images: int = 30, seed: int = 0) -> Path:
    """The built-in CHAIR set: scenes under ``out_dir/images`` and ``chair.json`` = ``[{image_id, image, objects}]``."""
    anns = generate_scene_set(out_dir, num_images, seed, min_objects=1)
    p = Path(out_dir) / "chair.json"
    p.write_text(json.dumps(anns, indent=1), encoding="utf-8")
    return p
