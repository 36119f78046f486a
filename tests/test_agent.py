"""Agent loop on generated screens: task generation, follow-up screens, environment, run/dry-run, report, CLI."""

import argparse
import json

import numpy as np
import pytest

from vlmkit import agent
from vlmkit.data import gui
from vlmkit.default import CHECKPOINT_DIR
from vlmkit.errors import InputError


class Fixed:
    """A grounder that always clicks the same pixel."""

    def __init__(self, x=0.0, y=0.0):
        self.point = (x, y)

    def ground(self, image, instruction):
        return agent.Point(self.point, "fixed")


@pytest.fixture(scope="module")
def tasks():
    return agent.make_tasks(6, seed=3)  # two per platform


def test_task_generation_is_deterministic_and_seed_dependent(tasks):
    a, b = agent.make_task(7), agent.make_task(7)
    assert (a.steps, a.boxes, a.names, a.platform, a.template) == (b.steps, b.boxes, b.names, b.platform, b.template)
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a.screens, b.screens))
    c = agent.make_task(8)
    assert (c.steps, c.boxes) != (a.steps, a.boxes)
    assert {t.platform for t in tasks} == set(gui.PLATFORMS)
    assert all(t.template >= gui.TRAIN_TEMPLATES for t in tasks)  # held-out layouts by default
    assert all(len(t.steps) == len(t.boxes) == len(t.screens) == 2 and ", then " in t.instruction for t in tasks)
    assert agent.make_task(7, templates=[0]).template == 0
    with pytest.raises(InputError, match="templates"):
        agent.make_task(1, templates="bogus")
    with pytest.raises(InputError, match="n_steps"):
        agent.make_task(1, n_steps=0)


def test_followup_screen_differs_and_its_targets_are_inside_and_new(tasks):
    for t in tasks:
        first, second = t.screens
        assert first.image.size == second.image.size == gui.SIZES[t.platform]
        diff = np.abs(np.asarray(first.image, np.int16) - np.asarray(second.image, np.int16)).sum(-1)
        assert (diff > 0).mean() > 0.2  # dimmed + a dialog
        W, H = second.image.size
        names = [x.name.lower() for x in second.targets]
        assert len(names) == len(set(names)) and second.targets
        assert not set(names) & {x.name.lower() for x in first.targets}  # nothing ambiguous with the dimmed screen
        for x in second.targets:
            x1, y1, x2, y2 = x.box
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H and min(x2 - x1, y2 - y1) >= gui.MIN_SIDE, x
        # the step boxes are targets of the screens they are taken on
        for screen, box in zip(t.screens, t.boxes):
            assert box in [x.box for x in screen.targets]
        assert t.names[0] in {x.name for x in first.targets if x.role in agent.OPENER_ROLES}
    s, tg = tasks[0].screens[0], tasks[0].screens[0].targets[0]
    assert agent.render_followup(s, tg, 1).image.tobytes() == agent.render_followup(s, tg, 1).image.tobytes()


def test_env_advances_only_on_a_click_inside_the_box(tasks):
    t = tasks[1]
    env = agent.Env(t)
    x1, y1, x2, y2 = t.boxes[0]
    assert not env.click(x2 + 0.5, y2 + 0.5) and env.screen is t.screens[0] and env.index == 0
    assert env.click(x1, y1) and env.screen is t.screens[1]
    x1, y1, x2, y2 = t.boxes[1]
    assert env.click((x1 + x2) / 2, (y1 + y2) / 2) and env.done
    with pytest.raises(InputError, match="done"):
        env.click(0, 0)


def test_oracle_succeeds_on_every_task_and_writes_a_trace(tasks, tmp_path):
    rep = agent.run_agent(tasks, agent.OracleGrounder(tasks), out=tmp_path)
    assert rep.success_rate == 1.0 and rep.step_accuracy == [1.0, 1.0] and rep.attempts == [6, 6]
    rows = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["success"] and len(r["steps"]) == 2 for r in rows)
    a = rows[0]["steps"][0]["action"]
    assert set(a) == {"action", "x", "y"} and a["action"] == "click" and isinstance(a["x"], int)


def test_clicking_the_corner_fails_at_step_one(tasks):
    tr = agent.run_task(tasks[0], Fixed(0, 0))
    assert tr.success is False and tr.failed_at == 0 and len(tr.steps) == 1 and tr.steps[0].hit is False
    rep = agent.summarize([tr, agent.run_task(tasks[1], agent.OracleGrounder(tasks))])
    assert rep.success_rate == 0.5 and rep.step_accuracy == [0.5, 1.0] and rep.attempts == [2, 1]


def test_dry_run_prints_actions_and_checks_nothing(tasks, capsys):
    tr = agent.run_task(tasks[2], Fixed(3, 4), dry_run=True)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and tr.success is None and tr.dry_run and all(s.hit is None for s in tr.steps)
    assert json.loads(lines[0].split(": ", 1)[1]) == {"action": "click", "x": 3, "y": 4}
    assert agent.summarize([tr]).success_rate is None


def test_grounding_result_action_is_used(tasks):
    from vlmkit.grounding.v2p import GroundingResult

    r = GroundingResult((10.4, 20.6), [(10.4, 20.6, 1.0)], np.zeros((2, 2), np.float32), "pointer-head", (2, 2))
    assert agent.to_action(r) == {"action": "click", "x": 10, "y": 21}
    assert agent.to_action(agent.Point((1.6, 2.2), "x")) == {"action": "click", "x": 2, "y": 2}

    class Bad:
        def ground(self, image, instruction):
            return type("R", (), {"action": lambda self: {"action": "scroll"}})()

    with pytest.raises(InputError, match="click"):
        agent.run_task(tasks[0], Bad())


def test_agent_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    agent.add_parsers(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["agent", "--tasks", "3", "--grounder", "oracle", "--out", str(tmp_path), "--screens"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "success 1.000 over 3 tasks" in out and "step 2 1.000" in out
    assert len((tmp_path / "trace.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "summary.json").read_text())["success_rate"] == 1.0
    assert len(list(tmp_path.glob("task_*.png"))) == 3
    args = parser.parse_args(["agent", "--tasks", "2", "--grounder", "random", "--dry-run"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.count('{"action": "click"') == 4 and "success -" in out


@pytest.mark.skipif(not (CHECKPOINT_DIR / "config.json").is_file(), reason="default checkpoint not shipped yet")
def test_default_grounder_runs_two_tasks():
    from vlmkit.grounding import v2p

    ts = agent.make_tasks(2, seed=11)
    rep = agent.run_agent(ts, v2p.default_grounder())
    assert rep.n_tasks == 2 and rep.attempts[0] == 2 and rep.success_rate in (0.0, 0.5, 1.0)
    for t, tr in zip(ts, rep.traces):
        W, H = t.screens[0].image.size
        for s in tr.steps:
            assert 0 <= s.action["x"] <= W and 0 <= s.action["y"] <= H
            assert s.source in ("pointer-head", "attention")
