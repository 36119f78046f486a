"""Layouts of the generated GUI screens: the fixed templates (:data:`TEMPLATES`) and composed random layouts.

**Fixed templates** (per platform, index 0..5): ``0..TRAIN_TEMPLATES-1`` are for training, the rest are held out.

**Composed layouts** (template index :data:`vlmkit.data.gui.COMPOSED`, :func:`compose`): random arrangements of
the same building blocks, for more varied training screens. The fixed templates (4 per platform for training)
teach a grounder the *places* where targets sit on those few layouts as much as the targets themselves; a head
fine-tuned on them reached 0.88-0.99 on training layouts and 0.61-0.66 on the held-out ones. A composed screen draws
the platform's chrome, then a random choice of bars (menu bar, icon toolbar, navigation links, app bar), a body
split into 1-3 columns of random width, each filled top-down with a random list of the blocks the templates use
(button rows, button stacks, fields, checkboxes, icon rows, icon grids, cards, placeholder text), and sometimes a
bottom bar; font size, icon size and spacing are drawn per screen. Composed screens only reuse the generic blocks;
none of the held-out templates' arrangements is coded there, and ``templates="heldout"`` never includes them, so
held-out evaluation stays on layouts the grounder never saw.

**Dialogs** (:func:`dialog`): a screen dimmed behind a modal dialog (a title bar, maybe a close icon, checkboxes,
other blocks, a row of buttons); the dialog's elements are the new screen's only targets. The agent's follow-up
screens (:mod:`vlmkit.agent`) are dialogs at a fixed place per platform; template :data:`vlmkit.data.gui.DIALOG`
(:func:`dialog_screen`, training only) opens one of random size, place, dimming and contents over a training
template or composed screen.
"""

from __future__ import annotations

import random

from PIL import Image

from vlmkit.data import gui
from vlmkit.data.gui import SIZES, font
from vlmkit.data.gui_icons import ICONS

DIALOG_BUTTONS = ("Done", "Apply", "Cancel", "Save", "Back", "Continue", "Accept", "Decline", "Retry", "Skip")
DIALOG_TITLES = ("Settings", "Profile", "Notifications", "Mail", "Security", "Network", "Files", "Preferences",
                 "Options", "Account", "Confirm", "Share", "Export", "Details")


def _mobile(p, t: int) -> None:
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


def _desktop(p, t: int) -> None:
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


def _web(p, t: int) -> None:
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


TEMPLATES = {"mobile": _mobile, "desktop": _desktop, "web": _web}


# ------------------------------------------------------------------------------------------------- composed
BLOCKS = ("buttons", "vbuttons", "fields", "checks", "icons", "grid", "text", "card")


