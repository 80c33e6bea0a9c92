import json

from acrl.backends.tiny import TinyCaptioner
from acrl.config import TinyVLMConfig
from acrl.eval.evaluate import evaluate, markdown_table
from acrl.world import make_problems
from acrl.world.reasoner import OracleClarifier, WorldReasoner


class CountingPolicy:
    def __init__(self, inner):
        self.inner, self.captioned = inner, []

    def generate(self, images, prompts, **kw):
        self.captioned += prompts
        return self.inner.generate(images, prompts, **kw)


def test_interrupted_evaluation_resumes_and_skips_finished_items(tmp_path):
    problems = make_problems("test", 10)
    cap = TinyCaptioner.create(TinyVLMConfig(d_model=32, n_heads=2, n_layers=1, cnn_width=8, max_new_tokens=6))
    path = tmp_path / "items.jsonl"
    full, full_items = evaluate(cap, WorldReasoner(), OracleClarifier(problems), problems, batch_size=4,
                                items_path=str(path))
    lines = path.read_text().splitlines()
    assert len(lines) == 10
    # an interruption after 4 items, the last line cut off mid-write, and one item that had failed
    rows = [json.loads(x) for x in lines[:5]]
    rows[1]["failed"] = True
    path.write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n" + lines[4][:20])
    counting = CountingPolicy(cap)
    again, items = evaluate(counting, WorldReasoner(), OracleClarifier(problems), problems, batch_size=4,
                            items_path=str(path))
    assert len(counting.captioned) == 7        # 10 - 3 finished (the failed one and the cut-off line are redone)
    assert [r["id"] for r in items] == [p.id for p in problems]
    assert len(path.read_text().splitlines()) == 10
    assert again["overall"]["n"] == full["overall"]["n"] == 10
    assert "single-pass acc" in markdown_table(again)


class _NoNoneImages:
    """A captioner that fails like a real one on a missing image (``None.size``)."""

    def __init__(self):
        self.calls = 0

    def generate(self, images, prompts, n=1, greedy=True, **kw):
        from types import SimpleNamespace

        self.calls += 1
        return SimpleNamespace(texts=[[f"a {im.size[0]}-pixel-wide drawing"] * n for im in images])


class _AskingReasoner:
    """Asks once when it may, then answers 14 (after a clarification) or 13 (when denied / single pass)."""

    def complete(self, prompts):
        out = []
        for p in prompts:
            if "NEED MORE INFO" in p and "You asked:" not in p:
                out.append("<think>hmm</think>NEED MORE INFO\nHow long is the can?")
            elif "Answer from someone who can see the image:" in p:
                out.append("SOLVED \\boxed{14}")
            else:
                out.append("SOLVED \\boxed{13}")
        return out


class _Clar:
    def __init__(self):
        self.images = []

    def answer(self, images, questions):
        self.images += images
        return ["13 cm" for _ in questions]


def test_items_keep_raw_replies_and_text_only_rows_have_a_defined_path(tmp_path):
    from data.fixtures import mathverse_rows, mathverse_text_only_rows, write_parquet

    from acrl.data import load_benchmark
    from acrl.eval.evaluate import NO_IMAGE_CAPTION, NO_IMAGE_CLARIFICATION

    write_parquet(mathverse_rows()[:2], tmp_path / "testmini.parquet")
    write_parquet(mathverse_text_only_rows(), tmp_path / "testmini_text_only.parquet")
    problems = (load_benchmark("mathverse", tmp_path).problems
                + load_benchmark("mathverse", tmp_path, split="testmini_text_only").problems)
    assert problems[-1].image is None
    policy, clar = _NoNoneImages(), _Clar()
    summary, items = evaluate(policy, _AskingReasoner(), clar, problems, batch_size=3,
                              items_path=str(tmp_path / "out" / "items.jsonl"))
    assert len(items) == 3 and summary["text_only"] == 1 and summary["overall"]["n"] == 3
    text = items[-1]
    assert text["text_only"] and text["caption"] == NO_IMAGE_CAPTION and text["clarification"] == NO_IMAGE_CLARIFICATION
    assert all(im is not None for im in clar.images) and len(clar.images) == 2
    for it in items:
        r = it["replies"]
        assert r["single_pass"] == "SOLVED \\boxed{13}"
        assert r["decision"].startswith("<think>hmm</think>NEED MORE INFO")
        assert r["final"] == "SOLVED \\boxed{14}" and r["denial"] == "SOLVED \\boxed{13}"
        assert it["meta"]["sample_index"] and it["deny_prediction"] == "13"
    saved = [json.loads(x) for x in (tmp_path / "out" / "items.jsonl").read_text().splitlines()]
    assert saved[0]["replies"] == items[0]["replies"] and saved[-1]["text_only"]


