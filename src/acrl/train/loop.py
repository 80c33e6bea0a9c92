"""The AC-RL training loop.

One step::

    problems (B)  ──► policy.generate(n=M)      captions c0 with old log-probs                 (collect)
                  ──► run_episodes(...)          reasoner decides; π_ref answers the clarified subset (up to K
                                                 turns); tiered reward with this step's α
                      ∥ π_ref log-probs          (for the KL term, computed meanwhile: they need only the captions)
                  ──► compute_advantages(...)    BNPO (or GRPO / RLOO) over each group of M       (learner)
                  ──► policy_loss(...)           clipped surrogate + β·KL(π_θ || π_ref), only caption tokens
                  ──► optimizer step
                  ──► metrics, transcripts, checkpoint                                           (run directory)

The loop talks to the ``Policy``, ``Reasoner`` and ``Clarifier`` protocols only; :mod:`acrl.app.assemble` decides
what sits behind them. Co-training adds a second learner (the reasoner's), updated from the same episodes.

Several processes (``accelerate launch``): each rank runs its share of the step's problems and the episodes are
gathered, so advantages and metrics are computed over the whole batch (:mod:`acrl.train.distributed`). With one
process every distributed call is a no-op.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from acrl.config import Config
from acrl.problem import Problem
from acrl.rollout.protocols import Clarifier, Policy, Reasoner
from acrl.train.checkpoint import set_seed
from acrl.train.collect import collect
from acrl.train.distributed import setup
from acrl.train.guard import Guard
from acrl.train.learner import CaptionerLearner, ReasonerLearner
from acrl.train.run import RunDir

ProblemSource = Callable[[int, int], list[Problem]]  # (start index, count) -> problems


@dataclass
class Run:
    """Everything one training run is made of (assembled from a config by :func:`acrl.app.assemble.make_run`).

    ``reasoner``: who replies in the episodes (co-training: ``colearner.recorder``). ``evaluate(step)``: held-out
    metrics, run by rank 0 every ``train.eval_every`` steps. ``resume``: True (the newest complete checkpoint in
    ``out``) or a checkpoint path, whose ``policy/`` the policy was loaded from; without it a run already in ``out``
    is refused unless ``overwrite``."""

    cfg: Config
    out: str
    policy: Policy
    reasoner: Reasoner
    clarifier: Clarifier
    problems: ProblemSource
    evaluate: Callable[[int], dict] | None = None
    colearner: ReasonerLearner | None = None
    reference: Policy | None = None   # π_ref for evaluation (the policy itself when it can disable its adapter)
    resume: bool | str = False
    overwrite: bool = False


def train(run: Run, progress: bool = True) -> list[dict]:
    """Run AC-RL; writes ``metrics.jsonl``, ``episodes.jsonl`` and ``checkpoint-<step>/`` under ``run.out`` and
    returns the metrics of the steps this call ran. SIGINT / SIGTERM finish the step, checkpoint and raise
    :class:`~acrl.train.guard.Interrupted`; a step whose episodes failed is retried from the same random state
    (:class:`~acrl.train.guard.ServiceDown` when the service stays down)."""
    cfg, d = run.cfg, setup()
    if run.colearner is not None and d.world > 1:
        raise ValueError("train.cotrain runs in one process (accelerate launch with one process, or plain acrl)")
    set_seed(cfg.train.seed + d.rank)   # rank 0 samples as a single process would
    learners = [CaptionerLearner(run.policy, cfg, d), *([run.colearner] if run.colearner else [])]
    with RunDir(run, learners, d, progress) as rundir, Guard(cfg.train, d, rundir.save) as guard:
        state = rundir.state

        def step() -> tuple[dict | None, str]:
            t0 = time.perf_counter()
            got = collect(cfg, run.policy, run.reasoner, run.clarifier, run.problems, state.step, state.cursor, d)
            if got.failed:
                return None, got.failed
            rec, t1 = {"step": state.step + 1, **got.metrics()}, time.perf_counter()
            with guard.updating():
                for learner in learners:
                    rec.update(learner.learn(got, state.step))
            got.times["update"] = time.perf_counter() - t1
            rec.update({f"time_{k}": round(v, 4) for k, v in got.times.items()})   # rank 0's own timings
            rec["time_step"] = round(time.perf_counter() - t0, 4)
            rec["_groups"] = got.groups
            return rec, ""

        while state.step < cfg.train.steps:
            rec, _ = guard.attempt(state, step)
            if rec is None:          # the step's episodes failed: tried again from the same random state
                continue
            rundir.record(rec, rec.pop("_groups"))
            guard.stop_if_asked(state)
    return rundir.history
