"""The ``acrl`` command line (:mod:`acrl.app.cli`) driven as a user drives it: the smoke tests of the commands it
implements (world, warmstart, train, eval, export, make-tiny, convert-gguf) and the faults users met through them.

Training runs that survive: kills and crashes at the wrong moment, torn JSONL tails, a reasoner service that dies,
an existing run in ``--out``, a resume that would change the experiment, SIGINT / SIGTERM, a full disk, corrupt
checkpoints, bad config values. Every refusal is one line naming its input; nothing stale or torn is left.
(``acrl sweep``, ``serve``, ``report`` and ``demo`` are tested beside their modules.)"""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import MICRO, ROOT, free_port, lines, run_cli

from acrl.app.cli import main
from acrl.config import SHIPPED_REASONER
from acrl.train import checkpoint as ckpt

KEYS = ("reward", "clarification_rate", "loss", "kl_mean", "caption_tokens")


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip()


def _train(out, captioner, *extra, check=True):
    return run_cli("train", "--config", MICRO, "--captioner", captioner, "--out", out, "--quiet", *extra, check=check)


def _same_metrics(a, b):
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert all(abs(x[k] - y[k]) < 1e-6 for k in KEYS), (x, y)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, micro_captioner):
    """The uninterrupted 4-step run every interrupted one must reproduce (its run directory)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    _train(out, micro_captioner, "--steps", 4)
    return out


# --- help, world ------------------------------------------------------------------------------------------------------

def test_help_lists_every_subcommand():
    out = run_cli("--help").stdout
    for cmd in ("world", "warmstart", "train", "eval", "demo"):
        assert cmd in out


def test_world_writes_dataset_and_contact_sheet(tmp_path):
    run_cli("world", "--out", tmp_path, "--n", 6, "--split", "test")
    rows = lines(tmp_path / "problems.jsonl")
    assert len(rows) == 6 and all((tmp_path / r["image"]).exists() for r in rows)
    assert {"question", "answer", "facts", "needed", "human_caption", "clarifications"} <= set(rows[0])
    assert (tmp_path / "contact_sheet.png").stat().st_size > 1000

BAD = [
    (["world", "--n", "0"], "--n 0"), (["world", "--n", "-5"], "--n -5"), (["world", "--start", "-1"], "--start -1"),
    (["convert-gguf", "--gguf", "/no/such.gguf"], "--gguf /no/such.gguf"),
]


@pytest.mark.parametrize("args, named", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_one_line_errors(tmp_path, capsys, args, named):
    rc, err = _run(capsys, *args, "--out", tmp_path / "out")
    assert rc != 0 and named in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "out" / "runs")


def test_world_never_mixes_an_old_dataset_with_a_new_one(tmp_path, capsys):
    out = tmp_path / "w"
    assert _run(capsys, "world", "--config", MICRO, "--n", 3, "--out", out)[0] == 0
    rc, err = _run(capsys, "world", "--config", MICRO, "--n", 2, "--out", out)
    assert rc == 2 and "--overwrite" in err
    assert _run(capsys, "world", "--config", MICRO, "--n", 2, "--out", out, "--overwrite")[0] == 0
    ids = [json.loads(x)["id"] for x in open(out / "problems.jsonl")]
    assert sorted(os.listdir(out / "images")) == sorted(f"{i}.png" for i in ids)   # no stale images
    assert sorted(os.listdir(tmp_path)) == ["w"]


# --- warmstart --------------------------------------------------------------------------------------------------------

def test_warmstart_writes_intermediate_checkpoints_and_train_takes_a_reference(tmp_path):
    ws = tmp_path / "ws"
    run_cli("warmstart", "--config", MICRO, "--out", ws, "--set", "warmstart.save_every=2")
    assert (ws / "step-0" / "model.pt").exists() and (ws / "step-2" / "model.pt").exists()
    assert not (ws / "step-4").exists() and (ws / "model.pt").exists()     # the last step is the checkpoint itself
    out = tmp_path / "run"
    run_cli("train", "--config", MICRO, "--captioner", ws, "--reference", ws / "step-0", "--out", out, "--quiet")
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["train"]["reference"] == str(ws / "step-0")
    # the KL term is measured against π_ref: zero at the first step when π_ref is the start, not against step-0
    same = tmp_path / "same"
    run_cli("train", "--config", MICRO, "--captioner", ws, "--out", same, "--quiet")
    assert lines(same / "metrics.jsonl")[0]["kl_mean"] < 1e-6
    assert lines(out / "metrics.jsonl")[0]["kl_mean"] > 1e-3


# --- train: a run, its checkpoints, resuming it -----------------------------------------------------------------------

def test_train_checkpoint_resume_and_eval(tmp_path, micro_captioner, straight):
    split = tmp_path / "split"
    run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", split, "--steps", 2, "--quiet")
    assert (split / "checkpoint" / "state.pt").exists() and (split / "checkpoint" / "policy" / "model.pt").exists()
    run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", split, "--steps", 4, "--resume",
            "--quiet")
    a, b = lines(straight / "metrics.jsonl"), lines(split / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    _same_metrics(a, b)   # resuming reproduces the uninterrupted run exactly
    m = a[-1]
    for k in ("reward", "direct_correct", "clarification_rate", "clarified_accuracy", "uniform_frac", "kl_mean",
              "clip_frac", "caption_tokens", "time_generation", "time_reasoner", "time_clarification", "time_update"):
        assert k in m, k
    eps = lines(straight / "episodes.jsonl")
    assert eps and {"caption", "decision", "tier", "reward", "replies"} <= set(eps[0])
    run_cli("eval", "--config", MICRO, "--captioner", straight / "checkpoint" / "policy",
            "--reference", micro_captioner, "--out", tmp_path / "ev")
    summary = json.load(open(tmp_path / "ev" / "summary.json"))
    assert summary["overall"]["n"] == 8
    assert 0 <= summary["overall"]["accuracy"] <= 1 and "by_family" in summary
    assert len(lines(tmp_path / "ev" / "items.jsonl")) == 8


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, micro_captioner):
    p = run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", tmp_path / "none", "--resume",
                check=False)
    assert p.returncode != 0 and "checkpoint" in p.stderr


def test_checkpoints_are_versioned_and_pruned(tmp_path, micro_captioner):
    _train(tmp_path, micro_captioner, "--steps", 5, "--set", "train.checkpoint_every=1",
           "--set", "train.keep_checkpoints=2")
    names = sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint-"))
    assert names == ["checkpoint-000004", "checkpoint-000005"]
    assert all(ckpt.verify(tmp_path / n) is None for n in names)
    assert os.path.realpath(tmp_path / "checkpoint") == str(tmp_path / "checkpoint-000005")
    assert (tmp_path / "checkpoint" / "policy" / "model.pt").exists()


def test_crash_leftovers_do_not_wedge_resume(tmp_path, micro_captioner, straight):
    """A kill during a save leaves a temporary directory or an unsealed one. Resume takes the newest complete one
    and goes on."""
    _train(tmp_path, micro_captioner, "--steps", 2)
    good = tmp_path / "checkpoint-000002"
    shutil.copytree(good, tmp_path / ".checkpoint-000004.tmp-12345")           # a save killed before its rename
    shutil.copytree(good, tmp_path / "checkpoint-000003")                       # unsealed: no manifest
    os.remove(tmp_path / "checkpoint-000003" / "manifest.json")
    p = _train(tmp_path, micro_captioner, "--steps", 4, "--resume")
    assert "skipping" in p.stderr and "checkpoint-000003" in p.stderr
    _same_metrics(lines(straight / "metrics.jsonl"), lines(tmp_path / "metrics.jsonl"))
    assert not (tmp_path / ".checkpoint-000004.tmp-12345").exists()


def test_torn_jsonl_tails_are_dropped_on_resume(tmp_path, micro_captioner, straight):
    """Item 2: a kill mid-write leaves half a JSON line; resume drops it, says so, and goes on."""
    _train(tmp_path, micro_captioner, "--steps", 2)
    for name in ("metrics.jsonl", "episodes.jsonl"):
        with open(tmp_path / name, "a") as fh:
            fh.write('{"step": 3, "rew')
    p = _train(tmp_path, micro_captioner, "--steps", 4, "--resume")
    assert "torn last line of metrics.jsonl" in p.stderr and "torn last line of episodes.jsonl" in p.stderr
    _same_metrics(lines(straight / "metrics.jsonl"), lines(tmp_path / "metrics.jsonl"))
    assert {e["step"] for e in lines(tmp_path / "episodes.jsonl")} == {1, 2, 3, 4}


def test_existing_run_is_not_overwritten(tmp_path, micro_captioner):
    """Item 4: --out on an existing run without --resume replaced it; steps=-1 emptied its files."""
    _train(tmp_path, micro_captioner, "--steps", 3)
    before = (tmp_path / "metrics.jsonl").read_text()
    p = _train(tmp_path, micro_captioner, "--steps", 1, check=False)
    assert p.returncode == 2 and "--resume" in p.stderr and "--overwrite" in p.stderr
    p = _train(tmp_path, micro_captioner, "--set", "train.steps=-1", check=False)
    assert p.returncode == 2 and "train.steps" in p.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == before
    _train(tmp_path, micro_captioner, "--steps", 1, "--overwrite")
    assert [m["step"] for m in lines(tmp_path / "metrics.jsonl")] == [1]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")) == ["checkpoint-000001"]


def test_resume_keeps_the_experiment(tmp_path, micro_captioner, straight):
    """Item 5: resume used to forget π_ref (--captioner), --data and the config; a changed value was taken."""
    _train(tmp_path, micro_captioner, "--steps", 2)
    # no --config, no --captioner: everything comes from run.json, and the result is the uninterrupted run's
    run_cli("train", "--out", tmp_path, "--steps", 4, "--resume", "--quiet")
    _same_metrics(lines(straight / "metrics.jsonl"), lines(tmp_path / "metrics.jsonl"))
    p = run_cli("train", "--out", tmp_path, "--steps", 5, "--resume", "--alpha", "0.5", check=False)
    assert p.returncode == 2 and "train.alpha" in p.stderr and "--allow-change" in p.stderr
    p = run_cli("train", "--out", tmp_path, "--steps", 5, "--resume", "--captioner", tmp_path / "checkpoint/policy",
                check=False)
    assert p.returncode == 2 and "π_ref" in p.stderr
    run_cli("train", "--out", tmp_path, "--steps", 5, "--resume", "--alpha", "0.5", "--allow-change", "--quiet")
    info = json.load(open(tmp_path / "run.json"))
    assert info["config"]["train"]["alpha"] == 0.5 and info["captioner"] == str(micro_captioner)
    assert info["changes"] == [{"at_step": 4, "key": "train.alpha", "old": 0.7, "new": 0.5}]


def test_resume_before_the_first_checkpoint_starts_again_from_its_stored_run(tmp_path, micro_captioner, straight):
    """A kill before the first checkpoint: run.json defines the start, so --resume runs it again from step 0."""
    _train(tmp_path, micro_captioner, "--steps", 2)
    for name in os.listdir(tmp_path):
        if name.startswith("checkpoint"):
            p = tmp_path / name
            p.unlink() if os.path.islink(p) else shutil.rmtree(p)
    p = run_cli("train", "--out", tmp_path, "--steps", 4, "--resume", "--quiet")
    assert "starting the run again from step 0" in p.stderr
    _same_metrics(lines(straight / "metrics.jsonl"), lines(tmp_path / "metrics.jsonl"))


# --- train: stops, outages, a full disk, corrupt files ----------------------------------------------------------------

def _popen_train(out, captioner, *extra, preexec=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "acrl", "train", "--config", MICRO, "--captioner",
                             str(captioner), "--out", str(out), "--quiet", *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=preexec)


def _wait_for_steps(path, n, proc, timeout=300):
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if os.path.exists(path) and len([x for x in open(path) if x.strip()]) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps in {path}: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_checkpoint_and_exit_cleanly(tmp_path, micro_captioner, sig, code):
    """Item 6: SIGINT printed a 47-line traceback and lost steps; SIGTERM died silently."""
    proc = _popen_train(tmp_path, micro_captioner, "--steps", 400, "--set", "train.checkpoint_every=1000")
    _wait_for_steps(tmp_path / "metrics.jsonl", 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "resume with" in err
    done = lines(tmp_path / "metrics.jsonl")[-1]["step"]
    found = ckpt.latest(str(tmp_path))
    assert found.step == done >= 2          # nothing lost: the checkpoint is at the last logged step
    p = _train(tmp_path, micro_captioner, "--steps", done + 1, "--resume")
    assert "done: step" in p.stdout
    assert [m["step"] for m in lines(tmp_path / "metrics.jsonl")] == list(range(1, done + 2))


def test_full_disk_during_a_checkpoint_names_the_path_and_keeps_the_previous(tmp_path, micro_captioner):
    """Item 7: a full disk surfaced as `RuntimeError: [enforce fail at inline_container.cc]` with no path."""
    _train(tmp_path, micro_captioner, "--steps", 2)
    size = os.path.getsize(tmp_path / "checkpoint-000002" / "policy" / "model.pt")

    def limit():   # every file may grow to half a model: the next checkpoint's weights cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    proc = _popen_train(tmp_path, micro_captioner, "--steps", 4, "--resume", preexec=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "checkpoint-000004" in err and ("no space left" in err or "file size limit" in err), err
    assert ckpt.latest(str(tmp_path)).step == 2
    assert not any(n.startswith(".") and n != ".lock" for n in os.listdir(tmp_path))   # the run's lock stays
    _train(tmp_path, micro_captioner, "--steps", 4, "--resume")
    assert [m["step"] for m in lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_corrupt_checkpoint_is_named_and_the_previous_one_used(tmp_path, micro_captioner):
    _train(tmp_path, micro_captioner, "--steps", 4, "--set", "train.checkpoint_every=2")
    with open(tmp_path / "checkpoint-000004" / "policy" / "model.pt", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00garbage\x00")
    p = _train(tmp_path, micro_captioner, "--steps", 4, "--resume")
    assert "checkpoint-000004" in p.stderr and "does not match its checksum" in p.stderr
    assert "continuing from" in p.stderr and "checkpoint-000002" in p.stderr
    assert [m["step"] for m in lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.fixture
def reasoner_server():
    """``acrl serve reasoner`` (the world reasoner) in its own process, which the test kills and starts again."""
    import httpx

    port = free_port()
    state = {"url": f"http://127.0.0.1:{port}/v1", "port": port, "proc": None}

    def start(port=port):
        proc = subprocess.Popen([sys.executable, "-m", "acrl", "serve", "reasoner", "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        state["proc"] = proc
        end = time.time() + 120
        while time.time() < end:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    return state["url"]
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("acrl serve reasoner did not start")

    def stop():
        state["proc"].kill()
        state["proc"].wait()

    start()
    yield state, start, stop
    if state["proc"].poll() is None:
        stop()


def test_a_reasoner_outage_is_retried_then_stops_with_an_error(tmp_path, micro_captioner, reasoner_server):
    """Item 3: an outage skipped steps and a server dead for the rest of the run still ended in "done", exit 0."""
    state, start, stop = reasoner_server
    svc = ["--set", "reasoner.backend=openai", "--set", f"reasoner.base_url={state['url']}",
           "--set", "reasoner.max_retries=0", "--set", "reasoner.timeout=5", "--set", "train.step_retries=2",
           "--set", "train.retry_wait=0.1", "--set", "train.checkpoint_every=1000"]
    proc = _popen_train(tmp_path, micro_captioner, "--steps", 400, *svc)
    _wait_for_steps(tmp_path / "metrics.jsonl", 2, proc)
    stop()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    assert "retrying in" in err and "resume with" in err and "done:" not in out
    rows = lines(tmp_path / "metrics.jsonl")
    assert all(r["failed_episodes"] == 0 or r["failed_episodes"] < 4 for r in rows)
    assert ckpt.latest(str(tmp_path)).step == rows[-1]["step"]   # checkpointed where it stopped: nothing lost
    start(state["port"])
    last = rows[-1]["step"]
    p = run_cli("train", "--out", tmp_path, "--steps", last + 2, "--resume", "--quiet")
    assert "step(s) retried" in p.stdout and "failed episode(s)" in p.stdout
    assert [m["step"] for m in lines(tmp_path / "metrics.jsonl")] == list(range(1, last + 3))


# --- train: configs, data, features -----------------------------------------------------------------------------------

def test_unknown_config_key_is_a_clear_error(tmp_path):
    p = run_cli("train", "--config", MICRO, "--set", "train.lr_typo=1", "--out", tmp_path, check=False)
    assert p.returncode == 2 and "lr_typo" in p.stderr


@pytest.mark.parametrize("override,key", [
    ("train.lr=abc", "train.lr"), ("train.samples_per_problem=1", "train.samples_per_problem"),
    ("train.epochs=0", "train.epochs"), ("train.samples_per_problem=0", "train.samples_per_problem"),
    ("train.checkpoint_every=0", "train.checkpoint_every"), ("train.micro_batch=0", "train.micro_batch"),
    ("train.problems_per_step=0", "train.problems_per_step"), ("train.kl_beta=-1", "train.kl_beta"),
    ("train.steps=2.5", "train.steps"), ("train.max_failed_fraction=2", "train.max_failed_fraction"),
    ("train.overlap=maybe", "train.overlap"), ("train.advantage=ppo", "train.advantage"),
    ("captioner.temperature=-1", "captioner.temperature"), ("reasoner.backend=gpt", "reasoner.backend"),
])
def test_config_values_are_checked_naming_the_key(tmp_path, capsys, override, key):
    """Item 9: raw TypeErrors, crashes deep in training, or silently training nothing."""
    assert main(["train", "--config", MICRO, "--set", override, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and ("must be" in err or "expected" in err), err
    assert not (tmp_path / "r").exists()


def test_steps_zero_is_refused_and_temperature_zero_is_greedy(tmp_path, micro_captioner):
    p = _train(tmp_path / "a", micro_captioner, "--steps", 0, check=False)
    assert p.returncode == 2 and "train.steps" in p.stderr
    _train(tmp_path / "g", micro_captioner, "--steps", 1, "--set", "captioner.temperature=0")
    eps = lines(tmp_path / "g" / "episodes.jsonl")
    groups = {}
    for e in eps:
        groups.setdefault(e["problem_id"], set()).add(e["caption"])
    assert groups and all(len(c) == 1 for c in groups.values())   # greedy: the M samples are the same caption


def test_yaml_errors_and_missing_checkpoints_have_one_line_messages(tmp_path, capsys):
    """Item 10: a 55-line traceback for a YAML typo; "run acrl warmstart" whenever --resume finds nothing."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  lr: [1e-4\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:4:1" in err and "YAML" in err, err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--config", MICRO, "--out", str(tmp_path / "empty"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "warmstart" not in err


