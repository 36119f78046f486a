"""Reports of an eval run: ``results.json``, ``results.md`` and a PNG bar chart (drawn with PIL, no matplotlib).

``results`` is the dict written to ``results.json``; its ``task`` ("pope", "chair", "screenspot") picks the tables.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127)]
POPE_COLUMNS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed", "n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{100 * v:.2f}"
    return "" if v is None else str(v)


def md_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats are shown as percentages with two decimals."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def pope_table(metrics: Mapping[str, Mapping]) -> str:
    """Splits (and "average") x :data:`POPE_COLUMNS`."""
    return md_table(["split", *POPE_COLUMNS], [[s, *(m.get(c) for c in POPE_COLUMNS)] for s, m in metrics.items()])


def chair_table(metrics: Mapping) -> str:
    cols = ("chair_s", "chair_i", "recall", "n", "n_mentions", "n_hallucinated")
    return md_table(list(cols), [[metrics.get(c) for c in cols]])


def screenspot_table(metrics: Mapping) -> str:
    """Rows (platform or group) x ui types with accuracy and counts, then accuracy by target size if scored."""
    table = metrics.get("table", {})
    cols = list(dict.fromkeys(c for r in table.values() for c in r))
    cell = lambda v: f"{100 * v['accuracy']:.2f} ({v['n']})"  # noqa: E731
    rows = [[r, *(cell(v[c]) if c in v else "" for c in cols)] for r, v in table.items()]
    out = md_table([metrics.get("rows", "row"), *cols], rows)
    size = metrics.get("by_size")
    if size and any(size[k]["n"] for k in ("small", "medium", "large")):
        out += ("\n\nBy target size (thirds of the targets ranked by box area; medium from "
                f"{size['cuts'][0]:g}, large from {size['cuts'][1]:g} box units squared):\n\n"
                + md_table(["size", "small", "medium", "large"],
                           [["accuracy", *(cell(size[k]) for k in ("small", "medium", "large"))]]))
    return out


def summary_table(results: Mapping) -> str:
    """The main table of a run (the default scoring rule for POPE)."""
    task = results.get("task")
    if task == "pope":
        return pope_table(results["metrics"])
    if task == "chair":
        return chair_table(results["metrics"])
    if task == "screenspot":
        return screenspot_table(results["metrics"])
    return "```\n" + json.dumps(results.get("metrics"), indent=1) + "\n```"


def markdown(results: Mapping) -> str:
    """The full ``results.md``: header, main table, other scoring rules, failures."""
    lines = [f"# {results.get('task', 'eval')} -- {results.get('model', '?')}", ""]
    meta = [("method", results.get("method")), ("method_args", json.dumps(results.get("method_args") or {})),
            ("scoring_rule", results.get("scoring_rule")), ("generation", json.dumps(results.get("generation"))),
            ("data", results.get("data")), ("rows", results.get("n_items")), ("failed rows", results.get("n_failed")),
            ("questions/s", results.get("questions_per_s"))]
    lines += [f"- **{k}**: {v}" for k, v in meta if v is not None]
    if results.get("prompt"):
        lines += ["", "Prompt (first row, exactly as given to the model):", "", "```", str(results["prompt"]), "```"]
    lines += ["", summary_table(results), ""]
    for rule, m in (results.get("metrics_by_rule") or {}).items():
        if rule != results.get("scoring_rule"):
            lines += [f"### rule `{rule}`", "", pope_table(m), ""]
    errors = results.get("errors") or []
    if errors:
        lines += [f"### {len(errors)} failed rows", ""] + [f"- {e}" for e in errors[:50]]
        if len(errors) > 50:
            lines.append(f"- ... {len(errors) - 50} more in results.json")
    versions = results.get("versions") or {}
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(lines) + "\n"


def chart_series(results: Mapping) -> tuple[str, dict[str, dict[str, float]]]:
    """(title, ``{group: {bar: value in [0, 1]}}``) for the chart of a run."""
    task, m = results.get("task"), results.get("metrics", {})
    model = results.get("model", "")
    if task == "pope":
        keep = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        return (f"POPE ({results.get('scoring_rule')}) -- {model}",
                {s: {k: v[k] for k in keep} for s, v in m.items()})
    if task == "chair":
        return f"CHAIR -- {model}", {"captions": {k: m[k] for k in ("chair_s", "chair_i", "recall")}}
    if task == "screenspot":
        return (f"ScreenSpot accuracy -- {model}",
                {r: {c: v["accuracy"] for c, v in cols.items()} for r, cols in m.get("table", {}).items()})
    return str(task), {}


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def bar_chart(path: str | Path, title: str, groups: Mapping[str, Mapping[str, float]]) -> Path:
    """Grouped bar chart of values in [0, 1] (y axis 0..100%), saved as PNG."""
    from PIL import Image, ImageDraw

    bars = list(dict.fromkeys(b for g in groups.values() for b in g))
    bw, gap, left, top, plot_h = 18, 26, 56, 64, 260
    width = max(420, left + 20 + len(groups) * (len(bars) * bw + gap))
    img = Image.new("RGB", (width, top + plot_h + 60), "white")
    d = ImageDraw.Draw(img)
    f, fs = _font(14), _font(11)
    d.text((left, 10), title, fill="black", font=f)
    x = left
    for i, b in enumerate(bars):  # legend
        d.rectangle([x, 36, x + 10, 46], fill=_PALETTE[i % len(_PALETTE)])
        d.text((x + 14, 34), b, fill="black", font=fs)
        x += 24 + int(d.textlength(b, font=fs))
    y0 = top + plot_h
    for k in range(5):
        y = y0 - k * plot_h / 4
        d.line([left, y, width - 10, y], fill=(225, 225, 225))
        d.text((8, y - 7), f"{25 * k}%", fill="black", font=fs)
    d.line([left, top, left, y0], fill="black")
    d.line([left, y0, width - 10, y0], fill="black")
    x = left + gap // 2
    for g, vals in groups.items():
        for i, b in enumerate(bars):
            v = vals.get(b)
            if v is not None and not math.isnan(v):
                h = max(0.0, min(1.0, float(v))) * plot_h
                d.rectangle([x + i * bw, y0 - h, x + (i + 1) * bw - 3, y0], fill=_PALETTE[i % len(_PALETTE)])
        cx = x + len(bars) * bw / 2
        d.text((cx - d.textlength(g, font=fs) / 2, y0 + 8), g, fill="black", font=fs)
        x += len(bars) * bw + gap
    p = Path(path)
    img.save(p)
    return p


def write_report(out_dir: str | Path, results: Mapping) -> dict[str, Path]:
    """Write ``results.json`` (atomically), ``results.md`` and ``results.png``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    title, groups = chart_series(results)
    paths = {"json": out / "results.json", "md": out / "results.md"}
    if groups:
        paths["png"] = bar_chart(out / "results.png", title, groups)
    return paths
