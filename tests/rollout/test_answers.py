"""Benchmark-aware grading (:mod:`acrl.rollout.answers`): :func:`acrl.data.grade_problem` is
:func:`acrl.rollout.grading.grade` plus the letter-set rule for multi-letter golds and alternative golds.

Two tables: predictions in the answer styles of each benchmark, and whole replies written the way R1-style
(``<think>`` ... then a conclusion) and Qwen-style (step-by-step, then "the answer is" / a box / a closing sentence)
reasoners write them. Problems are built by the loaders' own conversion rules (answer type, option letters,
tolerance)."""

from __future__ import annotations

import pytest

from acrl.data import ImageOptionsProblem, grade_letter_set, grade_problem, prediction_letters
from acrl.problem import Problem
from acrl.rollout.answers import letter_index, letter_set

# --- predictions, by benchmark ------------------------------------------------------------------------------------

SIDE_CHOICES = ["3", "4", "5", "6"]  # MathVista multi_choice, gold "5" -> C
ANGLE_CHOICES = ["50°", "60°", "65°", "90°"]  # MathVerse "Choices:\nA:50°\nB:60°..."
WEMATH_CHOICES = ["9", "10", "11", "12", "No correct answer"]  # WeMath "A. 9; B. 10; ...; E. No correct answer"
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
    ("C", "C", "multiple_choice", SIDE_CHOICES, None, True),
    ("5", "C", "multiple_choice", SIDE_CHOICES, None, True),
    ("(C) 5", "C", "multiple_choice", SIDE_CHOICES, None, True),
    ("4", "C", "multiple_choice", SIDE_CHOICES, None, False),
    ("The answer is (B).", "C", "multiple_choice", SIDE_CHOICES, None, False),
    ("<think>maybe B</think> SOLVED \\boxed{C}", "C", "multiple_choice", SIDE_CHOICES, None, True),
    # --- MathVerse: letter or choice text -------------------------------------------------------------------
    ("C", "C", "multiple_choice", ANGLE_CHOICES, None, True),
    ("65°", "C", "multiple_choice", ANGLE_CHOICES, None, True),
    ("65", "C", "multiple_choice", ANGLE_CHOICES, None, True),
    ("65^\\circ", "C", "multiple_choice", ANGLE_CHOICES, None, True),
    ("C: 65°", "C", "multiple_choice", ANGLE_CHOICES, None, True),
    ("\\boxed{C}", "C", "multiple_choice", ANGLE_CHOICES, None, True),
    ("B", "C", "multiple_choice", ANGLE_CHOICES, None, False),
    ("60°", "C", "multiple_choice", ANGLE_CHOICES, None, False),
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
    ("E", "E", "multiple_choice", WEMATH_CHOICES, None, True),
    ("No correct answer", "E", "multiple_choice", WEMATH_CHOICES, None, True),
    ("E. No correct answer", "E", "multiple_choice", WEMATH_CHOICES, None, True),
    ("A", "E", "multiple_choice", WEMATH_CHOICES, None, False),
    ("11", "C", "multiple_choice", WEMATH_CHOICES, None, True),
    ("12", "C", "multiple_choice", WEMATH_CHOICES, None, False),
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


def test_prediction_table_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("prediction,gold,answer_type,choices,tolerance,expected", CASES)
def test_prediction_table(prediction, gold, answer_type, choices, tolerance, expected):
    assert grade_problem(prediction, make_problem(gold, answer_type, choices, tolerance)) is expected


def test_prediction_letters():
    assert prediction_letters("so \\boxed{C, A}") == ["A", "C"]
    assert prediction_letters("The answer is (B).") == ["B"]
    assert prediction_letters("42") is None and prediction_letters(None) is None

# --- whole replies ------------------------------------------------------------------------------------------------

R1 = "<think>\nOkay, let me look at the description. The figure has ... wait, let me re-check. Yes.\n</think>\n\n"


def P(answer, answer_type="integer", choices=None, tolerance=None, image_options=False, question="q", **meta):
    cls = ImageOptionsProblem if image_options else Problem
    return cls(id="t", image=None, question=question, answer=answer, answer_type=answer_type, choices=choices,
               tolerance=tolerance, meta=meta)


