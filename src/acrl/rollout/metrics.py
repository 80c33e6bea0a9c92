"""Counts and rates over episodes: one function for training and evaluation."""

from __future__ import annotations

from collections.abc import Sequence

from acrl.rollout.episode import Episode
from acrl.rollout.replies import parse_reply


def episode_metrics(groups: Sequence[Sequence[Episode]]) -> dict[str, float]:
    """Counts and rates over a set of episodes (failed episodes are counted and excluded from the rates)."""
    flat = [ep for g in groups for ep in g]
    live = [ep for ep in flat if ep.tier != "failed"]
    n = max(len(live), 1)
    asked = [ep for ep in live if ep.decision == "ask"]
    denied = [ep for ep in asked if ep.deny_correct is not None]
    return {
        "episodes": len(flat),
        "failed": len(flat) - len(live),
        "malformed": sum(ep.malformed is not None for ep in live),
        "ambiguous": sum(parse_reply(r).ambiguous is not None for ep in live for r in ep.replies),
        "reward": sum(ep.reward for ep in live) / n,
        "accuracy": sum(ep.correct for ep in live) / n,
        "direct_correct": sum(ep.tier == "direct_correct" for ep in live) / n,
        "clarification_rate": len(asked) / n,
        "clarified_accuracy": sum(ep.correct for ep in asked) / max(len(asked), 1),
        "acc_deny": (sum(bool(ep.deny_correct) for ep in denied) / len(denied)) if denied else float("nan"),
        "caption_words": sum(len(ep.caption.split()) for ep in live) / n,
        "mean_turns": sum(ep.turns for ep in live) / n,
    }
