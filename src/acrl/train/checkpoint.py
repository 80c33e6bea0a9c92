"""Crash-safe training checkpoints: versioned directories, written whole or not at all.

Layout of a run directory::

    OUT/checkpoint-000008/      one complete checkpoint per saved step
        policy/  state.pt  config.json  manifest.json
    OUT/checkpoint -> checkpoint-000008
                                a link to the newest (``acrl eval --captioner OUT/checkpoint/policy``)

Writing (:func:`save`): everything goes to ``OUT/.checkpoint-000008.tmp-<pid>/``; every file is fsync'd, then
``manifest.json`` (each file's size and SHA-256) is written last; the directory is renamed into place, the
parent fsync'd, the ``checkpoint`` link replaced atomically, and only then are old checkpoints beyond ``keep``
removed. A crash at any instant leaves the previous complete checkpoint untouched; at worst a temporary directory
is left over, which the next save or resume removes.

Reading (:func:`latest`): the newest directory whose manifest verifies, whatever the link says. A checkpoint whose
files do not match their manifest is reported as corrupt and skipped. Runs written before this layout (a plain
``checkpoint/`` directory, or ``checkpoint.old`` left by an interrupted rotation) are read too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from acrl.config import Config, to_dict

LINK = "checkpoint"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP = re.compile(r"^\.checkpoint-\d+\.tmp-\d+$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written (disk full, ...) or read (corrupt); the message names the path."""


def dirname(step: int) -> str:
    return f"checkpoint-{step:06d}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for d, _, fs in os.walk(root):
        for f in fs:
            with open(os.path.join(d, f), "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(d)


def publish(save: Callable[[str], None], out: str, last: str = "model.pt") -> None:
    """Write a model (``save(dir)``) into ``out`` so that ``out/<last>`` appears only once the whole model is there:
    written to ``out/.publish.tmp/``, fsync'd, the old ``<last>`` removed first, the other files moved in, ``<last>``
    moved in at the end. A model file in ``out`` is then always complete and its neighbours are its own (how the
    warm starts write their result: an interrupted one leaves no ``model.pt``)."""
    tmp = os.path.join(out, ".publish.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
        _fsync_tree(tmp)
    except OSError as e:
        raise _write_error(e, tmp) from e
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, last))
    for name in sorted(os.listdir(tmp), key=lambda n: n == last):
        dst = os.path.join(out, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(tmp, name), dst)
    os.rmdir(tmp)
    _fsync_dir(out)


def _write_error(err: BaseException, path: str) -> CheckpointError:
    text = str(err)
    first = text.splitlines()[0] if text else type(err).__name__
    where = os.path.dirname(os.path.abspath(path))
    code = err.errno if isinstance(err, OSError) else None
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "inline_container" in text:
        return CheckpointError(f"no space left on {where} while writing checkpoint {path} ({first}); the previous "
                               f"checkpoint is intact")
    if code == errno.EFBIG or "File too large" in text:
        return CheckpointError(f"file size limit reached while writing checkpoint {path} ({first}); the previous "
                               f"checkpoint is intact")
    return CheckpointError(f"could not write checkpoint {path}: {type(err).__name__}: {first}")


def save(out: str, step: int, write: Callable[[str], None], keep: int = 2) -> str:
    """Write checkpoint ``step`` of the run in ``out``: ``write(tmpdir)`` fills a temporary directory, which is
    sealed with a manifest and renamed into place. Keeps the newest ``keep`` checkpoints (0: all).

    Raises :class:`CheckpointError` naming the path (e.g. "no space left on ...") when writing fails; the
    previous checkpoints are then untouched and the temporary directory is removed."""
    final = os.path.join(out, dirname(step))
    tmp = os.path.join(out, f".{dirname(step)}.tmp-{os.getpid()}")
    remove_leftovers(out)
    try:
        os.makedirs(tmp)
        write(tmp)
        files = _files(tmp)
        manifest = {"step": step, "files": {f: {"bytes": os.path.getsize(os.path.join(tmp, f)),
                                                "sha256": _sha256(os.path.join(tmp, f))} for f in files}}
        with open(os.path.join(tmp, "manifest.json"), "w") as fh:
            json.dump(manifest, fh, indent=1)
        _fsync_tree(tmp)
        if os.path.exists(final):          # the same step written before (a redone step): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise _write_error(e, final) from e
        raise
    _point_link(out, dirname(step))
    _prune(out, keep)
    return final


