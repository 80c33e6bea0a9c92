"""Answer grading in the answer styles of the benchmarks, through :func:`acrl.data.grade_problem` (which is
:func:`acrl.rollout.grading.grade` plus the letter-set rule for multi-letter golds)."""

from __future__ import annotations

import pytest

from acrl.data import ImageOptionsProblem, grade_problem, prediction_letters
from acrl.data.parsing import letter_set
from acrl.problem import Problem

SIDES = ["3", "4", "5", "6"]  # MathVista multi_choice, gold "5" -> C
ANGLES = ["50°", "60°", "65°", "90°"]  # MathVerse "Choices:\nA:50°\nB:60°..."
WEMATH = ["9", "10", "11", "12", "No correct answer"]  # WeMath "A. 9; B. 10; ...; E. No correct answer"
YES_NO = ["yes", "no"]  # DynaMath "Choices: (A) yes (B) no"
ABCDE = list("ABCDE")  # MathVision options drawn in the picture
ABCD = list("ABCD")  # LogicVista options in the image
LETTER_SET = "letter_set"

# (prediction, gold, answer_type, choices, tolerance, expected)
CASES = [
    # --- MathVista float, precision 1 (tolerance 0.05 == "round to 1 decimal and compare") ------------------
    ("1.2", "1.2", "float", None, 0.05, True),
    ("1.23", "1.2", "float", None, 0.05, True),
    ("1.16", "1.2", "float", None, 0.05, True),
    ("1.3", "1.2", "float", None, 0.05, False),
    ("1.14", "1.2", "float", None, 0.05, False),
    ("\\boxed{1.2} cm", "1.2", "float", None, 0.05, True),
    ("The answer is 1.2 cm.", "1.2", "float", None, 0.05, True),
    ("-1.2", "1.2", "float", None, 0.05, False),
    # --- MathVista float, precision 2 (tolerance 0.005) -----------------------------------------------------
    ("0.25", "0.25", "float", None, 0.005, True),
    ("0.254", "0.25", "float", None, 0.005, True),
    ("0.256", "0.25", "float", None, 0.005, False),
    ("\\frac{1}{4}", "0.25", "float", None, 0.005, True),
    ("0.2", "0.25", "float", None, 0.005, False),
    ("1.46", "1.45", "float", None, 0.005, False),
    # --- MathVista integer / list ---------------------------------------------------------------------------
    ("12", "12", "integer", None, None, True),
    ("12.0", "12", "integer", None, None, True),
    ("1,200", "1200", "integer", None, None, True),
    ("13", "12", "integer", None, None, False),
    ("[1, 2, 3]", "[1, 2, 3]", "free_form", None, None, True),
    ("[1, 3, 2]", "[1, 2, 3]", "free_form", None, None, False),
    # --- MathVista multi_choice: option text stored as its letter -------------------------------------------
    ("C", "C", "multiple_choice", SIDES, None, True),
    ("5", "C", "multiple_choice", SIDES, None, True),
    ("(C) 5", "C", "multiple_choice", SIDES, None, True),
    ("4", "C", "multiple_choice", SIDES, None, False),
    ("The answer is (B).", "C", "multiple_choice", SIDES, None, False),
    ("<think>maybe B</think> SOLVED \\boxed{C}", "C", "multiple_choice", SIDES, None, True),
    # --- MathVerse: letter or choice text -------------------------------------------------------------------
    ("C", "C", "multiple_choice", ANGLES, None, True),
    ("65°", "C", "multiple_choice", ANGLES, None, True),
    ("65", "C", "multiple_choice", ANGLES, None, True),
    ("65^\\circ", "C", "multiple_choice", ANGLES, None, True),
    ("C: 65°", "C", "multiple_choice", ANGLES, None, True),
    ("\\boxed{C}", "C", "multiple_choice", ANGLES, None, True),
    ("B", "C", "multiple_choice", ANGLES, None, False),
    ("60°", "C", "multiple_choice", ANGLES, None, False),
    # --- MathVerse free form --------------------------------------------------------------------------------
    ("14", "14", "integer", None, None, True),
    ("14 cm", "14", "integer", None, None, True),
    ("\\frac{3}{2}", "1.5", "float", None, None, True),
    ("2\\sqrt{3}", "\\sqrt{12}", "free_form", None, None, True),
    ("y = 2x + 1", "y=2x+1", "free_form", None, None, True),
    ("y = 2x - 1", "y=2x+1", "free_form", None, None, False),
    # --- MathVision: letters A-E (options drawn in the picture) ---------------------------------------------
    ("D", "D", "multiple_choice", ABCDE, None, True),
    ("(D)", "D", "multiple_choice", ABCDE, None, True),
    ("Option D", "D", "multiple_choice", ABCDE, None, True),
    ("E", "D", "multiple_choice", ABCDE, None, False),
    ("F", "D", "multiple_choice", ABCDE, None, False),
    # --- MathVision free-form LaTeX -------------------------------------------------------------------------
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", "free_form", None, None, True),
    ("\\sqrt{3}/2", "\\frac{\\sqrt{3}}{2}", "free_form", None, None, True),
    ("0.866", "\\frac{\\sqrt{3}}{2}", "free_form", None, None, False),
    ("2\\pi", "2\\pi", "free_form", None, None, True),
    ("6.28", "2\\pi", "free_form", None, None, False),
    ("\\frac{1}{2}", "0.5", "float", None, None, True),
    ("(1, 2)", "(1,2)", "free_form", None, None, True),
    # --- WeMath letters -------------------------------------------------------------------------------------
    ("E", "E", "multiple_choice", WEMATH, None, True),
    ("No correct answer", "E", "multiple_choice", WEMATH, None, True),
    ("E. No correct answer", "E", "multiple_choice", WEMATH, None, True),
    ("A", "E", "multiple_choice", WEMATH, None, False),
    ("11", "C", "multiple_choice", WEMATH, None, True),
    ("12", "C", "multiple_choice", WEMATH, None, False),
    # --- DynaMath floats (|prediction - answer| <= 0.001), inline choices, text -----------------------------
    ("2.0944", "2.0944", "float", None, 1e-3, True),
    ("2.094", "2.0944", "float", None, 1e-3, True),
    ("2.093", "2.0944", "float", None, 1e-3, False),
    ("2\\pi/3", "2.0944", "float", None, 1e-3, True),
    ("2.1", "2.0944", "float", None, 1e-3, False),
    ("19", "19.0006", "float", None, 1e-3, True),
    ("no", "B", "multiple_choice", YES_NO, None, True),
    ("B", "B", "multiple_choice", YES_NO, None, True),
    ("yes", "B", "multiple_choice", YES_NO, None, False),
    ("May", "May", "free_form", None, None, True),
    ("june", "May", "free_form", None, None, False),
    # --- LogicVista single letter (options in the image) ----------------------------------------------------
    ("C", "C", "multiple_choice", ABCD, None, True),
    ("(C)", "C", "multiple_choice", ABCD, None, True),
    ("D", "C", "multiple_choice", ABCD, None, False),
    # --- LogicVista multi-letter golds: exact set of letters, any order / spelling, no partial credit -------
    ("A, C", "A, C", LETTER_SET, ABCD, None, True),
    ("C, A", "A, C", LETTER_SET, ABCD, None, True),
    ("AC", "A, C", LETTER_SET, ABCD, None, True),
    ("A and C", "A, C", LETTER_SET, ABCD, None, True),
    ("\\boxed{A, C}", "A, C", LETTER_SET, ABCD, None, True),
    ("Options A and C.", "A, C", LETTER_SET, ABCD, None, True),
    ("(A)(C)", "A, C", LETTER_SET, ABCD, None, True),
    ("The answer is B, D", "B, D", LETTER_SET, ABCD, None, True),
    ("A", "A, C", LETTER_SET, ABCD, None, False),
    ("A, B, C", "A, C", LETTER_SET, ABCD, None, False),
    ("ACE", "A, C", LETTER_SET, ABCD, None, False),
    ("", "A, C", LETTER_SET, ABCD, None, False),
]


