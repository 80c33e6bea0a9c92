"""Collect one step: sample captions, run the episodes and, in parallel, the reference log-probs."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from acrl.config import Config
from acrl.core.reward import scheduled_alpha
from acrl.problem import Problem
from acrl.rollout.episode import EpisodeConfig, run_episodes
from acrl.rollout.protocols import Clarifier, Policy, Reasoner


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


def reference_logprobs(policy: Policy, rollout, micro_batch: int) -> torch.Tensor:
    """π_ref's per-token log-probs of every rollout row (no gradient), ``micro_batch`` rows per forward."""
    rows = rollout.tokens.shape[0]
    return torch.cat([policy.logprobs(rollout, slice(i, i + micro_batch), reference=True)
                      for i in range(0, rows, micro_batch)])


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