def test_bad_research_values_are_one_line_errors(tmp_path):
    p = run_cli("train", "--config", MICRO, "--out", tmp_path, "--set", "train.alpha_schedule=exp", check=False)
    assert p.returncode == 2 and "train.alpha_schedule='exp'" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("train", "--config", MICRO, "--out", tmp_path, "--set", "reasoner.backend=openai",
                "--set", "reasoner.noise=0.1", "--set", "reasoner.base_url=http://127.0.0.1:9/v1", check=False)
    assert p.returncode == 2 and "reasoner.noise" in p.stderr


def test_missing_tracker_package_is_a_clear_error(tmp_path, micro_captioner):
    import importlib.util

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here: the missing-package error cannot occur")
    p = run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", tmp_path, "--report-to",
                "wandb", check=False)
    assert p.returncode == 2 and "pip install wandb" in p.stderr


def test_train_with_lora_through_the_cli(tmp_path, micro_captioner):
    run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", tmp_path, "--steps", 2,
            "--set", "captioner.lora.enabled=true", "--set", "captioner.lora.r=4", "--quiet")
    assert (tmp_path / "checkpoint" / "policy" / "adapter" / "adapter_config.json").exists()
    m = lines(tmp_path / "metrics.jsonl")
    assert len(m) == 2 and all("loss" in x for x in m)


