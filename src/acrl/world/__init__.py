"""The embedded visual-math world: procedurally generated (image, question, answer) problems for CPU training.

Usage::

    from acrl.world import WorldConfig, make_problem, make_problems
    problems = make_problems("test", 500, WorldConfig())
"""

from __future__ import annotations

import random

from acrl.config import WORLD_FAMILIES as FAMILIES
from acrl.config import WorldConfig
from acrl.problem import Problem
from acrl.world import language
from acrl.world.language import (
    clarification_answer,
    clarification_question,
    fact_sentence,
    human_caption,
    oracle_caption,
)
from acrl.world.scenes import render, sample_scene

__all__ = [
    "WorldConfig", "make_problem", "make_problems", "human_caption_for", "clarification_pairs", "oracle_caption_for",
    "SPLIT_BASE", "FAMILIES", "fact_sentence", "clarification_question", "clarification_answer", "language",
]

SPLIT_BASE = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
SPLIT_SIZE = 1_000_000_000




def _rng(split: str, index: int, cfg: WorldConfig, salt: int = 0) -> random.Random:
    if split not in SPLIT_BASE:
        raise ValueError(f"split must be one of {list(SPLIT_BASE)}, got {split!r}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"problem index {index} out of range [0, {SPLIT_SIZE})")
    return random.Random((cfg.seed << 40) + (salt << 34) + SPLIT_BASE[split] + index)


def _pick_template(family: str, facts: dict[str, int], cfg: WorldConfig, rng: random.Random):
    sizes, weights = zip(*sorted(cfg.needed_facts.items()))
    want = rng.choices(sizes, weights=weights)[0]
    cands = [t for t in language.TEMPLATES if t.family == family and len(t.facts) <= len(facts)]
    avail = sorted({len(t.facts) for t in cands})
    size = min(avail, key=lambda s: (abs(s - want), -s))
    return rng.choice([t for t in cands if len(t.facts) == size])


def _fill(template, facts: dict[str, int], rng: random.Random) -> tuple[str, list[str]]:
    if template.family == "bars":
        colours = [k.split(".")[1] for k in facts]
        chosen = rng.sample(colours, len(template.facts))
        if template.op == "diff":
            chosen.sort(key=lambda c: -facts[f"bar.{c}"])
    elif template.family == "shapes":
        chosen = ["red", "blue"]
        rng.shuffle(chosen)
        if template.op == "diff":
            chosen.sort(key=lambda c: -facts[f"count.{c}"])
    else:
        chosen = []
    slots = {f"c{i + 1}": c for i, c in enumerate(chosen)}
    return template.text.format(**slots), [f.format(**slots) for f in template.facts]


def _choices(gold: float, rng: random.Random) -> list[str]:
    step = 0.5 if not float(gold).is_integer() else 1
    opts = {gold}
    while len(opts) < 4:
        cand = gold + step * rng.choice([-3, -2, -1, 1, 2, 3])
        if cand >= 0 or gold < 0:
            opts.add(cand)
    out = sorted(opts)
    return [language.format_number(x) for x in out]


def make_problem(split: str, index: int, cfg: WorldConfig | None = None) -> Problem:
    """The problem number ``index`` of ``split`` (deterministic)."""
    cfg = cfg or WorldConfig()
    rng = _rng(split, index, cfg)
    family = rng.choice(cfg.families)
    facts, scene = sample_scene(family, rng, n_bars=cfg.n_bars)
    template = _pick_template(family, facts, cfg, rng)
    question, needed = _fill(template, facts, rng)
    value = language.apply_op(template.op, [facts[k] for k in needed])
    answer = language.format_number(value)
    answer_type = "integer" if float(value).is_integer() else "float"
    choices = None
    if rng.random() < cfg.mc_rate:
        choices = _choices(value, rng)
        answer, answer_type = chr(65 + choices.index(answer)), "multiple_choice"
    image = render(family, facts, scene, rng)
    return Problem(
        id=f"world-{split}-{index:07d}", image=image, question=question, answer=answer, answer_type=answer_type,
        choices=choices, facts=facts, needed=needed, family=family, category=f"{family}/{len(needed)}-fact",
        difficulty=str(len(needed)), source="world", meta={"scene": scene, "op": template.op, "seed": cfg.seed},
    )


def make_problems(split: str, n: int, cfg: WorldConfig | None = None, start: int = 0) -> list[Problem]:
    """Problems ``start .. start+n-1`` of ``split``."""
    return [make_problem(split, i, cfg) for i in range(start, start + n)]


def human_caption_for(problem: Problem, rng: random.Random, fact_rate: float = 0.3) -> str:
    """A fresh human-style caption of a world problem (quantities mentioned with probability ``fact_rate``)."""
    return human_caption(problem.family, problem.facts, problem.meta["scene"], rng, fact_rate)


def oracle_caption_for(problem: Problem) -> str:
    """A caption stating every fact of a world problem."""
    return oracle_caption(problem.family, problem.facts, problem.meta["scene"])


def clarification_pairs(problem: Problem) -> list[tuple[str, str]]:
    """(question, answer sentence) for every fact of the scene: supervision for the reference's answers."""
    return [(clarification_question(k), clarification_answer(k, problem.facts)) for k in problem.facts]
