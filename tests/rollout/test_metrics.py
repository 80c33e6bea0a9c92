"""The counts and rates over episodes (:mod:`acrl.rollout.metrics`), on a hand-counted set: failed episodes are
counted and left out of every rate, Acc_deny is over the denied asks only."""

import math

import pytest

from acrl.rollout.episode import Episode
from acrl.rollout.metrics import episode_metrics


def _ep(caption="a b", **kw):
    return Episode("p", 0, 0, caption, **kw)


def test_rates_on_a_hand_counted_set():
    groups = [[
        _ep(decision="solved", correct=True, tier="direct_correct", reward=1.0, replies=["SOLVED \\boxed{1}"]),
        _ep("a b c d", decision="solved", replies=["The answer is \\boxed{50}."]),         # no keyword: ambiguous
        _ep(decision="ask", correct=True, tier="clarified_correct", reward=0.7, turns=1, deny_correct=False),
    ], [
        _ep(decision="ask", turns=2, deny_correct=True),
        _ep(decision="malformed", malformed="no_decision"),
        _ep("a b c d e f", decision="failed", tier="failed", reward=float("nan"), turns=3, error="HTTP 500"),
    ]]
    m = episode_metrics(groups)
    assert (m["episodes"], m["failed"], m["malformed"], m["ambiguous"]) == (6, 1, 1, 1)
    assert m["reward"] == pytest.approx(1.7 / 5) and m["accuracy"] == pytest.approx(2 / 5)
    assert m["direct_correct"] == pytest.approx(1 / 5) and m["clarification_rate"] == pytest.approx(2 / 5)
    assert m["clarified_accuracy"] == pytest.approx(1 / 2) and m["acc_deny"] == pytest.approx(1 / 2)
    assert m["caption_words"] == pytest.approx(12 / 5) and m["mean_turns"] == pytest.approx(3 / 5)


def test_no_live_episode_and_no_denial_give_zeros_and_nan_never_a_division_error():
    m = episode_metrics([[_ep(decision="failed", tier="failed", reward=float("nan"))]])
    assert (m["episodes"], m["failed"], m["reward"], m["clarification_rate"]) == (1, 1, 0.0, 0.0)
    assert math.isnan(m["acc_deny"])
    assert math.isnan(episode_metrics([[_ep(decision="ask")]])["acc_deny"])   # asked, but no denial recorded
    assert episode_metrics([])["episodes"] == 0
