"""The reward (:mod:`acrl.core.reward`): the tiers 1 / α / 0, turn rewards, α schedules, the tiered reward's binary
components and the co-trained reasoner's reward."""

import math

import pytest
import torch

from acrl.core.reward import reasoner_rewards, scheduled_alpha, tier_reward, tiered_components, turn_reward
from acrl.rollout.episode import Episode

T = torch.tensor


def test_tier_reward_values():
    assert tier_reward("direct_correct") == 1.0
    assert tier_reward("clarified_correct", 0.7) == 0.7
    assert tier_reward("clarified_correct", 0.0) == 0.0
    assert tier_reward("wrong") == 0.0
    assert math.isnan(tier_reward("failed"))            # no reward: left out of its group, never a 0


def test_turn_reward_and_its_errors():
    assert [turn_reward(k, 0.5) for k in range(4)] == [1.0, 0.5, 0.25, 0.125]
    assert turn_reward(2, 0.5, [1, 0.8, 0.6]) == 0.6
    with pytest.raises(ValueError, match="no reward for 3"):
        turn_reward(3, 0.5, [1, 0.8, 0.6])


def test_alpha_zero_pays_only_a_self_sufficient_caption_over_any_number_of_turns():
    assert [turn_reward(k, 0.0) for k in range(4)] == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [0.7, 0.7, 0.7, 0.7, 0.7]),
    ("linear", [1.0, 0.75, 0.5, 0.25, 0.0]),
    ("cosine", [1.0, 0.8535534, 0.5, 0.1464466, 0.0]),
    ("step", [1.0, 1.0, 1.0, 0.0, 0.0]),      # switches at 0.5 * 5 steps: steps 3, 4 get alpha_end
])
def test_alpha_schedules_at_given_steps(schedule, expected):
    start = 0.7 if schedule == "constant" else 1.0
    got = [scheduled_alpha(schedule, start, 0.0, s, 5) for s in range(5)]
    assert got == pytest.approx(expected)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'exp'"):
        scheduled_alpha("exp", 1, 0, 0, 10)


def test_the_step_schedule_switches_at_its_fraction_and_one_step_runs_start():
    assert [scheduled_alpha("step", 1.0, 0.2, s, 10, at=0.25) for s in range(4)] == [1.0, 1.0, 1.0, 0.2]
    assert [scheduled_alpha(k, 0.9, 0.1, 0, 1) for k in ("linear", "cosine")] == [0.9, 0.9]


def test_tiered_components():
    correct = T([[True, True, False, False]])
    direct = T([[True, False, True, False]])  # a wrong direct answer earns nothing
    comps, w = tiered_components(correct, direct, 0.7)
    assert comps[0].tolist() == [[1, 1], [1, 0], [0, 0], [0, 0]]
    assert w == pytest.approx([0.7, 0.3])
    # R = 0.7 correct + 0.3 (correct and direct) = (1, 0.7, 0, 0)
    assert (comps * T(w)).sum(-1)[0].tolist() == pytest.approx([1.0, 0.7, 0.0, 0.0])
    with pytest.raises(ValueError):
        tiered_components(correct, direct, 1.5)


def test_reasoner_reward_is_correct_minus_the_cost_of_questions():
    eps = [Episode("p", 0, 0, "c", correct=True), Episode("p", 0, 1, "c", correct=True, questions=["q"]),
           Episode("p", 0, 2, "c", questions=["q"]), Episode("p", 0, 3, "c", tier="failed")]
    r, valid = reasoner_rewards([eps], 0.25)
    assert r.tolist() == [[1.0, 0.75, -0.25, 0.0]] and valid.tolist() == [[True, True, True, False]]
