"""Generated GUI screenshots with grounding instructions, written in the ScreenSpot-v2 annotation format.

A screen is built from a *layout template* (per platform: mobile portrait 192x384, desktop 480x288, web 384x288 px)
filled with window chrome, toolbars, buttons with text labels (:data:`WORDS`), icon buttons (:data:`ICONS`, drawn
with PIL), text fields, checkboxes and menus. Every target is unique on its screen, and its box is at least
``MIN_SIDE`` = 24 px on each side (two 12-px image tokens of the default model when the screenshot is read in
native-resolution tiles, see :mod:`vlmkit.grounding.v2p`).

Templates ``0..TRAIN_TEMPLATES-1`` of each platform are for training, the rest are held out for evaluation;
template :data:`COMPOSED` draws a random arrangement of the same building blocks (:mod:`vlmkit.data.gui_layouts`),
template :data:`DIALOG` a training or composed screen dimmed behind a modal dialog; both for training only.
``build_set(out, ...)`` writes ``screenspot_{platform}_v2.json`` (``img_filename``, ``bbox`` = [x, y, w, h] px,
``instruction``, ``data_type`` in {text, icon}, ``data_source``) and ``screenspot_imgs/*.png``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlmkit.data.gui_icons import ICONS, draw_icon  # noqa: F401 (part of this module's API)
from vlmkit.errors import InputError

PLATFORMS = ("mobile", "desktop", "web")
SIZES = {"mobile": (192, 384), "desktop": (480, 288), "web": (384, 288)}
SOURCES = {"mobile": ("ios", "android"), "desktop": ("macos", "windows"), "web": ("shop", "tool", "forum", "gitlab")}
MIN_SIDE = 24
N_TEMPLATES = 6  # fixed layout templates per platform
TRAIN_TEMPLATES = 4  # templates 0..3 train, 4..5 are held out
COMPOSED = N_TEMPLATES  # template index of composed (random) layouts, training only: see gui_layouts.py
DIALOG = N_TEMPLATES + 1  # template index of screens behind a modal dialog, training only: see gui_layouts.py

WORDS = ("Save", "Open", "Cancel", "Delete", "Edit", "Send", "Print", "Submit", "Next", "Back", "Done", "Apply",
         "Copy", "Paste", "Undo", "Redo", "Export", "Import", "Upload", "Reply", "Archive", "Filter", "Sort", "Add",
         "Remove", "Rename", "Preview", "Publish", "Sync", "Install", "Update", "Connect", "Buy", "Login", "Logout",
         "Sign up", "Help", "About", "Browse", "Continue", "Skip", "Retry", "Accept", "Decline", "Invite", "Follow",
         "Subscribe", "Checkout", "Compare", "Zoom")
FIELDS = ("Email", "Password", "Username", "Address", "City", "Comment", "Title", "Amount", "Coupon", "Query")
CHECKS = ("Remember me", "Dark mode", "Notifications", "Autosave", "Newsletter", "Private", "Wrap lines", "Sounds")
MENUS = ("File", "Edit", "View", "Insert", "Format", "Tools", "Window", "Help", "Go", "Run")
THEMES = ({"bg": (246, 247, 249), "panel": (232, 234, 238), "fg": (30, 30, 34), "field": (255, 255, 255),
           "chrome": (214, 217, 222)},
          {"bg": (34, 36, 40), "panel": (48, 51, 56), "fg": (232, 232, 236), "field": (24, 25, 28),
           "chrome": (62, 65, 72)},
          {"bg": (255, 255, 255), "panel": (240, 244, 250), "fg": (20, 30, 50), "field": (250, 250, 250),
           "chrome": (200, 210, 226)})
ACCENTS = ((37, 99, 235), (22, 163, 74), (220, 38, 38), (147, 51, 234), (234, 88, 12), (13, 148, 136),
           (100, 116, 139), (219, 39, 119))

@dataclass
class Target:
    """One clickable element: ``box`` = (x1, y1, x2, y2) px, ``kind`` in {text, icon}, ``name`` = word or icon."""

    box: tuple[int, int, int, int]
    kind: str
    name: str
    role: str  # button | icon | field | check | menu


@dataclass
class Screen:
    image: Image.Image
    platform: str
    template: int
    targets: list[Target] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- drawing
_FONTS: dict[int, ImageFont.ImageFont] = {}


def font(size: int = 12):
    """DejaVu Sans at ``size`` px when available, else PIL's built-in scalable font."""
    if size not in _FONTS:  # a per-size cache of immutable font objects
        try:
            _FONTS[size] = ImageFont.truetype("DejaVuSans.ttf", size)
        except OSError:
            _FONTS[size] = ImageFont.load_default(size)
    return _FONTS[size]


