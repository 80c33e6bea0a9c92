"""The AC-RL training loop: rollout -> episodes -> advantages -> update; metrics, transcripts, checkpoints.

One step::

    problems (B)  ──► policy.generate(n=M)      captions c0 with old log-probs
                  ──► run_episodes(...)          reasoner decides; π_ref answers the clarified subset; tiered reward
                      ∥ π_ref log-probs          (for the KL term, computed meanwhile: they need only the captions)
                  ──► compute_advantages(...)    BNPO (or GRPO / RLOO) over each group of M
                  ──► policy_loss(...)           clipped surrogate + β·KL(π_θ || π_ref), only caption tokens
                  ──► optimizer step

The trainer only talks to the ``Policy``, ``Reasoner`` and ``Clarifier`` protocols; which backend sits behind them
is decided by ``acrl.build``. A policy may also define ``before_update()`` / ``after_update()``, called around each
optimisation step (a vLLM rollout engine sleeps during the update and receives the new adapter after it).

Several processes (``accelerate launch``): each rank runs its share of the step's problems and the episodes are
gathered, so advantages and metrics are computed over the whole batch; see :mod:`acrl.distributed`. With one
process every distributed call is a no-op.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from acrl.advantages import compute_advantages, tiered_components
from acrl.backends.base import Policy
from acrl.config import Config, to_dict
from acrl.distributed import SINGLE, Dist, setup, shard
from acrl.episode import Clarifier, EpisodeConfig, Reasoner, episode_metrics, run_episodes
from acrl.loss import policy_loss
from acrl.problem import Problem

ProblemSource = Callable[[int, int], list[Problem]]  # (start index, count) -> problems


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


@dataclass
class TrainState:
    step: int = 0
    cursor: int = 0  # index of the next training problem


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def save_checkpoint(path: str, policy: Policy, opt: torch.optim.Optimizer, state: TrainState, cfg: Config,
                    rng: list[dict] | None = None) -> None:
    """Write ``path`` atomically: everything goes to a temporary directory that is renamed into place.

    ``rng``: the random states of every rank, in rank order (default: this process's)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    policy.save(os.path.join(tmp, "policy"))
    torch.save({"optimizer": opt.state_dict(), "rng": rng or [_rng_state()], "step": state.step,
                "cursor": state.cursor}, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "config.json"), "w") as fh:
        json.dump(to_dict(cfg), fh, indent=1)
    old = path + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str, policy_opt: torch.optim.Optimizer, rank: int = 0) -> TrainState:
    """Restore the optimiser and this rank's random state; returns the step and data cursor.

    A rank the checkpoint holds no random state for (resumed with more processes than it was written with) is
    seeded from the step and its rank instead."""
    blob = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
    policy_opt.load_state_dict(blob["optimizer"])
    rng = blob["rng"] if isinstance(blob["rng"], list) else [blob["rng"]]
    if rank < len(rng):
        _set_rng_state(rng[rank])
    else:
        _set_seed(1_000_003 * blob["step"] + rank)
    return TrainState(step=blob["step"], cursor=blob["cursor"])


def reference_logprobs(policy: Policy, rollout, micro_batch: int) -> torch.Tensor:
    """π_ref's per-token log-probs of every rollout row (no gradient), ``micro_batch`` rows per forward."""
    rows = rollout.tokens.shape[0]
    return torch.cat([policy.logprobs(rollout, slice(i, i + micro_batch), reference=True)
                      for i in range(0, rows, micro_batch)])


def rollout_step(policy: Policy, problems: list[Problem], reasoner: Reasoner, clarifier: Clarifier, cfg: Config,
                 overlap: bool = True):
    """Generate M captions per problem, run their episodes and (if ``kl_beta > 0``) compute π_ref's log-probs.

    Returns ``(rollout, groups, reference log-probs or None, seconds per phase)``.

    ``overlap``: the episodes run in a worker thread while this thread computes π_ref's log-probs, which need only
    the captions; the reasoner's calls (a server round trip, or a model on another device) then do not wait for
    them. The clarifier and the log-prob pass may share a model (π_ref is the policy with its adapter disabled),
    so they take turns through a lock. Neither consumes random numbers, so the results do not depend on ``overlap``.
    """
    tc = cfg.train
    t0 = time.perf_counter()
    rollout = policy.generate([p.image for p in problems], [p.question_with_choices() for p in problems],
                              n=tc.samples_per_problem, temperature=cfg.captioner.temperature,
                              max_new_tokens=cfg.captioner.max_new_tokens)
    times = {"generation": time.perf_counter() - t0, "reference": 0.0}
    lock = threading.Lock()
    timed_r, timed_c = _Timed(reasoner, "complete"), _Timed(clarifier, "answer", lock)

    def episodes():
        return run_episodes(problems, rollout.texts, timed_r, timed_c,
                            EpisodeConfig(alpha=tc.alpha, clarification="on"))

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


_STATS = ("loss", "kl_mean", "clip_frac", "ratio_mean")


