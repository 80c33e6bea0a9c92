"""Benchmark-level aggregation of :func:`acrl.evaluate.evaluate` items.

Items are the dicts evaluate() returns (keys ``id``, ``family``, ``category``, ``needed``, ``correct``,
``asked``, ``clarified_correct``, ``deny_correct``, ``failed``, ...).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from acrl.problem import Problem

__all__ = ["aggregate_dynamath", "breakdown_table", "parse_dynamath_id", "summarize_by"]

_DYNAMATH_ID_RE = re.compile(r"^(?:dynamath-)?(?P<seed>.+)-v(?P<variant>[^-~]+)(?:~\d+)?$")


def parse_dynamath_id(problem_id: str) -> tuple[str, str]:
    """``dynamath-<seed>-v<variant>`` -> ``(seed, variant)``; ValueError for other ids."""
    m = _DYNAMATH_ID_RE.match(str(problem_id))
    if m is None:
        raise ValueError(f"not a DynaMath problem id (expected dynamath-<seed>-v<variant>): {problem_id!r}")
    return m.group("seed"), m.group("variant")


def aggregate_dynamath(items: Iterable[Mapping[str, Any]], key: str = "correct") -> dict[str, Any]:
    """DynaMath's two numbers over the variants of each seed question.

    ``average_accuracy``: the fraction of all (seed, variant) items answered correctly (DynaMath's "average
    case"). ``worst_case_accuracy``: the fraction of seed questions whose every variant is answered correctly.
    ``key`` picks the correctness field (``correct`` = single pass, ``clarified_correct`` = with
    clarification). Items whose episode failed (``failed`` true) are left out and counted in ``failed``; seeds
    are identified from the Problem id ``dynamath-<seed>-v<variant>`` (or ``seed`` / ``variant`` keys when
    present). Also returned: ``seed_average_accuracy`` (mean over seeds of their per-seed accuracy),
    ``by_category`` (the same two numbers per subject) and ``per_seed`` (``{seed: {n, correct, average,
    worst}}``).
    """
    per_seed: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    category: dict[str, str] = {}
    failed = 0
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
    out["variants_per_seed"] = {"min": min(counts), "max": max(counts)} if counts else {"min": 0, "max": 0}
    by_cat: dict[str, list[str]] = defaultdict(list)
    for s in seeds:
        by_cat[category[s]].append(s)
    out["by_category"] = {c: summary(v) for c, v in sorted(by_cat.items()) if c}
    out["per_seed"] = {s: {"n": len(per_seed[s]), "correct": sum(ok for _, ok in per_seed[s]),
                           "average": sum(ok for _, ok in per_seed[s]) / len(per_seed[s]),
                           "worst": all(ok for _, ok in per_seed[s])} for s in seeds}
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
    from acrl.evaluate import group_metrics

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
