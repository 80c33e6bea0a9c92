"""benchmarks/alpha_summary.py: the per-regime verdict row built from a sweep's paired comparison."""

import importlib.util
import json
import os

from app.test_sweep import _fake_run
from conftest import ROOT

from acrl.app import sweep

spec = importlib.util.spec_from_file_location("alpha_summary", os.path.join(ROOT, "benchmarks", "alpha_summary.py"))
alpha_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(alpha_summary)


def test_verdict_row_names_the_crossover_and_the_arms_ahead(tmp_path):
    reg = tmp_path / "results" / "toy"
    finals = {"alpha=0": (0.80, 0.70, 0.75), "alpha=0.3": (0.82, 0.72, 0.74), "alpha=0.7": (0.60, 0.65, 0.70),
              "alpha=1": (0.30, 0.20, 0.25)}
    early = {"alpha=0": 0.3, "alpha=0.3": 0.4, "alpha=0.7": 0.5, "alpha=1": 0.2}   # val accuracy at step 10
    for arm, accs in finals.items():
        for seed, acc in enumerate(accs):
            _fake_run(reg, f"{arm}_seed={seed}", arm, seed, acc, [0.1, early[arm] + 0.01 * seed, acc])
    sweep.aggregate(str(reg), plot=False)
    (tmp_path / "results" / "other").mkdir()                 # no results.json: passed over
    out = tmp_path / "summary.md"
    assert alpha_summary.main(["--results", str(tmp_path / "results"), "--out", str(out)]) == 0
    row, = json.loads((tmp_path / "summary.json").read_text())
    assert row["regime"] == "toy" and row["best"] == "alpha=0.3"
    assert row["crossover"] == 0.7                           # alpha=0.3 is ahead on 2 seeds, behind on 1
    assert row["ahead"][str(10)] == ["alpha=0.3", "alpha=0.7"] and row["ahead"][str(20)] == []
    assert row["acrl_vs_binary"]["wins"] == 0 and row["acrl_vs_binary"]["losses"] == 3
    md = out.read_text()
    assert "| toy | 75.0 ± 5.0 | 65.0 ± 5.0 | -10.0 ± 8.7 (0–3) | alpha=0.3 (76.0 ± 5.3) |" in md