SIDES = P("C", "multiple_choice", ["3", "4", "5", "6"])                       # MathVista multi_choice, gold "5"
MV_FLOAT = P("1.2", "float", tolerance=0.05)                                   # MathVista precision 1
MV_INT = P("12", question="How many bars are taller than 10?")
MV_LIST = P("[1, 2, 3]", "free_form")
ANGLES = P("C", "multiple_choice", ["50°", "60°", "65°", "90°"])              # MathVerse "Choices:\nA:50°..."
VO = P("E", "multiple_choice", ["30°", "45°", "60°", "90°", "120°"], image_options=True)  # Vision Only, recovered
MVERSE_AREA = P("Area $=9 \\pi \\mathrm{cm}^{2}$", "free_form")
MVERSE_INT = P("14")
MVERSE_DEG = P("60^\\circ", "free_form")
MATHV_LATEX = P("2\\sqrt{3}", "free_form")
MATHV_PIC = P("D", "multiple_choice", list("ABCDE"), image_options=True)
MATHV_MC = P("C", "multiple_choice", ["1", "2", "3", "4", "5"])
WEMATH = P("D", "multiple_choice", ["9", "10", "11", "12", "No correct answer"])
DYN_FLOAT = P("2.0944", "float", tolerance=1e-3)
DYN_YN = P("B", "multiple_choice", ["yes", "no"])
DYN_TEXT = P("May", "free_form")
FORCE = P("20", "integer")
SPEED = P("15", "integer")
AREA_CM2 = P("48", "integer")
LV_ONE = P("C", "multiple_choice", list("ABCD"), image_options=True)
LV_SET = P("A, C", "multiple_choice", list("ABCD"), image_options=True, grading="letter_set",
           answer_letters=["A", "C"])
MMMU_MC = P("B", "multiple_choice", ["$6", "$7", "$8", "$9"])
MMMU_OPEN = P("3.43", "float", tolerance=None, accepted_answers=["3.43", "24/7"])
OPT_102 = P("B", "multiple_choice", ["98", "102", "104", "110"])