def update(policy: Policy, opt: torch.optim.Optimizer, rollout, advantages: torch.Tensor, valid: torch.Tensor,
           cfg: Config, ref: torch.Tensor | None = None, dist: Dist = SINGLE) -> dict:
    """One or more optimisation epochs over the rollout; only valid (non-failed) caption rows carry gradient.

    ``ref``: π_ref's log-probs of the rollout (computed here when missing and ``kl_beta > 0``). With several
    processes, ``rollout`` holds this rank's rows: the loss is normalised by the token / sequence counts of the
    whole batch, so the gradients summed over ranks equal the single-process gradient of the whole batch.
    """
    tc = cfg.train
    rows = rollout.tokens.shape[0]
    mask = rollout.mask * valid[:, None].float()
    adv = advantages.to(torch.float32)
    if ref is None and tc.kl_beta > 0:
        ref = reference_logprobs(policy, rollout, tc.micro_batch)
    counts = dist.all_sum(torch.stack([mask.sum(), (mask.sum(1) > 0).sum().float()]))
    total_tokens, n_seqs = counts.clamp(min=1)
    params = policy.trainable_parameters()
    stats: dict[str, float] = {}
    for _ in range(tc.epochs):
        opt.zero_grad(set_to_none=True)
        agg = torch.zeros(len(_STATS) + 1, dtype=torch.float64)   # share-weighted stats, then "trained at all"
        for i in range(0, rows, tc.micro_batch):
            sl = slice(i, i + tc.micro_batch)
            m = mask[sl]
            if m.sum() == 0:
                continue
            logp = policy.logprobs(rollout, sl)
            loss, st = policy_loss(logp, rollout.logprobs[sl], adv[sl], m, None if ref is None else ref[sl],
                                   clip_low=tc.clip_low, clip_high=tc.clip_high, kl_beta=tc.kl_beta,
                                   aggregation=tc.aggregation)
            share = (m.sum() / total_tokens) if tc.aggregation == "token-mean" else ((m.sum(1) > 0).sum() / n_seqs)
            (loss * share).backward()
            agg += torch.tensor([float(st[k]) * float(share) for k in _STATS] + [1.0], dtype=torch.float64)
        dist.sum_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        agg = dist.all_sum(agg)
        stats = {**(dict(zip(_STATS, agg.tolist())) if agg[-1] > 0 else {}), "grad_norm": float(grad_norm)}
    return stats


def _call_hook(policy: Policy, name: str) -> None:
    """Call ``policy.<name>()`` if the policy defines it (``before_update`` / ``after_update``)."""
    hook = getattr(policy, name, None)
    if callable(hook):
        hook()