def _item(correct, asked, clarified_correct, deny_correct=None, failed=False, caption="a b"):
    return {"id": "x", "family": "f", "category": "c", "needed": 1, "caption": caption, "correct": correct,
            "failed": failed, "malformed": None, "asked": asked, "clarified_correct": clarified_correct,
            "deny_correct": deny_correct}


def test_metric_values_on_a_hand_counted_table():
    """Six live items and one failed one: accuracy 3/6, clarification rate 3/6, accuracy with clarification 4/6,
    gap 1/6, Acc_deny over the asked items that were denied: 1 of 2 (the third ask has no denial recorded)."""
    from acrl.eval.evaluate import group_metrics

    rows = [
        _item(True, False, True),                          # direct, right
        _item(False, False, False),                        # direct, wrong
        _item(False, True, True, deny_correct=False),      # asked: right after the answer, wrong when denied
        _item(True, True, True, deny_correct=True),        # asked: right either way
        _item(False, True, True),                          # asked, no denial recorded
        _item(True, False, False, caption="a b c d"),     # the clarification-enabled pass got it wrong
        _item(True, True, True, deny_correct=True, failed=True),   # a service error: counted, excluded
    ]
    m = group_metrics(rows)
    assert (m["n"], m["failed"]) == (6, 1)
    assert abs(m["accuracy"] - 3 / 6) < 1e-12
    assert abs(m["clarification_rate"] - 3 / 6) < 1e-12
    assert abs(m["accuracy_with_clarification"] - 4 / 6) < 1e-12
    assert abs(m["clarification_gap"] - 1 / 6) < 1e-12
    assert abs(m["acc_deny"] - 1 / 2) < 1e-12
    assert abs(m["caption_words"] - 14 / 6) < 1e-12
    none_denied = group_metrics([_item(True, False, True)])
    assert none_denied["acc_deny"] != none_denied["acc_deny"]      # NaN: no ask was denied
    assert group_metrics([_item(True, True, True, failed=True)]) == {"n": 0, "failed": 1}


# --- the eval command: no stale results, one writer, no silent emptiness, strict JSON -------------------------------

import errno  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402
from conftest import MICRO  # noqa: E402

from acrl.app.cli import main  # noqa: E402


def _eval(capsys, out, *extra):
    rc = main(["eval", "--config", MICRO, "--out", str(out), "--set", "eval.n=4", *map(str, extra)])
    return rc, capsys.readouterr()


def _no_nan(path):
    def refuse(name):
        raise AssertionError(f"{path} holds the non-JSON literal {name}")
    return json.loads(open(path).read(), parse_constant=refuse)


BAD_VALUES = [(["--n", "0"], "--n 0"), (["--n", "-3"], "--n -3"), (["--data", "/tmp"], "--data"),
              (["--limit", "0"], "--limit 0"), (["--max-failed-fraction", "2"], "--max-failed-fraction 2"),
              (["--max-bad-fraction", "-1"], "--max-bad-fraction -1"), (["--resume", "--overwrite"], "contradict")]


@pytest.mark.parametrize("extra, named", BAD_VALUES, ids=[" ".join(e) for e, _ in BAD_VALUES])
def test_eval_bad_values_are_one_line_errors_naming_the_flag(tmp_path, capsys, extra, named):
    """--n 0 / --n -3 silently evaluated the default count or nothing; --data without --benchmark was ignored."""
    rc, io = _eval(capsys, tmp_path / "ev", *extra)
    assert rc == 2 and named in io.err and len(io.err.strip().splitlines()) == 1, io.err
    assert not (tmp_path / "ev" / "summary.json").exists()