def test_train_on_a_local_training_set(tmp_path, micro_captioner):
    from data.fixtures import geometry3k_rows, write_parquet

    write_parquet(geometry3k_rows(), tmp_path / "g3k" / "data" / "train-00000-of-00001.parquet")
    run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--data", tmp_path / "g3k",
            "--out", tmp_path / "run", "--steps", 2, "--quiet")
    eps = lines(tmp_path / "run" / "episodes.jsonl")
    assert eps and not any(e["problem_id"].startswith("world-") for e in eps)


def test_training_data_bad_rows_are_counted_named_and_written(tmp_path, micro_captioner):
    """Item 8: skipped rows were not reported; too many of them are refused, naming the count."""
    from data.fixtures import training_set_with_bad_rows

    data = tmp_path / "data"
    raw = training_set_with_bad_rows(data)
    p = _train(tmp_path / "run", micro_captioner, "--steps", 1, "--data", data, check=False)
    assert p.returncode == 2 and "3 of 43 rows unusable" in p.stderr   # above the 5% limit: refused, named
    (data / "part2.jsonl").write_bytes(raw)                               # one bad row of 42: under the limit
    p = _train(tmp_path / "run2", micro_captioner, "--steps", 1, "--data", data)
    assert "40 problems, 2 bad rows" in p.stdout
    assert len(lines(tmp_path / "run2" / "bad_rows.jsonl")) == 2


