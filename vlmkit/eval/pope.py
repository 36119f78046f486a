"""POPE: loading question files and scoring yes/no answers with the three published rules.

Rules (all always reported; ``pope`` is the default):

* ``pope`` -- RUCAIBox/POPE ``evaluate.py``: keep the text before the first ".", remove commas, split on single
  spaces; "no" if a token is ``No``, ``no`` or ``not``, else "yes". Never unparsed.
* ``pope_nt`` -- OPERA's ``pope_eval.py`` recorder (also used by LLaVA-derived repos): remove every "." and ",",
  split on single spaces; "no" if a token is ``No``, ``not``, ``no``, ``NO`` or ends in ``n't``, else "yes".
* ``strict`` -- lower-case, drop punctuation, strip whitespace; exactly "yes" or "no", anything else unparsed.

Metrics use "yes" as the positive class. Unparsed answers are wrong for accuracy, are not "yes" predictions (so they
count as false negatives when the label is "yes"), and ``yes_ratio`` is the share of *predicted* "yes" over all
scored answers.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from vlmkit.errors import InputError

SPLITS = ("random", "popular", "adversarial")
RULES = ("pope", "pope_nt", "strict")
DEFAULT_RULE = "pope"
_SPLIT_ALIASES = {"random": "random", "rand": "random", "popular": "popular", "pop": "popular",
                  "adversarial": "adversarial", "adv": "adversarial"}
_PUNCT = str.maketrans("", "", string.punctuation + "\u2019\u2018\u201c\u201d")


# ----------------------------------------------------------------------------------------------------- answer rules
def parse_pope(answer: str) -> str:
    """Official POPE rule: first sentence, commas removed, negative words ``No``/``no``/``not``."""
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def parse_pope_nt(answer: str) -> str:
    """OPERA/LLaVA variant: whole answer, also ``NO`` and any word ending in ``n't`` mean "no"."""
    words = answer.replace(".", "").replace(",", "").split(" ")
    neg = {"No", "not", "no", "NO"}
    return "no" if any(w in neg or w.endswith("n't") for w in words) else "yes"


def parse_strict(answer: str) -> str | None:
    """Exact match: "yes"/"no" after lower-casing and removing punctuation; ``None`` (unparsed) otherwise."""
    text = answer.lower().translate(_PUNCT).strip()
    return text if text in ("yes", "no") else None


RULE_FUNCS: dict[str, Callable[[str], str | None]] = {
    "pope": parse_pope, "pope_nt": parse_pope_nt, "strict": parse_strict}


def parse_answer(answer: str, rule: str = DEFAULT_RULE) -> str | None:
    """Map a model answer to "yes", "no" or ``None`` (unparsed) with one of :data:`RULES`."""
    if rule not in RULE_FUNCS:
        raise InputError(f"unknown POPE scoring rule {rule!r}; choose one of {', '.join(RULES)}")
    if not isinstance(answer, str):
        raise InputError(f"POPE answer must be a string, got {type(answer).__name__}: {answer!r}")
    return RULE_FUNCS[rule](answer)


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class RowError:
    """A row that could not be loaded or answered; ``file:line`` points at the source row."""

    file: str
    line: int
    message: str
    id: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        ident = f" (id {self.id})" if self.id is not None else ""
        return f"{where}{ident}: {self.message}"


@dataclass
class PopeRow:
    """One POPE question. ``id`` is unique over all loaded splits ("<split>/<question_id>" when there are several)."""

    id: str
    question_id: str
    image: str
    question: str
    label: str  # "yes" | "no"
    split: str
    file: str = ""
    line: int = 0


def split_from_name(name: str) -> str | None:
    """Split name found in a file name (``coco_pope_random.json`` -> "random", ``pope_adv`` -> "adversarial")."""
    for tok in re.split(r"[^a-z]+", Path(name).stem.lower()):
        if tok in _SPLIT_ALIASES:
            return _SPLIT_ALIASES[tok]
    return None


