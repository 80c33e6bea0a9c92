"""``acrl sweep``: every combination of a grid of config values × seeds as separate training runs, one table.

One sweep::

    --config C, --set, --grid KEY=v1,v2, --arm NAME:KEY=V KEY=V, --seeds  ──► plan(): one run directory per
        (arm or grid point) × seed, holding job.json (its full config)
    run_local() / run_submitit()   each unfinished run in its own process (one thread): held-out curve at
        step 0 and every train.eval_every steps, train() (resumed from its checkpoint after a kill), π_ref's
        answer accuracy in the run's world, final evaluation on eval.split and on every eval.sets entry
        ──► RUN/result.json (written last: its presence marks the run finished; finished runs are skipped)
    aggregate()                    results.csv / results.json (mean, spread and values over seeds of every final
        metric, the held-out curves, their area and the steps to 50% / 80%), results.md, curves.png

Processes get ``OMP_NUM_THREADS=1`` and ``train.threads=1``, so ``--jobs N`` uses N cores. Beyond one machine the
same runs can go to Slurm through submitit (``--launcher submitit``): each job is ``python -m acrl.app.sweep RUN``.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from acrl import outdir
from acrl.app.assemble import CURVE_KEYS, evaluators, make_run, views
from acrl.config import load_config, to_dict
from acrl.eval.evaluate import evaluate
from acrl.eval.metrics import question_quality
from acrl.train.guard import Interrupted
from acrl.train.loop import train
from acrl.train.warmstart import evaluate_reading
from acrl.world import make_problems

FINAL_KEYS = ("accuracy", "clarification_rate", "accuracy_with_clarification", "acc_deny", "caption_words",
              "question_about_missing", "question_answerable", "asks_when_missing")
TRAIN_KEYS = ("uniform_frac", "kl_mean", "reward", "clarification_rate", "mean_turns")
BUDGETS = (10, 20, 50, 100, 200)
THRESHOLDS = (0.5, 0.8)
RESULT, JOB = "result.json", "job.json"


@dataclass
class Job:
    name: str        # run directory name: arm and seed
    arm: str         # what is compared (the run without its seed)
    seed: int
    overrides: list[str]
    config: dict


def split_values(text: str) -> list[str]:
    """``0,0.5,[1,0.7]`` -> ``['0', '0.5', '[1,0.7]']``: commas inside brackets or braces do not split."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v.strip() for v in out if v.strip()]


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """``train.alpha=0,0.7`` -> ``('train.alpha', ['0', '0.7'])``."""
    key, sep, values = spec.partition("=")
    if not sep or not key.strip() or not split_values(values):
        raise ValueError(f"--grid {spec!r} must look like section.key=v1,v2,...")
    return key.strip(), split_values(values)


def parse_arm(spec: str) -> tuple[str, list[str]]:
    """``anneal:train.alpha=1 train.alpha_schedule=linear`` -> ``('anneal', [overrides])``."""
    name, sep, rest = spec.partition(":")
    pairs = rest.split()
    if not sep or not _slug(name) or not pairs or any("=" not in p for p in pairs):
        raise ValueError(f"--arm {spec!r} must look like NAME:section.key=value [section.key=value ...]")
    return _slug(name), pairs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text.strip()).strip("_")


def plan(config: str | None, overrides: list[str], grids: list[str], arms: list[str], seeds: list[int]) -> list[Job]:
    """Every (arm × grid point) × seed as a :class:`Job`; each config is built and checked now."""
    named = [parse_arm(a) for a in arms] or [("", [])]
    if len({n for n, _ in named}) != len(named):
        raise ValueError("--arm names must be distinct")
    axes = [parse_grid(g) for g in grids]
    jobs = []
    for (arm_name, arm_over), point in itertools.product(named, itertools.product(*[v for _, v in axes])):
        grid_over = [f"{k}={v}" for (k, _), v in zip(axes, point)]
        arm = "_".join(x for x in [arm_name] + [_slug(f"{k.split('.')[-1]}={v}") for (k, _), v in zip(axes, point)]
                       if x) or "base"
        for seed in seeds:
            over = [*overrides, *arm_over, *grid_over, f"train.seed={seed}", "train.threads=1"]
            cfg = load_config(config, over)
            jobs.append(Job(f"{arm}_seed={seed}", arm, seed, over, to_dict(cfg)))
    return jobs


