"""The `Problem` record: one (image, question, gold answer) shared by the world, benchmarks and training sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

ANSWER_TYPES = ("integer", "float", "multiple_choice", "free_form")


@dataclass
class Problem:
    """One visual question.

    Fields:
        id: unique, stable identifier (e.g. ``world-test-000123`` or ``mathvista-testmini-17``).
        image: the picture as a PIL image (RGB). ``None`` only for text-only rows of a benchmark.
        question: the question text shown to captioner and reasoner (for multiple choice, without the options).
        answer: the gold answer as a string (a number, a LaTeX expression, or for multiple choice the option letter).
        answer_type: one of ``integer``, ``float``, ``multiple_choice``, ``free_form``.
        choices: option texts for multiple choice, in order (letters A, B, C, ... are implied).
        tolerance: absolute numeric tolerance accepted when grading (``None``: exact / math-verify equality).
        facts: the scene facts, ``{fact_key: value}`` (world only; empty for benchmarks).
        needed: the fact keys the question needs (world only).
        family: world family or benchmark name.
        category: subject / skill / problem version (benchmark breakdowns).
        difficulty: difficulty label or level, if the source has one.
        source: where the record came from (``world``, ``mathvista``, a file path, ...).
        meta: anything else a loader keeps (original columns, precision, unit, ...).
    """

    id: str
    image: Image.Image | None
    question: str
    answer: str
    answer_type: str = "integer"
    choices: list[str] | None = None
    tolerance: float | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    needed: list[str] = field(default_factory=list)
    family: str = ""
    category: str = ""
    difficulty: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(f"problem {self.id!r}: answer_type {self.answer_type!r} not in {ANSWER_TYPES}")
        if self.answer_type == "multiple_choice" and not self.choices:
            raise ValueError(f"problem {self.id!r}: multiple_choice needs choices")

    def question_with_choices(self) -> str:
        """The question as the reasoner reads it: multiple-choice options appended as ``(A) ...`` lines."""
        if not self.choices:
            return self.question
        opts = "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(self.choices))
        return f"{self.question}\nChoices:\n{opts}"

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable view (without the image)."""
        return {
            "id": self.id, "question": self.question, "answer": self.answer, "answer_type": self.answer_type,
            "choices": self.choices, "tolerance": self.tolerance, "facts": self.facts, "needed": self.needed,
            "family": self.family, "category": self.category, "difficulty": self.difficulty,
            "source": self.source, "meta": self.meta,
        }
