"""A minimal GUI agent loop on generated screens: ground each instruction, click, let the screen change.

A :class:`Task` is a chain of screens made with :mod:`vlmkit.data.gui`: the first screen is a generated screenshot
(by default a held-out layout template); step 1 names an opener on it (an icon, a menu or a button, e.g. "open
settings"); clicking inside that element's box brings up a deterministic follow-up screen — the previous screen
dimmed behind a modal dialog (a bottom sheet on mobile) titled after the clicked element, with its own checkboxes,
buttons and maybe a close icon — and step 2 names an element of the dialog ("toggle Dark mode"). A click outside
the step's box leaves the screen as it was and the task fails at that step.

``run_task(task, grounder)`` asks ``grounder.ground(image, instruction)`` (a
:class:`vlmkit.grounding.v2p.GroundingResult`-like object with ``.point`` and optionally ``.action()``) for a
pyautogui-style action ``{"action": "click", "x": int, "y": int}`` per step. ``dry_run=True`` prints the actions
(each grounded on the screen the step is meant to be taken on) and checks nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from vlmkit.data import gui, gui_layouts
from vlmkit.errors import InputError

SEED_BASE = 10**9  # screen seeds of agent tasks; the pointer head's training screens use (seed+1000)*100003+i
OPENER_ROLES = ("icon", "menu", "button")
TITLES = {"settings": "Settings", "user": "Profile", "bell": "Notifications", "mail": "Mail", "lock": "Security",
          "wifi": "Network", "menu": "Menu", "calendar": "Calendar", "folder": "Files", "cloud": "Cloud"}
DIALOG_BOX = {"mobile": (0, 150, 192, 384), "desktop": (80, 44, 400, 272), "web": (42, 44, 342, 272)}


@dataclass
class Task:
    """Steps (instructions), the box (x1, y1, x2, y2) px each click must land in, and ``screens[i]`` = the screen
    shown when step ``i`` is taken (all screens of one task have the same size)."""

    seed: int
    platform: str
    template: int
    steps: list[str]
    boxes: list[tuple[int, int, int, int]]
    names: list[str]
    screens: list[gui.Screen] = field(repr=False)

    @property
    def instruction(self) -> str:
        return ", then ".join(self.steps)


@dataclass
class Step:
    """One step's outcome: the action taken and whether it landed in the box (``None`` in a dry run)."""

    index: int
    instruction: str
    action: dict
    box: tuple[int, int, int, int]
    hit: bool | None
    source: str = ""


@dataclass
class Trace:
    """One task's run: ``success`` (``None`` in a dry run), ``failed_at`` = index of the missed step or ``None``."""

    seed: int
    platform: str
    template: int
    instruction: str
    steps: list[Step]
    success: bool | None
    failed_at: int | None = None
    dry_run: bool = False
    n_steps: int = 0  # steps of the task (``len(steps)`` is fewer when it failed early)


@dataclass
class AgentReport:
    """``success_rate`` over tasks; ``step_accuracy[i]`` = hits / attempts at step ``i`` (a step is attempted only
    when all earlier ones hit); ``attempts[i]`` the number of attempts."""

    n_tasks: int
    success_rate: float | None
    step_accuracy: list[float | None]
    attempts: list[int]
    traces: list[Trace] = field(repr=False)


# ------------------------------------------------------------------------------------------------- screens
def inside(x: float, y: float, box) -> bool:
    x1, y1, x2, y2 = box
    return x1 <= x < x2 and y1 <= y < y2


