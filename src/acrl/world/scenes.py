"""Scene sampling and rendering for the four world families: bars, shapes, rect, tri.

Every quantity is drawn large, high-contrast and grid-aligned so that a tiny captioner trained from scratch on a CPU
can perceive it: bar heights on a unit grid, big circles and squares counted by colour, and a rectangle or a right
triangle anchored at the origin of a unit grid (so a side length is read like a bar height). No digits are drawn.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

SIZE = 64
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "purple": (150, 60, 190),
    "orange": (240, 140, 20),
}
BAR_COLOURS = ("red", "green", "blue", "purple")
GRID = (215, 215, 215)
INK = (30, 30, 30)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 20) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def sample_scene(family: str, rng: random.Random, n_bars: int = 3) -> tuple[dict[str, int], dict]:
    """Draw the facts of one scene, and the scene's non-quantitative details (slot order, kinds, colour)."""
    if family == "bars":
        colours = list(BAR_COLOURS[:n_bars])
        rng.shuffle(colours)
        facts = {f"bar.{c}": rng.randint(1, 9) for c in BAR_COLOURS[:n_bars]}
        return facts, {"order": colours}
    if family == "shapes":
        facts = {"count.red": rng.randint(1, 5), "count.blue": rng.randint(1, 5)}
        n = facts["count.red"] + facts["count.blue"]
        cells = rng.sample(range(16), n)
        colours = ["red"] * facts["count.red"] + ["blue"] * facts["count.blue"]
        kinds = [rng.choice(["circle", "square"]) for _ in range(n)]
        return facts, {"cells": cells, "colours": colours, "kinds": kinds}
    if family == "rect":
        return ({"rect.width": rng.randint(1, 8), "rect.height": rng.randint(1, 8)},
                {"colour": rng.choice(["red", "green", "blue", "orange", "purple"])})
    if family == "tri":
        return ({"tri.base": rng.randint(1, 8), "tri.height": rng.randint(1, 8)},
                {"colour": rng.choice(["red", "green", "blue", "orange", "purple"])})
    raise ValueError(f"unknown world family {family!r}")


def render(family: str, facts: dict[str, int], scene: dict, rng: random.Random) -> Image.Image:
    """Draw a 64x64 RGB picture of the scene."""
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    if family == "bars":
        unit, base = 6, 59
        for k in range(1, 10):
            d.line([(2, base - k * unit), (SIZE - 3, base - k * unit)], fill=GRID)
        n = len(scene["order"])
        slot = (SIZE - 6) // n
        for i, c in enumerate(scene["order"]):
            x0 = 4 + i * slot + (slot - 10) // 2
            d.rectangle([x0, base - facts[f"bar.{c}"] * unit, x0 + 9, base], fill=_jitter(COLOURS[c], rng))
        d.line([(1, base), (SIZE - 2, base)], fill=INK, width=2)
    elif family == "shapes":
        for cell, colour, kind in zip(scene["cells"], scene["colours"], scene["kinds"]):
            cx = (cell % 4) * 16 + 8 + rng.randint(-2, 2)
            cy = (cell // 4) * 16 + 8 + rng.randint(-2, 2)
            r = rng.randint(4, 6)
            box = [cx - r, cy - r, cx + r, cy + r]
            fill = _jitter(COLOURS[colour], rng)
            (d.ellipse if kind == "circle" else d.rectangle)(box, fill=fill)
    elif family in ("rect", "tri"):
        unit, ox, oy = 6, 7, 57
        for k in range(0, 9):
            d.line([(ox + k * unit, oy - 8 * unit), (ox + k * unit, oy)], fill=GRID)
            d.line([(ox, oy - k * unit), (ox + 8 * unit, oy - k * unit)], fill=GRID)
        fill = _jitter(COLOURS[scene["colour"]], rng)
        if family == "rect":
            w, h = facts["rect.width"], facts["rect.height"]
            d.rectangle([ox, oy - h * unit, ox + w * unit, oy], fill=fill, outline=INK)
        else:
            b, h = facts["tri.base"], facts["tri.height"]
            d.polygon([(ox, oy), (ox + b * unit, oy), (ox, oy - h * unit)], fill=fill, outline=INK)
        d.line([(ox, oy), (ox + 8 * unit + 3, oy)], fill=INK, width=1)
        d.line([(ox, oy), (ox, oy - 8 * unit - 3)], fill=INK, width=1)
    else:
        raise ValueError(f"unknown world family {family!r}")
    return img
