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
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from tqdm import tqdm

from acrl import checkpoint as ckpt
from acrl.advantages import compute_advantages, tiered_components
from acrl.backends.base import Policy
from acrl.config import Config, to_dict
from acrl.distributed import SINGLE, Dist, setup, shard
from acrl.episode import Clarifier, EpisodeConfig, Reasoner, episode_metrics, run_episodes, scheduled_alpha
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
    cursor: int = 0            # index of the next training problem
    retried_steps: int = 0     # step attempts abandoned because their episodes failed (a service outage)
    failed_episodes: int = 0   # episodes of counted steps that failed (masked out of their update)


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped the run. ``checkpoint``: where the state of ``step`` was saved (None: not saved,
    the step was abandoned in the middle of its update; the previous checkpoint holds)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class ServiceDown(Exception):
    """A step's episodes kept failing after ``train.step_retries`` retries; the run was checkpointed."""

    def __init__(self, step: int, reason: str, checkpoint: str | None):
        super().__init__(reason)
        self.step, self.reason, self.checkpoint = step, reason, checkpoint


class RunExists(ValueError):
    """``out`` already holds a run and neither resume nor overwrite was asked for."""


def _say(msg: str) -> None:
    """A line for the user on stderr that does not break the progress bar."""
    tqdm.write(msg, file=sys.stderr)


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(out: str, policy: Policy, opt: torch.optim.Optimizer, state: TrainState, cfg: Config,
                    rng: list[dict] | None = None, keep: int = 2, colearner=None) -> str:
    """Write ``out/checkpoint-<step>/`` crash-safely (see :mod:`acrl.checkpoint`); returns its path.

    ``rng``: the random states of every rank, in rank order (default: this process's). ``colearner``: a
    co-trained reasoner (:class:`acrl.cotrain.ReasonerLearner`) whose weights and optimiser go in too."""
    def write(tmp: str) -> None:
        policy.save(os.path.join(tmp, "policy"))
        if colearner is not None:
            colearner.save(tmp)
        torch.save({"optimizer": opt.state_dict(), "rng": rng or [_rng_state()], **asdict(state)},
                   os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(to_dict(cfg), fh, indent=1)
    return ckpt.save(out, state.step, write, keep=keep)


def load_checkpoint(path: str, policy_opt: torch.optim.Optimizer, rank: int = 0) -> TrainState:
    """Restore the optimiser and this rank's random state; returns the step and data cursor.

    A rank the checkpoint holds no random state for (resumed with more processes than it was written with) is
    seeded from the step and its rank instead."""
    try:
        blob = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
        policy_opt.load_state_dict(blob["optimizer"])
    except Exception as e:   # noqa: BLE001 - torch raises many kinds; all mean the same to the user
        raise ckpt.CheckpointError(f"checkpoint {path} is corrupt: state.pt cannot be read "
                                   f"({type(e).__name__})") from None
    rng = blob["rng"] if isinstance(blob["rng"], list) else [blob["rng"]]
    if rank < len(rng):
        _set_rng_state(rng[rank])
    else:
        _set_seed(1_000_003 * blob["step"] + rank)
    return TrainState(**{f.name: blob.get(f.name, 0) for f in fields(TrainState)})


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
                                   aggregation=tc.aggregation, length_norm=cfg.captioner.max_new_tokens)
            share = (m.sum() / total_tokens) if tc.aggregation == "token-mean" else ((m.sum(1) > 0).sum() / n_seqs)
            (loss * share).backward()
            agg += torch.tensor([float(st[k]) * float(share) for k in _STATS] + [1.0], dtype=torch.float64)
        dist.sum_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        agg = dist.all_sum(agg)
        stats = {**(dict(zip(_STATS, agg.tolist())) if agg[-1] > 0 else {}), "grad_norm": float(grad_norm)}
    return stats


def _call_hook(policy: Policy, name: str, *args) -> None:
    """Call ``policy.<name>(*args)`` if the policy defines it (``before_update`` / ``after_update`` /
    ``set_sampling_seed``)."""
    hook = getattr(policy, name, None)
    if callable(hook):
        hook(*args)


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

    ``colearner``: co-training (``train.cotrain``, :mod:`acrl.cotrain`): ``reasoner`` is its recording reasoner,
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


class _Abandon(Exception):
    """Raised by the signal handler on a second signal. ``consistent``: the parameters have not been touched by
    the abandoned step (it had not reached its update)."""

    def __init__(self, consistent: bool = True):
        super().__init__("abandoned")
        self.consistent = consistent


class _StopSignals:
    """SIGINT / SIGTERM during training: the first asks the run to stop after the current step (checkpointed);
    a second abandons the step at once. Installed only in the main thread of rank 0's and the others' processes
    (a worker thread cannot install handlers; then signals keep Python's defaults)."""

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.in_update = False
        self.announce = announce
        self._armed = False   # a second signal abandons only a running step (never a checkpoint being written)
        self._old: dict = {}

    @contextlib.contextmanager
    def armed(self):
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self.announce:
                _say(f"{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                           f"(send it again to abandon the step)")
            return
        if self._armed:
            self._armed = False
            raise _Abandon(consistent=not self.in_update)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


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


def _wait_for_service(reason: str, step: int, attempt: int, tc, stop: _StopSignals, main: bool) -> bool:
    """Wait before retry ``attempt`` of ``step`` (the waits double); False when a stop was asked for meanwhile."""
    wait = min(tc.retry_wait * 2 ** (attempt - 1), 120.0)
    if main:
        _say(f"step {step}: not counted, {reason}; retrying in {wait:.0f}s (retry {attempt}/{tc.step_retries})")
    end = time.monotonic() + wait
    while time.monotonic() < end:
        if stop.signum:
            return False
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))
    return True


