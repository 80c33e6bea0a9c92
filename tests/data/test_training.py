"""Training-set loader: ViRL39K and Geometry3K schemas in parquet / save_to_disk / JSON layouts."""

from __future__ import annotations

import pytest

from acrl.data import ImageOptionsProblem, load_training_set
from acrl.data.training import detect_training_schema

from .fixtures import (
    Img,
    geometry3k_rows,
    training_set_with_bad_rows,
    virl_rows,
    write_json,
    write_parquet,
    write_saved,
)


def test_virl39k_parquet_with_image_folder(tmp_path):
    # the release parquet names images by path; images.zip unpacks next to it
    rows = virl_rows()
    write_json(rows, tmp_path / "unused.json", tmp_path, image_dir="images")
    (tmp_path / "unused.json").unlink()
    table_rows = [dict(r, image=[f"images/{im.name}" for im in r["image"]]) for r in rows]
    write_parquet(table_rows, tmp_path / "39Krelease.parquet")
    res = load_training_set(tmp_path)
    assert res.layout == "parquet" and not res.bad and len(res) == 3
    ps = {p.id: p for p in res.problems}
    p1 = ps["virl39k-39Krelease-q1"]
    assert p1.answer == "18" and p1.answer_type == "integer" and p1.question == "What is the value of x?"
    assert p1.family == "virl39k" and p1.category == "(GradeSchool) Geometric"
    assert p1.meta["source_dataset"] == "MM-Math" and p1.meta["PassRate_7BTrained"] == 0.25
    p2 = ps["virl39k-39Krelease-q2"]
    assert p2.answer_type == "multiple_choice" and p2.choices == ["2", "4", "6", "8"] and p2.answer == "B"
    assert p2.image.width > 2 * 24  # two images side by side
    assert ps["virl39k-39Krelease-q3"].answer_type == "free_form"


def test_virl39k_json_and_missing_image(tmp_path):
    rows = virl_rows() + [dict(virl_rows()[0], qid=f"x{i}") for i in range(20)]
    rows[2] = dict(rows[2], image=[Img("lost.jpg", absent=True)])
    write_json(rows, tmp_path / "virl.jsonl", tmp_path, jsonl=True)
    res = load_training_set(tmp_path, limit=20)
    assert len(res) == 20 and [b.reason for b in res.bad] == ["missing image file 'images/lost.jpg'"]


def test_geometry3k_hub_parquet_and_save_to_disk(tmp_path):
    write_parquet(geometry3k_rows(), tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    write_parquet(geometry3k_rows()[:1], tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    write_saved({"train": geometry3k_rows(), "test": geometry3k_rows()[:1]}, tmp_path / "saved")
    for root in (tmp_path / "hub", tmp_path / "saved"):
        res = load_training_set(root)
        ps = {p.id: p for p in res.problems}
        assert sorted(ps) == ["geometry3k-train-1", "geometry3k-train-2"]
        g2 = ps["geometry3k-train-2"]
        assert (
            g2.answer == "12\\sqrt{3}"
            and g2.answer_type == "free_form"
            and g2.question == "Find the area of the figure."
        )
        assert g2.meta["ground_truth"] == "B" and g2.meta["choices"][1] == "12\\sqrt{3}"
        assert ps["geometry3k-train-1"].answer_type == "integer"
    assert len(load_training_set(tmp_path / "hub", split="test")) == 1
    with pytest.raises(ValueError, match="split 'validation' not found"):
        load_training_set(tmp_path / "hub", split="validation")


def test_letter_gold_without_text_options(tmp_path):
    rows = [dict(virl_rows()[0], question="<image>Which figure is different?", answer="\\boxed{D}")]
    write_parquet(rows, tmp_path / "train.parquet")
    p = load_training_set(tmp_path).problems[0]
    assert isinstance(p, ImageOptionsProblem) and p.answer == "D" and p.choices == list("ABCD")


def test_schema_detection_and_errors(tmp_path):
    assert detect_training_schema({"qid": 1, "question": "", "answer": "", "image": []}) == "virl39k"
    assert detect_training_schema({"problem": "", "answer": "", "images": []}) == "geometry3k"
    assert detect_training_schema({"prompt": "", "ground_truth": "", "image_path": ""}) == "generic"
    with pytest.raises(ValueError, match="not a visual QA row"):
        detect_training_schema({"text": "hi"})
    (tmp_path / "meta.json").write_text('{"a": {"b": 1}}')
    with pytest.raises(ValueError, match="no rows with a question"):
        load_training_set(tmp_path)


def test_bad_rows_are_counted_named_and_the_rest_of_their_file_kept(tmp_path):
    """A non-UTF-8 byte dropped a whole file, an invalid JSON line read as "missing column", a first row without an
    answer rejected its file."""
    training_set_with_bad_rows(tmp_path)
    res = load_training_set(tmp_path, max_bad_fraction=0.2)
    assert len(res.problems) == 40
    reasons = sorted(b.reason for b in res.bad)
    assert len(reasons) == 3 and any("not valid UTF-8" in r for r in reasons) and any("invalid JSON" in r
                                                                                       for r in reasons)


def test_a_truncated_parquet_file_is_named(tmp_path):
    """A truncated parquet file was a traceback that named no file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["q?"] * 50, "answer": ["1"] * 50, "image": ["a.png"] * 50}),
                   tmp_path / "train.parquet")
    blob = (tmp_path / "train.parquet").read_bytes()
    (tmp_path / "train.parquet").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="train.parquet"):
        load_training_set(tmp_path / "train.parquet")