def test_train_multi_turn_with_a_schedule_and_a_noisy_reasoner(tmp_path, micro_captioner):
    out = tmp_path / "run"
    run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", out, "--quiet",
            "--set", "train.max_clarifications=3", "--set", "train.turn_rewards=[1, 0.6, 0.3, 0.1]",
            "--set", "reasoner.noise=0.3")
    rows = lines(out / "metrics.jsonl")
    assert len(rows) == 3 and all("mean_turns" in r for r in rows)
    out2 = tmp_path / "run2"
    run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", out2, "--quiet",
            "--set", "train.alpha=1", "--set", "train.alpha_schedule=cosine", "--set", "train.alpha_end=0")
    assert [r["reward_alpha"] for r in lines(out2 / "metrics.jsonl")] == [1.0, 0.5, 0.0]


def test_cli_cotrain_resume_reproduces_both_models_then_eval(tmp_path):
    """The shipped captioner and reasoner (a micro budget of steps): both models learn, the resumed run is the
    uninterrupted one, and acrl eval reads the co-trained reasoner."""
    common = ("--config", MICRO, "--cotrain", "--quiet", "--set", "reasoner.backend=tiny", "--set",
              "train.checkpoint_every=1", "--set", "train.problems_per_step=4")
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli("train", *common, "--out", straight, "--steps", 3)
    run_cli("train", *common, "--out", split, "--steps", 2)
    run_cli("train", *common, "--out", split, "--steps", 3, "--resume")
    a, b = lines(straight / "metrics.jsonl"), lines(split / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for k in ("reward", "loss", "reasoner_reward", "reasoner_loss", "reasoner_kl_mean", "reasoner_rows"):
            assert abs(x[k] - y[k]) < 1e-6, (k, x, y)
    for part in ("policy", "reasoner"):
        sa = torch.load(straight / "checkpoint" / part / "model.pt")
        sb = torch.load(split / "checkpoint" / part / "model.pt")
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    start = torch.load(os.path.join(SHIPPED_REASONER, "model.pt"))
    assert any(not torch.equal(start[k], sb[k]) for k in sb)         # the reasoner trained
    run_cli("eval", "--config", MICRO, "--captioner", straight / "checkpoint" / "policy", "--set",
            "reasoner.backend=tiny", "--set",
            f"reasoner.model={straight / 'checkpoint' / 'reasoner'}", "--out", tmp_path / "ev")
    summary = json.load(open(tmp_path / "ev" / "summary.json"))
    assert summary["overall"]["n"] == 8 and 0 <= summary["overall"]["accuracy"] <= 1
    p = run_cli("train", "--config", MICRO, "--out", straight, "--resume", "--quiet", "--steps", 4, check=False)
    assert p.returncode == 2 and "train.cotrain: run has True" in p.stderr      # not silently frozen
    run_cli("train", "--out", straight, "--resume", "--quiet", "--steps", 4)   # the stored run: co-training
    last = lines(straight / "metrics.jsonl")[-1]
    assert last["step"] == 4 and "reasoner_loss" in last


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "internvl", "llava"])
def test_tiny_hf_family_trains_and_evaluates_through_the_cli(tmp_path, family):
    run_cli("make-tiny", "--family", family, "--out", tmp_path / "base")
    cfg = f"configs/{family}-tiny.yaml"
    common = ["--set", f"captioner.path={tmp_path / 'base'}", "--set", "train.threads=1"]
    run_cli("train", "--config", cfg, *common, "--out", tmp_path / "run", "--steps", 2, "--quiet")
    m = lines(tmp_path / "run" / "metrics.jsonl")
    assert [x["step"] for x in m] == [1, 2] and all("loss" in x for x in m)
    adapter = tmp_path / "run" / "checkpoint" / "policy"
    run_cli("eval", "--config", cfg, *common, "--captioner", adapter, "--n", 4, "--out", tmp_path / "ev")
    assert json.load(open(tmp_path / "ev" / "summary.json"))["overall"]["n"] == 4
    if family == "qwen2-vl":
        run_cli("export", "--merge", "--checkpoint", adapter, "--out", tmp_path / "merged")
        assert (tmp_path / "merged" / "config.json").exists()


