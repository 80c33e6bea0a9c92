import json

from acrl.backends.tiny import TinyCaptioner, TinyVLMConfig
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
