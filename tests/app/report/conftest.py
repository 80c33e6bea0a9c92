import json
import re

import pytest
from conftest import MICRO, run_cli


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A micro `acrl demo` (shipped captioner; pretrained, AC-RL and binary arms), which writes report.html."""
    out = tmp_path_factory.mktemp("demo")
    run_cli("demo", "--config", MICRO, "--out", out, "--set", "train.eval_every=2", "--set", "train.eval_n=8")
    return out


def page_data(path) -> dict:
    """The JSON the page embeds (episodes, images, curves, patterns)."""
    m = re.search(r'<script id="acrl-data" type="application/json">(.*?)</script>', path.read_text(), re.S)
    assert m, f"no embedded data in {path}"
    return json.loads(m.group(1))


def lines(path) -> list[dict]:
    return [json.loads(x) for x in open(path) if x.strip()]
