"""Runs that survive: each fault a user met, reproduced through the real ``acrl train`` CLI.

Kills and crashes at the wrong moment, torn JSONL tails, a reasoner service that dies, an existing run in
``--out``, a resume that would change the experiment, SIGINT / SIGTERM, a full disk, corrupt checkpoints, bad
config values."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import MICRO, ROOT, run_cli

from acrl.app.cli import main as cli_main
from acrl.train import checkpoint as ckpt

KEYS = ("reward", "clarification_rate", "loss", "kl_mean", "caption_tokens")


def _lines(path):
    return [json.loads(x) for x in open(path) if x.strip()]


def _train(out, captioner, *extra, check=True):
    return run_cli("train", "--config", MICRO, "--captioner", captioner, "--out", out, "--quiet", *extra, check=check)


def _same_metrics(a, b):
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert all(abs(x[k] - y[k]) < 1e-6 for k in KEYS), (x, y)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, micro_captioner):
    """The uninterrupted 4-step run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    _train(out, micro_captioner, "--steps", 4)
    return _lines(out / "metrics.jsonl")


def test_checkpoints_are_versioned_and_pruned(tmp_path, micro_captioner):
    _train(tmp_path, micro_captioner, "--steps", 5, "--set", "train.checkpoint_every=1",
           "--set", "train.keep_checkpoints=2")
    names = sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint-"))
    assert names == ["checkpoint-000004", "checkpoint-000005"]
    assert all(ckpt.verify(tmp_path / n) is None for n in names)
    assert os.path.realpath(tmp_path / "checkpoint") == str(tmp_path / "checkpoint-000005")
    assert (tmp_path / "checkpoint" / "policy" / "model.pt").exists()


def test_crash_leftovers_and_old_rotation_do_not_wedge_resume(tmp_path, micro_captioner, straight):
    """Item 1: a kill between the renames of the old rotation left checkpoint.old (+ .tmp); a kill during a save
    leaves a temporary directory or an unsealed one. Resume takes the newest complete one and goes on."""
    _train(tmp_path, micro_captioner, "--steps", 2)
    good = tmp_path / "checkpoint-000002"
    shutil.copytree(good, tmp_path / ".checkpoint-000004.tmp-12345")           # a save killed before its rename
    shutil.copytree(good, tmp_path / "checkpoint-000003")                       # unsealed: no manifest
    os.remove(tmp_path / "checkpoint-000003" / "manifest.json")
    p = _train(tmp_path, micro_captioner, "--steps", 4, "--resume")
    assert "skipping" in p.stderr and "checkpoint-000003" in p.stderr
    _same_metrics(straight, _lines(tmp_path / "metrics.jsonl"))
    assert not (tmp_path / ".checkpoint-000004.tmp-12345").exists()
    # the layout an interrupted old-style rotation left: only checkpoint.old and checkpoint.tmp
    legacy = tmp_path / "legacy"
    _train(legacy, micro_captioner, "--steps", 2)
    src = legacy / "checkpoint-000002"
    for name in os.listdir(legacy):
        if name.startswith("checkpoint"):
            (legacy / name).unlink() if os.path.islink(legacy / name) else None
    shutil.copytree(src, legacy / "checkpoint.old")
    os.remove(legacy / "checkpoint.old" / "manifest.json")
    shutil.copytree(src, legacy / "checkpoint.tmp")
    os.remove(legacy / "checkpoint.tmp" / "state.pt")
    shutil.rmtree(src)
    _train(legacy, micro_captioner, "--steps", 4, "--resume")
    _same_metrics(straight, _lines(legacy / "metrics.jsonl"))


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    def good(d):
        open(os.path.join(d, "a.bin"), "wb").write(b"x" * 100)

    def dies(d):
        good(d)
        raise OSError(28, "No space left on device")

    ckpt.save(str(tmp_path), 1, good)
    with pytest.raises(ckpt.CheckpointError, match="no space left on"):
        ckpt.save(str(tmp_path), 2, dies)
    found = ckpt.latest(str(tmp_path))
    assert found.step == 1 and ckpt.verify(found.path) is None
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "checkpoint-000001"]


