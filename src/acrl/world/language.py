"""The world's language: fact sentences, clarification questions and answers, question templates, human captions.

Everything the captioner writes and the world reasoner reads is defined here, so generation and parsing never drift
apart. Fact keys look like ``bar.red``, ``count.blue``, ``rect.width``, ``tri.height``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# --- facts -------------------------------------------------------------------------------------------------------

# kind -> (sentence template, clarification question template, regex over lower-cased text, value range)
FACT_KINDS = {
    "bar": ("the {s} bar is {v}", "what is the height of the {s} bar ?", r"\bthe (\w+) bar is (-?\d+)\b", (1, 9)),
    "count": ("there are {v} {s} shapes", "how many {s} shapes are there ?",
              r"\bthere (?:are|is) (-?\d+) (\w+) shapes?\b", (1, 5)),
    "rect": ("the rectangle is {v} {s}", "how {s} is the rectangle ?", r"\bthe rectangle is (-?\d+) (wide|tall)\b",
             (1, 8)),
    "tri": ("the triangle {s} is {v}", "what is the {s} of the triangle ?",
            r"\bthe triangle (base|height) is (-?\d+)\b",
            (1, 8)),
}
_RECT_SLOT = {"width": "wide", "height": "tall"}
_RECT_KEY = {v: k for k, v in _RECT_SLOT.items()}


def fact_sentence(key: str, value: int) -> str:
    """``bar.red``, 7 -> ``the red bar is 7``."""
    kind, slot = key.split(".")
    slot = _RECT_SLOT.get(slot, slot) if kind == "rect" else slot
    return FACT_KINDS[kind][0].format(s=slot, v=value)


def clarification_question(key: str) -> str:
    """The one question the world reasoner asks about a missing fact (``what is the height of the red bar ?``)."""
    kind, slot = key.split(".")
    slot = _RECT_SLOT.get(slot, slot) if kind == "rect" else slot
    return FACT_KINDS[kind][1].format(s=slot)


def guess_value(key: str) -> int:
    """What the reasoner assumes for a fact it does not know when it is forced to answer (midpoint of the range)."""
    lo, hi = FACT_KINDS[key.split(".")[0]][3]
    return (lo + hi) // 2


def parse_facts(text: str) -> list[tuple[str, int]]:
    """All fact statements in ``text``, in order of appearance, as ``(key, value)``."""
    text = text.lower()
    found: list[tuple[int, str, int]] = []
    for kind, (_, _, pattern, _) in FACT_KINDS.items():
        for m in re.finditer(pattern, text):
            if kind == "bar":
                key, val = f"bar.{m.group(1)}", m.group(2)
            elif kind == "count":
                key, val = f"count.{m.group(2)}", m.group(1)
            elif kind == "rect":
                key, val = f"rect.{_RECT_KEY[m.group(2)]}", m.group(1)
            else:
                key, val = f"tri.{m.group(1)}", m.group(2)
            found.append((m.start(), key, int(val)))
    return [(k, v) for _, k, v in sorted(found)]


def parse_clarification_question(text: str) -> str | None:
    """Which fact a clarification question asks about (inverse of :func:`clarification_question`)."""
    t = " ".join(re.findall(r"\w+|\?", text.lower()))
    for m in re.finditer(r"what is the height of the (\w+) bar", t):
        return f"bar.{m.group(1)}"
    if m := re.search(r"how many (\w+) shapes", t):
        return f"count.{m.group(1)}"
    if m := re.search(r"how (wide|tall) is the rectangle", t):
        return f"rect.{_RECT_KEY[m.group(1)]}"
    if m := re.search(r"what is the (base|height) of the triangle", t):
        return f"tri.{m.group(1)}"
    return None


def split_statements(text: str) -> list[str]:
    """Split a caption into statements (separated by ``;``, ``.``, or new lines)."""
    return [s.strip() for s in re.split(r"[;\n]|\.(?!\d)", text) if s.strip()]


# --- questions ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuestionTemplate:
    """A question form. ``text`` has ``{c1}``.. slots; ``facts`` are fact-key templates; ``op`` combines the values."""

    family: str
    text: str
    facts: tuple[str, ...]
    op: str  # first | sum | diff | product | perimeter | half_product

    @property
    def regex(self) -> re.Pattern:
        pat = re.escape(self.text)
        for i in range(1, 5):
            pat = pat.replace(re.escape(f"{{c{i}}}"), rf"(?P<c{i}>\w+)")
        return re.compile(pat)


TEMPLATES: tuple[QuestionTemplate, ...] = (
    QuestionTemplate("bars", "what is the height of the {c1} bar ?", ("bar.{c1}",), "first"),
    QuestionTemplate("bars", "what is the sum of the {c1} and {c2} bars ?", ("bar.{c1}", "bar.{c2}"), "sum"),
    QuestionTemplate("bars", "how much taller is the {c1} bar than the {c2} bar ?", ("bar.{c1}", "bar.{c2}"), "diff"),
    QuestionTemplate("bars", "what is the sum of the {c1} and {c2} and {c3} bars ?",
                     ("bar.{c1}", "bar.{c2}", "bar.{c3}"), "sum"),
    QuestionTemplate("bars", "what is the sum of the {c1} and {c2} and {c3} and {c4} bars ?",
                     ("bar.{c1}", "bar.{c2}", "bar.{c3}", "bar.{c4}"), "sum"),
    QuestionTemplate("shapes", "how many {c1} shapes are there ?", ("count.{c1}",), "first"),
    QuestionTemplate("shapes", "how many shapes are there in total ?", ("count.red", "count.blue"), "sum"),
    QuestionTemplate("shapes", "how many more {c1} shapes than {c2} shapes are there ?",
                     ("count.{c1}", "count.{c2}"), "diff"),
    QuestionTemplate("rect", "how wide is the rectangle ?", ("rect.width",), "first"),
    QuestionTemplate("rect", "how tall is the rectangle ?", ("rect.height",), "first"),
    QuestionTemplate("rect", "what is the area of the rectangle ?", ("rect.width", "rect.height"), "product"),
    QuestionTemplate("rect", "what is the perimeter of the rectangle ?", ("rect.width", "rect.height"), "perimeter"),
    QuestionTemplate("tri", "what is the base of the triangle ?", ("tri.base",), "first"),
    QuestionTemplate("tri", "what is the height of the triangle ?", ("tri.height",), "first"),
    QuestionTemplate("tri", "what is the area of the triangle ?", ("tri.base", "tri.height"), "half_product"),
)


def apply_op(op: str, values: list[int]) -> float:
    if op == "first":
        return values[0]
    if op == "sum":
        return sum(values)
    if op == "diff":
        return values[0] - values[1]
    if op == "product":
        return values[0] * values[1]
    if op == "perimeter":
        return 2 * (values[0] + values[1])
    if op == "half_product":
        return values[0] * values[1] / 2
    raise ValueError(f"unknown op {op!r}")


def format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def match_question(question: str) -> tuple[QuestionTemplate, list[str]] | None:
    """Find the template of a world question and the fact keys it needs; ``None`` if it is not a world question."""
    q = " ".join(question.lower().split())
    q = q.split("\nchoices:")[0].split(" choices:")[0]
    for t in TEMPLATES:
        m = t.regex.search(q)
        if m:
            slots = m.groupdict()
            return t, [f.format(**slots) for f in t.facts]
    return None


# --- human-style captions -----------------------------------------------------------------------------------------

BASE_PHRASES = {
    "bars": "a bar chart with {n} bars",
    "shapes": "a picture of red and blue shapes",
    "rect": "{article} {colour} rectangle drawn on a grid",
    "tri": "{article} {colour} right triangle drawn on a grid",
}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def remarks(family: str, facts: dict[str, int], scene: dict) -> list[str]:
    """Qualitative remarks a person would make about the figure (no quantities)."""
    if family == "bars":
        bars = {k.split(".")[1]: v for k, v in facts.items()}
        top = max(bars.values())
        low = min(bars.values())
        out = []
        if list(bars.values()).count(top) == 1:
            out.append(f"the {max(bars, key=bars.get)} bar is the tallest")
        if list(bars.values()).count(low) == 1:
            out.append(f"the {min(bars, key=bars.get)} bar is the shortest")
        return out or ["the bars are of similar height"]
    if family == "shapes":
        r, b = facts["count.red"], facts["count.blue"]
        out = ["there are more red shapes" if r > b else "there are more blue shapes" if b > r
               else "the colours are balanced"]
        kinds = scene.get("kinds", [])
        if kinds:
            circles = sum(k == "circle" for k in kinds)
            if circles * 2 > len(kinds):
                out.append("most shapes are circles")
            elif circles * 2 < len(kinds):
                out.append("most shapes are squares")
        return out
    if family == "rect":
        w, h = facts["rect.width"], facts["rect.height"]
        return ["it is a square" if w == h else "it is wider than it is tall" if w > h
                else "it is taller than it is wide"]
    if family == "tri":
        b, h = facts["tri.base"], facts["tri.height"]
        return ["the right angle is at the origin",
                "the base is longer than the height" if b > h else "the height is longer than the base" if h > b
                else "the two legs are equal"]
    raise ValueError(family)


def _base(family: str, facts: dict[str, int], scene: dict) -> str:
    colour = scene.get("colour", "")
    return BASE_PHRASES[family].format(n=NUMBER_WORDS.get(len(facts), len(facts)), colour=colour,
                                       article="an" if colour[:1] in "aeiou" else "a")


def human_caption(family: str, facts: dict[str, int], scene: dict, rng: random.Random, fact_rate: float = 0.3) -> str:
    """A fluent caption written for people: names the figure, one remark, and each quantity with prob ``fact_rate``."""
    base = _base(family, facts, scene)
    parts = [rng.choice(remarks(family, facts, scene))]
    parts += [fact_sentence(k, v) for k, v in facts.items() if rng.random() < fact_rate]
    rng.shuffle(parts)
    return " ; ".join([base] + parts)


def oracle_caption(family: str, facts: dict[str, int], scene: dict) -> str:
    """A caption that states every fact (used to check that every question is answerable)."""
    base = _base(family, facts, scene)
    return " ; ".join([base] + [fact_sentence(k, v) for k, v in facts.items()])


def clarification_answer(key: str, facts: dict[str, int]) -> str:
    """The answer sentence to a clarification question (``the red bar is 7``)."""
    return fact_sentence(key, facts[key])
