"""``acrl eval --benchmark NAME|all``: load, evaluate and write one results directory per benchmark.

With ``all``, every benchmark found under the data directory is loaded on its own; one that cannot be loaded
(too many bad rows, no rows for the split, an unreadable layout) is reported with its reason and the others
are still evaluated. ``OUT/summary.json`` then lists every benchmark (evaluated, not loaded, or not found) with
its counts. Exit status: 0 when every benchmark asked for (every one found, with ``all``) was evaluated; 1 when
some were evaluated but another could not be loaded or all its episodes failed; 2 when none was evaluated.
"""

from __future__ import annotations

import os
import time
from typing import Any

from acrl import outdir
from acrl.app.assemble import build_reasoner
from acrl.backends.openai_api import OpenAIReasoner
from acrl.data.benchmarks import BENCHMARKS, _spec, find_benchmark_dirs, load_benchmark
from acrl.data.judge import judge_items
from acrl.data.records import LoadResult
from acrl.eval.evaluate import evaluate, failure, markdown_table, write_results
from acrl.eval.metrics import aggregate_dynamath, breakdown_table, summarize_by, wemath_metrics


def _load(name: str, path, split, limit, max_bad_fraction) -> tuple[LoadResult | None, str]:
    try:
        return load_benchmark(name, path, split=split, limit=limit, max_bad_fraction=max_bad_fraction), ""
    except (ValueError, FileNotFoundError, TypeError, OSError) as e:
        return None, f"{type(e).__name__}: {e}"


def benchmark_summary(name: str, res: LoadResult, items: list[dict], summary: dict,
                      dynamath_bad_as_wrong: bool = False) -> dict:
    """Add the benchmark's own metrics and counts to an :func:`acrl.eval.evaluate.evaluate` summary."""
    summary["by_category"] = summarize_by(items, "category")
    if name == "dynamath":
        bad = [b.id for b in res.bad]
        summary["dynamath"] = aggregate_dynamath(items, bad_ids=bad, bad_as_wrong=dynamath_bad_as_wrong)
        summary["dynamath_clarified"] = aggregate_dynamath(items, "clarified_correct", bad_ids=bad,
                                                           bad_as_wrong=dynamath_bad_as_wrong)
    if name == "wemath":
        summary["wemath"] = wemath_metrics(items)
        summary["wemath_clarified"] = wemath_metrics(items, "clarified_correct")
    summary["bad_rows"] = [{"id": b.id, "reason": b.reason} for b in res.bad]
    summary["counts"] = {"rows": len(res.problems) + len(res.bad), "problems": len(res.problems),
                         "bad_rows": len(res.bad), "text_only": summary.get("text_only", 0),
                         "evaluated": summary["overall"].get("n", 0),
                         "failed": summary["overall"].get("failed", 0)}
    return summary


def _index_table(rows: list[dict[str, Any]]) -> str:
    head = ["benchmark", "status", "problems", "bad rows", "text-only", "evaluated", "single-pass acc %",
            "reason"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = r.get("counts", {})
        acc = r.get("accuracy")
        lines.append("| " + " | ".join(str(x) for x in (
            r["benchmark"], r["status"], c.get("problems", "–"), c.get("bad_rows", "–"), c.get("text_only", "–"),
            c.get("evaluated", "–"), "–" if acc is None else f"{100 * acc:.1f}",
            (r.get("reason") or "").replace("|", "/")[:200])) + " |")
    return "\n".join(lines) + "\n"


def eval_benchmarks(cfg, policy, clarifier, captioner: str, *, benchmark: str, data: str | None, out: str,
                    split: str | None = None, limit: int | None = None, max_bad_fraction: float = 0.05,
                    judge_url: str | None = None, judge_model: str = "", dynamath_bad_as_wrong: bool = False,
                    reasoner=None, max_failed: float = 1.0) -> int:
    """Evaluate ``policy`` on one benchmark (``OUT/``) or on ``all`` (``OUT/<name>/`` each, plus an index
    ``OUT/summary.json`` and ``OUT/table.md``). Returns the exit status (see the module docstring)."""
    if not data:
        raise ValueError("--benchmark needs --data PATH (see docs/benchmarks.md)")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"--max-bad-fraction must be between 0 and 1, not {max_bad_fraction}")
    every = benchmark == "all"
    rows: list[dict[str, Any]] = []
    loaded: dict[str, LoadResult] = {}
    if every:
        dirs = find_benchmark_dirs(data)
        for name in BENCHMARKS:
            if name not in dirs:
                rows.append({"benchmark": name, "status": "not found",
                             "reason": f"no sub-directory for {name} under {data}"})
                continue
            res, reason = _load(name, dirs[name], split, limit, max_bad_fraction)
            if res is None:
                rows.append({"benchmark": name, "status": "not loaded", "path": str(dirs[name]), "reason": reason})
                print(f"{name}: not loaded: {reason}")
            else:
                loaded[name] = res
                rows.append({"benchmark": name, "status": "loaded", "path": str(dirs[name])})
        if not loaded:
            _write_index(out, rows)
            print(_index_table(rows))
            raise ValueError(f"no benchmark could be loaded from {data} (see {os.path.join(out, 'summary.json')})")
    else:
        name = _spec(benchmark).name
        loaded[name] = load_benchmark(name, data, split=split, limit=limit, max_bad_fraction=max_bad_fraction)
        rows.append({"benchmark": name, "status": "loaded", "path": str(data)})
    if reasoner is None:
        reasoner = build_reasoner(cfg)
    judge = None
    if judge_url:
        judge = OpenAIReasoner(judge_url, judge_model, temperature=0.0, max_tokens=16).check()
    by_name = {r["benchmark"]: r for r in rows}
    for name, res in loaded.items():
        print(f"{name}: {res.describe()}")
        t = time.time()
        where = os.path.join(out, name) if every else out
        summary, items = evaluate(policy, reasoner, clarifier, res.problems, cfg.eval.batch_size, progress=True,
                                  desc=name, items_path=os.path.join(where, "items.jsonl"))
        benchmark_summary(name, res, items, summary, dynamath_bad_as_wrong)
        if judge is not None:
            summary["judge"] = judge_items(items, {p.id: p for p in res.problems}, judge)
        summary["captioner"], summary["data"], summary["seconds"] = captioner, res.path, round(time.time() - t, 1)
        title = f"{os.path.basename(os.path.normpath(captioner))} on {name}"
        write_results(where, summary, items, title=title)
        print(markdown_table(summary, title) + "\n" + breakdown_table(summary["by_category"], label="category"))
        print(f"results in {where}")
        row = by_name[name]
        row["counts"], row["accuracy"] = summary["counts"], summary["overall"].get("accuracy")
        if summary["counts"]["evaluated"] == 0:
            row["status"], row["reason"] = "failed", "every episode failed (see errors in items.jsonl)"
        elif why := failure(summary, max_failed):
            row["status"], row["reason"] = "failed", why
        else:
            row["status"] = "evaluated"
    if every:
        _write_index(out, rows)
        print(_index_table(rows))
    done = [r for r in rows if r["status"] == "evaluated"]
    wanted = [r for r in rows if r["status"] != "not found"]
    if not done:
        return 2
    return 0 if len(done) == len(wanted) else 1


def _write_index(out: str, rows: list[dict[str, Any]]) -> None:
    outdir.write_text(os.path.join(out, "table.md"), _index_table(rows))
    outdir.write_json(os.path.join(out, "summary.json"), {"benchmarks": rows})