def _write_json(path: str, obj) -> None:
    outdir.write_json(path, obj)


def prepare(jobs: list[Job], out: str) -> list[str]:
    """Create the run directories; returns those without a result. A directory whose job.json holds another
    config is refused (the sweep changed: use another --out)."""
    todo = []
    for job in jobs:
        d = os.path.join(out, "runs", job.name)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, JOB)
        spec = {"name": job.name, "arm": job.arm, "seed": job.seed, "overrides": job.overrides, "config": job.config}
        if os.path.exists(path):
            old = outdir.read_json(path, f"the job of run {job.name}")
            # compared as stored (JSON keys are strings)
            if not isinstance(old, dict) or old.get("config") != json.loads(json.dumps(job.config)):
                raise ValueError(f"{path} holds a different config for run {job.name!r}; the sweep changed: use a new "
                                 f"--out (or delete that run)")
        else:
            _write_json(path, spec)
        if not os.path.exists(os.path.join(d, RESULT)):
            todo.append(d)
    return todo


# --- one run (in its own process) ----------------------------------------------------------------------------------

def run_job(run_dir: str, progress: bool = False) -> dict:
    """Train and evaluate the run in ``run_dir`` (from its job.json); resumes from its newest checkpoint. The run is
    assembled exactly as ``acrl train`` assembles it (:func:`acrl.app.assemble.make_run`)."""
    t0 = time.time()
    outdir.own(run_dir, "acrl sweep run")   # one trainer per run: a second sweep waits for this process
    job = outdir.read_json(os.path.join(run_dir, JOB), "the job of this run, written by acrl sweep")
    cfg = load_config(base=job["config"])
    torch.set_num_threads(max(cfg.train.threads, 1))
    run = make_run(cfg, run_dir, resume="auto")
    step0 = os.path.join(run_dir, "step0.json")
    if not os.path.exists(step0) and run.evaluate:
        _write_json(step0, {"step": 0, "eval": run.evaluate(0)})
    ref_check = os.path.join(run_dir, "reference.json")
    if not os.path.exists(ref_check):
        _write_json(ref_check, reference_answers(run.reference, views(cfg), cfg))
    train(run, progress=progress)
    final = {}
    for name, (reasoner, clar, k) in evaluators(cfg, run.policy, run.reference, run.colearner).items():
        problems = make_problems(cfg.eval.split, cfg.eval.n, views(cfg)[name].world)
        s, items = evaluate(run.policy, reasoner, clar, problems, cfg.eval.batch_size, max_clarifications=k)
        final[name] = {**s["overall"], **question_quality(items, problems), "by_turns": s["by_turns"],
                       "by_needed": s["by_needed"], "by_family": s["by_family"]}
    result = {"name": job["name"], "arm": job["arm"], "seed": job["seed"], "overrides": job["overrides"],
              "final": final, "seconds": round(time.time() - t0, 1)}
    _write_json(os.path.join(run_dir, RESULT), result)
    return result


def reference_answers(reference, views: dict, cfg) -> dict:
    """How well π_ref answers clarification questions in each evaluated world (a 4-bar world needs a π_ref that
    has seen four bars): answer accuracy per view, None for a captioner without the world's reading check."""
    out = {}
    for name, v in views.items():
        try:
            r = evaluate_reading(reference, v.world, min(cfg.train.eval_n, 200))
            out[name] = {"answer_accuracy": r["answer_accuracy"], "by_family": r["answer_accuracy_by_family"]}
        except (AttributeError, TypeError):   # not the tiny world captioner
            out[name] = None
    return out


# --- launchers -----------------------------------------------------------------------------------------------------

def _job_env() -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = "1"
    return env


