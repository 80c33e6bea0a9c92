"""What stops a step (:mod:`acrl.train.guard`): a first SIGINT / SIGTERM stops the run after the step, checkpointed;
a second abandons the step (saved only when the parameters are untouched); a failed step is retried from the same
random state after a growing wait, and a service that stays down ends the run checkpointed. (Signals sent to a
running ``acrl train``: tests/app/test_cli.py.)"""

import contextlib
import os
import random
import signal
from types import SimpleNamespace

import pytest
import torch

from acrl.train.checkpoint import TrainState, rng_state
from acrl.train.distributed import SINGLE
from acrl.train.guard import Abandon, Guard, Interrupted, ServiceDown, StopSignals, wait_for_service


def _settings(retries=2, wait=0.01):
    return SimpleNamespace(step_retries=retries, retry_wait=wait)


class _Saves:
    def __init__(self):
        self.calls = []

    def __call__(self, rng):
        self.calls.append(rng)
        return f"checkpoint-{len(self.calls)}"


def test_signal_handlers_are_installed_for_the_run_and_restored_after():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals(announce=False) as stop:
        assert signal.getsignal(signal.SIGINT) == stop._handle == signal.getsignal(signal.SIGTERM)
    assert {s: signal.getsignal(s) for s in before} == before


def test_the_first_signal_asks_to_stop_and_a_second_abandons_only_a_running_step():
    with StopSignals(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM                        # no exception: the step goes on
        os.kill(os.getpid(), signal.SIGINT)                         # not inside a step: nothing to abandon
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Abandon) as e, stop.armed():
            os.kill(os.getpid(), signal.SIGINT)
        assert e.value.consistent
        stop.in_update = True
        with pytest.raises(Abandon) as e, stop.armed():
            os.kill(os.getpid(), signal.SIGINT)
        assert not e.value.consistent                               # mid-update: the parameters are half-changed


def test_a_counted_step_resets_the_retries_and_a_signal_stops_after_it():
    save = _Saves()
    with Guard(_settings(), SINGLE, save) as g:
        g.retries = 2
        assert g.attempt(TrainState(step=4), lambda: ({"reward": 1.0}, "")) == ({"reward": 1.0}, "")
        assert g.retries == 0
        g.stop_if_asked(TrainState(step=5))
        assert save.calls == []
        g.stop.signum = signal.SIGTERM
        with pytest.raises(Interrupted) as e:
            g.stop_if_asked(TrainState(step=5))
    assert (e.value.step, e.value.checkpoint, e.value.signum) == (5, "checkpoint-1", signal.SIGTERM)
    assert save.calls == [None] and str(e.value) == "SIGTERM at step 5"


def _draws():
    return random.random(), torch.rand(2).tolist()


def test_a_failed_step_is_tried_again_from_the_same_random_state():
    seen = []

    def flaky():
        seen.append(_draws())
        return (None, "reasoner down") if len(seen) < 3 else ({"step": 1}, "")

    state = TrainState(step=0)
    with Guard(_settings(retries=2), SINGLE, _Saves()) as g:
        assert g.attempt(state, flaky) == (None, "reasoner down")
        assert g.attempt(state, flaky) == (None, "reasoner down")
        assert g.attempt(state, flaky) == ({"step": 1}, "")
    assert seen[0] == seen[1] == seen[2] and state.retried_steps == 2 and g.retries == 0


def test_a_service_that_stays_down_ends_the_run_checkpointed_at_the_steps_start():
    save, state = _Saves(), TrainState(step=7)

    def failing():
        _draws()                                                    # the failed step consumed random numbers
        return None, "50% of the step's episodes failed"

    with Guard(_settings(retries=1), SINGLE, save) as g:
        g.attempt(state, failing)
        start = rng_state()
        with pytest.raises(ServiceDown) as e:
            g.attempt(state, failing)
    assert (e.value.step, e.value.checkpoint) == (7, "checkpoint-1")
    assert e.value.reason == "50% of the step's episodes failed"
    (saved,) = save.calls
    assert len(saved) == 1 and torch.equal(saved[0]["torch"], start["torch"])   # the state the step started from
    assert saved[0]["python"] == start["python"] and state.retried_steps == 2


@pytest.mark.parametrize("in_update, checkpoint", [(False, "checkpoint-1"), (True, None)])
def test_an_abandoned_step_is_saved_only_when_it_had_not_reached_its_update(in_update, checkpoint):
    save = _Saves()
    with Guard(_settings(), SINGLE, save) as g:
        def step():
            g.stop.signum = signal.SIGINT                            # the first signal came earlier in the step
            with g.updating() if in_update else contextlib.nullcontext():
                os.kill(os.getpid(), signal.SIGINT)
            return {}, ""

        with pytest.raises(Interrupted) as e:
            g.attempt(TrainState(step=3), step)
        assert not g.stop.in_update                                 # left the update, whatever happened in it
    assert (e.value.step, e.value.checkpoint) == (3, checkpoint)
    assert len(save.calls) == (0 if in_update else 1)


def test_the_wait_before_a_retry_doubles_and_a_stop_cuts_it_short(monkeypatch):
    slept = []
    clock = [0.0]
    monkeypatch.setattr("acrl.train.guard.time.monotonic", lambda: clock[0])

    def sleep(s):
        slept.append(s)
        clock[0] += s

    monkeypatch.setattr("acrl.train.guard.time.sleep", sleep)
    stop = StopSignals(announce=False)
    for attempt, wait in ((1, 1.0), (3, 4.0), (9, 120.0)):          # 1 s, doubling, at most two minutes
        slept.clear()
        assert wait_for_service("down", 5, attempt, _settings(retries=9, wait=1.0), stop, main=False)
        assert sum(slept) == pytest.approx(wait)
    stop.signum = signal.SIGINT
    assert not wait_for_service("down", 5, 1, _settings(wait=1.0), stop, main=False)