def render_followup(screen: gui.Screen, target: gui.Target, seed: int, avoid: set[str] = frozenset()) -> gui.Screen:
    """The screen after clicking ``target`` on ``screen``: ``screen`` dimmed behind a dialog titled after the target
    (:func:`vlmkit.data.gui_layouts.dialog` at :data:`DIALOG_BOX`).

    The dialog's elements are the new screen's only targets; their names differ from ``target``, from the targets
    of ``screen`` and from ``avoid`` (names still visible from earlier screens). Deterministic in all arguments.
    """
    rng = random.Random(f"agent/followup/{screen.platform}/{screen.template}/{seed}/{target.name}/{target.box}")
    W, H = screen.image.size
    box = DIALOG_BOX.get(screen.platform, (W // 8, H // 8, W - W // 8, H - H // 8))
    title = TITLES.get(target.name, target.name.capitalize()) if target.kind == "icon" else target.name
    out = gui_layouts.dialog(screen, rng, box, title, avoid=set(avoid) | {target.name})
    if not out.targets:
        raise InputError(f"follow-up dialog of {target.name!r} on {screen.platform} has no room for targets")
    return out


def make_task(seed: int, *, platform: str | None = None, templates: str | list[int] = "heldout",
              n_steps: int = 2) -> Task:
    """A deterministic ``n_steps``-step task (the first screen's template from ``templates``: heldout, train, all
    or a list of indices). Every step but the last clicks an opener; the last prefers a checkbox."""
    if n_steps < 1:
        raise InputError(f"n_steps={n_steps}: a task needs at least one step")
    templates = gui.template_indices(templates)
    rng = random.Random(f"agent/task/{seed}")
    platform = platform or gui.PLATFORMS[seed % len(gui.PLATFORMS)]
    template = rng.choice(list(templates))
    screen = gui.render_screen(platform, template, SEED_BASE + seed)
    screens, steps, boxes, names, seen = [], [], [], [], set()
    for i in range(n_steps):
        last = i == n_steps - 1
        pool = [t for t in screen.targets if t.role in OPENER_ROLES] if not last else screen.targets
        if last and rng.random() < 0.6:
            pool = [t for t in screen.targets if t.role == "check"] or pool
        if not pool:
            raise InputError(f"task {seed}: step {i + 1} has nothing to click on {platform} template {template}")
        target = rng.choice(pool)
        screens.append(screen)
        steps.append(gui.instruction_for(target, platform, rng))
        boxes.append(tuple(target.box))
        names.append(target.name)
        seen |= {t.name for t in screen.targets}
        if not last:
            screen = render_followup(screen, target, seed, seen)
    return Task(seed, platform, template, steps, boxes, names, screens)


def make_tasks(n: int, seed: int = 0, **kw) -> list[Task]:
    """``n`` tasks with seeds ``seed * 100_000 + i`` (platforms in turn)."""
    return [make_task(seed * 100_000 + i, **kw) for i in range(n)]


class Env:
    """The task's screen state: :meth:`click` inside the current step's box advances to the next screen."""

    def __init__(self, task: Task) -> None:
        self.task, self.index = task, 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.task.steps)

    @property
    def screen(self) -> gui.Screen:
        return self.task.screens[min(self.index, len(self.task.screens) - 1)]

    def click(self, x: float, y: float) -> bool:
        if self.done:
            raise InputError("the task is already done; no screen to click on")
        hit = inside(x, y, self.task.boxes[self.index])
        self.index += hit
        return hit


# ------------------------------------------------------------------------------------------------- agent
def to_action(result) -> dict:
    """pyautogui-style click from a grounding result (``.action()`` if it has one, else ``.point``)."""
    if hasattr(result, "action"):
        return result.action()
    x, y = result.point
    return {"action": "click", "x": round(x), "y": round(y)}


def run_task(task: Task, grounder, dry_run: bool = False, echo=print) -> Trace:
    """Ground and click each step in turn; stop at the first miss. ``dry_run``: print each step's action (grounded
    on the screen that step is meant for) and check nothing."""
    env, steps, failed = Env(task), [], None
    for i, instruction in enumerate(task.steps):
        screen = task.screens[i] if dry_run else env.screen
        res = grounder.ground(screen.image, instruction)
        action = to_action(res)
        if action.get("action") != "click" or not {"x", "y"} <= set(action):
            raise InputError(f"grounder {type(grounder).__name__} gave {action!r}; expected a click with x, y")
        hit = None if dry_run else env.click(action["x"], action["y"])
        steps.append(Step(i, instruction, action, task.boxes[i], hit, getattr(res, "source", "")))
        if dry_run:
            echo(f"task {task.seed} step {i + 1} {instruction!r}: {json.dumps(action)}")
        elif not hit:
            failed = i
            break
    return Trace(task.seed, task.platform, task.template, task.instruction, steps,
                 None if dry_run else failed is None, failed, dry_run, len(task.steps))


def summarize(traces: list[Trace]) -> AgentReport:
    n = len(traces)
    most = max((max(t.n_steps, len(t.steps)) for t in traces), default=0)
    att = [sum(len(t.steps) > i for t in traces) for i in range(most)]
    hits = [sum(len(t.steps) > i and bool(t.steps[i].hit) for t in traces) for i in range(most)]
    scored = [t for t in traces if t.success is not None]
    rate = sum(t.success for t in scored) / len(scored) if scored else None
    acc = [h / a if a and scored else None for h, a in zip(hits, att)]
    return AgentReport(n, rate, acc, att, traces)


def run_agent(tasks: list[Task] | int, grounder, *, seed: int = 0, dry_run: bool = False, out: str | Path | None = None,
              echo=print, **task_kw) -> AgentReport:
    """Run every task (or ``make_tasks(tasks, seed, **task_kw)``); with ``out`` write ``trace.jsonl`` there."""
    if isinstance(tasks, int):
        tasks = make_tasks(tasks, seed, **task_kw)
    traces = [run_task(t, grounder, dry_run, echo) for t in tasks]
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        with (Path(out) / "trace.jsonl").open("w", encoding="utf-8") as f:
            for t in traces:
                f.write(json.dumps(asdict(t)) + "\n")
    return summarize(traces)


class OracleGrounder:
    """Clicks the centre of the right box: knows every (screen, instruction) of the given tasks."""

    name, source = "oracle", "oracle"

    def __init__(self, tasks: list[Task]) -> None:
        self.boxes = {(_key(s.image), ins): b for t in tasks for s, ins, b in zip(t.screens, t.steps, t.boxes)}

    def ground(self, image, instruction: str):
        box = self.boxes.get((_key(image), instruction))
        if box is None:
            raise InputError(f"oracle: unknown screen/instruction {instruction!r}")
        return Point(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), self.source)


