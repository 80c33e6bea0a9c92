"""Bad values, existing outputs, a full disk, a second writer and malformed files for world, make-tiny,
convert-gguf, report and sweep: every refusal is one line naming the input; nothing stale or torn is left."""

import errno
import json
import os
import subprocess
import sys

import pytest
from conftest import MICRO

import acrl
from acrl.app.cli import main
from acrl.app.sweep import run_local


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip()


BAD = [
    (["world", "--n", "0"], "--n 0"), (["world", "--n", "-5"], "--n -5"), (["world", "--start", "-1"], "--start -1"),
    (["sweep", "--jobs", "0"], "--jobs 0"), (["sweep", "--seeds", ""], "names no seed"),
    (["sweep", "--seeds", "a,b"], "--seeds 'a,b'"), (["sweep", "--seeds", "0,1,0"], "repeats seed 0"),
    (["sweep", "--aggregate-only"], "holds no sweep"),
    (["convert-gguf", "--gguf", "/no/such.gguf"], "--gguf /no/such.gguf"),
]


@pytest.mark.parametrize("args, named", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_one_line_errors(tmp_path, capsys, args, named):
    """--jobs 0 hung, --seeds '' exited 0 with no run, duplicate seeds ran one seed twice, --aggregate-only on a
    missing directory printed an empty table with exit 0, --seeds a,b did not name --seeds."""
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


def test_report_on_a_full_disk_keeps_the_previous_page(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.html").write_text("<html>previous</html>")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    rc, err = _run(capsys, "report", tmp_path / "nothing-here", "--out", out)
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert (out / "report.html").read_text() == "<html>previous</html>"


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
        codes = run_local([str(run)], jobs=1, log=logs.append)
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
