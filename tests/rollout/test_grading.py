"""Tests for answer extraction and grading (`acrl.rollout.grading`)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from acrl.problem import Problem
from acrl.rollout.grading import extract_answer, extract_boxed, grade, grade_answer, parse_number, strip_think

ABCD = ["3", "4", "5", "6"]
SHAPES = ["triangle", "square", "circle", "a regular hexagon"]
FRACS = ["\\frac{1}{2}", "$\\frac{3}{4}$", "2", "\\sqrt{2}"]

# (prediction, gold, answer_type, choices, tolerance, expected)
GRADE_CASES = [
    # --- integer -------------------------------------------------------------------------------------------
    ("7", "7", "integer", None, None, True),
    ("7.0", "7", "integer", None, None, True),
    ("7.5", "7", "integer", None, None, False),
    ("1,000", "1000", "integer", None, None, True),
    ("1,5", "15", "integer", None, None, False),
    ("7 units", "7", "integer", None, None, True),
    ("7 cm", "7", "integer", None, None, True),
    ("x = 7", "7", "integer", None, None, True),
    ("\u22123", "-3", "integer", None, None, True),
    ("-3", "3", "integer", None, None, False),
    ("3 or 4", "3", "integer", None, None, False),
    ("x = 3, y = 4", "4", "integer", None, None, False),
    ("\\text{12 apples}", "12", "integer", None, None, True),
    ("$\\boxed{42}$", "42", "integer", None, None, True),
    ("12", "13", "integer", None, 1, True),
    ("12", "14", "integer", None, 1, False),
    ("2 \\pi", "6", "integer", None, None, False),
    ("(-3)", "-3", "integer", None, None, True),
    ("30^\\circ", "30", "integer", None, None, True),
    ("1.2 \\times 10^{3}", "1200", "integer", None, None, True),
    # --- float ---------------------------------------------------------------------------------------------
    ("\\frac{15}{2}", "7.5", "float", None, None, True),
    ("\\dfrac{15}{2}", "7.50", "float", None, None, True),
    ("7.50", "7.5", "float", None, None, True),
    ("7.5000001", "7.5", "float", None, None, True),
    ("7.51", "7.5", "float", None, None, False),
    ("3\\%", "3", "float", None, None, True),
    ("50%", "0.5", "float", None, None, True),
    ("0.5", "50\\%", "float", None, None, True),
    ("0.3", "30", "float", None, None, False),
    ("2\\sqrt{2}", "2.828427", "float", None, None, True),
    ("2.83", "2.828", "float", None, 0.01, True),
    ("2.85", "2.828", "float", None, 0.01, False),
    ("0.4", "0.3", "float", None, 0.1, True),
    ("-\\frac{1}{4}", "-0.25", "float", None, None, True),
    ("1e-3", "0.001", "float", None, None, True),
    ("\\pi/4", "0.785398", "float", None, 1e-5, True),
    ("about seven", "7", "float", None, None, False),
    # --- multiple choice -----------------------------------------------------------------------------------
    ("B", "B", "multiple_choice", ABCD, None, True),
    ("(B)", "B", "multiple_choice", ABCD, None, True),
    ("B)", "B", "multiple_choice", ABCD, None, True),
    ("B.", "B", "multiple_choice", ABCD, None, True),
    ("Option B", "B", "multiple_choice", ABCD, None, True),
    ("\\text{B}", "B", "multiple_choice", ABCD, None, True),
    ("B: 4", "B", "multiple_choice", ABCD, None, True),
    ("(B) 4", "B", "multiple_choice", ABCD, None, True),
    ("4", "B", "multiple_choice", ABCD, None, True),
    ("4.0", "B", "multiple_choice", ABCD, None, True),
    ("C", "B", "multiple_choice", ABCD, None, False),
    ("(A) 3", "B", "multiple_choice", ABCD, None, False),
    ("5", "B", "multiple_choice", ABCD, None, False),
    ("Square.", "B", "multiple_choice", SHAPES, None, True),
    ("  SQUARE ", "square", "multiple_choice", SHAPES, None, True),
    ("circle", "B", "multiple_choice", SHAPES, None, False),
    ("A regular hexagon", "D", "multiple_choice", SHAPES, None, True),
    ("A square is what I see", "B", "multiple_choice", SHAPES, None, False),
    ("A square is what I see", "A", "multiple_choice", SHAPES, None, False),
    ("E", "B", "multiple_choice", ABCD, None, False),
    ("0.75", "B", "multiple_choice", FRACS, None, True),
    ("\\sqrt{2}", "D", "multiple_choice", FRACS, None, True),
    ("1/2", "B", "multiple_choice", FRACS, None, False),
    ("The answer is C.", "C", "multiple_choice", ABCD, None, True),
    # --- free form -----------------------------------------------------------------------------------------
    ("0.5", "\\frac{1}{2}", "free_form", None, None, True),
    ("\\sqrt{8}", "2\\sqrt{2}", "free_form", None, None, True),
    ("x=3", "3", "free_form", None, None, True),
    ("\\pi/2", "\\frac{\\pi}{2}", "free_form", None, None, True),
    ("pi/2", "\\frac{\\pi}{2}", "free_form", None, None, True),
    ("[1, 2)", "[1,2)", "free_form", None, None, True),
    ("[1,2]", "(1,2]", "free_form", None, None, False),
    ("\\{3, 2, 1\\}", "\\{1,2,3\\}", "free_form", None, None, True),
    ("(x+1)^2", "x^2+2x+1", "free_form", None, None, True),
    ("Yes.", "yes", "free_form", None, None, True),
    ("\\text{Yes}", "yes", "free_form", None, None, True),
    ("no", "yes", "free_form", None, None, False),
    ("seat", "east", "free_form", None, None, False),
    ("on", "no", "free_form", None, None, False),
    ("x=4", "3", "free_form", None, None, False),
    ("\\frac{1}{3}", "0.33", "free_form", None, None, False),
    ("sqrt(2)/2", "\\frac{1}{\\sqrt{2}}", "free_form", None, None, True),
    ("infinity", "\\infty", "free_form", None, None, True),
    ("3, 4", "3", "free_form", None, None, False),
]


@pytest.mark.parametrize(("prediction", "gold", "answer_type", "choices", "tolerance", "expected"), GRADE_CASES)
def test_grade_answer_table(prediction, gold, answer_type, choices, tolerance, expected):
    assert grade_answer(prediction, gold, answer_type, choices, tolerance) is expected


def test_table_has_enough_cases():
    assert len(GRADE_CASES) >= 45
    assert sum(1 for case in GRADE_CASES if case[-1] is False) >= 15


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{5}", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{a_{1} + \\frac{b^{2}}{c}}", "a_{1} + \\frac{b^{2}}{c}"),
        ("first \\boxed{3}, later \\boxed{4}", "4"),
        ("\\fbox{7}", "7"),
        ("thus $\\boxed 5$.", "5"),
        ("\\boxed{\\boxed{9}}", "9"),
        ("\\boxed{\\text{B}}", "\\text{B}"),
        ("\\boxed{2} and then \\boxed{3", "2"),
        ("no box here", None),
        ("", None),
        ("\\boxedx{3}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>maybe \\boxed{3}</think>The final answer is \\boxed{4}.", "4"),
        ("<think>maybe \\boxed{3}</think>Answer: 4", "4"),
        ("I first guessed \\boxed{3}, hmm.</think> So \\boxed{5}", "5"),
        ("<think>long reasoning \\boxed{3} that was cut off", None),
        ("The answer is 12.", "12"),
        ("Some work.\nAnswer: B", "B"),
        ("**Final Answer:** $\\frac{1}{2}$", "\\frac{1}{2}"),
        ("the answer is 3.5. That is all.", "3.5"),
        ("Answer: 1\nWait, recheck.\nThe answer is 2", "2"),
        ("The final answer is: (C)", "(C)"),
        ("I have no idea.", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_strip_think():
    assert strip_think("<think>a</think>b<think>c</think>d").strip() == "b d"
    assert strip_think("reasoning</think>final") == "final"
    assert strip_think("final <think>unfinished") == "final "


def test_grade_answer_uses_completion_extraction():
    completion = "<think>Could it be \\boxed{3}? No.</think>Counting again gives \\boxed{4}."
    assert grade_answer(completion, "4", "integer")
    assert not grade_answer(completion, "3", "integer")
    assert not grade_answer("<think>\\boxed{4} but I ran out of", "4", "integer")


@pytest.mark.parametrize(
    ("text", "value", "pct"),
    [
        ("1,000", 1000, False),
        ("\\frac{15}{2}", 7.5, False),
        ("\\frac12", 0.5, False),
        ("-7.50 cm", -7.5, False),
        ("3\\%", 3, True),
        ("x = 7", 7, False),
        ("\u22123", -3, False),
    ],
)
def test_parse_number(text, value, pct):
    parsed = parse_number(text)
    assert parsed is not None
    assert float(parsed[0]) == pytest.approx(value)
    assert parsed[1] is pct


@pytest.mark.parametrize("text", ["2\\sqrt{2}", "3 or 4", "B", "7 x", "2 pi", "", "1,5"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


@pytest.mark.parametrize(
    "prediction",
    [
        None,
        "",
        "   ",
        "\\frac{",
        "}}}{",
        "\\boxed{",
        "\\left( \\right]",
        "((((((((((((((((((((",
        "9^{9^{9^{9}}}",
        "10^{10^{10}}",
        "(1000000)!",
        "1" * 20000,
        "\\frac{1}{0}",
        "x" * 200_000,
        "\\boxed{" * 500 + "}" * 499,
        "<think>" * 100,
        "\x00\x01\ufffd",
    ],
)
@pytest.mark.parametrize("answer_type", ["integer", "float", "multiple_choice", "free_form"])
def test_grade_answer_never_raises_on_garbage(prediction, answer_type):
    choices = ABCD if answer_type == "multiple_choice" else None
    start = time.perf_counter()
    assert grade_answer(prediction, "B" if choices else "5", answer_type, choices) is False
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(("gold", "answer_type"), [("\\frac{", "free_form"), ("", "integer"), ("}}{", "float")])
def test_grade_answer_garbage_gold(gold, answer_type):
    assert grade_answer("5", gold, answer_type) is False


def test_grade_answer_bad_arguments_do_not_raise():
    assert grade_answer("5", "5", "no_such_type") is True
    assert grade_answer("5", "5", "integer", tolerance=float("nan")) is True
    assert grade_answer(5, "5", "integer") is True  # type: ignore[arg-type]
    assert grade_answer("B", "B", "multiple_choice", None) is True


def test_grade_with_problem():
    p = Problem(id="t-1", image=None, question="How many?", answer="B", answer_type="multiple_choice",
                choices=["two", "three"])
    assert grade("Answer: (B)", p)
    assert grade("three", p)
    assert not grade("two", p)
    q = Problem(id="t-2", image=None, question="Length?", answer="2.5", answer_type="float", tolerance=0.05)
    assert grade("\\boxed{2.54 cm}", q)
    assert not grade("\\boxed{2.6}", q)


def test_grading_in_worker_threads():
    cases = [(c[0], c[1], c[2], c[3], c[4]) for c in GRADE_CASES]
    expected = [c[-1] for c in GRADE_CASES]
    main_ident = threading.get_ident()

    def run(case):
        assert threading.get_ident() != main_ident
        return grade_answer(*case)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, cases))
    assert results == expected


def test_letter_set_without_wrapper_falls_back_to_free_form():
    """Plain acrl.rollout.grading.grade (no letter-set rule) still accepts the canonical spelling."""
    from acrl.data import ImageOptionsProblem

    p = ImageOptionsProblem(id="t", image=None, question="q", answer="A, C", answer_type="multiple_choice",
                            choices=list("ABCD"), meta={"grading": "letter_set", "answer_letters": ["A", "C"]})
    assert grade("A, C", p) and grade("C, A", p) and not grade("A", p)
