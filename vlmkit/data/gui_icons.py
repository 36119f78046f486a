"""Pictograms of the generated GUI screens: :data:`ICONS` (name -> instruction phrasings) and :func:`draw_icon`."""

from __future__ import annotations

import math

from PIL import ImageDraw

from vlmkit.errors import InputError

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