def test_torn_jsonl_tails_are_dropped_on_resume(tmp_path, micro_captioner, straight):
    """Item 2: a kill mid-write leaves half a JSON line; resume drops it, says so, and goes on."""
    _train(tmp_path, micro_captioner, "--steps", 2)
    for name in ("metrics.jsonl", "episodes.jsonl"):
        with open(tmp_path / name, "a") as fh:
            fh.write('{"step": 3, "rew')
    p = _train(tmp_path, micro_captioner, "--steps", 4, "--resume")
    assert "torn last line of metrics.jsonl" in p.stderr and "torn last line of episodes.jsonl" in p.stderr
    _same_metrics(straight, _lines(tmp_path / "metrics.jsonl"))
    assert {e["step"] for e in _lines(tmp_path / "episodes.jsonl")} == {1, 2, 3, 4}


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
    assert [m["step"] for m in _lines(tmp_path / "metrics.jsonl")] == [1]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")) == ["checkpoint-000001"]


def test_resume_keeps_the_experiment(tmp_path, micro_captioner, straight):
    """Item 5: resume used to forget π_ref (--captioner), --data and the config; a changed value was taken."""
    _train(tmp_path, micro_captioner, "--steps", 2)
    # no --config, no --captioner: everything comes from run.json, and the result is the uninterrupted run's
    run_cli("train", "--out", tmp_path, "--steps", 4, "--resume", "--quiet")
    _same_metrics(straight, _lines(tmp_path / "metrics.jsonl"))
    p = run_cli("train", "--out", tmp_path, "--steps", 5, "--resume", "--alpha", "0.5", check=False)
    assert p.returncode == 2 and "train.alpha" in p.stderr and "--allow-change" in p.stderr
    p = run_cli("train", "--out", tmp_path, "--steps", 5, "--resume", "--captioner", tmp_path / "checkpoint/policy",
                check=False)
    assert p.returncode == 2 and "π_ref" in p.stderr
    run_cli("train", "--out", tmp_path, "--steps", 5, "--resume", "--alpha", "0.5", "--allow-change", "--quiet")
    info = json.load(open(tmp_path / "run.json"))
    assert info["config"]["train"]["alpha"] == 0.5 and info["captioner"] == str(micro_captioner)
    assert info["changes"] == [{"at_step": 4, "key": "train.alpha", "old": 0.7, "new": 0.5}]


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
    done = _lines(tmp_path / "metrics.jsonl")[-1]["step"]
    found = ckpt.latest(str(tmp_path))
    assert found.step == done >= 2          # nothing lost: the checkpoint is at the last logged step
    p = _train(tmp_path, micro_captioner, "--steps", done + 1, "--resume")
    assert "done: step" in p.stdout
    assert [m["step"] for m in _lines(tmp_path / "metrics.jsonl")] == list(range(1, done + 2))


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
    assert [m["step"] for m in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_corrupt_checkpoint_is_named_and_the_previous_one_used(tmp_path, micro_captioner):
    _train(tmp_path, micro_captioner, "--steps", 4, "--set", "train.checkpoint_every=2")
    with open(tmp_path / "checkpoint-000004" / "policy" / "model.pt", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00garbage\x00")
    p = _train(tmp_path, micro_captioner, "--steps", 4, "--resume")
    assert "checkpoint-000004" in p.stderr and "does not match its checksum" in p.stderr
    assert "continuing from" in p.stderr and "checkpoint-000002" in p.stderr
    assert [m["step"] for m in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def reasoner_server():
    """``acrl serve reasoner`` (the world reasoner) in its own process, which the test kills and starts again."""
    import httpx

    port = _free_port()
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
    rows = _lines(tmp_path / "metrics.jsonl")
    assert all(r["failed_episodes"] == 0 or r["failed_episodes"] < 4 for r in rows)
    assert ckpt.latest(str(tmp_path)).step == rows[-1]["step"]   # checkpointed where it stopped: nothing lost
    start(state["port"])
    last = rows[-1]["step"]
    p = run_cli("train", "--out", tmp_path, "--steps", last + 2, "--resume", "--quiet")
    assert "step(s) retried" in p.stdout and "failed episode(s)" in p.stdout
    assert [m["step"] for m in _lines(tmp_path / "metrics.jsonl")] == list(range(1, last + 3))


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
    assert cli_main(["train", "--config", MICRO, "--set", override, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and ("must be" in err or "expected" in err), err
    assert not (tmp_path / "r").exists()


def test_steps_zero_is_refused_and_temperature_zero_is_greedy(tmp_path, micro_captioner):
    p = _train(tmp_path / "a", micro_captioner, "--steps", 0, check=False)
    assert p.returncode == 2 and "train.steps" in p.stderr
    _train(tmp_path / "g", micro_captioner, "--steps", 1, "--set", "captioner.temperature=0")
    eps = _lines(tmp_path / "g" / "episodes.jsonl")
    groups = {}
    for e in eps:
        groups.setdefault(e["problem_id"], set()).add(e["caption"])
    assert groups and all(len(c) == 1 for c in groups.values())   # greedy: the M samples are the same caption


def test_yaml_errors_and_missing_checkpoints_have_one_line_messages(tmp_path, capsys):
    """Item 10: a 55-line traceback for a YAML typo; "run acrl warmstart" whenever --resume finds nothing."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  lr: [1e-4\n")
    assert cli_main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:4:1" in err and "YAML" in err, err
    (tmp_path / "empty").mkdir()
    assert cli_main(["train", "--config", MICRO, "--out", str(tmp_path / "empty"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "warmstart" not in err


def test_resume_before_the_first_checkpoint_starts_again_from_its_stored_run(tmp_path, micro_captioner, straight):
    """A kill before the first checkpoint: run.json defines the start, so --resume runs it again from step 0."""
    _train(tmp_path, micro_captioner, "--steps", 2)
    for name in os.listdir(tmp_path):
        if name.startswith("checkpoint"):
            p = tmp_path / name
            p.unlink() if os.path.islink(p) else shutil.rmtree(p)
    p = run_cli("train", "--out", tmp_path, "--steps", 4, "--resume", "--quiet")
    assert "starting the run again from step 0" in p.stderr
    _same_metrics(straight, _lines(tmp_path / "metrics.jsonl"))


def test_training_data_bad_rows_are_counted_named_and_written(tmp_path, micro_captioner):
    """Item 8: a non-UTF-8 byte dropped a whole file, an invalid JSON line read as "missing column", a first row
    without an answer rejected its file, and skipped rows were not reported."""
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32), "white").save(data / "a.png")
    good = [json.dumps({"question": f"How many bars? ({i})", "answer": str(i), "image": "a.png"}) for i in range(40)]
    (data / "part1.jsonl").write_text("\n".join(good[:20]) + "\n")
    raw = b"".join(x.encode() + b"\n" for x in good[20:])
    latin1 = b'{"question": "caf\xe9?", "answer": "1", "image": "a.png"}\n'   # one non-UTF-8 byte
    raw = b'{"question": "q?", "image": "a.png"}\n' + raw + latin1
    (data / "part2.jsonl").write_bytes(raw + b"{not json\n")
    from acrl.data import load_training_set

    res = load_training_set(data, max_bad_fraction=0.2)
    assert len(res.problems) == 40
    reasons = sorted(b.reason for b in res.bad)
    assert len(reasons) == 3 and any("not valid UTF-8" in r for r in reasons) and any("invalid JSON" in r
                                                                                       for r in reasons)
    p = _train(tmp_path / "run", micro_captioner, "--steps", 1, "--data", data, check=False)
    assert p.returncode == 2 and "3 of 43 rows unusable" in p.stderr   # above the 5% limit: refused, named
    (data / "part2.jsonl").write_bytes(raw)                               # one bad row of 42: under the limit
    p = _train(tmp_path / "run2", micro_captioner, "--steps", 1, "--data", data)
    assert "40 problems, 2 bad rows" in p.stdout
    assert len(_lines(tmp_path / "run2" / "bad_rows.jsonl")) == 2


def test_truncated_parquet_and_checkpoint_files_are_named(tmp_path, micro_captioner, capsys):
    """Item 10: a truncated parquet or config.json was a traceback that named no file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from acrl.data import load_training_set

    pq.write_table(pa.table({"question": ["q?"] * 50, "answer": ["1"] * 50, "image": ["a.png"] * 50}),
                   tmp_path / "train.parquet")
    blob = (tmp_path / "train.parquet").read_bytes()
    (tmp_path / "train.parquet").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="train.parquet"):
        load_training_set(tmp_path / "train.parquet")
    broken = tmp_path / "captioner"
    shutil.copytree(micro_captioner, broken)
    (broken / "config.json").write_text('{"d_model": 12')
    assert cli_main(["eval", "--config", MICRO, "--captioner", str(broken), "--reference", str(micro_captioner),
                     "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and str(broken) in err and "Traceback" not in err
    shutil.copy(micro_captioner / "config.json", broken / "config.json")
    (broken / "model.pt").write_bytes(b"\x00" * 64)
    assert cli_main(["eval", "--config", MICRO, "--captioner", str(broken), "--reference", str(micro_captioner),
                     "--out", str(tmp_path / "ev2")]) == 2
    err = capsys.readouterr().err
    assert "model.pt" in err and "corrupt" in err and "weights_only" not in err
