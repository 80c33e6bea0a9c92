"""The warm starts (captioner and reasoner): a run stopped part-way never leaves what looks like a finished one."""

import os
import signal
import subprocess
import sys
import time

import pytest

from acrl.config import TinyReasonerConfig, TinyVLMConfig
from acrl.train.reasoner_warmstart import ReasonerWarmStartConfig, warm_start_reasoner
from acrl.train.warmstart import WarmStartConfig, warm_start
from acrl.world import WorldConfig


class Killed(Exception):
    pass


def _kill_at(step: int):
    def log(msg: str) -> None:
        if f"step {step}/" in msg:
            raise Killed(msg)
    return log


def _visible(out) -> list[str]:
    """The output's files, without the owner's lock and the record of its settings (dot files)."""
    return sorted(n for n in os.listdir(out) if not n.startswith("."))


def _finished(out) -> bool:
    return os.path.exists(os.path.join(out, "model.pt"))


def test_an_interrupted_captioner_warm_start_does_not_look_finished(tmp_path):
    """A warm start saved its in-progress model to OUT at every held-out check, so a kill after the first check left
    OUT/model.pt: `make research` (test -f OUT/model.pt) and every --captioner OUT then used a part-trained π_ref."""
    cfg, model = WarmStartConfig(steps=4, batch_size=4, eval_every=2, eval_n=4), TinyVLMConfig(d_model=32, n_layers=1)
    out = str(tmp_path / "ws")
    with pytest.raises(Killed):
        warm_start(out, cfg, WorldConfig(), model, log=_kill_at(4))   # killed after the step-2 check was saved
    assert not _finished(out)
    assert os.path.exists(os.path.join(out, "progress", "model.pt"))   # the last check is kept, apart
    warm_start(out, cfg, WorldConfig(), model, log=lambda m: None)
    assert _finished(out) and _visible(out) == ["config.json", "model.pt", "vocab.json", "warmstart_log.jsonl"]


def test_an_interrupted_reasoner_warm_start_does_not_look_finished(tmp_path):
    cfg = ReasonerWarmStartConfig(steps=4, batch_size=4, eval_every=2, eval_n=4)
    model = TinyReasonerConfig(d_model=32, n_layers=1)
    out = str(tmp_path / "rs")
    with pytest.raises(Killed):
        warm_start_reasoner(out, cfg, WorldConfig(), model, log=_kill_at(4))
    assert not _finished(out)
    warm_start_reasoner(out, cfg, WorldConfig(), model, log=lambda m: None)
    assert _finished(out) and not os.path.exists(os.path.join(out, "progress"))


# --- resumable warm starts: a kill costs at most checkpoint_every steps, and the result is the uninterrupted one ---

def _log_rows(out):
    import json

    return [{k: v for k, v in json.loads(x).items() if k != "seconds"}
            for x in open(os.path.join(out, "warmstart_log.jsonl")) if x.strip()]


@pytest.mark.parametrize("kind", ["captioner", "reasoner"])
def test_a_killed_warm_start_resumes_from_its_checkpoint_and_ends_bit_identical(tmp_path, kind, monkeypatch):
    """A re-run after an interruption started again from step 0 (or from an earlier step than it reached)."""
    import torch

    from acrl.train import reasoner_warmstart

    heldout = reasoner_warmstart.write_heldout
    monkeypatch.setattr(reasoner_warmstart, "write_heldout", lambda out, r, w, b: heldout(out, r, w, b, n=8))

    if kind == "captioner":
        fn, cfg, model = warm_start, WarmStartConfig(steps=6, batch_size=4, eval_every=2, eval_n=4,
                                                     checkpoint_every=2), TinyVLMConfig(d_model=32, n_layers=1)
    else:
        fn, cfg, model = warm_start_reasoner, ReasonerWarmStartConfig(steps=6, batch_size=4, eval_every=2, eval_n=4,
                                                                      checkpoint_every=2), \
            TinyReasonerConfig(d_model=32, n_layers=1)
    straight, cut = str(tmp_path / "straight"), str(tmp_path / "cut")
    fn(straight, cfg, WorldConfig(), model, log=lambda m: None, overwrite=False)
    steps = []
    with pytest.raises(Killed):
        fn(cut, cfg, WorldConfig(), model, log=_kill_at(6), overwrite=False)   # after step 4's checkpoint
    with pytest.raises(ValueError, match="interrupted .*--resume"):          # neither flag: refused
        fn(cut, cfg, WorldConfig(), model, log=lambda m: None, overwrite=False)
    fn(cut, cfg, WorldConfig(), model, log=steps.append, resume=True, overwrite=False)
    assert any("continuing from" in m and "step 4" in m for m in steps), steps
    assert _log_rows(cut) == _log_rows(straight)
    a, b = (torch.load(os.path.join(d, "model.pt"), weights_only=False) for d in (straight, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _visible(cut) == _visible(straight)                                  # no checkpoints left behind


def test_warmstart_command_table(tmp_path, capsys):
    """The CLI: an existing --out is refused (a finished model.pt is never lost), --resume of a finished one does
    nothing, a resume with other settings is refused, bad values are one line naming the flag."""
    from conftest import MICRO

    from acrl.app.cli import main

    out = tmp_path / "ws"
    base = ["warmstart", "--config", MICRO, "--out", str(out), "--set", "warmstart.eval_n=4"]
    assert main(base) == 0
    model = (out / "model.pt").read_bytes()
    cases = [(["--steps", "0"], 2, "--steps 0"), (["--steps", "-3"], 2, "--steps -3"),
             ([], 2, "finished captioner warm start (model.pt); pass --overwrite"),
             (["--resume", "--overwrite"], 2, "contradict"),
             (["--resume", "--seed", "5"], 2, "differs in: warmstart"),
             (["--resume"], 0, "")]
    for extra, rc, message in cases:
        assert main(base + extra) == rc, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) <= 1, (extra, err)
        assert (out / "model.pt").read_bytes() == model                        # the finished model is kept


def test_a_sigterm_warmstart_command_checkpoints_its_step_and_resumes(tmp_path):
    """A SIGTERM (what schedulers send) ended a warm start at once: the steps since its last checkpoint were lost."""
    from conftest import MICRO, ROOT, run_cli

    from acrl.train import checkpoint

    out = tmp_path / "ws"
    argv = ["warmstart", "--config", MICRO, "--out", str(out), "--set", "warmstart.steps=20", "--set",
            "warmstart.eval_every=1", "--set", "warmstart.eval_n=1", "--set", "warmstart.checkpoint_every=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "acrl", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log, end = out / "warmstart_log.jsonl", time.time() + 300
    while proc.poll() is None and time.time() < end and not (log.exists() and len(_log_rows(out)) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "acrl warmstart: stopped by SIGTERM at step "), err
    done = _log_rows(out)[-1]["step"]
    assert checkpoint.latest(str(out)).step == done >= 2 and not _finished(out)   # nothing lost, nothing published
    run_cli(*argv, "--resume")
    assert [r["step"] for r in _log_rows(out)] == list(range(1, 21)) and _finished(out)
