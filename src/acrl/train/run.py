"""What defines a training run, kept in ``OUT/run.json``, and the check that a resumed run is the same experiment.

``run.json`` holds the full config, the starting checkpoint (which is also π_ref), the training data, the command
line and every change accepted on resume. ``acrl train --resume`` starts from it: a value the command line gives
that differs from the stored one is refused unless ``--allow-change`` is passed, and then recorded. Settings that
do not change what is computed (the step budget, threads, service addresses and timeouts, logging, checkpoint
cadence) may differ freely.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from typing import Any

from tqdm import tqdm

from acrl import outdir
from acrl.config import Config, to_dict
from acrl.train import checkpoint as ckpt
from acrl.train.checkpoint import TrainState, load_checkpoint, rng_state, save_checkpoint
from acrl.train.distributed import Dist
from acrl.train.guard import say

FILE = "run.json"

# Fields that change how a run is carried out, not what it computes: free to differ on resume.
OPERATIONAL = {
    "train.steps", "train.threads", "train.report_to", "train.eval_every", "train.eval_n", "train.checkpoint_every",
    "train.keep_checkpoints", "train.log_episodes", "train.step_retries", "train.retry_wait", "train.overlap",
    "captioner.device", "captioner.generation_batch_size", "captioner.logprob_batch_size",
    "captioner.vllm.base_url", "captioner.vllm.api_key_env", "captioner.vllm.concurrency", "captioner.vllm.timeout",
    "eval.split", "eval.n", "eval.batch_size", "eval.reference",
} | {f"{s}.{k}" for s in ("reasoner", "clarifier")
       for k in ("base_url", "api_key_env", "concurrency", "timeout", "max_retries", "cache", "batch_size")}


_SUBSECTIONS = ("captioner.lora", "captioner.vllm")


def _flat(config: dict) -> dict[str, Any]:
    """``{"train.alpha": 0.7, "captioner.lora.r": 16, ...}``, compared as JSON stores them."""
    out: dict[str, Any] = {}
    for section, fields in json.loads(json.dumps(config)).items():
        for k, v in (fields.items() if isinstance(fields, dict) else [("", fields)]):
            key = f"{section}.{k}"
            if key in _SUBSECTIONS and isinstance(v, dict):
                out.update({f"{key}.{kk}": vv for kk, vv in v.items()})
            else:
                out[key] = v
    return out


def record(config: dict, captioner: str, data: str | None) -> dict:
    return {"config": config, "captioner": os.path.abspath(captioner) if os.path.exists(captioner) else captioner,
            "data": os.path.abspath(data) if data else None, "command": sys.argv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": []}


def write(out: str, info: dict) -> None:
    outdir.own(out, "acrl train")   # one writer per run directory (see acrl.outdir)
    tmp = os.path.join(out, FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(info, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(out, FILE))


def read(out: str) -> dict | None:
    path = os.path.join(out, FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            info = json.load(fh)
        if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
            raise ValueError("no config")
        return info
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is corrupt ({e}); it records what defines the run — restore it, or start again "
                         f"with --overwrite") from None


def _same_path(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return not a and not b
    return os.path.abspath(a) == os.path.abspath(b) or a == b


def differences(stored: dict, config: dict, captioner: str, data: str | None) -> list[tuple[str, Any, Any]]:
    """(key, stored value, new value) for everything that defines the run and differs."""
    old, new, default = _flat(stored["config"]), _flat(config), _flat(to_dict(Config()))
    # a field the stored run does not have (added by a later acrl) is the same experiment at its default value
    old.update({k: default[k] for k in new if k not in old and k in default})
    diffs = [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
             if k not in OPERATIONAL and old.get(k) != new.get(k)]
    if not _same_path(stored.get("captioner"), captioner):
        diffs.append(("--captioner (π_ref)", stored.get("captioner"), captioner))
    if not _same_path(stored.get("data"), data):
        diffs.append(("--data", stored.get("data"), data))
    return diffs


def describe(diffs: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: run has {a!r}, command gives {b!r}" for k, a, b in diffs)



class RunExists(ValueError):
    """``out`` already holds a run and neither resume nor overwrite was asked for."""


class RunLog:
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
    case that run's records and checkpoints are removed first. This process becomes the run's one owner."""
    outdir.own(out, "acrl train")
    existing = run_exists(out)
    if existing and not overwrite:
        raise RunExists(f"{out!r} already holds a run ({existing}); continue it with --resume or replace it "
                        f"with --overwrite")
    if existing:
        clear_run(out)
    os.makedirs(out, exist_ok=True)


def open_run(out: str, learners: list, d: Dist, resume: bool | str, overwrite: bool, log) -> TrainState:
    """Prepare ``out`` for this run and return the state to start from: a fresh run (a run already in ``out`` is
    refused unless ``overwrite``) or, with ``resume`` (True: the newest complete checkpoint; or a path), the
    checkpoint's state, keeping only the records of the steps it covers."""
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
    if d.is_main:
        outdir.own(out, "acrl train")
    state = load_checkpoint(path, learners, d.rank)
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