# --- eval -------------------------------------------------------------------------------------------------------------

def test_eval_on_a_benchmark_copy(tmp_path, micro_captioner):
    from data.fixtures import mathvista_rows, write_parquet

    write_parquet(mathvista_rows(), tmp_path / "mathvista" / "data" / "testmini-00000-of-00001.parquet")
    run_cli("eval", "--config", MICRO, "--captioner", micro_captioner, "--reference", micro_captioner,
            "--benchmark", "mathvista", "--data", tmp_path / "mathvista", "--out", tmp_path / "ev")
    s = json.load(open(tmp_path / "ev" / "summary.json"))
    assert s["overall"]["n"] == len(lines(tmp_path / "ev" / "items.jsonl")) > 0
    assert s["by_category"] and "bad_rows" in s
    assert (tmp_path / "ev" / "by_category.png").stat().st_size > 3000
    p = run_cli("eval", "--config", MICRO, "--captioner", micro_captioner, "--benchmark", "mathvista",
                "--out", tmp_path / "x", check=False)
    assert p.returncode == 2 and "--data" in p.stderr
    p = run_cli("eval", "--config", MICRO, "--captioner", micro_captioner, "--benchmark", "mathvista",
                "--data", tmp_path / "mathvista", "--judge-url", "http://127.0.0.1:9/v1", "--out", tmp_path / "y",
                check=False)
    assert p.returncode == 2 and "127.0.0.1:9" in p.stderr


