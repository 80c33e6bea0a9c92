"""acrl sweep: planning, resume after a kill, skipping finished runs, aggregation over seeds, the CLI; bad values,
a second writer and malformed files are one-line refusals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import MICRO, ROOT, run_cli

import acrl
from acrl.app import sweep
from acrl.app.cli import main


def test_split_values_keeps_lists_whole():
    assert sweep.split_values("0, 0.5,[1,0.7,0.5],{a: 1, b: 2}") == ["0", "0.5", "[1,0.7,0.5]", "{a: 1, b: 2}"]


@pytest.mark.parametrize("spec", ["train.alpha", "=1,2", "train.alpha="])
def test_bad_grid_is_named(spec):
    with pytest.raises(ValueError, match="--grid"):
        sweep.parse_grid(spec)


def test_plan_is_arms_times_grid_times_seeds():
    jobs = sweep.plan(MICRO, [], ["train.alpha=0,0.7"], ["k2:train.max_clarifications=2",
                                                          "anneal:train.alpha_schedule=linear train.alpha_end=0"],
                      [0, 1])
    assert [j.name for j in jobs] == ["k2_alpha=0_seed=0", "k2_alpha=0_seed=1", "k2_alpha=0.7_seed=0",
                                      "k2_alpha=0.7_seed=1", "anneal_alpha=0_seed=0", "anneal_alpha=0_seed=1",
                                      "anneal_alpha=0.7_seed=0", "anneal_alpha=0.7_seed=1"]
    j = jobs[7]
    assert j.arm == "anneal_alpha=0.7" and j.config["train"]["alpha"] == 0.7
    assert j.config["train"]["alpha_schedule"] == "linear" and j.config["train"]["seed"] == 1
    assert j.config["train"]["threads"] == 1
    with pytest.raises(ValueError, match="train.alpha=2"):   # every config is checked when planned
        sweep.plan(MICRO, [], ["train.alpha=0,2"], [], [0])


def test_prepare_refuses_a_changed_sweep(tmp_path):
    jobs = sweep.plan(MICRO, [], ["train.alpha=0"], [], [0])
    assert len(sweep.prepare(jobs, str(tmp_path))) == 1
    (tmp_path / "runs" / jobs[0].name / sweep.RESULT).write_text("{}")
    assert sweep.prepare(jobs, str(tmp_path)) == []                # finished: skipped
    changed = sweep.plan(MICRO, ["train.lr=1e-3"], ["train.alpha=0"], [], [0])
    with pytest.raises(ValueError, match="different config"):
        sweep.prepare(changed, str(tmp_path))


def test_curve_summary_area_thresholds_and_budgets():
    s = sweep.curve_summary([(0, 0.2), (10, 0.6), (20, 0.9)])
    assert s["auc"] == pytest.approx((10 * 0.4 + 10 * 0.75) / 20)
    assert s["steps_to_50"] == 10 and s["steps_to_80"] == 20
    assert s["at_10"] == 0.6 and s["at_20"] == 0.9 and s["at_50"] is None
    assert sweep.curve_summary([(0, 0.1)])["steps_to_50"] is None


def _fake_run(root, name, arm, seed, acc, curve):
    d = root / "runs" / name
    d.mkdir(parents=True)
    final = {"in": {"accuracy": acc, "clarification_rate": 0.1, "by_turns": {"0": {"fraction": 0.75},
                                                                             "1": {"fraction": 0.25}}}}
    (d / sweep.RESULT).write_text(json.dumps({"name": name, "arm": arm, "seed": seed, "final": final}))
    (d / "step0.json").write_text(json.dumps({"step": 0, "eval": {"accuracy": curve[0]}}))
    with open(d / "metrics.jsonl", "w") as fh:
        for i, a in enumerate(curve[1:]):
            fh.write(json.dumps({"step": 10 * (i + 1), "uniform_frac": 0.5, "kl_mean": 0.01 * seed,
                                 "eval": {"accuracy": a}}) + "\n")
    (d / "reference.json").write_text(json.dumps({"in": {"answer_accuracy": 0.9}}))


def test_aggregate_mean_and_spread_over_seeds(tmp_path):
    _fake_run(tmp_path, "a_seed=0", "a", 0, 0.6, [0.1, 0.5, 0.7])
    _fake_run(tmp_path, "a_seed=1", "a", 1, 0.8, [0.1, 0.3, 0.9])
    _fake_run(tmp_path, "b_seed=0", "b", 0, 0.5, [0.1, 0.2, 0.3])
    (tmp_path / "runs" / "b_seed=1").mkdir()                      # unfinished: listed, not counted
    res = sweep.aggregate(str(tmp_path))
    a = res["arms"]["a"]
    assert a["seeds"] == [0, 1]
    acc = a["metrics"]["in/final_accuracy"]
    assert acc["mean"] == pytest.approx(0.7) and acc["std"] == pytest.approx(0.1414214) and acc["n"] == 2
    assert a["metrics"]["in/final_mean_turns"]["mean"] == pytest.approx(0.25)
    assert a["metrics"]["in/curve_steps_to_50"]["values"] == [10, 20]
    assert a["metrics"]["train/kl_mean_mean"]["mean"] == pytest.approx(0.005)
    assert a["metrics"]["in/reference_answer_accuracy"]["mean"] == 0.9
    assert a["curves"]["in/accuracy"]["steps"] == [0, 10, 20]
    assert a["curves"]["in/accuracy"]["mean"] == pytest.approx([0.1, 0.4, 0.8])
    assert res["arms"]["b"]["metrics"]["in/final_accuracy"]["std"] == 0.0
    assert res["unfinished"] == ["b_seed=1"]
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0].startswith("arm,seeds,") and len(rows) == 3 and rows[1].startswith("a,0 1,")
    assert json.loads((tmp_path / "results.json").read_text())["arms"].keys() == {"a", "b"}
    assert (tmp_path / "curves.png").stat().st_size > 1000
    md = (tmp_path / "results.md").read_text()
    assert "| a | 2 | 40.0 ± 14.1 | 80.0 ± 14.1 |" in md             # val acc at steps 10 and 20
    assert "| b | 1 |" in md and "(1 never)" in md                   # b never reaches 50%


def test_a_numeric_grid_gets_its_own_plot(tmp_path):
    for i, alpha in enumerate(("0", "0.5", "1")):
        _fake_run(tmp_path, f"alpha={alpha}_seed=0", f"alpha={alpha}", 0, 0.5 + 0.1 * i, [0.1, 0.5])
    _fake_run(tmp_path, "anneal-1-0_seed=0", "anneal-1-0", 0, 0.6, [0.1, 0.5])
    sweep.aggregate(str(tmp_path))
    assert sweep.grid_axis(json.loads((tmp_path / "results.json").read_text())["arms"]) == (
        "alpha", {"alpha=0": 0.0, "alpha=0.5": 0.5, "alpha=1": 1.0})
    assert (tmp_path / "grid.png").stat().st_size > 1000
    two = tmp_path / "two"
    for alpha in ("0", "0.7"):
        _fake_run(two, f"alpha={alpha}_seed=0", f"alpha={alpha}", 0, 0.5, [0.1, 0.5])
    sweep.aggregate(str(two))
    assert not (two / "grid.png").exists()                          # two values are no axis


def test_arms_are_compared_with_the_baseline_paired_by_seed(tmp_path):
    _fake_run(tmp_path, "alpha=0_seed=0", "alpha=0", 0, 0.80, [0.1, 0.5, 0.7])
    _fake_run(tmp_path, "alpha=0_seed=1", "alpha=0", 1, 0.60, [0.1, 0.3, 0.9])
    _fake_run(tmp_path, "alpha=0_seed=2", "alpha=0", 2, 0.70, [0.1, 0.4, 0.8])
    _fake_run(tmp_path, "b_seed=0", "b", 0, 0.90, [0.1, 0.6, 0.6])
    _fake_run(tmp_path, "b_seed=1", "b", 1, 0.50, [0.1, 0.4, 0.8])   # seed 2 of b is missing: not paired
    res = sweep.aggregate(str(tmp_path))
    vs = res["versus"]
    assert vs["baseline"] == "alpha=0" and set(vs["arms"]) == {"b"}
    acc = vs["arms"]["b"]["in/final_accuracy"]
    assert acc["values"] == pytest.approx([0.10, -0.10]) and acc["n"] == 2
    assert acc["mean"] == pytest.approx(0.0) and acc["std"] == pytest.approx(0.1414214)
    assert (acc["wins"], acc["losses"]) == (1, 1)
    at10 = vs["arms"]["b"]["in/curve_at_10"]
    assert at10["values"] == pytest.approx([0.1, 0.1]) and (at10["wins"], at10["losses"]) == (2, 0)
    md = (tmp_path / "results.md").read_text()
    assert "Against alpha=0 (paired by seed" in md
    assert "| b | 2 | +10.0 ± 0.0 (2–0) |" in md      # val acc @10: the paired difference, seeds ahead–behind
    res = sweep.aggregate(str(tmp_path), baseline="b")
    assert res["versus"]["arms"]["alpha=0"]["in/final_accuracy"]["values"] == pytest.approx([-0.10, 0.10])
    assert "versus" not in sweep.aggregate(str(tmp_path), baseline="none-such")


def test_aggregating_no_finished_runs_keeps_an_existing_table(tmp_path):
    _fake_run(tmp_path, "a_seed=0", "a", 0, 0.6, [0.1, 0.5, 0.7])
    sweep.aggregate(str(tmp_path))
    before = (tmp_path / "results.json").read_text()
    moved = tmp_path / "elsewhere"
    (tmp_path / "runs").rename(moved)                             # the run files are gone (not copied, deleted)
    with pytest.raises(ValueError, match="no finished runs under .*runs.*results.json.* left as it is"):
        sweep.aggregate(str(tmp_path))
    assert (tmp_path / "results.json").read_text() == before
    fresh = tmp_path / "fresh"                                   # nothing there before: an empty table is fine
    assert sweep.aggregate(str(fresh))["arms"] == {}


def _sweep_args(out, steps):
    return ["sweep", "--config", MICRO, "--set", f"train.steps={steps}", "--set", "train.eval_every=2",
            "--set", "train.eval_n=4", "--set", "train.checkpoint_every=1",
            "--set", "eval.sets={tri: {world: {families: [tri]}}}", "--grid", "train.alpha=0,0.7", "--seeds", "0",
            "--out", out]


def test_sweep_cli_runs_skips_and_aggregates(tmp_path):
    out = tmp_path / "sw"
    p = run_cli(*_sweep_args(out, 2), "--jobs", 2)
    assert "2 to run" in p.stdout and "2 finished run(s) in 2 arm(s)" in p.stdout
    res = json.loads((out / "results.json").read_text())
    m = res["arms"]["alpha=0.7"]["metrics"]
    assert {"in/final_accuracy", "tri/final_accuracy", "in/curve_auc", "train/uniform_frac_mean"} <= set(m)
    r = json.loads((out / "runs" / "alpha=0_seed=0" / "result.json").read_text())
    assert set(r["final"]) == {"in", "tri"} and set(r["final"]["tri"]["by_family"]) == {"tri"}
    p = run_cli(*_sweep_args(out, 2))
    assert "2 already finished, 0 to run" in p.stdout


def test_sweep_survives_being_killed(tmp_path):
    out = tmp_path / "sw"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "acrl", *_sweep_args(str(out), 6)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = out / "runs" / "alpha=0_seed=0"
    deadline = time.time() + 300
    while time.time() < deadline and not any(first.glob("checkpoint-*")):
        time.sleep(0.2)
    assert any(first.glob("checkpoint-*")), "the first run wrote no checkpoint"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode != 0 and not (first / "result.json").exists()
    p = run_cli(*_sweep_args(out, 6))
    assert "0 already finished, 2 to run" in p.stdout and "2 finished run(s)" in p.stdout
    log = (first / "log.txt").read_text()
    assert "resume: continuing from" in log                       # picked up where it was killed
    steps = [json.loads(x)["step"] for x in open(first / "metrics.jsonl")]
    assert steps == list(range(1, 7))                            # every step once


def test_submitit_launcher_without_submitit_is_a_clear_error(tmp_path, monkeypatch):
    hidden = tmp_path / "hide" / "submitit"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('no submitit here')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hidden.parent), os.environ.get("PYTHONPATH", "")]))
    p = run_cli(*_sweep_args(tmp_path / "sw", 1), "--launcher", "submitit", check=False)
    assert p.returncode == 2 and "pip install submitit" in p.stderr


def test_submitit_launcher_runs_the_same_jobs(tmp_path):
    """submitit's local executor stands in for Slurm: the same run directories, results and skipping."""
    pytest.importorskip("submitit", reason="submitit is in the [dev] extra; without it this launcher is untested")
    out = tmp_path / "sw"
    args = [*_sweep_args(out, 2), "--launcher", "submitit", "--launcher-arg", "cluster=local",
            "--launcher-arg", "timeout_min=10"]
    p = run_cli(*args)
    assert "submitted 2 job(s)" in p.stdout and "2 finished run(s) in 2 arm(s)" in p.stdout
    for arm in ("alpha=0", "alpha=0.7"):
        res = json.loads((out / "runs" / f"{arm}_seed=0" / sweep.RESULT).read_text())
        assert res["arm"] == arm and {"in", "tri"} <= set(res["final"])
    assert "0 to run" in run_cli(*args).stdout                    # finished runs are skipped here too


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip()


