"""Composed GUI layouts: random arrangements of the generator's building blocks, for more varied training screens.

The fixed layout templates of :mod:`vlmkit.data.gui` (4 per platform for training, 2 held out) teach a grounder the
*places* where targets sit on those few layouts as much as the targets themselves; a head fine-tuned on them reached
0.88-0.99 on training layouts and 0.61-0.66 on the held-out ones. A composed screen (template index
:data:`vlmkit.data.gui.COMPOSED`) draws the platform's chrome, then a random choice of bars (menu bar, icon toolbar,
navigation links, app bar), a body split into 1-3 columns of random width, each filled top-down with a random list
of the same blocks the templates use (button rows, button stacks, fields, checkboxes, icon rows, icon grids, cards,
placeholder text), and sometimes a bottom bar. Font size, icon size and spacing are drawn per screen.

Composed screens only reuse the generic blocks; none of the held-out templates' arrangements is coded here, and
``templates="heldout"`` never includes them, so held-out evaluation stays on layouts the grounder never saw.
"""

from __future__ import annotations

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
    from vlmkit.data.gui import ICONS, font

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
