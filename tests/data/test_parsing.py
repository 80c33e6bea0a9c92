"""The loaders' text helpers (:mod:`acrl.data.parsing`): cells as text and lists, image placeholder tags, boxed golds,
answer types, MathVista's precision as a tolerance, option letters and option lists written into a question."""

import numpy as np
import pytest

from acrl.data.parsing import (
    ImageOptionsProblem,
    answer_type_of,
    as_list,
    as_text,
    parse_lettered,
    precision_tolerance,
    split_choices,
    strip_image_tags,
    unwrap_boxed,
)


def test_cells_as_text_and_as_lists():
    assert [as_text(v) for v in (None, float("nan"), 3.0, 2.5, "  x ")] == ["", "", "3", "2.5", "x"]
    assert as_list("['a', 'b']") == ["a", "b"] and as_list('["a", "b"]') == ["a", "b"] and as_list("(1, 2)") == [1, 2]
    assert as_list(np.array([1, 2])) == [1, 2] and as_list(("a",)) == ["a"]
    assert [as_list(v) for v in (None, "", "abc", "[1,", '{"a": 1}', 5)] == [None] * 6


@pytest.mark.parametrize("text, expected", [
    ("<image>\nWhat is x?", "What is x?"),                                   # a tag on its own line
    ("Find x. <image1>", "Find x."),                                        # at the end
    ("As shown in <image1>, find x.", "As shown in the image, find x."),    # inside a sentence
    ("In the figure <image2>, AB = 3.", "In the figure, AB = 3."),          # after a word naming it
    ("Compare <image 1> and <image 2>.", "Compare <image 1> and <image 2>."),   # MMMU's references stay
    ("Q?\n<image>\n\n\n\nChoices: A", "Q?\n\nChoices: A"),
])
def test_image_placeholder_tags(text, expected):
    assert strip_image_tags(text) == expected


def test_a_boxed_gold_is_unwrapped_once():
    assert unwrap_boxed(" \\boxed{12} ") == "12" and unwrap_boxed("$\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert unwrap_boxed("12") == "12"
    assert unwrap_boxed("\\boxed{3} and \\boxed{4}") == "\\boxed{3} and \\boxed{4}"   # two boxes: not one answer


def test_answer_types_of_plain_numbers():
    assert [answer_type_of(a) for a in ("12", "-3", "1,200", " 7 ")] == ["integer"] * 4
    assert [answer_type_of(a) for a in ("1.5", ".5", "1e3", "-2.")] == ["float"] * 4
    assert [answer_type_of(a) for a in ("x+1", "1,2", "3/4", "12 cm")] == ["free_form"] * 4


def test_precision_is_half_a_unit_in_the_last_place():
    assert precision_tolerance(1) == 0.05 and precision_tolerance(2.0) == 0.005
    assert precision_tolerance(None, "1.25") == 0.005                       # from the gold's decimals
    assert precision_tolerance(float("nan"), "3.1") == 0.05 and precision_tolerance("abc", "0.5") == 0.05
    assert precision_tolerance(None, "12") is None                          # an integer: exact
    assert precision_tolerance(-1) is None and precision_tolerance(13) is None


def test_an_option_list_in_the_text_is_the_longest_lettered_run():
    assert parse_lettered("Which is larger? A. 3 B. 4 C. 5") == ("Which is larger?", ["3", "4", "5"])
    assert parse_lettered("Point A. is here. Choices: (A) yes (B) no") == ("Point A. is here.", ["yes", "no"])
    assert parse_lettered("A. only one") is None and parse_lettered("(A) x (B) (C) z") is None   # an empty option
    assert split_choices("Find the angle.\nChoices:\nA:50°\nB:60°\nC:65°") == ("Find the angle.", ["50°", "60°", "65°"])
    assert split_choices("Is it? Choices: (A) yes (B) no") == ("Is it?", ["yes", "no"])
    assert split_choices("What is 2+2?") is None


def test_options_drawn_in_the_image_are_shown_as_letters_only():
    p = ImageOptionsProblem(id="t", image=None, question="Which one?", answer="B", answer_type="multiple_choice",
                            choices=["30°", "45°", "60°"])
    assert p.question_with_choices() == "Which one?\nChoices: (A), (B), (C) (the options are shown in the image)."
    p.question = ""
    assert p.question_with_choices().startswith("Choices: (A)")