BAD = [
    (["sweep", "--jobs", "0"], "--jobs 0"), (["sweep", "--seeds", ""], "names no seed"),
    (["sweep", "--seeds", "a,b"], "--seeds 'a,b'"), (["sweep", "--seeds", "0,1,0"], "repeats seed 0"),
    (["sweep", "--aggregate-only"], "holds no sweep"),
]


@pytest.mark.parametrize("args, named", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_one_line_errors(tmp_path, capsys, args, named):
    """--jobs 0 hung, --seeds '' exited 0 with no run, duplicate seeds ran one seed twice, --aggregate-only on a
    missing directory printed an empty table with exit 0, --seeds a,b did not name --seeds."""
    rc, err = _run(capsys, *args, "--out", tmp_path / "out")
    assert rc != 0 and named in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "out" / "runs")


HOLD = ("import sys, time; sys.path.insert(0, sys.argv[2]); from acrl import outdir; outdir.own(sys.argv[1], "
        "'acrl sweep run'); print('held', flush=True); time.sleep(float(sys.argv[3]))")


def _holder(d, seconds):
    src = os.path.dirname(os.path.dirname(acrl.__file__))
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(d), src, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_sweep_waits_for_an_orphaned_run_instead_of_starting_a_second_trainer(tmp_path):
    """Re-running a sweep after killing only the sweep process started a second trainer beside the still-running
    child on the same run directory."""
    run = tmp_path / "runs" / "base_seed=0"
    run.mkdir(parents=True)
    orphan = _holder(run, 2)                          # the child of a killed sweep, still running
    (run / "result.json").write_text("{}")            # ... which finishes its run while we wait
    logs = []
    try:
        codes = sweep.run_local([str(run)], jobs=1, log=logs.append)
    finally:
        orphan.kill()
        orphan.wait()
    assert codes == {str(run): 0}
    assert any("waiting for it" in m for m in logs) and not any("started" in m for m in logs), logs
    assert not (run / "log.txt").exists()             # no second trainer was started


