"""Graceful stops (SIGINT/SIGTERM) and waiting out service outages."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable

from tqdm import tqdm

from acrl.train.checkpoint import rng_state, set_rng_state
from acrl.train.distributed import Dist


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped the run. ``checkpoint``: where the state of ``step`` was saved (None: not saved,
    the step was abandoned in the middle of its update; the previous checkpoint holds)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class ServiceDown(Exception):
    """A step's episodes kept failing after ``train.step_retries`` retries; the run was checkpointed."""

    def __init__(self, step: int, reason: str, checkpoint: str | None):
        super().__init__(reason)
        self.step, self.reason, self.checkpoint = step, reason, checkpoint


def say(msg: str) -> None:
    """A line for the user on stderr that does not break the progress bar."""
    tqdm.write(msg, file=sys.stderr)


class Abandon(Exception):
    """Raised by the signal handler on a second signal. ``consistent``: the parameters have not been touched by
    the abandoned step (it had not reached its update)."""

    def __init__(self, consistent: bool = True):
        super().__init__("abandoned")
        self.consistent = consistent


class StopSignals:
    """SIGINT / SIGTERM during training: the first asks the run to stop after the current step (checkpointed);
    a second abandons the step at once. Installed only in the main thread of rank 0's and the others' processes
    (a worker thread cannot install handlers; then signals keep Python's defaults)."""

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.in_update = False
        self.announce = announce
        self._armed = False   # a second signal abandons only a running step (never a checkpoint being written)
        self._old: dict = {}

    @contextlib.contextmanager
    def armed(self):
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self.announce:
                say(f"{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
                           f"(send it again to abandon the step)")
            return
        if self._armed:
            self._armed = False
            raise Abandon(consistent=not self.in_update)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def wait_for_service(reason: str, step: int, attempt: int, tc, stop: StopSignals, main: bool) -> bool:
    """Wait before retry ``attempt`` of ``step`` (the waits double); False when a stop was asked for meanwhile."""
    wait = min(tc.retry_wait * 2 ** (attempt - 1), 120.0)
    if main:
        say(f"step {step}: not counted, {reason}; retrying in {wait:.0f}s (retry {attempt}/{tc.step_retries})")
    end = time.monotonic() + wait
    while time.monotonic() < end:
        if stop.signum:
            return False
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))
    return True


class Guard:
    """What may stop a step, and what follows: signals (the first stops the run after the step, checkpointed; a
    second abandons it) and service outages (the step is retried from the same random state after a growing wait;
    when the service stays down the run is checkpointed and :class:`ServiceDown` raised).

    ``save(rng)`` checkpoints the current state (``rng``: every rank's random state to store, default the current
    ones) and returns the checkpoint's path."""

    def __init__(self, tc, dist: Dist, save: Callable[[list[dict] | None], str | None]):
        self.tc, self.dist, self.save = tc, dist, save
        self.stop = StopSignals(dist.is_main)
        self.retries = 0

    def __enter__(self):
        self.stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.__exit__(*exc)

    def attempt(self, state, run_step: Callable[[], tuple[dict | None, str]]):
        """Run one step; ``(metrics, "")`` when it counts, ``(None, reason)`` when it must be tried again (its
        random state is restored and the wait done)."""
        start_rng = rng_state()
        try:
            with self.stop.armed():
                rec, failed = run_step()
        except Abandon as e:   # a second signal during the step
            saved = self.save(self.dist.gather(start_rng)) if e.consistent else None   # consistent: not mid-update
            raise Interrupted(self.stop.signum, state.step, saved) from None
        if rec is not None:
            self.retries = 0
            return rec, ""
        set_rng_state(start_rng)
        state.retried_steps += 1
        self.retries += 1
        if self.retries > self.tc.step_retries or not wait_for_service(
                failed, state.step + 1, self.retries, self.tc, self.stop, self.dist.is_main):
            saved = self.save(self.dist.gather(start_rng))
            if self.stop.signum:
                raise Interrupted(self.stop.signum, state.step, saved)
            raise ServiceDown(state.step, failed, saved)
        return None, failed

    @contextlib.contextmanager
    def updating(self):
        """An update is running: a second signal now leaves the parameters half-updated (not saved)."""
        self.stop.in_update = True
        try:
            yield
        finally:
            self.stop.in_update = False

    def stop_if_asked(self, state) -> None:
        """After a counted step: a signal received meanwhile stops the run here, checkpointed."""
        if self.stop.signum:
            raise Interrupted(self.stop.signum, state.step, self.save(None))