def _block(p, width: int) -> tuple:
    """One random block for a column of ``width`` px (a :meth:`_Painter.vstack` block or a card)."""
    kind = p.rng.choice(BLOCKS)
    if kind == "grid":
        size = p.rng.choice((24, 28, 32, 36))
        return ("grid", p.rng.randint(1, 3), max(1, min(4, width // (size + 12))), size)
    if kind == "text":
        return ("text", p.rng.randint(1, 4))
    if kind == "card":
        return ("card",)
    return (kind, p.rng.randint(1, 3) if kind != "icons" else p.rng.randint(2, 6))


def _card(p, x: int, y: int, x_max: int, y_max: int) -> int:
    """A rounded panel with placeholder text, a row of buttons and maybe an icon; returns the next free y."""
    h = 84
    if y + h > y_max:
        return y
    p.d.rounded_rectangle([x, y, x_max, y + h], radius=p.rng.choice((4, 8, 12)), fill=p.t["panel"])
    p.paragraph(x + 8, y + 8, max(20, x_max - x - 52), 2)
    if p.icons and x_max - x > 80 and p.rng.random() < .6:
        p.icon(x_max - 34, y + 6, 28)
    p.row_buttons(x + 8, y + 48, x_max - 8, p.rng.randint(1, 3))
    return y + h + 8


def _column(p, x: int, y: int, x_max: int, y_max: int) -> None:
    """Fill the column [x, x_max) x [y, y_max) top-down with 2-5 random blocks."""
    if p.rng.random() < .35:
        p.d.rectangle([x - 4, y - 4, x_max + 4, y_max + 4], fill=p.t["panel"])
    for _ in range(p.rng.randint(2, 5)):
        blk = _block(p, x_max - x)
        if blk[0] == "card":
            y = _card(p, x, y, x_max, y_max)
        else:
            y = p.vstack(x, y, x_max, y_max, [blk]) + p.rng.choice((0, 4, 10))


def _split(p, W: int, n: int, min_w: int) -> list[tuple[int, int]]:
    """``n`` column spans [x0, x1) across ``W`` px with random widths of at least ``min_w``."""
    free = W - n * min_w
    cuts = sorted(p.rng.randint(0, max(free, 0)) for _ in range(n - 1))
    widths = [b - a + min_w for a, b in zip([0, *cuts], [*cuts, free])]
    spans, x = [], 0
    for w in widths:
        spans.append((x, x + w))
        x += w
    return spans


def compose(p, platform: str) -> None:
    """Draw a composed screen with painter ``p`` (a :class:`vlmkit.data.gui._Painter` on an empty screen)."""
    W, H = p.s.image.size
    rng = p.rng
    p.words = [w for w in p.words if w.lower() not in ICONS]  # "Back" button vs back icon: names stay unique
    p.f = font(rng.choice((10, 11, 12, 13, 14)))
    if platform == "mobile":
        top = p.status_bar()
        if rng.random() < .7:
            top = p.app_bar(top)
    elif platform == "desktop":
        top = p.chrome(rng.choice(("Untitled", "Notes", "Mail", "Music", "Settings")), rng.random() < .5)
        if rng.random() < .7:
            p.menubar(top)
            top += 26
    else:
        top = p.browser_bar()
        if rng.random() < .6:
            top = p.nav_links(top)
    if platform != "mobile" and rng.random() < .5:  # icon toolbar band
        size = rng.choice((24, 26, 30))
        p.d.rectangle([0, top, W, top + size + 6], fill=p.t["panel"])
        p.toolbar(rng.randint(4, 40), top + 3, W - 6, rng.randint(3, 9), gap=rng.choice((2, 4, 8, 14)), size=size)
        top += size + 12
    bottom = H
    if rng.random() < .4:  # bottom bar: icons or buttons
        bottom = H - 38
        p.d.rectangle([0, bottom, W, H], fill=p.t["panel"])
        if rng.random() < .5:
            p.toolbar(rng.randint(6, 30), bottom + 6, W - 6, rng.randint(3, 6), gap=rng.choice((8, 16, 28)))
        else:
            p.row_buttons(rng.randint(6, W // 3), bottom + 6, W - 6, rng.randint(1, 4))
    n_cols = rng.choice((1, 1, 2)) if platform == "mobile" else rng.choice((1, 2, 2, 3))
    n_cols = min(n_cols, W // 130)
    pad = rng.choice((6, 10, 16))
    for x0, x1 in _split(p, W, n_cols, 130):
        _column(p, x0 + pad, top + pad, x1 - pad, bottom - 4)


# ------------------------------------------------------------------------------------------------- dialogs
def dialog(screen, rng: random.Random, box, title: str, *, avoid=frozenset(), dim: float = 0.45,
           checks: tuple[int, int] = (2, 3), blocks: list[tuple] = (), n_buttons: int = 2):
    """``screen`` dimmed (blend ``dim`` towards black) behind a modal dialog in ``box`` (x1, y1, x2, y2) px.

    The dialog holds a title bar with ``title``, a close icon half of the time, ``randint(*checks)`` checkboxes
    then ``blocks`` (:meth:`vlmkit.data.gui._Painter.vstack` blocks), and up to ``n_buttons`` of
    :data:`DIALOG_BUTTONS` at the bottom. Its elements are the returned screen's only targets; their names differ
    from the targets of ``screen`` and from ``avoid`` (pass the title there to keep it apart from them too).
    Deterministic in ``rng``'s state.
    """
    base = screen.image.convert("RGB")
    out = gui.Screen(Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), dim), screen.platform,
                     screen.template)
    p = gui._Painter(out, rng, rng.choice(gui.THEMES), rng.choice(gui.ACCENTS))
    taken = {t.name.lower() for t in screen.targets} | {n.lower() for n in avoid}
    p.used |= taken
    p.icons = [n for n in p.icons if n not in taken]
    W, H = out.image.size
    x1, y1, x2, y2 = box
    x2, y2 = min(x2, W), min(y2, H)
    p.d.rounded_rectangle([x1, y1, x2 - 1, y2 - 1], radius=10, fill=p.t["bg"], outline=(150, 150, 160))
    p.d.rounded_rectangle([x1 + 1, y1 + 1, x2 - 2, y1 + 30], radius=9, fill=p.t["chrome"])
    p.d.rectangle([x1 + 1, y1 + 16, x2 - 2, y1 + 30], fill=p.t["chrome"])
    p.d.text((x1 + 12, y1 + 19), title, fill=p.t["fg"], font=p.f, anchor="lm")
    if rng.random() < 0.5 and p._take("close"):
        p.icon(x2 - 32, y1 + 6, 26, "close")
    n_checks = min(rng.randint(*checks), len(p._free(gui.CHECKS)))
    y = p.vstack(x1 + 12, y1 + 40, x2 - 12, y2 - 40, ([("checks", n_checks)] if n_checks else []) + list(blocks))
    x = x1 + 12
    for word in rng.sample(p._free(DIALOG_BUTTONS), min(n_buttons, len(p._free(DIALOG_BUTTONS)))):
        if x + p.text_w(word) + 18 > x2 - 12:
            break
        x += p.button(x, max(y + 4, y2 - 38), word) + 10
    return out


def dialog_screen(platform: str, seed: int):
    """Template :data:`vlmkit.data.gui.DIALOG`: a training template or composed screen behind a dialog of random
    size, place, dimming, title and contents (a bottom sheet or a card on mobile)."""
    rng = random.Random(f"{platform}/dialog/{seed}")
    under = gui.render_screen(platform, rng.choice((*range(gui.TRAIN_TEMPLATES), gui.COMPOSED)), seed)
    W, H = SIZES[platform]
    if platform == "mobile" and rng.random() < .5:  # bottom sheet
        box = (0, rng.randint(H // 3, H - 150), W, H)
    else:
        w, h = rng.randint(min(W, 170), W - 16), rng.randint(150, min(H, 260) - 16)
        x, y = rng.randint(0, W - w), rng.randint(8, H - h)
        box = (x, y, x + w, y + h)
    extra = rng.choice((None, ("fields", rng.randint(1, 2)), ("icons", rng.randint(2, 5)), ("buttons", 2),
                        ("text", rng.randint(1, 2))))
    title = rng.choice(DIALOG_TITLES)
    out = dialog(under, rng, box, title, avoid={title}, dim=rng.uniform(.25, .6), checks=(1, 4),
                 blocks=[extra] if extra else [], n_buttons=rng.randint(1, 3))
    out.template = gui.DIALOG
    return out
