"""Tiny on-disk copies of the benchmarks in their real schemas and storage layouts (no downloads).

Rows are plain dicts whose image cells are :class:`Img` markers (or lists of them); the writers turn them into
``{bytes, path}`` structs (hub parquet), ``datasets.Image`` features (``save_to_disk``) or image files plus
relative paths (official JSON layouts).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


@dataclass(frozen=True)
class Img:
    """An image cell: a small solid PNG, a broken one (bytes that are not an image), or an absent file."""

    name: str
    color: tuple[int, int, int] = (200, 40, 40)
    size: tuple[int, int] = (24, 16)
    broken: bool = False
    absent: bool = False
    transparent: bool = False

    def png(self) -> bytes:
        if self.broken:
            return b"this is not an image"
        buf = io.BytesIO()
        if self.transparent:
            im = Image.new("RGBA", self.size, (0, 0, 0, 0))
            im.putpixel((0, 0), (0, 0, 0, 255))
        else:
            im = Image.new("RGB", self.size, self.color)
        im.save(buf, format="PNG")
        return buf.getvalue()


def _hub(v: Any) -> Any:
    if isinstance(v, Img):
        return {"bytes": v.png(), "path": v.name}
    if isinstance(v, list) and v and all(isinstance(x, Img) for x in v):
        return [_hub(x) for x in v]
    return v


def _image_columns(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Column -> "single" / "list" for columns holding Img markers."""
    cols: dict[str, str] = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, Img):
                cols[k] = "single"
            elif isinstance(v, list) and v and all(isinstance(x, Img) for x in v):
                cols[k] = "list"
    return cols