CORRECT = [
    # MathVista
    (SIDES, "SOLVED \\boxed{C}"),
    (SIDES, R1 + "The shape has five sides, so the answer is (C) 5."),
    (SIDES, "Counting the vertices gives 5.\n\nThe answer is 5."),
    (SIDES, "SOLVED\nThe shape is a pentagon, so it has 5 sides, option C."),
    (SIDES, R1 + "**Final Answer**\n\\[\n\\boxed{C}\n\\]"),
    (SIDES, "<answer>C</answer>"),
    (MV_FLOAT, "SOLVED The length of AB is \\(\\boxed{1.2}\\) cm."),
    (MV_FLOAT, R1 + "Using the Pythagorean theorem, AB = 1.2 cm."),
    (MV_FLOAT, "AB is about 1.23 cm, which rounds to 1.2.\n\nSo the length of AB is 1.2 cm."),
    (MV_FLOAT, "<think>AB^2 = 1.44</think><answer>1.2</answer>"),
    (MV_INT, "Step 1: read the bars.\nStep 2: count those above 10.\nTherefore, 12 bars are taller than 10."),
    (MV_INT, R1 + "There are **12** bars taller than 10."),
    (MV_INT, "SOLVED\nFinal Answer: The final answer is $12$."),
    (MV_INT, "The number of bars taller than 10 is twelve, i.e. 12."),
    (MV_LIST, "SOLVED \\boxed{[1, 2, 3]}"),
    (MV_LIST, R1 + "The x-intercepts are [1, 2, 3]."),
    # MathVerse
    (ANGLES, "SOLVED \\boxed{C}"),
    (ANGLES, "Since AB ∥ CD, ∠2 = 180° - 115° = 65°. The answer is C:65°"),
    (ANGLES, R1 + "Therefore, angle 2 is equal to 65°."),
    (ANGLES, "So ∠2 = 65^\\circ.\n\nAnswer: C"),
    (ANGLES, "SOLVED C:65°"),
    (VO, "SOLVED \\boxed{E}"),
    (VO, R1 + "The angle is 120°, which is option E."),
    (VO, "The reflex part gives 360° - 240° = 120°.\nThus the measure of the angle is 120°."),
    (VO, "SOLVED E:120°"),
    (VO, "SOLVED \\boxed{120}"),
    (MVERSE_AREA, "SOLVED The area is \\boxed{9\\pi} square centimetres."),
    (MVERSE_AREA, R1 + "So the area of the circle is $9\\pi \\text{ cm}^2$."),
    (MVERSE_AREA, "Area = πr² = 9π cm²\n\nThe answer is 9π cm²."),
    (MVERSE_AREA, "SOLVED \\boxed{9\\pi \\, \\mathrm{cm}^2}"),
    (MVERSE_INT, "The longest straw is the space diagonal: √(13² + 6²) ≈ 14.3, so L = 14 cm.\n\nSOLVED \\boxed{14}"),
    (MVERSE_INT, R1 + "Hence L is 14 cm."),
    (MVERSE_INT, "SOLVED\nThe length L of the straw is 14 cm."),
    (MVERSE_DEG, "SOLVED \\boxed{60°}"),
    (MVERSE_DEG, R1 + "So the angle ABC measures 60 degrees."),
    (MVERSE_DEG, "The answer is $60^{\\circ}$."),
    # MathVision
    (MATHV_LATEX, "SOLVED \\boxed{2\\sqrt{3}}"),
    (MATHV_LATEX, R1 + "The diagonal is \\(\\sqrt{12} = 2\\sqrt{3}\\)."),
    (MATHV_LATEX, "Final answer: $\\sqrt{12}$"),
    (MATHV_PIC, "SOLVED \\boxed{D}"),
    (MATHV_PIC, R1 + "Only picture D shows the cube from above, so the answer is (D)."),
    (MATHV_PIC, "Looking at the top view, the correct choice is D."),
    (MATHV_MC, "There are 3 triangles.\n\nThe answer is C."),
    (MATHV_MC, R1 + "\\boxed{3}"),
    (MATHV_MC, "SOLVED Counting gives 3 triangles, so the answer is 3."),
    # WeMath
    (WEMATH, "SOLVED \\boxed{D}"),
    (WEMATH, R1 + "Area = 3 × 4 = 12, so the answer is D. 12"),
    (WEMATH, "The area is 12, option D."),
    (WEMATH, "<answer>D</answer>"),
    (WEMATH, "The area of the rectangle is 12."),
    # DynaMath
    (DYN_FLOAT, "SOLVED \\boxed{2.094}"),
    (DYN_FLOAT, R1 + "The period is 2π/3 ≈ 2.0944."),
    (DYN_FLOAT, "The period T = 2\\pi/3.\n\nThe answer is $\\frac{2\\pi}{3}$."),
    (DYN_YN, "SOLVED \\boxed{B}"),
    (DYN_YN, R1 + "Dark Magenta is smaller, so the answer is no."),
    (DYN_YN, "The answer is (B) no."),
    (DYN_TEXT, "SOLVED \\boxed{May}"),
    (DYN_TEXT, R1 + "The hottest month on average is May."),
    (FORCE, "F = ma = 4 × 5 = 20 N.\n\nSOLVED \\boxed{20 \\text{ N}}"),
    (FORCE, R1 + "So the net force is 20 N."),
    (SPEED, "The speed is \\boxed{15 \\text{ m/s}}."),
    (SPEED, "v = d / t = 15 m/s"),
    (AREA_CM2, "The area is \\boxed{48 \\text{ cm}^2}"),
    (AREA_CM2, R1 + "So the area is 48 cm²."),
    # LogicVista
    (LV_ONE, "SOLVED \\boxed{C}"),
    (LV_ONE, R1 + "The pattern continues with option C."),
    (LV_ONE, "The answer is (C)."),
    (LV_SET, "SOLVED \\boxed{A, C}"),
    (LV_SET, R1 + "The answer is A and C."),
    (LV_SET, "<answer>AC</answer>"),
    # MMMU
    (MMMU_MC, "SOLVED \\boxed{B}"),
    (MMMU_MC, R1 + "The total cost is $7, so the answer is B."),
    (MMMU_MC, "Answer: (B) $7"),
    (MMMU_OPEN, "SOLVED \\boxed{24/7}"),
    (MMMU_OPEN, R1 + "The ratio is 3.43."),
    # an answer followed by its option letter
    (OPT_102, "Adding the two parts gives the total, which is 102, option B"),
    (OPT_102, "SOLVED \\boxed{102 \\text{ (option B)}}"),
]

