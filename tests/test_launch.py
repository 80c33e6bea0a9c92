"""The `acrl` command answers SIGTERM with one line even while it is still loading its libraries."""

import signal
import subprocess
import sys
import time

from conftest import ROOT


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler installed (Linux: the SigCgt mask in /proc)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            mask = next(int(line.split()[1], 16) for line in fh if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask >> (signal.SIGTERM - 1) & 1)


def test_sigterm_while_starting_exits_with_one_line():
    proc = subprocess.Popen([sys.executable, "-m", "acrl", "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not _catches_sigterm(proc.pid):
        time.sleep(0.005)
    assert proc.poll() is None, "acrl finished before it installed a SIGTERM handler"
    proc.send_signal(signal.SIGTERM)   # the handler comes first; torch and transformers load for seconds after it
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    assert err.strip() == "acrl: terminated (SIGTERM)"