def train(cfg: Config, policy: Policy, reasoner: Reasoner, clarifier: Clarifier, problems: ProblemSource,
          out: str, resume: bool = False, evaluate_fn: Callable[[int], dict] | None = None,
          progress: bool = True) -> list[dict]:
    """Run AC-RL; writes ``metrics.jsonl``, ``episodes.jsonl``, ``checkpoint/`` under ``out``. Returns the metrics.

    Under ``accelerate launch`` every process runs this function on its own replica of the policy; only rank 0
    writes files and runs ``evaluate_fn`` (see the module docstring)."""
    tc = cfg.train
    d = setup()
    mine = shard(tc.problems_per_step, d)   # this rank's problems of each step
    main = d.is_main
    os.makedirs(out, exist_ok=True)
    _set_seed(tc.seed + d.rank)             # rank 0 samples as a single process would
    d.broadcast(policy.trainable_parameters())
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    state = TrainState()
    ckpt = os.path.join(out, "checkpoint")
    if resume:
        if not os.path.exists(os.path.join(ckpt, "state.pt")):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt!r}")
        state = load_checkpoint(ckpt, opt, d.rank)
    mode = "a" if resume else "w"
    if resume and main:   # keep only the metrics of steps that the checkpoint covers
        _truncate_jsonl(os.path.join(out, "metrics.jsonl"), state.step)
        _truncate_jsonl(os.path.join(out, "episodes.jsonl"), state.step)
    history: list[dict] = []
    tracker = _Trackers(tc.report_to, out, cfg, cpu=d.device.type == "cpu") if tc.report_to and main else None
    mf = open(os.path.join(out, "metrics.jsonl") if main else os.devnull, mode)
    ef = open(os.path.join(out, "episodes.jsonl") if main else os.devnull, mode)
    bar = tqdm(total=tc.steps, initial=state.step, desc=f"train α={tc.alpha}", disable=not (progress and main),
               dynamic_ncols=True)
    try:
        while state.step < tc.steps:
            t_step = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = tc.lr * min(1.0, (state.step + 1) / tc.warmup) if tc.warmup else tc.lr
            batch = problems(state.cursor + mine.start, mine.stop - mine.start)
            state.cursor += tc.problems_per_step
            rollout, groups, ref, times = rollout_step(policy, batch, reasoner, clarifier, cfg,
                                                       overlap=getattr(tc, "overlap", True))
            t0 = time.perf_counter()
            groups = [g for part in d.gather(groups) for g in part]   # the whole batch, in rank order
            for i, g in enumerate(groups):
                for ep in g:
                    ep.group = i
            times["sync"] = time.perf_counter() - t0
            rewards = torch.tensor([[ep.reward for ep in g] for g in groups], dtype=torch.float64)
            valid = torch.tensor([[ep.tier != "failed" for ep in g] for g in groups])
            em = episode_metrics(groups)
            rec: dict = {"step": state.step + 1, **{k: v for k, v in em.items() if k != "acc_deny"}}
            failed_frac = 1.0 - valid.float().mean().item()
            if failed_frac > tc.max_failed_fraction:
                rec["skipped"] = f"{failed_frac:.0%} of episodes failed (limit {tc.max_failed_fraction:.0%})"
                if main:
                    tqdm.write(f"step {state.step + 1}: skipped, {rec['skipped']}")
            else:
                kw = {}
                if tc.advantage == "bnpo_decomposed":
                    correct = torch.tensor([[ep.correct for ep in g] for g in groups])
                    direct = torch.tensor([[ep.tier == "direct_correct" for ep in g] for g in groups])
                    kw["components"], kw["weights"] = tiered_components(correct, direct, tc.alpha)
                adv, ast = compute_advantages(torch.nan_to_num(rewards, nan=0.0), tc.advantage, mask=valid, **kw)
                t0 = time.perf_counter()
                _call_hook(policy, "before_update")
                ust = update(policy, opt, rollout, adv[mine].reshape(-1), valid[mine].reshape(-1), cfg, ref, d)
                _call_hook(policy, "after_update")
                times["update"] = time.perf_counter() - t0
                rec.update({k: v for k, v in ast.items() if isinstance(v, (int, float))})
                rec.update(ust)
            rec["caption_tokens"] = float(d.all_sum(rollout.mask.sum()) / rewards.numel())
            rec["lr"] = opt.param_groups[0]["lr"]
            rec.update({f"time_{k}": round(v, 4) for k, v in times.items()})   # rank 0's own timings
            rec["time_step"] = round(time.perf_counter() - t_step, 4)
            state.step += 1
            if main and evaluate_fn and tc.eval_every and (state.step % tc.eval_every == 0 or state.step == tc.steps):
                rec["eval"] = evaluate_fn(state.step)
            mf.write(json.dumps(rec) + "\n")
            mf.flush()
            for g in groups[: tc.log_episodes]:
                for ep in g:
                    ef.write(json.dumps({"step": state.step, **ep.to_json()}) + "\n")
            ef.flush()
            history.append(rec)
            if tracker:
                tracker.log(rec)
            bar.update(1)
            bar.set_postfix(reward=f"{rec['reward']:.2f}", direct=f"{rec['direct_correct']:.2f}",
                            clar=f"{rec['clarification_rate']:.2f}", kl=f"{rec.get('kl_mean', 0):.3f}")
            if state.step % tc.checkpoint_every == 0 or state.step == tc.steps:
                rng = d.gather(_rng_state())   # every rank's, so that a resumed rank samples as it would have
                if main:
                    save_checkpoint(ckpt, policy, opt, state, cfg, rng)
                d.barrier()                    # no rank goes on (or returns) before the checkpoint is written
    finally:
        bar.close()
        mf.close()
        ef.close()
        if tracker:
            tracker.close()
    return history


class _Trackers:
    """Step metrics to TensorBoard / Weights & Biases through accelerate's tracker API."""

    def __init__(self, report_to: str, out: str, cfg: Config, cpu: bool = True):
        import importlib.util

        from accelerate import Accelerator

        need = {"tensorboard": ["tensorboard", "tensorboardX"], "wandb": ["wandb"]}
        for name in (list(need) if report_to == "all" else report_to.split(",")):
            if name not in need:
                raise ValueError(f"train.report_to: unknown tracker {name!r} (tensorboard, wandb, all)")
            if not any(importlib.util.find_spec(m) for m in need[name]):
                raise ValueError(f"train.report_to={report_to!r} needs the {need[name][0]!r} package: "
                                 f"pip install {need[name][0]}")
        self.acc = Accelerator(log_with=report_to, project_dir=out, cpu=cpu)
        flat = {f"{s}.{k}": v for s, d in to_dict(cfg).items() if isinstance(d, dict)
                for k, v in d.items() if isinstance(v, (int, float, str, bool))}
        self.acc.init_trackers("acrl", config=flat)

    def log(self, rec: dict) -> None:
        vals = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
        vals.update({f"eval/{k}": v for k, v in rec.get("eval", {}).items()})
        self.acc.log(vals, step=rec["step"])

    def close(self) -> None:
        for t in self.acc.trackers:   # not end_training(): that also ends a multi-process run's process group
            t.finish()


def _truncate_jsonl(path: str, last_step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as fh:
        keep = [ln for ln in fh if ln.strip() and json.loads(ln).get("step", 0) <= last_step]
    with open(path, "w") as fh:
        fh.writelines(keep)