def write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    """Hub-style parquet: image cells as ``{bytes, path}`` structs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = _image_columns(rows)
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.Table.from_pylist([{k: _hub(v) for k, v in r.items()} for r in rows])
    for name, kind in cols.items():
        want = img_t if kind == "single" else pa.list_(img_t)
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, table.column(name).cast(want))
    pq.write_table(table, path)
    return path


def write_saved(splits: dict[str, list[dict[str, Any]]], path: Path, as_dict: bool = True) -> Path:
    """``datasets`` ``save_to_disk`` copy (a DatasetDict, or a single Dataset when ``as_dict`` is false)."""
    from datasets import Dataset, DatasetDict, List
    from datasets import Image as ImageFeature

    out = {}
    for split, rows in splits.items():
        cols = _image_columns(rows)
        ds = Dataset.from_list([{k: _hub(v) for k, v in r.items()} for r in rows], split=split)
        for name, kind in cols.items():
            ds = ds.cast_column(name, ImageFeature() if kind == "single" else List(ImageFeature()))
        out[split] = ds
    if as_dict:
        DatasetDict(out).save_to_disk(str(path))
    else:
        (only,) = out.values()
        only.save_to_disk(str(path))
    return path


def write_json(
    rows: list[dict[str, Any]] | dict[str, dict[str, Any]],
    path: Path,
    image_root: Path,
    image_dir: str = "images",
    jsonl: bool = False,
) -> Path:
    """Official-style annotations: Img cells become files under ``image_root/image_dir`` and relative paths
    ``image_dir/name`` in the rows (absent images are referenced but not written)."""

    def cell(v: Any) -> Any:
        if isinstance(v, Img):
            rel = f"{image_dir}/{v.name}" if image_dir else v.name
            if not v.absent:
                f = image_root / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(v.png())
            return rel
        if isinstance(v, list) and v and all(isinstance(x, Img) for x in v):
            return [cell(x) for x in v]
        return v

    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(rows, dict):
        data: Any = {k: {c: cell(v) for c, v in r.items()} for k, r in rows.items()}
    else:
        data = [{c: cell(v) for c, v in r.items()} for r in rows]
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    else:
        path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def drop(rows: list[dict[str, Any]], *cols: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in cols} for r in rows]


# ------------------------------------------------------------------------------------------------------------
# Rows in each benchmark's schema
# ------------------------------------------------------------------------------------------------------------


def _mv_meta(task: str, grade: str = "high school") -> dict[str, Any]:
    return {
        "category": "math-targeted-vqa",
        "context": "geometry diagram",
        "grade": grade,
        "img_height": 16,
        "img_width": 24,
        "language": "english",
        "skills": ["geometry reasoning", "algebraic reasoning"],
        "source": "Geometry3K",
        "split": "testmini",
        "task": task,
    }


def mathvista_rows(n_extra: int = 0, broken: int = 0) -> list[dict[str, Any]]:
    base = [
        {
            "pid": "1",
            "question": "What is the length of segment AB?",
            "image": "images/1.jpg",
            "decoded_image": Img("1.jpg"),
            "choices": None,
            "unit": "cm",
            "precision": 1.0,
            "answer": "1.2",
            "question_type": "free_form",
            "answer_type": "float",
            "metadata": _mv_meta("geometry problem solving"),
            "query": "Hint: Please answer the question requiring a floating-point number with one decimal "
            "place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: What is AB?",
        },
        {
            "pid": "2",
            "question": "How many sides does the shape have?",
            "image": "images/2.jpg",
            "decoded_image": Img("2.jpg", (30, 200, 30)),
            "choices": ["3", "4", "5", "6"],
            "unit": None,
            "precision": None,
            "answer": "5",
            "question_type": "multi_choice",
            "answer_type": "text",
            "metadata": _mv_meta("figure question answering", "elementary school"),
            "query": "Hint: ...\nChoices: ...",
        },
        {
            "pid": "3",
            "question": "How many bars are taller than 10?",
            "image": "images/3.jpg",
            "decoded_image": Img("3.jpg"),
            "choices": None,
            "unit": None,
            "precision": None,
            "answer": "12",
            "question_type": "free_form",
            "answer_type": "integer",
            "metadata": _mv_meta("figure question answering", "daily life"),
            "query": "Hint: ...",
        },
        {
            "pid": "4",
            "question": "What fraction of the circle is shaded?",
            "image": "images/4.jpg",
            "decoded_image": Img("4.jpg"),
            "choices": None,
            "unit": None,
            "precision": 2.0,
            "answer": "0.25",
            "question_type": "free_form",
            "answer_type": "float",
            "metadata": _mv_meta("math word problem"),
            "query": "Hint: ...",
        },
        {
            "pid": "5",
            "question": "List the x-intercepts.",
            "image": "images/5.jpg",
            "decoded_image": Img("5.jpg"),
            "choices": None,
            "unit": None,
            "precision": None,
            "answer": "[1, 2, 3]",
            "question_type": "free_form",
            "answer_type": "list",
            "metadata": _mv_meta("textbook question answering", "college"),
            "query": "Hint: ...",
        },
    ]
    for i in range(n_extra):
        pid = str(100 + i)
        base.append(dict(base[2], pid=pid, image=f"images/{pid}.jpg", decoded_image=Img(f"{pid}.jpg")))
    for i in range(broken):
        pid = str(900 + i)
        base.append(
            dict(base[2], pid=pid, image=f"images/{pid}.jpg", decoded_image=Img(f"{pid}.jpg", broken=True))
        )
    return base


def mathvista_json(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The official ``annot_testmini.json`` shape: ``{pid: row}``, image as a path, no decoded image."""
    out = {}
    for r in rows:
        r = dict(r)
        img = r.pop("decoded_image")
        r["image"] = img
        out[r["pid"]] = r
    return out


