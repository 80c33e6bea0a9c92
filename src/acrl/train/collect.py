"""Collect one training step: sample captions -> run their episodes ∥ π_ref's log-probs -> gather the groups.

Under ``accelerate launch`` every rank samples and runs its share of the step's problems; the groups of episodes
are gathered so that advantages and metrics are computed over the whole batch (:mod:`acrl.train.distributed`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from acrl.config import Config
from acrl.core.reward import scheduled_alpha
from acrl.core.update import reference_logprobs
from acrl.problem import Problem
from acrl.rollout.episode import Episode, EpisodeConfig, run_episodes
from acrl.rollout.metrics import episode_metrics
from acrl.rollout.protocols import Clarifier, Policy, Reasoner, Rollout
from acrl.train.distributed import SINGLE, Dist, shard


class _Timed:
    """Wraps a reasoner or clarifier and accumulates the seconds spent in it (inside ``lock``, if given)."""

    def __init__(self, inner, method: str, lock: threading.Lock | None = None):
        self.inner, self.method, self.seconds = inner, method, 0.0
        self.lock = lock or contextlib.nullcontext()

    def _call(self, *args):
        with self.lock:
            t = time.perf_counter()
            try:
                return getattr(self.inner, self.method)(*args)
            finally:
                self.seconds += time.perf_counter() - t

    def complete(self, prompts):
        return self._call(prompts)

    def answer(self, images, questions):
        return self._call(images, questions)


def episode_config(cfg: Config, step: int) -> EpisodeConfig:
    """How the episodes of training step ``step`` (0-based) run: α from ``train.alpha_schedule``, up to
    ``train.max_clarifications`` turns, ``train.turn_rewards``."""
    tc = cfg.train
    alpha = scheduled_alpha(tc.alpha_schedule, tc.alpha, tc.alpha_end, step, tc.steps, tc.alpha_step_at)
    return EpisodeConfig(alpha=alpha, clarification="on", max_clarifications=tc.max_clarifications,
                         turn_rewards=tc.turn_rewards or None)


def rollout_step(policy: Policy, problems: list[Problem], reasoner: Reasoner, clarifier: Clarifier, cfg: Config,
                 overlap: bool = True, step: int = 0):
    """Generate M captions per problem, run their episodes and (if ``kl_beta > 0``) compute π_ref's log-probs.

    Returns ``(rollout, groups, reference log-probs or None, seconds per phase)``.

    ``overlap``: the episodes run in a worker thread while this thread computes π_ref's log-probs, which need only
    the captions; the reasoner's calls (a server round trip, or a model on another device) then do not wait for
    them. The clarifier and the log-prob pass may share a model (π_ref is the policy with its adapter disabled),
    so they take turns through a lock. Neither consumes random numbers, so the results do not depend on ``overlap``.
    """
    tc = cfg.train
    t0 = time.perf_counter()
    temperature = cfg.captioner.temperature   # 0: greedy (log-probs then at temperature 1)
    rollout = policy.generate([p.image for p in problems], [p.question_with_choices() for p in problems],
                              n=tc.samples_per_problem, temperature=temperature or 1.0,
                              max_new_tokens=cfg.captioner.max_new_tokens, greedy=temperature == 0)
    times = {"generation": time.perf_counter() - t0, "reference": 0.0}
    lock = threading.Lock()
    timed_r, timed_c = _Timed(reasoner, "complete"), _Timed(clarifier, "answer", lock)

    def episodes():
        return run_episodes(problems, rollout.texts, timed_r, timed_c, episode_config(cfg, step))

    def reference():
        with lock:
            t = time.perf_counter()
            out = reference_logprobs(policy, rollout, tc.micro_batch) if tc.kl_beta > 0 else None
            times["reference"] = time.perf_counter() - t
            return out

    t0 = time.perf_counter()
    if overlap and tc.kl_beta > 0:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(episodes)
            ref = reference()
            groups = running.result()
    else:
        groups = episodes()
        ref = reference()
    times.update(episodes=time.perf_counter() - t0, reasoner=timed_r.seconds, clarification=timed_c.seconds)
    return rollout, groups, ref, times


@dataclass
class Step:
    """What one step collected. ``groups``: the whole batch's episodes (every rank's, in rank order); ``rollout``
    and ``ref``: this rank's rows (``mine``: its problems' index range in the batch); ``rewards`` / ``valid``:
    B x M over the whole batch; ``failed``: why the step cannot count (too many failed episodes), else ""."""

    problems: list[Problem]
    mine: slice
    rollout: Rollout
    groups: list[list[Episode]]
    ref: torch.Tensor | None
    rewards: torch.Tensor
    valid: torch.Tensor
    alpha: float
    times: dict
    failed: str = ""

    def metrics(self) -> dict:
        """The step's episode metrics (``reward_alpha``: this step's α; ``alpha`` is BNPO's Beta fit)."""
        return {**{k: v for k, v in episode_metrics(self.groups).items() if k != "acc_deny"},
                "failed_episodes": int((~self.valid).sum()), "reward_alpha": self.alpha}


def collect(cfg: Config, policy: Policy, reasoner: Reasoner, clarifier: Clarifier, problems, step: int,
            cursor: int, dist: Dist = SINGLE) -> Step:
    """Collect training step ``step`` (0-based) from the problems at ``cursor`` onwards (``problems(start, n)``)."""
    tc = cfg.train
    mine = shard(tc.problems_per_step, dist)
    policy.set_sampling_seed(tc.seed * 1_000_003 + step * 1_009 + dist.rank)
    batch = problems(cursor + mine.start, mine.stop - mine.start)
    rollout, groups, ref, times = rollout_step(policy, batch, reasoner, clarifier, cfg, overlap=tc.overlap, step=step)
    t0 = time.perf_counter()
    groups = [g for part in dist.gather(groups) for g in part]   # the whole batch, in rank order
    for i, g in enumerate(groups):
        for ep in g:
            ep.group = i
    times["sync"] = time.perf_counter() - t0
    rewards = torch.tensor([[ep.reward for ep in g] for g in groups], dtype=torch.float64)
    valid = torch.tensor([[ep.tier != "failed" for ep in g] for g in groups])
    out = Step(batch, mine, rollout, groups, ref, rewards, valid, episode_config(cfg, step).alpha, times)
    failed_frac = 1.0 - valid.float().mean().item()
    if failed_frac > tc.max_failed_fraction:
        err, _ = Counter(ep.error for g in groups for ep in g if ep.tier == "failed").most_common(1)[0]
        out.failed = f"{failed_frac:.0%} of the step's episodes failed (limit {tc.max_failed_fraction:.0%}): {err}"
    return out
