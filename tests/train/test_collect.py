"""Collecting one training step (:mod:`acrl.train.collect`): the episode settings of each step (α schedule, turns),
the episodes run while π_ref's log-probs are computed (with the same results as one after the other), the step's
rewards, masks and metrics, and a step whose episodes failed too often."""

import json
import threading
import time

import pytest
import torch

from acrl.backends.tiny import TinyCaptioner
from acrl.config import Config, validate
from acrl.train.collect import collect, episode_config, rollout_step
from train.conftest import MICRO, Reasoner, SharedSampling, config, problems


def _cfg(**train):
    cfg = Config()
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return validate(cfg)


@pytest.mark.parametrize("schedule,alphas", [
    ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [1.0, 0.75, 0.5, 0.25, 0.0]),
    ("step", [1.0, 1.0, 0.0, 0.0, 0.0]),    # alpha_step_at 0.4 of 5 steps: from step 2 on
])
def test_episode_config_follows_the_schedule(schedule, alphas):
    cfg = _cfg(steps=5, alpha=1.0, alpha_end=0.0, alpha_schedule=schedule, alpha_step_at=0.4, max_clarifications=2)
    got = [episode_config(cfg, s) for s in range(5)]
    assert [e.alpha for e in got] == pytest.approx(alphas)
    assert {e.max_clarifications for e in got} == {2} and got[0].turn_rewards is None


def test_overlapped_reference_pass_changes_nothing():
    """The episodes run in a thread while π_ref's log-probs are computed; results equal the sequential path."""
    cfg = config()
    out = {}
    for overlap in (False, True):
        policy = SharedSampling(TinyCaptioner.create(MICRO, seed=0), cfg.train.problems_per_step)
        reasoner = Reasoner(delay=0.2)
        torch.manual_seed(0)
        roll, groups, ref, times = rollout_step(policy, problems(0, 4), reasoner, policy, cfg, overlap=overlap)
        out[overlap] = roll, json.dumps([[ep.to_json() for ep in g] for g in groups]), ref   # NaN == NaN
        if overlap:
            assert times["reference"] > 0 and times["episodes"] >= 0.2
    (r0, g0, ref0), (r1, g1, ref1) = out[False], out[True]
    assert torch.equal(r0.tokens, r1.tokens) and g0 == g1 and torch.equal(ref0, ref1)


def test_overlap_really_overlaps():
    cfg = config()
    policy = SharedSampling(TinyCaptioner.create(MICRO, seed=0), cfg.train.problems_per_step)
    seen = {}
    inner_logprobs = policy.inner.logprobs

    def logprobs(*a, **kw):   # record when the reference pass runs and in which thread
        seen.setdefault("start", time.perf_counter())
        seen["thread"] = threading.current_thread()
        return inner_logprobs(*a, **kw)

    policy.inner.logprobs = logprobs
    reasoner = Reasoner(delay=0.3)
    rollout_step(policy, problems(0, 4), reasoner, policy, cfg, overlap=True)
    first_call_start, first_call_end = reasoner.calls[0]
    assert seen["thread"] is threading.main_thread()
    assert seen["start"] < first_call_end


class _Seeded:
    """The micro captioner, recording the sampling seeds it is given."""

    def __init__(self):
        self.inner, self.seeds = TinyCaptioner.create(MICRO, seed=0), []

    def set_sampling_seed(self, seed):
        self.seeds.append(seed)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_step_collects_the_batch_at_its_cursor_with_its_rewards_masks_and_metrics():
    cfg = config()
    cfg.train.seed, cfg.train.alpha_schedule, cfg.train.alpha, cfg.train.alpha_end = 3, "linear", 1.0, 0.0
    asked = []

    def source(start, n):
        asked.append((start, n))
        return problems(start, n)

    policy = _Seeded()
    torch.manual_seed(0)
    step = collect(cfg, policy, Reasoner(), policy, source, step=1, cursor=8)
    assert asked == [(8, 4)] and policy.seeds == [3 * 1_000_003 + 1 * 1_009]
    assert [p.id for p in step.problems] == ["p8", "p9", "p10", "p11"] and step.mine == slice(0, 4)
    assert step.rewards.shape == step.valid.shape == (4, 4) and step.alpha == 0.0      # the last of two steps
    assert [[ep.group for ep in g] for g in step.groups] == [[i] * 4 for i in range(4)]
    flat = [ep for g in step.groups for ep in g]
    assert step.valid.flatten().tolist() == [ep.tier != "failed" for ep in flat]
    live = step.rewards[step.valid]
    assert live.tolist() == [ep.reward for ep in flat if ep.tier != "failed"]
    m = step.metrics()
    assert m["reward_alpha"] == 0.0 and m["failed_episodes"] == int((~step.valid).sum()) > 0
    assert "acc_deny" not in m and m["episodes"] == 16
    assert step.failed == ""                                        # under train.max_failed_fraction (0.5)
    assert {"generation", "reference", "episodes", "reasoner", "clarification", "sync"} <= set(step.times)


class _Down:
    def complete(self, prompts):
        return [ConnectionError("reasoner unreachable") for _ in prompts]


def test_a_step_whose_episodes_failed_too_often_says_why():
    cfg = config()
    policy = TinyCaptioner.create(MICRO, seed=0)
    step = collect(cfg, policy, _Down(), policy, problems, step=0, cursor=0)
    assert not step.valid.any()
    assert step.failed == ("100% of the step's episodes failed (limit 50%): ConnectionError: reasoner unreachable")
