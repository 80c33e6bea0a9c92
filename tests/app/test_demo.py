"""``acrl demo`` (:mod:`acrl.app.demo`): the whole pipeline on a micro budget, the regimes' configs, the results
summary, and the README's results table (what `make demo` wrote: its numbers equal the committed
docs/demo-results)."""

import json
import os
import re

import pytest
from conftest import ROOT, lines

from acrl.app.demo import REGIMES, _apply, _summary
from acrl.config import Config, to_dict

ROWS = {"pretrained": "pretrained", "binary-reward RL (α = 0)": "binary", "AC-RL (α = 0.7)": "acrl"}


def _readme_rows() -> dict:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = text.split("<!-- demo-results: docs/demo-results/results.json -->", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        rows[ROWS[cells[0]]] = cells[1:]
    return rows


def test_demo_pipeline_on_a_micro_budget(demo_dir):
    """The whole `acrl demo` pipeline (shipped captioner, both arms, report) on a tiny budget."""
    tmp_path = demo_dir
    report = (tmp_path / "report.md").read_text()
    assert "AC-RL" in report and "binary" in report and "single-pass" in report
    assert (tmp_path / "curves-default.png").stat().st_size > 5000
    for arm in ("pretrained", "acrl", "binary"):
        s = json.load(open(tmp_path / "default" / f"eval-{arm}" / "summary.json"))
        assert s["overall"]["n"] == 8
    hist = lines(tmp_path / "default" / "acrl" / "metrics.jsonl")
    assert [h["step"] for h in hist] == [1, 2, 3] and "eval" in hist[1]
    assert (tmp_path / "world" / "contact_sheet.png").exists()


def test_a_regime_changes_only_its_sections_and_is_checked():
    cfg = Config()
    sparse = _apply(cfg, REGIMES["sparse-3fact"])
    assert sparse.world.families == ["bars"] and sparse.world.needed_facts == {3: 1.0}
    assert to_dict(sparse)["train"] == to_dict(cfg)["train"] and sparse.world.n_bars == cfg.world.n_bars
    assert _apply(cfg, REGIMES["noisy-clarifier"]).train.clarifier_noise == 0.3 and cfg.train.clarifier_noise == 0
    with pytest.raises(ValueError, match="train.alpha"):
        _apply(cfg, {"train": {"alpha": 2.0}})


def test_the_summary_keeps_the_evaluations_and_the_training_means():
    hist = [{"step": 1, "uniform_frac": 0.5, "kl_mean": 0.01}, {"step": 2, "uniform_frac": 0.25, "kl_mean": 0.03}]
    r = {"regime": "default", "pretrained": {"overall": {"accuracy": 0.5}}, "acrl": {"overall": {"accuracy": 0.6}},
         "acrl_history": hist, "binary_history": []}
    s = _summary(r)
    assert not any(k.endswith("_history") for k in s) and s["acrl"] == r["acrl"] and s["regime"] == "default"
    assert s["acrl_train"] == pytest.approx({"uniform_frac": 0.375, "kl_mean": 0.02})
    assert s["binary_train"] == {"uniform_frac": None, "kl_mean": None}       # the README then shows "–"


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