class Trackers:
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


class RunDir:
    """A training run's directory while it runs: opened fresh or resumed (:func:`open_run`), the step records
    (``metrics.jsonl``, ``episodes.jsonl``, trackers, the progress bar) and the checkpoints. Only rank 0 writes;
    every rank takes part in a checkpoint (random states are gathered)."""

    def __init__(self, run, learners: list, d: Dist, progress: bool = True):
        tc, main = run.cfg.train, d.is_main
        self.run, self.learners, self.d, self.tc = run, learners, d, tc
        self.state = open_run(run.out, learners, d, run.resume, run.overwrite, log=say if main else lambda _: None)
        self.saved = self.state.step if run.resume else -1   # the step of the newest checkpoint on disk
        self.history: list[dict] = []
        self.log = RunLog(run.out, append=bool(run.resume)) if main else None
        self.tracker = Trackers(tc.report_to, run.out, run.cfg, cpu=d.device.type == "cpu") \
            if tc.report_to and main else None
        self.bar = tqdm(total=tc.steps, initial=self.state.step, desc=f"train α={tc.alpha}",
                        disable=not (progress and main), dynamic_ncols=True,
                        mininterval=0.1 if sys.stderr.isatty() else 30.0)

    def save(self, rng: list[dict] | None = None) -> str | None:
        """Checkpoint the current state (once per step); ``rng``: every rank's random state (default: now)."""
        rng = rng or self.d.gather(rng_state())   # every rank's, so that a resumed rank samples as it would have
        path = None
        if self.d.is_main and self.saved != self.state.step:
            path = save_checkpoint(self.run.out, self.learners, self.state, self.run.cfg, rng,
                                   keep=self.tc.keep_checkpoints)
        self.d.barrier()                          # no rank goes on (or returns) before the checkpoint is written
        self.saved = self.state.step
        return path or ckpt.latest(self.run.out).path

    def record(self, rec: dict, groups) -> None:
        """Count a finished step: evaluate when due, write its records, checkpoint when due."""
        s, tc = self.state, self.tc
        s.step += 1
        s.cursor += tc.problems_per_step
        s.failed_episodes += rec["failed_episodes"]
        rec["retried_steps_total"], rec["failed_episodes_total"] = s.retried_steps, s.failed_episodes
        if self.d.is_main and self.run.evaluate and tc.eval_every and (s.step % tc.eval_every == 0
                                                                       or s.step == tc.steps):
            rec["eval"] = self.run.evaluate(s.step)
        if self.log:
            self.log.write(rec, groups[: tc.log_episodes], s.step)
        self.history.append(rec)
        if self.tracker:
            self.tracker.log(rec)
        self.bar.update(1)
        self.bar.set_postfix(reward=f"{rec['reward']:.2f}", direct=f"{rec['direct_correct']:.2f}",
                             clar=f"{rec['clarification_rate']:.2f}", kl=f"{rec.get('kl_mean', 0):.3f}")
        if s.step % tc.checkpoint_every == 0 or s.step == tc.steps:
            self.save()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        for sink in (self.log, self.tracker):
            if sink:
                sink.close()


def prepare(out: str, cfg: Config, captioner: str, data: str | None, stored: dict | None, resume: bool | str,
            overwrite: bool, allow_change: bool, d: Dist) -> str | None:
    """Ready ``out`` for a run of ``cfg`` and return the checkpoint it continues from (None: from step 0).

    Resuming: the newest complete checkpoint; a run stopped before its first checkpoint starts again from step 0
    with its stored config. A resumed run must be the same experiment: values that differ from its ``run.json``
    are refused unless ``allow_change`` (then recorded there). ``run.json`` is (re)written by rank 0."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run, or replace it")
    found = None
    if resume:
        found = ckpt.latest(out) if resume is True else ckpt.Found(path=resume)
        for why in (found.skipped or []) if d.is_main else []:
            print(f"resume: skipping {why}", file=sys.stderr)
        if found.path is None and stored is not None:
            if d.is_main:
                print(f"resume: {out} has no complete checkpoint yet; starting the run again from step 0 with its "
                      f"stored config", file=sys.stderr)
            found = None
        elif found.path is None:
            raise FileNotFoundError(ckpt.describe_missing(out, found))
        if stored is not None:
            diffs = differences(stored, to_dict(cfg), captioner, data)
            if diffs and not allow_change:
                raise ValueError(f"--resume would change the experiment ({describe(diffs)}); resume without these "
                                 f"values, or pass --allow-change to change them (it is recorded in {FILE})")
            stored["changes"] += [{"at_step": found.step if found else 0, "key": k, "old": a, "new": b}
                                  for k, a, b in diffs]
    if d.is_main:
        if not found:   # from step 0 (a --resume without a checkpoint starts its run again)
            open_fresh(out, overwrite=overwrite or bool(resume))
        info = stored or record(to_dict(cfg), captioner, data)
        info["config"] = to_dict(cfg)
        write(out, info)
    d.barrier()
    return found.path if found else None
