"""What defines a training run, kept in ``OUT/run.json``, and the check that a resumed run is the same experiment.

``run.json`` holds the full config, the starting checkpoint (which is also π_ref), the training data, the command
line and every change accepted on resume. ``acrl train --resume`` starts from it: a value the command line gives
that differs from the stored one is refused unless ``--allow-change`` is passed, and then recorded. Settings that
do not change what is computed (the step budget, threads, service addresses and timeouts, logging, checkpoint
cadence) may differ freely.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

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
    os.makedirs(out, exist_ok=True)
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