def _read_records(path: Path) -> Iterable[tuple[int, object | Exception]]:
    """Yield ``(line_number, record_or_error)``; a JSON array file yields its items numbered from 1."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from e
        yield from enumerate(items, start=1)
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield n, e


def _row_from_record(rec: object, split: str) -> PopeRow:
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    qid = rec.get("question_id", rec.get("id"))
    question = rec.get("text", rec.get("question"))
    label = rec.get("label", rec.get("answer"))
    image = rec.get("image", rec.get("image_path", rec.get("image_source")))
    missing = [k for k, v in (("question_id", qid), ("text/question", question), ("label/answer", label),
                              ("image", image)) if v is None]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}; expected {{question_id, image, text, label}} "
                         "or {question_id, question, answer, image}")
    if isinstance(image, dict):
        image = image.get("path")
    if not isinstance(image, str) or not image:
        raise ValueError(f"'image' must be a file name, got {type(image).__name__}")
    lab = str(label).strip().lower()
    if lab not in ("yes", "no"):
        raise ValueError(f"label must be 'yes' or 'no', got {label!r}")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question text is empty")
    cat = rec.get("category")
    row_split = _SPLIT_ALIASES.get(str(cat).lower(), split) if cat is not None and split == "" else split
    return PopeRow(id="", question_id=str(qid), image=image, question=question, label=lab, split=row_split)


def load_pope(data: str | Path, split: str | None = None) -> tuple[list[PopeRow], list[RowError]]:
    """Load POPE rows from one JSON-lines file or a directory of split files.

    The split comes from ``split`` if given, else from the file name (random/popular/adversarial), else from a
    ``category`` field (lmms-eval exports), else the file stem. Malformed rows become :class:`RowError` entries
    (file and line named) and loading goes on. Duplicate ids within a split are errors too.
    """
    path = Path(data)
    if path.is_dir():
        order = lambda p: (SPLITS.index(split_from_name(p.name)) if split_from_name(p.name) else 3, p.name)  # noqa: E731
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in (".json", ".jsonl") and p.is_file()),
                       key=order)
        if not files:
            raise InputError(f"{path}: no .json/.jsonl POPE files in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"POPE data {path} does not exist (give a JSON-lines file or a directory of split files)")
    rows: list[PopeRow] = []
    errors: list[RowError] = []
    for f in files:
        fsplit = _SPLIT_ALIASES.get(split.lower(), split) if split else (split_from_name(f.name) or "")
        for n, rec in _read_records(f):
            if isinstance(rec, Exception):
                errors.append(RowError(str(f), n, f"malformed JSON: {rec}"))
                continue
            try:
                row = _row_from_record(rec, fsplit)
            except ValueError as e:
                qid = rec.get("question_id") if isinstance(rec, dict) else None
                errors.append(RowError(str(f), n, str(e), None if qid is None else str(qid)))
                continue
            row.split = row.split or f.stem
            row.file, row.line = str(f), n
            rows.append(row)
    multi = len({r.split for r in rows}) > 1
    seen: set[str] = set()
    kept = []
    for r in rows:
        r.id = f"{r.split}/{r.question_id}" if multi else r.question_id
        if r.id in seen:
            errors.append(RowError(r.file, r.line, f"duplicate question_id {r.question_id} in split {r.split}", r.id))
            continue
        seen.add(r.id)
        kept.append(r)
    return kept, errors


# -------------------------------------------------------------------------------------------------------- metrics
@dataclass
class PopeMetrics:
    """Binary metrics with "yes" positive; ``unparsed`` answers are counted in ``n``."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    unparsed: int
    n: int
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def as_dict(self, counts: bool = False) -> dict:
        d = asdict(self)
        if not counts:
            for k in ("tp", "fp", "tn", "fn"):
                d.pop(k)
        return d


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def binary_metrics(preds: Iterable[str | None], labels: Iterable[str]) -> PopeMetrics:
    """Metrics for paired predictions ("yes"/"no"/None) and labels ("yes"/"no")."""
    tp = fp = tn = fn = unparsed = yes = n = 0
    for p, y in zip(preds, labels, strict=True):
        n += 1
        if p is None:
            unparsed += 1
        yes += p == "yes"
        if y == "yes":
            tp += p == "yes"
            fn += p != "yes"
        else:
            fp += p == "yes"
            tn += p == "no"
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    return PopeMetrics(accuracy=_div(tp + tn, n), precision=precision, recall=recall,
                       f1=_div(2 * precision * recall, precision + recall), yes_ratio=_div(yes, n),
                       unparsed=unparsed, n=n, tp=tp, fp=fp, tn=tn, fn=fn)


def average_metrics(per_split: Mapping[str, PopeMetrics]) -> PopeMetrics:
    """Unweighted mean over splits of the rates; ``n``, ``unparsed`` and the counts are summed."""
    ms = list(per_split.values())
    if not ms:
        return PopeMetrics(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)
    mean = lambda k: sum(getattr(m, k) for m in ms) / len(ms)  # noqa: E731
    total = lambda k: sum(getattr(m, k) for m in ms)  # noqa: E731
    return PopeMetrics(accuracy=mean("accuracy"), precision=mean("precision"), recall=mean("recall"),
                       f1=mean("f1"), yes_ratio=mean("yes_ratio"), unparsed=total("unparsed"), n=total("n"),
                       tp=total("tp"), fp=total("fp"), tn=total("tn"), fn=total("fn"))


@dataclass
class PopeScore:
    """Scores of one rule: ``metrics[split]`` plus ``metrics["average"]``; ``missing`` = rows without an answer."""

    rule: str
    metrics: dict[str, PopeMetrics] = field(default_factory=dict)
    missing: int = 0

    def as_dict(self) -> dict:
        return {k: m.as_dict() for k, m in self.metrics.items()}


def score_pope(rows: Iterable[PopeRow], answers: Mapping[str, str], rule: str = DEFAULT_RULE) -> PopeScore:
    """Score ``answers`` (row id -> model text) against ``rows``; rows without an answer are counted as missing.

    Splits keep the order random, popular, adversarial, then any other split names in order of appearance.
    """
    if rule not in RULE_FUNCS:
        raise InputError(f"unknown POPE scoring rule {rule!r}; choose one of {', '.join(RULES)}")
    by_split: dict[str, tuple[list, list]] = {}
    missing = 0
    for r in rows:
        ans = answers.get(r.id)
        if ans is None:
            missing += 1
            continue
        preds, labels = by_split.setdefault(r.split, ([], []))
        preds.append(parse_answer(ans, rule))
        labels.append(r.label)
    order = [s for s in SPLITS if s in by_split] + [s for s in by_split if s not in SPLITS]
    per = {s: binary_metrics(*by_split[s]) for s in order}
    score = PopeScore(rule=rule, metrics=dict(per), missing=missing)
    score.metrics["average"] = average_metrics(per)
    return score


def score_all_rules(rows: list[PopeRow], answers: Mapping[str, str]) -> dict[str, PopeScore]:
    """Scores under every rule in :data:`RULES`."""
    return {rule: score_pope(rows, answers, rule) for rule in RULES}