def test_eval_sets_and_turns_through_the_cli(tmp_path, micro_captioner):
    """`acrl eval --eval-set` evaluates in each named world/reasoner view (its own output folder), and the
    reasoner may ask up to train.max_clarifications times, as in multi-turn training."""
    sets = "eval.sets={tri-only: {world: {families: [tri], needed_facts: {1: 0.5, 2: 0.5}}}}"
    run_cli("eval", "--config", MICRO, "--captioner", micro_captioner, "--set", sets,
            "--set", "train.max_clarifications=3", "--set", "train.turn_rewards=[1, 0.7, 0.5, 0.3]",
            "--eval-set", "all", "--out", tmp_path / "ev")
    inside = json.load(open(tmp_path / "ev" / "in" / "summary.json"))
    tri = json.load(open(tmp_path / "ev" / "tri-only" / "summary.json"))
    assert tri["eval_set"] == "tri-only" and set(tri["by_family"]) == {"tri"}
    assert set(inside["by_family"]) != {"tri"}
    items = lines(tmp_path / "ev" / "in" / "items.jsonl") + lines(tmp_path / "ev" / "tri-only" / "items.jsonl")
    assert max(r["turns"] for r in items) > 1   # a micro captioner leaves facts out: the reasoner asks again
    assert max(r["turns"] for r in items) <= 3
    run_cli("eval", "--config", MICRO, "--captioner", micro_captioner, "--out", tmp_path / "one")
    one = lines(tmp_path / "one" / "items.jsonl")
    assert max(r.get("turns", int(r["asked"])) for r in one) <= 1
    p = run_cli("eval", "--config", MICRO, "--captioner", micro_captioner, "--eval-set", "nope",
                "--out", tmp_path / "bad", check=False)
    assert p.returncode == 2 and "nope" in p.stderr and "eval.sets" in p.stderr


