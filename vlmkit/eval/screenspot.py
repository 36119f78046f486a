"""ScreenSpot (v1, v2, Pro): loading annotation files, parsing click outputs, point-in-box scoring, tables.

Boxes are kept as ``(x1, y1, x2, y2)`` in the file's units (``"px"`` or ``"norm"`` = fractions of the image size);
scoring compares everything in normalised [0, 1] space with inclusive bounds, as the official evaluators do.
Outputs that yield no point count as wrong ("wrong_format").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from vlmkit.errors import InputError
from vlmkit.eval.pope import RowError

DATASETS = ("v1", "v2", "pro")
BOX_FORMATS = ("xywh_px", "xyxy_px", "xywh_norm", "xyxy_norm")
POINT_UNITS = ("auto", "px", "norm", "norm1000")
PLATFORMS = ("mobile", "desktop", "web")
PRO_GROUPS = ("Dev", "Creative", "CAD", "Scientific", "Office", "OS")
UI_TYPES = ("text", "icon")
_SOURCE_PLATFORM = {"ios": "mobile", "android": "mobile", "macos": "desktop", "windows": "desktop",
                    "tool": "web", "shop": "web", "forum": "web", "gitlab": "web"}


@dataclass
class ScreenSpotSample:
    """One grounding instruction. ``box`` = (x1, y1, x2, y2) in ``units``; ``image_size`` = (W, H) if known."""

    id: str
    image: str
    instruction: str
    box: tuple[float, float, float, float]
    units: str
    ui_type: str
    platform: str = ""
    group: str = ""
    application: str = ""
    data_source: str = ""
    image_size: tuple[int, int] | None = None
    file: str = ""
    line: int = 0

    def norm_box(self, size: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
        """The box in [0, 1] coordinates; pixel boxes need the image size (W, H)."""
        if self.units == "norm":
            return self.box
        w, h = size or self.image_size or (0, 0)
        if not w or not h:
            raise InputError(f"{self.file}:{self.line}: image size unknown for pixel box of sample {self.id}")
        x1, y1, x2, y2 = self.box
        return (x1 / w, y1 / h, x2 / w, y2 / h)


@dataclass
class ScreenSpotFormat:
    """What a file holds: ``dataset`` in :data:`DATASETS`, ``box`` in :data:`BOX_FORMATS`."""

    dataset: str
    box: str


# --------------------------------------------------------------------------------------------- format detection
def _is_pro(records: list[dict]) -> bool:
    keys = set().union(*(r.keys() for r in records[:20])) if records else set()
    return bool(keys & {"group", "ui_type", "img_size", "application"})


def _overflows_as_xywh(rec: dict) -> bool:
    """True when ``bbox`` read as [x, y, w, h] would leave the image given by ``img_size``."""
    b, size = rec.get("bbox"), rec.get("img_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and isinstance(b, (list, tuple)) and len(b) == 4):
        return False
    return b[0] + b[2] > size[0] + 1 or b[1] + b[3] > size[1] + 1


def detect_format(records: list[dict], filename: str = "", dataset: str = "auto",
                  box_format: str = "auto") -> ScreenSpotFormat:
    """Decide dataset and box convention of one annotation file; explicit values override detection.

    Dataset: Pro if rows carry ``group``/``ui_type``/``img_size``/``application``, v2 if the file name says
    ``v2``, else v1. Box units: normalised if every coordinate lies in [0, 1]. Convention: a box whose third value is
    below its first (or fourth below second) can only be ``[x, y, w, h]``; a pixel box that would overflow a known
    ``img_size`` as ``[x, y, w, h]`` is ``[x1, y1, x2, y2]``; otherwise the dataset's convention (v1/v2 pixel
    ``xywh``, Pro ``xyxy``, normalised mirrors ``xyxy``).
    """
    if dataset not in ("auto", *DATASETS):
        raise InputError(f"unknown ScreenSpot dataset {dataset!r}; choose auto, {', '.join(DATASETS)}")
    if box_format not in ("auto", *BOX_FORMATS):
        raise InputError(f"unknown box format {box_format!r}; choose auto, {', '.join(BOX_FORMATS)}")
    if dataset == "auto":
        dataset = "pro" if _is_pro(records) else ("v2" if re.search(r"v2", Path(filename).stem, re.I) else "v1")
    if box_format != "auto":
        return ScreenSpotFormat(dataset, box_format)
    boxes = [r["bbox"] for r in records if isinstance(r.get("bbox"), (list, tuple)) and len(r["bbox"]) == 4]
    vals = [float(v) for b in boxes for v in b if isinstance(v, (int, float))]
    units = "norm" if vals and all(0.0 <= v <= 1.0 for v in vals) else "px"
    if any(b[2] < b[0] or b[3] < b[1] for b in boxes):
        conv = "xywh"
    elif units == "px" and any(_overflows_as_xywh(r) for r in records):
        conv = "xyxy"
    elif units == "norm":
        conv = "xyxy"
    else:
        conv = "xyxy" if dataset == "pro" else "xywh"
    return ScreenSpotFormat(dataset, f"{conv}_{units}")


# ---------------------------------------------------------------------------------------------------- loading
def _platform_of(rec: dict, fmt: ScreenSpotFormat, filename: str) -> str:
    if fmt.dataset == "pro":
        return str(rec.get("platform", ""))
    if rec.get("platform"):
        return str(rec["platform"]).lower()
    for tok in re.split(r"[^a-z]+", Path(filename).stem.lower()):
        if tok in PLATFORMS:
            return tok
    return _SOURCE_PLATFORM.get(str(rec.get("data_source", "")).lower(), "")


def _sample(rec: Any, idx: int, f: Path, fmt: ScreenSpotFormat) -> ScreenSpotSample:
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    image = rec.get("img_filename", rec.get("image", rec.get("file_name")))
    bbox = rec.get("bbox")
    instr = rec.get("instruction")
    if not image or not isinstance(image, str):
        raise ValueError("missing 'img_filename'")
    if not isinstance(instr, str) or not instr.strip():
        raise ValueError("missing 'instruction'")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise ValueError(f"'bbox' must be four numbers, got {bbox!r}")
    a, b, c, d = (float(v) for v in bbox)
    conv, units = fmt.box.split("_")
    box = (a, b, a + c, b + d) if conv == "xywh" else (a, b, c, d)
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"'bbox' {list(bbox)} is not a valid {conv} box")
    ui = str(rec.get("ui_type", rec.get("data_type", ""))).lower()
    size = rec.get("img_size")
    size = (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) and len(size) == 2 else None
    ident = rec.get("id")
    return ScreenSpotSample(id=f"{f.stem}/{ident if ident is not None else idx}", image=image, instruction=instr,
                            box=box, units=units, ui_type=ui, platform=_platform_of(rec, fmt, f.name),
                            group=str(rec.get("group", "")), application=str(rec.get("application", "")),
                            data_source=str(rec.get("data_source", "")), image_size=size, file=str(f), line=idx)


def load_screenspot_file(path: str | Path, dataset: str = "auto", box_format: str = "auto"
                         ) -> tuple[list[ScreenSpotSample], list[RowError], ScreenSpotFormat]:
    """Load one annotation file (a JSON array, or JSON lines); ``line`` of each sample is its 1-based item index."""
    f = Path(path)
    text = f.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else None
    except json.JSONDecodeError as e:
        raise InputError(f"{f}: not valid JSON ({e})") from e
    errors: list[RowError] = []
    if records is None:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    records.append(None)
                    errors.append(RowError(str(f), n, f"malformed JSON: {e}"))
    fmt = detect_format([r for r in records if isinstance(r, dict)], f.name, dataset, box_format)
    samples = []
    for i, rec in enumerate(records, start=1):
        if rec is None:
            continue
        try:
            samples.append(_sample(rec, i, f, fmt))
        except ValueError as e:
            errors.append(RowError(str(f), i, str(e)))
    return samples, errors, fmt


def load_screenspot(data: str | Path, dataset: str = "auto", box_format: str = "auto"
                    ) -> tuple[list[ScreenSpotSample], list[RowError], dict[str, ScreenSpotFormat]]:
    """Load a file or a directory of annotation files (a Pro root with ``annotations/`` works too)."""
    path = Path(data)
    if path.is_dir() and (path / "annotations").is_dir():
        path = path / "annotations"
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".jsonl"))
        if not files:
            raise InputError(f"{path}: no ScreenSpot .json annotation files here")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"ScreenSpot data {path} does not exist")
    samples, errors, formats = [], [], {}
    for f in files:
        s, e, fmt = load_screenspot_file(f, dataset, box_format)
        samples += s
        errors += e
        formats[f.name] = fmt
    return samples, errors, formats


def default_images_dir(data: str | Path) -> Path:
    """Where the screenshots usually sit next to the annotations (``screenspot_imgs/``, ``images/``)."""
    p = Path(data)
    base = p if p.is_dir() else p.parent
    for cand in (base / "screenspot_imgs", base / "images", base.parent / "images", base.parent / "screenspot_imgs"):
        if cand.is_dir():
            return cand
    return base


# ---------------------------------------------------------------------------------------------------- parsing
_N = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)%?"
_TAG = re.compile(r"<(bbox|box|point|\|box_start\|)>(.*?)<(?:/(?:bbox|box|point)|\|box_end\|)>", re.S | re.I)
_KV = re.compile(rf"\bx\s*[=:]\s*({_N})\s*[,;]?\s*y\s*[=:]\s*({_N})", re.I)
_TWO_PAIRS = re.compile(rf"[\[(]\s*({_N})\s*,\s*({_N})\s*[\])]\s*(?:,|to|-|and)?\s*[\[(]\s*({_N})\s*,\s*({_N})\s*[\])]")
_GROUP = re.compile(r"[\[(]([^\[\]()]*)[\])]")
_NUMS = re.compile(_N)


@dataclass
class ParsedClick:
    """A parsed output: the raw numbers (2 for a point, 4 for a box) and whether they were percentages."""

    values: tuple[float, ...]
    kind: str  # "point" | "box"
    percent: bool = False

    @property
    def point(self) -> tuple[float, float]:
        v = self.values
        return (v[0], v[1]) if self.kind == "point" else ((v[0] + v[2]) / 2, (v[1] + v[3]) / 2)


def _nums(tokens: Iterable[str]) -> tuple[tuple[float, ...], bool]:
    toks = list(tokens)
    pct = any(t.endswith("%") for t in toks)
    return tuple(float(t.rstrip("%")) / (100.0 if t.endswith("%") else 1.0) for t in toks), pct


def _click(tokens: list[str]) -> ParsedClick | None:
    vals, pct = _nums(tokens)
    if len(vals) == 2:
        return ParsedClick(vals, "point", pct)
    if len(vals) == 4:
        return ParsedClick(vals, "box", pct)
    return None


def parse_click(output: Any) -> ParsedClick | None:
    """Parse a model output into a point or box; ``None`` when nothing usable is found.

    Accepted: a sequence of 2/4 numbers or a ``{"x", "y"}`` dict (grounding heads); text with ``<bbox>…</bbox>``
    (or ``<box>``, ``<point>``, ``<|box_start|>…<|box_end|>``), ``x=…, y=…`` (``pyautogui.click(x=…, y=…)``),
    ``(x1, y1), (x2, y2)``, the first ``[…]``/``(…)`` holding 2 or 4 numbers, exactly four bare numbers (a box),
    else the first two numbers. Numbers may end in ``%``.
    """
    if isinstance(output, Mapping):
        if "x" in output and "y" in output:
            return ParsedClick((float(output["x"]), float(output["y"])), "point")
        for k in ("point", "bbox", "box"):
            if k in output:
                return parse_click(output[k])
        return None
    if isinstance(output, (list, tuple)) and output and all(isinstance(v, (int, float)) for v in output):
        return _click([str(float(v)) for v in output])
    if not isinstance(output, str):
        return None
    m = _TAG.search(output)
    if m:
        got = _click(_NUMS.findall(m.group(2)))
        if got:
            return got
    m = _KV.search(output)
    if m:
        return _click([m.group(1), m.group(2)])
    m = _TWO_PAIRS.search(output)
    if m:
        return _click(list(m.groups()))
    for g in _GROUP.finditer(output):
        inner = g.group(1)
        if re.fullmatch(rf"\s*{_N}(?:\s*[,\s]\s*{_N})*\s*", inner):
            got = _click(_NUMS.findall(inner))
            if got:
                return got
    nums = _NUMS.findall(output)
    if len(nums) == 4:
        return _click(nums)
    return _click(nums[:2]) if len(nums) >= 2 else None


def normalise_click(click: ParsedClick, size: tuple[int, int] | None, units: str = "auto") -> tuple[float, float]:
    """The click point in [0, 1] coordinates.

    ``units``: ``"auto"`` (all values in [0, 1] -> normalised, else pixels), ``"px"``, ``"norm"``, ``"norm1000"``
    (Qwen-style 0..1000 grid). Percent values are always normalised. Pixels need ``size`` = (W, H).
    """
    if units not in POINT_UNITS:
        raise InputError(f"unknown point units {units!r}; choose {', '.join(POINT_UNITS)}")
    x, y = click.point
    if click.percent or units == "norm":
        return (x, y)
    if units == "norm1000":
        return (x / 1000.0, y / 1000.0)
    if units == "auto" and all(0.0 <= v <= 1.0 for v in click.values):
        return (x, y)
    if not size or not size[0] or not size[1]:
        raise InputError("a pixel click needs the image size (W, H)")
    return (x / size[0], y / size[1])


def _click_is_px(click: ParsedClick, units: str) -> bool:
    if click.percent or units in ("norm", "norm1000"):
        return False
    return units == "px" or not all(0.0 <= v <= 1.0 for v in click.values)


def point_in_box(point: tuple[float, float], box: tuple[float, float, float, float]) -> bool:
    """Inclusive test ``x1 <= x <= x2 and y1 <= y <= y2`` (same coordinate space for both)."""
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass
class ClickResult:
    """Outcome of one sample: ``status`` is "ok", "wrong_format" or "no_image"; ``point`` is normalised."""

    correct: bool
    status: str
    point: tuple[float, float] | None = None


@dataclass
class ScreenSpotScore:
    """Overall accuracy, counts, per-sample results, the breakdown ``table[row][col] = {accuracy, n}`` and
    ``by_size`` (:func:`size_thirds`)."""

    accuracy: float
    n: int
    wrong_format: int
    missing: int
    results: dict[str, ClickResult] = field(default_factory=dict)
    table: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    row_key: str = "platform"
    by_size: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"overall": {"accuracy": self.accuracy, "n": self.n, "wrong_format": self.wrong_format},
                "table": self.table, "rows": self.row_key, "by_size": self.by_size}


def image_size(sample: ScreenSpotSample, images_dir: str | Path | None = None) -> tuple[int, int]:
    """(W, H) from the annotation, else read from the image header."""
    if sample.image_size:
        return sample.image_size
    from PIL import Image

    path = Path(images_dir or "") / sample.image
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise InputError(f"{sample.file}:{sample.line}: cannot read image {path} ({e})") from e


def breakdown(samples: Iterable[ScreenSpotSample], correct: Mapping[str, bool], row_key: str
              ) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy by ``row_key`` (platform or group) x ui type, with "average" columns and an "overall" row."""
    cells: dict[tuple[str, str], list[int]] = {}
    for s in samples:
        if s.id not in correct:
            continue
        row = getattr(s, row_key) or "unknown"
        for key in ((row, s.ui_type), (row, "average"), ("overall", s.ui_type), ("overall", "average")):
            c = cells.setdefault(key, [0, 0])
            c[0] += bool(correct[s.id])
            c[1] += 1
    known = PRO_GROUPS if row_key == "group" else PLATFORMS
    rows = [r for r in known if any(k[0] == r for k in cells)]
    rows += sorted({k[0] for k in cells} - set(rows) - {"overall"}) + ["overall"]
    cols = [c for c in UI_TYPES if any(k[1] == c for k in cells)]
    cols += sorted({k[1] for k in cells} - set(cols) - {"average"}) + ["average"]
    table = {}
    for r in rows:
        table[r] = {c: {"accuracy": cells[(r, c)][0] / cells[(r, c)][1], "n": cells[(r, c)][1]}
                    for c in cols if (r, c) in cells}
    return table


