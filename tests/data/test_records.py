"""Reading local copies of datasets (:mod:`acrl.data.records`): split names, the storage layout, raw rows of every
JSON shape (a bad line is one bad row), image cells of every kind (a missing file is never another of the same
name), images composed side by side."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from acrl.data.records import (
    BadRow,
    BadRowError,
    ImageResolver,
    LoadResult,
    compose_images,
    detect_layout,
    iter_records,
    open_image,
    split_token,
)


@pytest.mark.parametrize("name, split", [
    ("testmini-00000-of-00001-ab12.parquet", "testmini"), ("annot_testmini.json", "testmini"),
    ("default/test/0000.parquet", "test"), ("data/validation-00000-of-00002.parquet", "validation"),
    ("train.jsonl", "train"),
])
def test_the_split_of_a_data_file_from_its_name(name, split):
    assert split_token(Path(name)) == split


def _png(color="red", size=(8, 6)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_the_layout_prefers_a_saved_dataset_then_parquet_then_json(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    (tmp_path / "dataset_info.json").write_text("{}")                  # describes a dataset: not rows
    layout = detect_layout(tmp_path)
    assert (layout.kind, layout.items) == ("json", [tmp_path / "a.json"])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "test.parquet").write_bytes(b"")
    assert detect_layout(tmp_path).kind == "parquet"
    (tmp_path / "saved" / "train").mkdir(parents=True)
    (tmp_path / "saved" / "dataset_dict.json").write_text("{}")
    (tmp_path / "saved" / "train" / "state.json").write_text("{}")       # a split folder of the same copy
    (tmp_path / "saved" / "train" / "dataset_info.json").write_text("{}")
    layout = detect_layout(tmp_path)
    assert (layout.kind, layout.items) == ("save_to_disk", [tmp_path / "saved"])
    one = detect_layout(tmp_path / "sub" / "test.parquet")
    assert (one.kind, one.note) == ("parquet", "single file")


def test_rows_of_every_json_shape(tmp_path):
    shapes = {"list.json": [{"q": 1}, 7], "mapping.json": {"k1": {"q": 2}, "k2": {"q": 3}},
              "wrapped.json": {"info": "x", "data": [{"q": 4}]}}
    for name, data in shapes.items():
        (tmp_path / name).write_text(json.dumps(data))
    rows = {}
    for rec in iter_records(detect_layout(tmp_path)):
        rows.setdefault(Path(rec.source).name, []).append(rec.row)
    assert rows["list.json"] == [{"q": 1}, {"__error__": "not an object"}]
    assert rows["mapping.json"] == [{"__key__": "k1", "q": 2}, {"__key__": "k2", "q": 3}]
    assert rows["wrapped.json"] == [{"q": 4}]


def test_a_bad_jsonl_line_is_one_bad_row_and_an_unreadable_file_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"q": 1}\n\n{"q": "caf\xe9"}\n{not json\n[1]\n{"q": 2}\n')
    (tmp_path / "b.json").write_bytes(b'[{"q": "\xff"}]')
    recs = list(iter_records(detect_layout(tmp_path)))
    got = [(Path(r.source).name, r.row) for r in recs]
    assert got[0] == ("a.jsonl", {"q": 1}) and got[4] == ("a.jsonl", {"q": 2})
    assert got[1][1]["__error__"] == "line 3: not valid UTF-8 (byte 0xe9 at column 11)"
    assert got[2][1]["__error__"].startswith("line 4: invalid JSON")
    assert got[3][1] == {"__error__": "line 5: not an object"}
    assert got[5][0] == "b.json" and "not valid UTF-8" in got[5][1]["__error__"]
    with pytest.raises(ValueError, match="b.json: cannot read annotations"):
        list(iter_records(detect_layout(tmp_path / "b.json")))        # named alone: the file itself is refused


def test_only_the_accepted_splits_are_read(tmp_path):
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"q": split}) + "\n")
    seen = []

    def accept(token, tokens):
        seen.append(sorted(tokens))
        return token == "test"

    assert [r.row["q"] for r in iter_records(detect_layout(tmp_path), accept)] == ["test"]
    assert seen[0] == ["test", "train"]


def test_image_cells_of_every_kind(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_png("blue"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    r = ImageResolver(tmp_path)
    assert open_image("a.png", r).getpixel((0, 0)) == (0, 0, 255)                    # found under images/
    assert open_image({"bytes": _png(), "path": "x.png"}, r).size == (8, 6)
    assert open_image(memoryview(_png()), r).mode == "RGB"
    assert open_image({"bytes": None, "path": str(tmp_path / "images" / "a.png")}, r).size == (8, 6)
    assert open_image(Image.new("L", (2, 2)), r).mode == "RGB"
    for cell, reason in ((None, "missing image"), ("", "missing image"), (float("nan"), "missing image"),
                         ({"bytes": None, "path": None}, "missing image"), ("b.png", "missing image file 'b.png'"),
                         (str(tmp_path / "gone.png"), "missing image file"), ("bad.png", "undecodable image"),
                         (3, "image cell of unexpected type int")):
        with pytest.raises(BadRowError, match=reason):
            open_image(cell, r)


def test_a_relative_path_is_looked_up_only_where_it_is_written(tmp_path):
    (tmp_path / "v2" / "images").mkdir(parents=True)
    (tmp_path / "v2" / "images" / "image_1.png").write_bytes(_png())
    r = ImageResolver(tmp_path)
    assert r.find("image_1.png", [tmp_path / "v2"]) == tmp_path / "v2" / "images" / "image_1.png"
    with pytest.raises(BadRowError, match="missing image file 'v1/image_1.png'"):
        r.find("v1/image_1.png")                                       # another folder's file of the same name
    assert r.find("v2\\images\\image_1.png") == tmp_path / "v2" / "images" / "image_1.png"


def test_images_side_by_side_at_a_common_height():
    a, b = Image.new("RGB", (40, 20), "red"), Image.new("RGB", (10, 10), "blue")
    assert compose_images([a]) is a
    out = compose_images([a, b], labels=["image 1", "image 2"], gap=4)
    assert out.size == (40 + 20 + 3 * 4, 20 + 22 + 2 * 4)              # b scaled to 20 high, a label band of 22
    assert out.getpixel((4, 4 + 22)) == (255, 0, 0) and out.getpixel((4 + 40 + 4, 4 + 22)) == (0, 0, 255)
    assert compose_images([a, b], max_height=10).height == 10 + 2 * 12
    with pytest.raises(ValueError, match="no images"):
        compose_images([])


def test_a_load_result_describes_itself_in_one_line():
    res = LoadResult([], [BadRow(f"r{i}", "missing image") for i in range(4)], layout="json", path="/d")
    assert res.describe() == ("0 problems, 4 bad rows (json at /d); e.g. r0: missing image; r1: missing image; "
                              "r2: missing image")
    assert len(res) == 0 and list(res) == []
