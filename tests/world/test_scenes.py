"""Scenes of the world (:mod:`acrl.world.scenes`): facts drawn in their ranges, and pictures in which every quantity
can be read off the grid (a bar of height h is 6·h pixels tall, a rectangle of width w spans 6·w)."""

import random

import pytest

from acrl.config import WORLD_FAMILIES
from acrl.world.scenes import BAR_COLOURS, COLOURS, SIZE, render, sample_scene


def _coloured(img):
    """Pixels of a saturated colour (not the white ground, the grey grid or the ink), by column."""
    cols = {}
    for x in range(SIZE):
        for y in range(SIZE):
            p = img.getpixel((x, y))
            if max(p) - min(p) > 60:
                cols.setdefault(x, []).append((y, p))
    return cols


def _hue(rgb):
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], rgb)))


@pytest.mark.parametrize("family", WORLD_FAMILIES)
def test_facts_are_drawn_in_their_ranges_and_the_same_seed_draws_the_same_scene(family):
    for seed in range(30):
        facts, scene = sample_scene(family, random.Random(seed), n_bars=4)
        assert (facts, scene) == sample_scene(family, random.Random(seed), n_bars=4)
        lo, hi = {"bars": (1, 9), "shapes": (1, 5), "rect": (1, 8), "tri": (1, 8)}[family]
        assert all(lo <= v <= hi for v in facts.values())
        if family == "bars":
            assert set(facts) == {f"bar.{c}" for c in BAR_COLOURS} and sorted(scene["order"]) == sorted(BAR_COLOURS)
        if family == "shapes":
            assert len(set(scene["cells"])) == len(scene["colours"]) == facts["count.red"] + facts["count.blue"]
        img = render(family, facts, scene, random.Random(seed))
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"


def test_bars_are_drawn_left_to_right_in_order_six_pixels_a_unit():
    rng = random.Random(3)
    facts, scene = sample_scene("bars", rng, n_bars=3)
    cols = _coloured(render("bars", facts, scene, rng))
    bars, run = [], []
    for x in range(SIZE):                                            # group adjacent coloured columns into bars
        if x in cols:
            run.append(cols[x])
        elif run:
            bars.append(run)
            run = []
    assert len(bars) == 3
    for colour, bar in zip(scene["order"], bars):
        heights = {len(col) for col in bar}
        assert heights == {6 * facts[f"bar.{colour}"]} and _hue(bar[0][0][1]) == colour


@pytest.mark.parametrize("seed", range(5))
def test_a_rectangle_spans_six_pixels_a_unit_inside_its_outline(seed):
    rng = random.Random(seed)
    facts, scene = sample_scene("rect", rng)
    cols = _coloured(render("rect", facts, scene, rng))
    ys = [y for col in cols.values() for y, _ in col]
    assert len(cols) == 6 * facts["rect.width"] - 1 and max(ys) - min(ys) + 1 == 6 * facts["rect.height"] - 1
    assert {_hue(p) for col in cols.values() for _, p in col} == {scene["colour"]}


def test_an_unknown_family_is_named():
    with pytest.raises(ValueError, match="unknown world family 'pie'"):
        sample_scene("pie", random.Random(0))
    with pytest.raises(ValueError, match="unknown world family 'pie'"):
        render("pie", {}, {}, random.Random(0))
