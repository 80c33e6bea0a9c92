"""The world's language (:mod:`acrl.world.language`): what the captioner writes and the world reasoner reads is one
definition, so every fact sentence, clarification question and question template is read back as it was written."""

import random

import pytest

from acrl.world import language as L

KEYS = ["bar.red", "bar.purple", "count.red", "count.blue", "rect.width", "rect.height", "tri.base", "tri.height"]


@pytest.mark.parametrize("key", KEYS)
def test_every_fact_and_its_question_are_read_back(key):
    assert L.parse_facts(L.fact_sentence(key, 7)) == [(key, 7)]
    assert L.parse_clarification_question(L.clarification_question(key)) == key
    assert L.clarification_answer(key, {key: 4}) == L.fact_sentence(key, 4)


def test_facts_are_read_in_order_whatever_the_case_and_number():
    text = ("The Red bar is 7; there is 1 blue shape and the rectangle is 4 wide. the triangle base is 3, the red bar "
            "is -2")
    assert L.parse_facts(text) == [("bar.red", 7), ("count.blue", 1), ("rect.width", 4), ("tri.base", 3),
                                   ("bar.red", -2)]
    assert L.parse_facts("a bar chart with three bars") == []
    assert L.parse_clarification_question("What's the weather?") is None
    assert L.parse_clarification_question("Could you tell me: how tall is the rectangle?") == "rect.height"


def test_statements_split_on_separators_but_not_inside_a_number():
    assert L.split_statements("a chart ; the red bar is 3.5. the blue bar is 2\nmore ;") == [
        "a chart", "the red bar is 3.5", "the blue bar is 2", "more"]


def test_every_template_is_matched_with_the_facts_it_needs():
    for t in L.TEMPLATES:
        slots = {"c1": "red", "c2": "blue", "c3": "green", "c4": "purple"}
        got = L.match_question(t.text.format(**slots).upper() + "\nChoices:\n(A) 3\n(B) 4")
        assert got == (t, [f.format(**slots) for f in t.facts]), t.text
    assert L.match_question("what is the colour of the sky ?") is None


@pytest.mark.parametrize("op, values, result", [
    ("first", [3, 9], 3), ("sum", [1, 2, 3], 6), ("diff", [7, 2], 5), ("product", [3, 4], 12),
    ("perimeter", [3, 4], 14), ("half_product", [3, 5], 7.5),
])
def test_the_operations_of_the_templates(op, values, result):
    assert L.apply_op(op, values) == result


def test_an_unknown_operation_and_number_formats():
    with pytest.raises(ValueError, match="unknown op 'mean'"):
        L.apply_op("mean", [1])
    assert [L.format_number(x) for x in (3.0, 2.5, 7, -1.0)] == ["3", "2.5", "7", "-1"]
    assert [L.guess_value(k) for k in ("bar.red", "count.red", "rect.width", "tri.base")] == [5, 3, 4, 4]


def test_remarks_name_no_quantity():
    assert L.remarks("bars", {"bar.red": 3, "bar.blue": 3, "bar.green": 1}, {}) == ["the green bar is the shortest"]
    assert L.remarks("bars", {"bar.red": 2, "bar.blue": 2}, {}) == ["the bars are of similar height"]
    assert L.remarks("shapes", {"count.red": 2, "count.blue": 2}, {"kinds": ["square"] * 3 + ["circle"]}) == [
        "the colours are balanced", "most shapes are squares"]
    assert L.remarks("rect", {"rect.width": 3, "rect.height": 3}, {}) == ["it is a square"]
    assert L.remarks("tri", {"tri.base": 2, "tri.height": 5}, {})[1] == "the height is longer than the base"
    with pytest.raises(ValueError):
        L.remarks("pie", {}, {})


def test_a_human_caption_states_each_fact_at_its_rate_and_the_oracle_states_all():
    facts, scene = {"rect.width": 4, "rect.height": 2}, {"colour": "orange"}
    every = L.human_caption("rect", facts, scene, random.Random(0), fact_rate=1.0)
    assert every.startswith("an orange rectangle drawn on a grid ; ") and dict(L.parse_facts(every)) == facts
    assert "it is wider than it is tall" in every
    assert L.parse_facts(L.human_caption("rect", facts, scene, random.Random(0), fact_rate=0.0)) == []
    oracle = L.oracle_caption("bars", {"bar.red": 3, "bar.blue": 5}, {"order": ["blue", "red"]})
    assert oracle == "a bar chart with two bars ; the red bar is 3 ; the blue bar is 5"
