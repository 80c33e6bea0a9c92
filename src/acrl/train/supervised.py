"""The supervised training loop of the warm starts (:mod:`acrl.train.warmstart`, the captioner, and
:mod:`acrl.train.reasoner_warmstart`, the reasoner).

The loop owns the output directory (one owner; refused, resumed or replaced), AdamW with the learning-rate schedule
(:func:`lr_at`) and gradient clipping, the running loss, the held-out checks and their log, resumable checkpoints,
stop signals and the publication of the finished model. A warm start supplies a :class:`Task`: its learner, the
loss of a step's batch, its held-out check and what else it writes.

``OUT`` while it runs: ``warmstart_log.jsonl`` (one record per check), ``progress/`` (the model of the latest
check), ``checkpoint-<n>/`` (the newest resumable state). Finished: ``model.pt`` (with the learner's other files),
written last; the progress model and the checkpoints are removed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from acrl import outdir
from acrl.train import checkpoint
from acrl.train.guard import Abandon, Interrupted, StopSignals
from acrl.train.run import truncate_jsonl

LOG = "warmstart_log.jsonl"
PROGRESS = "progress"   # OUT/progress/: the model of the latest held-out check while a warm start runs
STATE = "state.pt"      # in OUT/checkpoint-<n>/: model, optimiser, data order and running loss after step n


@dataclass
class Task:
    """What a warm start supplies to :func:`train`.

    ``learner``: what trains (``model``, ``ref_model``, ``trainable_parameters()``, ``save(path)``); checks and the
    published learner read the trained weights through ``ref_model``. ``loss(step, rng)``: the loss of step's
    batch, drawn with ``rng`` (the data order, kept in checkpoints). ``evaluate()``: a held-out check, its stats
    for the log; ``summary(stats)``: what the check's log line says. ``name``: the log lines' first words.
    ``header``: the log's first record. ``save_every``: also save the learner to ``OUT/step-<n>/`` every this many
    steps (and untrained, ``step-0``). ``finish(out)``: what it writes into ``out`` before the model is published.
    """

    learner: Any
    loss: Callable[[int, random.Random], torch.Tensor]
    evaluate: Callable[[], dict]
    summary: Callable[[dict], str]
    name: str = "warmstart"
    header: dict | None = None
    save_every: int = 0
    finish: Callable[[str], None] | None = None


def lr_at(cfg, step: int) -> float:
    """The learning rate at ``step``: linear warm-up over ``cfg.warmup`` steps, then cosine decay to a tenth of
    ``cfg.lr`` at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


# --- the output directory and resumable checkpoints ----------------------------------------------------------------

def open_output(out: str, what: str, cfg, world, model_cfg, resume: bool, overwrite: bool, log=print) -> str:
    """Claim ``out`` (one owner) for the warm start ``what`` and say how to start: ``"finished"`` (``resume`` of a
    finished warm start: nothing to do), ``"resume"`` (continue from the newest checkpoint) or ``"fresh"``. An
    existing output is refused unless ``resume`` or ``overwrite`` (then emptied first); a resumed one must have
    been started with the same settings (``cfg``, ``world``, ``model_cfg``; how often it checkpoints aside)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the warm start, or replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a directory")
    spec = {"warmstart": asdict(cfg), "world": asdict(world), "model": asdict(model_cfg)}
    spec["warmstart"].pop("checkpoint_every")   # how often it is saved does not change what it computes
    outdir.own(out, f"acrl warmstart ({what})")
    finished = os.path.exists(os.path.join(out, "model.pt"))
    have = outdir.contents(out)
    if have and not (resume or overwrite):
        raise outdir.OutputExists(
            f"--out {out} holds a finished {what} (model.pt); pass --overwrite to replace it" if finished else
            f"--out {out} holds an interrupted {what} ({', '.join(have[:3])}); continue it with --resume or replace "
            f"it with --overwrite")
    if have and overwrite:
        outdir.clear(out)
    elif have and os.path.exists(os.path.join(out, outdir.SPEC)):
        outdir.same_job(out, spec)
    outdir.write_json(os.path.join(out, outdir.SPEC), spec)
    if have and overwrite:
        return "fresh"
    if finished:
        drop_checkpoints(out)   # a kill between publishing the model and removing them
        log(f"warmstart: {out} is already finished")
        return "finished"
    return "resume" if have else "fresh"


def save_state(out: str, step: int, model, opt, rng: random.Random, running: float | None, seconds: float) -> str:
    """A resumable checkpoint after ``step`` (written whole or not at all, see :mod:`acrl.train.checkpoint`)."""
    state = {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(),
             "torch_rng": torch.get_rng_state(), "running": running, "seconds": seconds}
    return checkpoint.save(out, step, lambda d: torch.save(state, os.path.join(d, STATE)), keep=1)


def load_state(out: str, model, opt, rng: random.Random, log=print) -> tuple[int, float | None, float]:
    """Restore the newest complete checkpoint in ``out``: (step, running loss, seconds so far); (0, None, 0.0) when
    there is none. The log keeps only the records the checkpoint covers."""
    log_path = os.path.join(out, LOG)
    found = checkpoint.latest(out)
    for why in found.skipped or []:
        log(f"resume: skipping {why}")
    if found.path is None or not os.path.exists(os.path.join(found.path, STATE)):
        log(f"resume: {out} has no complete checkpoint yet; starting from step 0")
        with contextlib.suppress(FileNotFoundError):
            os.remove(log_path)
        return 0, None, 0.0
    st = torch.load(os.path.join(found.path, STATE), map_location="cpu", weights_only=False)
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    rng.setstate(st["rng"])
    torch.set_rng_state(st["torch_rng"])
    for msg in truncate_jsonl(log_path, st["step"]):
        log(f"resume: {msg}")
    log(f"resume: continuing from {found.path} (step {st['step']})")
    return st["step"], st["running"], st["seconds"]


def drop_checkpoints(out: str) -> None:
    for name in os.listdir(out):
        if name.startswith(("checkpoint", ".checkpoint")):
            p = os.path.join(out, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)


# --- the loop ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _abandonable(stop: StopSignals, step: int):
    """A second signal during a step's computation ends the run at once; the newest checkpoint holds."""
    try:
        with stop.armed():
            yield
    except Abandon:
        raise Interrupted(stop.signum, step, None) from None