def mathverse_rows() -> list[dict[str, Any]]:
    md = {"split": "testmini", "source": "Geo3D_collected", "subject": "Solid Geometry", "subfield": "Length"}
    full = (
        "A soft drink can has a height of 13 cm and a radius of 3 cm. Find L, the length of the longest "
        "straw that fits."
    )
    rows = []
    versions = [
        ("Text Dominant", full, "images_version_1-4/image_1.png"),
        ("Text Lite", "The radius is 3 cm. Find L.", "images_version_1-4/image_1.png"),
        ("Vision Intensive", "The radius is 3 cm. Find L.", "images_version_1-4/image_1.png"),
        ("Vision Dominant", "Find L.", "images_version_5/image_1.png"),
        ("Vision Only", "", "images_version_6/image_1.png"),
    ]
    for k, (ver, q, img) in enumerate(versions, 1):
        rows.append(
            {
                "sample_index": str(k),
                "problem_index": "1",
                "problem_version": ver,
                "question": q,
                "image": Img(img),
                "answer": "14",
                "question_type": "free-form",
                "metadata": md,
                "query_wo": f"Please directly answer the question.\nQuestion: {q}",
                "query_cot": "...",
                "question_for_eval": full,
            }
        )
    mc_q = (
        "As shown in the figure, AB parallel CD, then angle 2 is equal to ()"
        "\nChoices:\nA:50°\nB:60°\nC:65°\nD:90°"
    )
    mc_eval = mc_q + "\nE:120°"
    md2 = {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Angle"}
    rows.append(
        {
            "sample_index": "6",
            "problem_index": "2",
            "problem_version": "Text Dominant",
            "question": mc_q,
            "image": Img("images_version_1-4/image_2.png"),
            "answer": "C",
            "question_type": "multi-choice",
            "metadata": md2,
            "query_wo": "...",
            "query_cot": "...",
            "question_for_eval": mc_q,
        }
    )
    rows.append(
        {
            "sample_index": "7",
            "problem_index": "2",
            "problem_version": "Vision Only",
            "question": "",
            "image": Img("images_version_6/image_2.png"),
            "answer": "C",
            "question_type": "multi-choice",
            "metadata": md2,
            "query_wo": "...",
            "query_cot": "...",
            "question_for_eval": mc_eval,
        }
    )
    return rows


def mathverse_text_only_rows() -> list[dict[str, Any]]:
    r = dict(mathverse_rows()[0], sample_index="101", problem_version="Text Only", image=None)
    return [r]


def mathvision_rows() -> list[dict[str, Any]]:
    return [
        {
            "id": "1",
            "question": "<image1>\nHow many triangles are there?",
            "options": ["1", "2", "3", "4", "5"],
            "image": "images/1.jpg",
            "decoded_image": Img("1.jpg"),
            "answer": "C",
            "solution": None,
            "level": 1,
            "subject": "counting",
        },
        {
            "id": "2",
            "question": "Which picture shows the cube from above?\n<image1>",
            "options": ["A", "B", "C", "D", "E"],
            "image": "images/2.jpg",
            "decoded_image": Img("2.jpg"),
            "answer": "B",
            "solution": None,
            "level": 3,
            "subject": "descriptive geometry",
        },
        {
            "id": "3",
            "question": "<image1>\nFind the length of the diagonal.",
            "options": [],
            "image": "images/3.jpg",
            "decoded_image": Img("3.jpg"),
            "answer": "2\\sqrt{3}",
            "solution": "...",
            "level": 4,
            "subject": "metric geometry - length",
        },
        {
            "id": "4",
            "question": "How many dots? <image1>",
            "options": [],
            "image": "images/4.jpg",
            "decoded_image": Img("4.jpg"),
            "answer": "7",
            "solution": None,
            "level": 1,
            "subject": "counting",
        },
    ]


def _wemath_row(gid: str, key: str, number: int, concept: str, question: str, option: str, answer: str,
                image: str) -> dict[str, Any]:
    return {
        "ID": gid,
        "split": "testmini",
        "knowledge concept": concept,
        "question": question,
        "option": option,
        "answer": answer,
        "image_path": Img(image),
        "key": key,
        "question number": number,
        "knowledge concept description": "Area = length x width",
    }


def wemath_rows() -> list[dict[str, Any]]:
    """Two problem groups in the hub schema: a 2-step one (``2steps_1``, ``2steps_2``, ``2steps_multi``) and a
    3-step one; as in We-Math, all rows of a group share ``ID`` (here both groups are ``ID`` 1, one in each
    step family) and the images of the two families have the same file names in different folders."""
    opts = "A. 9; B. 10; C. 11; D. 12; E. No correct answer"
    return [
        _wemath_row("1", "2steps_1", 1, "Area of rectangles", "What is the area of the rectangle?", opts, "D",
                    "2steps/image/1-1.png"),
        _wemath_row("1", "2steps_2", 2, "Perimeter of rectangles", "What is the perimeter?",
                    "A. 14; B. 15; C. 16; D. 17; E. No correct answer", "E", "2steps/image/1-2.png"),
        _wemath_row("1", "2steps_multi", 3, "Area of rectangles", "Combine both steps.",
                    "A. 1; B. 2; C. 3; D. 4; E. No correct answer", "A", "2steps/image/1-multi.png"),
        _wemath_row("1", "3steps_1", 4, "Angles", "What is angle 1?", "A. 30°; B. 45°; C. 60°; D. 90°", "B",
                    "3steps/image/1-1.png"),
        _wemath_row("1", "3steps_2", 5, "Angles", "What is angle 2?", "A. 30°; B. 45°; C. 60°; D. 90°", "C",
                    "3steps/image/1-2.png"),
        _wemath_row("1", "3steps_3", 6, "Triangles", "What is angle 3?", "A. 30°; B. 45°; C. 60°; D. 90°", "A",
                    "3steps/image/1-3.png"),
        _wemath_row("1", "3steps_multi", 7, "Triangles", "Which angle is the largest?",
                    "A. 30°; B. 45°; C. 60°; D. 90°", "D", "3steps/image/1-multi.png"),
    ]


def dynamath_rows(variant: int) -> list[dict[str, Any]]:
    return [
        {
            "id": "1",
            "question": "What is the period of this function? "
            "Answer the question with a floating-point number.",
            "image": f"image/v{variant}_1.png",
            "decoded_image": Img(f"v{variant}_1.png"),
            "ground_truth": "2.0944",
            "answer_type": "float",
            "subject": "analytic geometry",
            "knowledge_level": "high school",
        },
        {
            "id": "2",
            "question": "Is Dark Magenta greater than Rosy Brown? Choices: (A) yes (B) no",
            "image": f"image/v{variant}_2.png",
            "decoded_image": Img(f"v{variant}_2.png"),
            "ground_truth": "B",
            "answer_type": "multiple choice",
            "subject": "statistics",
            "knowledge_level": "elementary school",
        },
        {
            "id": "3",
            "question": "Which month is the hottest on average?",
            "image": f"image/v{variant}_3.png",
            "decoded_image": Img(f"v{variant}_3.png"),
            "ground_truth": "May",
            "answer_type": "text",
            "subject": "statistics",
            "knowledge_level": "elementary school",
        },
    ]


def logicvista_json() -> dict[str, dict[str, Any]]:
    def row(name, q, a, skill):
        return {
            "imagename": Img(name),
            "question": q,
            "answer": a,
            "reasoning": "...",
            "skill": [skill],
            "capability": ["diagram"],
            "imagesource": "aptitudetests",
            "sourcelink": "https://example.org",
        }

    return {
        "v1_0": row(
            "v1_0.png",
            "What choice (A, B, C, or D) should be in place of the question mark?",
            "C",
            "inductive",
        ),
        "v1_1": row(
            "v1_1.png", "Which choices in the image (A-D) belong to the green category?", "A, C", "inductive"
        ),
        "v1_4": row("v1_4.png", "Who is the odd-one-out? Select answers from A-I", "G", "inductive"),
        "v1_19": row(
            "v1_19.png",
            "How many triangles will be in the 6th shape? Select answers from A-D. \n "
            "A) 10 B) 12 C) 14 D) 16",
            "C",
            "inductive",
        ),
        "v1_20": row(
            "v1_20.png",
            "Which is the correct answer according to the image? Select from 1-5",
            "3",
            "deductive",
        ),
    }


def logicvista_hub_rows() -> list[dict[str, Any]]:
    out = []
    for key, r in logicvista_json().items():
        out.append(
            {
                "question": r["question"],
                "image": r["imagename"],
                "answer": r["answer"],
                "skill": r["skill"],
                "id": key,
            }
        )
    return out


def mmmu_rows(subject: str, split: str = "validation") -> list[dict[str, Any]]:
    blank = {f"image_{k}": None for k in range(1, 8)}
    return [
        {
            **blank,
            "id": f"{split}_{subject}_1",
            "question": "<image 1> What is the total cost?",
            "options": "['$6', '$7', '$8', '$9']",
            "explanation": "",
            "image_1": Img(f"{subject}1.png", size=(30, 20)),
            "img_type": "['Tables']",
            "answer": "B",
            "topic_difficulty": "Easy",
            "question_type": "multiple-choice",
            "subfield": "Financial Accounting",
        },
        {
            **blank,
            "id": f"{split}_{subject}_2",
            "question": "Compare <image 1> and <image 2>. Which is larger?",
            "options": "['<image 1>', '<image 2>', 'equal']",
            "explanation": "",
            "image_1": Img(f"{subject}2a.png", size=(30, 20)),
            "image_2": Img(f"{subject}2b.png", (0, 0, 200), (40, 40)),
            "img_type": "['Diagrams']",
            "answer": "A",
            "topic_difficulty": "Medium",
            "question_type": "multiple-choice",
            "subfield": "Managerial Accounting",
        },
        {
            **blank,
            "id": f"{split}_{subject}_3",
            "question": "<image 1> Compute the ratio.",
            "options": "[]",
            "explanation": "",
            "image_1": Img(f"{subject}3.png"),
            "img_type": "['Tables']",
            "answer": "['3.43', '24/7']",
            "topic_difficulty": "Hard",
            "question_type": "open",
            "subfield": "Ratios",
        },
    ]


def virl_rows() -> list[dict[str, Any]]:
    return [
        {
            "question": "<image>What is the value of x?",
            "answer": "\\boxed{18}",
            "PassRate_32BTrained": 0.5,
            "PassRate_7BTrained": 0.25,
            "category": "(GradeSchool) Geometric",
            "source": "MM-Math",
            "qid": "q1",
            "image": [Img("virl_1.jpg")],
        },
        {
            "question": "<image>Which option is correct?\nChoices:\nA. 2\nB. 4\nC. 6\nD. 8",
            "answer": "\\boxed{B}",
            "PassRate_32BTrained": 1.0,
            "PassRate_7BTrained": 0.5,
            "category": "(GradeSchool) Non-Geo Math",
            "source": "R1-OneVision",
            "qid": "q2",
            "image": [Img("virl_2a.jpg"), Img("virl_2b.jpg", (0, 0, 255))],
        },
        {
            "question": "<image>Find y.",
            "answer": "2\\sqrt{3}",
            "PassRate_32BTrained": 0.1,
            "PassRate_7BTrained": 0.0,
            "category": "Spatial",
            "source": "Geo170K",
            "qid": "q3",
            "image": [Img("virl_3.jpg")],
        },
    ]


def geometry3k_rows() -> list[dict[str, Any]]:
    return [
        {
            "images": [Img("g1.png")],
            "problem": "<image>Find x.",
            "answer": "3",
            "id": 1,
            "choices": ["1", "3", "5", "7"],
            "ground_truth": "B",
        },
        {
            "images": [Img("g2.png")],
            "problem": "<image>Find the area of the figure.",
            "answer": "12\\sqrt{3}",
            "id": 2,
            "choices": ["6", "12\\sqrt{3}", "24", "36"],
            "ground_truth": "B",
        },
    ]


def training_set_with_bad_rows(data: Path) -> bytes:
    """A JSONL training set of 40 good rows in two files and 3 bad ones: a row without an answer, a line with a
    non-UTF-8 byte and a line of invalid JSON (the last line of ``part2.jsonl``). Returns ``part2.jsonl``'s bytes
    without that invalid line (2 bad rows of 42)."""
    data.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), "white").save(data / "a.png")
    good = [json.dumps({"question": f"How many bars? ({i})", "answer": str(i), "image": "a.png"}) for i in range(40)]
    (data / "part1.jsonl").write_text("\n".join(good[:20]) + "\n")
    raw = b"".join(x.encode() + b"\n" for x in good[20:])
    latin1 = b'{"question": "caf\xe9?", "answer": "1", "image": "a.png"}\n'   # one non-UTF-8 byte
    raw = b'{"question": "q?", "image": "a.png"}\n' + raw + latin1
    (data / "part2.jsonl").write_bytes(raw + b"{not json\n")
    return raw
