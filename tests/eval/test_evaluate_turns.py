"""Evaluation with several clarification turns: the distribution of turns and the accuracy at each."""

import pytest

from acrl.eval.evaluate import evaluate, turn_metrics
from acrl.world import WorldConfig, make_problems
from acrl.world.reasoner import OracleClarifier, WorldReasoner


class FixedCaptioner:
    """Captions that state nothing: the world reasoner must ask for every needed fact."""

    def generate(self, images, prompts, n=1, greedy=True, **kw):
        class R:
            texts = [["a chart."] for _ in images]
        return R()


def test_turns_follow_the_facts_a_question_needs():
    problems = make_problems("test", 40, WorldConfig(families=["bars"], needed_facts={1: 1, 2: 1, 3: 1}, mc_rate=0))
    summary, items = evaluate(FixedCaptioner(), WorldReasoner(), OracleClarifier(problems), problems,
                              max_clarifications=3)
    for it in items:   # one question per missing fact, each answered by the oracle: always right
        assert it["turns"] == it["needed"] and it["clarified_correct"] and len(it["clarifications"]) == it["needed"]
    by = summary["by_turns"]
    assert set(by) == {"1", "2", "3"} and sum(v["fraction"] for v in by.values()) == pytest.approx(1.0)
    assert all(v["accuracy_with_clarification"] == 1.0 for v in by.values())
    one, _ = evaluate(FixedCaptioner(), WorldReasoner(), OracleClarifier(problems), problems)
    assert set(one["by_turns"]) == {"1"}                                   # K=1: one question, then a guess
    n1 = one["by_needed"]["1"]["n"]
    assert one["by_turns"]["1"]["accuracy_with_clarification"] < 1.0 and n1 > 0


def test_turn_metrics_counts_answered_from_the_caption_as_zero_turns():
    rows = [{"failed": False, "asked": False, "clarified_correct": True, "turns": 0},
            {"failed": False, "asked": True, "clarified_correct": False, "turns": 2},
            {"failed": True, "asked": True, "clarified_correct": False, "turns": 0}]
    assert turn_metrics(rows) == {"0": {"n": 1, "fraction": 0.5, "accuracy_with_clarification": 1.0},
                                  "2": {"n": 1, "fraction": 0.5, "accuracy_with_clarification": 0.0}}
