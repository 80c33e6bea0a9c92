"""Text helpers for the loaders: option lists inside question text, answer types, letters, tolerances."""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from acrl.problem import Problem
from acrl.rollout.answers import LETTERS

__all__ = [
    "ImageOptionsProblem", "answer_type_of", "as_list", "as_text",
    "parse_lettered",
    "precision_tolerance", "split_choices", "strip_image_tags", "unwrap_boxed",
]


_INT_RE = re.compile(r"^[+-]?(?:\d+|\d{1,3}(?:,\d{3})+)$")
_FLOAT_RE = re.compile(r"^[+-]?(?:\d+\.\d*|\.\d+|\d+(?:\.\d+)?[eE][+-]?\d+)$")
# an option marker: "(A)", "A.", "A:", "A)", "A、" at the start of the text or after whitespace / ';' / ','
_MARK_RE = re.compile(r"(?:(?<=^)|(?<=[\s;,]))(?:\(([A-Z])\)|([A-Z])\s*[.:：)、．])[ \t]*")
_CHOICES_LABEL_RE = re.compile(r"(?:^|\n|\s)(?:answer\s+)?(?:choices|choice|options)\s*[:：]", re.IGNORECASE)
_LABEL_RE = re.compile(r"(?:\b(?:answer\s+)?(?:choices|choice|options|option)\s*[:：]?\s*)$", re.IGNORECASE)


@dataclass
class ImageOptionsProblem(Problem):
    """A multiple-choice problem whose option texts exist only in the image (MathVerse *Vision Only*, most of
    LogicVista, MathVision questions with picture options).

    ``choices`` holds the option texts when the benchmark records them elsewhere (MathVerse's
    ``question_for_eval``), so that an answer given as the option text grades right, and the bare letters
    otherwise; either way :meth:`question_with_choices` shows the reasoner only the letters, as the options are
    in the picture.
    """

    def question_with_choices(self) -> str:
        letters = ", ".join(f"({LETTERS[i]})" for i in range(len(self.choices or [])))
        note = f"Choices: {letters} (the options are shown in the image)."
        return f"{self.question}\n{note}" if self.question else note


def as_text(value: Any) -> str:
    """A cell as stripped text; None / NaN -> ''."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
    return str(value).strip()


def as_list(value: Any) -> list[Any] | None:
    """A list cell that may also be stored as its string form (``"['a', 'b']"``, JSON); None when absent."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist"):
        return list(value.tolist())
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        if s[0] in "[(":
            for parse in (ast.literal_eval, json.loads):
                try:
                    out = parse(s)
                except (ValueError, SyntaxError, TypeError):
                    continue
                if isinstance(out, (list, tuple)):
                    return list(out)
        return None
    return None


def strip_image_tags(text: str) -> str:
    """Remove ``<image>`` / ``<image1>`` placeholder tokens (not MMMU's ``<image 1>`` references, which name
    one of several images) and tidy the whitespace they leave. A tag standing on its own (a line, the start or
    the end of the text) is dropped; one inside a sentence ("as shown in <image1>.") becomes "the image", so
    the sentence still reads."""
    tag = r"<\s*image\d*\s*>"
    text = re.sub(rf"(?im)^[ \t]*(?:{tag}[ \t]*)+$\n?", "", text)
    text = re.sub(rf"(?i)^\s*(?:{tag}\s*)+|(?:\s*{tag})+\s*$", "", text)
    text = re.sub(rf"(?i)\b(figure|diagram|image|picture|graph)\s*{tag}", r"\1", text)
    text = re.sub(rf"(?i){tag}", "the image", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _balanced(text: str) -> bool:
    """Whether every ``{`` in ``text`` is closed by a later ``}`` and no ``}`` closes more than was opened."""
    depth = 0
    for ch in text:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def unwrap_boxed(text: str) -> str:
    """``\\boxed{x}`` -> ``x`` (training sets often store gold answers boxed); text that is not one box (``\\boxed{3}
    and \\boxed{4}``) is kept whole."""
    s = text.strip()
    m = re.fullmatch(r"\$?\\boxed\s*\{(.*)\}\$?", s, re.DOTALL)
    return m.group(1).strip() if m and _balanced(m.group(1)) else s


def answer_type_of(answer: str) -> str:
    """``integer`` / ``float`` for plain numbers, else ``free_form``."""
    s = answer.strip()
    if _INT_RE.match(s):
        return "integer"
    if _FLOAT_RE.match(s):
        return "float"
    return "free_form"


def precision_tolerance(precision: Any, answer: str = "") -> float | None:
    """Absolute tolerance equivalent to MathVista's rule "round the prediction to ``precision`` decimals and
    compare": half a unit in the last requested place (precision 1 -> 0.05, 2 -> 0.005). Without a precision
    the number of decimals of the gold answer is used; an integer gold gets None (exact)."""
    p: float | None = None
    try:
        if precision is not None and not (isinstance(precision, float) and math.isnan(precision)):
            p = float(precision)
    except (TypeError, ValueError):
        p = None
    if p is None:
        m = re.fullmatch(r"[+-]?\d*\.(\d+)", answer.strip())
        if not m:
            return None
        p = float(len(m.group(1)))
    if p < 0 or p > 12:
        return None
    return 0.5 * 10 ** (-int(p))


def parse_lettered(text: str, min_options: int = 2) -> tuple[str, list[str]] | None:
    """Find an option list ``A ... B ... C ...`` in ``text``; returns ``(text before it, [option texts])``.

    Options are introduced by ``(A)``, ``A.``, ``A:``, ``A)``; letters must run A, B, C, ... in order. The
    longest such run wins (the last one on ties), so a stray "A." inside the stem does not start a list."""
    marks = [(m.start(), m.end(), m.group(1) or m.group(2)) for m in _MARK_RE.finditer(text)]
    best: list[tuple[int, int, str]] = []
    for i, (_, _, letter) in enumerate(marks):
        if letter != "A":
            continue
        chain = [marks[i]]
        for mk in marks[i + 1:]:
            if mk[2] == LETTERS[len(chain)]:
                chain.append(mk)
        if len(chain) >= len(best):
            best = chain
    if len(best) < min_options:
        return None
    options = []
    for k, (_, end, _) in enumerate(best):
        stop = best[k + 1][0] if k + 1 < len(best) else len(text)
        options.append(text[end:stop].strip().rstrip(";,").strip())
    if any(not o for o in options):
        return None
    stem = _LABEL_RE.sub("", text[: best[0][0]].rstrip()).rstrip()
    return stem, options


def split_choices(question: str) -> tuple[str, list[str]] | None:
    """Split a question whose options are written into its text (``Choices:\\nA:50°\\nB:60°`` or
    ``Choices: (A) yes (B) no``) into ``(stem, options)``. A ``Choices:`` / ``Options:`` label is preferred as
    the start of the list; otherwise the longest lettered run is used."""
    m = None
    for m in _CHOICES_LABEL_RE.finditer(question):  # noqa: B007 (keep the last match)
        pass
    if m is not None:
        tail = question[m.end():]
        parsed = parse_lettered(tail)
        if parsed is not None and not parsed[0].strip():
            return question[: m.start()].strip(), parsed[1]
    parsed = parse_lettered(question)
    if parsed is None:
        return None
    return parsed[0].strip(), parsed[1]
