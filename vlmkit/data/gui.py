"""Generated GUI screenshots with grounding instructions, written in the ScreenSpot-v2 annotation format.

A screen is built from a *layout template* (per platform: mobile portrait 192x384, desktop 480x288, web 384x288 px)
filled with window chrome, toolbars, buttons with text labels (:data:`WORDS`), icon buttons (:data:`ICONS`, drawn
with PIL), text fields, checkboxes and menus. Every target is unique on its screen, and its box is at least
``MIN_SIDE`` = 24 px on each side (two 12-px image tokens of the default model when the screenshot is read in
native-resolution tiles, see :mod:`vlmkit.grounding.v2p`).

Templates ``0..TRAIN_TEMPLATES-1`` of each platform are for training, the rest are held out for evaluation;
template :data:`COMPOSED` draws a random arrangement of the same building blocks (:mod:`vlmkit.data.gui_compose`),
for training only.
``build_set(out, ...)`` writes ``screenspot_{platform}_v2.json`` (``img_filename``, ``bbox`` = [x, y, w, h] px,
``instruction``, ``data_type`` in {text, icon}, ``data_source``) and ``screenspot_imgs/*.png``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlmkit.errors import InputError

PLATFORMS = ("mobile", "desktop", "web")
SIZES = {"mobile": (192, 384), "desktop": (480, 288), "web": (384, 288)}
SOURCES = {"mobile": ("ios", "android"), "desktop": ("macos", "windows"), "web": ("shop", "tool", "forum", "gitlab")}
MIN_SIDE = 24
N_TEMPLATES = 6  # fixed layout templates per platform
TRAIN_TEMPLATES = 4  # templates 0..3 train, 4..5 are held out
COMPOSED = N_TEMPLATES  # template index of composed (random) layouts, training only: see gui_compose.py

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

# name -> instruction phrasings (an icon target's instruction names its function or its look)
ICONS = {
    "settings": ("open settings", "the settings icon", "click the gear"),
    "trash": ("the trash icon", "delete it", "move to trash"),
    "home": ("go home", "the home icon", "open the home screen"),
    "search": ("search", "the magnifier icon", "open search"),
    "heart": ("like this", "the heart icon", "add to favorites"),
    "star": ("star it", "the star icon", "rate this"),
    "bell": ("show notifications", "the bell icon", "open alerts"),
    "user": ("open my profile", "the profile icon", "account"),
    "mail": ("open mail", "the envelope icon", "check messages"),
    "lock": ("lock the screen", "the padlock icon", "security"),
    "camera": ("take a photo", "the camera icon", "open the camera"),
    "plus": ("add new item", "the plus icon", "create new"),
    "close": ("close", "the x icon", "dismiss"),
    "menu": ("open the menu", "the hamburger icon", "show navigation"),
    "back": ("go back", "the left arrow", "previous page"),
    "forward": ("go forward", "the right arrow", "next page"),
    "download": ("download it", "the download icon", "save to disk"),
    "play": ("play", "the play button", "start playback"),
    "pause": ("pause", "the pause icon", "stop playback"),
    "calendar": ("open the calendar", "the calendar icon", "pick a date"),
    "folder": ("open the folder", "the folder icon", "browse files"),
    "cloud": ("cloud storage", "the cloud icon", "sync to cloud"),
    "wifi": ("wifi settings", "the wifi icon", "network"),
    "refresh": ("refresh the page", "the reload icon", "reload"),
    "pin": ("show location", "the map pin", "open the map"),
    "music": ("open music", "the music note", "play songs"),
    "check": ("confirm", "the check mark", "mark as done"),
    "chat": ("open chat", "the speech bubble", "start a conversation"),
}


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


# --------------------------------------------------------------------------------------------------- icons
def draw_icon(d: ImageDraw.ImageDraw, name: str, box: tuple[int, int, int, int], color) -> None:
    """Draw pictogram ``name`` inside ``box`` (x1, y1, x2, y2) with line/fill ``color``."""
    x1, y1, x2, y2 = box
    w = x2 - x1
    m = max(2, w // 6)
    a, b, c, e = x1 + m, y1 + m, x2 - m, y2 - m
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (c - a) / 2
    lw = max(1, w // 12)
    if name == "settings":
        for k in range(8):
            t = k * math.pi / 4
            d.line([(cx, cy), (cx + r * math.cos(t), cy + r * math.sin(t))], fill=color, width=lw + 2)
        d.ellipse([cx - r * .7, cy - r * .7, cx + r * .7, cy + r * .7], fill=color)
        d.ellipse([cx - r * .3, cy - r * .3, cx + r * .3, cy + r * .3], fill=(255, 255, 255))
    elif name == "trash":
        d.rectangle([a + 2, b + 3, c - 2, e], outline=color, width=lw)
        d.line([(a, b + 2), (c, b + 2)], fill=color, width=lw)
        d.rectangle([cx - 2, b, cx + 2, b + 2], fill=color)
        for xx in (cx - 3, cx, cx + 3):
            d.line([(xx, b + 6), (xx, e - 2)], fill=color, width=1)
    elif name == "home":
        d.polygon([(cx, b), (a, cy), (c, cy)], fill=color)
        d.rectangle([a + 3, cy, c - 3, e], fill=color)
    elif name == "search":
        d.ellipse([a, b, cx + 2, cy + 2], outline=color, width=lw + 1)
        d.line([(cx + 1, cy + 1), (c, e)], fill=color, width=lw + 2)
    elif name == "heart":
        d.ellipse([a, b + 1, cx + 1, cy + 1], fill=color)
        d.ellipse([cx - 1, b + 1, c, cy + 1], fill=color)
        d.polygon([(a + 1, cy - 1), (c - 1, cy - 1), (cx, e)], fill=color)
    elif name == "star":
        pts = [(cx + (r if k % 2 == 0 else r * .45) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * .45) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=color)
    elif name == "bell":
        d.pieslice([a + 1, b, c - 1, e + (e - b) // 2], 180, 360, fill=color)
        d.rectangle([a, cy + 2, c, cy + 4], fill=color)
        d.ellipse([cx - 2, e - 2, cx + 2, e + 1], fill=color)
    elif name == "user":
        d.ellipse([cx - r * .45, b, cx + r * .45, b + r * .9], fill=color)
        d.pieslice([a, cy, c, e + (e - cy)], 180, 360, fill=color)
    elif name == "mail":
        d.rectangle([a, b + 3, c, e - 3], outline=color, width=lw)
        d.line([(a, b + 3), (cx, cy + 1), (c, b + 3)], fill=color, width=lw)
    elif name == "lock":
        d.arc([a + 3, b, c - 3, cy + 3], 180, 360, fill=color, width=lw + 1)
        d.rectangle([a + 1, cy, c - 1, e], fill=color)
    elif name == "camera":
        d.rectangle([a, b + 4, c, e - 1], fill=color)
        d.rectangle([cx - 3, b + 1, cx + 3, b + 4], fill=color)
        d.ellipse([cx - 3.5, cy - 2, cx + 3.5, cy + 5], fill=(255, 255, 255))
    elif name == "plus":
        d.line([(cx, b), (cx, e)], fill=color, width=lw + 2)
        d.line([(a, cy), (c, cy)], fill=color, width=lw + 2)
    elif name == "close":
        d.line([(a, b), (c, e)], fill=color, width=lw + 2)
        d.line([(a, e), (c, b)], fill=color, width=lw + 2)
    elif name == "menu":
        for yy in (b + 2, cy, e - 2):
            d.line([(a, yy), (c, yy)], fill=color, width=lw + 1)
    elif name in ("back", "forward"):
        s = -1 if name == "back" else 1
        tip, tail = (a, c) if s < 0 else (c, a)
        d.line([(tail, cy), (tip, cy)], fill=color, width=lw + 1)
        d.line([(tip, cy), (tip - s * r * .7, b + 1)], fill=color, width=lw + 1)
        d.line([(tip, cy), (tip - s * r * .7, e - 1)], fill=color, width=lw + 1)
    elif name == "download":
        d.line([(cx, b), (cx, e - 4)], fill=color, width=lw + 1)
        d.polygon([(a + 2, cy), (c - 2, cy), (cx, e - 3)], fill=color)
        d.line([(a, e), (c, e)], fill=color, width=lw + 1)
    elif name == "play":
        d.polygon([(a + 2, b), (a + 2, e), (c, cy)], fill=color)
    elif name == "pause":
        d.rectangle([a + 1, b, cx - 2, e], fill=color)
        d.rectangle([cx + 2, b, c - 1, e], fill=color)
    elif name == "calendar":
        d.rectangle([a, b + 2, c, e], outline=color, width=lw)
        d.rectangle([a, b + 2, c, b + 6], fill=color)
        for xx in (a + 3, cx, c - 3):
            for yy in (cy + 1, e - 3):
                d.point([(xx, yy)], fill=color)
    elif name == "folder":
        d.polygon([(a, b + 2), (cx - 1, b + 2), (cx + 2, b + 5), (c, b + 5), (c, e), (a, e)], fill=color)
    elif name == "cloud":
        d.ellipse([a, cy - 1, cx, e], fill=color)
        d.ellipse([a + 4, b + 2, c - 3, e - 2], fill=color)
        d.ellipse([cx - 1, cy - 2, c, e], fill=color)
    elif name == "wifi":
        for k, rr in enumerate((r, r * .66, r * .33)):
            d.arc([cx - rr, e - rr * 1.2 - 1, cx + rr, e + rr * .8], 225, 315, fill=color, width=lw + 1)
        d.ellipse([cx - 1.5, e - 3, cx + 1.5, e], fill=color)
    elif name == "refresh":
        d.arc([a, b, c, e], 40, 330, fill=color, width=lw + 1)
        d.polygon([(c, b), (c, cy - 1), (cx + 2, cy - 2)], fill=color)
    elif name == "pin":
        d.ellipse([a + 2, b, c - 2, cy + 2], fill=color)
        d.polygon([(a + 3, cy), (c - 3, cy), (cx, e)], fill=color)
        d.ellipse([cx - 2, b + 3, cx + 2, b + 7], fill=(255, 255, 255))
    elif name == "music":
        d.ellipse([a, e - 5, a + 6, e], fill=color)
        d.line([(a + 5, e - 2), (a + 5, b)], fill=color, width=lw + 1)
        d.line([(a + 5, b), (c, b + 3)], fill=color, width=lw + 2)
        d.line([(c - 1, b + 3), (c - 1, e - 4)], fill=color, width=lw + 1)
        d.ellipse([c - 6, e - 7, c, e - 2], fill=color)
    elif name == "check":
        d.line([(a, cy), (cx - 1, e - 1), (c, b + 1)], fill=color, width=lw + 2)
    elif name == "chat":
        d.rounded_rectangle([a, b + 1, c, e - 4], radius=3, fill=color)
        d.polygon([(a + 3, e - 5), (a + 3, e), (a + 8, e - 5)], fill=color)
    else:
        raise InputError(f"unknown icon {name!r}; known: {', '.join(ICONS)}")


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


# ------------------------------------------------------------------------------------------------ templates
def _mobile(p: _Painter, t: int) -> None:
    W, H = SIZES["mobile"]
    d, th = p.d, p.t
    top = p.status_bar()
    if t in (0, 3, 5):
        top = p.app_bar(top, "back" if t == 5 and p._take("back") else None)
    if t == 0:
        p.vstack(10, top, W - 10, H - 50, [("fields", 2), ("buttons", 2), ("checks", 1), ("text", 3)])
        p.toolbar(12, H - 34, W, 4, gap=p.rng.choice((16, 20)))
    elif t == 1:
        p.vstack(12, top + 8, W - 10, H - 40, [("grid", 3, 3, 32), ("buttons", 2)])
    elif t == 2:
        p.icon(W - 32, top + 4, 26)
        p.vstack(12, top + 40, W - 12, H - 10, [("text", 2), ("fields", 3), ("checks", 2), ("vbuttons", 1)])
    elif t == 3:
        y = top
        for _ in range(2):
            d.rounded_rectangle([8, y, W - 8, y + 92], radius=8, fill=th["panel"])
            p.paragraph(16, y + 8, W - 40, 3)
            p.row_buttons(16, y + 52, W - 16, 2)
            y += 102
        p.icon(W - 44, H - 44, 34, "plus" if p._take("plus") else None)
    elif t == 4:  # held out: settings list (icon + checkbox rows), buttons at the bottom
        y = top + 8
        for _ in range(4):
            p.icon(10, y, 26)
            p.check(44, y)
            y += 36
        p.row_buttons(10, H - 40, W - 10, 2)
    else:  # held out: chat — bubbles, composer field with a send button
        y = top + 4
        for i in range(3):
            x = 10 if i % 2 == 0 else 60
            d.rounded_rectangle([x, y, x + 120, y + 40], radius=10, fill=th["panel"])
            p.paragraph(x + 8, y + 8, 100, 2)
            y += 50
        p.vstack(10, y + 4, W - 10, H - 40, [("icons", 4)])
        p.field(8, H - 36, 110)
        p.button(124, H - 36)


def _desktop(p: _Painter, t: int) -> None:
    W, H = SIZES["desktop"]
    top = p.chrome(p.rng.choice(("Untitled", "Report.doc", "Photos", "Project", "Inbox")), p.rng.random() < .5)
    if t != 5:
        p.menubar(top)
        top += 26
    if t in (0, 1, 3, 4):
        p.d.rectangle([0, top, W, top + 32], fill=p.t["panel"])
        p.toolbar(6, top + 3, W - 6, p.rng.randint(4, 8))
        top += 38
    if t == 0:
        p.d.rectangle([0, top, 110, H], fill=p.t["panel"])
        p.vstack(8, top + 6, 106, H - 4, [("vbuttons", 4)])
        p.vstack(124, top + 6, W - 10, H - 40, [("text", 4), ("fields", 2)])
        p.row_buttons(W - 190, H - 34, W - 8, 2)
    elif t == 1:
        p.vstack(12, top + 4, 230, H - 4, [("fields", 3), ("checks", 2)])
        p.vstack(250, top + 4, W - 10, H - 4, [("text", 3), ("buttons", 3), ("buttons", 2)])
    elif t == 2:
        p.d.rectangle([0, top, W, H], fill=p.t["panel"])
        x1, y1 = 90, top + 16
        p.d.rectangle([x1, y1, W - 90, H - 16], fill=p.t["bg"], outline=(150, 150, 160))
        p.icon(W - 120, y1 + 4, 26)
        p.vstack(x1 + 14, y1 + 34, W - 104, H - 20, [("text", 2), ("checks", 2), ("buttons", 3)])
    elif t == 3:
        p.d.rectangle([W - 120, top, W, H], fill=p.t["panel"])
        p.vstack(W - 112, top + 8, W - 6, H - 4, [("grid", 3, 3, 28)])
        p.vstack(12, top + 8, W - 130, H - 4, [("text", 3), ("buttons", 3), ("fields", 1), ("buttons", 2)])
    elif t == 4:  # held out: two panes — icon column + form
        p.d.rectangle([0, top, 44, H], fill=p.t["panel"])
        for i in range(min(5, (H - top - 8) // 34)):
            p.icon(9, top + 6 + 34 * i, 26)
        p.vstack(60, top + 6, 260, H - 4, [("fields", 2), ("checks", 2)])
        p.vstack(280, top + 6, W - 10, H - 4, [("text", 4), ("vbuttons", 2)])
    else:  # held out: ribbon of two icon rows and a button row, no menu bar
        p.d.rectangle([0, top, W, top + 100], fill=p.t["panel"])
        p.toolbar(8, top + 4, W - 8, 9, gap=10)
        p.toolbar(8, top + 36, W - 8, 9, gap=10)
        p.row_buttons(8, top + 68, W - 8, 4)
        p.vstack(12, top + 110, W - 12, H - 4, [("text", 3), ("fields", 1)])


def _web(p: _Painter, t: int) -> None:
    W, H = SIZES["web"]
    d, th = p.d, p.t
    top = p.browser_bar()
    if t in (0, 3, 4):
        top = p.nav_links(top)
    if t == 0:
        p.vstack(16, top + 4, W - 16, H - 4, [("text", 3), ("buttons", 2), ("fields", 1), ("buttons", 2)])
    elif t == 1:
        p.field(12, top + 4, 200)
        p.button(220, top + 4)
        y = top + 40
        for i in range(3):
            x = 12 + i * 122
            d.rounded_rectangle([x, y, x + 112, y + 120], radius=6, fill=th["panel"])
            p.paragraph(x + 8, y + 8, 90, 3)
            p.icon(x + 80, y + 48, 26)
            p.button(x + 8, y + 84)
    elif t == 2:
        d.rounded_rectangle([92, top + 6, W - 92, H - 8], radius=8, fill=th["panel"])
        p.vstack(108, top + 16, W - 108, H - 12, [("fields", 2), ("checks", 1), ("buttons", 2), ("buttons", 1)])
    elif t == 3:
        d.rectangle([0, top, 40, H], fill=th["panel"])
        for i in range(min(6, (H - top - 8) // 34)):
            p.icon(7, top + 4 + 34 * i, 26)
        p.vstack(56, top + 6, W - 12, H - 4, [("text", 4), ("buttons", 3), ("checks", 2)])
    elif t == 4:  # held out: content with checks, footer of icons
        p.vstack(16, top + 4, W - 16, H - 44, [("checks", 3), ("buttons", 3)])
        d.rectangle([0, H - 36, W, H], fill=th["panel"])
        p.toolbar(16, H - 32, W - 16, 6, gap=24)
    else:  # held out: a table with per-row action icons and a header button
        p.button(W - 100, top + 2)
        y = top + 36
        for _ in range(5):
            d.line([(8, y - 3), (W - 8, y - 3)], fill=(190, 190, 196))
            p.paragraph(14, y + 6, 180, 1)
            p.icon(W - 72, y, 26)
            p.icon(W - 40, y, 26)
            y += 32


_TEMPLATES = {"mobile": _mobile, "desktop": _desktop, "web": _web}


def render_screen(platform: str, template: int, seed: int) -> Screen:
    """Render one screenshot of ``platform`` from layout ``template`` (0..N_TEMPLATES-1, or :data:`COMPOSED`) with
    random content."""
    if platform not in PLATFORMS:
        raise InputError(f"unknown platform {platform!r}; choose {', '.join(PLATFORMS)}")
    if not 0 <= template <= COMPOSED:
        raise InputError(f"template {template} out of range 0..{N_TEMPLATES - 1} (or {COMPOSED} = composed)")
    rng = random.Random(f"{platform}/{template}/{seed}")
    theme = rng.choice(THEMES)
    screen = Screen(Image.new("RGB", SIZES[platform], theme["bg"]), platform, template)
    painter = _Painter(screen, rng, theme, rng.choice(ACCENTS))
    if template == COMPOSED:
        from vlmkit.data.gui_compose import compose

        compose(painter, platform)
    else:
        _TEMPLATES[platform](painter, template)
    return screen


TEMPLATE_SETS = {"train": tuple(range(TRAIN_TEMPLATES)), "heldout": tuple(range(TRAIN_TEMPLATES, N_TEMPLATES)),
                 "all": tuple(range(N_TEMPLATES)), "composed": (COMPOSED,),
                 "varied": (*range(TRAIN_TEMPLATES), COMPOSED)}


def template_indices(templates: str | list[int]) -> list[int]:
    """Template indices of a named set (:data:`TEMPLATE_SETS`: train, heldout, all = the fixed templates, composed,
    varied = train + composed) or of an explicit list."""
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
              composed_screens: int | None = None) -> dict[str, Path]:
    """Write a ScreenSpot-v2-format set: ``screenspot_{platform}_v2.json`` + ``screenspot_imgs/``.

    ``templates``: a name of :data:`TEMPLATE_SETS` ("train" = 0..TRAIN_TEMPLATES-1, "heldout" = the rest, "all",
    "composed", "varied" = train + composed) or a list of indices. Each screen contributes up to ``max_targets``
    instructions (balanced text/icon); ``composed_screens`` (default ``screens_per_template``) is the number of
    composed screens per platform when the set includes :data:`COMPOSED`. Returns platform -> annotation path.
    """
    templates = template_indices(templates)
    out = Path(out)
    imgs = out / "screenspot_imgs"
    imgs.mkdir(parents=True, exist_ok=True)
    paths = {}
    for platform in platforms:
        rows = []
        for t in templates:
            n = composed_screens if t == COMPOSED and composed_screens is not None else screens_per_template
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
                      composed_screens=args.composed_screens)
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
                   help="composed screens per platform (default: --screens), with --templates composed / varied")
    p.add_argument("--templates", default="heldout", choices=tuple(TEMPLATE_SETS),
                   help="layout templates to use (held-out ones were never used to train the shipped heads; "
                        "composed = random arrangements of the building blocks, varied = train + composed)")
    p.set_defaults(func=_data_screenspot)
