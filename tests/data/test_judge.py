from acrl.data.judge import judge_items, parse_verdict
from acrl.problem import Problem


class ScriptedJudge:
    def __init__(self, replies):
        self.replies, self.prompts = replies, []

    def complete(self, prompts):
        self.prompts += prompts
        return self.replies[: len(prompts)]


def _p(i, t="free_form", ans="x^2+1"):
    return Problem(id=f"p{i}", image=None, question="Simplify.", answer=ans, answer_type=t,
                   choices=["1", "2"] if t == "multiple_choice" else None)


def test_only_free_form_rule_misses_are_judged_and_reported_separately():
    problems = {p.id: p for p in [_p(0), _p(1), _p(2), _p(3, "multiple_choice", "A"), _p(4), _p(5)]}
    items = [
        {"id": "p0", "correct": True, "prediction": "x^2+1"},
        {"id": "p1", "correct": False, "prediction": "1 + x squared"},
        {"id": "p2", "correct": False, "prediction": "x+1"},
        {"id": "p3", "correct": False, "prediction": "B"},
        {"id": "p4", "correct": False, "prediction": ""},
        {"id": "p5", "correct": False, "prediction": "hmm", "failed": True},
    ]
    judge = ScriptedJudge(["Yes, they are equal. YES", RuntimeError("HTTP 500")])
    stats = judge_items(items, problems, judge)
    assert len(judge.prompts) == 2 and "1 + x squared" in judge.prompts[0]
    assert stats == {"judged": 2, "overturned": 1, "unclear": 1, "accuracy_judged": 2 / 5}
    assert [it["judge_correct"] for it in items[:5]] == [True, True, False, False, False]
    assert [it["correct"] for it in items[:3]] == [True, False, False]   # the rule verdict is untouched
    assert "HTTP 500" in items[2]["judge_reply"]


def test_parse_verdict():
    assert parse_verdict("YES") is True
    assert parse_verdict("no.") is False
    assert parse_verdict("I think... no wait, yes") is True
    assert parse_verdict("maybe") is None
    assert parse_verdict(ValueError("x")) is None
