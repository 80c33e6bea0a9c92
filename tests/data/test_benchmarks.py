"""Benchmark loaders on tiny fixtures in each benchmark's real schema and storage layout."""

from __future__ import annotations

import pytest
from PIL import Image

from acrl.data import ImageOptionsProblem, LoadResult, grade_problem, load_all, load_benchmark
from acrl.data.benchmarks import VISION_ONLY_PROMPT, find_benchmark_dirs
from acrl.problem import Problem

from .fixtures import (
    Img,
    drop,
    dynamath_rows,
    logicvista_hub_rows,
    logicvista_json,
    mathverse_rows,
    mathverse_text_only_rows,
    mathvision_rows,
    mathvista_json,
    mathvista_rows,
    mmmu_rows,
    wemath_rows,
    write_json,
    write_parquet,
    write_saved,
)


def by_id(res: LoadResult) -> dict[str, Problem]:
    return {p.id: p for p in res.problems}


def check_image(p: Problem) -> None:
    assert isinstance(p.image, Image.Image) and p.image.mode == "RGB" and p.image.width > 0


# ------------------------------------------------------------------------------------------------------------
# MathVista
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mathvista_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mathvista")
    rows = mathvista_rows()
    pq_dir = root / "hub"
    write_parquet(rows, pq_dir / "data" / "testmini-00000-of-00001-6b8f1a2c.parquet")
    write_parquet(
        [dict(r, pid=f"t{r['pid']}", answer="") for r in rows[:2]],
        pq_dir / "data" / "test-00000-of-00002-aa11.parquet",
    )
    write_saved({"testmini": rows}, root / "saved")
    js = root / "official"
    write_json(mathvista_json(rows), js / "annot_testmini.json", js)
    return {"parquet": pq_dir, "save_to_disk": root / "saved", "json": js}


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk", "json"])
def test_mathvista_layouts(mathvista_dirs, layout):
    res = load_benchmark("mathvista", mathvista_dirs[layout])
    assert res.layout == layout and not res.bad
    ps = by_id(res)
    assert sorted(ps) == [f"mathvista-testmini-{i}" for i in "12345"]
    for p in ps.values():
        check_image(p)
        assert p.family == "mathvista" and p.source
    fl = ps["mathvista-testmini-1"]
    assert fl.answer_type == "float" and fl.tolerance == pytest.approx(0.05)
    assert fl.question.startswith("What is the length of segment AB? (Unit: cm)")
    assert "rounded to 1 decimal place" in fl.question and "Hint:" not in fl.question
    assert fl.category == "geometry problem solving" and fl.difficulty == "high school"
    assert fl.meta["precision"] == 1.0 and fl.meta["unit"] == "cm" and fl.meta["skills"]
    mc = ps["mathvista-testmini-2"]
    assert mc.answer_type == "multiple_choice" and mc.choices == ["3", "4", "5", "6"] and mc.answer == "C"
    assert mc.meta["answer_text"] == "5" and "Choices" not in mc.question
    assert (
        ps["mathvista-testmini-3"].answer_type == "integer" and ps["mathvista-testmini-3"].tolerance is None
    )
    assert ps["mathvista-testmini-4"].tolerance == pytest.approx(0.005)
    assert ps["mathvista-testmini-5"].answer_type == "free_form"


def test_mathvista_precision_grading(mathvista_dirs):
    ps = by_id(load_benchmark("mathvista", mathvista_dirs["parquet"]))
    p1, p4 = ps["mathvista-testmini-1"], ps["mathvista-testmini-4"]
    assert (
        grade_problem("\\boxed{1.23}", p1) and grade_problem("1.16 cm", p1) and not grade_problem("1.3", p1)
    )
    assert grade_problem("0.254", p4) and not grade_problem("0.256", p4) and grade_problem("1/4", p4)
    assert grade_problem("5", ps["mathvista-testmini-2"]) and grade_problem("(C)", ps["mathvista-testmini-2"])