def make_problem(gold: str, answer_type: str, choices: list[str] | None, tolerance: float | None) -> Problem:
    if answer_type == LETTER_SET:
        return ImageOptionsProblem(
            id="t",
            image=None,
            question="q",
            answer=gold,
            answer_type="multiple_choice",
            choices=choices,
            meta={"grading": "letter_set", "answer_letters": letter_set(gold)},
        )
    return Problem(
        id="t",
        image=None,
        question="q",
        answer=gold,
        answer_type=answer_type,
        choices=choices,
        tolerance=tolerance,
    )


def test_table_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("prediction,gold,answer_type,choices,tolerance,expected", CASES)
def test_grading_table(prediction, gold, answer_type, choices, tolerance, expected):
    assert grade_problem(prediction, make_problem(gold, answer_type, choices, tolerance)) is expected


def test_prediction_letters():
    assert prediction_letters("so \\boxed{C, A}") == ["A", "C"]
    assert prediction_letters("The answer is (B).") == ["B"]
    assert prediction_letters("42") is None and prediction_letters(None) is None


def test_letter_set_without_wrapper_falls_back_to_free_form():
    """Plain acrl.rollout.grading.grade (no letter-set rule) still accepts the canonical spelling."""
    from acrl.rollout.grading import grade

    p = make_problem("A, C", LETTER_SET, ABCD, None)
    assert grade("A, C", p) and grade("C, A", p) and not grade("A", p)