class _RunLog:
    """``metrics.jsonl`` and ``episodes.jsonl`` of a run: one whole line per record, flushed after each step. A
    write that fails (disk full) raises an OSError naming the file."""

    def __init__(self, out: str, append: bool):
        mode = "a" if append else "w"
        self.paths = [os.path.join(out, "metrics.jsonl"), os.path.join(out, "episodes.jsonl")]
        self.mf, self.ef = (open(p, mode) for p in self.paths)

    def write(self, rec: dict, groups, step: int) -> None:
        for fh, path, lines in ((self.ef, self.paths[1], [json.dumps({"step": step, **ep.to_json()}) + "\n"
                                                         for g in groups for ep in g]),
                                (self.mf, self.paths[0], [json.dumps(rec) + "\n"])):
            try:
                fh.write("".join(lines))
                fh.flush()
            except OSError as e:
                raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None

    def close(self) -> None:
        for fh in (self.mf, self.ef):
            with contextlib.suppress(OSError):
                fh.close()


def run_exists(out: str) -> str | None:
    """What shows that ``out`` already holds a training run (None: nothing)."""
    if not os.path.isdir(out):
        return None
    for name in ("metrics.jsonl", "episodes.jsonl"):
        p = os.path.join(out, name)
        if os.path.exists(p) and os.path.getsize(p) > 0:
            return p
    found = ckpt.latest(out)
    return found.path


def clear_run(out: str) -> None:
    """Remove a run's own files from ``out`` (for ``--overwrite``); anything else in the directory stays."""
    for name in os.listdir(out) if os.path.isdir(out) else []:
        p = os.path.join(out, name)
        if name in ("metrics.jsonl", "episodes.jsonl", "run.json", "bad_rows.jsonl") or name.startswith(
                ("checkpoint", ".checkpoint")):
            if os.path.islink(p) or not os.path.isdir(p):
                os.unlink(p)
            else:
                shutil.rmtree(p)


def open_fresh(out: str, overwrite: bool) -> None:
    """Make ``out`` ready for a run from step 0: refuse a directory that holds a run unless ``overwrite``, in which
    case that run's records and checkpoints are removed first."""
    existing = run_exists(out)
    if existing and not overwrite:
        raise RunExists(f"{out!r} already holds a run ({existing}); continue it with --resume or replace it "
                        f"with --overwrite")
    if existing:
        clear_run(out)
    os.makedirs(out, exist_ok=True)


def _open_run(out: str, opt, d: Dist, resume: bool | str, overwrite: bool, log) -> TrainState:
    """Prepare ``out`` for this run and return the state to start from (see :func:`train`)."""
    if not resume:
        if d.is_main:
            open_fresh(out, overwrite)
        d.barrier()
        return TrainState()
    path = resume if isinstance(resume, str) else None
    if path is None:
        found = ckpt.latest(out)
        for why in found.skipped or []:
            log(f"resume: skipping {why}")
        if found.path is None:
            raise FileNotFoundError(ckpt.describe_missing(out, found))
        path = found.path
    state = load_checkpoint(path, opt, d.rank)
    if d.is_main:   # keep only the records of steps that the checkpoint covers; say what was dropped
        for name in ("metrics.jsonl", "episodes.jsonl"):
            for msg in truncate_jsonl(os.path.join(out, name), state.step):
                log(f"resume: {msg}")
        ckpt.remove_leftovers(out)
        log(f"resume: continuing from {path} (step {state.step})")
    d.barrier()
    return state


def truncate_jsonl(path: str, last_step: int) -> list[str]:
    """Keep the records of steps <= ``last_step``; drop a torn last line (a kill or a full disk mid-write) and
    unreadable lines. The file is rewritten atomically. Returns what was dropped, in words."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    keep, torn, bad, later = [], 0, [], set()
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            step = rec.get("step", 0) if isinstance(rec, dict) else None
        except (ValueError, UnicodeDecodeError):
            step = None
        if step is None:
            if i >= len(lines) - 2 and not any(x.strip() for x in lines[i + 1:]):
                torn += 1
            else:
                bad.append(i + 1)
            continue
        if step > last_step:
            later.add(step)
            continue
        keep.append(raw + b"\n")
    msgs = []
    name = os.path.basename(path)
    if torn:
        msgs.append(f"dropped the torn last line of {name} (an interrupted write)")
    if bad:
        msgs.append(f"dropped {len(bad)} unreadable line(s) of {name} (line {', '.join(map(str, bad[:5]))})")
    if later:
        msgs.append(f"dropped the {name} records of step(s) {min(later)}-{max(later)}, after the checkpoint's "
                    f"step {last_step}: they are run again")
    if msgs:
        tmp = path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.writelines(keep)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return msgs


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