def _point_link(out: str, target: str) -> None:
    """Make ``out/checkpoint`` a link to ``target`` (atomically replaced)."""
    link = os.path.join(out, LINK)
    tmp = link + f".link-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError:   # a file system without links: the newest-complete scan is what resume relies on anyway
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _prune(out: str, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in sorted(_versioned(out))[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def remove_leftovers(out: str) -> list[str]:
    """Remove temporary directories of interrupted saves; returns their names."""
    gone = []
    if os.path.isdir(out):
        for name in os.listdir(out):
            if _TMP.match(name):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
                gone.append(name)
    return gone


def _versioned(out: str) -> list[tuple[int, str]]:
    if not os.path.isdir(out):
        return []
    return [(int(m.group(1)), os.path.join(out, n)) for n in os.listdir(out) if (m := _NAME.match(n))]


def verify(path: str) -> str | None:
    """None if the checkpoint at ``path`` is complete and intact, else why not."""
    man = os.path.join(path, "manifest.json")
    if not os.path.exists(man):
        return "no manifest.json (incomplete)"
    try:
        with open(man) as fh:
            files = json.load(fh)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest.json ({e})"
    for name, meta in files.items():
        p = os.path.join(path, name)
        if not os.path.exists(p):
            return f"{name} is missing"
        if os.path.getsize(p) != meta["bytes"]:
            return f"{name} has {os.path.getsize(p)} bytes, the manifest says {meta['bytes']}"
        if _sha256(p) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


@dataclass
class Found:
    path: str | None                  # the newest usable checkpoint (None: none)
    step: int = 0
    skipped: list[str] | None = None  # "path: reason" for every newer checkpoint that was not usable


def latest(out: str) -> Found:
    """The newest complete, intact checkpoint of the run in ``out``."""
    skipped: list[str] = []
    for step, path in sorted(_versioned(out), reverse=True):
        why = verify(path)
        if why is None:
            return Found(path, step, skipped)
        skipped.append(f"{path}: {why}")
    return Found(None, 0, skipped)


def describe_missing(out: str, found: Found) -> str:
    """The error for ``--resume`` when nothing usable exists."""
    if not os.path.isdir(out):
        return f"--resume: run directory {out!r} does not exist; start the run without --resume"
    if found.skipped:
        return (f"--resume: no usable checkpoint in {out!r} ({'; '.join(found.skipped)}); start again without "
                f"--resume (add --overwrite to replace this run)")
    return (f"--resume: no checkpoint in {out!r} (a run writes one every train.checkpoint_every steps); start "
            f"again without --resume (add --overwrite to replace this run)")



@dataclass
class TrainState:
    step: int = 0
    cursor: int = 0            # index of the next training problem
    retried_steps: int = 0     # step attempts abandoned because their episodes failed (a service outage)
    failed_episodes: int = 0   # episodes of counted steps that failed (masked out of their update)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(out: str, learners: list, state: TrainState, cfg: Config, rng: list[dict] | None = None,
                    keep: int = 2) -> str:
    """Write ``out/checkpoint-<step>/`` crash-safely (:func:`save`); returns its path.

    Every learner writes its model (``policy/``; a co-trained reasoner ``reasoner/``) and returns what goes into
    ``state.pt`` beside the step, the data cursor and ``rng``: the random states of every rank, in rank order
    (default: this process's)."""
    def write(tmp: str) -> None:
        blob = {"rng": rng or [rng_state()], **asdict(state)}
        for learner in learners:
            blob.update(learner.save(tmp))
        torch.save(blob, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(to_dict(cfg), fh, indent=1)
    return save(out, state.step, write, keep=keep)


def load_checkpoint(path: str, learners: list, rank: int = 0) -> TrainState:
    """Restore every learner's optimiser and this rank's random state; returns the step and data cursor (the
    models themselves were loaded from the checkpoint's directories when the run was assembled).

    A rank the checkpoint holds no random state for (resumed with more processes than it was written with) is
    seeded from the step and its rank instead."""
    try:
        blob = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
        for learner in learners:
            learner.load(path, blob)
    except (CheckpointError, FileNotFoundError, ValueError):
        raise
    except Exception as e:   # noqa: BLE001 - torch raises many kinds; all mean the same to the user
        raise CheckpointError(f"checkpoint {path} is corrupt: state.pt cannot be read ({type(e).__name__})") from None
    rng = blob["rng"] if isinstance(blob["rng"], list) else [blob["rng"]]
    if rank < len(rng):
        set_rng_state(rng[rank])
    else:
        set_seed(1_000_003 * blob["step"] + rank)
    return TrainState(**{f.name: blob.get(f.name, 0) for f in fields(TrainState)})
