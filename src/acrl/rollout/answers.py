"""Grading rules the generic :func:`acrl.rollout.grading.grade_answer` cannot express for benchmark answers.

:func:`grade_problem` is a drop-in replacement for :func:`acrl.rollout.grading.grade` (same signature) that adds:

``letter_set`` (``problem.meta['grading'] == 'letter_set'``)
    Multi-letter golds, as in LogicVista (``"A, C"``) or the odd multi-answer MMMU question. The prediction is
    correct when it names exactly the gold set of option letters, in any order or spelling: ``A, C``,
    ``C, A``, ``AC``, ``A and C``, ``(A)(C)``, ``options A and C``. A subset or a superset is wrong (no
    partial credit), matching how LogicVista counts a question as solved.
``accepted_answers`` (``problem.meta['accepted_answers']``)
    Several acceptable golds (MMMU open questions store a list); any of them counts.

Everything else is delegated unchanged to :func:`acrl.rollout.grading.grade`.
"""

from __future__ import annotations

import re
from typing import Any

from acrl.problem import Problem
from acrl.rollout.grading import extract_answer, grade, grade_answer, strip_think

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

__all__ = ["grade_letter_set", "grade_problem", "prediction_letters"]

_FILLER_RE = re.compile(r"\b(?:the|final|answers?|options?|choices?|both|correct|ones?|are|is)\b|[.:]",
                        re.IGNORECASE)


def letter_index(text: str) -> int | None:
    """Index of a bare option letter (``"B"``, ``"(B)"``, ``"B."``), else None."""
    m = re.fullmatch(r"\s*\(?([A-Za-z])\)?[.:]?\s*", text or "")
    if not m:
        return None
    return LETTERS.index(m.group(1).upper())


def letter_set(text: str) -> list[str] | None:
    """The option letters of a multi-letter answer (``"A, C"``, ``"AC"``, ``"A and C"``, ``"(B)(D)"``), sorted
    and de-duplicated; None when the text is not made of option letters only (or names fewer than two)."""
    s = (text or "").strip().upper()
    if not s:
        return None
    s = re.sub(r"\bAND\b|&|\+", ",", s)
    if re.fullmatch(r"[A-Z]{2,8}", s):
        letters = list(s)
    else:
        parts = [p for p in re.split(r"[\s,;/]+|(?<=\))(?=\()", s) if p]
        letters = []
        for p in parts:
            m = re.fullmatch(r"\(?([A-Z])\)?\.?", p)
            if not m:
                return None
            letters.append(m.group(1))
    uniq = sorted(set(letters))
    return uniq if len(uniq) >= 2 else None

def prediction_letters(prediction: Any) -> list[str] | None:
    """Option letters a prediction names (sorted, unique), from its boxed / "answer is" part when present."""
    if prediction is None:
        return None
    text = str(prediction)
    ans = extract_answer(text)
    if ans is None:
        ans = strip_think(text).strip()
    ans = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", ans)
    ans = _FILLER_RE.sub(" ", ans).strip()
    if not ans:
        return None
    letters = letter_set(ans)
    if letters is not None:
        return letters
    idx = letter_index(ans)
    return None if idx is None else [chr(65 + idx)]


def grade_letter_set(prediction: Any, gold: list[str] | str) -> bool:
    """Exact set equality between the letters a prediction names and the gold letters."""
    gold_letters = letter_set(gold) if isinstance(gold, str) else sorted({g.upper() for g in gold})
    if not gold_letters:
        return False
    try:
        return prediction_letters(prediction) == gold_letters
    except Exception:  # noqa: BLE001 - grading never raises
        return False


def grade_problem(prediction: Any, problem: Problem) -> bool:
    """Grade ``prediction`` against ``problem`` (drop-in for :func:`acrl.rollout.grading.grade`, benchmark-aware)."""
    meta = problem.meta or {}
    if meta.get("grading") == "letter_set":
        return grade_letter_set(prediction, meta.get("answer_letters") or problem.answer)
    if grade(prediction, problem):
        return True
    for alt in (meta.get("accepted_answers") or [])[1:]:
        if grade_answer(prediction, str(alt), problem.answer_type, problem.choices, problem.tolerance,
                        question=problem.question):
            return True
    return False
