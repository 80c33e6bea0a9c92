"""Clarification patterns: what the reasoner asks for, and what the caption already states.

Two views of a clarification question q1:

- **world fact kind** (:func:`world_fact_kind`): in the embedded world every question the reasoner asks names one
  scene fact (``what is the height of the red bar ?`` -> ``bar.red``); the fact's kind is its label (bar height,
  shape count, rectangle width, rectangle height, triangle base, triangle height).
- **question kind** (:func:`question_kind`): for benchmark questions, a rule-based classifier of the question text
  into ``length``, ``angle``, ``coordinate/position``, ``count``, ``label/text``, ``chart value``, ``relation`` or
  ``other``. The rules are regular expressions over the lower-cased question, tried in the order of
  :data:`QUESTION_RULES`; the first that matches wins:

  ===================== ==================================================== ==========================================
  kind                  cue words (abridged)                                 example
  ===================== ==================================================== ==========================================
  count                 how many / number of (not of units, cm, degrees ...) How many triangles are in the figure?
  angle                 angle, degree(s), °, ∠, radian                       What is the measure of angle ABC?
  chart value           bar, chart, graph, plot, axis, legend, table, pie,   What value does the blue bar show for
                        percent(age), %, y-value                             2019?
  coordinate/position   coordinate(s), (x, y), position, located, location,  What are the coordinates of point P?
                        where, which quadrant, intercept
  relation              parallel, perpendicular, tangent, congruent,         Is line AB parallel to line CD?
                        similar, bisect(s), intersect(s), equal, than,
                        compared, relationship
  length                length, long, wide/width, tall/height, radius,       What is the length of side BC?
                        diameter, distance, side, perimeter, base, cm, units
  label/text            label(led), letter, name(d), text, written, title,   What is the label on the x axis?
                        says, marked, symbol, word, unit(s) of
  other                 anything else                                        What color is the circle?
  ===================== ==================================================== ==========================================

  Order matters: ``what is the height of the red bar ?`` is a chart value (not a length), ``how many units long
  is AB ?`` a length (not a count), ``is AB equal to CD ?`` a relation. ``tests/app/report/test_patterns.py`` holds
  the table of examples the rules are checked against.

:func:`pattern_tables` turns episodes into the share of each kind per source (pretrained vs trained), with
examples; :func:`front_loaded` measures, in the world, how often the caption already states each needed fact.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from acrl.world.language import match_question, parse_clarification_question, parse_facts

# --- world: fact kinds ---------------------------------------------------------------------------------------------

FACT_KIND_LABELS = {
    "bar": "bar height", "count": "shape count", "rect.width": "rectangle width", "rect.height": "rectangle height",
    "tri.base": "triangle base", "tri.height": "triangle height",
}
UNRECOGNISED = "unrecognised"


def fact_kind(key: str) -> str:
    """``bar.red`` -> ``bar height``; ``rect.width`` -> ``rectangle width``."""
    return FACT_KIND_LABELS.get(key, FACT_KIND_LABELS.get(key.split(".")[0], key))


def world_fact_kind(question: str | None) -> str | None:
    """The kind of scene fact a world clarification question asks about; ``None`` for no question,
    ``unrecognised`` for one that names no world fact."""
    if not question:
        return None
    key = parse_clarification_question(question)
    return fact_kind(key) if key else UNRECOGNISED


def world_needed(question: str) -> list[str] | None:
    """The fact keys a world question needs (``None`` if it is not a world question)."""
    m = match_question(question or "")
    return m[1] if m else None


# --- benchmarks: a rule-based question classifier -----------------------------------------------------------------

_NOT_UNITS = r"(?!\s+(?:units?|cm|centimet\w*|mm|millimet\w*|met\w*|m|km|inch\w*|in|feet|foot|ft|degrees?)\b)"

QUESTION_RULES: tuple[tuple[str, re.Pattern], ...] = tuple((k, re.compile(p)) for k, p in (
    ("count", r"\bhow many\b" + _NOT_UNITS + r"|\bnumber of\b" + _NOT_UNITS + r"|\bcount(?:ed|s)?\b"),
    ("angle", r"\bangles?\b|\bdegrees?\b|°|∠|\bradians?\b"),
    ("chart value", r"\bbars?\b|\bcharts?\b|\bgraphs?\b|\bplot(?:ted|s)?\b|\baxis\b|\baxes\b|\b[xy]-?axis\b|"
                    r"\blegend\b|\btables?\b|\bpie\b|\bpercent(?:age)?s?\b|%|\b[xy]-?values?\b|\bcurve\b"),
    ("coordinate/position", r"\bcoordinates?\b|\(\s*-?\d+(?:\.\d+)?\s*,\s*-?\d+(?:\.\d+)?\s*\)|\bpositions?\b|"
                            r"\blocated\b|\blocation\b|\bwhere\b|\bquadrant\b|\bintercepts?\b|\bvertices\b"),
    ("relation", r"\bparallel\b|\bperpendicular\b|\btangent\b|\bcongruent\b|\bsimilar\b|\bbisect\w*|"
                 r"\bintersect\w*|\bequal\b|\bequals\b|\bthan\b|\bcompared?\b|\brelationship\b|\bratio\b"),
    ("length", r"\blength\b|\blong\b|\bwide\b|\bwidth\b|\btall\b|\bheight\b|\bradius\b|\bdiameter\b|\bdistance\b|"
               r"\bsides?\b|\bperimeter\b|\bbase\b|\bcm\b|\bunits?\b|\bhypotenuse\b|\bleg\b|\bsegment\b"),
    ("label/text", r"\blabel(?:l?ed|s)?\b|\bletters?\b|\bnamed?\b|\btext\b|\bwritten\b|\btitle\b|\bsays?\b|"
                   r"\bmarked\b|\bsymbol\b|\bwords?\b|\bcalled\b"),
))
QUESTION_KINDS = tuple(k for k, _ in QUESTION_RULES) + ("other",)


def question_kind(question: str | None) -> str | None:
    """Classify a clarification question (see the module docstring); ``None`` for no question."""
    if not question or not question.strip():
        return None
    q = " ".join(question.lower().split())
    for kind, rule in QUESTION_RULES:
        if rule.search(q):
            return kind
    return "other"


# --- tables --------------------------------------------------------------------------------------------------------

def kind_shares(episodes: list[dict], kind_of) -> dict:
    """``{"n": episodes, "asked": n asking, "kinds": {kind: count}}`` over ``episodes`` (dicts with ``asked`` and
    ``clar_q``); ``kind_of`` maps a question to its kind."""
    live = [e for e in episodes if e.get("tier") != "failed"]
    asked = [e for e in live if e.get("asked")]
    kinds = Counter(kind_of(e.get("clar_q")) or UNRECOGNISED for e in asked)
    return {"n": len(live), "asked": len(asked), "kinds": dict(kinds)}


def pattern_table(sources: dict[str, list[dict]], kind_of, order: tuple[str, ...] = (), examples: int = 3) -> dict:
    """The share of each kind of clarification question per source.

    Returns ``{"sources": [...], "kinds": [...], "rows": {kind: {source: {"count", "share", "per100"}}},
    "totals": {source: kind_shares}, "examples": {kind: [question, ...]}}``: ``share`` is the fraction of that
    source's questions, ``per100`` the questions of that kind per 100 problems (episodes)."""
    totals = {name: kind_shares(eps, kind_of) for name, eps in sources.items()}
    seen = {k for t in totals.values() for k in t["kinds"]}
    kinds = [k for k in order if k in seen] + sorted(seen - set(order))
    rows: dict = {}
    for k in kinds:
        rows[k] = {}
        for name, t in totals.items():
            c = t["kinds"].get(k, 0)
            rows[k][name] = {"count": c, "share": c / t["asked"] if t["asked"] else None,
                             "per100": 100 * c / t["n"] if t["n"] else None}
    ex: dict = defaultdict(list)
    for eps in sources.values():
        for e in eps:
            q = e.get("clar_q")
            if e.get("asked") and q:
                k = kind_of(q) or UNRECOGNISED
                if q not in ex[k] and len(ex[k]) < examples:
                    ex[k].append(q)
    return {"sources": list(sources), "kinds": kinds, "rows": rows, "totals": totals, "examples": dict(ex)}


