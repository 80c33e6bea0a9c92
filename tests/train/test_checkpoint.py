"""Crash-safe checkpoints (:mod:`acrl.train.checkpoint`): sealed with a manifest, verified when read, the newest
intact one found whatever else a crash left; the state of a run (step, data cursor, every random stream) restored
exactly. (Resuming through ``acrl train`` is tested in tests/app/test_cli.py.)"""

import errno
import json
import os
import random

import numpy as np
import pytest
import torch

from acrl.config import Config, to_dict
from acrl.train import checkpoint as ckpt
from acrl.train.checkpoint import TrainState


def _files(**files):
    """A ``write(dir)`` that writes ``{relative path: bytes}`` (``__`` in a name is a ``/``)."""
    def write(d):
        for name, data in files.items():
            path = os.path.join(d, name.replace("__", "/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)
    return write


def _versions(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))


def test_a_save_is_sealed_with_a_manifest_and_linked(tmp_path):
    path = ckpt.save(str(tmp_path), 7, _files(state_pt=b"s" * 10, policy__model_pt=b"w" * 100))
    assert path == str(tmp_path / "checkpoint-000007") and ckpt.verify(path) is None
    man = json.loads((tmp_path / "checkpoint-000007" / "manifest.json").read_text())
    assert man["step"] == 7 and set(man["files"]) == {"state_pt", os.path.join("policy", "model_pt")}
    assert man["files"]["state_pt"]["bytes"] == 10 and len(man["files"]["state_pt"]["sha256"]) == 64
    assert os.readlink(tmp_path / "checkpoint") == "checkpoint-000007"
    assert ckpt.latest(str(tmp_path)) == ckpt.Found(path, 7, [])


def test_keep_prunes_the_oldest_and_a_redone_step_is_replaced_whole(tmp_path):
    out = str(tmp_path)
    for step in (1, 2, 3):
        ckpt.save(out, step, _files(a=b"x"), keep=2)
    assert _versions(out) == ["checkpoint-000002", "checkpoint-000003"]
    ckpt.save(out, 3, _files(b=b"y"), keep=2)                     # the same step written again
    assert sorted(os.listdir(tmp_path / "checkpoint-000003")) == ["b", "manifest.json"]
    for step in (4, 5):
        ckpt.save(out, step, _files(a=b"x"), keep=0)              # 0: keep every checkpoint
    assert _versions(out) == ["checkpoint-000002", "checkpoint-000003", "checkpoint-000004", "checkpoint-000005"]


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


@pytest.mark.parametrize("err, message", [
    (OSError(errno.EFBIG, "File too large"), "file size limit reached while writing checkpoint"),
    (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos"), "no space left on"),
    (OSError(errno.EACCES, "Permission denied"), "could not write checkpoint .*checkpoint-000001: PermissionError"),
])
def test_a_write_error_names_the_checkpoint_and_what_happened(tmp_path, err, message):
    def fails(d):
        raise err

    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.save(str(tmp_path), 1, fails)
    assert os.listdir(tmp_path) == []                              # the temporary directory is gone


def test_verify_says_what_is_wrong_and_latest_takes_the_newest_intact(tmp_path):
    out = str(tmp_path)
    for step in (1, 2, 3, 4):
        ckpt.save(out, step, _files(model=b"0123456789"), keep=0)
    with open(tmp_path / "checkpoint-000004" / "model", "r+b") as fh:   # same size, other bytes
        fh.write(b"X")
    (tmp_path / "checkpoint-000003" / "model").write_bytes(b"short")
    os.remove(tmp_path / "checkpoint-000002" / "manifest.json")          # torn: killed before it was sealed
    assert ckpt.verify(str(tmp_path / "checkpoint-000004")) == "model does not match its checksum"
    assert ckpt.verify(str(tmp_path / "checkpoint-000003")) == "model has 5 bytes, the manifest says 10"
    assert ckpt.verify(str(tmp_path / "checkpoint-000002")) == "no manifest.json (incomplete)"
    found = ckpt.latest(out)
    assert (found.path, found.step) == (str(tmp_path / "checkpoint-000001"), 1)
    assert [s.split(": ")[0] for s in found.skipped] == [str(tmp_path / f"checkpoint-00000{i}") for i in (4, 3, 2)]
    os.remove(tmp_path / "checkpoint-000001" / "model")
    assert ckpt.verify(str(tmp_path / "checkpoint-000001")) == "model is missing"
    (tmp_path / "checkpoint-000001" / "manifest.json").write_text("{")
    assert ckpt.verify(str(tmp_path / "checkpoint-000001")).startswith("unreadable manifest.json")
    assert ckpt.latest(out).path is None and len(ckpt.latest(out).skipped) == 4


def test_the_next_save_removes_what_an_interrupted_one_left(tmp_path):
    (tmp_path / ".checkpoint-000002.tmp-999").mkdir()
    (tmp_path / ".checkpoint-000002.tmp-999" / "half").write_bytes(b"x")
    (tmp_path / ".checkpoint-notes").mkdir()                      # not a save's temporary directory: left alone
    ckpt.save(str(tmp_path), 2, _files(a=b"x"))
    assert sorted(os.listdir(tmp_path)) == [".checkpoint-notes", "checkpoint", "checkpoint-000002"]


def test_a_resume_without_a_checkpoint_says_why(tmp_path):
    assert "does not exist" in ckpt.describe_missing(str(tmp_path / "nope"), ckpt.Found(None))
    assert "no checkpoint in" in ckpt.describe_missing(str(tmp_path), ckpt.Found(None, 0, []))
    msg = ckpt.describe_missing(str(tmp_path), ckpt.Found(None, 0, ["a: no manifest.json (incomplete)"]))
    assert "no usable checkpoint" in msg and "a: no manifest.json" in msg and "--overwrite" in msg


def test_publish_removes_the_old_model_first_and_moves_the_new_one_in_last(tmp_path, monkeypatch):
    out = tmp_path / "captioner"
    (out / "tokenizer").mkdir(parents=True)
    (out / "model.pt").write_bytes(b"old")
    (out / "tokenizer" / "stale").write_bytes(b"old")
    moves = []

    def watch(src, dst, real=os.replace):
        moves.append((os.path.basename(dst), (out / "model.pt").exists()))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", watch)
    ckpt.publish(_files(**{"model.pt": b"new", "config.json": b"{}", "tokenizer__vocab": b"v"}), str(out))
    assert moves[-1] == ("model.pt", False) and sorted(moves[:-1]) == [("config.json", False), ("tokenizer", False)]
    assert (out / "model.pt").read_bytes() == b"new" and sorted(os.listdir(out)) == ["config.json", "model.pt",
                                                                                       "tokenizer"]
    assert os.listdir(out / "tokenizer") == ["vocab"]              # a directory is replaced whole


class _Learner:
    """Writes a model under ``policy/`` and its optimiser's state into ``state.pt``; records what it loads."""

    def __init__(self):
        self.loaded = None

    def save(self, d):
        os.makedirs(os.path.join(d, "policy"))
        torch.save({"w": torch.arange(3.0)}, os.path.join(d, "policy", "model.pt"))
        return {"optimizer": {"lr": 0.25}}

    def load(self, path, blob):
        self.loaded = (path, blob["optimizer"])


def _draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_a_run_state_round_trips_with_every_random_stream(tmp_path):
    ckpt.set_seed(5)
    _draw()
    state = TrainState(step=3, cursor=12, retried_steps=2, failed_episodes=5)
    path = ckpt.save_checkpoint(str(tmp_path), [_Learner()], state, Config(), keep=2)
    expected = _draw()                                             # what the run draws next
    assert json.loads((tmp_path / "checkpoint-000003" / "config.json").read_text()) == json.loads(
        json.dumps(to_dict(Config())))
    ckpt.set_seed(99)
    learner = _Learner()
    back = ckpt.load_checkpoint(path, [learner])
    assert back == state and learner.loaded == (path, {"lr": 0.25})
    assert _draw() == expected


def test_each_rank_gets_its_own_random_state_and_a_new_rank_a_seed_of_its_own(tmp_path):
    states = []
    for seed in (1, 2):
        ckpt.set_seed(seed)
        states.append(ckpt.rng_state())
    path = ckpt.save_checkpoint(str(tmp_path), [], TrainState(step=4), Config(), rng=states)
    ckpt.load_checkpoint(path, [], rank=1)
    one = _draw()
    ckpt.set_seed(2)
    assert _draw() == one
    ckpt.load_checkpoint(path, [], rank=2)                         # resumed with more processes than it had
    new = _draw()
    ckpt.set_seed(1_000_003 * 4 + 2)
    assert _draw() == new


def test_an_unreadable_state_is_a_corrupt_checkpoint_naming_its_path(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint {tmp_path} is corrupt: state.pt cannot be read"):
        ckpt.load_checkpoint(str(tmp_path), [])
