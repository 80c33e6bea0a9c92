"""Chaos benchmark: drive the real ``acrl train`` CLI through kills, signals, service outages and a full disk, resume
each run, and count what survived. Writes ``benchmarks/results/chaos.json``.

Faults (each followed by ``--resume`` until the run ends or is declared stuck):
- ``kill9``: SIGKILL at a random moment of the run; a third of them aimed at a checkpoint being written (the
  moment a temporary checkpoint directory appears);
- ``sigint`` / ``sigterm``: what Ctrl-C and a scheduler send;
- ``reasoner_restart`` / ``clarifier_restart``: the ``acrl serve`` process behind the reasoner (or the clarifier)
  is killed mid-run and started again a few seconds later, within the retry window: the run must finish by itself;
- ``reasoner_dead``: killed and not started again: the run must stop with a non-zero exit (no silent success),
  then resume once the service is back;
- ``disk_full``: the run directory is a small tmpfs that fills up; after the file system is enlarged, resume.

Every finished run is compared with an uninterrupted run of the same setup: identical (every metric but timings
equal, bit for bit), steps redone (logged before the fault but after the checkpoint it resumed from), lost rows
(steps missing or duplicated in ``metrics.jsonl``), stuck runs (no end within the time limit or too many
resumes), silent successes (exit 0 without reaching the last step, or exit 0 while its service was down).

``acrl sweep``, ``acrl eval`` and ``acrl warmstart`` (:func:`trial_command`) get SIGKILL at random moments (for the
sweep every other kill hits only the sweep process, leaving its run orphaned and alive), SIGTERM, a second writer
started while the first runs, a rerun into a finished output and another job into it; each must end with every
output file equal to an uninterrupted run's (timings aside) or be refused with a one-line error and a non-zero exit,
with never two trainers on one run and never a mix of old and new files. Their counts go under ``commands``.

    python benchmarks/chaos.py [--commands train,sweep,eval,warmstart] [--kills 20] [--trials 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

from acrl import outdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "configs", "micro.yaml")
STEPS = 12
BASE = ["--config", MICRO, "--steps", str(STEPS), "--quiet", "--set", "train.checkpoint_every=3",
        "--set", "captioner.max_new_tokens=40",
        "--set", "train.step_retries=8", "--set", "train.retry_wait=0.5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "acrl", "train", "--out", out, *BASE, *extra]


def _metrics(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path, encoding="utf-8", errors="replace"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def _comparable(rows: list[dict]) -> list[dict]:
    """Everything the steps computed; not timings, nor the run's own fault counters (retried steps)."""
    skip = ("retried_steps_total", "failed_episodes_total")
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k not in skip} for r in rows]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """``acrl serve reasoner|clarifier`` in its own process on a fixed port."""

    def __init__(self, kind: str, captioner: str | None = None):
        self.kind, self.port, self.proc = kind, _free_port(), None
        self.args = ["--captioner", captioner, "--threads", "1"] if kind == "clarifier" else []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        import httpx

        self.proc = subprocess.Popen([sys.executable, "-m", "acrl", "serve", self.kind, "--port",
                                      str(self.port), *self.args], env=ENV, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.time() + 120
        while time.time() < end:
            try:
                if httpx.get(f"{self.url}/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"acrl serve {self.kind} did not start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def flags(self) -> list[str]:
        return ["--set", f"{self.kind}.backend=openai", "--set", f"{self.kind}.base_url={self.url}",
                "--set", f"{self.kind}.max_retries=0", "--set", f"{self.kind}.timeout=10"]


def _wait(pred, proc: subprocess.Popen, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if pred():
            return True
        time.sleep(0.01)
    return False


def _tmp_checkpoint(out: str) -> bool:
    return os.path.isdir(out) and any(n.startswith(".checkpoint-") for n in os.listdir(out))


def _resume_until_done(out: str, extra: list[str], rec: dict, limit: int = 3, timeout: float = 600) -> None:
    for _ in range(limit):
        before = _metrics(out)
        ck = _latest_step(out)
        rec["steps_redone"] += max(0, (before[-1]["step"] if before else 0) - ck)
        try:
            p = subprocess.run(_cmd(out, "--resume", *extra), env=ENV, cwd=ROOT, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            rec["stuck"] = True
            return
        rec["resumes"] += 1
        rec["exits"].append(p.returncode)
        if p.returncode == 0:
            return
        rec["errors"].append(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "")
    rec["stuck"] = True


def _latest_step(out: str) -> int:
    from acrl.train.checkpoint import latest

    return latest(out).step


def _finish(rec: dict, out: str, reference: list[dict]) -> dict:
    rows = _metrics(out)
    steps = [r["step"] for r in rows]
    rec["lost_rows"] = len(set(range(1, STEPS + 1)) - set(steps)) + (len(steps) - len(set(steps)))
    rec["resumed"] = not rec["stuck"] and rec["exits"][-1:] == [0] and steps == list(range(1, STEPS + 1))
    rec["identical"] = rec["resumed"] and _comparable(rows) == _comparable(reference)
    return rec


def _new(kind: str, i: int) -> dict:
    return {"fault": kind, "trial": i, "exits": [], "errors": [], "resumes": 0, "steps_redone": 0,
            "stuck": False, "silent_success": False}


def trial_signal(kind: str, i: int, work: str, reference: list[dict], rng: random.Random, duration: float,
                 extra: list[str] | None = None) -> dict:
    extra = extra or []
    out = os.path.join(work, f"{kind}-{i}")
    rec = _new(kind, i)
    proc = subprocess.Popen(_cmd(out, *extra), env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    aim = kind == "kill9" and i % 3 == 0
    if aim:
        rec["moment"] = "checkpoint write" if _wait(lambda: _tmp_checkpoint(out), proc, 300) else "missed"
    else:
        # a random moment of the run: after k logged steps, a random fraction of a step later
        k, frac = rng.randint(0, STEPS - 2), rng.random()
        rec["moment"] = f"step {k + 1} + {frac:.2f}"
        _wait(lambda: len(_metrics(out)) >= k, proc, 300)
        _wait(lambda: False, proc, frac * duration / STEPS)
    sig = {"kill9": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[kind]
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    rec["exits"].append(proc.returncode)
    rec["steps_at_fault"] = len(_metrics(out))
    if proc.returncode == 0 or rec["steps_at_fault"] == STEPS:
        rec["signal_after_end"] = True   # the run had finished (the signal came during exit): nothing was lost
    elif kind != "kill9":
        rec["clean_exit"] = proc.returncode == 128 + sig and "Traceback" not in err
        rec["checkpoint_at_last_step"] = (_metrics(out) or [{"step": 0}])[-1]["step"] == _latest_step(out)
    if proc.returncode != 0:
        _resume_until_done(out, extra, rec)
    return _finish(rec, out, reference)


def trial_service(kind: str, i: int, work: str, reference: list[dict], svc: Service, restart_after: float | None,
                  extra: list[str]) -> dict:
    out = os.path.join(work, f"{kind}-{i}")
    rec = _new(kind, i)
    svc.start()
    proc = subprocess.Popen(_cmd(out, *extra), env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait(lambda: len(_metrics(out)) >= 3, proc, 300)
    svc.kill()
    rec["killed_at_step"] = len(_metrics(out))
    if restart_after is not None:
        time.sleep(restart_after)
        svc.start()
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        rec["stuck"] = True
        svc.kill()
        return _finish(rec, out, reference)
    rec["exits"].append(proc.returncode)
    rec["waited_visibly"] = "retrying in" in err
    if restart_after is None:
        rec["silent_success"] = proc.returncode == 0
        rec["clean_exit"] = proc.returncode == 75 and "resume with" in err
        svc.start()
        _resume_until_done(out, extra, rec)
    elif proc.returncode != 0:
        _resume_until_done(out, extra, rec)
    svc.kill()
    return _finish(rec, out, reference)


def trial_disk_full(work: str, reference: list[dict]) -> dict:
    rec = _new("disk_full", 0)
    mnt = os.path.join(work, "tmpfs")
    os.makedirs(mnt, exist_ok=True)
    ck = os.path.realpath(os.path.join(work, "reference", "checkpoint"))
    ck_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ck) for f in fs)
    size_kb = int(ck_bytes * 1.6 / 1024)   # room for one checkpoint and the logs, not for a second checkpoint
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", mnt]).returncode != 0:
        rec["skipped"] = "mounting a tmpfs needs root"
        return rec
    try:
        out = os.path.join(mnt, "run")
        p = subprocess.run(_cmd(out), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
        rec["exits"].append(p.returncode)
        rec["silent_success"] = p.returncode == 0 and len(_metrics(out)) < STEPS
        rec["message"] = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        rec["clean_exit"] = p.returncode != 0 and "no space left on" in rec["message"] and \
            "Traceback" not in p.stderr
        subprocess.run(["mount", "-o", "remount,size=512m", mnt], check=True)   # the user frees space
        if p.returncode != 0:
            _resume_until_done(out, [], rec)
        return _finish(rec, out, reference)
    finally:
        subprocess.run(["umount", "-l", mnt])


# --- the other commands: sweep, eval, warmstart ---------------------------------------------------------------------
# Each is run uninterrupted once (the reference), then faulted; a faulted run must end with outputs equal to the
# reference (every file but timings, byte for byte) or be refused with a one-line error and a non-zero exit.

def _acrl(*args: str) -> list[str]:
    return [sys.executable, "-m", "acrl", *args]


COMMANDS = {   # command -> (argv for OUT, flags that continue an interrupted OUT)
    "warmstart": (lambda out: _acrl("warmstart", "--config", MICRO, "--out", out, "--set", "warmstart.steps=6",
                                    "--set", "warmstart.checkpoint_every=2"), ["--resume"]),
    "eval": (lambda out: _acrl("eval", "--config", MICRO, "--out", out, "--n", "4"), ["--resume"]),
    # a sweep continues by being run again; its run trains 3 steps with a checkpoint after step 2
    "sweep": (lambda out: _acrl("sweep", "--config", MICRO, "--set", "train.steps=3", "--seeds", "0", "--out", out),
              []),
}
OTHER_JOB = {   # another job into a finished OUT: replaced whole (--overwrite) or refused
    "warmstart": ["--overwrite", "--set", "warmstart.steps=4"],
    "eval": ["--overwrite", "--n", "2"],
    "sweep": ["--set", "train.steps=2"],
}
UNSTABLE = ("log.txt",)   # a launcher's log of what happened, not a result


def _normal(obj):
    """``obj`` without timings and timestamps (``seconds``, ``time_*``, ``created``) and the run's fault counters."""
    if isinstance(obj, dict):
        return {k: _normal(v) for k, v in obj.items()
                if k not in ("seconds", "created") and not k.startswith("time_")
                and k not in ("retried_steps_total", "failed_episodes_total")}
    if isinstance(obj, list):
        return [_normal(v) for v in obj]
    return obj


def fingerprint(out: str) -> dict[str, str]:
    """Every file of an output (its path inside it -> a digest of its content less timings); the directory's own
    path is replaced by ``OUT`` so that two outputs in different places compare equal."""
    import hashlib

    prints = {}
    for d, _, files in os.walk(out):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), out)
            if f == ".lock" or f in UNSTABLE or f.endswith(".png"):
                continue
            data = open(os.path.join(d, f), "rb").read()
            if f.endswith((".json", ".jsonl", ".md", ".csv")):
                text = data.decode("utf-8", "replace").replace(os.path.abspath(out), "OUT")
                try:
                    if f.endswith(".json"):
                        text = json.dumps(_normal(json.loads(text)), sort_keys=True)
                    elif f.endswith(".jsonl"):
                        text = "\n".join(json.dumps(_normal(json.loads(x)), sort_keys=True)
                                         for x in text.splitlines() if x.strip())
                except ValueError:
                    pass   # a torn file: its raw text, which differs from the reference's
                if f.endswith(".md"):   # tables may print durations
                    text = "\n".join(x for x in text.splitlines() if "second" not in x)
                data = text.encode()
            prints[rel] = hashlib.sha256(data).hexdigest()[:16]
    return prints


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _one_line_error(rc: int, err: str) -> bool:
    """A non-zero exit whose stderr ends with one ``acrl ...`` line and holds no traceback."""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    return rc != 0 and "Traceback" not in err and bool(lines) and lines[-1].startswith("acrl")


class Writers:
    """Counts, by polling /proc, how many trainers of one sweep run live at once (the most seen)."""

    def __init__(self, run_dir: str):
        import threading

        self.key, self.most, self.stop = os.path.abspath(run_dir).encode(), 0, False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop:
            n = 0
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
                    except OSError:
                        continue
                    n += b"acrl.app.sweep" in cmd and self.key in cmd
            self.most = max(self.most, n)
            time.sleep(0.02)

    def close(self) -> int:
        self.stop = True
        self.thread.join()
        return self.most


def _continue(command: str, out: str, rec: dict, limit: int = 3) -> None:
    argv, resume = COMMANDS[command]
    for _ in range(limit):
        try:
            p = subprocess.run(argv(out) + resume, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            rec["stuck"] = True
            return
        rec["exits"].append(p.returncode)
        if p.returncode == 0:
            return
        rec["errors"].append(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "")
        time.sleep(1)   # an orphaned trainer may still hold its run: the next attempt waits for it
    rec["stuck"] = True


def _kill_group(proc: subprocess.Popen) -> None:
    """End what a trial started (a sweep's orphaned run included) before the next trial."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def trial_command(command: str, kind: str, i: int, work: str, ref: dict, rng: random.Random,
                  duration: float) -> dict:
    """One fault against ``command``: ``kill9`` (SIGKILL at a random moment; for sweep every other one kills only
    the sweep process, leaving its run orphaned), ``sigterm``, ``second_writer`` (the same command started again
    while the first runs), ``rerun_finished`` (again into a finished output, plain and with the resume flag),
    ``other_job`` (another job into a finished output). Then continued until it ends; compared with ``ref``."""
    argv, resume = COMMANDS[command]
    out = os.path.join(work, command, f"{kind}-{i}")
    rec = {"command": command, "fault": kind, "trial": i, "exits": [], "errors": [], "stuck": False}
    run_dir = os.path.join(out, "runs", "base_seed=0")
    writers = Writers(run_dir) if command == "sweep" else None
    if kind in ("rerun_finished", "other_job"):
        shutil.copytree(os.path.join(work, command, "reference"), out)
        before = fingerprint(out)
        if kind == "rerun_finished":
            for flags in ([], resume):
                p = subprocess.run(argv(out) + flags, env=ENV, cwd=ROOT, capture_output=True, text=True)
                rec["exits"].append(p.returncode)
                refused, same = _one_line_error(p.returncode, p.stderr), fingerprint(out) == before
                rec.setdefault("refused_or_no_op", []).append((refused or p.returncode == 0) and same)
                if p.returncode != 0:
                    rec["errors"].append(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "")
            rec["ok"] = all(rec["refused_or_no_op"])
            rec["stale"] = fingerprint(out) != before
        else:
            p = subprocess.run(argv(out) + OTHER_JOB[command], env=ENV, cwd=ROOT, capture_output=True, text=True)
            rec["exits"].append(p.returncode)
            if p.returncode == 0:   # replaced: must equal that job run into an empty directory
                fresh = os.path.join(work, command, "other-job-fresh")
                if not os.path.exists(fresh):
                    subprocess.run(argv(fresh) + [f for f in OTHER_JOB[command] if f != "--overwrite"], env=ENV,
                                   cwd=ROOT, check=True, capture_output=True)
                rec["stale"] = _diff(fingerprint(out), fingerprint(fresh))
                rec["ok"] = not rec["stale"]
            else:   # refused: the finished output untouched
                rec["errors"].append(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "")
                rec["stale"] = _diff(fingerprint(out), before)
                rec["ok"] = _one_line_error(p.returncode, p.stderr) and not rec["stale"]
            rec["stale"] = bool(rec["stale"])
        rec["two_writers"] = bool(writers and writers.close() > 1)
        return rec
    proc = subprocess.Popen(argv(out), env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        if kind == "second_writer":
            _wait(lambda: outdir.owner(out) is not None, proc, 120)
            _wait(lambda: False, proc, rng.random() * duration / 2)
            p = subprocess.run(argv(out) + resume, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
            rec["second_exit"] = p.returncode
            rec["second_message"] = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
            first_alive = proc.poll() is None
            # refused while the first runs; or (the first already gone) a no-op on its finished output
            rec["second_refused"] = _one_line_error(p.returncode, p.stderr) or not first_alive
            rec["two_writers"] = p.returncode == 0 and first_alive
        else:
            frac = rng.uniform(0.1, 0.9)
            rec["moment"] = f"{frac:.2f} of an uninterrupted run"
            _wait(lambda: False, proc, frac * duration)
            only_parent = command == "sweep" and kind == "kill9" and i % 2 == 0
            if kind == "kill9":
                rec["killed"] = "the sweep process only" if only_parent else "the process group"
            if proc.poll() is None:
                if kind == "sigterm":
                    proc.send_signal(signal.SIGTERM)
                elif only_parent:
                    proc.kill()
                else:
                    os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
        rec["exits"].append(proc.returncode)
        if kind == "sigterm" and proc.returncode > 0:   # handled by the command: one line, non-zero exit
            rec["clean_exit"] = _one_line_error(proc.returncode, err)
        elif kind == "sigterm" and proc.returncode < 0:   # it came while Python started, before acrl's handler
            rec["died_before_handler"] = True
        if proc.returncode != 0:
            _continue(command, out, rec)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_group(proc)
    if writers:
        rec["two_writers"] = rec.get("two_writers", False) or writers.close() > 1
    rec["two_writers"] = rec.get("two_writers", False)
    rec["diff"] = _diff(fingerprint(out), ref)
    rec["identical"] = not rec["stuck"] and rec["exits"][-1:] == [0] and not rec["diff"]
    rec["stale"] = False
    rec["ok"] = rec["identical"] and rec.get("clean_exit", True) and rec.get("second_refused", True)
    return rec


def run_commands(args, commands: list[str], trials: int) -> dict:
    """Fault every command in ``commands`` (``trials`` per fault kind) and return their records and counts."""
    rng = random.Random(args.seed)
    records, setup = [], {}
    for command in commands:
        argv, _ = COMMANDS[command]
        ref_dir = os.path.join(args.out, command, "reference")
        t = time.time()
        subprocess.run(argv(ref_dir), env=ENV, cwd=ROOT, check=True, capture_output=True)
        duration = time.time() - t
        again = os.path.join(args.out, command, "reference-again")
        subprocess.run(argv(again), env=ENV, cwd=ROOT, check=True, capture_output=True)
        ref = fingerprint(ref_dir)
        setup[command] = {"argv": " ".join(["acrl", *argv("OUT")[3:]]), "uninterrupted_seconds": round(duration, 1),
                          "fault_free_runs_identical": fingerprint(again) == ref, "files_compared": len(ref)}
        for kind, n in (("kill9", trials), ("sigterm", max(1, trials - 1)), ("second_writer", max(1, trials - 1)),
                        ("rerun_finished", 1), ("other_job", 1)):
            for i in range(n):
                rec = trial_command(command, kind, i, args.out, ref, rng, duration)
                records.append(rec)
                print(json.dumps({k: rec.get(k) for k in ("command", "fault", "trial", "exits", "ok", "diff",
                                                            "two_writers", "errors")}), flush=True)
    return {"setup": setup, **count(records, setup)}


def count(records: list[dict], setup: dict) -> dict:
    """Counts per command and fault kind, and the totals the goal is judged on."""
    counts: dict = {}
    for r in records:
        if r["fault"] == "sigterm":
            r["ok"] = r["identical"] and r.get("clean_exit", True)
        c = counts.setdefault(r["command"], {}).setdefault(r["fault"], {
            "trials": 0, "ok": 0, "identical": 0, "refused_cleanly": 0, "not_ok": 0, "two_writers": 0, "stale": 0,
            "stuck": 0})
        c["trials"] += 1
        c["ok"] += bool(r["ok"])
        c["not_ok"] += not r["ok"]
        c["identical"] += bool(r.get("identical"))
        c["refused_cleanly"] += bool(r.get("second_refused") and r.get("second_exit", 0) != 0) or \
            (r["fault"] in ("rerun_finished", "other_job") and r["ok"] and any(e != 0 for e in r["exits"]))
        c["two_writers"] += bool(r["two_writers"])
        c["stale"] += bool(r["stale"])
        c["stuck"] += bool(r["stuck"])
    totals = {"runs": len(records), "ok": sum(r["ok"] for r in records),
              "two_writers": sum(bool(r["two_writers"]) for r in records),
              "stale_outputs": sum(bool(r["stale"]) for r in records)}
    totals["goal_met"] = totals["ok"] == totals["runs"] and totals["two_writers"] == totals["stale_outputs"] == 0 \
        and all(s["fault_free_runs_identical"] for s in setup.values())
    totals["sigterm_before_handler"] = sum(bool(r.get("died_before_handler")) for r in records)
    return {"counts": counts, "totals": totals, "runs": records}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--signals", type=int, default=3, help="SIGINT and SIGTERM trials each")
    ap.add_argument("--commands", default="train,sweep,eval,warmstart",
                    help="comma-separated commands to fault; the results of the others are kept from the file")
    ap.add_argument("--trials", type=int, default=3, help="kills per command (sweep, eval, warmstart); one fewer "
                                                          "SIGTERM and second-writer trials")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/acrl-chaos")
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "chaos.json"))
    args = ap.parse_args()
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    unknown = sorted(set(commands) - {"train", *COMMANDS})
    if unknown:
        ap.error(f"--commands: unknown {', '.join(unknown)} (train, {', '.join(COMMANDS)})")
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    ok = True
    if "train" in commands:
        ok = train_chaos(args)
    others = [c for c in COMMANDS if c in commands]
    if others:
        t = time.time()
        res = run_commands(args, others, args.trials)
        res["seconds"] = round(time.time() - t, 1)
        summary = json.load(open(args.results)) if os.path.exists(args.results) else {}
        summary["commands"] = res
        with open(args.results, "w") as fh:
            json.dump(summary, fh, indent=1)
        print(json.dumps({"counts": res["counts"], "totals": res["totals"]}, indent=1))
        ok = ok and res["totals"]["goal_met"]
    return 0 if ok else 1


def train_chaos(args) -> bool:
    """The ``acrl train`` faults (see the module's docstring); writes its part of the results file."""
    rng = random.Random(args.seed)
    t = time.time()
    ref_dir = os.path.join(args.out, "reference")
    subprocess.run(_cmd(ref_dir), env=ENV, cwd=ROOT, check=True)
    duration = time.time() - t
    reference = _metrics(ref_dir)
    records: list[dict] = []

    def save(rec: dict) -> None:
        records.append(rec)
        print(json.dumps({k: rec[k] for k in ("fault", "trial", "exits", "identical", "steps_redone", "stuck")
                          if k in rec}), flush=True)
        _write(args, records, duration, time.time() - t)

    i = 0
    while sum(r["fault"] == "kill9" and not r.get("signal_after_end") for r in records) < args.kills \
            and i < 2 * args.kills:   # kills that found the run already finished do not count
        save(trial_signal("kill9", i, args.out, reference, rng, duration))
        i += 1
    for kind in ("sigint", "sigterm"):
        for i in range(args.signals):
            save(trial_signal(kind, i, args.out, reference, rng, duration))
    reasoner = Service("reasoner")
    # the served world reasoner answers exactly as the in-process one: the in-process reference applies
    save(trial_service("reasoner_restart", 0, args.out, reference, reasoner, 4.0, reasoner.flags()))
    save(trial_service("reasoner_dead", 0, args.out, reference, reasoner, None, reasoner.flags()))
    from acrl.config import SHIPPED_CAPTIONER

    clarifier = Service("clarifier", SHIPPED_CAPTIONER)
    clar_ref = os.path.join(args.out, "reference-clarifier")
    clarifier.start()
    subprocess.run(_cmd(clar_ref, *clarifier.flags()), env=ENV, cwd=ROOT, check=True)
    subprocess.run(_cmd(clar_ref + "-again", *clarifier.flags()), env=ENV, cwd=ROOT, check=True)
    clarifier.kill()
    rec = trial_service("clarifier_restart", 0, args.out, _metrics(clar_ref), clarifier, 4.0, clarifier.flags())
    # the served clarifier batches concurrent requests as they arrive: is a fault-free run itself reproducible?
    rec["fault_free_runs_identical"] = _comparable(_metrics(clar_ref)) == _comparable(_metrics(clar_ref + "-again"))
    save(rec)
    save(trial_disk_full(args.out, reference))
    summary = _write(args, records, duration, time.time() - t)
    print(json.dumps(summary["totals"], indent=1))
    return summary["totals"]["goal_met"]


def _write(args, records: list[dict], duration: float, seconds: float) -> dict:
    done = [r for r in records if "skipped" not in r]
    totals = {
        "runs": len(done),
        "kill9": sum(r["fault"] == "kill9" for r in done),
        "kill9_hit_a_running_process": sum(r["fault"] == "kill9" and not r.get("signal_after_end") for r in done),
        "kill9_during_checkpoint_write": sum(r.get("moment") == "checkpoint write" for r in done),
        "resumed": sum(r["resumed"] for r in done),
        "identical": sum(r["identical"] for r in done),
        "not_identical": sum(r["resumed"] and not r["identical"] for r in done),
        "steps_redone": sum(r["steps_redone"] for r in done),
        "steps_redone_after_sigint_sigterm": sum(r["steps_redone"] for r in done if r["fault"] in ("sigint",
                                                                                                    "sigterm")),
        "sigint_sigterm_unclean_exits": sum(r.get("clean_exit") is False for r in done
                                            if r["fault"] in ("sigint", "sigterm")),
        "service_down_clean_exit": all(r.get("clean_exit") for r in done if r["fault"] in ("reasoner_dead",
                                                                                          "disk_full")),
        "stuck": sum(r["stuck"] for r in done),
        "silent_successes": sum(r["silent_success"] for r in done),
        "lost_rows": sum(r["lost_rows"] for r in done),
        "skipped": [f"{r['fault']}: {r['skipped']}" for r in records if "skipped" in r],
    }
    totals["goal_met"] = (totals["resumed"] == totals["runs"] == totals["identical"] and totals["stuck"] == 0
                          and totals["silent_successes"] == 0 and totals["lost_rows"] == 0
                          and totals["sigint_sigterm_unclean_exits"] == 0 and totals["service_down_clean_exit"]
                          and totals["steps_redone_after_sigint_sigterm"] == 0)
    summary = {"setup": {"config": "configs/micro.yaml", "steps": STEPS, "checkpoint_every": 3,
                         "uninterrupted_seconds": round(duration, 1), "seed": args.seed},
               "seconds": round(seconds, 1), "totals": totals, "runs": records}
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    if os.path.exists(args.results) and "commands" in (kept := json.load(open(args.results))):
        summary["commands"] = kept["commands"]
    with open(args.results, "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


if __name__ == "__main__":
    sys.exit(main())