WRONG = [
    (SIDES, "SOLVED \\boxed{B}"),
    (SIDES, R1 + "The shape has four sides, so the answer is 4."),
    (SIDES, "I think it is option D."),
    (MV_FLOAT, "SOLVED \\boxed{1.3}"),
    (MV_FLOAT, "So the length of AB is 1.5 cm."),
    (MV_INT, "Therefore, 13 bars are taller than 10."),
    (MV_INT, "There are 12 bars in total and 5 are taller than 10, so the answer is 5."),
    (MV_LIST, "The x-intercepts are [1, 3]."),
    (ANGLES, "The answer is B:60°"),
    (ANGLES, R1 + "Therefore, angle 2 is equal to 60°."),
    (VO, "The angle is 90°, which is option D."),
    (MVERSE_AREA, "The area is 6π cm²."),
    (MVERSE_AREA, "SOLVED \\boxed{9}"),
    (MVERSE_INT, "Hence L is 13 cm."),
    (MVERSE_INT, "The can is 13 cm tall and 6 cm wide, so L is about 15 cm."),
    (MVERSE_DEG, "So the angle ABC measures 30 degrees."),
    (MATHV_LATEX, "The diagonal is \\(3\\sqrt{2}\\)."),
    (MATHV_LATEX, "SOLVED \\boxed{\\sqrt{3}}"),
    (MATHV_PIC, "The correct choice is E."),
    (MATHV_MC, "There are 4 triangles."),
    (WEMATH, "The area is 11, option C."),
    (WEMATH, "SOLVED \\boxed{E}"),
    (DYN_FLOAT, "The period is 2.1."),
    (DYN_FLOAT, "SOLVED \\boxed{\\pi}"),
    (DYN_YN, "Dark Magenta is greater, so the answer is yes."),
    (DYN_TEXT, "The hottest month on average is June."),
    (FORCE, "So the net force is 25 N."),
    (SPEED, "v = 30 m/s"),
    (AREA_CM2, "So the area is 24 cm²."),
    (LV_ONE, "The pattern continues with option B."),
    (LV_SET, "The answer is A."),
    (LV_SET, "SOLVED \\boxed{A, B, C}"),
    (MMMU_MC, "The total cost is $8, so the answer is C."),
    (MMMU_OPEN, "The ratio is 3.5."),
    (OPT_102, "Adding the two parts gives 104, option C"),
    (MV_INT, "x = 3, y = 12"),
    (MV_INT, ""),
    (MV_INT, R1.replace("</think>\n\n", "")),   # cut off inside the reasoning
]


@pytest.mark.parametrize("problem,reply", CORRECT)
def test_correct_reply_is_accepted(problem, reply):
    assert grade_problem(reply, problem), reply


@pytest.mark.parametrize("problem,reply", WRONG)
def test_wrong_reply_is_rejected(problem, reply):
    assert not grade_problem(reply, problem), reply


def test_acceptance_rates():
    accepted = sum(grade_problem(r, p) for p, r in CORRECT) / len(CORRECT)
    false_accepts = sum(grade_problem(r, p) for p, r in WRONG)
    assert len(CORRECT) >= 75 and len(WRONG) >= 35
    assert accepted >= 0.98 and false_accepts == 0


def test_a_letter_set_is_exact_whatever_the_spelling_of_the_gold():
    assert grade_letter_set("C and A", ["a", "c"]) and grade_letter_set("(A)(C)", "C, A")
    assert not grade_letter_set("A", ["A", "C"]) and not grade_letter_set(None, ["A", "C"])
    assert not grade_letter_set("A, C", "") and not grade_letter_set("A, C", [])       # no gold: never right


def test_option_letters_alone_and_in_sets():
    assert [letter_index(t) for t in ("B", "(b)", "C.", "D:", " E ")] == [1, 1, 2, 3, 4]
    assert [letter_index(t) for t in ("AB", "", "1", "B)")] == [None, None, None, 1]
    for text in ("A, C", "C, A", "AC", "A and C", "(A)(C)", "A & C", "A+C", "A/C", "(a) (c)"):
        assert letter_set(text) == ["A", "C"], text
    assert [letter_set(t) for t in ("A", "A, A", "", "A, X1", "the answer")] == [None] * 5
