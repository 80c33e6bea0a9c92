import pytest
from conftest import MICRO, run_cli


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A micro `acrl demo` (shipped captioner; pretrained, AC-RL and binary arms), which writes report.md and
    report.html."""
    out = tmp_path_factory.mktemp("demo")
    run_cli("demo", "--config", MICRO, "--out", out, "--set", "train.eval_every=2", "--set", "train.eval_n=8")
    return out