def by_needed(sources: dict[str, list[dict]]) -> dict:
    """Clarification rate by the number of facts the question needs, per source: ``{needed: {source: {n, rate}}}``."""
    out: dict = defaultdict(dict)
    for name, eps in sources.items():
        groups: dict = defaultdict(list)
        for e in eps:
            if e.get("tier") != "failed" and e.get("needed") is not None:
                groups[e["needed"]].append(e)
        for k, g in groups.items():
            out[str(k)][name] = {"n": len(g), "rate": sum(bool(e.get("asked")) for e in g) / len(g)}
    return {k: out[k] for k in sorted(out, key=lambda s: (len(s), s))}


def front_loaded(sources: dict[str, list[dict]]) -> dict:
    """World only: how often the caption already states a fact the question needs, by fact kind and source.

    Returns ``{kind: {source: {"needed": n, "stated": n, "share": stated / needed}}}`` (a fact is stated when
    the caption has its sentence, e.g. ``the red bar is 7``, whatever the value)."""
    out: dict = defaultdict(dict)
    for name, eps in sources.items():
        need, stated = Counter(), Counter()
        for e in eps:
            keys = world_needed(e.get("question") or "")
            if not keys:
                continue
            have = {k for k, _ in parse_facts(e.get("caption") or "")}
            for k in keys:
                need[fact_kind(k)] += 1
                stated[fact_kind(k)] += k in have
        for kind, n in need.items():
            out[kind][name] = {"needed": n, "stated": stated[kind], "share": stated[kind] / n}
    order = [v for v in FACT_KIND_LABELS.values() if v in out]
    return {k: out[k] for k in order}