def test_two_sweeps_into_one_out_are_refused(tmp_path, capsys):
    holder = _holder(tmp_path / "sweep", 30)
    try:
        rc, err = _run(capsys, "sweep", "--config", MICRO, "--out", tmp_path / "sweep")
        assert rc == 2 and f"in use by pid {holder.pid}" in err, err
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "sweep" / "runs").exists()


def test_a_corrupt_job_or_result_file_is_named(tmp_path, capsys):
    run = tmp_path / "s" / "runs" / "base_seed=0"
    run.mkdir(parents=True)
    (run / "result.json").write_text("")
    rc, err = _run(capsys, "sweep", "--aggregate-only", "--out", tmp_path / "s")
    assert rc == 2 and str(run / "result.json") in err and "empty" in err, err


def test_sweep_evaluates_the_cotrained_reasoner_and_the_frozen_world_reasoner(tmp_path):
    out = tmp_path / "sw"
    run_cli("sweep", "--config", MICRO, "--set", "train.steps=2", "--set", "train.eval_every=2", "--set",
            "train.eval_n=4", "--set", "reasoner.backend=tiny", "--set", "train.problems_per_step=4",
            "--set", "eval.sets={world-reasoner: {reasoner: {backend: world}}}",
            "--arm", "frozen:train.cotrain=false", "--arm", "cotrain:train.cotrain=true", "--seeds", "0",
            "--out", out)
    for arm in ("frozen", "cotrain"):
        r = json.loads((out / "runs" / f"{arm}_seed=0" / "result.json").read_text())
        assert set(r["final"]) == {"in", "world-reasoner"}
        assert {"question_about_missing", "question_answerable", "asks_when_missing"} <= set(r["final"]["in"])
    assert (out / "runs" / "cotrain_seed=0" / "checkpoint" / "reasoner" / "model.pt").exists()
    assert not (out / "runs" / "frozen_seed=0" / "checkpoint" / "reasoner").exists()
    res = json.loads((out / "results.json").read_text())
    assert "in/final_question_about_missing" in res["arms"]["cotrain"]["metrics"]
