"""An optional LLM judge for free-form answers that the rule-based grader marks wrong.

Rule-based grading (``acrl.rollout.answers.grade_problem``) stays the headline number. The judge only looks at items
whose gold answer is free-form and whose prediction the rules did not accept, asks an LLM on an OpenAI-compatible
endpoint (any ``Reasoner``: ``complete(prompts) -> replies``) whether the two answers are equivalent, and records
``judge_correct`` on each item. The summary reports the judged accuracy separately (``accuracy_judged``).
"""

from __future__ import annotations

import re

JUDGE_PROMPT = (
    "You compare a student's final answer with the reference answer of a math problem.\n\n"
    "Problem: {question}\n\nReference answer: {gold}\n\nStudent's answer: {prediction}\n\n"
    "Are the two answers mathematically equivalent (same value, same set, same expression, units aside)? "
    "Reply with exactly one word: YES or NO."
)


def parse_verdict(reply) -> bool | None:
    """``True`` for YES, ``False`` for NO, ``None`` for anything else (an error, or no clear verdict)."""
    if not isinstance(reply, str):
        return None
    words = re.findall(r"\b(yes|no)\b", reply.lower())
    return None if not words else words[-1] == "yes"


def judge_items(items: list[dict], problems_by_id: dict, judge) -> dict:
    """Fill ``judge_correct`` on every item (rule verdict, or the judge's for eligible free-form misses).

    Returns counts: ``judged`` (items sent), ``overturned`` (judged equivalent), ``unclear`` (no verdict: kept
    wrong). Eligible: answer type ``free_form``, rule-graded wrong, a non-empty prediction, not failed.
    """
    todo = []
    for it in items:
        it["judge_correct"] = bool(it["correct"])
        p = problems_by_id.get(it["id"])
        if (p is not None and p.answer_type == "free_form" and not it["correct"] and not it.get("failed")
                and (it.get("prediction") or "").strip()):
            todo.append((it, p))
    replies = judge.complete([JUDGE_PROMPT.format(question=p.question, gold=p.answer, prediction=it["prediction"])
                              for it, p in todo]) if todo else []
    overturned = unclear = 0
    for (it, _), rep in zip(todo, replies):
        verdict = parse_verdict(rep)
        it["judge_reply"] = rep if isinstance(rep, str) else f"{type(rep).__name__}: {rep}"
        if verdict is None:
            unclear += 1
        elif verdict:
            it["judge_correct"] = True
            overturned += 1
    live = [it for it in items if not it.get("failed")]
    return {"judged": len(todo), "overturned": overturned, "unclear": unclear,
            "accuracy_judged": sum(it["judge_correct"] for it in live) / max(len(live), 1)}
