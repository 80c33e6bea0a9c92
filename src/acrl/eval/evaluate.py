"""Evaluation: single-pass accuracy (the paper's inference protocol) and clarification-enabled metrics.

For each held-out problem the captioner writes one greedy caption c0. Then:

- single pass: the reasoner must answer from c0 (``clarification=off``) -> **accuracy**;
- clarification enabled: the reasoner may ask once, π_ref answers -> **clarification rate**, **accuracy with
  clarification**, the **gap** (with minus without), and **Acc_deny**: among the episodes that asked, the accuracy
  when the request is refused and the reasoner must answer from c0 alone.

Results break down by family (or benchmark category), by the number of facts a question needs and, with
clarification, by the number of clarification turns the reasoner took (``by_turns``: the distribution of turns and
the accuracy at each; ``max_clarifications`` > 1 lets it ask in turn, as in multi-turn training).

A single-pass reply that follows neither SOLVED nor NEED MORE INFO is wrong. For small LLM reasoners that rarely
follow the protocol, such a reply is also read leniently (:func:`acrl.rollout.grading.final_answer`: "the answer is
X", the
last sentence's conclusion) and counted apart: ``lenient`` replies and ``accuracy_lenient`` (correct under either
reading). ``accuracy`` never uses the lenient reading, and neither does training.

Every item keeps the reasoner's raw replies (``replies``: ``single_pass``, ``decision``, ``final``, ``denial``) so
a failure can be read, and the loader's scalar ``meta`` (We-Math ``wemath_id`` / ``key``, DynaMath ``seed`` /
``variant`` ...) so benchmark metrics can be computed from ``items.jsonl`` alone.

Problems without an image (MathVerse's ``testmini_text_only``) are not captioned: the reasoner gets the question
with the explicit caption :data:`NO_IMAGE_CAPTION`, a clarification request about them is answered with
:data:`NO_IMAGE_CLARIFICATION`, and the items are marked ``text_only`` and counted in ``summary['text_only']``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Sequence

from tqdm import tqdm

from acrl import outdir
from acrl.problem import Problem
from acrl.rollout.answers import grade_problem
from acrl.rollout.episode import Episode, EpisodeConfig, run_episodes
from acrl.rollout.grading import final_answer
from acrl.rollout.prompts import deny_prompt
from acrl.rollout.protocols import Clarifier, Reasoner

MAX_FAILED = 0.05   # an evaluation with more failed episodes than this share did not do its job (non-zero exit)
NO_IMAGE_CAPTION = "There is no image for this problem: the question text above is complete."
NO_IMAGE_CLARIFICATION = "There is no image for this problem; everything known is in the question text."


class _RecordingReasoner:
    """Passes prompts through and remembers each reply by prompt (the Acc_deny replies are not kept on the
    Episode, so the items take them from here)."""

    def __init__(self, inner: Reasoner):
        self.inner, self.replies = inner, {}

    def complete(self, prompts: list[str]) -> list:
        out = self.inner.complete(prompts)
        for p, r in zip(prompts, out):
            if isinstance(r, str):
                self.replies[p] = r
        return out


class _TextOnlyClarifier:
    """The reference captioner for images it has, a fixed answer for problems without one."""

    def __init__(self, inner: Clarifier):
        self.inner = inner

    def answer(self, images, questions):
        todo = [i for i, im in enumerate(images) if im is not None]
        got = self.inner.answer([images[i] for i in todo], [questions[i] for i in todo]) if todo else []
        out: list = [NO_IMAGE_CLARIFICATION] * len(images)
        for i, a in zip(todo, got):
            out[i] = a
        return out


def _captions(policy, batch: Sequence[Problem]) -> list[list[str]]:
    """One greedy caption per problem; problems without an image get :data:`NO_IMAGE_CAPTION`."""
    pictured = [p for p in batch if p.image is not None]
    texts = iter(policy.generate([p.image for p in pictured], [p.question_with_choices() for p in pictured], n=1,
                                 greedy=True).texts if pictured else [])
    return [next(texts) if p.image is not None else [NO_IMAGE_CAPTION] for p in batch]


def _scalar_meta(meta: dict) -> dict:
    """The JSON-friendly scalar fields of a problem's ``meta`` (ids, keys, versions; no long lists)."""
    return {k: v for k, v in (meta or {}).items() if isinstance(v, (str, int, float, bool)) or v is None}


