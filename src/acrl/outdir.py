"""One rule for every command's output directory, and one owner per run directory.

The rule (:func:`prepare`, :func:`publish_dir`):

- an existing, non-empty output is refused unless the command is told to continue it (``--resume``) or to replace
  it (``--overwrite``); a resumed output must be the same job (its ``spec`` is compared with the stored one);
- a command that writes its output in one go (``acrl world``, ``make-tiny``, ``convert-gguf``, ``report``) builds
  it under a temporary sibling name and publishes it with renames (:func:`publish_dir`), so the directory holds the
  old output or the new one, never a mix; a single file is replaced the same way (:func:`write_text`,
  :func:`write_json`);
- JSON is strict (:func:`strict`): a missing or undefined number is ``null``, never ``NaN`` / ``Infinity``.

Owner (:func:`own`): a run directory has one writer at a time. ``OUT/.lock`` carries an advisory ``flock`` held by
the live process (released by the kernel when it exits, however it dies) and names that process; a second writer
is refused with a one-line error naming it. :func:`owner` tells whether a live process holds a directory (the sweep
uses it to wait for an orphaned run instead of starting a second trainer beside it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

LOCK = ".lock"
SPEC = ".acrl-output.json"      # what the output holds (the job that wrote it), for --resume
_held: dict[str, tuple[int, int]] = {}   # realpath -> (fd, depth): the locks this process holds


class OutputExists(ValueError):
    """The output directory holds something and the command was not told to resume or overwrite it."""


class Busy(ValueError):
    """Another live process owns the directory."""


# --- strict JSON --------------------------------------------------------------------------------------------------

def strict(obj: Any) -> Any:
    """``obj`` with every NaN / ±inf float replaced by None (JSON ``null``), tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any, **kw) -> str:
    """Strict JSON text (``null`` for a missing number; never ``NaN``)."""
    return json.dumps(strict(obj), allow_nan=False, **kw)


def read_json(path: str, what: str = "") -> Any:
    """A JSON file, or a one-line :class:`ValueError` naming the file when it is missing, empty or corrupt."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist{f' ({what})' if what else ''}") from None
    if not text.strip():
        raise ValueError(f"{path} is empty{f' ({what})' if what else ''}")
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}){f'; {what}' if what else ''}") from None


# --- atomic files -------------------------------------------------------------------------------------------------

def disk_error(err: OSError, path: str) -> OSError:
    """``err`` re-worded as one line naming ``path`` (and saying the disk is full when it is)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(err.errno, f"no space left on the device while writing {path}; nothing was replaced")
    return OSError(err.errno, f"could not write {path}: {err.strerror or err}")


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str, text: str | bytes) -> None:
    """Replace ``path`` whole: written to a temporary name, fsync'd, renamed over it. On any failure (a full disk)
    the old file is untouched and the temporary one removed; the error names ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        os.makedirs(d, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(text.encode() if isinstance(text, str) else text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise disk_error(e, path) from None
    _fsync_dir(d)


def write_json(path: str, obj: Any, indent: int | None = 1) -> None:
    write_text(path, dumps(obj, indent=indent, default=str))


# --- one owner ----------------------------------------------------------------------------------------------------

def _describe(path: str) -> str:
    try:
        with open(path) as fh:
            info = json.loads(fh.read() or "{}")
        return f"pid {info.get('pid')}: {info.get('command', '?')}"
    except (OSError, ValueError):
        return "another process"


def own(directory: str, command: str | None = None) -> None:
    """Make this process the owner of ``directory`` (created if needed) until it exits: refuses with
    :class:`Busy` when a live process holds it. Re-entrant within one process (a command and the library
    functions it calls may both claim the same directory)."""
    os.makedirs(directory, exist_ok=True)
    key = os.path.realpath(directory)
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        return
    path = os.path.join(directory, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise Busy(f"{directory} is in use by {_describe(path)}; wait for it to end or stop it, then run "
                       f"this again") from None
        raise
    info = json.dumps({"pid": os.getpid(), "command": command or " ".join(["acrl", *sys.argv[1:]]),
                       "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    _held[key] = (fd, 1)


def release(directory: str) -> None:
    """Give up ownership taken with :func:`own` (the last of nested claims unlocks)."""
    key = os.path.realpath(directory)
    if key not in _held:
        return
    fd, depth = _held[key]
    if depth > 1:
        _held[key] = (fd, depth - 1)
        return
    del _held[key]
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def owned(directory: str, command: str | None = None) -> Iterator[None]:
    own(directory, command)
    try:
        yield
    finally:
        release(directory)


def owner(directory: str) -> str | None:
    """Who holds ``directory`` now ("pid N: command"), or None when no live process does."""
    path = os.path.join(directory, LOCK)
    if os.path.realpath(directory) in _held:
        return f"pid {os.getpid()}: this process"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _describe(path)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def wait_free(directory: str, poll: float = 1.0, timeout: float | None = None) -> bool:
    """Wait until no live process owns ``directory``; False when ``timeout`` passed first."""
    end = None if timeout is None else time.monotonic() + timeout
    while owner(directory):
        if end is not None and time.monotonic() > end:
            return False
        time.sleep(poll)
    return True


# --- the output rule -----------------------------------------------------------------------------------------------

def contents(out: str) -> list[str]:
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n != LOCK)


def clear(out: str) -> None:
    """Remove everything in ``out`` but its lock file."""
    for name in contents(out):
        p = os.path.join(out, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)


def prepare(out: str, *, resume: bool = False, overwrite: bool = False, spec: dict | None = None,
            command: str = "acrl", flag: str = "--out", lock: bool = True) -> bool:
    """Claim ``out`` for a command that writes into it as it goes (``eval``, ``warmstart``): take ownership
    (``lock``), then refuse an existing output unless ``resume`` (it must hold the same ``spec``) or ``overwrite``
    (it is emptied). Records ``spec``. Returns True when an earlier output of the same job is being continued."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the output, or replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{flag} {out} is a file, not a directory")
    if lock:
        own(out, command)
    have = contents(out)
    continuing = False
    if have and overwrite:
        clear(out)
    elif have and resume:
        if spec is not None:
            same_job(out, spec, flag)
        continuing = True
    elif have:
        raise OutputExists(f"{flag} {out} already holds {', '.join(have[:3])}{' ...' if len(have) > 3 else ''}; "
                           f"continue it with --resume or replace it with --overwrite")
    if spec is not None:
        write_json(os.path.join(out, SPEC), spec)
    return continuing