def size_thirds(samples: Iterable[ScreenSpotSample], correct: Mapping[str, bool]) -> dict:
    """Accuracy by thirds of the scored targets ranked by box area (small / medium / large; ties split by id).

    ``cuts`` = the smallest area of the medium and of the large third, in the boxes' units squared.
    """
    area = lambda s: (s.box[2] - s.box[0]) * (s.box[3] - s.box[1])  # noqa: E731
    ranked = sorted((s for s in samples if s.id in correct), key=lambda s: (area(s), s.id))
    n = len(ranked)
    bins = {"small": ranked[:n // 3], "medium": ranked[n // 3:2 * n // 3], "large": ranked[2 * n // 3:]}
    cuts = [area(bins[k][0]) if bins[k] else 0 for k in ("medium", "large")]
    return {"cuts": cuts, **{k: {"accuracy": sum(bool(correct[s.id]) for s in v) / len(v) if v else 0.0,
                                 "n": len(v)} for k, v in bins.items()}}


def score_screenspot(samples: list[ScreenSpotSample], outputs: Mapping[str, Any],
                     images_dir: str | Path | None = None, units: str = "auto",
                     row_key: str | None = None) -> ScreenSpotScore:
    """Score outputs (sample id -> text, point or box) by point-in-box; missing outputs are excluded from ``n``.

    ``row_key`` defaults to "group" when samples carry groups (Pro), else "platform".
    """
    results: dict[str, ClickResult] = {}
    for s in samples:
        if s.id not in outputs:
            continue
        click = parse_click(outputs[s.id])
        if click is None:
            results[s.id] = ClickResult(False, "wrong_format")
            continue
        try:
            size = image_size(s, images_dir) if s.units == "px" or _click_is_px(click, units) else None
        except InputError:
            results[s.id] = ClickResult(False, "no_image")
            continue
        pt = normalise_click(click, size, units)
        results[s.id] = ClickResult(point_in_box(pt, s.norm_box(size)), "ok", pt)
    row_key = row_key or ("group" if any(s.group for s in samples) else "platform")
    n = len(results)
    hits = sum(r.correct for r in results.values())
    correct = {k: r.correct for k, r in results.items()}
    return ScreenSpotScore(accuracy=hits / n if n else 0.0, n=n,
                           wrong_format=sum(r.status == "wrong_format" for r in results.values()),
                           missing=len(samples) - n, results=results, row_key=row_key,
                           table=breakdown(samples, correct, row_key), by_size=size_thirds(samples, correct))
