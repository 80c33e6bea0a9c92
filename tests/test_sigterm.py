"""SIGTERM answered with one line and exit status 143 (:mod:`acrl.sigterm`), in this process. (That ``acrl`` installs
it from its first instant: tests/test_launch.py.)"""

import os
import signal

import pytest

from acrl import sigterm


def test_sigterm_ends_the_process_with_one_line_and_143(capsys):
    before = signal.getsignal(signal.SIGTERM)
    try:
        sigterm.install()
        assert signal.getsignal(signal.SIGTERM) is sigterm.terminated
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert e.value.code == 128 + signal.SIGTERM == 143
    assert capsys.readouterr().err == "acrl: terminated (SIGTERM)\n"
