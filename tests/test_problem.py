"""The ``Problem`` record (:mod:`acrl.problem`): checked when made, its question as the reasoner reads it, its JSON
view."""

import json

import pytest
from PIL import Image

from acrl.problem import ANSWER_TYPES, Problem


def test_a_problem_is_checked_when_made():
    with pytest.raises(ValueError, match="problem 'p1': answer_type 'number' not in"):
        Problem(id="p1", image=None, question="q", answer="3", answer_type="number")
    with pytest.raises(ValueError, match="problem 'p2': multiple_choice needs choices"):
        Problem(id="p2", image=None, question="q", answer="A", answer_type="multiple_choice")
    made = [Problem(id="p", image=None, question="q", answer="A", answer_type=t, choices=["x"]) for t in ANSWER_TYPES]
    assert [p.answer_type for p in made] == ["integer", "float", "multiple_choice", "free_form"]


def test_the_options_of_a_multiple_choice_question_are_lettered_lines():
    p = Problem(id="p", image=None, question="Which is largest?", answer="B", answer_type="multiple_choice",
                choices=["3", "4.5", "x^2"])
    assert p.question_with_choices() == "Which is largest?\nChoices:\n(A) 3\n(B) 4.5\n(C) x^2"
    assert Problem(id="p", image=None, question="How many?", answer="3").question_with_choices() == "How many?"


def test_the_json_view_has_every_field_but_the_image():
    p = Problem(id="p", image=Image.new("RGB", (4, 4)), question="q", answer="2.5", answer_type="float",
                tolerance=0.05, facts={"bar.red": 2}, needed=["bar.red"], family="bars", meta={"op": "first"})
    view = p.to_json()
    assert "image" not in view and json.loads(json.dumps(view)) == view
    assert view == {"id": "p", "question": "q", "answer": "2.5", "answer_type": "float", "choices": None,
                    "tolerance": 0.05, "facts": {"bar.red": 2}, "needed": ["bar.red"], "family": "bars",
                    "category": "", "difficulty": "", "source": "", "meta": {"op": "first"}}