def same_job(out: str, spec: dict, flag: str = "--out") -> None:
    """Refuse to continue ``out`` unless it records the same ``spec`` (what defines the job)."""
    stored_path = os.path.join(out, SPEC)
    if not os.path.exists(stored_path):
        raise ValueError(f"--resume: {out} was not written by this command (no {SPEC}); use another {flag} or pass "
                         f"--overwrite to replace it")
    stored = read_json(stored_path, "it records what the output holds")
    spec = json.loads(dumps(spec, default=str))   # as it would be stored (string keys, lists, null)
    if not isinstance(stored, dict) or stored != spec:
        stored = stored if isinstance(stored, dict) else {}
        diff = sorted(k for k in set(stored) | set(spec) if stored.get(k) != spec.get(k))
        raise ValueError(f"--resume: {out} holds the output of another job (differs in: {', '.join(diff)}); use "
                         f"another {flag} or pass --overwrite to replace it")


def check_new(out: str, overwrite: bool, flag: str = "--out") -> None:
    """For a command that publishes its output whole: refuse an existing non-empty ``out`` unless ``overwrite``."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{flag} {out} is a file, not a directory")
    have = contents(out)
    if have and not overwrite:
        raise OutputExists(f"{flag} {out} already holds {', '.join(have[:3])}{' ...' if len(have) > 3 else ''}; "
                           f"pass --overwrite to replace it")


def _leftovers(out: str) -> None:
    """Remove temporary siblings of ``out`` that a killed publisher left (their pid is gone)."""
    parent, name = os.path.split(os.path.abspath(out))
    if not os.path.isdir(parent):
        return
    for n in os.listdir(parent):
        for kind in (".tmp-", ".old-"):
            prefix = f".{name}{kind}"
            if n.startswith(prefix) and n[len(prefix):].isdigit() and not _alive(int(n[len(prefix):])):
                shutil.rmtree(os.path.join(parent, n), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish_dir(out: str, build: Callable[[str], Any], overwrite: bool = False, flag: str = "--out") -> Any:
    """Build an output directory whole and publish it: ``build(tmp)`` fills ``.NAME.tmp-PID`` beside ``out``; on
    success it replaces ``out`` (the old one renamed aside, the new one renamed in, the old one removed), so
    ``out`` is always the old output or the new one. A failure (a full disk, a kill) leaves the old one in place.
    Refuses an existing non-empty ``out`` unless ``overwrite``. Returns what ``build`` returned."""
    check_new(out, overwrite, flag)
    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    _leftovers(out)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        result = build(tmp)
        for d, _, fs in os.walk(tmp):
            for f in fs:
                with open(os.path.join(d, f), "rb+") as fh:
                    os.fsync(fh.fileno())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(e, out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)
    return result
