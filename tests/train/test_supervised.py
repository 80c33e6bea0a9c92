"""The warm starts' supervised loop on a one-weight model: the lr schedule it applies, held-out checks and
checkpoints on their steps, a resume that ends bit-identical to an uninterrupted run, stop signals."""

import copy
import json
import os
import signal
from dataclasses import dataclass

import pytest
import torch

from acrl.train import checkpoint, supervised
from acrl.train.guard import Interrupted


@dataclass
class Settings:
    steps: int = 6
    lr: float = 0.1
    warmup: int = 2
    weight_decay: float = 0.0
    grad_clip: float = 1e9
    eval_every: int = 2
    checkpoint_every: int = 2
    seed: int = 0


@dataclass
class Empty:
    pass


class Line:
    """A learner of y = 3x with one weight (the checks read it through ``ref_model``, as the loop promises)."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(1, 1, bias=False)
        self.ref_model = copy.deepcopy(self.model).requires_grad_(False)

    def trainable_parameters(self):
        return list(self.model.parameters())

    def save(self, path):
        os.makedirs(path, exist_ok=True)
        torch.save(self.model.state_dict(), os.path.join(path, "model.pt"))


def _task(line, seen=None, at=None, **kw):
    """Fits y = 3x on 4 random x per step (drawn from the loop's rng); ``seen``: the weight at each step's start;
    ``at``: {step: what to do at its start}."""
    def loss(step, rng):
        if seen is not None:
            seen.append(line.model.weight.item())
        if at and step in at:
            at[step]()
        x = torch.tensor([[rng.random()] for _ in range(4)])
        return ((line.model(x) - 3 * x) ** 2).mean()

    return supervised.Task(line, loss, evaluate=lambda: {"w": line.ref_model.weight.item()},
                           summary=lambda s: f"w {s['w']:.4f}", **kw)


def _run(out, cfg=None, task=None, resume=False, log=None):
    cfg, line = cfg or Settings(), Line()
    how = supervised.open_output(str(out), "toy", cfg, Empty(), Empty(), resume, not resume, log=lambda m: None)
    supervised.train(str(out), cfg, task or _task(line), resume=how == "resume", log=log or (lambda m: None))
    return line


def _log(out):
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in open(out / supervised.LOG)]


def _visible(out):
    """The output's files without its lock and the record of its settings (dot files)."""
    return sorted(n for n in os.listdir(out) if not n.startswith("."))


def _weights(out):
    return torch.load(out / "model.pt", weights_only=True)["weight"]


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    cfg = Settings(steps=10, warmup=4, lr=1.0)
    assert [supervised.lr_at(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert supervised.lr_at(cfg, 4) == 1.0 and supervised.lr_at(cfg, 10) == pytest.approx(0.1)
    lrs = [supervised.lr_at(cfg, s) for s in range(4, 11)]
    assert lrs == sorted(lrs, reverse=True)


def test_each_step_moves_the_weight_by_its_scheduled_lr(tmp_path):
    """A constant gradient: an Adam step is then lr long, so the weight's path is the schedule."""
    line, seen, cfg = Line(), [], Settings(steps=8, warmup=3, lr=0.01)
    _run(tmp_path, cfg, supervised.Task(line, lambda step, rng: seen.append(line.model.weight.item()) or
                                        line.model.weight.sum(), evaluate=dict, summary=str))
    seen.append(line.model.weight.item())
    moved = [a - b for a, b in zip(seen, seen[1:])]
    assert moved == pytest.approx([supervised.lr_at(cfg, s) for s in range(cfg.steps)], rel=1e-4)


def test_checks_log_and_publish(tmp_path):
    out, lines = tmp_path / "out", []
    line = _run(out, log=lines.append)
    assert [r["step"] for r in _log(out)] == [2, 4, 6]
    assert _log(out)[-1]["w"] == line.model.weight.item() == _weights(out).item()   # checks read the trained one
    assert abs(_log(out)[-1]["w"] - 3) < abs(_log(out)[0]["w"] - 3)
    assert lines[0].startswith("warmstart step 2/6 loss ") and " w " in lines[0]
    assert _visible(out) == ["model.pt", supervised.LOG]   # no checkpoints, no progress model left


def test_a_killed_run_resumes_from_its_checkpoint_bit_identical(tmp_path):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    _run(straight)

    class Killed(Exception):
        pass

    def boom():
        raise Killed

    with pytest.raises(Killed):
        _run(cut, task=_task(Line(), at={5: boom}))           # killed in step 6, after step 4's checkpoint
    assert checkpoint.latest(str(cut)).step == 4 and not (cut / "model.pt").exists()
    assert (cut / supervised.PROGRESS / "model.pt").exists()   # the latest check's model, apart
    lines = []
    _run(cut, resume=True, log=lines.append)
    assert any("continuing from" in m and "step 4" in m for m in lines), lines
    assert _log(cut) == _log(straight) and torch.equal(_weights(cut), _weights(straight))
    assert _visible(cut) == _visible(straight)


def _signal(sig=signal.SIGTERM, times=1):
    def send():
        for _ in range(times):
            os.kill(os.getpid(), sig)
    return send


@pytest.mark.parametrize("sig,at", [(signal.SIGTERM, 2), (signal.SIGINT, 2), (signal.SIGTERM, 5)])   # 5: the last
def test_a_stop_signal_ends_the_step_with_a_checkpoint_that_resumes_bit_identical(tmp_path, sig, at):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    _run(straight)
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as e:
        _run(cut, task=_task(Line(), at={at: _signal(sig)}))
    assert signal.getsignal(sig) is before                   # the handler is given back
    assert (e.value.signum, e.value.step) == (sig, at + 1)   # the step it was in is finished ...
    assert e.value.checkpoint == checkpoint.latest(str(cut)).path and checkpoint.latest(str(cut)).step == at + 1
    assert not (cut / "model.pt").exists()                              # ... and saved, not published
    _run(cut, resume=True)
    assert _log(cut) == _log(straight) and torch.equal(_weights(cut), _weights(straight))
    assert _visible(cut) == _visible(straight)


def test_a_second_stop_signal_abandons_the_step_and_the_newest_checkpoint_holds(tmp_path):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    _run(straight)
    with pytest.raises(Interrupted) as e:
        _run(cut, task=_task(Line(), at={3: _signal(times=2)}))   # in step 4, after step 2's checkpoint
    assert (e.value.step, e.value.checkpoint) == (3, None) and checkpoint.latest(str(cut)).step == 2
    _run(cut, resume=True)
    assert _log(cut) == _log(straight) and torch.equal(_weights(cut), _weights(straight))