class RandomGrounder:
    """Clicks a uniformly random pixel (chance level)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def ground(self, image, instruction: str):
        W, H = image.size
        return Point((self.rng.uniform(0, W), self.rng.uniform(0, H)), "random")


@dataclass
class Point:
    """A minimal grounding result: ``point`` (x, y) px and who produced it."""

    point: tuple[float, float]
    source: str


def _key(image) -> str:
    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()


def draw_trace(task: Task, trace: Trace) -> Image.Image:
    """The task's screens side by side, each with its step's box (green) and click (red dot)."""
    W, H = task.screens[0].image.size
    canvas = Image.new("RGB", (W * len(task.screens) + 4 * (len(task.screens) - 1), H), (255, 255, 255))
    for i, s in enumerate(task.screens):
        im = s.image.copy()
        d = ImageDraw.Draw(im)
        d.rectangle(task.boxes[i], outline=(0, 200, 0), width=2)
        if i < len(trace.steps):
            a = trace.steps[i].action
            d.ellipse([a["x"] - 4, a["y"] - 4, a["x"] + 4, a["y"] + 4], fill=(230, 0, 0))
        canvas.paste(im, (i * (W + 4), 0))
    return canvas


# ------------------------------------------------------------------------------------------------- CLI
def load_grounder(kind: str, model: str | None = None, head: str | None = None, tasks: list[Task] = (),
                  seed: int = 0):
    """``default`` (pointer head, attention fallback), ``attention`` (no head), ``oracle`` or ``random``."""
    if kind == "oracle":
        return OracleGrounder(list(tasks))
    if kind == "random":
        return RandomGrounder(seed)
    import vlmkit
    from vlmkit.grounding import v2p

    if kind == "attention":
        return v2p.Grounder(vlmkit.load(model), None)
    if kind == "default":
        return v2p.make_grounder(vlmkit.load(model) if model else None, head)
    raise InputError(f"grounder {kind!r}: use default, attention, oracle or random")


def format_report(rep: AgentReport, name: str = "") -> str:
    acc = ", ".join(f"step {i + 1} {a:.3f} ({n})" if a is not None else f"step {i + 1} -"
                    for i, (a, n) in enumerate(zip(rep.step_accuracy, rep.attempts)))
    rate = "-" if rep.success_rate is None else f"{rep.success_rate:.3f}"
    return f"{name + ': ' if name else ''}success {rate} over {rep.n_tasks} tasks; per-step accuracy: {acc}"


def cmd_agent(args: argparse.Namespace) -> int:
    tasks = make_tasks(args.tasks, args.seed, platform=args.platform, templates=args.templates,
                       n_steps=args.steps)
    g = load_grounder(args.grounder, args.model, args.head, tasks, args.seed)
    rep = run_agent(tasks, g, dry_run=args.dry_run, out=args.out)
    print(format_report(rep, getattr(g, "name", args.grounder)))
    if args.out:
        summary = {k: v for k, v in asdict(rep).items() if k != "traces"}
        (Path(args.out) / "summary.json").write_text(json.dumps({**summary, "grounder": args.grounder}, indent=1))
        if args.screens:
            for t, tr in zip(tasks, rep.traces):
                draw_trace(t, tr).save(Path(args.out) / f"task_{t.seed}.png")
        print(f"wrote {Path(args.out) / 'trace.jsonl'}", file=sys.stderr)
    return 0


def add_parsers(subparsers) -> None:
    """Add ``agent``."""
    a = subparsers.add_parser("agent", help="multi-step click tasks on generated screens (ground -> click -> next)")
    a.add_argument("--tasks", type=int, default=50)
    a.add_argument("--steps", type=int, default=2, help="steps per task")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--platform", choices=gui.PLATFORMS, default=None, help="default: platforms in turn")
    a.add_argument("--templates", default="heldout", choices=("heldout", "train", "all"),
                   help="layout templates of the first screen")
    a.add_argument("--grounder", default="default", choices=("default", "attention", "oracle", "random"))
    a.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    a.add_argument("--head", default=None, help="pointer-head directory (default: <checkpoint>-pointer)")
    a.add_argument("--dry-run", action="store_true", help="only print the actions")
    a.add_argument("--out", default=None, help="write trace.jsonl and summary.json here")
    a.add_argument("--screens", action="store_true", help="with --out: also a PNG per task with boxes and clicks")
    a.set_defaults(func=cmd_agent)


if __name__ == "__main__":  # python -m vlmkit.agent ... == vlmkit agent ...
    from vlmkit.cli import main

    sys.exit(main(["agent", *sys.argv[1:]]))
