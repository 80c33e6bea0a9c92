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

    python benchmarks/chaos.py [--kills 20] [--seed 0] [--out /tmp/acrl-chaos]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--signals", type=int, default=3, help="SIGINT and SIGTERM trials each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/acrl-chaos")
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "chaos.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
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
    ok = summary["totals"]["goal_met"]
    return 0 if ok else 1


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
    with open(args.results, "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


if __name__ == "__main__":
    sys.exit(main())