def test_mathvista_split_and_limit(mathvista_dirs):
    res = load_benchmark("mathvista", mathvista_dirs["parquet"], split="test", max_bad_fraction=1.0)
    assert not res.problems and len(res.bad) == 2 and all("missing answer" in b.reason for b in res.bad)
    res = load_benchmark("mathvista", mathvista_dirs["parquet"], limit=2)
    assert len(res) == 2
    with pytest.raises(ValueError, match="split 'val' not found.*available: test, testmini"):
        load_benchmark("mathvista", mathvista_dirs["parquet"], split="val")


def test_mathvista_bad_rows_counted_and_threshold(tmp_path):
    ok = tmp_path / "ok"
    write_parquet(mathvista_rows(n_extra=16, broken=1), ok / "data" / "testmini-00000-of-00001.parquet")
    res = load_benchmark("mathvista", ok)
    assert len(res.problems) == 21 and len(res.bad) == 1
    assert res.bad[0].id == "mathvista-testmini-900" and "undecodable image" in res.bad[0].reason
    bad = tmp_path / "bad"
    write_parquet(mathvista_rows(n_extra=3, broken=2), bad / "data" / "testmini-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"2 of 10 rows unusable") as e:
        load_benchmark("mathvista", bad)
    assert str(bad) in str(e.value) and "mathvista-testmini-900" in str(e.value)
    assert len(load_benchmark("mathvista", bad, max_bad_fraction=0.25).bad) == 2


def test_missing_answer_image_file_and_column_are_bad_rows(tmp_path):
    rows = mathvista_json(mathvista_rows(n_extra=20))
    rows["3"]["image"] = Img("gone.jpg", absent=True)
    rows["4"]["answer"] = ""
    del rows["5"]["question"]
    write_json(rows, tmp_path / "annot_testmini.json", tmp_path)
    res = load_benchmark("mathvista", tmp_path, max_bad_fraction=0.2)
    reasons = {b.id: b.reason for b in res.bad}
    assert reasons == {
        "mathvista-testmini-3": "missing image file 'images/gone.jpg'",
        "mathvista-testmini-4": "missing answer",
        "mathvista-testmini-5": "missing column 'question'",
    }
    assert len(res.problems) == 22


# ------------------------------------------------------------------------------------------------------------
# MathVerse
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mathverse_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mathverse")
    write_parquet(mathverse_rows(), root / "hub" / "testmini.parquet")
    write_parquet(mathverse_text_only_rows(), root / "hub" / "testmini_text_only.parquet")
    write_json(
        mathverse_rows(), root / "official" / "testmini.json", root / "official" / "images", image_dir=""
    )
    write_saved({"testmini": mathverse_rows()}, root / "saved")
    return {"parquet": root / "hub", "json": root / "official", "save_to_disk": root / "saved"}


@pytest.mark.parametrize("layout", ["parquet", "json", "save_to_disk"])
def test_mathverse_versions(mathverse_dirs, layout):
    res = load_benchmark("mathverse", mathverse_dirs[layout])
    assert not res.bad and len(res) == 7
    ps = by_id(res)
    assert [ps[f"mathverse-testmini-{i}"].category for i in range(1, 6)] == [
        "Text Dominant",
        "Text Lite",
        "Vision Intensive",
        "Vision Dominant",
        "Vision Only",
    ]
    for p in ps.values():
        check_image(p)
        assert p.meta["question_for_eval"]
    assert ps["mathverse-testmini-4"].question == "Find L."
    vo = ps["mathverse-testmini-5"]
    assert vo.question == VISION_ONLY_PROMPT and "soft drink" not in vo.question_with_choices()
    assert vo.answer_type == "integer" and vo.answer == "14"
    mc = ps["mathverse-testmini-6"]
    assert (
        mc.answer_type == "multiple_choice"
        and mc.choices == ["50°", "60°", "65°", "90°"]
        and mc.answer == "C"
    )
    assert "Choices" not in mc.question and mc.question.endswith("equal to ()")
    vmc = ps["mathverse-testmini-7"]
    # Vision Only: the options are drawn; their texts come from question_for_eval, the reasoner sees letters
    assert isinstance(vmc, ImageOptionsProblem) and vmc.answer == "C"
    assert vmc.choices == ["50°", "60°", "65°", "90°", "120°"] and vmc.meta["option_texts"] == vmc.choices
    assert "65°" not in vmc.question_with_choices() and "(E)" in vmc.question_with_choices()
    assert grade_problem("C", vmc) and not grade_problem("B", vmc)
    assert grade_problem("The angle is 65°, so \\boxed{65^\\circ}", vmc) and not grade_problem("60°", vmc)


def test_mathverse_version_filter_and_text_only_split(mathverse_dirs):
    res = load_benchmark("mathverse", mathverse_dirs["parquet"], versions=["Vision Only"])
    assert {p.category for p in res.problems} == {"Vision Only"} and len(res) == 2
    txt = load_benchmark("mathverse", mathverse_dirs["parquet"], split="testmini_text_only")
    assert len(txt) == 1 and txt.problems[0].image is None and txt.problems[0].category == "Text Only"
    with pytest.raises(TypeError, match="unknown option"):
        load_benchmark("mathverse", mathverse_dirs["parquet"], subjects=["x"])


# ------------------------------------------------------------------------------------------------------------
# MathVision
# ------------------------------------------------------------------------------------------------------------


def test_mathvision_jsonl_and_parquet(tmp_path):
    write_json(
        drop(mathvision_rows(), "image"),
        tmp_path / "official" / "data" / "test.jsonl",
        tmp_path / "official",
        jsonl=True,
    )
    # the official jsonl names its image "image"; the fixture's decoded_image column holds it
    jl = tmp_path / "official" / "data" / "test.jsonl"
    jl.write_text(jl.read_text().replace('"decoded_image"', '"image"'))
    write_parquet(mathvision_rows(), tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    write_parquet(mathvision_rows()[:2], tmp_path / "hub" / "data" / "testmini-00000-of-00001.parquet")
    for root in (tmp_path / "official", tmp_path / "hub"):
        res = load_benchmark("mathvision", root)
        ps = by_id(res)
        assert not res.bad and sorted(ps) == [f"mathvision-test-{i}" for i in "1234"]
        mc = ps["mathvision-test-1"]
        assert mc.choices == ["1", "2", "3", "4", "5"] and mc.answer == "C" and "<image1>" not in mc.question
        assert mc.category == "counting" and mc.difficulty == "1"
        pic = ps["mathvision-test-2"]
        assert isinstance(pic, ImageOptionsProblem) and pic.choices == list("ABCDE") and pic.answer == "B"
        assert (
            ps["mathvision-test-3"].answer_type == "free_form"
            and ps["mathvision-test-3"].answer == "2\\sqrt{3}"
        )
        assert ps["mathvision-test-4"].answer_type == "integer"
        assert grade_problem("\\sqrt{12}", ps["mathvision-test-3"])
    mini = load_benchmark("mathvision", tmp_path / "hub", split="testmini")
    assert [p.id for p in mini.problems] == ["mathvision-testmini-1", "mathvision-testmini-2"]


# ------------------------------------------------------------------------------------------------------------
# WeMath
# ------------------------------------------------------------------------------------------------------------


def test_wemath_parquet_and_json(tmp_path):
    write_parquet(wemath_rows(), tmp_path / "hub" / "data" / "testmini-00000-of-00001-adbfe22d.parquet")
    write_json(
        wemath_rows(), tmp_path / "official" / "testmini.json", tmp_path / "official", image_dir="testmini"
    )
    for root in (tmp_path / "hub", tmp_path / "official"):
        res = load_benchmark("wemath", root)
        ps = by_id(res)
        assert not res.bad and len(ps) == 7
        # ids from the benchmark's own keys: the group ID plus the sub-question key, no "~2" suffixes
        assert sorted(ps) == sorted(f"wemath-testmini-1-{k}" for k in (
            "2steps_1", "2steps_2", "2steps_multi", "3steps_1", "3steps_2", "3steps_3", "3steps_multi"))
        p = ps["wemath-testmini-1-2steps_1"]
        assert p.choices == ["9", "10", "11", "12", "No correct answer"] and p.answer == "D"
        assert (
            p.category == "Area of rectangles" and p.difficulty == "2 steps" and p.meta["key"] == "2steps_1"
        )
        assert p.meta["wemath_id"] == "1" and "duplicate_of" not in p.meta
        assert ps["wemath-testmini-1-3steps_multi"].difficulty == "3 steps"
        assert grade_problem("No correct answer", ps["wemath-testmini-1-2steps_2"])


def test_wemath_ids_do_not_depend_on_row_order_or_bad_rows(tmp_path):
    rows = wemath_rows()
    rows[0] = dict(rows[0], image_path=Img("2steps/image/1-1.png", broken=True))
    write_parquet(rows, tmp_path / "a" / "testmini.parquet")
    write_parquet(list(reversed(rows)), tmp_path / "b" / "testmini.parquet")
    a = load_benchmark("wemath", tmp_path / "a", max_bad_fraction=0.5)
    b = load_benchmark("wemath", tmp_path / "b", max_bad_fraction=0.5)
    assert sorted(by_id(a)) == sorted(by_id(b)) and len(a) == 6
    # the bad row's id is in the same scheme as the problems' and names the sub-question it is
    assert [x.id for x in a.bad] == [x.id for x in b.bad] == ["wemath-testmini-1-2steps_1"]
    assert "wemath-testmini-1-2steps_1" not in by_id(a)


def test_missing_image_is_a_bad_row_never_a_file_of_the_same_name(tmp_path):
    """MathVerse's GitHub layout keeps image_1.png in every images_version_* folder: a missing
    images_version_5/image_1.png must not silently become another version's picture."""
    rows = mathverse_rows()
    root = tmp_path / "mathverse"
    write_json(rows, root / "testmini.json", root / "images", image_dir="")
    (root / "images" / "images_version_5" / "image_1.png").unlink()
    res = load_benchmark("mathverse", root, max_bad_fraction=0.5)
    assert [(b.id, b.reason) for b in res.bad] == [
        ("mathverse-testmini-4", "missing image file 'images_version_5/image_1.png'")]
    assert "mathverse-testmini-4" not in by_id(res) and len(res) == 6
    # We-Math: both step families have a 1-1.png; a missing one is a bad row too
    rows = wemath_rows()
    write_json(rows, tmp_path / "wemath" / "testmini.json", tmp_path / "wemath", image_dir="")
    (tmp_path / "wemath" / "2steps" / "image" / "1-1.png").unlink()
    (tmp_path / "wemath" / "elsewhere").mkdir()
    (tmp_path / "wemath" / "elsewhere" / "1-2.png").write_bytes(Img("x").png())
    res = load_benchmark("wemath", tmp_path / "wemath", max_bad_fraction=0.5)
    assert [b.id for b in res.bad] == ["wemath-testmini-1-2steps_1"]
    assert res.bad[0].reason == "missing image file '2steps/image/1-1.png'"


# ------------------------------------------------------------------------------------------------------------
# DynaMath
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dynamath_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamath")
    for v in (1, 2, 3):
        write_parquet(dynamath_rows(v), root / "hub" / "data" / f"sample{v}-00000-of-0000{v}.parquet")
        write_json(
            {
                r["id"]: {k: x for k, x in r.items() if k not in ("id", "image")}
                | {"image": r["decoded_image"]}
                for r in dynamath_rows(v)
            },
            root / "json" / f"sample_variant{v}" / "dataset.json",
            root / "json" / f"sample_variant{v}",
            image_dir="image",
        )
    write_saved({f"sample_variant{v}": dynamath_rows(v) for v in (1, 2, 3)}, root / "saved")
    return {"parquet": root / "hub", "json": root / "json", "save_to_disk": root / "saved"}


@pytest.mark.parametrize("layout", ["parquet", "json", "save_to_disk"])
def test_dynamath_all_variants(dynamath_dirs, layout):
    res = load_benchmark("dynamath", dynamath_dirs[layout])
    ps = by_id(res)
    assert not res.bad
    assert sorted(ps) == sorted(f"dynamath-{s}-v{v}" for s in "123" for v in (1, 2, 3))
    fl = ps["dynamath-1-v2"]
    assert fl.answer_type == "float" and fl.tolerance == pytest.approx(1e-3)
    assert fl.meta["seed"] == "1" and fl.meta["variant"] == 2
    assert fl.category == "analytic geometry" and fl.difficulty == "high school"
    mc = ps["dynamath-2-v3"]
    assert mc.choices == ["yes", "no"] and mc.answer == "B" and mc.question.endswith("Rosy Brown?")
    assert ps["dynamath-3-v1"].answer_type == "free_form"
    assert grade_problem("2.094", fl) and not grade_problem("2.09", fl) and grade_problem("no", mc)


def test_dynamath_one_variant(dynamath_dirs):
    for layout in ("parquet", "save_to_disk"):
        res = load_benchmark("dynamath", dynamath_dirs[layout], split="sample_variant2")
        assert sorted(p.id for p in res.problems) == ["dynamath-1-v2", "dynamath-2-v2", "dynamath-3-v2"]
    res = load_benchmark("dynamath", dynamath_dirs["parquet"], split="sample3")
    assert {p.meta["variant"] for p in res.problems} == {3}


# ------------------------------------------------------------------------------------------------------------
# LogicVista
# ------------------------------------------------------------------------------------------------------------


def test_logicvista_official_json_and_hub(tmp_path):
    write_json(
        logicvista_json(),
        tmp_path / "official" / "data" / "dataset.json",
        tmp_path / "official" / "data",
        image_dir="images",
    )
    write_parquet(logicvista_hub_rows(), tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    for root in (tmp_path / "official", tmp_path / "hub"):
        ps = by_id(load_benchmark("logicvista", root))
        assert sorted(ps) == sorted(
            f"logicvista-test-{k}" for k in ("v1_0", "v1_1", "v1_4", "v1_19", "v1_20")
        )
        single = ps["logicvista-test-v1_0"]
        assert (
            isinstance(single, ImageOptionsProblem)
            and single.choices == list("ABCD")
            and single.answer == "C"
        )
        assert single.category == "inductive"
        multi = ps["logicvista-test-v1_1"]
        assert (
            isinstance(multi, ImageOptionsProblem)
            and multi.answer == "A, C"
            and multi.choices == list("ABCD")
        )
        assert multi.meta["grading"] == "letter_set" and multi.meta["answer_letters"] == ["A", "C"]
        assert grade_problem("\\boxed{CA}", multi) and not grade_problem("A", multi)
        assert ps["logicvista-test-v1_4"].choices == list("ABCDEFGHI")
        inline = ps["logicvista-test-v1_19"]
        assert (
            inline.choices == ["10", "12", "14", "16"]
            and inline.answer == "C"
            and "10" not in inline.question
        )
        num = ps["logicvista-test-v1_20"]
        assert num.answer_type == "integer" and num.category == "deductive"


# ------------------------------------------------------------------------------------------------------------
# MMMU
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mmmu_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmmu")
    for subject in ("Accounting", "Art_Theory"):
        write_parquet(mmmu_rows(subject), root / subject / "validation-00000-of-00001.parquet")
        write_parquet(mmmu_rows(subject, "dev")[:1], root / subject / "dev-00000-of-00001.parquet")
    return root


def test_mmmu_subjects_images_and_options(mmmu_dir):
    res = load_benchmark("mmmu", mmmu_dir)
    ps = by_id(res)
    assert not res.bad and len(ps) == 6
    one = ps["mmmu-validation_Accounting_1"]
    assert (
        one.choices == ["$6", "$7", "$8", "$9"] and one.answer == "B" and one.answer_type == "multiple_choice"
    )
    assert one.category == "Accounting" and one.difficulty == "Easy" and one.image.size == (30, 20)
    two = ps["mmmu-validation_Art_Theory_2"]
    assert two.category == "Art_Theory" and two.meta["images_used"] == [1, 2] and "<image 1>" in two.question
    assert two.image.width > 30 + 40 and two.choices == ["<image 1>", "<image 2>", "equal"]
    op = ps["mmmu-validation_Accounting_3"]
    assert (
        op.answer == "3.43" and op.meta["accepted_answers"] == ["3.43", "24/7"] and op.answer_type == "float"
    )
    assert grade_problem("24/7", op) and grade_problem("3.43", op) and not grade_problem("3.5", op)
    first = by_id(load_benchmark("mmmu", mmmu_dir, mmmu_images="first"))
    assert first["mmmu-validation_Art_Theory_2"].image.size == (30, 20)
    only = load_benchmark("mmmu", mmmu_dir, subjects=["Art_Theory"])
    assert {p.category for p in only.problems} == {"Art_Theory"}
    dev = load_benchmark("mmmu", mmmu_dir, split="dev")
    assert sorted(p.id for p in dev.problems) == ["mmmu-dev_Accounting_1", "mmmu-dev_Art_Theory_1"]


def test_mmmu_save_to_disk_per_subject(tmp_path):
    for subject in ("Accounting", "Art_Theory"):
        write_saved({"validation": mmmu_rows(subject)}, tmp_path / subject)
    res = load_benchmark("mmmu", tmp_path)
    assert res.layout == "save_to_disk" and len(res) == 6 and not res.bad
    assert by_id(res)["mmmu-validation_Art_Theory_2"].image.width > 70


# ------------------------------------------------------------------------------------------------------------
# Layout detection and the multi-benchmark entry point
# ------------------------------------------------------------------------------------------------------------


def test_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark("mathvista", tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(
        ValueError,
        match=r"no dataset found at .*expected .*save_to_disk.*parquet.*annot_testmini"
        r".*found: notes.txt",
    ):
        load_benchmark("mathvista", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark 'mathvistaa'"):
        load_benchmark("mathvistaa", tmp_path)
    (tmp_path / "other.json").write_text('[{"foo": 1}]')
    with pytest.raises(ValueError, match="no rows for split testmini"):
        load_benchmark("mathvista", tmp_path)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file but not"):
        load_benchmark("mathvista", tmp_path / "x.bin")


def test_single_file_path(tmp_path):
    f = write_parquet(mathvista_rows(), tmp_path / "anything.parquet")
    assert len(load_benchmark("mathvista", f)) == 5


def test_transparent_png_becomes_white(tmp_path):
    rows = mathvista_rows()[:1]
    rows[0]["decoded_image"] = Img("t.png", transparent=True, size=(4, 4))
    write_parquet(rows, tmp_path / "testmini.parquet")
    img = load_benchmark("mathvista", tmp_path).problems[0].image
    assert img.getpixel((0, 0)) == (0, 0, 0) and img.getpixel((3, 3)) == (255, 255, 255)


def test_load_all_and_dir_names(tmp_path, mmmu_dir):
    write_parquet(mathvista_rows(), tmp_path / "MathVista" / "data" / "testmini-00000-of-00001.parquet")
    write_parquet(wemath_rows(), tmp_path / "We-Math" / "data" / "testmini-00000-of-00001.parquet")
    (tmp_path / "unrelated").mkdir()
    assert set(find_benchmark_dirs(tmp_path)) == {"mathvista", "wemath"}
    results = load_all(tmp_path)
    assert list(results) == ["mathvista", "wemath"] and len(results["wemath"]) == 7
    with pytest.raises(FileNotFoundError, match="no directory for mmmu"):
        load_all(tmp_path, names=["mathvista", "mmmu"])


def test_logicvista_hub_capabilities_mmmu_img_type_and_mathvision_tags(tmp_path, mmmu_dir):
    rows = [dict(r, broad_capability="diagram", specific_capability="patterns") for r in logicvista_hub_rows()]
    write_parquet(rows, tmp_path / "lv" / "data" / "test-00000-of-00001.parquet")
    p = by_id(load_benchmark("logicvista", tmp_path / "lv"))["logicvista-test-v1_0"]
    assert p.meta["capability"] == ["diagram", "patterns"] and p.meta["broad_capability"] == "diagram"
    one = by_id(load_benchmark("mmmu", mmmu_dir))["mmmu-validation_Accounting_1"]
    assert one.meta["img_type"] == ["Tables"]
    mv = mathvision_rows()
    mv[0]["question"] = "As shown in <image1>, how many triangles are there?"
    mv[3]["question"] = "The dots are shown in <image1>."
    write_parquet(mv, tmp_path / "mvis" / "test.parquet")
    ps = by_id(load_benchmark("mathvision", tmp_path / "mvis"))
    assert ps["mathvision-test-1"].question == "As shown in the image, how many triangles are there?"
    assert ps["mathvision-test-4"].question == "The dots are shown in the image."
    assert ps["mathvision-test-2"].question == "Which picture shows the cube from above?"