class _Painter:
    """Draws elements onto one screen and records the targets."""

    def __init__(self, screen: Screen, rng: random.Random, theme: dict, accent) -> None:
        self.s, self.rng, self.t, self.accent = screen, rng, theme, accent
        self.d = ImageDraw.Draw(screen.image)
        self.f = font(rng.choice((11, 12, 13)))
        self.words = rng.sample(WORDS, len(WORDS))
        self.icons = rng.sample(list(ICONS), len(ICONS))
        self.used: set[str] = set()

    def text_w(self, text: str) -> int:
        return int(self.d.textlength(text, font=self.f))

    def _add(self, box, kind, name, role):
        x1, y1, x2, y2 = (int(v) for v in box)
        self.used.add(name.lower())
        self.s.targets.append(Target((x1, y1, x2, y2), kind, name, role))

    def next_word(self) -> str:
        while self.words[-1].lower() in self.used:
            self.words.pop()
        return self.words[-1]

    def _free(self, names) -> list[str]:
        return [n for n in names if n.lower() not in self.used]

    def button(self, x: int, y: int, word: str | None = None, h: int = 26, filled: bool | None = None) -> int:
        word = word or self.next_word()
        if word == self.words[-1]:
            self.words.pop()
        w = max(MIN_SIDE, self.text_w(word) + 18)
        filled = self.rng.random() < .5 if filled is None else filled
        fill = self.accent if filled else self.t["panel"]
        self.d.rounded_rectangle([x, y, x + w, y + h], radius=self.rng.choice((0, 4, 12)), fill=fill,
                                 outline=self.accent)
        fg = (255, 255, 255) if filled else self.t["fg"]
        self.d.text((x + w / 2, y + h / 2), word, fill=fg, font=self.f, anchor="mm")
        self._add((x, y, x + w, y + h), "text", word, "button")
        return w

    def icon(self, x: int, y: int, size: int = 26, name: str | None = None) -> int:
        name = name or self.icons.pop()
        if self.rng.random() < .4:
            self.d.rounded_rectangle([x, y, x + size, y + size], radius=5, fill=self.t["panel"])
        color = self.accent if self.rng.random() < .5 else self.t["fg"]
        draw_icon(self.d, name, (x + 3, y + 3, x + size - 3, y + size - 3), color)
        self._add((x, y, x + size, y + size), "icon", name, "icon")
        return size

    def field(self, x: int, y: int, w: int, h: int = 26) -> None:
        label = self.rng.choice(self._free(FIELDS))
        self.d.rectangle([x, y, x + w, y + h], fill=self.t["field"], outline=(150, 150, 160))
        self.d.text((x + 6, y + h / 2), label, fill=(140, 140, 150), font=self.f, anchor="lm")
        self._add((x, y, x + w, y + h), "text", label, "field")

    def check(self, x: int, y: int) -> int:
        label = self.rng.choice(self._free(CHECKS))
        on = self.rng.random() < .5
        self.d.rectangle([x + 4, y + 6, x + 18, y + 20], fill=self.accent if on else self.t["field"],
                         outline=self.accent)
        if on:
            draw_icon(self.d, "check", (x + 3, y + 5, x + 19, y + 21), (255, 255, 255))
        w = 24 + self.text_w(label) + 4
        self.d.text((x + 24, y + 13), label, fill=self.t["fg"], font=self.f, anchor="lm")
        self._add((x, y, x + w, y + 26), "text", label, "check")
        return w

    def menubar(self, y: int, h: int = 24, x0: int = 4) -> None:
        W = self.s.image.width
        self.d.rectangle([0, y, W, y + h], fill=self.t["chrome"])
        x = x0
        free = self._free(MENUS)
        for m in self.rng.sample(free, min(len(free), self.rng.randint(3, 5))):
            w = max(MIN_SIDE, self.text_w(m) + 12)
            if x + w > W - 4:
                break
            self.d.text((x + w / 2, y + h / 2), m, fill=self.t["fg"], font=self.f, anchor="mm")
            self._add((x, y, x + w, y + h), "text", m, "menu")
            x += w + 2

    def chrome(self, title: str, mac: bool) -> int:
        """Window title bar (28 px) with close / minimise / maximise controls; returns its height."""
        W = self.s.image.width
        self.d.rectangle([0, 0, W, 28], fill=self.t["chrome"])
        self.d.text((W / 2, 14), title, fill=self.t["fg"], font=self.f, anchor="mm")
        if mac:
            for i, col in enumerate(((237, 106, 94), (245, 191, 79), (98, 197, 84))):
                self.d.ellipse([8 + i * 18, 8, 20 + i * 18, 20], fill=col)
        elif self._take("close"):
            self.icon(W - 28, 1, 26, "close")
            self.d.line([(W - 48, 15), (W - 38, 15)], fill=self.t["fg"], width=1)
        return 28

    def status_bar(self) -> int:
        """Phone status bar (18 px) with a clock; returns its height."""
        W, th = self.s.image.width, self.t
        self.d.rectangle([0, 0, W, 18], fill=th["chrome"])
        self.d.text((8, 9), f"{self.rng.randint(1, 12)}:{self.rng.randint(10, 59)}", fill=th["fg"], font=font(10),
                    anchor="lm")
        return 18

    def app_bar(self, top: int, lead: str | None = None) -> int:
        """Mobile app bar at ``top``: an icon left (``lead`` or any), two action icons right; returns the next y."""
        W = self.s.image.width
        self.d.rectangle([0, top, W, top + 34], fill=self.accent if self.rng.random() < .5 else self.t["panel"])
        self.icon(4, top + 4, 26, lead)
        self.toolbar(W - 64, top + 4, W, 2)
        return top + 40

    def browser_bar(self) -> int:
        """Browser chrome (32 px): back / forward / reload icons and an address field; returns the next y."""
        W, th = self.s.image.width, self.t
        self.d.rectangle([0, 0, W, 32], fill=th["chrome"])
        x = 4
        for name in ("back", "forward", "refresh"):
            if self._take(name):
                self.icon(x, 3, 26, name)
                x += 28
        self.d.rounded_rectangle([x + 6, 6, W - 40, 26], radius=10, fill=th["field"])
        self.d.text((x + 14, 16), self.rng.choice(("shop.example.com", "docs.example.org", "forum.example.net",
                                                   "git.example")), fill=(120, 120, 130), font=font(10), anchor="lm")
        return 36

    def nav_links(self, top: int) -> int:
        """A site navigation bar of text links on the accent colour, one icon at the right; returns the next y."""
        W = self.s.image.width
        self.d.rectangle([0, top, W, top + 30], fill=self.accent)
        x = 8
        for _ in range(self.rng.randint(3, 5)):
            word = self.next_word()
            w = self.text_w(word) + 14
            if x + w > W - 36:
                break
            self.words.pop()
            self.d.text((x + w / 2, top + 15), word, fill=(255, 255, 255), font=self.f, anchor="mm")
            self._add((x, top + 3, x + w, top + 27), "text", word, "button")
            x += w + 6
        self.icon(W - 32, top + 2, 26)
        return top + 36

    def _take(self, name: str) -> bool:
        if name in self.icons:
            self.icons.remove(name)
            return True
        return False

    def toolbar(self, x: int, y: int, w: int, n: int, gap: int = 4, size: int = 26) -> None:
        for i in range(n):
            if x + size > w or not self.icons:
                break
            self.icon(x, y, size)
            x += size + gap

    def row_buttons(self, x: int, y: int, x_max: int, n: int, gap: int = 8) -> None:
        for _ in range(n):
            word = self.next_word()
            if x + self.text_w(word) + 18 > x_max:
                break
            x += self.button(x, y) + gap

    def paragraph(self, x: int, y: int, w: int, lines: int) -> None:
        """Grey placeholder text lines (distractors, not targets)."""
        for i in range(lines):
            self.d.rectangle([x, y + i * 12, x + self.rng.randint(w // 2, w), y + i * 12 + 5], fill=(180, 182, 188))

    def vstack(self, x: int, y: int, x_max: int, y_max: int, blocks: list[tuple]) -> int:
        """Stack blocks top-down in the column [x, x_max) from ``y``; blocks that do not fit are skipped.

        Blocks: ("buttons", n), ("vbuttons", n), ("fields", n), ("checks", n), ("icons", n),
        ("grid", rows, cols, size), ("text", lines). Returns the next free y.
        """
        for kind, *arg in blocks:
            per = {"vbuttons": 34, "fields": 34, "checks": 30, "text": 12}
            need = ((arg[2] + 14) * arg[0] if kind == "grid" else per[kind] * arg[0] + 6 * (kind == "text")
                    if kind in per else 34)
            if y + need > y_max:
                continue
            if kind == "buttons":
                self.row_buttons(x, y, x_max, arg[0])
            elif kind == "vbuttons":
                for i in range(arg[0]):
                    self.button(x, y + 34 * i)
            elif kind == "fields":
                for i in range(min(arg[0], len(self._free(FIELDS)))):
                    self.field(x, y + 34 * i, min(x_max - x, self.rng.randint(110, 200)))
            elif kind == "checks":
                for i in range(min(arg[0], len(self._free(CHECKS)))):
                    self.check(x, y + 30 * i)
            elif kind == "icons":
                self.toolbar(x, y, x_max, arg[0], gap=self.rng.choice((4, 8, 12)))
            elif kind == "grid":
                rows, cols, size = arg
                gap = max(4, ((x_max - x) - cols * size) // max(cols, 1))
                for r in range(rows):
                    for c in range(cols):
                        if x + c * (size + gap) + size <= x_max and self.icons:
                            self.icon(x + c * (size + gap), y + r * (size + 14), size)
            elif kind == "text":
                self.paragraph(x, y, x_max - x, arg[0])
            y += need
        return y


def render_screen(platform: str, template: int, seed: int) -> Screen:
    """Render one screenshot of ``platform`` from layout ``template`` (0..N_TEMPLATES-1, :data:`COMPOSED` or
    :data:`DIALOG`) with random content."""
    if platform not in PLATFORMS:
        raise InputError(f"unknown platform {platform!r}; choose {', '.join(PLATFORMS)}")
    if not 0 <= template <= DIALOG:
        raise InputError(f"template {template} out of range 0..{N_TEMPLATES - 1} (or {COMPOSED} = composed, "
                         f"{DIALOG} = dialog)")
    from vlmkit.data import gui_layouts  # imports this module: loaded on first use

    if template == DIALOG:
        return gui_layouts.dialog_screen(platform, seed)
    rng = random.Random(f"{platform}/{template}/{seed}")
    theme = rng.choice(THEMES)
    screen = Screen(Image.new("RGB", SIZES[platform], theme["bg"]), platform, template)
    painter = _Painter(screen, rng, theme, rng.choice(ACCENTS))
    if template == COMPOSED:
        gui_layouts.compose(painter, platform)
    else:
        gui_layouts.TEMPLATES[platform](painter, template)
    return screen


TEMPLATE_SETS = {"train": tuple(range(TRAIN_TEMPLATES)), "heldout": tuple(range(TRAIN_TEMPLATES, N_TEMPLATES)),
                 "all": tuple(range(N_TEMPLATES)), "composed": (COMPOSED,),
                 "varied": (*range(TRAIN_TEMPLATES), COMPOSED), "dialog": (DIALOG,),
                 "mixed": (*range(TRAIN_TEMPLATES), COMPOSED, DIALOG)}


def template_indices(templates: str | list[int]) -> list[int]:
    """Template indices of a named set (:data:`TEMPLATE_SETS`: train, heldout, all = the fixed templates, composed,
    varied = train + composed, dialog, mixed = varied + dialog) or of an explicit list."""
    if not isinstance(templates, str):
        return list(templates)
    if templates not in TEMPLATE_SETS:
        raise InputError(f"templates={templates!r}: use one of {', '.join(TEMPLATE_SETS)} or a list of indices")
    return list(TEMPLATE_SETS[templates])


def instruction_for(target: Target, platform: str, rng: random.Random) -> str:
    """A natural instruction naming ``target`` by its text (text targets) or its function/look (icons)."""
    n = target.name
    if target.kind == "icon":
        return rng.choice(ICONS[n])
    verb = "tap" if platform == "mobile" else "click"
    return rng.choice({"button": (f"{verb} {n}", n, f"press the {n} button", f"select {n}"),
                       "field": (f"the {n} field", f"enter {n}", f"type in the {n} box"),
                       "check": (f"check {n}", f"toggle {n}", f"the {n} checkbox"),
                       "menu": (f"open the {n} menu", f"{n} menu", f"{verb} {n}")}[target.role])


def build_set(out: str | Path, *, screens_per_template: int = 20, templates: str | list[int] = "all",
              seed: int = 0, max_targets: int = 8, platforms=PLATFORMS,
              composed_screens: int | None = None, dialog_screens: int | None = None) -> dict[str, Path]:
    """Write a ScreenSpot-v2-format set: ``screenspot_{platform}_v2.json`` + ``screenspot_imgs/``.

    ``templates``: a name of :data:`TEMPLATE_SETS` ("train" = 0..TRAIN_TEMPLATES-1, "heldout" = the rest, "all",
    "composed", "varied" = train + composed, "dialog", "mixed") or a list of indices. Each screen contributes up to
    ``max_targets`` instructions (balanced text/icon); ``composed_screens`` / ``dialog_screens`` (default
    ``screens_per_template``) are the numbers of :data:`COMPOSED` / :data:`DIALOG` screens per platform.
    Returns platform -> annotation path.
    """
    templates = template_indices(templates)
    out = Path(out)
    imgs = out / "screenspot_imgs"
    imgs.mkdir(parents=True, exist_ok=True)
    paths = {}
    for platform in platforms:
        rows = []
        for t in templates:
            n = {COMPOSED: composed_screens, DIALOG: dialog_screens}.get(t)
            n = screens_per_template if n is None else n
            for i in range(n):
                s = seed * 100003 + i
                screen = render_screen(platform, t, s)
                name = f"{platform}_t{t}_{seed}_{i}.png"
                screen.image.save(imgs / name)
                rng = random.Random(f"instr/{platform}/{t}/{s}")
                text = [x for x in screen.targets if x.kind == "text"]
                icon = [x for x in screen.targets if x.kind == "icon"]
                rng.shuffle(text)
                rng.shuffle(icon)
                half = max_targets // 2
                picked = text[:max(half, max_targets - len(icon))] + icon[:max(half, max_targets - len(text))]
                for tg in picked[:max_targets]:
                    x1, y1, x2, y2 = tg.box
                    rows.append({"img_filename": name, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                 "instruction": instruction_for(tg, platform, rng), "data_type": tg.kind,
                                 "data_source": rng.choice(SOURCES[platform]), "template": t})
        path = out / f"screenspot_{platform}_v2.json"
        path.write_text(json.dumps(rows, indent=0), encoding="utf-8")
        paths[platform] = path
    return paths


def _data_screenspot(args) -> int:
    paths = build_set(args.out, screens_per_template=args.screens, templates=args.templates, seed=args.seed,
                      composed_screens=args.composed_screens, dialog_screens=args.dialog_screens)
    for p in paths.values():
        print(f"wrote {p} ({len(json.loads(p.read_text()))} instructions)")
    return 0


def add_data_screenspot(data_subparsers) -> None:
    """Add ``screenspot`` under an existing ``vlmkit data`` sub-command group."""
    p = data_subparsers.add_parser("screenspot", help="generated GUI screenshots in ScreenSpot-v2 format")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--screens", type=int, default=20, help="screens per platform and template")
    p.add_argument("--composed-screens", type=int, default=None,
                   help="composed screens per platform (default: --screens), with --templates composed/varied/mixed")
    p.add_argument("--dialog-screens", type=int, default=None,
                   help="dialog screens per platform (default: --screens), with --templates dialog / mixed")
    p.add_argument("--templates", default="heldout", choices=tuple(TEMPLATE_SETS),
                   help="layout templates to use (held-out ones were never used to train the shipped heads; "
                        "composed = random arrangements of the building blocks, varied = train + composed, "
                        "dialog = screens behind a modal dialog, mixed = varied + dialog)")
    p.set_defaults(func=_data_screenspot)
