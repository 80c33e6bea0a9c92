"""DynaMath aggregation, per-category summaries, and benchmark problems flowing through evaluate()."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from data.fixtures import dynamath_rows, logicvista_json, mathverse_rows, write_json, write_parquet

from acrl.data import load_benchmark
from acrl.eval.evaluate import evaluate
from acrl.eval.metrics import aggregate_dynamath, breakdown_table, parse_dynamath_id, summarize_by


def item(
    pid: str, correct: bool, category: str = "", failed: bool = False, clarified: bool | None = None
) -> dict:
    return {
        "id": pid,
        "family": "dynamath",
        "category": category,
        "needed": 0,
        "correct": correct,
        "failed": failed,
        "malformed": False,
        "asked": False,
        "caption": "a picture",
        "clarified_correct": correct if clarified is None else clarified,
        "deny_correct": None,
    }


def test_parse_dynamath_id():
    assert parse_dynamath_id("dynamath-17-v3") == ("17", "3")
    assert parse_dynamath_id("dynamath-17-v3~2") == ("17", "3")
    with pytest.raises(ValueError, match="not a DynaMath problem id"):
        parse_dynamath_id("mathvista-testmini-1")


def test_aggregate_dynamath_average_and_worst_case():
    items = []
    # seed 1: all 3 variants right; seed 2: 2 of 3 right; seed 3: none right
    for v in (1, 2, 3):
        items.append(item(f"dynamath-1-v{v}", True, "algebra"))
        items.append(item(f"dynamath-2-v{v}", v != 2, "algebra", clarified=True))
        items.append(item(f"dynamath-3-v{v}", False, "statistics"))
    items.append(item("dynamath-3-v4", True, "statistics", failed=True))
    out = aggregate_dynamath(items)
    assert out["n_seeds"] == 3 and out["n_items"] == 9 and out["failed"] == 1
    assert out["average_accuracy"] == pytest.approx(5 / 9)
    assert out["worst_case_accuracy"] == pytest.approx(1 / 3)
    assert out["seed_average_accuracy"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert out["variants_per_seed"] == {"min": 3, "max": 3}
    assert out["per_seed"]["2"] == {"n": 3, "correct": 2, "average": pytest.approx(2 / 3), "worst": False,
                                    "scored": 3, "bad": 0}
    assert out["by_category"]["algebra"]["worst_case_accuracy"] == pytest.approx(0.5)
    assert out["by_category"]["statistics"]["average_accuracy"] == 0
    clar = aggregate_dynamath(items, key="clarified_correct")
    assert clar["worst_case_accuracy"] == pytest.approx(2 / 3)
    empty = aggregate_dynamath([])
    assert empty["n_seeds"] == 0 and math.isnan(empty["worst_case_accuracy"])


def test_aggregate_dynamath_on_loaded_ids(tmp_path):
    for v in (1, 2):
        write_parquet(dynamath_rows(v), tmp_path / "data" / f"sample{v}-00000-of-00001.parquet")
    problems = load_benchmark("dynamath", tmp_path).problems
    items = [item(p.id, p.meta["seed"] != "2" or p.meta["variant"] == 1, p.category) for p in problems]
    out = aggregate_dynamath(items)
    assert out["n_seeds"] == 3 and out["worst_case_accuracy"] == pytest.approx(2 / 3)


def test_summarize_by_item_key_problem_field_and_callable(tmp_path):
    write_parquet(mathverse_rows(), tmp_path / "testmini.parquet")
    problems = load_benchmark("mathverse", tmp_path).problems
    items = [item(p.id, p.category.startswith("Text"), p.category) for p in problems]
    by_cat = summarize_by(items, "category")
    assert list(by_cat) == sorted({p.category for p in problems})
    assert by_cat["Text Dominant"]["n"] == 2 and by_cat["Text Dominant"]["accuracy"] == 1.0
    assert by_cat["Vision Only"]["accuracy"] == 0.0
    by_subject = summarize_by(items, "subject", problems=problems)
    assert set(by_subject) == {"Solid Geometry", "Plane Geometry"}
    by_type = summarize_by(items, lambda it: it["id"].split("-")[-1] in ("6", "7"))
    assert by_type["True"]["n"] == 2
    table = breakdown_table(by_cat, title="MathVerse by version", label="version")
    assert "### MathVerse by version" in table and "| Vision Only | 2 | 0.0 |" in table


class _Policy:
    def generate(self, images, prompts, n=1, greedy=True, **kw):
        assert all(im is not None for im in images)
        return SimpleNamespace(texts=[["a diagram with labelled options"] * n for _ in prompts])


class _Reasoner:
    """Answers C to everything; asks once when it sees options that live in the image."""

    def complete(self, prompts):
        out = []
        for pr in prompts:
            if (
                "options are shown in the image" in pr
                and "You asked:" not in pr
                and "Solve the problem" not in pr
            ):
                out.append("NEED MORE INFO\nWhat does option C show?")
            else:
                out.append("SOLVED \\boxed{C}")
        return out


class _Clarifier:
    def answer(self, images, questions):
        return ["Option C is the square." for _ in questions]


def test_benchmark_problems_through_evaluate(tmp_path):
    write_json(logicvista_json(), tmp_path / "data" / "dataset.json", tmp_path / "data")
    problems = load_benchmark("logicvista", tmp_path).problems
    summary, items = evaluate(_Policy(), _Reasoner(), _Clarifier(), problems, batch_size=2)
    got = {it["id"]: it for it in items}
    assert got["logicvista-test-v1_0"]["correct"] and got["logicvista-test-v1_19"]["correct"]
    assert not got["logicvista-test-v1_1"]["correct"]  # gold is the set {A, C}
    assert got["logicvista-test-v1_0"]["asked"] and got["logicvista-test-v1_0"]["clarified_correct"]
    assert summary["by_family"]["logicvista"]["n"] == 5
    by_skill = summarize_by(items, "category")
    assert by_skill["inductive"]["n"] == 4 and by_skill["deductive"]["accuracy"] == 0.0


def test_dynamath_bad_rows_as_wrong_and_variants_scored():
    items = [item(f"dynamath-1-v{v}", True, "algebra") for v in (1, 2, 3)]
    items += [item(f"dynamath-2-v{v}", True, "algebra") for v in (1, 2)]
    bad = ["dynamath-2-v3", "dynamath-3-v1", "dynamath-#7"]   # the last one lacks its key: no seed
    kept = aggregate_dynamath(items, bad_ids=bad)
    assert kept["bad_rows"] == 2 and not kept["bad_as_wrong"]
    assert kept["n_seeds"] == 2 and kept["worst_case_accuracy"] == 1.0 and kept["average_accuracy"] == 1.0
    assert kept["variants_scored"] == {"2": 1, "3": 1}
    assert kept["per_seed"]["2"]["scored"] == 2 and kept["per_seed"]["2"]["bad"] == 1
    worst = aggregate_dynamath(items, bad_ids=bad, bad_as_wrong=True)
    assert worst["n_seeds"] == 3 and worst["n_items"] == 7
    assert worst["average_accuracy"] == pytest.approx(5 / 7)
    assert worst["worst_case_accuracy"] == pytest.approx(1 / 3)      # seeds 2 and 3 each lost a variant
    assert worst["per_seed"]["3"] == {"n": 1, "correct": 0, "average": 0.0, "worst": False, "scored": 0, "bad": 1}
    assert worst["variants_scored"] == {"0": 1, "2": 1, "3": 1}


def _wm(gid: str, key: str, ok: bool, failed: bool = False) -> dict:
    return dict(item(f"wemath-testmini-{gid}-{key}", ok, failed=failed), meta={"wemath_id": gid, "key": key})


def test_wemath_four_dimensional_metrics_by_hand():
    from acrl.eval.metrics import wemath_metrics

    T, F = True, False
    groups = {  # (steps, ID): (one-step results, composite result)
        ("2", "a"): ([T, T], T),   # CM strict and loose
        ("2", "b"): ([T, F], T),   # CM loose, RM strict
        ("2", "c"): ([F, F], T),   # RM strict and loose
        ("2", "d"): ([T, T], F),   # IG
        ("3", "a"): ([F, T, F], F),  # IK (same ID as a 2-step group: a different group)
        ("3", "e"): ([T, T, T], T),  # CM strict and loose
    }
    items = []
    for (steps, gid), (parts, multi) in groups.items():
        items += [_wm(gid, f"{steps}steps_{i}", ok) for i, ok in enumerate(parts, 1)]
        items.append(_wm(gid, f"{steps}steps_multi", multi))
    items.append(_wm("f", "2steps_1", True))                                  # composite missing
    items += [_wm("g", "2steps_1", T), _wm("g", "2steps_2", T), _wm("g", "2steps_multi", T, failed=True)]
    out = wemath_metrics(items)
    assert out["n_groups"] == 6 and out["incomplete_groups"] == 2
    assert out["n_2steps"] == 4 and out["n_3steps"] == 2
    strict, loose = out["strict"], out["loose"]
    assert strict["counts"] == {"IK": 1, "IG": 1, "CM": 2, "RM": 2}
    assert loose["counts"] == {"IK": 1, "IG": 1, "CM": 3, "RM": 1}
    assert strict["IK"] == loose["IK"] == pytest.approx(1 / 6)
    assert strict["IG"] == loose["IG"] == pytest.approx(1 / 6)
    assert strict["CM"] == pytest.approx(2 / 6) and loose["CM"] == pytest.approx(3 / 6)
    assert strict["RM"] == pytest.approx(2 / 4) and loose["RM"] == pytest.approx(1 / 4)
    assert strict["score"] == pytest.approx((6 - 0.5 - 2 - 1) / 6)
    assert loose["score"] == pytest.approx((6 - 0.5 - 1 - 1) / 6)
    assert out["S1"] == pytest.approx(9 / 14) and out["S2"] == pytest.approx(3 / 4) and out["S3"] == 0.5