def run_local(dirs: list[str], jobs: int = 1, log=print) -> dict[str, int]:
    """Run each directory's job as ``python -m acrl.app.sweep DIR`` with at most ``jobs`` at once; returns exit codes.
    SIGINT / SIGTERM stop the running jobs (they checkpoint) and re-raise; a later sweep resumes them."""
    pending, running, codes = list(dirs), {}, {}
    orphans: set[str] = set()   # runs still owned by a live process of an earlier sweep: waited for, not restarted
    stop = []

    def handler(signum, frame):
        stop.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (pending or running) and not stop:
            for d in [d for d in pending if d not in orphans and (who := outdir.owner(d))]:
                orphans.add(d)
                log(f"sweep: {os.path.basename(d)} is still being run by {who} (left by an earlier sweep); waiting "
                    f"for it instead of starting a second trainer")
            for d in [d for d in orphans if not outdir.owner(d)]:
                orphans.discard(d)
                if os.path.exists(os.path.join(d, RESULT)):   # it finished: adopt its result
                    pending.remove(d)
                    codes[d] = 0
                    log(f"sweep: {os.path.basename(d)} done (finished by the earlier sweep's process)")
            while len(running) < jobs and (free := [d for d in pending if d not in orphans]):
                d = free[0]
                pending.remove(d)
                logf = open(os.path.join(d, "log.txt"), "a")
                running[d] = (subprocess.Popen([sys.executable, "-m", "acrl.app.sweep", d], stdout=logf,
                                               stderr=subprocess.STDOUT, env=_job_env()), logf)
                log(f"sweep: started {os.path.basename(d)} ({len(codes) + len(running)}/{len(dirs)})")
            time.sleep(0.5)
            for d, (proc, logf) in list(running.items()):
                if proc.poll() is not None:
                    logf.close()
                    codes[d] = proc.returncode
                    del running[d]
                    log(f"sweep: {os.path.basename(d)} " + ("done" if proc.returncode == 0 else
                        f"failed (exit {proc.returncode}; see {os.path.join(d, 'log.txt')})"))
    finally:
        for proc, _ in running.values():
            proc.send_signal(signal.SIGTERM)   # train() checkpoints and exits
        for d, (proc, logf) in running.items():
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
            logf.close()
            codes[d] = proc.returncode
        for s, h in old.items():
            signal.signal(s, h)
    if stop:
        raise KeyboardInterrupt(f"sweep stopped by {signal.Signals(stop[0]).name}; run it again to resume")
    return codes


def run_submitit(dirs: list[str], out: str, params: dict, log=print) -> dict[str, int]:
    """Hand the runs to Slurm (or submitit's local executor, ``cluster=local``) as a job array; waits for them."""
    try:
        import submitit
    except ImportError:
        raise ValueError("--launcher submitit needs the submitit package: pip install submitit") from None
    params = dict(params)
    ex = submitit.AutoExecutor(folder=os.path.join(out, "submitit"), cluster=params.pop("cluster", None))
    ex.update_parameters(**{"cpus_per_task": 1, **params})
    handles = ex.map_array(_run_in_subprocess, dirs)
    log(f"sweep: submitted {len(handles)} job(s): {handles[0].job_id if handles else '-'}")
    codes = {}
    for d, h in zip(dirs, handles):
        try:
            codes[d] = h.result()
        except Exception as e:   # noqa: BLE001 - submitit re-raises the job's failure
            log(f"sweep: {os.path.basename(d)} failed: {type(e).__name__}: {e}")
            codes[d] = 1
    return codes


def _run_in_subprocess(d: str) -> int:
    return subprocess.call([sys.executable, "-m", "acrl.app.sweep", d], env=_job_env())


# --- aggregation ---------------------------------------------------------------------------------------------------

def _read_jsonl(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def _stats(values: list[float]) -> dict:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": values}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals), "values": values}


def curve_summary(points: list[tuple[int, float]]) -> dict:
    """Area under a held-out curve (trapezoids, divided by its step range: a mean accuracy), the first step at
    which it reaches each threshold (None: never) and its value at each budget step it has."""
    pts = sorted(points)
    out: dict = {}
    if len(pts) >= 2:
        area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in zip(pts, pts[1:]))
        out["auc"] = area / (pts[-1][0] - pts[0][0])
    else:
        out["auc"] = pts[0][1] if pts else None
    for t in THRESHOLDS:
        out[f"steps_to_{int(100 * t)}"] = next((s for s, a in pts if a >= t), None)
    at = dict(pts)
    for b in BUDGETS:
        out[f"at_{b}"] = at.get(b)
    return out


