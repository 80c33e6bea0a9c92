"""The world reasoner: a deterministic text-in/text-out reasoner for the embedded world.

It reads exactly the prompts an LLM reasoner gets (``acrl.rollout.episode``), extracts the facts stated in the
caption and
in a clarification, and either asks about one missing fact or computes the answer. Like an LLM it has limits:

- it reads at most ``read_budget`` statements of a caption (statements are separated by ``;``, ``.`` or new lines),
  so repetitive captions push later facts out of reach;
- a fact stated twice with different values is a contradiction: it counts as unknown, and the reasoner asks about it.

When it must answer without a needed fact it guesses the middle of the fact's range (usually wrong).

With ``noise`` > 0 it also slips like an LLM: with that probability an answer is built on a misread value (one
needed fact taken as another value of its range), or, where it may ask and could answer, it asks about a fact it
already has. A slip depends only on ``(seed, prompt)``, so the same prompt always gets the same reply.
"""

from __future__ import annotations

import random
import re
import zlib

from PIL import Image

from acrl.rollout.prompts import parse_prompt
from acrl.world import language


class WorldReasoner:
    """Implements ``acrl.rollout.protocols.Reasoner`` for world questions."""

    def __init__(self, read_budget: int = 6, noise: float = 0.0, seed: int = 0):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"reasoner noise must be in [0, 1], got {noise}")
        self.read_budget, self.noise, self.seed = read_budget, noise, seed
        self.slips = 0   # replies changed by noise (counted)

    def read(self, text: str, budget: int | None) -> tuple[dict[str, int], set[str]]:
        """Facts stated in ``text`` within the statement budget, and the keys stated with conflicting values."""
        known: dict[str, int] = {}
        conflicts: set[str] = set()
        statements = language.split_statements(text)
        for s in statements[: budget if budget is not None else len(statements)]:
            for key, value in language.parse_facts(s):
                if key in known and known[key] != value:
                    conflicts.add(key)
                known.setdefault(key, value)
        for k in conflicts:
            known.pop(k, None)
        return known, conflicts

    def reply(self, prompt: str) -> str:
        sec = parse_prompt(prompt)
        match = language.match_question(sec["question"] or "")
        if match is None:
            return "I cannot relate this question to the description. SOLVED \\boxed{0}"
        template, needed = match
        known, _ = self.read(sec["caption"] or "", self.read_budget)
        if sec["clarification"]:
            extra, _ = self.read(sec["clarification"], None)
            known.update(extra)
        missing = [k for k in needed if k not in known]
        if missing and sec["mode"] == "decide":
            return f"NEED MORE INFO\n{language.clarification_question(missing[0])}"
        values = [known.get(k, language.guess_value(k)) for k in needed]
        rng = random.Random(zlib.crc32(f"{self.seed}\0{prompt}".encode())) if self.noise else None
        if rng is not None and rng.random() < self.noise:
            self.slips += 1
            i = rng.randrange(len(needed))
            if sec["mode"] == "decide" and rng.random() < 0.5:   # asks although it could answer
                return f"NEED MORE INFO\n{language.clarification_question(needed[i])}"
            lo, hi = language.FACT_KINDS[needed[i].split(".")[0]][3]
            values[i] = rng.choice([v for v in range(lo, hi + 1) if v != values[i]])   # misread
        value = language.apply_op(template.op, values)
        answer = language.format_number(value)
        choices = _parse_choices(sec["question"] or "")
        if choices:
            nums = [_num(c) for c in choices]
            best = min(range(len(choices)), key=lambda i: abs(nums[i] - value) if nums[i] is not None else 1e9)
            answer = chr(65 + best)
        return f"SOLVED \\boxed{{{answer}}}"

    def complete(self, prompts: list[str]) -> list[str]:
        return [self.reply(p) for p in prompts]


def _parse_choices(question: str) -> list[str]:
    return re.findall(r"^\([A-Z]\)\s*(.+)$", question, flags=re.M)


def _num(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


class OracleClarifier:
    """Answers clarification questions from the true facts of known images (for tests and upper bounds)."""

    def __init__(self, problems):
        self._facts = {id(p.image): p.facts for p in problems}

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        out = []
        for img, q in zip(images, questions):
            facts = self._facts.get(id(img), {})
            key = language.parse_clarification_question(q)
            out.append(language.clarification_answer(key, facts) if key in facts else "i cannot tell")
        return out


class NoisyClarifier:
    """Wraps a clarifier; with probability ``rate`` replaces the stated value by a wrong one (imperfect π_ref)."""

    def __init__(self, inner, rate: float, seed: int = 0):
        self.inner, self.rate, self.rng = inner, rate, random.Random(seed)

    def answer(self, images, questions):
        out = []
        for a in self.inner.answer(images, questions):
            facts = language.parse_facts(a) if isinstance(a, str) else []
            if facts and self.rng.random() < self.rate:
                key, val = facts[0]
                lo, hi = language.FACT_KINDS[key.split(".")[0]][3]
                wrong = self.rng.choice([v for v in range(lo, hi + 1) if v != val])
                a = language.fact_sentence(key, wrong)
            out.append(a)
        return out
