"""Cross-evaluation of the co-training study (docs/research/cotraining.md): every final captioner of an
``acrl sweep`` over ``train.cotrain`` read by every reasoner.

    python benchmarks/cotrain_study.py --sweep runs/cotrain-study --config configs/research/cotrain.yaml \
        --out docs/research/results/cotrain

For the warm-started captioner (step 0) and the final captioner of every finished run (``RUN/checkpoint/policy``)
it evaluates, on ``eval.split`` / ``eval.n`` of the config (π_ref: the shipped captioner answers clarifications;
greedy captions and replies):

- ``warm``: the warm-started tiny reasoner (the frozen arm's reasoner);
- ``world``: the rule-based world reasoner, which never trained: captions it can no longer read would be a
  private language between the co-trained pair;
- ``cotrained``: the run's own co-trained reasoner (``RUN/checkpoint/reasoner``); for a run without one (the
  frozen arm), the reasoner of the ``cotrain`` arm's run of the same seed: how a co-trained reasoner reads
  captions it never trained with.

Each cell holds single-pass accuracy, accuracy with clarification, clarification rate and the question quality
(:func:`acrl.train.learner.question_quality`). Writes ``cross_eval.json`` (every run and cell), ``cross_eval.md`` (mean
± sample std over seeds), ``cross_eval.png`` and ``reasoner_training.png`` (the co-trained reasoner's reward,
questions and KL per step, from ``metrics.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from acrl.app.assemble import build_clarifier, build_policy, captioner_path
from acrl.backends.tiny import TinyReasoner
from acrl.config import SHIPPED_REASONER, load_config
from acrl.eval.evaluate import evaluate
from acrl.eval.metrics import question_quality
from acrl.world import make_problems
from acrl.world.reasoner import WorldReasoner

KEYS = ("accuracy", "accuracy_with_clarification", "clarification_rate", "question_about_missing",
        "question_answerable", "asks_when_missing")


def _runs(sweep: str) -> list[dict]:
    root = os.path.join(sweep, "runs")
    out = []
    for name in sorted(os.listdir(root)):
        res = os.path.join(root, name, "result.json")
        if os.path.exists(res):
            r = json.load(open(res))
            out.append({"name": name, "arm": r["arm"], "seed": r["seed"], "dir": os.path.join(root, name)})
    return out


def _cell(policy, reasoner, clarifier, problems, batch_size) -> dict:
    s, items = evaluate(policy, reasoner, clarifier, problems, batch_size)
    return {**{k: s["overall"][k] for k in KEYS[:3]}, **question_quality(items, problems)}


def _stats(vals: list[float]) -> tuple[float, float, int]:
    v = [x for x in vals if x is not None and not math.isnan(x)]
    if not v:
        return float("nan"), float("nan"), 0
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0), len(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", required=True, help="the acrl sweep directory (with runs/)")
    ap.add_argument("--config", required=True, help="the study's config (eval.split, eval.n, world)")
    ap.add_argument("--out", required=True, help="directory for cross_eval.{json,md,png}")
    ap.add_argument("--replot", action="store_true", help="only redraw the tables and figures from cross_eval.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    if args.replot:
        rows = json.load(open(os.path.join(args.out, "cross_eval.json")))["rows"]
        _markdown(rows, os.path.join(args.out, "cross_eval.md"), cfg)
        _plot(rows, os.path.join(args.out, "cross_eval.png"))
        _training(_runs(args.sweep), os.path.join(args.out, "reasoner_training.png"))
        return 0
    problems = make_problems(cfg.eval.split, cfg.eval.n, cfg.world)
    reference = build_policy(cfg, path=captioner_path(cfg))
    clarifier = build_clarifier(cfg, reference)
    warm, world = TinyReasoner.load(cfg.reasoner.model or SHIPPED_REASONER), WorldReasoner(cfg.reasoner.read_budget)
    runs = _runs(args.sweep)
    if not runs:
        print(f"no finished run in {args.sweep}", file=sys.stderr)
        return 1
    own = {(r["arm"], r["seed"]): TinyReasoner.load(os.path.join(r["dir"], "checkpoint", "reasoner"))
           for r in runs if os.path.isdir(os.path.join(r["dir"], "checkpoint", "reasoner"))}
    rows = []
    t0 = time.time()
    captioners = [{"name": "step0", "arm": "step 0 (warm starts)", "seed": None, "path": captioner_path(cfg)}] + [
        {**r, "path": os.path.join(r["dir"], "checkpoint", "policy")} for r in runs]
    for c in captioners:
        policy = build_policy(cfg, path=c["path"], reference=captioner_path(cfg))
        readers = {"warm": warm, "world": world}
        mine = own.get((c["arm"], c["seed"]), own.get(("cotrain", c["seed"])))
        if mine is not None:
            readers["cotrained"] = mine
        for rname, reasoner in readers.items():
            cell = _cell(policy, reasoner, clarifier, problems, cfg.eval.batch_size)
            rows.append({"captioner": c["name"], "arm": c["arm"], "seed": c["seed"], "reasoner": rname, **cell})
            print(f"{c['name']:>18} x {rname:<9} " + " ".join(f"{k} {cell[k]:.3f}" for k in KEYS)
                  + f" ({time.time() - t0:.0f}s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cross_eval.json"), "w") as fh:
        json.dump({"config": args.config, "split": cfg.eval.split, "n": cfg.eval.n, "rows": rows}, fh, indent=1)
    _markdown(rows, os.path.join(args.out, "cross_eval.md"), cfg)
    _plot(rows, os.path.join(args.out, "cross_eval.png"))
    _training(runs, os.path.join(args.out, "reasoner_training.png"))
    print(f"wrote {args.out}/cross_eval.json, cross_eval.md, cross_eval.png, reasoner_training.png")
    return 0


def _groups(rows):
    out: dict = {}
    for r in rows:
        out.setdefault((r["arm"], r["reasoner"]), []).append(r)
    return out


def _markdown(rows, path, cfg) -> None:
    head = ["captioner (arm)", "reasoner", "seeds", "single-pass acc.", "acc. with clar.", "clar. rate",
            "questions about a missing fact", "questions answerable", "asks about a missing fact when one is"]
    lines = [f"Test split, {cfg.eval.n} problems; mean ± sample std over seeds (%).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (arm, reasoner), rs in sorted(_groups(rows).items(), key=lambda kv: (kv[0][0] != "step 0 (warm starts)",
                                                                           kv[0])):
        cells = []
        for k in KEYS:
            m, s, n = _stats([r[k] for r in rs])
            cells.append("–" if n == 0 else f"{100 * m:.1f} ± {100 * s:.1f}")
        lines.append("| " + " | ".join([arm, reasoner, str(len(rs))] + cells) + " |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    arms = sorted({a for a, _ in groups}, key=lambda a: (a != "step 0 (warm starts)", a))
    readers = ["warm", "cotrained", "world"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, key, title in zip(axes, ("accuracy", "accuracy_with_clarification", "question_about_missing"),
                              ("single-pass accuracy", "accuracy with clarification",
                               "questions about a missing fact")):
        width = 0.8 / len(readers)
        for j, rd in enumerate(readers):
            xs, ms, ss = [], [], []
            for i, arm in enumerate(arms):
                if (arm, rd) in groups:
                    m, s, _ = _stats([r[key] for r in groups[(arm, rd)]])
                    xs.append(i + (j - 1) * width), ms.append(100 * m), ss.append(100 * s)
            ax.bar(xs, ms, width, yerr=ss, capsize=3, label=f"read by {rd} reasoner")
        ax.set_xticks(range(len(arms)), [a.replace(" (warm starts)", "") for a in arms], fontsize=8, rotation=20)
        ax.set_xlabel("captions written by the captioner of", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _training(runs, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward", "captioner reward (AC-RL)"), ("reasoner_reward", "reasoner reward (correct - cost x questions)"),
            ("clarification_rate", "clarification rate (training episodes)"), ("reasoner_kl_mean", "reasoner KL")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2))
    colour = {arm: f"C{i}" for i, arm in enumerate(sorted({r["arm"] for r in runs}))}
    for r in runs:
        hist = [json.loads(x) for x in open(os.path.join(r["dir"], "metrics.jsonl")) if x.strip()]
        for ax, (k, title) in zip(axes, keys):
            if k in hist[0]:
                ax.plot([h["step"] for h in hist], [h[k] for h in hist], lw=1,
                        color=colour[r["arm"]],
                        label=f"{r['arm']} seed {r['seed']}")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