def evaluate(policy, reasoner: Reasoner, clarifier: Clarifier, problems: Sequence[Problem], batch_size: int = 100,
             progress: bool = False, desc: str = "eval", items_path: str | None = None,
             max_clarifications: int = 1) -> tuple[dict, list[dict]]:
    """Returns ``(summary, items)``; ``summary['overall']`` and ``summary['by_<key>'][value]`` hold the metrics.

    With ``items_path``, every finished batch is appended to that JSONL file as it completes, and items already
    there (from an interrupted run) are kept and skipped; items that failed (service errors) are tried again.
    """
    done: dict[str, dict] = {}
    if items_path and os.path.exists(items_path):
        with open(items_path) as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:      # a line cut off by the interruption
                    continue
                if not row.get("failed"):
                    done[row["id"]] = row
    todo = [p for p in problems if p.id not in done]
    sink = None
    if items_path:
        os.makedirs(os.path.dirname(os.path.abspath(items_path)), exist_ok=True)
        sink = open(items_path, "w")
        for row in done.values():
            sink.write(outdir.dumps(row) + "\n")
        sink.flush()
    new = _evaluate_batches(policy, reasoner, clarifier, todo, batch_size, progress, desc, sink, max_clarifications)
    if sink:
        sink.close()
    by_id = {**done, **{r["id"]: r for r in new}}
    items = [by_id[p.id] for p in problems if p.id in by_id]
    return summarize(items), items


def _evaluate_batches(policy, reasoner, clarifier, problems, batch_size, progress, desc, sink,
                      max_clarifications: int = 1) -> list[dict]:
    items: list[dict] = []
    if any(p.image is None for p in problems):
        clarifier = _TextOnlyClarifier(clarifier)
    for i in tqdm(range(0, len(problems), batch_size), desc=desc, disable=not progress, dynamic_ncols=True,
                  mininterval=0.1 if sys.stderr.isatty() else 30.0):   # a log file gets a line every 30 s
        batch = list(problems[i:i + batch_size])
        first = len(items)
        captions = _captions(policy, batch)
        rec = _RecordingReasoner(reasoner)
        sp = run_episodes(batch, captions, rec, None, EpisodeConfig(clarification="off"))
        cl = run_episodes(batch, captions, rec, clarifier, EpisodeConfig(clarification="on", record_deny=True,
                                                                         max_clarifications=max_clarifications))
        for p, (a,), (b,) in zip(batch, sp, cl):
            denial = (rec.replies.get(deny_prompt(p.question_with_choices(), b.caption, b.question))
                      if b.decision == "ask" and b.question else None)
            items.append({
                "id": p.id, "family": p.family, "category": p.category, "needed": len(p.needed),
                "question": p.question, "answer": p.answer, "caption": a.caption,
                "prediction": a.prediction, "correct": a.correct, **_lenient(a, p),
                "failed": a.tier == "failed" or b.tier == "failed",
                "malformed": a.malformed or b.malformed, "asked": b.decision == "ask",
                "clarification_question": b.question, "clarification": b.clarification,
                "clarified_prediction": b.prediction, "clarified_correct": b.correct, "turns": b.turns,
                "clarification_questions": b.questions, "clarifications": b.clarifications,
                "deny_prediction": b.deny_prediction, "deny_correct": b.deny_correct,
                "text_only": p.image is None,
                "replies": {"single_pass": a.replies[0] if a.replies else None,
                            "decision": b.replies[0] if b.replies else None,
                            "final": b.replies[-1] if len(b.replies) > 1 else None,
                            "denial": denial},
                "errors": [e for e in (a.error, b.error) if e],
                "meta": _scalar_meta(p.meta),
            })
        if sink:
            for row in items[first:]:
                sink.write(outdir.dumps(row) + "\n")
            sink.flush()
    return items


def _lenient(ep: Episode, p: Problem) -> dict:
    """The lenient reading of a single-pass reply without a decision (counted apart, never in ``accuracy``)."""
    ans = final_answer(ep.replies[0], p.question) if ep.malformed == "no_decision" and ep.replies else None
    return {"lenient_prediction": ans, "lenient_correct": bool(ans is not None and grade_problem(ans, p))}


def group_metrics(rows: list[dict]) -> dict:
    live = [r for r in rows if not r["failed"]]
    n = len(live)
    if not n:
        return {"n": 0, "failed": len(rows)}
    asked = [r for r in live if r["asked"]]
    acc = sum(r["correct"] for r in live) / n
    acc_clar = sum(r["clarified_correct"] for r in live) / n
    denied = [r for r in asked if r["deny_correct"] is not None]
    return {
        "n": n,
        "failed": len(rows) - n,
        "malformed": sum(bool(r["malformed"]) for r in live),
        "accuracy": acc,
        "clarification_rate": len(asked) / n,
        "accuracy_with_clarification": acc_clar,
        "clarification_gap": acc_clar - acc,
        "acc_deny": sum(bool(r["deny_correct"]) for r in denied) / len(denied) if denied else float("nan"),
        "lenient": sum(r.get("lenient_prediction") is not None for r in live),
        "accuracy_lenient": sum(bool(r["correct"] or r.get("lenient_correct")) for r in live) / n,
        "caption_words": sum(len(r["caption"].split()) for r in live) / n,
    }


