"""Visual-math RL training sets as :class:`~acrl.problem.Problem` lists: ViRL39K, Geometry3K, and any set in
the same shape (a question, a gold answer, one or more images).

Recognised schemas (by column names):

``virl39k`` (``TIGER-Lab/ViRL39K``)
    ``qid``, ``question``, ``answer`` (often ``\\boxed{...}``), ``image`` (a list of relative image paths,
    resolved against the folder of ``images.zip``), ``category``, ``source``, ``PassRate_*``. Mirrors that
    store ``problem`` / ``images`` (decoded) are read too.
``geometry3k`` (``hiyouga/geometry3k``)
    ``images`` (a list of images), ``problem`` (with an ``<image>`` token), ``answer`` (the value, e.g.
    ``3\\sqrt{3}``); ``choices`` / ``ground_truth`` (the option letter) are kept in ``meta``. The value, not
    the letter, is the gold answer, as in EasyR1's recipe.
``generic``
    a question in ``question`` / ``problem`` / ``query`` / ``prompt``, an answer in ``answer`` /
    ``ground_truth`` / ``solution``, images in ``images`` / ``image`` / ``decoded_image`` / ``image_path``.

Several images are placed side by side (labelled ``image 1``, ``image 2`` ...). ``<image>`` tokens are removed
from the question; a boxed gold is unwrapped. A single-letter gold with options written into the question
becomes a multiple-choice problem; other golds are typed ``integer`` / ``float`` / ``free_form``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from acrl.data.parsing import (
    ImageOptionsProblem,
    answer_type_of,
    as_list,
    as_text,
    split_choices,
    strip_image_tags,
    unwrap_boxed,
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
from acrl.rollout.answers import LETTERS, letter_index

__all__ = ["detect_training_schema", "load_training_set"]

_QUESTION_COLS = ("question", "problem", "query", "prompt")
_ANSWER_COLS = ("answer", "ground_truth", "solution")
_IMAGE_COLS = ("images", "image", "decoded_image", "image_path")
_ID_COLS = ("qid", "id", "pid", "question_id", "index")


def detect_training_schema(row: dict[str, Any]) -> str:
    """``virl39k``, ``geometry3k`` or ``generic`` from a row's columns; ValueError when no question / answer /
    image column is present."""
    cols = set(row)
    if not (cols & set(_QUESTION_COLS)) or not (cols & set(_ANSWER_COLS)) or not (cols & set(_IMAGE_COLS)):
        raise ValueError(f"not a visual QA row: need a question ({'/'.join(_QUESTION_COLS)}), an answer "
                         f"({'/'.join(_ANSWER_COLS)}) and images ({'/'.join(_IMAGE_COLS)}); "
                         f"columns: {sorted(cols)}")
    if "qid" in cols or any(c.startswith("PassRate") for c in cols):
        return "virl39k"
    if {"problem", "images", "answer"} <= cols and "question" not in cols:
        return "geometry3k"
    return "generic"


def _images(value: Any, resolver: ImageResolver, rec: Record) -> Image.Image:
    cells = as_list(value) if not isinstance(value, (dict, bytes, Image.Image)) else None
    if cells is None:
        cells = [value]
    cells = [c for c in cells if not is_missing(c)]
    if not cells:
        raise BadRowError("missing image")
    imgs = [open_image(c, resolver, rec.base_dirs) for c in cells]
    if len(imgs) == 1:
        return imgs[0]
    return compose_images(imgs, labels=[f"image {k}" for k in range(1, len(imgs) + 1)])


def _convert(row: dict[str, Any], rec: Record, resolver: ImageResolver, schema: str, family: str,
             split: str) -> Problem:
    qcol = next((c for c in _QUESTION_COLS if c in row), None)
    acol = next((c for c in _ANSWER_COLS if c in row), None)
    icol = next((c for c in _IMAGE_COLS if c in row and not is_missing(row[c])), None)
    if qcol is None or acol is None:
        raise BadRowError(f"missing column {'question' if qcol is None else 'answer'!r}")
    question = strip_image_tags(as_text(row[qcol]))
    if not question:
        raise BadRowError("missing question")
    answer = unwrap_boxed(as_text(row[acol]))
    if not answer:
        raise BadRowError("missing answer")
    if icol is None:
        raise BadRowError("missing image")
    image = _images(row[icol], resolver, rec)
    rid = next((as_text(row[c]) for c in _ID_COLS if as_text(row.get(c))), "") or f"{rec.index}"
    meta: dict[str, Any] = {"schema": schema, "row_id": rid}
    for col in ("source", "PassRate_32BTrained", "PassRate_7BTrained", "ground_truth", "data_source"):
        if col in row and col != acol and not is_missing(row[col]):
            meta["source_dataset" if col == "source" else col] = row[col]
    if schema == "geometry3k" and as_list(row.get("choices")):
        meta["choices"] = [as_text(c) for c in as_list(row.get("choices")) or []]
    common = {"id": f"{family}-{split}-{rid}", "image": image, "family": family,
              "category": as_text(row.get("category")), "source": rec.source, "meta": meta}
    idx = letter_index(answer) if re.fullmatch(r"\(?[A-Z]\)?", answer) else None
    if idx is not None and schema != "geometry3k":
        parsed = split_choices(question)
        if parsed is not None and idx < len(parsed[1]):
            return Problem(question=parsed[0], answer=LETTERS[idx], answer_type="multiple_choice",
                           choices=parsed[1], **common)
        meta["options_in_image"] = True
        n = max(idx + 1, 4)
        return ImageOptionsProblem(question=question, answer=LETTERS[idx], answer_type="multiple_choice",
                                   choices=list(LETTERS[:n]), **common)
    return Problem(question=question, answer=answer, answer_type=answer_type_of(answer), **common)


def load_training_set(path: str | os.PathLike, split: str | None = None, limit: int | None = None,
                      max_bad_fraction: float = 0.05, family: str | None = None) -> LoadResult:
    """Load a visual-math training set (ViRL39K, Geometry3K or the generic schema) from a local copy in any
    layout of :mod:`acrl.data.records`.

    ``split``: the split to read (default: ``train`` when the copy has one, else everything). ``family``: the
    Problem family (default: the detected schema name, or the directory name for the generic schema). Bad rows
    and ``max_bad_fraction`` behave as in :func:`acrl.data.load_benchmark`.
    """
    root = Path(path).expanduser()
    layout = detect_layout(root, what="training set",
                           expected_json="JSON/JSONL rows with question, answer and image paths, plus images")
    resolver = ImageResolver(layout.root)

    def accept(token: str | None, tokens: list[str | None]) -> bool:
        if split is not None:
            if split in tokens:
                return token == split
            named = {"train", "test", "validation", "val", "dev", "testmini"}
            if any(t in named for t in tokens if t):
                raise ValueError(f"training set: split {split!r} not found at {root}; available: "
                                 f"{', '.join(sorted({t for t in tokens if t}))}")
            return True
        if "train" in tokens:
            return token == "train"
        return True

    def is_rows(_: Path, first: dict[str, Any]) -> bool:
        try:
            detect_training_schema(first)
        except ValueError:
            return False
        return True

    problems: list[Problem] = []
    bad: list[BadRow] = []
    files: list[str] = []
    seen: dict[str, int] = {}
    schema: str | None = None
    fam = family
    for rec in iter_records(layout, accept, json_filter=is_rows):
        if limit is not None and len(problems) >= limit:
            break
        if rec.source not in files:
            files.append(rec.source)
        if "__error__" in rec.row:
            bad.append(BadRow(f"{fam or 'train'}-{rec.split or split or 'train'}-{rec.index}",
                              f"{Path(rec.source).name}: {rec.row['__error__']}"))
            continue
        if schema is None:
            try:
                schema = detect_training_schema(rec.row)
            except ValueError as e:   # this row lacks a column; the schema comes from the next good row
                bad.append(BadRow(f"{fam or 'train'}-{rec.split or split or 'train'}-{rec.index}", str(e)))
                continue
            if fam is None:
                generic = re.sub(r"[^a-z0-9]+", "", root.name.lower()) or "train"
                fam = schema if schema != "generic" else generic
        assert fam is not None
        split_name = rec.split or split or "train"
        raw = next((as_text(rec.row.get(c)) for c in _ID_COLS if as_text(rec.row.get(c))), "")
        raw = raw or f"{rec.index}"
        try:
            p = _convert(rec.row, rec, resolver, schema, fam, split_name)
        except BadRowError as e:
            bad.append(BadRow(f"{fam}-{split_name}-{raw}", str(e)))
            continue
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            bad.append(BadRow(f"{fam}-{split_name}-{raw}", f"malformed row: {type(e).__name__}: {e}"))
            continue
        if p.id in seen:
            seen[p.id] += 1
            p.id = f"{p.id}~{seen[p.id]}"
        else:
            seen[p.id] = 1
        problems.append(p)
    total = len(problems) + len(bad)
    where = f"{layout.kind} layout at {root}"
    if total == 0:
        raise ValueError(f"training set: no rows with a question, an answer and images in the {where}")
    if len(bad) > max_bad_fraction * total:
        examples = "; ".join(f"{b.id}: {b.reason}" for b in bad[:5])
        raise ValueError(f"training set: {len(bad)} of {total} rows unusable in the {where} (more than "
                         f"{max_bad_fraction:.0%}); first: {examples}")
    return LoadResult(problems, bad, layout.kind, str(root), files)
