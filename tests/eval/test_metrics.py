"""Evaluation metrics (:mod:`acrl.eval.metrics`): DynaMath aggregation, WeMath's four dimensions, per-category
summaries, the quality of the reasoner's questions."""

from __future__ import annotations

import math

import pytest
from data.fixtures import dynamath_rows, mathverse_rows, write_parquet

from acrl.data import load_benchmark
from acrl.eval.metrics import aggregate_dynamath, breakdown_table, parse_dynamath_id, question_quality, summarize_by
from acrl.world import make_problems, oracle_caption_for


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


def test_question_quality_counts_questions_about_missing_and_answerable_facts():
    p = next(p for p in make_problems("val", 50) if p.family == "bars" and len(p.needed) == 2)
    a, b = p.needed
    other = next(k for k in p.facts if k not in p.needed)
    stated = f"the {a.split('.')[1]} bar is {p.facts[a]}"
    items = [
        {"id": p.id, "caption": stated, "asked": True,
         "clarification_question": f"what is the height of the {b.split('.')[1]} bar ?"},   # the missing one
        {"id": p.id, "caption": stated, "asked": True,
         "clarification_question": f"what is the height of the {other.split('.')[1]} bar ?"},   # answerable only
        {"id": p.id, "caption": stated, "asked": True, "clarification_question": "what is it ?"},  # neither
        {"id": p.id, "caption": stated, "asked": False, "clarification_question": None},
        {"id": p.id, "caption": oracle_caption_for(p), "asked": False, "clarification_question": None},
    ]
    q = question_quality(items, [p])
    assert q["question_about_missing"] == pytest.approx(1 / 3)
    assert q["question_answerable"] == pytest.approx(2 / 3)
    assert q["asks_when_missing"] == pytest.approx(1 / 4)       # 4 captions miss a fact; one question helped