def summarize(items: list[dict]) -> dict:
    out: dict = {"overall": group_metrics(items), "text_only": sum(bool(r.get("text_only")) for r in items)}
    for key in ("family", "needed"):
        groups: dict = defaultdict(list)
        for r in items:
            groups[r[key]].append(r)
        out[f"by_{key}"] = {str(k): group_metrics(v) for k, v in sorted(groups.items())}
    out["by_turns"] = turn_metrics(items)
    return out


def turn_metrics(items: list[dict]) -> dict:
    """With clarification enabled: per number of clarification turns taken (0 = answered from the caption), the
    share of episodes (``fraction``) and their accuracy (``accuracy_with_clarification``)."""
    live = [r for r in items if not r["failed"]]
    by: dict = defaultdict(list)
    for r in live:
        by[int(r.get("turns", int(bool(r["asked"]))))].append(r)
    return {str(k): {"n": len(v), "fraction": len(v) / len(live),
                     "accuracy_with_clarification": sum(r["clarified_correct"] for r in v) / len(v)}
            for k, v in sorted(by.items())}


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{100 * x:.1f}"
    return str(x)


def markdown_table(summary: dict, title: str = "") -> str:
    cols = ["n", "accuracy", "clarification_rate", "accuracy_with_clarification", "clarification_gap", "acc_deny"]
    head = ["", "n", "single-pass acc %", "clar. rate %", "acc. with clar. %", "gap (pts)", "Acc_deny %"]
    if summary["overall"].get("lenient"):   # replies without a decision were read leniently: show it apart
        cols, head = cols + ["accuracy_lenient"], head + ["lenient acc. %"]
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |",
                                                      "|" + "---|" * len(head)]
    rows = [("overall", summary["overall"])]
    rows += [(f"family {k}", v) for k, v in summary.get("by_family", {}).items()]
    rows += [(f"{k} fact(s)", v) for k, v in summary.get("by_needed", {}).items()]
    for name, m in rows:
        lines.append("| " + " | ".join([name] + [_fmt(m.get(c)) for c in cols]) + " |")
    return "\n".join(lines) + "\n"


def failure(summary: dict, max_failed: float = MAX_FAILED) -> str | None:
    """Why an evaluation did not do its job (more than ``max_failed`` of its episodes failed, or it had none), in
    words; None when it did."""
    o = summary["overall"]
    total = o.get("n", 0) + o.get("failed", 0)
    if total == 0:
        return "there was nothing to evaluate"
    if o.get("failed", 0) > max_failed * total:
        return (f"{o['failed']} of {total} episodes failed (more than the {100 * max_failed:g}% allowed; "
                f"their errors are in items.jsonl)")
    return None


def write_results(out: str, summary: dict, items: list[dict], title: str = "") -> None:
    """summary.json (strict JSON), items.jsonl, table.md and by_category.png, each replaced whole; summary.json
    last, so its presence marks a finished evaluation."""
    os.makedirs(out, exist_ok=True)
    outdir.write_text(os.path.join(out, "items.jsonl"), "".join(outdir.dumps(r) + "\n" for r in items))
    outdir.write_text(os.path.join(out, "table.md"), markdown_table(summary, title))
    plot_by_category(summary, os.path.join(out, "by_category.png"), title)
    outdir.write_json(os.path.join(out, "summary.json"), summary)


def plot_by_category(summary: dict, path: str, title: str = "") -> None:
    """Bar chart of single-pass accuracy, accuracy with clarification and clarification rate per category
    (``by_category`` when the summary has it, else ``by_family``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary.get("by_category") or summary.get("by_family") or {}
    groups = {k: v for k, v in groups.items() if v.get("n")}
    if not groups:
        return
    names = list(groups)
    series = [("accuracy", "single-pass accuracy"), ("accuracy_with_clarification", "accuracy with clarification"),
              ("clarification_rate", "clarification rate")]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4))
    for i, (key, label) in enumerate(series):
        xs = [j + (i - 1) * width for j in range(len(names))]
        ax.bar(xs, [100 * groups[n].get(key, 0.0) for n in names], width, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n(n={groups[n]['n']})" for n in names], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(title or "by category", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
