"""The run directory (:mod:`acrl.train.run`): a fresh run never lands on another, ``--overwrite`` removes only a
run's own files, a resume keeps the records its checkpoint covers and must be the same experiment (``run.json``),
and a record that cannot be written names its file. (The same through ``acrl train``: tests/app/test_cli.py.)"""

import errno
import json
import os

import pytest

from acrl.config import Config, to_dict
from acrl.train import checkpoint as ckpt
from acrl.train import run
from acrl.train.checkpoint import TrainState
from acrl.train.distributed import SINGLE


def _config(**train):
    d = to_dict(Config())
    d["train"].update(train)
    return d


def _jsonl(path, *records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_what_defines_the_experiment_differs_and_what_only_runs_it_does_not(tmp_path, monkeypatch):
    stored = {"config": _config(alpha=0.7, steps=10), "captioner": str(tmp_path / "cap"), "data": None}
    new = _config(alpha=0.5, steps=20, threads=4)                          # steps and threads: how, not what
    new["captioner"]["lora"]["r"] = 32
    new["reasoner"]["base_url"] = "http://elsewhere/v1"
    diffs = run.differences(stored, new, str(tmp_path / "cap"), str(tmp_path / "data"))
    assert diffs == [("captioner.lora.r", 16, 32), ("train.alpha", 0.7, 0.5), ("--data", None, str(tmp_path / "data"))]
    assert run.describe(diffs[:1]) == "captioner.lora.r: run has 16, command gives 32"
    monkeypatch.chdir(tmp_path)
    assert run.differences(stored, stored["config"], "cap", None) == []           # the same path, relative
    assert run.differences(stored, stored["config"], "other", None) == [
        ("--captioner (π_ref)", str(tmp_path / "cap"), "other")]


def test_a_field_a_stored_run_lacks_is_the_same_experiment_at_its_default(tmp_path):
    old = _config()
    del old["train"]["max_clarifications"]                               # written before the field existed
    stored = {"config": old, "captioner": "c", "data": None}
    assert run.differences(stored, _config(), "c", None) == []
    assert run.differences(stored, _config(max_clarifications=3), "c", None) == [("train.max_clarifications", 1, 3)]


def test_run_json_is_read_back_and_a_corrupt_one_is_named(tmp_path):
    assert run.read(str(tmp_path)) is None
    info = run.record(to_dict(Config()), str(tmp_path), None)
    run.write(str(tmp_path), info)
    assert run.read(str(tmp_path)) == json.loads(json.dumps(info)) and info["captioner"] == str(tmp_path)
    for text in ("{", '{"config": 3}', "[]"):
        (tmp_path / "run.json").write_text(text)
        with pytest.raises(ValueError, match=f"{tmp_path / 'run.json'} is corrupt.*--overwrite"):
            run.read(str(tmp_path))


def test_a_fresh_run_refuses_a_directory_holding_a_run_and_overwrite_removes_only_the_runs_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")                               # empty: no run yet
    (out / "notes.txt").write_text("mine")
    run.open_fresh(str(out), overwrite=False)
    _jsonl(out / "metrics.jsonl", {"step": 1})
    with pytest.raises(run.RunExists, match="metrics.jsonl.*--resume.*--overwrite"):
        run.open_fresh(str(out), overwrite=False)
    ckpt.save(str(out), 1, lambda d: open(os.path.join(d, "a"), "w").close())
    for name in ("episodes.jsonl", "run.json", "bad_rows.jsonl"):
        (out / name).write_text("{}\n")
    (out / ".checkpoint-000002.tmp-1").mkdir()
    run.open_fresh(str(out), overwrite=True)
    assert sorted(os.listdir(out)) == [".lock", "notes.txt"]
    ckpt.save(str(out), 3, lambda d: open(os.path.join(d, "a"), "w").close())    # a checkpoint alone is a run
    assert run.run_exists(str(out)) == str(out / "checkpoint-000003")


def test_resume_keeps_the_records_the_checkpoint_covers_and_says_what_it_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _jsonl(path, *({"step": s} for s in (1, 2, 3)), tail='{"step": 4, "rew')
    assert run.truncate_jsonl(str(path), 2) == [
        "dropped the torn last line of metrics.jsonl (an interrupted write)",
        "dropped the metrics.jsonl records of step(s) 3-3, after the checkpoint's step 2: they are run again"]
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    assert run.truncate_jsonl(str(path), 2) == ["dropped 1 unreadable line(s) of metrics.jsonl (line 2)"]
    before = path.stat().st_mtime_ns
    assert run.truncate_jsonl(str(path), 2) == [] and path.stat().st_mtime_ns == before    # nothing to do
    assert run.truncate_jsonl(str(tmp_path / "none.jsonl"), 2) == []


def test_open_run_resumes_from_the_newest_checkpoint(tmp_path):
    ckpt.save_checkpoint(str(tmp_path), [], TrainState(step=2, cursor=8), Config())
    _jsonl(tmp_path / "metrics.jsonl", *({"step": s} for s in (1, 2, 3)))
    (tmp_path / ".checkpoint-000003.tmp-77").mkdir()
    said = []
    state = run.open_run(str(tmp_path), [], SINGLE, resume=True, overwrite=False, log=said.append)
    assert (state.step, state.cursor) == (2, 8)
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2]
    assert said[0].startswith("resume: dropped the metrics.jsonl records of step(s) 3-3")
    assert said[-1] == f"resume: continuing from {tmp_path / 'checkpoint-000002'} (step 2)"
    assert not (tmp_path / ".checkpoint-000003.tmp-77").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        run.open_run(str(tmp_path / "empty"), [], SINGLE, resume=True, overwrite=False, log=said.append)


