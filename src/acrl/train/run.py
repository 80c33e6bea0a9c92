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

from acrl import outdir
from acrl.config import Config, to_dict
from acrl.train import checkpoint as ckpt
from acrl.train.checkpoint import TrainState, load_checkpoint
from acrl.train.distributed import Dist

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
    from acrl.config import Config, to_dict

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
    case that run's records and checkpoints are removed first. This process becomes the run's one owner."""
    outdir.own(out, "acrl train")
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
    if d.is_main:
        outdir.own(out, "acrl train")
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
