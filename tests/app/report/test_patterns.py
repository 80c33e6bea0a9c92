import pytest

from acrl.app.report import patterns
from acrl.world import clarification_question, make_problems

# (clarification question, kind): the examples the rule-based classifier is held to
QUESTION_TABLE = [
    ("What is the length of segment AB?", "length"),
    ("How long is side BC in cm?", "length"),
    ("What is the radius of the circle?", "length"),
    ("How many units long is AB?", "length"),
    ("What is the distance from P to the line?", "length"),
    ("how wide is the rectangle ?", "length"),
    ("what is the base of the triangle ?", "length"),
    ("What is the measure of angle ABC?", "angle"),
    ("How many degrees is angle A?", "angle"),
    ("Is ∠1 marked as 40°?", "angle"),
    ("What are the coordinates of point P?", "coordinate/position"),
    ("Is the point at (2, 3) on the line?", "coordinate/position"),
    ("Where is point D located?", "coordinate/position"),
    ("In which quadrant does the vertex lie?", "coordinate/position"),
    ("How many triangles are in the figure?", "count"),
    ("how many red shapes are there ?", "count"),
    ("What is the number of students in the class?", "count"),
    ("What is the label on the vertical line?", "label/text"),
    ("Which letter marks the centre?", "label/text"),
    ("What does the text in the box say?", "label/text"),
    ("What value does the blue bar show for 2019?", "chart value"),
    ("what is the height of the red bar ?", "chart value"),
    ("What is the y-value of the curve at x = 2?", "chart value"),
    ("What percentage does the largest slice of the pie represent?", "chart value"),
    ("What is the value in the second row of the table?", "chart value"),
    ("Is line AB parallel to line CD?", "relation"),
    ("Is AB equal to CD?", "relation"),
    ("Is the circle tangent to the square?", "relation"),
    ("Which is larger than the other?", "relation"),
    ("What color is the circle?", "other"),
    ("Is the figure shaded?", "other"),
]


@pytest.mark.parametrize("question,kind", QUESTION_TABLE)
def test_question_classifier_table(question, kind):
    assert patterns.question_kind(question) == kind


def test_question_kind_of_nothing_is_none_and_every_kind_is_listed():
    assert patterns.question_kind(None) is None and patterns.question_kind("  ") is None
    assert {k for _, k in QUESTION_TABLE} == set(patterns.QUESTION_KINDS)


def test_every_world_fact_has_a_kind():
    keys = {k for p in make_problems("test", 60) for k in p.facts}
    kinds = {patterns.world_fact_kind(clarification_question(k)) for k in keys}
    assert kinds == set(patterns.FACT_KIND_LABELS.values())
    assert patterns.world_fact_kind("what is the weather ?") == patterns.UNRECOGNISED
    assert patterns.world_fact_kind(None) is None


def _ep(asked, q=None, tier="wrong", needed=2, question="", caption=""):
    return {"asked": asked, "clar_q": q, "tier": tier, "needed": needed, "question": question, "caption": caption}


def test_pattern_table_shares_counts_and_examples():
    before = [_ep(True, "how many red shapes are there ?"), _ep(True, "how wide is the rectangle ?"),
              _ep(True, "how many blue shapes are there ?"), _ep(False), _ep(True, "x", tier="failed")]
    after = [_ep(True, "how wide is the rectangle ?"), _ep(False), _ep(False), _ep(False)]
    t = patterns.pattern_table({"pre": before, "post": after}, patterns.world_fact_kind,
                               tuple(patterns.FACT_KIND_LABELS.values()))
    assert t["kinds"] == ["shape count", "rectangle width"]
    assert t["totals"]["pre"] == {"n": 4, "asked": 3, "kinds": {"shape count": 2, "rectangle width": 1}}
    assert t["rows"]["shape count"]["pre"]["share"] == pytest.approx(2 / 3)
    assert t["rows"]["shape count"]["post"] == {"count": 0, "share": 0.0, "per100": 0.0}
    assert t["rows"]["rectangle width"]["post"]["per100"] == pytest.approx(25.0)
    assert t["examples"]["shape count"] == ["how many red shapes are there ?", "how many blue shapes are there ?"]


def test_by_needed_and_front_loaded():
    q = "what is the sum of the red and blue bars ?"
    eps = [_ep(True, needed=1), _ep(False, needed=2, question=q, caption="a bar chart ; the red bar is 3"),
           _ep(True, needed=2, question=q, caption="the red bar is 3 ; the blue bar is 4")]
    nd = patterns.by_needed({"s": eps})
    assert nd["1"]["s"] == {"n": 1, "rate": 1.0} and nd["2"]["s"] == {"n": 2, "rate": 0.5}
    fl = patterns.front_loaded({"s": eps})
    assert fl == {"bar height": {"s": {"needed": 4, "stated": 3, "share": 0.75}}}
