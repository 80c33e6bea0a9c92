"""The report page in a real browser: headless Chromium (Debian's package) driven by Selenium.

Runs wherever chromium and chromedriver are installed (``.ci/run`` installs them and sets ACRL_REQUIRE_BROWSER=1,
which turns a missing browser into a failure instead of a skip).
"""

import os
import shutil

import pytest

from app.report.conftest import lines

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
