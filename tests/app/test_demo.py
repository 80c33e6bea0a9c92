"""The README's results table is what `make demo` wrote: its numbers equal the committed docs/demo-results."""

import json
import os
import re

from conftest import ROOT

ROWS = {"pretrained": "pretrained", "binary-reward RL (α = 0)": "binary", "AC-RL (α = 0.7)": "acrl"}


def _readme_rows() -> dict:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = text.split("<!-- demo-results: docs/demo-results/results.json -->", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        rows[ROWS[cells[0]]] = cells[1:]
    return rows


def test_readme_results_equal_the_committed_demo_results():
    res = json.load(open(os.path.join(ROOT, "docs", "demo-results", "results.json")))
    default = next(r for r in res if r["regime"] == "default")
    rows = _readme_rows()
    assert set(rows) == {"pretrained", "binary", "acrl"}
    for arm, cells in rows.items():
        o = default[arm]["overall"]
        want = [f"{100 * o[k]:.1f}" for k in ("accuracy", "clarification_rate", "accuracy_with_clarification")]
        train = default.get(f"{arm}_train")
        want += [f"{100 * train['uniform_frac']:.1f}", f"{train['kl_mean']:.3f}"] if train else ["–", "–"]
        assert cells == want, arm
    assert re.search(r"\d", " ".join(c for cells in rows.values() for c in cells))
