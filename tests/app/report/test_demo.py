"""The demo report (:mod:`acrl.app.report.demo`): the verdict, the held-out tables and the report with its curves."""

from acrl.app.report.demo import regime_table, verdict, write_report


def _summary(acc, clar, needed, family):
    return {"overall": {"accuracy": acc, "clarification_rate": clar, "accuracy_with_clarification": acc + 0.1,
                        "acc_deny": float("nan"), "caption_words": 6.25},
            "by_needed": {k: {"n": 4, "accuracy": v} for k, v in needed.items()},
            "by_family": {k: {"n": 4, "accuracy": v} for k, v in family.items()}}


def _result():
    hist = [{"step": s, "reward": 0.1 * s, "direct_correct": 0.1, "clarification_rate": 0.5, "uniform_frac": u,
             "kl_mean": k, "eval": {"accuracy": 0.4, "clarification_rate": 0.3}}
            for s, u, k in ((1, 0.5, 0.01), (2, 0.25, 0.03))]
    return {"regime": "default",
            "pretrained": _summary(0.40, 0.50, {"1": 0.5, "2": 0.25}, {"bars": 0.4, "tri": 0.375}),
            "binary": _summary(0.45, 0.45, {"1": 0.5, "2": 0.5}, {"bars": 0.5, "tri": 0.375}),
            "acrl": _summary(0.55, 0.30, {"1": 0.75, "2": 0.5}, {"bars": 0.5, "tri": 0.625}),
            "acrl_history": hist, "binary_history": []}


def test_the_verdict_names_the_gain_the_cut_and_the_arm_ahead():
    r = _result()
    text = verdict(r)
    assert "by +15.0 points" in text and "clarification rate by -40% relative" in text
    assert "AC-RL is ahead (55.0% AC-RL vs 45.0% binary)" in text
    r["binary"]["overall"]["accuracy"] = 0.55
    assert "neither is ahead" in verdict(r)


def test_the_regime_table_has_a_row_per_arm_and_the_breakdowns():
    md = regime_table(_result())
    rows = md.splitlines()
    assert rows[2] == "| pretrained (warm start) | 40.0 | 50.0 | 50.0 | – | – | – | 6.2 |"
    assert rows[4] == "| AC-RL (α=0.7) | 55.0 | 30.0 | 65.0 | – | 37.5 | 0.020 | 6.2 |"   # train means
    assert "| captioner | 1 fact(s) (n=4) | 2 fact(s) (n=4) |" in md and "| acrl | 75.0 | 50.0 |" in md
    assert "| captioner | bars | tri |" in md and "| binary | 50.0 | 37.5 |" in md
    r = _result()
    del r["binary"]
    assert "binary" not in regime_table(r)


def test_the_report_links_the_page_and_draws_the_curves(tmp_path):
    cfg = {"train": {"steps": 2, "problems_per_step": 4, "samples_per_problem": 4, "advantage": "bnpo",
                     "lr": 1e-3, "kl_beta": 0.02}, "eval": {"n": 8, "split": "test"}}
    path = write_report([_result()], str(tmp_path), cfg=cfg, minutes=1.25, html="report.html")
    md = open(path).read()
    assert path == str(tmp_path / "report.md") and md.startswith("# acrl demo report\n\nWall time: 1.2 min.")
    assert "Training: 2 steps × 4 problems × 4 captions, advantage `bnpo`" in md and "[report.html](report.html)" in md
    assert "## Regime: default" in md and "![learning curves](curves-default.png)" in md
    assert (tmp_path / "curves-default.png").stat().st_size > 5000