def run_metrics(run_dir: str) -> dict | None:
    """One finished run's numbers: final metrics per view, training means, curves and their summaries."""
    path = os.path.join(run_dir, RESULT)
    if not os.path.exists(path):
        return None
    res = outdir.read_json(path, "a finished run's result")
    hist = _read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    step0 = os.path.join(run_dir, "step0.json")
    evals = ([outdir.read_json(step0)] if os.path.exists(step0) else []) + [r for r in hist if "eval" in r]
    m: dict = {}
    for view, s in res["final"].items():
        for k in FINAL_KEYS:
            m[f"{view}/final_{k}"] = s.get(k)
        m[f"{view}/final_mean_turns"] = sum(int(t) * v["fraction"] for t, v in s.get("by_turns", {}).items())
    tail = hist[-10:]
    for k in TRAIN_KEYS:
        m[f"train/{k}_mean"] = sum(r.get(k, 0.0) for r in hist) / len(hist) if hist else None
        m[f"train/{k}_last10"] = sum(r.get(k, 0.0) for r in tail) / len(tail) if tail else None
    curves = {}
    for view in res["final"]:
        for k in CURVE_KEYS:
            key = k if view == "in" else f"{view}.{k}"
            pts = [(r["step"], r["eval"][key]) for r in evals if key in r["eval"]]
            curves[f"{view}/{k}"] = pts
        for name, v in curve_summary(curves[f"{view}/accuracy"]).items():
            m[f"{view}/curve_{name}"] = v
    ref = os.path.join(run_dir, "reference.json")
    if os.path.exists(ref):
        for view, r in outdir.read_json(ref).items():
            m[f"{view}/reference_answer_accuracy"] = r["answer_accuracy"] if r else None
    return {"name": res["name"], "arm": res["arm"], "seed": res["seed"], "metrics": m, "curves": curves,
            "seconds": res.get("seconds")}


