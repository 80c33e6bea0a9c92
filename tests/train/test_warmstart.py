"""The warm starts (captioner and reasoner): a run stopped part-way never leaves what looks like a finished one."""

import os

import pytest

from acrl.backends.tiny import TinyVLMConfig
from acrl.backends.tiny_reasoner import TinyReasonerConfig
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
    assert _finished(out) and sorted(os.listdir(out)) == ["config.json", "model.pt", "vocab.json",
                                                          "warmstart_log.jsonl"]


def test_an_interrupted_reasoner_warm_start_does_not_look_finished(tmp_path):
    cfg = ReasonerWarmStartConfig(steps=4, batch_size=4, eval_every=2, eval_n=4)
    model = TinyReasonerConfig(d_model=32, n_layers=1)
    out = str(tmp_path / "rs")
    with pytest.raises(Killed):
        warm_start_reasoner(out, cfg, WorldConfig(), model, log=_kill_at(4))
    assert not _finished(out)
    warm_start_reasoner(out, cfg, WorldConfig(), model, log=lambda m: None)
    assert _finished(out) and not os.path.exists(os.path.join(out, "progress"))