def test_eval_into_an_existing_out_never_reports_the_old_items(tmp_path, capsys, micro_captioner):
    """Evaluating another captioner into an --out left the previous items.jsonl in place: the new summary showed
    the old captions."""
    out = tmp_path / "ev"
    assert _eval(capsys, out)[0] == 0                                   # the shipped captioner
    first = [json.loads(x)["caption"] for x in open(out / "items.jsonl")]
    rc, io = _eval(capsys, out, "--captioner", micro_captioner)
    assert rc == 2 and "--resume" in io.err and "--overwrite" in io.err
    rc, io = _eval(capsys, out, "--captioner", micro_captioner, "--resume")
    assert rc == 2 and "differs in: captioner" in io.err
    assert _eval(capsys, out, "--captioner", micro_captioner, "--overwrite")[0] == 0
    fresh = tmp_path / "fresh"
    assert _eval(capsys, fresh, "--captioner", micro_captioner)[0] == 0
    again = [json.loads(x) for x in open(out / "items.jsonl")]
    assert [r["caption"] for r in again] == [json.loads(x)["caption"] for x in open(fresh / "items.jsonl")]
    assert [r["caption"] for r in again] != first
    assert _no_nan(out / "summary.json")["captioner"] == str(micro_captioner)


def test_an_interrupted_eval_resumes_to_the_uninterrupted_result(tmp_path, capsys, monkeypatch):
    from acrl.eval import evaluate as ev

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert _eval(capsys, straight, "--set", "eval.batch_size=2")[0] == 0
    calls, captions = [], ev._captions

    def dies_on_the_second_batch(policy, batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return captions(policy, batch)

    monkeypatch.setattr(ev, "_captions", dies_on_the_second_batch)
    assert _eval(capsys, cut, "--set", "eval.batch_size=2")[0] == 130
    monkeypatch.setattr(ev, "_captions", captions)
    assert len(open(cut / "items.jsonl").readlines()) == 2 and not (cut / "summary.json").exists()
    assert _eval(capsys, cut, "--set", "eval.batch_size=2")[0] == 2           # neither flag: refused
    assert _eval(capsys, cut, "--set", "eval.batch_size=2", "--resume")[0] == 0
    a, b = (_no_nan(d / "summary.json") for d in (straight, cut))
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert open(straight / "items.jsonl").read() == open(cut / "items.jsonl").read()


@pytest.mark.parametrize("fail_rate, rc", [(1.0, 1), (0.85, 1), (0.0, 0)])
def test_an_evaluation_whose_episodes_failed_never_exits_0(tmp_path, capsys, fail_rate, rc):
    """Every request failing, and 14 of 16 episodes failing, both exited 0 with a table of what was left."""
    from acrl.app.serve import WorldBackend, start_server

    server, _, url = start_server(WorldBackend(), fail_rate=fail_rate)
    try:
        got, io = _eval(capsys, tmp_path / "ev", "--set", "reasoner.backend=openai",
                        "--set", f"reasoner.base_url={url}", "--set", "reasoner.max_retries=0")
    finally:
        server.shutdown()
        server.server_close()
    assert got == rc, io.err
    if rc:
        last = io.err.strip().splitlines()[-1]                              # after the progress bar
        assert last.startswith("acrl eval: error:") and "episodes failed" in last and str(tmp_path / "ev") in last
    assert _no_nan(tmp_path / "ev" / "summary.json")["overall"]           # written for reading, strict JSON


def test_eval_full_disk_and_a_second_writer_are_one_line_errors(tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    import acrl

    out = tmp_path / "ev"
    src = os.path.dirname(os.path.dirname(acrl.__file__))
    hold = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]); "
                             "from acrl import outdir; outdir.own(sys.argv[1], 'acrl eval'); print('held', flush=True);"
                             " time.sleep(60)", str(out), src], stdout=subprocess.PIPE, text=True)
    try:
        assert hold.stdout.readline().strip() == "held"
        rc, io = _eval(capsys, out)
        assert rc == 2 and f"in use by pid {hold.pid}" in io.err
    finally:
        hold.kill()
        hold.wait()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    rc, io = _eval(capsys, out)
    assert rc == 1 and "no space left" in io.err.strip().splitlines()[-1], io.err
    assert not (out / "summary.json").exists()                                # no result that looks finished
