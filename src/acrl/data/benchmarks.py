"""Evaluation benchmark loaders: MathVista, MathVerse, MathVision, WeMath, DynaMath, LogicVista, MMMU.

Each benchmark is read from a local copy in any of the layouts of :mod:`acrl.data.records` and every row
becomes a :class:`~acrl.problem.Problem` with ``family`` = the benchmark name. ``docs/benchmarks.md`` lists
the expected layouts and how to download them.

What the reasoner is shown (``Problem.question``) is chosen per benchmark so that it carries the question text
the benchmark itself presents, without answer-format boilerplate written for end-to-end VLMs and without
information a problem version deliberately moves into the image; multiple-choice options go to
``Problem.choices`` (the reasoner sees them through :meth:`~acrl.problem.Problem.question_with_choices`) and
the gold answer becomes the option letter. The per-benchmark converters below document their choices.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from acrl.data.parsing import (
    ImageOptionsProblem,
    answer_type_of,
    as_list,
    as_text,
    parse_lettered,
    precision_tolerance,
    split_choices,
    strip_image_tags,
)
from acrl.data.records import (
    BadRow,
    BadRowError,
    ImageResolver,
    LoadResult,
    Record,
    compose_images,
    detect_layout,
    is_missing,
    iter_records,
    open_image,
)
from acrl.problem import Problem
from acrl.rollout.answers import LETTERS, letter_index, letter_set

__all__ = ["BENCHMARKS", "BenchmarkSpec", "find_benchmark_dirs", "load_all", "load_benchmark"]

# Splits any hub dataset may use; a file named after none of these is taken to hold "the" split.
_GENERIC_SPLITS = {"train", "test", "testmini", "validation", "val", "dev", "sample_all"}
DYNAMATH_FLOAT_TOLERANCE = 1e-3  # DynaMath's own scorer: |prediction - answer| <= 0.001
VISION_ONLY_PROMPT = "Answer the question shown in the image."


class SkipRow(Exception):
    """A row deliberately left out (filtered by an option); neither a problem nor a bad row."""


@dataclass
class RowContext:
    """What a converter needs besides the row."""

    name: str
    record: Record
    resolver: ImageResolver
    split: str
    options: dict[str, Any]
    pid: str = ""     # the Problem id, from the benchmark's own key (see BenchmarkSpec.problem_id)

    def image(self, value: Any) -> Image.Image:
        return open_image(value, self.resolver, self.record.base_dirs)

    def first_image(self, row: dict[str, Any], *columns: str) -> Image.Image:
        """The first decodable image among ``columns`` (MathVista: ``decoded_image``, then ``image``)."""
        present = [c for c in columns if c in row]
        if not present:
            raise BadRowError(f"missing column {columns[0]!r}")
        error: BadRowError | None = None
        for col in present:
            if is_missing(row[col]):
                continue
            try:
                return self.image(row[col])
            except BadRowError as e:
                error = error or e
        raise error or BadRowError("missing image")


@dataclass(frozen=True)
class BenchmarkSpec:
    """How to find and convert one benchmark."""

    name: str
    repo: str
    default_split: str | None
    splits: tuple[str, ...]
    convert: Callable[[dict[str, Any], RowContext], Problem]
    problem_id: Callable[[dict[str, Any], RowContext], str | None]   # None: the row lacks its key
    json_keys: tuple[str, ...]
    expected_json: str
    aliases: tuple[str, ...] = ()
    exclude_splits: tuple[str, ...] = ()
    normalize_split: Callable[[str], str] = field(default=lambda s: s)
    options: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------------------


def _need(row: dict[str, Any], col: str, what: str | None = None) -> str:
    if col not in row:
        raise BadRowError(f"missing column {col!r}")
    text = as_text(row[col])
    if not text:
        raise BadRowError(f"missing {what or col}")
    return text


def _answer(row: dict[str, Any], *cols: str) -> str:
    present = [c for c in cols if c in row]
    if not present:
        raise BadRowError(f"missing column {cols[0]!r}")
    for c in present:
        text = as_text(row[c])
        if text and text not in ("?", "None"):
            return text
    raise BadRowError("missing answer")


def _first(row: dict[str, Any], *cols: str) -> str:
    for c in cols:
        text = as_text(row.get(c))
        if text:
            return text
    return ""


def _text_match(answer: str, options: list[str]) -> int | None:
    norm = [re.sub(r"\s+", " ", o).strip().lower() for o in options]
    a = re.sub(r"\s+", " ", answer).strip().lower()
    return norm.index(a) if a in norm else None


def _option_count(question: str, gold: int, at_least: int = 4) -> int:
    """How many lettered options a question with options only in the image has: the largest letter the text
    names (``A-E``, ``A to F``, ``A, B, C, or D``), the gold letter, and ``at_least``."""
    n = max(gold + 1, at_least)
    for m in re.finditer(r"\b([A-Z])\s*(?:-|–|to)\s*([A-Z])\b", question):
        if m.group(1) == "A":
            n = max(n, LETTERS.index(m.group(2)) + 1)
    m = re.search(r"\b(?:[A-Z],\s*)+(?:or|and)?\s*([A-Z])\b", question)
    if m and question[m.start()] == "A":
        n = max(n, LETTERS.index(m.group(1)) + 1)
    return min(n, len(LETTERS))


def _letter_choice_problem(*, question: str, answer: str, options: list[str] | None, count_hint: str = "",
                           **kw: Any) -> Problem:
    """A multiple-choice problem from a letter gold: with option texts when known, else an
    :class:`ImageOptionsProblem` whose options are in the picture.

    A multi-letter gold (``"A, C"``) keeps the same presentation (so the reasoner is not told that several
    options are correct); its answer is the canonical ``"A, C"`` and ``meta['grading'] = 'letter_set'`` makes
    :func:`acrl.rollout.answers.grade_problem` require exactly that set of letters. (Plain
    :func:`acrl.rollout.grading.grade` falls back to free-form equality for such a gold: ``A, C`` / ``C, A`` / ``A,C``
    pass, ``AC`` does not.)"""
    meta = kw.pop("meta", {})
    letters = letter_set(answer)
    if letters is not None:
        meta.update(grading="letter_set", answer_letters=letters, answer_text=answer)
        gold = ", ".join(letters)
        last = LETTERS.index(letters[-1])
        if options:
            if last >= len(options):
                raise BadRowError(f"answer {answer!r} is beyond the {len(options)} options")
            return Problem(question=question, answer=gold, answer_type="multiple_choice",
                           choices=[str(o) for o in options], meta=meta, **kw)
        meta["options_in_image"] = True
        n = _option_count(count_hint or question, last)
        return ImageOptionsProblem(question=question, answer=gold, answer_type="multiple_choice",
                                   choices=list(LETTERS[:n]), meta=meta, **kw)
    idx = letter_index(answer)
    if options:
        if idx is None:
            idx = _text_match(answer, options)
            if idx is None:
                raise BadRowError(f"answer {answer!r} is neither an option letter nor an option text")
            meta["answer_text"] = answer
        if idx >= len(options):
            raise BadRowError(f"answer {answer!r} is beyond the {len(options)} options")
        return Problem(question=question, answer=LETTERS[idx], answer_type="multiple_choice",
                       choices=[str(o) for o in options], meta=meta, **kw)
    if idx is None:
        raise BadRowError(f"answer {answer!r} is not an option letter")
    n = _option_count(count_hint or question, idx)
    meta["options_in_image"] = True
    return ImageOptionsProblem(question=question, answer=LETTERS[idx], answer_type="multiple_choice",
                               choices=list(LETTERS[:n]), meta=meta, **kw)


def _free(answer: str) -> tuple[str, str]:
    return answer, answer_type_of(answer)


# ------------------------------------------------------------------------------------------------------------
# MathVista
# ------------------------------------------------------------------------------------------------------------


def _mathvista_note(answer_type: str, precision: Any) -> str:
    if answer_type == "integer":
        return "Answer with an integer."
    if answer_type == "float":
        try:
            p = int(float(precision))
        except (TypeError, ValueError):
            return "Answer with a decimal number."
        return f"Answer with a number rounded to {p} decimal place{'s' if p != 1 else ''}."
    if answer_type == "list":
        return "Answer with a Python list, e.g. [1, 2, 3]."
    return ""


def convert_mathvista(row: dict[str, Any], ctx: RowContext) -> Problem:
    """MathVista (``AI4Math/MathVista``).

    Question: ``question`` plus the unit and a one-line answer-format note rebuilt from ``answer_type`` /
    ``precision`` ("Answer with a number rounded to 2 decimal places."), not the pre-rendered ``query``:
    ``query`` repeats the options (the reasoner already gets them from ``choices``) and asks for the answer
    "at the end", which contradicts the reasoner's ``\\boxed{}`` protocol; the precision requirement, which
    decides grading, is kept. Multiple choice: ``answer`` is an option text, stored as its letter. Floats are
    graded with ``tolerance = 0.5 * 10**-precision``, equivalent to MathVista's "round to ``precision``
    decimals and compare". ``category`` = ``metadata.task``, ``difficulty`` = ``metadata.grade``.
    """
    pid = _first(row, "pid", "__key__")
    if not pid:
        raise BadRowError("missing column 'pid'")
    question = _need(row, "question")
    answer = _answer(row, "answer")
    image = ctx.first_image(row, "decoded_image", "image")
    md = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    unit, precision = as_text(row.get("unit")), row.get("precision")
    qtype, atype = as_text(row.get("question_type")), as_text(row.get("answer_type"))
    choices = as_list(row.get("choices"))
    meta = {"pid": pid, "question_type": qtype, "answer_type": atype, "unit": unit,
            "precision": None if as_text(precision) == "" else float(precision),
            "query": as_text(row.get("query")), "skills": list(md.get("skills") or []),
            "source_dataset": as_text(md.get("source")), "context": as_text(md.get("context")),
            "category": as_text(md.get("category")), "language": as_text(md.get("language"))}
    common = {"id": ctx.pid, "image": image, "family": ctx.name,
              "category": as_text(md.get("task")), "difficulty": as_text(md.get("grade")),
              "source": ctx.record.source}
    text = question + (f" (Unit: {unit})" if unit else "")
    if qtype == "multi_choice" or (choices and qtype != "free_form"):
        if not choices:
            raise BadRowError("multiple-choice row without choices")
        opts = [as_text(c) for c in choices]
        idx = opts.index(answer) if answer in opts else _text_match(answer, opts)
        if idx is None:
            raise BadRowError(f"answer {answer!r} not among the choices")
        meta["answer_text"] = answer
        return Problem(question=text, answer=LETTERS[idx], answer_type="multiple_choice", choices=opts,
                       meta=meta, **common)
    note = _mathvista_note(atype, precision)
    text = text + ("\n" + note if note else "")
    if atype == "integer":
        return Problem(question=text, answer=answer, answer_type="integer", meta=meta, **common)
    if atype == "float":
        return Problem(question=text, answer=answer, answer_type="float",
                       tolerance=precision_tolerance(precision, answer), meta=meta, **common)
    return Problem(question=text, answer=answer, answer_type="free_form", meta=meta, **common)


# ------------------------------------------------------------------------------------------------------------
# MathVerse
# ------------------------------------------------------------------------------------------------------------

MATHVERSE_VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only")


def convert_mathverse(row: dict[str, Any], ctx: RowContext) -> Problem:
    """MathVerse (``AI4Math/MathVerse``); ``category`` = ``problem_version``.

    Question: ``question``, i.e. exactly the text the benchmark shows for that problem version. Not
    ``question_for_eval``: that is the full (text-dominant) wording kept for the official answer judge, and
    giving it to the reasoner would leak the very conditions that the Text Lite / Vision * versions move into
    the diagram. Not ``query_wo`` / ``query_cot``: they only add answer-format instructions for end-to-end
    models. A Vision Only row has no text; the reasoner is told to answer the question shown in the image.
    Multiple choice: options written into the question (``Choices:\\nA:50°\\nB:60°``) become ``choices``; when
    they are only in the image the problem is an :class:`~acrl.data.parsing.ImageOptionsProblem` (the number
    of letters is read from ``question_for_eval``, which is never shown). ``question_for_eval`` is kept in
    ``meta``.
    Option ``versions``: keep only these problem versions (default: all rows, the five versions of testmini).
    """
    sid = _first(row, "sample_index", "__key__")
    if not sid:
        raise BadRowError("missing column 'sample_index'")
    version = as_text(row.get("problem_version"))
    versions = ctx.options.get("versions")
    if versions and version not in versions:
        raise SkipRow
    if "question" not in row:
        raise BadRowError("missing column 'question'")
    question = as_text(row["question"])
    answer = _answer(row, "answer")
    q_eval = as_text(row.get("question_for_eval"))
    if version == "Text Only" and is_missing(row.get("image")):
        image = None
    else:
        image = ctx.first_image(row, "image")
    md = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    qtype = as_text(row.get("question_type"))
    meta = {"sample_index": sid, "problem_index": as_text(row.get("problem_index")),
            "problem_version": version, "question_type": qtype, "subject": as_text(md.get("subject")),
            "subfield": as_text(md.get("subfield")),
            "source_dataset": as_text(md.get("source")), "question_for_eval": q_eval}
    common = {"id": ctx.pid, "image": image, "family": ctx.name, "category": version,
              "source": ctx.record.source, "meta": meta}
    is_mc = qtype == "multi-choice" or (not qtype and letter_index(answer) is not None)
    if is_mc:
        parsed = split_choices(question) if question else None
        if parsed is not None:
            return _letter_choice_problem(question=parsed[0], answer=answer, options=parsed[1], **common)
        hidden = split_choices(q_eval) if q_eval else None
        if hidden is not None and letter_set(answer) is None:
            # options drawn in the image (Vision Only ...): the reasoner is shown the letters only, but the option
            # texts of question_for_eval are the choices, so an answer given as the option text grades right
            idx = letter_index(answer)
            if idx is None:
                idx = _text_match(answer, hidden[1])
            if idx is None or idx >= len(hidden[1]):
                raise BadRowError(f"answer {answer!r} is not one of the {len(hidden[1])} options")
            meta.update(options_in_image=True, option_texts=hidden[1])
            return ImageOptionsProblem(question=question or VISION_ONLY_PROMPT, answer=LETTERS[idx],
                                       answer_type="multiple_choice", choices=list(hidden[1]), **common)
        hint = "A-" + LETTERS[len(hidden[1]) - 1] if hidden is not None else q_eval
        return _letter_choice_problem(question=question or VISION_ONLY_PROMPT, answer=answer, options=None,
                                      count_hint=hint, **common)
    gold, atype = _free(answer)
    return Problem(question=question or VISION_ONLY_PROMPT, answer=gold, answer_type=atype, **common)


# ------------------------------------------------------------------------------------------------------------
# MathVision
# ------------------------------------------------------------------------------------------------------------


def convert_mathvision(row: dict[str, Any], ctx: RowContext) -> Problem:
    """MathVision / MATH-V (``MathLLMs/MathVision``); ``category`` = ``subject``, ``difficulty`` = ``level``.

    Question: ``question`` with its ``<image1>`` placeholder removed (the picture reaches the reasoner through
    the caption). Multiple choice when ``options`` is non-empty (gold = letter A-E); options that are bare
    letters (the option contents are drawings) make an :class:`~acrl.data.parsing.ImageOptionsProblem`.
    Otherwise the answer is free form: ``integer`` / ``float`` for plain numbers, ``free_form`` (math-verify
    equivalence) for LaTeX answers such as ``2\\sqrt{3}``.
    """
    rid = _first(row, "id", "__key__")
    if not rid:
        raise BadRowError("missing column 'id'")
    question = strip_image_tags(_need(row, "question"))
    answer = _answer(row, "answer")
    image = ctx.first_image(row, "decoded_image", "image")
    options = [as_text(o) for o in (as_list(row.get("options")) or [])]
    level = as_text(row.get("level"))
    meta = {"mathvision_id": rid, "subject": as_text(row.get("subject")), "level": level}
    common = {"id": ctx.pid, "image": image, "family": ctx.name,
              "category": as_text(row.get("subject")), "difficulty": level, "source": ctx.record.source,
              "meta": meta}
    if options:
        if all(re.fullmatch(r"\(?[A-Z]\)?", o) for o in options):
            return _letter_choice_problem(question=question, answer=answer, options=None,
                                          count_hint=f"A-{LETTERS[len(options) - 1]}", **common)
        return _letter_choice_problem(question=question, answer=answer, options=options, **common)
    if re.fullmatch(r"[A-E]", answer):
        parsed = split_choices(question)
        if parsed is not None:
            return _letter_choice_problem(question=parsed[0], answer=answer, options=parsed[1], **common)
        return _letter_choice_problem(question=question, answer=answer, options=None, count_hint="A-E",
                                      **common)
    gold, atype = _free(answer)
    return Problem(question=question, answer=gold, answer_type=atype, **common)


# ------------------------------------------------------------------------------------------------------------
# WeMath
# ------------------------------------------------------------------------------------------------------------


def convert_wemath(row: dict[str, Any], ctx: RowContext) -> Problem:
    """WeMath (``We-Math/We-Math``, testmini); ``category`` = ``knowledge concept``, ``difficulty`` = the step
    count from ``key`` (``2steps_1`` -> ``2 steps``).

    Question: ``question``; the ``option`` string (``A. 9; B. 10; ...; E. No correct answer``) is parsed into
    ``choices`` and the letter ``answer`` kept. ``ID``, ``key`` and ``question number`` are kept in ``meta``
    so the official four-dimensional metrics (IK / IG / CM / RM) can be computed from the items afterwards.
    """
    rid = _first(row, "ID", "id", "__key__")
    if not rid:
        raise BadRowError("missing column 'ID'")
    question = _need(row, "question")
    answer = _answer(row, "answer")
    image = ctx.first_image(row, "image_path", "image", "decoded_image")
    option = as_text(row.get("option"))
    key = as_text(row.get("key"))
    m = re.match(r"(\d+)\s*steps?", key)
    meta = {"wemath_id": rid, "key": key, "question_number": as_text(row.get("question number")),
            "knowledge_concept_description": as_text(row.get("knowledge concept description")),
            "wemath_split": as_text(row.get("split"))}
    common = {"id": ctx.pid, "image": image, "family": ctx.name,
              "category": as_text(row.get("knowledge concept")),
              "difficulty": f"{m.group(1)} step{'s' if m.group(1) != '1' else ''}" if m else "",
              "source": ctx.record.source, "meta": meta}
    parsed = parse_lettered(option) if option else None
    if parsed is not None and not parsed[0]:
        return _letter_choice_problem(question=question, answer=answer, options=parsed[1], **common)
    text = question + ("\n" + option if option else "")
    return _letter_choice_problem(question=text, answer=answer, options=None, **common)


# ------------------------------------------------------------------------------------------------------------
# DynaMath
# ------------------------------------------------------------------------------------------------------------


def dynamath_split(token: str) -> str:
    """``sample1`` / ``variant1`` / ``1`` / ``sample_variant1`` -> ``sample_variant1``."""
    m = re.fullmatch(r"(?:sample_?)?(?:variant_?)?(\d+)", token.strip().lower())
    return f"sample_variant{int(m.group(1))}" if m else token


def dynamath_problem_id(seed: str, variant: int | str) -> str:
    """The Problem id of a DynaMath row: ``dynamath-<seed>-v<variant>`` (parsed back by
    :func:`acrl.eval.metrics.parse_dynamath_id`)."""
    return f"dynamath-{seed}-v{variant}"


def _variant_of(ctx: RowContext) -> int | None:
    for text in (ctx.record.split, ctx.record.group, Path(ctx.record.source).name):
        if not text:
            continue
        m = re.search(r"(?:variant|sample)_?(\d+)", text.lower())
        if m:
            return int(m.group(1))
    return None


def _dynamath_variant(row: dict[str, Any], ctx: RowContext) -> int | str:
    """The variant number: ``varid`` / ``variant`` of the row, else from the split / file / folder name."""
    var_text = _first(row, "varid", "variant", "variant_id")
    if re.fullmatch(r"\d+(?:\.0)?", var_text):
        return int(float(var_text))
    return var_text or _variant_of(ctx) or 1


def convert_dynamath(row: dict[str, Any], ctx: RowContext) -> Problem:
    """DynaMath (``DynaMath/DynaMath_Sample``): 501 seed questions x 10 generated variants, one split each.

    The Problem id is ``dynamath-<seed>-v<variant>`` (seed from ``question_id`` / ``qid`` / ``id``, variant
    from ``varid`` / ``variant`` or the split / file / folder name, e.g. ``sample_variant3``); ``meta``
    repeats both so :func:`acrl.data.aggregate_dynamath` can compute average and worst-case accuracy over
    variants.
    Question: ``question``; inline options (``Choices: (A) yes (B) no``) become ``choices``. Float answers are
    graded with DynaMath's own tolerance, ``|prediction - answer| <= 0.001``; ``text`` answers are free form.
    ``category`` = ``subject``, ``difficulty`` = ``knowledge_level``.
    """
    seed = _first(row, "question_id", "qid", "id", "__key__")
    if not seed:
        raise BadRowError("missing column 'id'")
    variant = _dynamath_variant(row, ctx)
    question = _need(row, "question")
    answer = _answer(row, "ground_truth", "answer")
    image = ctx.first_image(row, "decoded_image", "image")
    atype_raw = as_text(row.get("answer_type")).lower()
    meta = {"seed": seed, "variant": variant, "answer_type": atype_raw,
            "subject": as_text(row.get("subject")),
            "knowledge_level": _first(row, "knowledge_level", "level")}
    common = {"id": ctx.pid, "image": image, "family": ctx.name,
              "category": as_text(row.get("subject")), "difficulty": meta["knowledge_level"],
              "source": ctx.record.source, "meta": meta}
    if atype_raw.startswith("multiple") or (not atype_raw and letter_index(answer) is not None):
        parsed = split_choices(question)
        if parsed is not None:
            return _letter_choice_problem(question=parsed[0], answer=answer, options=parsed[1], **common)
        return _letter_choice_problem(question=question, answer=answer, options=None, **common)
    gold, atype = _free(answer)
    if atype_raw == "float" and atype in ("integer", "float"):
        return Problem(question=question, answer=gold, answer_type="float",
                       tolerance=DYNAMATH_FLOAT_TOLERANCE, **common)
    return Problem(question=question, answer=gold, answer_type=atype if atype_raw != "text" else "free_form",
                   **common)


# ------------------------------------------------------------------------------------------------------------
# LogicVista
# ------------------------------------------------------------------------------------------------------------


def _capabilities(row: dict[str, Any]) -> list[str]:
    """LogicVista's capability labels: ``capability`` (official JSON) or the hub parquet's ``broad_capability`` /
    ``specific_capability`` (each a list or a single string)."""
    out: list[str] = []
    for col in ("capability", "broad_capability", "specific_capability"):
        cell = row.get(col)
        values = as_list(cell)
        if values is None:
            values = [cell] if as_text(cell) else []
        out += [as_text(v) for v in values if as_text(v) and as_text(v) not in out]
    return out


def convert_logicvista(row: dict[str, Any], ctx: RowContext) -> Problem:
    """LogicVista (``lscpku/LogicVista``; official ``data/dataset.json`` + ``data/images``); ``category`` =
    the first ``skill`` (inductive / deductive / numerical / spatial / mechanical).

    Question: ``question`` as given. Most options are drawn in the image, so a single-letter gold makes an
    :class:`~acrl.data.parsing.ImageOptionsProblem` (letters up to the largest one the question names, e.g.
    "Select answers from A-E"); options written into the text are parsed into ``choices``. A multi-letter gold
    (``"A, C"``) is presented the same way (the reasoner is not told how many options are correct) and stored
    canonically (sorted, ``", "``-separated) with ``meta['grading'] = 'letter_set'``: it is correct only when
    the prediction names exactly that set of letters, in any order or spelling (``AC``, ``C, A``, ``A and
    C``); no partial credit (see :mod:`acrl.rollout.answers`). Numeric golds ("Select from 1-5") are integers.
    """
    image = ctx.first_image(row, "image", "decoded_image", "imagename", "image_path")
    rid = _logicvista_key(row)
    if not rid:
        raise BadRowError("missing column 'id'")
    question = _need(row, "question")
    answer = _answer(row, "answer")
    skill_cell = row.get("skill")
    skills = [as_text(s) for s in (as_list(skill_cell) or ([skill_cell] if as_text(skill_cell) else []))]
    meta = {"logicvista_id": rid, "skills": skills,
            "broad_capability": as_text(row.get("broad_capability")),
            "specific_capability": as_text(row.get("specific_capability")),
            "capability": _capabilities(row),
            "reasoning": as_text(row.get("reasoning"))}
    common = {"id": ctx.pid, "image": image, "family": ctx.name,
              "category": skills[0] if skills else "", "source": ctx.record.source, "meta": meta}
    if letter_set(answer) is not None or letter_index(answer) is not None:
        parsed = split_choices(question)
        if parsed is not None:
            return _letter_choice_problem(question=parsed[0], answer=answer, options=parsed[1], **common)
        return _letter_choice_problem(question=question, answer=answer, options=None, **common)
    gold, atype = _free(answer)
    return Problem(question=question, answer=gold, answer_type=atype, **common)


# ------------------------------------------------------------------------------------------------------------
# MMMU
# ------------------------------------------------------------------------------------------------------------


def convert_mmmu(row: dict[str, Any], ctx: RowContext) -> Problem:
    """MMMU (``MMMU/MMMU``, one config per subject; validation by default); ``category`` = subject (from the
    ``validation_<Subject>_<n>`` id or the config folder), ``difficulty`` = ``topic_difficulty``.

    Images: ``image_1`` ... ``image_7``; the question and options refer to them as ``<image k>``. With option
    ``mmmu_images='compose'`` (default) every referenced image (all present ones if none is referenced) is
    placed side by side and labelled ``image k``, so the references stay meaningful; ``'first'`` keeps only
    the first. Multiple choice: ``options`` (a stringified list) -> ``choices``, the gold letter kept. Open
    questions: free form; an answer stored as a list of alternatives keeps the first as gold and all in
    ``meta['accepted_answers']``. Option ``subjects``: keep only these subjects.
    """
    rid = _need(row, "id")
    m = re.fullmatch(r"(?:dev|validation|test)_(.+)_\d+", rid)
    subject = m.group(1) if m else (ctx.record.group or "")
    subjects = ctx.options.get("subjects")
    if subjects and subject not in subjects and subject.replace("_", " ") not in subjects:
        raise SkipRow
    question = _need(row, "question")
    answer = _answer(row, "answer")
    options = [as_text(o) for o in (as_list(row.get("options")) or [])]
    available: dict[int, Any] = {k: row[f"image_{k}"] for k in range(1, 8)
                                 if f"image_{k}" in row and not is_missing(row[f"image_{k}"])}
    if not available:
        raise BadRowError("missing image" if any(f"image_{k}" in row for k in range(1, 8))
                          else "missing column 'image_1'")
    referenced = sorted({int(n) for n in re.findall(r"<image (\d+)>", question + " " + " ".join(options))})
    use = [k for k in referenced if k in available] or sorted(available)
    mode = ctx.options.get("mmmu_images", "compose")
    if mode == "first" or len(use) == 1:
        use = use[:1]
        image = ctx.image(available[use[0]])
    else:
        image = compose_images([ctx.image(available[k]) for k in use], labels=[f"image {k}" for k in use])
    qtype = as_text(row.get("question_type"))
    meta = {"mmmu_id": rid, "subject": subject, "subfield": as_text(row.get("subfield")),
            "img_type": [as_text(t) for t in (as_list(row.get("img_type")) or [])] or
                        ([as_text(row.get("img_type"))] if as_text(row.get("img_type")) else []),
            "question_type": qtype, "images_used": use}
    common = {"id": ctx.pid, "image": image, "family": ctx.name, "category": subject,
              "difficulty": as_text(row.get("topic_difficulty")), "source": ctx.record.source, "meta": meta}
    if options and qtype != "open":
        return _letter_choice_problem(question=question, answer=answer, options=options, **common)
    alternatives = as_list(answer)
    if alternatives:
        alternatives = [as_text(a) for a in alternatives if as_text(a)]
        meta["accepted_answers"] = alternatives
        answer = alternatives[0]
    gold, atype = _free(answer)
    return Problem(question=question, answer=gold, answer_type=atype, **common)


# ------------------------------------------------------------------------------------------------------------
# Problem ids: from each benchmark's own keys, never from the row order
# ------------------------------------------------------------------------------------------------------------


def _keyed(prefix: str, key: str) -> str | None:
    return f"{prefix}-{key}" if key else None


def _logicvista_key(row: dict[str, Any]) -> str:
    return _first(row, "__key__", "id", "question_id", "pid") or Path(_first(row, "imagename")).stem


def wemath_problem_id(split: str, group_id: str, key: str) -> str:
    """``wemath-<split>-<ID>-<key>``: We-Math's ``ID`` names a problem *group* (its one-step sub-questions
    ``2steps_1`` / ``2steps_2`` and the composite ``2steps_multi`` share it), so the id needs ``key`` too."""
    return f"wemath-{split}-{group_id}-{key}" if key else f"wemath-{split}-{group_id}"


_PROBLEM_IDS: dict[str, Callable[[dict[str, Any], RowContext], str | None]] = {
    "mathvista": lambda r, c: _keyed(f"mathvista-{c.split}", _first(r, "pid", "__key__")),
    "mathverse": lambda r, c: _keyed(f"mathverse-{c.split}", _first(r, "sample_index", "__key__")),
    "mathvision": lambda r, c: _keyed(f"mathvision-{c.split}", _first(r, "id", "__key__")),
    "wemath": lambda r, c: (wemath_problem_id(c.split, gid, as_text(r.get("key")))
                           if (gid := _first(r, "ID", "id", "__key__")) else None),
    "dynamath": lambda r, c: (dynamath_problem_id(seed, _dynamath_variant(r, c))
                             if (seed := _first(r, "question_id", "qid", "id", "__key__")) else None),
    "logicvista": lambda r, c: _keyed(f"logicvista-{c.split}", _logicvista_key(r)),
    "mmmu": lambda r, c: _keyed("mmmu", _first(r, "id")),
}


# ------------------------------------------------------------------------------------------------------------
# Registry and loading
# ------------------------------------------------------------------------------------------------------------

BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s for s in (
        BenchmarkSpec("mathvista", "AI4Math/MathVista", "testmini", ("testmini", "test"), convert_mathvista,
                      _PROBLEM_IDS["mathvista"], ("question",),
                      "annot_testmini.json / data/testmini.json (pid -> row) with an images/ folder"),
        BenchmarkSpec("mathverse", "AI4Math/MathVerse", "testmini", ("testmini", "testmini_text_only"),
                      convert_mathverse, _PROBLEM_IDS["mathverse"], ("problem_version",),
                      "testmini.json with the images/ folder of images.zip", options=("versions",)),
        BenchmarkSpec("mathvision", "MathLLMs/MathVision", "test", ("test", "testmini"), convert_mathvision,
                      _PROBLEM_IDS["mathvision"], ("question", "options"),
                      "data/test.jsonl / data/testmini.jsonl with an images/ folder",
                      aliases=("mathv", "mathvi")),
        BenchmarkSpec("wemath", "We-Math/We-Math", "testmini", ("testmini",), convert_wemath,
                      _PROBLEM_IDS["wemath"], ("question", "option"),
                      "testmini.json with the images of testmini.zip"),
        BenchmarkSpec("dynamath", "DynaMath/DynaMath_Sample", None,
                      tuple(f"sample_variant{i}" for i in range(1, 11)), convert_dynamath,
                      _PROBLEM_IDS["dynamath"], ("question",),
                      "one JSON file or folder per variant (sample_variant<k>) with its images",
                      aliases=("dynamathsample",), exclude_splits=("sample_all",),
                      normalize_split=dynamath_split),
        BenchmarkSpec("logicvista", "lscpku/LogicVista", "test", ("test",), convert_logicvista,
                      _PROBLEM_IDS["logicvista"], ("question", "answer"),
                      "data/dataset.json (id -> row with imagename) and data/images/"),
        BenchmarkSpec("mmmu", "MMMU/MMMU", "validation", ("dev", "validation", "test"), convert_mmmu,
                      _PROBLEM_IDS["mmmu"], ("question", "options"),
                      "JSON/JSONL rows in the hub schema with image_1..image_7 paths",
                      options=("subjects", "mmmu_images")),
    )
}


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _spec(name: str) -> BenchmarkSpec:
    key = _norm_name(name)
    for spec in BENCHMARKS.values():
        if key == spec.name or key in spec.aliases:
            return spec
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")


def _split_filter(spec: BenchmarkSpec, requested: str | None, path: Path):
    def accept(token: str | None, tokens: list[str | None]) -> bool:
        norm = [spec.normalize_split(t) if t else None for t in tokens]
        tok = spec.normalize_split(token) if token else None
        if requested is None:
            return tok not in spec.exclude_splits
        if requested in norm:
            return tok == requested
        known = set(spec.splits) | _GENERIC_SPLITS
        if not any(t in known for t in norm if t):
            return True  # files that carry no split name (e.g. dataset.json) hold the only split there is
        available = sorted({t for t in norm if t})
        raise ValueError(f"{spec.name}: split {requested!r} not found at {path}; "
                         f"available: {', '.join(available)}")
    return accept


def load_benchmark(name: str, path: str | os.PathLike, split: str | None = None, limit: int | None = None,
                   max_bad_fraction: float = 0.05, **options: Any) -> LoadResult:
    """Load a benchmark from a local copy (names: :data:`BENCHMARKS`; layouts: ``docs/benchmarks.md``).

    ``split`` defaults to the benchmark's evaluation split (MathVista / MathVerse / WeMath: ``testmini``,
    MathVision / LogicVista: ``test``, MMMU: ``validation``, DynaMath: every ``sample_variant<k>``). ``limit``
    keeps the first ``limit`` usable problems. Rows that cannot be used (missing or undecodable image, missing
    answer or column) are returned in ``LoadResult.bad``; when more than ``max_bad_fraction`` of the rows read
    are bad, a ValueError naming the path and the counts is raised instead. Benchmark-specific ``options``:
    MathVerse ``versions``; MMMU ``subjects``, ``mmmu_images`` (``compose`` / ``first``).
    """
    spec = _spec(name)
    unknown = set(options) - set(spec.options)
    if unknown:
        raise TypeError(f"{spec.name}: unknown option(s) {sorted(unknown)}; accepted: {list(spec.options)}")
    if limit is not None and limit <= 0:
        raise ValueError("limit must be positive")
    if options.get("mmmu_images", "compose") not in ("compose", "first"):
        raise ValueError(f"mmmu_images must be 'compose' or 'first', not {options['mmmu_images']!r}")
    for key in ("versions", "subjects"):
        if isinstance(options.get(key), str):
            options[key] = [options[key]]
    root = Path(path).expanduser()
    layout = detect_layout(root, what=spec.name, expected_json=spec.expected_json)
    requested = spec.normalize_split(split) if split else spec.default_split
    resolver = ImageResolver(layout.root)

    def is_annotation(_: Path, first: dict[str, Any]) -> bool:
        return "__error__" in first or all(k in first for k in spec.json_keys)

    problems: list[Problem] = []
    bad: list[BadRow] = []
    files: list[str] = []
    seen: dict[str, int] = {}
    for rec in iter_records(layout, _split_filter(spec, requested, root), json_filter=is_annotation):
        if limit is not None and len(problems) >= limit:
            break
        if rec.source not in files:
            files.append(rec.source)
        row = rec.row
        split_name = spec.normalize_split(rec.split) if rec.split else (requested or "all")
        if requested and split_name != requested and split_name not in spec.splits:
            split_name = requested
        ctx = RowContext(spec.name, rec, resolver, split_name, options)
        try:
            ctx.pid = spec.problem_id(row, ctx) or ""
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            bad.append(BadRow(f"{spec.name}-{split_name}-#{rec.index}", f"malformed row: {type(e).__name__}: {e}"))
            continue
        # a row without its key gets a positional id that no keyed problem can have ('#' + row number)
        pid = ctx.pid or f"{spec.name}-{split_name}-#{rec.index}"
        if "__error__" in row:
            bad.append(BadRow(pid, f"{Path(rec.source).name}: {row['__error__']}"))
            continue
        try:
            problem = spec.convert(row, ctx)
        except SkipRow:
            continue
        except BadRowError as e:
            bad.append(BadRow(pid, str(e)))
            continue
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            bad.append(BadRow(pid, f"malformed row: {type(e).__name__}: {e}"))
            continue
        if problem.id in seen:
            seen[problem.id] += 1
            problem.meta["duplicate_of"] = problem.id
            problem.id = f"{problem.id}~{seen[problem.id]}"
        else:
            seen[problem.id] = 1
        problems.append(problem)
    total = len(problems) + len(bad)
    where = f"{layout.kind} layout at {root}"
    if total == 0:
        raise ValueError(f"{spec.name}: no rows for split {requested or 'all'} in the {where}"
                         + (f" (files read: {', '.join(files)})" if files else ""))
    if len(bad) > max_bad_fraction * total:
        examples = "; ".join(f"{b.id}: {b.reason}" for b in bad[:5])
        raise ValueError(f"{spec.name}: {len(bad)} of {total} rows unusable in the {where} (more than "
                         f"{max_bad_fraction:.0%}); first: {examples}")
    return LoadResult(problems, bad, layout.kind, str(root), files)


def find_benchmark_dirs(data_dir: str | os.PathLike) -> dict[str, Path]:
    """Benchmark sub-directories of ``data_dir``, matched by name (``MathVista``, ``math_vista``, ``We-Math``,
    ``DynaMath_Sample``, ``MATH-V`` ...)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark data directory {root} does not exist")
    found: dict[str, Path] = {}
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        key = _norm_name(child.name)
        for spec in BENCHMARKS.values():
            if spec.name not in found and (key == spec.name or key in spec.aliases):
                found[spec.name] = child
    return found


def load_all(data_dir: str | os.PathLike, names: list[str] | None = None, split: str | None = None,
             limit: int | None = None, max_bad_fraction: float = 0.05) -> dict[str, LoadResult]:
    """Load every benchmark found under ``data_dir`` (one sub-directory each, see
    :func:`find_benchmark_dirs`);
    ``names`` restricts and orders them (a listed benchmark without a directory is an error). ``split``
    applies to every benchmark (None: each benchmark's default)."""
    dirs = find_benchmark_dirs(data_dir)
    if names is None:
        wanted = [n for n in BENCHMARKS if n in dirs]
        if not wanted:
            raise ValueError(f"no benchmark directories under {data_dir}; expected sub-directories named "
                             f"{', '.join(BENCHMARKS)}")
    else:
        wanted = [_spec(n).name for n in names]
        missing = [n for n in wanted if n not in dirs]
        if missing:
            raise FileNotFoundError(f"no directory for {', '.join(missing)} under {data_dir}")
    return {n: load_benchmark(n, dirs[n], split=split, limit=limit, max_bad_fraction=max_bad_fraction)
            for n in wanted}
