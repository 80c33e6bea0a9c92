"""The verdict table of docs/research/alpha.md, from the regimes' sweep results.

For every regime directory written by ``acrl sweep`` (``results.json`` with the paired comparison against binary
reward, ``versus``), one row: binary's single-pass test accuracy, α = 0.7's, their paired difference, the best arm
at the end, the arms ahead of binary on every seed at each budget, and the α crossover (the smallest α of the
grid that ends behind binary on every seed).

    python benchmarks/alpha_summary.py --results docs/research/results --out docs/research/results/summary.md

Writes ``summary.md`` and ``summary.json`` next to it. Regimes without a binary arm (``alpha=0``) are listed as
such.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from acrl.app.sweep import _delta, _pm

BUDGETS = (10, 20, 50, 100)


def _always_ahead(m: dict | None) -> bool:
    return bool(m) and m["n"] >= 2 and m["wins"] == m["n"]


def _always_behind(m: dict | None) -> bool:
    return bool(m) and m["n"] >= 2 and m["losses"] == m["n"]


def regime_row(name: str, res: dict) -> dict:
    arms, vs = res["arms"], res.get("versus")
    row = {"regime": name, "arms": len(arms), "seeds": sorted({s for a in arms.values() for s in a["seeds"]})}
    if not vs:
        return {**row, "note": "no binary arm (alpha=0)"}
    final = {a: v["metrics"].get("in/final_accuracy") for a, v in arms.items()}
    best = max((a for a in final if final[a] and final[a]["mean"] is not None), key=lambda a: final[a]["mean"])
    row.update(binary=final.get("alpha=0"), acrl=final.get("alpha=0.7"),
               acrl_vs_binary=vs["arms"].get("alpha=0.7", {}).get("in/final_accuracy"),
               best=best, best_acc=final[best],
               best_vs_binary=vs["arms"].get(best, {}).get("in/final_accuracy") if best != "alpha=0" else None)
    row["ahead"] = {}
    for b in BUDGETS:
        key = f"in/curve_at_{b}"
        row["ahead"][b] = sorted(a for a, d in vs["arms"].items() if _always_ahead(d.get(key)))
    row["ahead_final"] = sorted(a for a, d in vs["arms"].items() if _always_ahead(d.get("in/final_accuracy")))
    grid = sorted((float(m.group(1)), a) for a in arms if (m := re.fullmatch(r"alpha=([0-9.]+)", a)))
    behind = [x for x, a in grid if x > 0 and _always_behind(vs["arms"].get(a, {}).get("in/final_accuracy"))]
    row["crossover"] = min(behind) if behind else None
    row["grid"] = [x for x, _ in grid]
    return row


def markdown(rows: list[dict]) -> str:
    head = ["regime", "binary (α = 0)", "AC-RL (α = 0.7)", "α = 0.7 − binary (paired)", "best arm at the end",
            "best − binary", "first α behind binary on every seed"] + [f"ahead of binary on every seed @{b}"
                                                                       for b in BUDGETS] + ["… at the end (test)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "note" in r:
            lines.append("| " + " | ".join([r["regime"], r["note"]] + [""] * (len(head) - 2)) + " |")
            continue
        cross = "–" if r["crossover"] is None else f"{r['crossover']:g}"
        if len(r["grid"]) <= 2:
            cross += " (grid: " + ", ".join(f"{x:g}" for x in r["grid"]) + ")"
        lines.append("| " + " | ".join(
            [r["regime"], _pm(r["binary"]), _pm(r["acrl"]), _delta(r["acrl_vs_binary"]),
             f"{r['best']} ({_pm(r['best_acc'])})", _delta(r["best_vs_binary"]), cross]
            + [", ".join(r["ahead"][b]) or "none" for b in BUDGETS] + [", ".join(r["ahead_final"]) or "none"]) + " |")
    return ("Single-pass accuracy in %, mean ± std over seeds (test: 500 problems; val @ step: 200 problems); "
            "paired differences in points with (seeds ahead–behind).\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True, help="directory of regime sweep directories")
    p.add_argument("--regimes", default="", help="comma-separated regime directories, in order (default: all)")
    p.add_argument("--out", required=True, help="summary.md to write (summary.json beside it)")
    args = p.parse_args(argv)
    names = [n for n in args.regimes.split(",") if n] or sorted(os.listdir(args.results))
    rows = []
    for n in names:
        path = os.path.join(args.results, n, "results.json")
        if not os.path.exists(path):
            if args.regimes:
                raise SystemExit(f"alpha_summary: {path} does not exist")
            continue
        with open(path) as fh:
            res = json.load(fh)
        if "alpha=0" in res["arms"] or args.regimes:
            rows.append(regime_row(n, res))
    with open(args.out, "w") as fh:
        fh.write(markdown(rows))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(rows, fh, indent=1)
    print(f"alpha_summary: {len(rows)} regime(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