def versus(table: dict, baseline: str) -> dict | None:
    """Every arm against ``baseline``, paired by seed: per compared metric the differences (arm − baseline) on
    the seeds both have, their mean / sample std, and on how many seeds the arm is ahead (wins) or behind."""
    if baseline not in table:
        return None
    base = table[baseline]
    keys = [k for k in base["metrics"] if k.endswith(("/final_accuracy", "/curve_auc"))
            or re.search(r"/curve_at_\d+$", k)]
    arms = {}
    for arm, a in table.items():
        if arm == baseline:
            continue
        pairs = {}
        for k in keys:
            mine = dict(zip(a["seeds"], a["metrics"].get(k, {}).get("values", [])))
            theirs = dict(zip(base["seeds"], base["metrics"][k]["values"]))
            diffs = [mine[s] - theirs[s] for s in a["seeds"]
                     if s in theirs and mine.get(s) is not None and theirs[s] is not None]
            if diffs:
                pairs[k] = {**_stats(diffs), "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs)}
        arms[arm] = pairs
    return {"baseline": baseline, "arms": arms}


def aggregate(out: str, plot: bool = True, baseline: str = "alpha=0") -> dict:
    """Read every finished run under ``out/runs`` and write ``results.json``, ``results.csv`` and (``plot``)
    ``curves.png``: per arm, mean / spread (sample std) / values over seeds of every metric, and the mean
    held-out curves; with an arm named ``baseline``, every other arm's paired-by-seed differences from it
    (``versus``)."""
    root = os.path.join(out, "runs")
    runs = [r for d in sorted(os.listdir(root)) if (r := run_metrics(os.path.join(root, d)))] \
        if os.path.isdir(root) else []
    unfinished = sorted(set(os.listdir(root)) - {r["name"] for r in runs}) if os.path.isdir(root) else []
    table_path = os.path.join(out, "results.json")
    if not runs and os.path.exists(table_path):
        had = outdir.read_json(table_path).get("runs")
        if had:   # the run files are missing, not the runs: never replace a table with an empty one
            raise ValueError(f"no finished runs under {root}, but {table_path} holds {len(had)}: "
                             f"results.json left as it is (aggregate where the runs' files are)")
    os.makedirs(out, exist_ok=True)
    arms: dict = {}
    for r in runs:
        arms.setdefault(r["arm"], []).append(r)
    table = {}
    for arm, rs in arms.items():
        rs.sort(key=lambda r: r["seed"])
        keys = sorted({k for r in rs for k in r["metrics"]})
        curves = {}
        for ck in sorted({k for r in rs for k in r["curves"]}):
            steps = sorted({s for r in rs for s, _ in r["curves"].get(ck, [])})
            per = [dict(r["curves"].get(ck, [])) for r in rs]
            curves[ck] = {"steps": steps, **{f: [_stats([p.get(s) for p in per])[f] for s in steps]
                                             for f in ("mean", "std")}}
        table[arm] = {"seeds": [r["seed"] for r in rs],
                      "metrics": {k: _stats([r["metrics"].get(k) for r in rs]) for k in keys}, "curves": curves}
    result = {"arms": table, "runs": [{k: r[k] for k in ("name", "arm", "seed", "seconds", "metrics")} for r in runs],
              "unfinished": unfinished}
    vs = versus(table, baseline)
    if vs:
        result["versus"] = vs
    _write_json(table_path, result)
    keys = sorted({k for a in table.values() for k in a["metrics"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["arm", "seeds"] + [f"{k} {f}" for k in keys for f in ("mean", "std")])
    for arm, a in sorted(table.items()):
        w.writerow([arm, " ".join(map(str, a["seeds"]))] + [
            "" if (v := a["metrics"].get(k, {}).get(f)) is None else f"{v:.4g}" for k in keys
            for f in ("mean", "std")])
    outdir.write_text(os.path.join(out, "results.csv"), buf.getvalue())
    outdir.write_text(os.path.join(out, "results.md"), markdown(table) + (versus_markdown(vs) if vs else ""))
    if plot and table:
        plot_curves(table, os.path.join(out, "curves.png"))
        if grid_axis(table):
            plot_grid(table, os.path.join(out, "grid.png"))
    return result


def _pm(m: dict | None, pct: bool = True) -> str:
    if not m or m.get("mean") is None:
        return "–"
    f = 100 if pct else 1
    missing = len(m["values"]) - m["n"]
    text = f"{f * m['mean']:.1f} ± {f * m['std']:.1f}" if pct else f"{m['mean']:.3g} ± {m['std']:.2g}"
    return text + (f" ({missing} never)" if missing else "")


def markdown(table: dict) -> str:
    """The sweep as Markdown tables: mean ± sample std over seeds (held-out curve points on ``val``, final
    metrics on ``eval.split``; accuracies in %)."""
    views = sorted({k.split("/")[0] for a in table.values() for k in a["metrics"] if k.endswith("/final_accuracy")},
                   key=lambda v: (v != "in", v))
    budgets = [b for b in BUDGETS if any(a["metrics"].get(f"in/curve_at_{b}", {}).get("n") for a in table.values())]
    head = (["arm", "seeds"] + [f"val acc @{b}" for b in budgets] + ["val AUC", "steps to 50%", "steps to 80%",
            "test acc", "clar. rate", "acc. with clar.", "mean turns", "uniform groups (train)", "KL (last 10)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, a in sorted(table.items()):
        m = a["metrics"].get
        lines.append("| " + " | ".join(
            [arm, str(len(a["seeds"]))] + [_pm(m(f"in/curve_at_{b}")) for b in budgets]
            + [_pm(m("in/curve_auc")), _pm(m("in/curve_steps_to_50"), False), _pm(m("in/curve_steps_to_80"), False),
               _pm(m("in/final_accuracy")), _pm(m("in/final_clarification_rate")),
               _pm(m("in/final_accuracy_with_clarification")), _pm(m("in/final_mean_turns"), False),
               _pm(m("train/uniform_frac_mean")), _pm(m("train/kl_mean_last10"), False)]) + " |")
    if len(views) > 1:
        head = ["arm"] + [f"{v}: test acc" for v in views] + [f"{v}: clar. rate" for v in views] + \
            [f"{v}: π_ref answers" for v in views]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm, a in sorted(table.items()):
            m = a["metrics"].get
            lines.append("| " + " | ".join([arm] + [_pm(m(f"{v}/final_accuracy")) for v in views]
                                           + [_pm(m(f"{v}/final_clarification_rate")) for v in views]
                                           + [_pm(m(f"{v}/reference_answer_accuracy")) for v in views]) + " |")
    return "\n".join(lines) + "\n"


def _delta(m: dict | None) -> str:
    if not m or m.get("mean") is None:
        return "–"
    return f"{100 * m['mean']:+.1f} ± {100 * m['std']:.1f} ({m['wins']}–{m['losses']})"


def versus_markdown(vs: dict) -> str:
    """The paired comparison as a Markdown table: differences from the baseline in points, mean ± std over
    seeds, and (wins–losses) over those seeds."""
    keys = sorted({k for a in vs["arms"].values() for k in a})
    budgets = sorted({int(k.rsplit("_", 1)[1]) for k in keys if k.startswith("in/curve_at_")})
    views = sorted({k.split("/")[0] for k in keys if k.endswith("/final_accuracy")}, key=lambda v: (v != "in", v))
    head = (["arm", "paired seeds"] + [f"Δ val acc @{b}" for b in budgets] + ["Δ val AUC"]
            + [f"Δ {'' if v == 'in' else v + ': '}test acc" for v in views])
    lines = ["", f"Against {vs['baseline']} (paired by seed: arm − {vs['baseline']} in points, mean ± std over "
             f"seeds, (seeds ahead–behind)):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, a in sorted(vs["arms"].items()):
        n = max((m["n"] for m in a.values()), default=0)
        lines.append("| " + " | ".join([arm, str(n)] + [_delta(a.get(f"in/curve_at_{b}")) for b in budgets]
                                       + [_delta(a.get("in/curve_auc"))]
                                       + [_delta(a.get(f"{v}/final_accuracy")) for v in views]) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(table: dict, path: str) -> None:
    """Held-out single-pass accuracy and clarification rate vs step: mean over seeds with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({k for a in table.values() for k in a["curves"]
                     if k.endswith(("/accuracy", "/clarification_rate"))})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for arm, a in sorted(table.items()):
            c = a["curves"].get(key)
            if not c or not c["steps"]:
                continue
            mean = [100 * (m or 0) for m in c["mean"]]
            std = [100 * (s or 0) for s in c["std"]]
            ax.plot(c["steps"], mean, marker="o", ms=3, label=f"{arm} (n={len(a['seeds'])})")
            ax.fill_between(c["steps"], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            alpha=0.15)
        ax.set_title(key.replace("/", ": "), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def grid_axis(table: dict) -> tuple[str, dict[str, float]] | None:
    """When the arms are one numeric grid (``train.alpha=0`` ... or ``alpha=0.3``, at least three values), its key
    and each arm's value; else None (named arms such as ``anneal-1-0`` are left out of the axis)."""
    found: dict[str, dict[str, float]] = {}
    for arm in table:
        if "=" in arm and " " not in arm:
            key, value = arm.split("=", 1)
            try:
                found.setdefault(key, {})[arm] = float(value)
            except ValueError:
                continue
    key, arms = max(found.items(), key=lambda kv: len(kv[1]), default=(None, {}))
    return (key, arms) if len(arms) >= 3 else None


def plot_grid(table: dict, path: str) -> None:
    """Final single-pass accuracy, clarification rate and held-out AUC against the grid's value: mean over seeds
    with ±1 std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, arms = grid_axis(table)
    order = sorted(arms, key=arms.get)
    panels = (("in/final_accuracy", "test single-pass accuracy"), ("in/final_clarification_rate", "clarification rate"),
              ("in/curve_auc", "held-out AUC (mean val accuracy over the run)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels):
        stats = [table[a]["metrics"].get(metric) or {} for a in order]
        xs = [arms[a] for a, st in zip(order, stats) if st.get("mean") is not None]
        ys = [100 * st["mean"] for st in stats if st.get("mean") is not None]
        es = [100 * st["std"] for st in stats if st.get("mean") is not None]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(key)
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- command line --------------------------------------------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2``: distinct integers, at least one."""
    try:
        seeds = [int(s) for s in split_values(text)]
    except ValueError:
        raise ValueError(f"--seeds {text!r} must be comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise ValueError(f"--seeds {text!r} names no seed, e.g. --seeds 0,1,2")
    if dup := sorted({s for s in seeds if seeds.count(s) > 1}):
        raise ValueError(f"--seeds {text!r} repeats seed {', '.join(map(str, dup))} (two runs of one seed)")
    return seeds


def cmd_sweep(args) -> int:
    seeds = parse_seeds(args.seeds)
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs} must be at least 1")
    if args.aggregate_only and not os.path.isdir(os.path.join(args.out, "runs")):
        raise FileNotFoundError(f"--aggregate-only: {args.out} holds no sweep (no {os.path.join(args.out, 'runs')}"
                                f"); run the sweep first, or give its --out")
    outdir.own(args.out, "acrl sweep")   # one sweep per directory (its runs each have their own owner too)
    if not args.aggregate_only:
        jobs = plan(args.config, args.overrides, args.grid, args.arm, seeds)
        todo = prepare(jobs, args.out)
        print(f"sweep: {len(jobs)} run(s) in {args.out}, {len(jobs) - len(todo)} already finished, "
              f"{len(todo)} to run", flush=True)
        if args.launcher == "submitit":
            params = dict(p.split("=", 1) for p in args.launcher_arg if "=" in p)
            codes = run_submitit(todo, args.out, {k.strip(): _num(v) for k, v in params.items()})
        else:
            codes = run_local(todo, args.jobs, log=lambda m: print(m, flush=True))
        failed = [os.path.basename(d) for d, c in codes.items() if c != 0]
    else:
        failed = []
    res = aggregate(args.out, baseline=args.baseline)
    print(f"sweep: {len(res['runs'])} finished run(s) in {len(res['arms'])} arm(s); results in "
          f"{os.path.join(args.out, 'results.csv')} and results.json"
          + (f"; unfinished: {', '.join(res['unfinished'])}" if res["unfinished"] else ""))
    if failed:
        print(f"acrl sweep: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _num(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``acrl sweep`` on an argparse subparsers object."""
    p = subparsers.add_parser("sweep", help="train every combination of a grid × seeds (separate processes, "
                                            "resumable) and write one table with mean and spread over seeds")
    p.add_argument("--config", help="YAML config every run starts from")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field for every run (repeatable)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config field and its values; several grids combine as a product (repeatable)")
    p.add_argument("--arm", action="append", default=[], metavar="NAME:KEY=V [KEY=V ...]",
                   help="a named variant setting several fields together, e.g. 'anneal:train.alpha=1 "
                        "train.alpha_schedule=linear train.alpha_end=0' (repeatable; combined with the grids)")
    p.add_argument("--seeds", default="0", help="comma-separated train.seed values (default 0)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one CPU thread each (default 1)")
    p.add_argument("--out", required=True, help="sweep directory (runs/<run>/, results.csv, results.json)")
    p.add_argument("--launcher", choices=["local", "submitit"], default="local",
                   help="local processes, or a submitit job array (Slurm; cluster=local for a local test)")
    p.add_argument("--launcher-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="submitit executor parameter, e.g. slurm_partition=cpu, timeout_min=120 (repeatable)")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild the table from finished runs")
    p.add_argument("--baseline", default="alpha=0", metavar="ARM",
                   help="arm every other arm is compared with, paired by seed (default alpha=0, binary reward; "
                        "no comparison when no arm has that name)")
    p.set_defaults(fn=cmd_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m acrl.app.sweep RUN_DIR``: run one planned job (what the launchers start)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.exists(os.path.join(argv[0], JOB)):
        print("usage: python -m acrl.app.sweep RUN_DIR (a directory with job.json, written by acrl sweep)",
              file=sys.stderr)
        return 2
    try:
        run_job(argv[0])
    except outdir.Busy as e:
        print(f"acrl sweep: {e}", file=sys.stderr)
        return 75
    except Interrupted as e:
        print(f"run stopped by {signal.Signals(e.signum).name} at step {e.step}; the sweep resumes it",
              file=sys.stderr)
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
