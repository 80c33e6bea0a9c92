"""The report page (:mod:`acrl.app.report.page`): curves, evaluation tables and clarification patterns from the runs
read, the page and its Markdown patterns written; and the page in a real browser, headless Chromium (Debian's
package) driven by Selenium.

The browser test runs wherever chromium and chromedriver are installed (``.ci/run`` installs them and sets
ACRL_REQUIRE_BROWSER=1, which turns a missing browser into a failure instead of a skip).
"""

import json
import os
import shutil

import pytest
from conftest import lines

from acrl.app.report.page import build_report, curves_data, eval_groups, pattern_sections, patterns_markdown
from acrl.app.report.runs import Run, eval_episode
from acrl.world import make_problem
from app.report.conftest import page_data


def _train_run(label, metrics):
    return Run(label, "p", "train", metrics=metrics)


def _eval_run(label, summary, episodes=()):
    return Run(label, "p", "eval", summary=summary, episodes=list(episodes))


def test_curves_take_every_logged_series_and_leave_gaps():
    metrics = [{"step": 1, "reward": 0.5, "caption_tokens": 7, "time_generation": 1.5, "eval": {"accuracy": 0.4}},
               {"step": 2, "reward": float("nan"), "caption_tokens": 9}]
    got = curves_data([_train_run("a", metrics), _train_run("empty", []), _eval_run("ev", {})])
    (run,) = got["runs"]
    assert run["label"] == "a" and run["steps"] == [1, 2]
    s = run["series"]
    assert s["reward"] == [0.5, None] and s["caption_words"] == [7, 9]        # tokens stand in for words
    assert s["eval.accuracy"] == [0.4, None] and s["time_generation"] == [1.5, None]
    assert "kl_mean" not in s and "time_update" not in s                    # never logged: no empty panel
    assert [p["key"] for p in got["panels"]][:2] == ["reward", "direct_correct"]


def test_evaluations_are_compared_within_their_dataset_against_its_first_run():
    world = {"n": 8, "accuracy": 0.5, "clarification_rate": 0.25, "caption_words": 4.0}
    pre = _eval_run("eval-pretrained", {"overall": world, "by_family": {"bars": {"n": 8, "accuracy": 0.5}},
                                        "by_needed": {"0": {"n": 8, "accuracy": 0.5}}})
    acrl = _eval_run("eval-acrl", {"overall": {**world, "accuracy": 0.625, "caption_words": 5.5},
                                   "by_family": {"bars": {"n": 8, "accuracy": 0.75}}})
    bench = _eval_run("bench", {"overall": {"n": 3, "accuracy": 1.0}, "by_category": {"geometry": {"n": 3}},
                                "by_family": {"mathvista": {"n": 3}}},
                      [{"pid": "mathvista-testmini-1", "family": "mathvista"}])
    groups = {g["name"]: g for g in eval_groups([pre, acrl, bench, _eval_run("nothing", {})])}
    assert list(groups) == ["world", "mathvista"]
    w = groups["world"]
    assert w["baseline"] == "eval-pretrained" and w["runs"] == ["eval-pretrained", "eval-acrl"]
    base, other = (dict(zip(w["head"], row["cells"])) for row in w["overall"])
    assert base["single-pass acc %"] == {"text": "50.0", "delta": None}
    assert other["single-pass acc %"] == {"text": "62.5", "delta": "+12.5"}
    assert other["caption words"] == {"text": "5.5", "delta": "+1.5"} and other["n"] == {"text": "8", "delta": None}
    assert other["Acc_deny %"]["text"] == "–"
    assert [b["title"] for b in w["breakdowns"]] == ["by family"]           # facts needed: all 0, left out
    (row,) = w["breakdowns"][0]["rows"]
    assert row["cells"][1]["acc"] == {"text": "75.0", "delta": "+25.0"}
    assert [b["title"] for b in groups["mathvista"]["breakdowns"]] == ["by benchmark category"]
    assert groups["mathvista"]["chart"]["by"] == "by category"


def _item(p, asked, question=None, correct=False):
    return {"id": p.id, "family": p.family, "needed": len(p.needed), "question": p.question_with_choices(),
            "answer": p.answer, "caption": "a picture", "asked": asked, "clarification_question": question,
            "clarified_correct": correct, "failed": False}


def test_patterns_of_world_evaluations_and_their_markdown():
    p = make_problem("test", 0)
    q = "how many red shapes are there ?"
    eps = [eval_episode(_item(p, True, q, True), "ev"), eval_episode(_item(p, False), "ev")]
    (sec,) = pattern_sections([_eval_run("ev", {}, eps)])
    assert sec["title"] == "evaluation: world" and sec["world"]
    fact, question = sec["tables"]
    assert fact["rows"][0]["kind"] == "shape count" and fact["rows"][0]["cells"] == [{"text": "100.0", "count": 1}]
    assert fact["totals"] == [{"asked": 1, "n": 2}] and fact["rows"][0]["examples"] == [q]
    assert question["collapsed"] and not fact["collapsed"]
    md = patterns_markdown([sec], "From: a test.")
    assert md.startswith("# Clarification patterns\n\nFrom: a test.\n\n## evaluation: world")
    assert "| shape count | 100.0 (1) | `how many red shapes are there ?` |" in md
    assert "ev (1 asked / 2)" in md and "**clarification rate % by facts needed**" in md


