import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "configs", "micro.yaml")


def run_cli(*args, check=True):
    """Run the real `acrl` CLI in a subprocess (as a user would) and return the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "acrl.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"acrl {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def micro_captioner(tmp_path_factory):
    """A micro warm-started captioner written by the real `acrl warmstart` command."""
    out = tmp_path_factory.mktemp("ws") / "captioner"
    run_cli("warmstart", "--config", MICRO, "--out", out)
    return out
