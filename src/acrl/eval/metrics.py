"""Benchmark-level aggregation of :func:`acrl.eval.evaluate.evaluate` items.

Items are the dicts evaluate() returns (keys ``id``, ``family``, ``category``, ``needed``, ``correct``,
``asked``, ``clarified_correct``, ``deny_correct``, ``failed``, ...).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from acrl.eval.evaluate import group_metrics
from acrl.problem import Problem
from acrl.world import language

__all__ = ["aggregate_dynamath", "breakdown_table", "parse_dynamath_id", "summarize_by", "wemath_metrics"]

_DYNAMATH_ID_RE = re.compile(r"^(?:dynamath-)?(?P<seed>.+)-v(?P<variant>[^-~]+)(?:~\d+)?$")


def parse_dynamath_id(problem_id: str) -> tuple[str, str]:
    """``dynamath-<seed>-v<variant>`` -> ``(seed, variant)``; ValueError for other ids."""
    m = _DYNAMATH_ID_RE.match(str(problem_id))
    if m is None:
        raise ValueError(f"not a DynaMath problem id (expected dynamath-<seed>-v<variant>): {problem_id!r}")
    return m.group("seed"), m.group("variant")


def aggregate_dynamath(items: Iterable[Mapping[str, Any]], key: str = "correct", bad_ids: Iterable[str] = (),
                       bad_as_wrong: bool = False) -> dict[str, Any]:
    """DynaMath's two numbers over the variants of each seed question.

    ``average_accuracy``: the fraction of all (seed, variant) items answered correctly (DynaMath's "average
    case"). ``worst_case_accuracy``: the fraction of seed questions whose every variant is answered correctly.
    ``key`` picks the correctness field (``correct`` = single pass, ``clarified_correct`` = with
    clarification). Items whose episode failed (``failed`` true) are left out and counted in ``failed``; seeds
    are identified from the Problem id ``dynamath-<seed>-v<variant>`` (or ``seed`` / ``variant`` keys when
    present). Also returned: ``seed_average_accuracy`` (mean over seeds of their per-seed accuracy),
    ``by_category`` (the same two numbers per subject) and ``per_seed`` (``{seed: {n, correct, average,
    worst, scored, bad}}``: ``scored`` is how many variants of the seed were graded).

    ``bad_ids`` are the ids of the rows the loader could not use (``LoadResult.bad``; DynaMath bad rows carry the
    same ``dynamath-<seed>-v<variant>`` ids as problems). By default they are left out, so a seed is judged on
    the variants that loaded (``variants_scored`` says how many seeds had how many); with
    ``bad_as_wrong=True`` each counts as a wrong answer, the conservative reading of both numbers (a seed with
    an unusable variant cannot be solved in the worst case).
    """
    per_seed: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    bad_per_seed: dict[str, int] = defaultdict(int)
    category: dict[str, str] = {}
    failed = 0
    n_bad = 0
    for bid in bad_ids:
        try:
            seed, variant = parse_dynamath_id(bid)
        except ValueError:
            continue          # a row without its key: no seed to charge it to
        n_bad += 1
        bad_per_seed[seed] += 1
        if bad_as_wrong:
            per_seed[seed].append((variant, False))
    for it in items:
        if it.get("failed"):
            failed += 1
            continue
        if "seed" in it and "variant" in it:
            seed, variant = str(it["seed"]), str(it["variant"])
        else:
            seed, variant = parse_dynamath_id(it["id"])
        per_seed[seed].append((variant, bool(it.get(key))))
        category.setdefault(seed, str(it.get("category") or ""))

    def summary(seeds: list[str]) -> dict[str, Any]:
        rows = [ok for s in seeds for _, ok in per_seed[s]]
        if not rows:
            return {"n_seeds": 0, "n_items": 0, "average_accuracy": float("nan"),
                    "worst_case_accuracy": float("nan"), "seed_average_accuracy": float("nan")}
        return {
            "n_seeds": len(seeds),
            "n_items": len(rows),
            "average_accuracy": sum(rows) / len(rows),
            "worst_case_accuracy": sum(all(ok for _, ok in per_seed[s]) for s in seeds) / len(seeds),
            "seed_average_accuracy": sum(sum(ok for _, ok in per_seed[s]) / len(per_seed[s]) for s in seeds)
            / len(seeds),
        }

    seeds = sorted(per_seed, key=lambda s: (len(s), s))
    out = summary(seeds)
    counts = [len(per_seed[s]) for s in seeds]
    out["failed"] = failed
    out["bad_rows"], out["bad_as_wrong"] = n_bad, bad_as_wrong
    out["variants_per_seed"] = {"min": min(counts), "max": max(counts)} if counts else {"min": 0, "max": 0}
    scored = [len(per_seed[s]) - (bad_per_seed[s] if bad_as_wrong else 0) for s in seeds]
    out["variants_scored"] = {str(k): scored.count(k) for k in sorted(set(scored))}
    by_cat: dict[str, list[str]] = defaultdict(list)
    for s in seeds:
        by_cat[category.get(s, "")].append(s)
    out["by_category"] = {c: summary(v) for c, v in sorted(by_cat.items()) if c}
    out["per_seed"] = {s: {"n": len(per_seed[s]), "correct": sum(ok for _, ok in per_seed[s]),
                           "average": sum(ok for _, ok in per_seed[s]) / len(per_seed[s]),
                           "worst": all(ok for _, ok in per_seed[s]), "scored": sc, "bad": bad_per_seed[s]}
                       for s, sc in zip(seeds, scored)}
    return out


_WEMATH_KEY_RE = re.compile(r"^(?P<steps>[23])steps_(?P<part>\d+|multi)$")


def wemath_metrics(items: Iterable[Mapping[str, Any]], key: str = "correct") -> dict[str, Any]:
    """We-Math's four-dimensional metrics, as its ``four_dimensional_metrics.py`` and VLMEvalKit compute them.

    A problem *group* is the rows sharing ``ID`` within one step family: the one-step sub-questions
    ``<n>steps_1 .. <n>steps_<n>`` and the composite ``<n>steps_multi`` (n = 2 or 3). Per group, with
    "steps" = the one-step sub-questions and "multi" = the composite question:

    ``IK`` insufficient knowledge: some step wrong and multi wrong.
    ``IG`` inadequate generalisation: every step right but multi wrong.
    ``CM`` complete mastery: strict = every step right and multi right; loose = some step right and multi right.
    ``RM`` rote memorisation: strict = some step wrong but multi right; loose = every step wrong but multi right.

    Rates: IK, IG, CM = count / groups; RM = RM / (CM + RM) (the share of solved composites not backed by the
    steps). ``score`` = (groups - 0.5 IG - RM - IK) / groups (counts; We-Math's "average score", 525 groups on
    testmini). Also ``S1`` (accuracy over all one-step rows), ``S2`` / ``S3`` (accuracy of the 2- / 3-step
    composites). Items are those of :func:`acrl.eval.evaluate.evaluate` with ``meta.wemath_id`` / ``meta.key`` (the
    loader's ``ID`` / ``key``); a group with a missing row or a failed episode is not scored and is counted
    in ``incomplete_groups``. ``key`` picks the correctness field (``correct`` or ``clarified_correct``).
    """
    groups: dict[tuple[str, str], dict[str, bool | None]] = defaultdict(dict)
    for it in items:
        meta = it.get("meta") or {}
        m = _WEMATH_KEY_RE.match(str(meta.get("key", "")))
        gid = meta.get("wemath_id")
        if m is None or gid in (None, ""):
            continue
        groups[(m.group("steps"), str(gid))][m.group("part")] = None if it.get("failed") else bool(it.get(key))
    complete: dict[tuple[str, str], tuple[list[bool], bool]] = {}
    for (steps, gid), parts in groups.items():
        wanted = [str(i) for i in range(1, int(steps) + 1)]
        values = [parts.get(p) for p in wanted]
        multi = parts.get("multi")
        if multi is None or any(v is None for v in values):
            continue
        complete[(steps, gid)] = (values, multi)  # type: ignore[assignment]
    n = len(complete)
    counts = {"IK": 0, "IG": 0, "CM_strict": 0, "CM_loose": 0, "RM_strict": 0, "RM_loose": 0}
    for values, multi in complete.values():
        every, some = all(values), any(values)
        if multi:
            counts["CM_strict"] += every
            counts["CM_loose"] += some
            counts["RM_strict"] += not every
            counts["RM_loose"] += not some
        else:
            counts["IK"] += not every
            counts["IG"] += every

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    out: dict[str, Any] = {"n_groups": n, "incomplete_groups": len(groups) - n,
                           "n_2steps": sum(s == "2" for s, _ in complete),
                           "n_3steps": sum(s == "3" for s, _ in complete)}
    for mode in ("strict", "loose"):
        cm, rm = counts[f"CM_{mode}"], counts[f"RM_{mode}"]
        out[mode] = {
            "IK": ratio(counts["IK"], n), "IG": ratio(counts["IG"], n), "CM": ratio(cm, n), "RM": ratio(rm, cm + rm),
            "score": ratio(n - 0.5 * counts["IG"] - rm - counts["IK"], n),
            "counts": {"IK": counts["IK"], "IG": counts["IG"], "CM": cm, "RM": rm},
        }
    steps = [v for values, _ in complete.values() for v in values]
    out["S1"] = ratio(sum(steps), len(steps))
    for s in ("2", "3"):
        multis = [multi for (st, _), (_, multi) in complete.items() if st == s]
        out[f"S{s}"] = ratio(sum(multis), len(multis))
    return out


def _value(item: Mapping[str, Any], key: str | Callable[[Mapping[str, Any]], Any],
           problems: Mapping[str, Problem] | None) -> Any:
    if callable(key):
        return key(item)
    if key in item:
        return item[key]
    if problems is not None and item.get("id") in problems:
        p = problems[item["id"]]
        if hasattr(p, key):
            return getattr(p, key)
        return p.meta.get(key, "")
    return ""


def summarize_by(items: list[Mapping[str, Any]], key: str | Callable[[Mapping[str, Any]], Any],
                 problems: Iterable[Problem] | Mapping[str, Problem] | None = None,
                 ) -> dict[str, dict[str, Any]]:
    """Per-group metrics (the same metrics as ``summary['overall']`` of evaluate()) grouped by ``key``.

    ``key`` is an item field (``category``, ``family``, ``needed``), a callable on the item, or, when
    ``problems`` is given, a Problem attribute or ``meta`` field looked up by the item's id (``difficulty``,
    ``problem_version``, ``subject`` ...). Returns ``{str(group): metrics}``, sorted by group; the result can
    be stored as ``summary[f"by_{key}"]``.
    """
    lookup: Mapping[str, Problem] | None = None
    if problems is not None:
        lookup = problems if isinstance(problems, Mapping) else {p.id: p for p in problems}
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for it in items:
        groups[str(_value(it, key, lookup))].append(it)
    return {g: group_metrics(rows) for g, rows in sorted(groups.items())}


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{100 * x:.1f}"
    return str(x)


def breakdown_table(groups: Mapping[str, Mapping[str, Any]], title: str = "", label: str = "") -> str:
    """Markdown table of a :func:`summarize_by` result (same columns as evaluate's table)."""
    cols = ["n", "accuracy", "clarification_rate", "accuracy_with_clarification", "clarification_gap",
            "acc_deny"]
    head = [label, "n", "single-pass acc %", "clar. rate %", "acc. with clar. %", "gap (pts)", "Acc_deny %"]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in groups.items():
        cells = [name or "(none)"] + [_fmt(m.get(c, float("nan"))) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def question_quality(items: Sequence[dict], problems: Sequence[Problem]) -> dict:
    """How good the reasoner's clarification questions are, from evaluation items (``acrl.eval.evaluate``) of world
    problems (others have no facts and are skipped):

    - ``question_about_missing``: share of the questions asked that are about a needed fact the caption does not
      state correctly (missing or wrong): the question that helps;
    - ``question_answerable``: share of the questions about a fact of the scene (π_ref can answer them; a question
      the world's language cannot name, or about a bar that is not there, cannot be answered);
    - ``asks_when_missing``: among the captions that miss a needed fact, the share where the reasoner asked about
      one of the missing facts.
    """
    by_id = {p.id: p for p in problems}
    asked = missing_q = answerable = lacking = helped = 0
    for it in items:
        p = by_id.get(it["id"])
        if p is None or not p.facts:
            continue
        stated = dict(language.parse_facts(it.get("caption") or ""))
        missing = {k for k in p.needed if stated.get(k) != p.facts[k]}
        key = language.parse_clarification_question(it.get("clarification_question") or "") if it.get("asked") \
            else None
        if it.get("asked"):
            asked += 1
            missing_q += key in missing
            answerable += key in p.facts
        if missing:
            lacking += 1
            helped += key in missing
    nan = float("nan")
    return {"question_about_missing": missing_q / asked if asked else nan,
            "question_answerable": answerable / asked if asked else nan,
            "asks_when_missing": helped / lacking if lacking else nan}
