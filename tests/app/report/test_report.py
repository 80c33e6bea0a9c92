"""``acrl report`` (:mod:`acrl.app.report`): the page of train, eval, demo and benchmark outputs; clear errors; a
full disk keeps the previous page."""

import errno
import json
import os
import re

from conftest import MICRO, lines, run_cli

from acrl.app.cli import main
from app.report.conftest import page_data


def _no_network(html: str) -> None:
    """Nothing on the page is fetched: no external scripts, styles, images or frames."""
    assert not re.search(r'<(?:script|img|iframe|link)[^>]+(?:src|href)\s*=\s*["\']?(?:https?:)?//', html, re.I)
    assert "<script src" not in html


def test_demo_writes_the_page_beside_report_md(demo_dir):
    page = demo_dir / "report.html"
    html = page.read_text()
    _no_network(html)
    assert "Plotly" in html and "report.html" in (demo_dir / "report.md").read_text()
    data = page_data(page)
    runs = {r["label"]: r["kind"] for r in data["runs"]}
    assert runs == {"default/acrl": "train", "default/binary": "train", "default/eval-pretrained": "eval",
                    "default/eval-acrl": "eval", "default/eval-binary": "eval"}
    n_items = sum(len(lines(demo_dir / "default" / f"eval-{a}" / "items.jsonl")) for a in ("pretrained", "acrl",
                                                                                            "binary"))
    n_train = sum(len(lines(demo_dir / "default" / a / "episodes.jsonl")) for a in ("acrl", "binary"))
    assert len(data["episodes"]) == n_items + n_train
    # every world problem's image is drawn again from its id and embedded once
    assert all(e["img"] and data["images"][e["img"]].startswith("data:image/png;base64,") for e in data["episodes"])
    train = [e for e in data["episodes"] if e["source"] == "train"]
    assert all(e["question"] and e["gold"] is not None and e["family"] for e in train)
    assert {len(c["steps"]) for c in data["curves"]["runs"]} == {3}
    md = (demo_dir / "clarification-patterns.md").read_text()
    assert "default/eval-pretrained" in md and "by fact kind" in md and "question kind" in md


def test_report_on_train_eval_and_benchmark_outputs(tmp_path, demo_dir):
    from data.fixtures import mathvista_rows, write_parquet

    run_cli("report", demo_dir / "default" / "acrl", "--out", tmp_path / "train")
    d = page_data(tmp_path / "train" / "report.html")
    assert [r["kind"] for r in d["runs"]] == ["train"] and d["curves"]["runs"][0]["series"]["reward"]
    run_cli("report", demo_dir / "default" / "eval-pretrained", demo_dir / "default" / "eval-acrl",
            "--out", tmp_path / "two")
    d = page_data(tmp_path / "two" / "report.html")
    assert [r["label"] for r in d["runs"]] == ["eval-pretrained", "eval-acrl"]
    html = (tmp_path / "two" / "report.html").read_text()
    assert "baseline: eval-pretrained" in html

    write_parquet(mathvista_rows(), tmp_path / "mv" / "data" / "testmini-00000-of-00001.parquet")
    run_cli("eval", "--config", MICRO, "--benchmark", "mathvista", "--data", tmp_path / "mv", "--out",
            tmp_path / "bench")
    run_cli("report", tmp_path / "bench", demo_dir, "--out", tmp_path / "all")
    d = page_data(tmp_path / "all" / "report.html")
    bench = [e for e in d["episodes"] if e["run"] == "bench"]
    assert bench and len(bench) == len(lines(tmp_path / "bench" / "items.jsonl"))
    # benchmark images come from the evaluation's data path (JPEG thumbnails or small PNGs)
    assert all(e["img"] and d["images"][e["img"]].startswith("data:image/") for e in bench)
    html = (tmp_path / "all" / "report.html").read_text()
    assert "mathvista — baseline: bench" in html and "world — baseline: demo" in html


def test_report_of_a_directory_without_runs_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    p = run_cli("report", tmp_path / "empty", "--out", tmp_path / "out", check=False)
    assert p.returncode == 2 and "empty" in p.stderr and "no training run" in p.stderr
    p = run_cli("report", tmp_path / "missing", "--out", tmp_path / "out", check=False)
    assert p.returncode == 2 and "missing" in p.stderr


def test_unknown_fields_and_a_cut_off_line_are_shown_and_counted(tmp_path):
    ev = tmp_path / "ev"
    ev.mkdir()
    item = {"id": "world-test-0000000", "family": "shapes", "category": "shapes/1-fact", "needed": 1,
            "question": "how many blue shapes are there ?", "answer": "3", "caption": "a picture",
            "prediction": "2", "correct": False, "failed": False, "malformed": None, "asked": True,
            "clarification_question": "how many blue shapes are there ?", "clarification": "there are 3 blue shapes",
            "clarified_prediction": "3", "clarified_correct": True, "deny_correct": False,
            "replies": ["NEED MORE INFO\nhow many blue shapes are there ?", "SOLVED \\boxed{3}"],
            "single_pass_reply": "SOLVED \\boxed{2}", "latency_s": 0.5}
    (ev / "items.jsonl").write_text(json.dumps(item) + "\n" + '{"id": "world-test-00')
    run_cli("report", ev, "--out", tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    d = page_data(tmp_path / "out" / "report.html")
    (e,) = d["episodes"]
    assert e["tier"] == "clarified_correct" and e["reward"] == 0.7 and e["fact_kind"] == "shape count"
    assert e["replies"] == [{"label": "turn 1", "text": item["replies"][0]}, {"label": "turn 2", "text": item[
        "replies"][1]}, {"label": "single_pass_reply", "text": "SOLVED \\boxed{2}"}]
    assert e["extra"] == {"latency_s": 0.5}
    assert e["img"] in d["images"]           # the default world draws this problem again
    assert "1 unreadable JSONL line(s) skipped" in html


def test_report_on_a_full_disk_keeps_the_previous_page(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.html").write_text("<html>previous</html>")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    rc = main([str(a) for a in ("report", tmp_path / "nothing-here", "--out", out)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert (out / "report.html").read_text() == "<html>previous</html>"