def test_eval_cli_takes_the_new_options(capsys):
    from acrl.app.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "--max-bad-fraction" in text and "--dynamath-bad-as-wrong" in text


def test_a_truncated_captioner_checkpoint_is_named(tmp_path, micro_captioner, capsys):
    """Item 10: a truncated config.json was a traceback that named no file."""
    broken = tmp_path / "captioner"
    shutil.copytree(micro_captioner, broken)
    (broken / "config.json").write_text('{"d_model": 12')
    assert main(["eval", "--config", MICRO, "--captioner", str(broken), "--reference", str(micro_captioner),
                 "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and str(broken) in err and "Traceback" not in err
    shutil.copy(micro_captioner / "config.json", broken / "config.json")
    (broken / "model.pt").write_bytes(b"\x00" * 64)
    assert main(["eval", "--config", MICRO, "--captioner", str(broken), "--reference", str(micro_captioner),
                 "--out", str(tmp_path / "ev2")]) == 2
    err = capsys.readouterr().err
    assert "model.pt" in err and "corrupt" in err and "weights_only" not in err


def _eval(capsys, out, *extra):
    rc = main(["eval", "--config", MICRO, "--out", str(out), "--set", "eval.n=4", *map(str, extra)])
    return rc, capsys.readouterr()


def _no_nan(path):
    def refuse(name):
        raise AssertionError(f"{path} holds the non-JSON literal {name}")
    return json.loads(open(path).read(), parse_constant=refuse)


BAD_VALUES = [(["--n", "0"], "--n 0"), (["--n", "-3"], "--n -3"), (["--data", "/tmp"], "--data"),
              (["--limit", "0"], "--limit 0"), (["--max-failed-fraction", "2"], "--max-failed-fraction 2"),
              (["--max-bad-fraction", "-1"], "--max-bad-fraction -1"), (["--resume", "--overwrite"], "contradict")]


@pytest.mark.parametrize("extra, named", BAD_VALUES, ids=[" ".join(e) for e, _ in BAD_VALUES])
def test_eval_bad_values_are_one_line_errors_naming_the_flag(tmp_path, capsys, extra, named):
    """--n 0 / --n -3 silently evaluated the default count or nothing; --data without --benchmark was ignored."""
    rc, io = _eval(capsys, tmp_path / "ev", *extra)
    assert rc == 2 and named in io.err and len(io.err.strip().splitlines()) == 1, io.err
    assert not (tmp_path / "ev" / "summary.json").exists()


def test_eval_into_an_existing_out_never_reports_the_old_items(tmp_path, capsys, micro_captioner):
    """Evaluating another captioner into an --out left the previous items.jsonl in place: the new summary showed
    the old captions."""
    out = tmp_path / "ev"
    assert _eval(capsys, out)[0] == 0                                   # the shipped captioner
    first = [json.loads(x)["caption"] for x in open(out / "items.jsonl")]
    rc, io = _eval(capsys, out, "--captioner", micro_captioner)
    assert rc == 2 and "--resume" in io.err and "--overwrite" in io.err
    rc, io = _eval(capsys, out, "--captioner", micro_captioner, "--resume")
    assert rc == 2 and "differs in: captioner" in io.err
    assert _eval(capsys, out, "--captioner", micro_captioner, "--overwrite")[0] == 0
    fresh = tmp_path / "fresh"
    assert _eval(capsys, fresh, "--captioner", micro_captioner)[0] == 0
    again = [json.loads(x) for x in open(out / "items.jsonl")]
    assert [r["caption"] for r in again] == [json.loads(x)["caption"] for x in open(fresh / "items.jsonl")]
    assert [r["caption"] for r in again] != first
    assert _no_nan(out / "summary.json")["captioner"] == str(micro_captioner)


def test_an_interrupted_eval_resumes_to_the_uninterrupted_result(tmp_path, capsys, monkeypatch):
    from acrl.eval import evaluate as ev

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert _eval(capsys, straight, "--set", "eval.batch_size=2")[0] == 0
    calls, captions = [], ev._captions

    def dies_on_the_second_batch(policy, batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return captions(policy, batch)

    monkeypatch.setattr(ev, "_captions", dies_on_the_second_batch)
    assert _eval(capsys, cut, "--set", "eval.batch_size=2")[0] == 130
    monkeypatch.setattr(ev, "_captions", captions)
    assert len(open(cut / "items.jsonl").readlines()) == 2 and not (cut / "summary.json").exists()
    assert _eval(capsys, cut, "--set", "eval.batch_size=2")[0] == 2           # neither flag: refused
    assert _eval(capsys, cut, "--set", "eval.batch_size=2", "--resume")[0] == 0
    a, b = (_no_nan(d / "summary.json") for d in (straight, cut))
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert open(straight / "items.jsonl").read() == open(cut / "items.jsonl").read()


@pytest.mark.parametrize("fail_rate, rc", [(1.0, 1), (0.85, 1), (0.0, 0)])
def test_an_evaluation_whose_episodes_failed_never_exits_0(tmp_path, capsys, fail_rate, rc):
    """Every request failing, and 14 of 16 episodes failing, both exited 0 with a table of what was left."""
    from acrl.app.serve import WorldBackend, start_server

    server, _, url = start_server(WorldBackend(), fail_rate=fail_rate)
    try:
        got, io = _eval(capsys, tmp_path / "ev", "--set", "reasoner.backend=openai",
                        "--set", f"reasoner.base_url={url}", "--set", "reasoner.max_retries=0")
    finally:
        server.shutdown()
        server.server_close()
    assert got == rc, io.err
    if rc:
        last = io.err.strip().splitlines()[-1]                              # after the progress bar
        assert last.startswith("acrl eval: error:") and "episodes failed" in last and str(tmp_path / "ev") in last
    assert _no_nan(tmp_path / "ev" / "summary.json")["overall"]           # written for reading, strict JSON


def test_eval_full_disk_and_a_second_writer_are_one_line_errors(tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    import acrl

    out = tmp_path / "ev"
    src = os.path.dirname(os.path.dirname(acrl.__file__))
    hold = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]); "
                             "from acrl import outdir; outdir.own(sys.argv[1], 'acrl eval'); print('held', flush=True);"
                             " time.sleep(60)", str(out), src], stdout=subprocess.PIPE, text=True)
    try:
        assert hold.stdout.readline().strip() == "held"
        rc, io = _eval(capsys, out)
        assert rc == 2 and f"in use by pid {hold.pid}" in io.err
    finally:
        hold.kill()
        hold.wait()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    rc, io = _eval(capsys, out)
    assert rc == 1 and "no space left" in io.err.strip().splitlines()[-1], io.err
    assert not (out / "summary.json").exists()                                # no result that looks finished