def test_the_page_embeds_its_data_and_the_patterns_go_beside_it(tmp_path):
    ev = tmp_path / "runs" / "ev"
    ev.mkdir(parents=True)
    p = make_problem("test", 3)
    (ev / "items.jsonl").write_text(json.dumps(_item(p, True, "what is the height of the red bar ?")) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    path = build_report([str(tmp_path / "runs")], str(out), title="a test page", patterns_md="From: a test.")
    assert path == str(out / "report.html")
    html = (out / "report.html").read_text()
    assert "<title>a test page</title>" in html
    d = page_data(out / "report.html")
    (e,) = d["episodes"]
    assert e["question"] == p.question_with_choices() and e["img"] in d["images"]     # drawn again from its id
    assert e["fact_kind"] == "bar height" and [r["label"] for r in d["runs"]] == ["ev"]
    assert (out / "clarification-patterns.md").read_text().startswith("# Clarification patterns\n\nFrom: a test.")
    with pytest.raises(ValueError, match="no training run"):
        build_report([str(tmp_path / "out")], str(tmp_path / "o2"))


# --- in a browser ------------------------------------------------------------------------------------------------

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1400,1000")
ARMS = ("pretrained", "acrl", "binary")


def _browser():
    found = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
    driver = shutil.which("chromedriver")
    missing = [name for name, p in (("chromium", found), ("chromedriver", driver)) if not p]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        msg = f"the browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("ACRL_REQUIRE_BROWSER"):
            pytest.fail(msg)
        pytest.skip(msg + "; set ACRL_REQUIRE_BROWSER=1 to make this a failure")
    return found, driver


@pytest.fixture
def browser(tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = _browser()
    monkeypatch.setenv("SE_OFFLINE", "true")          # Selenium Manager never downloads anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _expected(demo_dir):
    items = {a: lines(demo_dir / "default" / f"eval-{a}" / "items.jsonl") for a in ARMS}
    train = {a: lines(demo_dir / "default" / a / "episodes.jsonl") for a in ("acrl", "binary")}
    total = sum(map(len, items.values())) + sum(map(len, train.values()))
    clarified = {(f"default/eval-{a}", r["id"]) for a, rows in items.items() for r in rows
                 if r["asked"] and r["clarified_correct"] and not r["failed"]}
    clarified |= {(f"default/{a}", e["problem_id"]) for a, rows in train.items() for e in rows
                  if e["tier"] == "clarified_correct"}
    n_clarified = sum(r["asked"] and r["clarified_correct"] and not r["failed"] for rows in items.values()
                      for r in rows) + sum(e["tier"] == "clarified_correct" for rows in train.values() for e in rows)
    common = set.intersection(*({r["id"] for r in rows} for rows in items.values()))
    return total, clarified, n_clarified, common


def test_report_page_in_chromium(browser, demo_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    total, clarified, n_clarified, common = _expected(demo_dir)
    assert 0 < total <= 100, "the micro demo should fit on one page of the browser"
    assert n_clarified > 0, "the micro demo should have clarified episodes to filter"

    browser.get((demo_dir / "report.html").resolve().as_uri())
    assert "acrl demo" in browser.title
    plots = browser.find_elements(By.CSS_SELECTOR, ".acrl-plot")
    assert len(plots) >= 8          # 6 training curves + 2 held-out curves at least, phases, eval, patterns
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('.acrl-plot')].every(e => e.dataset.rendered || e.dataset.error)"))
    for p in plots:
        assert p.get_attribute("data-error") is None, (p.get_attribute("id"), p.get_attribute("data-error"))
        assert p.find_elements(By.CSS_SELECTOR, "svg.main-svg"), p.get_attribute("id")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    count = browser.find_element(By.ID, "ep-count")
    assert int(count.get_attribute("data-count")) == total
    assert len(browser.find_elements(By.CSS_SELECTOR, "#episodes .episode")) == total

    Select(browser.find_element(By.ID, "f-tier")).select_by_value("clarified_correct")
    cards = browser.find_elements(By.CSS_SELECTOR, "#episodes .episode")
    assert int(count.get_attribute("data-count")) == len(cards) == n_clarified
    assert {c.get_attribute("data-tier") for c in cards} == {"clarified_correct"}
    assert {(c.get_attribute("data-run"), c.get_attribute("data-pid")) for c in cards} == clarified
    Select(browser.find_element(By.ID, "f-tier")).select_by_value("")

    browser.find_element(By.ID, "f-side").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "#sbs .sbs-row")
    assert int(count.get_attribute("data-count")) == len(rows) == len(common)
    for row in rows:
        cells = row.find_elements(By.CSS_SELECTOR, ".episode")
        assert {c.get_attribute("data-pid") for c in cells} == {row.find_element(
            By.CSS_SELECTOR, ".episode").get_attribute("data-pid")}
        assert [c.get_attribute("data-run") for c in cells] == [f"default/eval-{a}" for a in ARMS]
    assert {r.find_element(By.CSS_SELECTOR, ".episode").get_attribute("data-pid") for r in rows} == common

    browser.set_window_size(1400, 2400)
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
    print(f"screenshot: {shot}")
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