def train(out: str, cfg, task: Task, resume: bool = False, log=print) -> None:
    """Train ``task.learner`` for ``cfg.steps`` steps into ``out`` (claimed by :func:`open_output`); ``resume``:
    continue from its newest checkpoint. ``cfg``: the warm start's settings (``steps``, ``lr``, ``warmup``,
    ``weight_decay``, ``grad_clip``, ``eval_every``, ``checkpoint_every``, ``seed``).

    A held-out check every ``cfg.eval_every`` steps and after the last; a checkpoint every
    ``cfg.checkpoint_every``. SIGINT / SIGTERM stop it after the current step with a checkpoint of that step (a
    second signal abandons the step): :class:`acrl.train.guard.Interrupted`."""
    learner, model, params = task.learner, task.learner.model, task.learner.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    first, running, before = load_state(out, model, opt, rng, log) if resume else (0, None, 0.0)
    t0 = time.time() - before
    if task.save_every and first == 0:
        learner.save(os.path.join(out, "step-0"))
    with open(os.path.join(out, LOG), "a" if first else "w") as logf, StopSignals() as stop:
        if task.header is not None and not first:
            logf.write(json.dumps(task.header) + "\n")
        for step in range(first, cfg.steps):
            done, last = step + 1, step + 1 == cfg.steps
            with _abandonable(stop, step):
                for g in opt.param_groups:
                    g["lr"] = lr_at(cfg, step)
                loss = task.loss(step, rng)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
                stats = None
                if (cfg.eval_every and done % cfg.eval_every == 0) or last:
                    learner.ref_model.load_state_dict(model.state_dict())
                    stats = task.evaluate()
            if task.save_every and done % task.save_every == 0 and not last:
                learner.save(os.path.join(out, f"step-{done}"))
            if stats is not None:
                rec = {"step": done, "loss": round(running, 4), "seconds": round(time.time() - t0, 1), **stats}
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log(f"{task.name} step {done}/{cfg.steps} loss {running:.3f} {task.summary(stats)} "
                    f"({time.time() - t0:.0f}s)")
                if not last:   # the check's model, apart: OUT/model.pt means a finished warm start
                    learner.save(os.path.join(out, PROGRESS))
            due = cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and not last
            if due or stop.signum:   # a stop: this step's checkpoint (the last's too: a resume publishes it)
                saved = save_state(out, done, model, opt, rng, running, time.time() - t0)
                if stop.signum:
                    raise Interrupted(stop.signum, done, saved)
    learner.ref_model.load_state_dict(model.state_dict())
    if task.finish is not None:
        task.finish(out)
    checkpoint.publish(learner.save, out)
    shutil.rmtree(os.path.join(out, PROGRESS), ignore_errors=True)
    drop_checkpoints(out)