# --- export, make-tiny, convert-gguf ----------------------------------------------------------------------------------

def test_make_tiny_refuses_an_existing_model_and_a_full_disk_keeps_it(tmp_path, capsys, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")
    rc, err = _run(capsys, "make-tiny", "--family", "qwen2-vl", "--out", out)
    assert rc == 2 and "--overwrite" in err and (out / "config.json").read_text() == "{}"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    rc, err = _run(capsys, "make-tiny", "--family", "qwen2-vl", "--out", out, "--overwrite")
    assert rc == 1 and "no space left" in err.splitlines()[-1], err      # after transformers' progress bar
    assert os.listdir(out) == ["config.json"] and sorted(os.listdir(tmp_path)) == ["m"]


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage", b"not a gguf file at all"])
def test_a_corrupt_gguf_is_named(tmp_path, capsys, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    rc, err = _run(capsys, "convert-gguf", "--gguf", bad, "--out", tmp_path / "o")
    assert rc != 0 and f"--gguf {bad}" in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "o")


# --- config -----------------------------------------------------------------------------------------------------------

def test_config_prints_what_a_run_would_use_and_reads_back(tmp_path):
    out = run_cli("config", "--config", MICRO, "--set", "train.lr=5e-4", "--docs").stdout
    assert "  lr: 0.0005" in out and "# AdamW learning rate" in out
    (tmp_path / "printed.yaml").write_text(out)
    again = run_cli("config", "--config", tmp_path / "printed.yaml", "--out", tmp_path / "again.yaml")
    assert again.stdout == "" and (tmp_path / "again.yaml").read_text() == run_cli(
        "config", "--config", MICRO, "--set", "train.lr=5e-4").stdout
    again = run_cli("config", "--out", tmp_path / "again.yaml", check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    run_cli("config", "--out", tmp_path / "again.yaml", "--overwrite")
    assert "lr: 0.0003" in (tmp_path / "again.yaml").read_text()
    bad = run_cli("config", "--set", "train.lr=-1", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "train.lr" in bad.stderr