def test_prepare_records_the_run_and_refuses_a_changed_experiment_unless_allowed(tmp_path, capsys):
    out, cap = str(tmp_path / "run"), str(tmp_path / "cap")
    with pytest.raises(ValueError, match="contradict"):
        run.prepare(out, Config(), cap, None, None, resume=True, overwrite=True, allow_change=False, d=SINGLE)
    assert run.prepare(out, Config(), cap, None, None, resume=False, overwrite=False, allow_change=False,
                       d=SINGLE) is None
    stored = run.read(out)
    assert stored["config"] == json.loads(json.dumps(to_dict(Config()))) and stored["changes"] == []
    # stopped before its first checkpoint: --resume runs it again from step 0 with the stored config
    assert run.prepare(out, Config(), cap, None, stored, resume=True, overwrite=False, allow_change=False,
                       d=SINGLE) is None
    assert "starting the run again from step 0" in capsys.readouterr().err
    ckpt.save_checkpoint(out, [], TrainState(step=3), Config())
    changed = Config()
    changed.train.alpha = 0.5
    with pytest.raises(ValueError, match="train.alpha: run has 0.7, command gives 0.5.*--allow-change"):
        run.prepare(out, changed, cap, None, run.read(out), resume=True, overwrite=False, allow_change=False,
                    d=SINGLE)
    got = run.prepare(out, changed, cap, None, run.read(out), resume=True, overwrite=False, allow_change=True,
                      d=SINGLE)
    assert got == os.path.join(out, "checkpoint-000003")
    info = run.read(out)
    assert info["changes"] == [{"at_step": 3, "key": "train.alpha", "old": 0.7, "new": 0.5}]
    assert info["config"]["train"]["alpha"] == 0.5
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run.prepare(str(tmp_path / "none"), Config(), cap, None, None, resume=True, overwrite=False,
                    allow_change=False, d=SINGLE)


def test_a_record_that_cannot_be_written_names_its_file(tmp_path):
    log = run.RunLog(str(tmp_path), append=False)

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    log.ef.close()
    log.ef = Full()
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'episodes.jsonl'}: No space left"):
        log.write({"step": 1}, [], 1)
    log.close()
