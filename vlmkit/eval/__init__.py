"""Evaluation harness: POPE, CHAIR and ScreenSpot scoring on local data, a resumable batched runner, reports.

Submodules: :mod:`~vlmkit.eval.pope`, :mod:`~vlmkit.eval.chair`, :mod:`~vlmkit.eval.screenspot` (loading and scoring,
no model needed), :mod:`~vlmkit.eval.runner` (generation), :mod:`~vlmkit.eval.report` (results.json/md/png),
:mod:`~vlmkit.eval.cli` (``vlmkit eval ...`` / ``vlmkit data pope|chair``).
"""

from vlmkit.eval.chair import ChairScore, score_chair
from vlmkit.eval.pope import RULES, PopeMetrics, PopeRow, RowError, load_pope, parse_answer, score_all_rules, score_pope
from vlmkit.eval.runner import EvalItem, RunResult, run, run_items
from vlmkit.eval.screenspot import load_screenspot, parse_click, point_in_box, score_screenspot

__all__ = ["RULES", "ChairScore", "EvalItem", "PopeMetrics", "PopeRow", "RowError", "RunResult", "load_pope",
           "load_screenspot", "parse_answer", "parse_click", "point_in_box", "run", "run_items", "score_all_rules",
           "score_chair", "score_pope", "score_screenspot"]
