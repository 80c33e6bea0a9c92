"""The AC-RL training loop: rollout -> episodes -> advantages -> update; metrics, transcripts, checkpoints.

One step::

    problems (B)  ──► policy.generate(n=M)      captions c0 with old log-probs
                  ──► run_episodes(...)          reasoner decides; π_ref answers the clarified subset (up to K
                                                 turns); tiered reward with this step's α (episode_config)
                      ∥ π_ref log-probs          (for the KL term, computed meanwhile: they need only the captions)
                  ──► compute_advantages(...)    BNPO (or GRPO / RLOO) over each group of M
                  ──► policy_loss(...)           clipped surrogate + β·KL(π_θ || π_ref), only caption tokens
                  ──► optimizer step

The trainer only talks to the ``Policy``, ``Reasoner`` and ``Clarifier`` protocols; which backend sits behind them
is decided by ``acrl.app.assemble``. A policy may also define ``before_update()`` / ``after_update()``, called around each
optimisation step (a vLLM rollout engine sleeps during the update and receives the new adapter after it).

Several processes (``accelerate launch``): each rank runs its share of the step's problems and the episodes are
gathered, so advantages and metrics are computed over the whole batch; see :mod:`acrl.train.distributed`. With one
process every distributed call is a no-op.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable

import torch
from tqdm import tqdm

from acrl.config import Config
from acrl.core.advantages import compute_advantages
from acrl.core.reward import tiered_components
from acrl.core.update import _call_hook, update
from acrl.problem import Problem
from acrl.rollout.metrics import episode_metrics
from acrl.rollout.protocols import Clarifier, Policy, Reasoner
from acrl.train import checkpoint as ckpt
from acrl.train.checkpoint import TrainState, _rng_state, _set_rng_state, _set_seed, save_checkpoint
from acrl.train.collect import episode_config, rollout_step
from acrl.train.distributed import Dist, setup, shard
from acrl.train.guard import Interrupted, ServiceDown, _Abandon, _say, _StopSignals, _wait_for_service
from acrl.train.run import _open_run, _RunLog, _Trackers

ProblemSource = Callable[[int, int], list[Problem]]  # (start index, count) -> problems


def train(cfg: Config, policy: Policy, reasoner: Reasoner, clarifier: Clarifier, problems: ProblemSource,
          out: str, resume: bool | str = False, evaluate_fn: Callable[[int], dict] | None = None,
          progress: bool = True, overwrite: bool = False, colearner=None) -> list[dict]:
    """Run AC-RL; writes ``metrics.jsonl``, ``episodes.jsonl`` and ``checkpoint-<step>/`` under ``out``. Returns
    the metrics of the steps run by this call.

    ``resume``: True (the newest complete checkpoint in ``out``) or a checkpoint path; the policy must have been
    loaded from that checkpoint's ``policy/``. Without it, a run already in ``out`` is refused (RunExists) unless
    ``overwrite``. A step whose episodes failed (service outage) is retried from the same random state and never
    counted; when the service stays down the run is checkpointed and :class:`ServiceDown` raised. SIGINT / SIGTERM
    finish the current step, checkpoint and raise :class:`Interrupted` (a second signal abandons the step).

    Under ``accelerate launch`` every process runs this function on its own replica of the policy; only rank 0
    writes files and runs ``evaluate_fn`` (see the module docstring).

    ``colearner``: co-training (``train.cotrain``, :mod:`acrl.train.learner`): ``reasoner`` is its recording reasoner,
    it updates the reasoner after every captioner update and is checkpointed with the policy (one process)."""
    tc = cfg.train
    d = setup()
    if colearner is not None and d.world > 1:
        raise ValueError("train.cotrain runs in one process (accelerate launch with one process, or plain acrl)")
    mine = shard(tc.problems_per_step, d)   # this rank's problems of each step
    main = d.is_main
    _set_seed(tc.seed + d.rank)             # rank 0 samples as a single process would
    d.broadcast(policy.trainable_parameters())
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    state = _open_run(out, opt, d, resume, overwrite, log=_say if main else lambda _: None)
    history: list[dict] = []
    tracker = _Trackers(tc.report_to, out, cfg, cpu=d.device.type == "cpu") if tc.report_to and main else None
    log = _RunLog(out, append=bool(resume)) if main else None
    bar = tqdm(total=tc.steps, initial=state.step, desc=f"train α={tc.alpha}", disable=not (progress and main),
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)
    saved = state.step if resume else -1    # the step of the newest checkpoint on disk

    def checkpoint(rng: list[dict] | None = None) -> str | None:
        nonlocal saved
        rng = rng or d.gather(_rng_state())   # every rank's, so that a resumed rank samples as it would have
        path = None
        if main and saved != state.step:
            path = save_checkpoint(out, policy, opt, state, cfg, rng, keep=tc.keep_checkpoints, colearner=colearner)
        d.barrier()                           # no rank goes on (or returns) before the checkpoint is written
        saved = state.step
        return path or ckpt.latest(out).path

    stop, retry = _StopSignals(main), 0
    try:
        with stop:
            while state.step < tc.steps:
                start_rng = _rng_state()
                try:
                    with stop.armed():
                        rec, failed = _run_step(cfg, policy, opt, reasoner, clarifier, problems, state, mine, d,
                                                stop, colearner)
                except _Abandon as e:   # a second signal during the step
                    if e.consistent:    # the parameters are still those of state.step: save them
                        raise Interrupted(stop.signum, state.step, checkpoint(d.gather(start_rng))) from None
                    raise Interrupted(stop.signum, state.step, None) from None
                if rec is None:          # the step's episodes failed: retry it from the same random state
                    _set_rng_state(start_rng)
                    state.retried_steps += 1
                    retry += 1
                    if retry > tc.step_retries or not _wait_for_service(failed, state.step + 1, retry, tc, stop,
                                                                        main):
                        if stop.signum:
                            raise Interrupted(stop.signum, state.step, checkpoint(d.gather(start_rng)))
                        raise ServiceDown(state.step, failed, checkpoint(d.gather(start_rng)))
                    continue
                retry = 0
                state.step += 1
                state.cursor += tc.problems_per_step
                state.failed_episodes += rec["failed_episodes"]
                rec["retried_steps_total"], rec["failed_episodes_total"] = state.retried_steps, state.failed_episodes
                if main and evaluate_fn and tc.eval_every and (state.step % tc.eval_every == 0
                                                               or state.step == tc.steps):
                    rec["eval"] = evaluate_fn(state.step)
                if log:
                    log.write(rec, rec.pop("_groups")[: tc.log_episodes], state.step)
                rec.pop("_groups", None)
                history.append(rec)
                if tracker:
                    tracker.log(rec)
                bar.update(1)
                bar.set_postfix(reward=f"{rec['reward']:.2f}", direct=f"{rec['direct_correct']:.2f}",
                                clar=f"{rec['clarification_rate']:.2f}", kl=f"{rec.get('kl_mean', 0):.3f}")
                if state.step % tc.checkpoint_every == 0 or state.step == tc.steps:
                    checkpoint()
                if stop.signum:
                    raise Interrupted(stop.signum, state.step, checkpoint())
    finally:
        bar.close()
        if log:
            log.close()
        if tracker:
            tracker.close()
    return history


def _run_step(cfg: Config, policy: Policy, opt, reasoner, clarifier, problems: ProblemSource, state: TrainState,
              mine: slice, d: Dist, stop: _StopSignals, colearner=None) -> tuple[dict | None, str]:
    """One training step: rollout -> episodes -> advantages -> update. Returns ``(metrics, "")``, or ``(None,
    reason)`` when too many episodes failed (nothing was updated; the caller retries the step)."""
    tc = cfg.train
    t_step = time.perf_counter()
    for g in opt.param_groups:
        g["lr"] = tc.lr * min(1.0, (state.step + 1) / tc.warmup) if tc.warmup else tc.lr
    _call_hook(policy, "set_sampling_seed", tc.seed * 1_000_003 + state.step * 1_009 + d.rank)
    batch = problems(state.cursor + mine.start, mine.stop - mine.start)
    ecfg = episode_config(cfg, state.step)
    rollout, groups, ref, times = rollout_step(policy, batch, reasoner, clarifier, cfg, overlap=tc.overlap,
                                               step=state.step)
    t0 = time.perf_counter()
    groups = [g for part in d.gather(groups) for g in part]   # the whole batch, in rank order
    for i, g in enumerate(groups):
        for ep in g:
            ep.group = i
    times["sync"] = time.perf_counter() - t0
    rewards = torch.tensor([[ep.reward for ep in g] for g in groups], dtype=torch.float64)
    valid = torch.tensor([[ep.tier != "failed" for ep in g] for g in groups])
    failed_frac = 1.0 - valid.float().mean().item()
    if failed_frac > tc.max_failed_fraction:
        errors = Counter(ep.error for g in groups for ep in g if ep.tier == "failed")
        err, _ = errors.most_common(1)[0]
        return None, f"{failed_frac:.0%} of the step's episodes failed (limit {tc.max_failed_fraction:.0%}): {err}"
    rec: dict = {"step": state.step + 1, **{k: v for k, v in episode_metrics(groups).items() if k != "acc_deny"}}
    rec["failed_episodes"] = int((~valid).sum())
    rec["reward_alpha"] = ecfg.alpha   # this step's α (train.alpha_schedule); "alpha" is BNPO's Beta fit
    kw = {}
    if tc.advantage == "bnpo_decomposed":
        correct = torch.tensor([[ep.correct for ep in g] for g in groups])
        direct = torch.tensor([[ep.tier == "direct_correct" for ep in g] for g in groups])
        kw["components"], kw["weights"] = tiered_components(correct, direct, ecfg.alpha)
    adv, ast = compute_advantages(torch.nan_to_num(rewards, nan=0.0), tc.advantage, mask=valid, **kw)
    t0 = time.perf_counter()
    stop.in_update = True
    _call_hook(policy, "before_update")
    ust = update(policy, opt, rollout, adv[mine].reshape(-1), valid[mine].reshape(-1), cfg, ref, d)
    _call_hook(policy, "after_update")
    if colearner is not None:   # co-training: the reasoner learns from the same episodes
        rec.update(colearner.update(groups, batch, state.step))
    stop.in_update = False
    times["update"] = time.perf_counter() - t0
    rec.update({k: v for k, v in ast.items() if isinstance(v, (int, float))})
    rec.update(ust)
    rec["caption_tokens"] = float(d.all_sum(rollout.mask.sum()) / rewards.numel())
    rec["lr"] = opt.param_groups[0]["lr"]
    rec.update({f"time_{k}": round(v, 4) for k, v in times.items()})   # rank 0's own timings
    rec["time_step"] = round(time.perf_counter() - t_step, 4)
    rec["_groups"] = groups
    return rec, ""
