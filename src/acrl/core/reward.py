"""The reward: tiers (1 correct without clarification, alpha after one, 0 wrong), turn rewards and alpha schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from acrl.config import SCHEDULES

TIERS = ("direct_correct", "clarified_correct", "wrong", "failed")


def tier_reward(tier: str, alpha: float = 0.7) -> float:
    """The tiered reward: 1.0 correct without clarification, ``alpha`` correct after one, 0 wrong.

    ``alpha=0`` is the binary-reward ablation. ``failed`` (a service error) has no reward (NaN): it is excluded
    from its advantage group, never scored as 0.
    """
    return {"direct_correct": 1.0, "clarified_correct": alpha, "wrong": 0.0, "failed": float("nan")}[tier]


def turn_reward(turns: int, alpha: float = 0.7, table: Sequence[float] | None = None) -> float:
    """Reward of a correct answer after ``turns`` clarifications: ``table[turns]`` when a table is given
    (``train.turn_rewards``), else ``alpha ** turns`` (1, α, α², ...; with one turn the paper's tiers, and
    ``alpha=0`` stays binary: only a self-sufficient caption is paid)."""
    if table:
        if turns >= len(table):
            raise ValueError(f"turn_rewards has {len(table)} entries, no reward for {turns} clarifications")
        return float(table[turns])
    return 1.0 if turns == 0 else alpha ** turns




def scheduled_alpha(schedule: str, start: float, end: float, step: int, steps: int, at: float = 0.5) -> float:
    """α of training step ``step`` (0-based) of ``steps``: ``constant`` (``start``), ``linear`` or ``cosine``
    from ``start`` at the first step to ``end`` at the last, or ``step`` (``start`` before the fraction ``at`` of
    the run, ``end`` from then on)."""
    if schedule == "constant":
        return start
    t = step / max(steps - 1, 1)
    if schedule == "linear":
        return start + (end - start) * t
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "step":
        return start if step < at * steps else end
    raise ValueError(f"alpha schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def tiered_components(correct: Tensor, direct: Tensor, alpha: float) -> tuple[Tensor, list[float]]:
    """Split AC-RL's tiered reward into two binary components and their weights.

    R = alpha * correct + (1 - alpha) * (correct AND direct): 1 for a correct direct answer, alpha (0.7) for a
    correct answer after clarification, 0 when wrong. ``direct`` marks episodes answered without clarification
    (it is AND-ed with ``correct``, so a wrong direct answer earns nothing). Returns
    ``(components[G, M, 2] float, [alpha, 1 - alpha])`` for ``bnpo_decomposed_advantages``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    correct = correct.to(torch.bool)
    comps = torch.stack([correct, correct & direct.to(torch.bool)], dim=-1).to(torch.get_default_dtype())
    return comps, [float(alpha), 1.0 - float(alpha)]


def reasoner_rewards(groups: Sequence[Sequence[Any]], question_cost: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reasoner's reward of every episode, ``[G, M]``: 1 if its final answer is correct, else 0, minus
    ``question_cost`` per question asked; and the mask of episodes that did not fail."""
    rewards = torch.tensor([[float(ep.correct) - question_cost * len(ep.questions) for ep in g] for g in groups],
                           dtype=torch.float64)
    valid = torch.tensor([[ep.tier != "failed" for ep in g] for g in groups])
    return rewards, valid
