"""The AC-RL episode: prompts, the reasoner's reply protocol, the episode runner and the tiered reward.

One episode (paper, Fig. 1)::

    caption c0 ──► reasoner(question, c0) ──► SOLVED \\boxed{a}            → grade → 1.0 or 0
                                        └──► NEED MORE INFO + question q1 → reference answers c1 from the image
                                             reasoner(question, c0, q1, c1) → \\boxed{a} → grade → alpha or 0

Only the caption c0 is the captioner's action; everything after it is environment. Modes (``clarification``):
``on`` (training and clarification-enabled evaluation), ``off`` (single pass: the reasoner must answer from c0,
the paper's inference protocol) and ``deny`` (the reasoner may ask, but every request is refused and it must answer
from c0: accuracy under denial, Acc_deny). With ``record_deny=True`` an ``on`` run also records, for every episode
that asked, what the reasoner answers when its request is denied, so one evaluation pass yields all metrics.

The runner batches: all decision prompts of a step go to the reasoner in one call, only the clarified subset goes to
the reference (each distinct question about a problem once: π_ref is frozen), and all final prompts go to the
reasoner in one more call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

from PIL import Image

from acrl.data.answers import grade_problem as grade
from acrl.grading import extract_answer, extract_boxed, strip_think
from acrl.problem import Problem

# --- prompts -----------------------------------------------------------------------------------------------------
# Section markers are part of the protocol: the world reasoner (and any parser of transcripts) relies on them.
QUESTION_MARK = "Question:"
CAPTION_MARK = "Image description:"
ASKED_MARK = "You asked:"
CLARIFICATION_MARK = "Answer from someone who can see the image:"

CAPTIONER_PROMPT = (
    "Describe this image for a reader who cannot see it and must answer the question below from your description "
    "alone. State every quantity, label and relation the question needs. Do not answer the question.\n"
    "Question: {question}"
)

_CONTEXT = (
    "You are solving a visual math problem, but you cannot see the image. Someone who can see it wrote a "
    "description.\n\n" + QUESTION_MARK + " {question}\n\n" + CAPTION_MARK + " {caption}\n\n"
)

DECISION_PROMPT = _CONTEXT + (
    "If the description gives you everything you need, solve the problem and reply with SOLVED followed by the final "
    "answer in \\boxed{{}}.\nIf a detail you need is missing or unclear, reply with NEED MORE INFO followed by "
    "exactly one short question about the image on the next line."
)

SINGLE_PASS_PROMPT = _CONTEXT + (
    "Solve the problem from the description alone; if a detail is missing, make your best guess. Reply with SOLVED "
    "followed by the final answer in \\boxed{{}}."
)

FINAL_PROMPT = _CONTEXT + (
    ASKED_MARK + " {asked}\n" + CLARIFICATION_MARK + " {clarification}\n\n"
    "Now solve the problem. Reply with SOLVED followed by the final answer in \\boxed{{}}."
)

FOLLOWUP_ASK = (
    "If the answers give you everything you need, solve the problem and reply with SOLVED followed by the final "
    "answer in \\boxed{{}}.\nIf a detail you need is still missing, reply with NEED MORE INFO followed by exactly "
    "one short question about the image on the next line."
)

DENY_PROMPT = _CONTEXT + (
    ASKED_MARK + " {asked}\nNo further information is available.\n\n"
    "Solve the problem from the description alone; if a detail is missing, make your best guess. Reply with SOLVED "
    "followed by the final answer in \\boxed{{}}."
)

CLARIFY_PROMPT = "Answer this question about the image in one short sentence.\nQuestion: {question}"


def captioner_prompt(question: str) -> str:
    """What an instruction-following captioner is asked (the trainable policy sees image + this text)."""
    return CAPTIONER_PROMPT.format(question=question)


def decision_prompt(question: str, caption: str) -> str:
    """First reasoner turn: answer (SOLVED \\boxed{}) or ask (NEED MORE INFO + one question)."""
    return DECISION_PROMPT.format(question=question, caption=caption)


def single_pass_prompt(question: str, caption: str) -> str:
    """Single-pass inference: the reasoner must answer from the caption."""
    return SINGLE_PASS_PROMPT.format(question=question, caption=caption)


def final_prompt(question: str, caption: str, asked: str, clarification: str) -> str:
    """Second reasoner turn after one clarification."""
    return FINAL_PROMPT.format(question=question, caption=caption, asked=asked, clarification=clarification)


def followup_prompt(question: str, caption: str, turns: Sequence[tuple[str, str]], may_ask: bool = False) -> str:
    """The reasoner's turn after the clarifications ``turns`` (``(asked, answer)`` pairs, in order). ``may_ask``:
    it may ask once more (multi-turn, ``max_clarifications`` > number of turns). With one turn and no further
    question this is :func:`final_prompt`."""
    if not turns:
        raise ValueError("followup_prompt needs at least one (question, answer) turn")
    if len(turns) == 1 and not may_ask:
        return final_prompt(question, caption, *turns[0])
    asked = "\n".join(f"{ASKED_MARK} {q}\n{CLARIFICATION_MARK} {a}" for q, a in turns)
    tail = FOLLOWUP_ASK if may_ask else FINAL_PROMPT[FINAL_PROMPT.rindex("\n\n") + 2:]
    return _CONTEXT.format(question=question, caption=caption) + asked + "\n\n" + tail.format()


def deny_prompt(question: str, caption: str, asked: str) -> str:
    """Second reasoner turn when the clarification request is refused (Acc_deny)."""
    return DENY_PROMPT.format(question=question, caption=caption, asked=asked)


def clarify_prompt(question: str) -> str:
    """What an instruction-following reference captioner is asked about the image."""
    return CLARIFY_PROMPT.format(question=question)


# --- few-shot demonstrations (``reasoner.few_shot``) --------------------------------------------------------------
# Worked exchanges in the protocol, shown to a weak reasoner as earlier chat turns before its prompt. Their content
# (fruit, gardens, ropes) comes from no benchmark and no world split. Each prompt kind gets demonstrations written
# with its own template, so the reasoner sees exactly the format it must continue.
_SHOTS = (   # (question, caption, clarification turns, reply)
    ("How many fruits are in the basket?", "A basket with 4 apples and 3 pears.", (),
     "The basket holds 4 + 3 = 7 fruits.\nSOLVED \\boxed{7}"),
    ("What is the area of the garden?", "A rectangular garden drawn on a grid. It is 5 wide.", (),
     "NEED MORE INFO\nHow tall is the garden?"),
    ("How much longer is the red rope than the blue rope?", "Two ropes: the red rope is 9 long, the blue one 4.", (),
     "The red rope is 9 - 4 = 5 longer.\nSOLVED \\boxed{5}"),
    ("What is the area of the garden?", "A rectangular garden drawn on a grid. It is 5 wide.",
     (("How tall is the garden?", "The garden is 2 tall."),), "The area is 5 * 2 = 10.\nSOLVED \\boxed{10}"),
    ("How many coins are there in total?", "A table with gold and silver coins; there are 6 gold coins.",
     (("How many silver coins are there?", "There are 5 silver coins."),), "6 + 5 = 11 coins.\nSOLVED \\boxed{11}"),
)
_DENIED = "No further information is available."


def prompt_kind(prompt: str) -> str:
    """Which reasoner turn ``prompt`` is: ``decision``, ``single_pass``, ``followup`` (after clarifications; it may
    ask again), ``final`` or ``deny``."""
    if ASKED_MARK in prompt:
        if _DENIED in prompt:
            return "deny"
        return "followup" if prompt.endswith(FOLLOWUP_ASK.format()) else "final"
    return "decision" if prompt.endswith(DECISION_PROMPT[DECISION_PROMPT.rindex("\n\n") + 2:].format()) \
        else "single_pass"


def few_shot_messages(prompt: str, k: int) -> list[dict]:
    """Up to ``k`` demonstrations (user prompt, assistant reply) for a prompt of ``prompt``'s kind."""
    if k <= 0:
        return []
    kind = prompt_kind(prompt)
    pairs = []
    for question, caption, turns, reply in _SHOTS:
        if kind == "decision" and not turns:
            pairs.append((decision_prompt(question, caption), reply))
        elif kind == "single_pass" and not turns and "SOLVED" in reply:
            pairs.append((single_pass_prompt(question, caption), reply))
        elif kind == "deny" and not turns and "SOLVED" in reply:
            pairs.append((deny_prompt(question, caption, "What else is in the picture?"), reply))
        elif kind in ("followup", "final") and turns:
            pairs.append((followup_prompt(question, caption, list(turns), may_ask=kind == "followup"), reply))
    return [m for q, a in pairs[:k] for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


_TURN = re.compile(re.escape(ASKED_MARK) + r" (.*?)\n" + re.escape(CLARIFICATION_MARK)
                   + r" (.*?)(?=\n" + re.escape(ASKED_MARK) + r" |\n\n(?:Now solve|If the answers)|\Z)", re.S)


def parse_prompt(prompt: str) -> dict:
    """Recover the sections of a reasoner prompt (question, caption, asked, clarification) and its mode.

    ``mode`` is ``decide`` (may ask), ``final`` (after clarifications, must answer) or ``answer`` (must answer).
    ``turns``: every ``(asked, answer)`` pair of a follow-up prompt, in order; ``asked`` is the first question,
    ``clarification`` all answers, one per line.
    """
    def section(start: str, stops: Sequence[str]) -> str | None:
        i = prompt.find(start)
        if i < 0:
            return None
        i += len(start)
        j = min([k for s in stops if (k := prompt.find(s, i)) >= 0], default=len(prompt))
        return prompt[i:j].strip()

    turns = [(q.strip(), a.strip()) for q, a in _TURN.findall(prompt)]
    out = {
        "question": section(QUESTION_MARK, ["\n\n" + CAPTION_MARK]),
        "caption": section(CAPTION_MARK, ["\n\nIf the description", "\n\nSolve the problem", "\n\n" + ASKED_MARK]),
        "asked": section(ASKED_MARK, ["\n"]),
        "clarification": "\n".join(a for _, a in turns) if turns else None,
    }
    tail = prompt[prompt.rfind("\n\n"):]
    may_ask = "reply with NEED MORE INFO" in tail
    out["mode"] = "decide" if may_ask else "final" if turns else "answer"
    out["turns"] = turns
    return out


# --- the reasoner's reply protocol -------------------------------------------------------------------------------

@dataclass
class Reply:
    """A parsed reasoner reply. ``kind``: ``solved``, ``ask`` or ``malformed`` (with ``reason``).

    ``ambiguous`` names the rule that settled a reply which could be read two ways (``both_decisions``,
    ``several_answers``, ``no_keyword``; see :func:`parse_reply`), None for a clear reply.
    """

    kind: str
    answer: str | None = None
    question: str | None = None
    reason: str | None = None
    ambiguous: str | None = None


_SOLVED_KW, _ASK_KW = r"solved", r"need[\s_-]+more[\s_-]+info(?:rmation)?"
_KEYWORD = re.compile(rf"\b(?:(?P<solved>{_SOLVED_KW})|(?P<ask>{_ASK_KW}))\b", re.I)
_OPTIONS = re.compile(rf"(?:{_SOLVED_KW}|{_ASK_KW})[\s*_\"'`]*(?:or|/)[\s*_\"'`]*(?:{_SOLVED_KW}|{_ASK_KW})", re.I)
_LINE_LEAD = re.compile(r"[\s#>*_`•-]*(?:\d+[.)]\s*)?(?:\w+(?:\s+\w+){0,2}\s*:[\s*_]*)?")  # "**Decision:** "
_SENTENCE_LEAD = re.compile(r"[.!?][\s*_\"']*$")
_NEGATED = re.compile(r"(?:\b(?:no|not|never|without|nor|neither|instead\s+of|rather\s+than)|n['’]t)"
                      r"\W+(?:\w+\W+){0,2}$", re.I)                          # at most two words before the keyword
_CONDITIONAL = re.compile(r"\b(?:if|unless|whether|in\s+case)\b", re.I)
_LIST_MARK = re.compile(r"^(?:[-*+>•]|#+|\d+[.)]|\(\d+\))\s*")
_Q_LABEL = re.compile(r"^(?:(?:my|clarifying|clarification|follow-up)\s+)?(?:question|q)\s*\d*\s*[:.)-]\s*", re.I)


def _decisions(body: str) -> list[re.Match]:
    """The protocol keywords of ``body`` that are decisions, in order (see :func:`parse_reply`)."""
    text = _OPTIONS.sub(lambda m: " " * len(m.group()), body)
    out = []
    for m in _KEYWORD.finditer(text):
        line = text[text.rfind("\n", 0, m.start()) + 1:m.start()]
        sentence = re.split(r"[.!?]\s", line)[-1]
        clause = re.split(r"[,;:]", sentence)[-1]
        leads = m.group().isupper() or _LINE_LEAD.fullmatch(line) or _SENTENCE_LEAD.search(line)
        questioned = text[m.end():].lstrip(" *_\"'`").startswith("?")
        conditional = _CONDITIONAL.search(clause) or _CONDITIONAL.match(sentence.lstrip(" *_\"'`"))
        if leads and not questioned and not conditional and not _NEGATED.search(clause):
            out.append(m)
    return out


def _clean_question(line: str) -> str:
    line = line.replace("**", "").replace("__", "").lstrip(" \t:.-–—`")
    line = _Q_LABEL.sub("", _LIST_MARK.sub("", line))
    return line.strip().strip("\"'“”`").strip()


def _first_question(text: str) -> str | None:
    """The first sentence ending in "?" (list markers and "Question:" labels removed), else the first line."""
    lines = [ln for ln in map(_clean_question, text.splitlines()) if ln]
    for ln in lines:
        if "?" in ln:
            return _clean_question(re.split(r"(?<=[.!])\s+", ln[:ln.index("?") + 1])[-1])
    return lines[0] if lines else None


def _answer(text: str) -> str | None:
    """:func:`extract_answer`, read twice for "Final Answer: The final answer is $32$." (Minerva / Llama evals)."""
    ans = extract_answer(text)
    return (extract_answer(ans) or ans).strip() if ans else None


def _read(body: str, d: re.Match, end: int) -> Reply:
    """What decision ``d`` says, from the text after it up to ``end`` (the next decision of the other kind)."""
    section = body[d.end():end]
    if d.lastgroup == "ask":
        question = _first_question(section)
        return Reply("ask", question=question) if question else Reply("malformed", reason="ask_without_question")
    last = _answer(section)
    answer = _answer(re.split(r"\n\s*\n", section.strip(), maxsplit=1)[0]) or last or _answer(body[:d.start()])
    if not answer:
        return Reply("malformed", reason="no_answer")
    return Reply("solved", answer=answer, ambiguous="several_answers" if last and last != answer else None)


def parse_reply(text: str) -> Reply:
    """Classify a reasoner reply: SOLVED with a final answer, NEED MORE INFO with one question, or malformed.

    How a reply is read (docs/serving.md, "How replies are read"):

    1. Only the final section counts: ``<think>`` blocks, everything up to a dangling ``</think>`` (the template
       opened the block in the prompt) and an unclosed ``<think>`` onwards are removed.
    2. A protocol keyword (SOLVED, NEED MORE INFO / INFORMATION, any spacing, ``_`` or ``-``) is a *decision* when
       it is written in capitals or opens a line or sentence (after markdown, a list marker or a short label such
       as ``Decision:``), and is not a mention: not negated ("I don't NEED MORE INFO", "not SOLVED", "rather
       than"), not conditional ("if you need more info", "whether"), not followed by "?", and not one of the
       two options named together ("SOLVED or NEED MORE INFO"). Lowercase prose ("can be solved by") is no
       decision.
    3. The first decision that carries its content wins. SOLVED: the answer in the keyword's paragraph
       (``\\boxed{}`` first, then "Final answer: X"), else the last one after the keyword, else the last one
       before it. NEED MORE INFO: the first sentence ending in "?" after the keyword (list markers and
       "Question:" labels removed), else the first line after it; only one question is asked.
    4. Without any decision, a ``\\boxed{}`` answer is read as SOLVED; otherwise the reply is malformed
       (``empty``, ``only_thinking``, ``no_decision``; a decision without content: ``no_answer``,
       ``ask_without_question``).

    Replies that could be read two ways are settled by these rules and flagged in ``ambiguous``:
    ``both_decisions`` (both kinds of decision, or a question next to a boxed answer), ``several_answers``
    (different answers after SOLVED), ``no_keyword`` (a boxed answer without SOLVED).
    """
    if not isinstance(text, str) or not text.strip():
        return Reply("malformed", reason="empty")
    body = strip_think(text).strip()
    if not body:
        return Reply("malformed", reason="only_thinking")
    found = _decisions(body)
    if not found:
        boxed = extract_boxed(body)
        if boxed:
            return Reply("solved", answer=boxed, ambiguous="no_keyword")
        return Reply("malformed", reason="no_decision")
    # each decision reads up to the next decision of the other kind; the first one with content wins
    ends = [next((o.start() for o in found if o.start() > d.start() and o.lastgroup != d.lastgroup), len(body))
            for d in found]
    replies = [_read(body, d, end) for d, end in zip(found, ends)]
    reply = next((r for r in replies if r.kind != "malformed"), replies[0])
    if len({d.lastgroup for d in found}) > 1 or (reply.kind == "ask" and extract_boxed(body) is not None):
        reply.ambiguous = "both_decisions"
    return reply


# --- reward ------------------------------------------------------------------------------------------------------

TIERS = ("direct_correct", "clarified_correct", "wrong", "failed")


def tier_reward(tier: str, alpha: float = 0.7) -> float:
    """The tiered reward: 1.0 correct without clarification, ``alpha`` correct after one, 0 wrong.

    ``alpha=0`` is the binary-reward ablation. ``failed`` (a service error) has no reward (NaN): it is excluded
    from its advantage group, never scored as 0.
    """
    return {"direct_correct": 1.0, "clarified_correct": alpha, "wrong": 0.0, "failed": float("nan")}[tier]


def turn_reward(turns: int, alpha: float = 0.7, table: Sequence[float] | None = None) -> float:
    """Reward of a correct answer after ``turns`` clarifications: ``table[turns]`` when a table is given
    (``train.turn_rewards``), else ``alpha ** turns`` (1, α, α², ...; with one turn the paper's tiers, and
    ``alpha=0`` stays binary: only a self-sufficient caption is paid)."""
    if table:
        if turns >= len(table):
            raise ValueError(f"turn_rewards has {len(table)} entries, no reward for {turns} clarifications")
        return float(table[turns])
    return 1.0 if turns == 0 else alpha ** turns


SCHEDULES = ("constant", "linear", "cosine", "step")


def scheduled_alpha(schedule: str, start: float, end: float, step: int, steps: int, at: float = 0.5) -> float:
    """α of training step ``step`` (0-based) of ``steps``: ``constant`` (``start``), ``linear`` or ``cosine``
    from ``start`` at the first step to ``end`` at the last, or ``step`` (``start`` before the fraction ``at`` of
    the run, ``end`` from then on)."""
    if schedule == "constant":
        return start
    t = step / max(steps - 1, 1)
    if schedule == "linear":
        return start + (end - start) * t
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "step":
        return start if step < at * steps else end
    raise ValueError(f"alpha schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


# --- backends seen by the episode --------------------------------------------------------------------------------

class Reasoner(Protocol):
    """A frozen text-only reasoner: a batch of prompts in, one reply per prompt out.

    A reply that could not be obtained (service error after retries) is returned as an ``Exception`` instance in
    its slot; the episode is then marked ``failed``.
    """

    def complete(self, prompts: list[str]) -> list[str | Exception]: ...


class Clarifier(Protocol):
    """The frozen reference captioner π_ref answering clarification questions from the image."""

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str | Exception]: ...


@dataclass
class EpisodeConfig:
    """How episodes run.

    Attributes:
        alpha: reward for a correct answer after one clarification (0.7 in the paper; 0 = binary ablation); after
            k clarifications ``alpha ** k``.
        clarification: ``on`` (may ask), ``off`` (single pass, must answer) or ``deny`` (asks are refused).
        record_deny: in ``on`` mode, also ask the reasoner to answer without the clarification it requested
            (for Acc_deny); does not change the reward.
        max_clarifications: questions the reasoner may ask in turn (1: the paper); π_ref answers each.
        turn_rewards: reward of a correct answer after 0, 1, 2, ... clarifications (instead of ``alpha ** k``).
    """

    alpha: float = 0.7
    clarification: str = "on"
    record_deny: bool = False
    max_clarifications: int = 1
    turn_rewards: list[float] | None = None

    def __post_init__(self) -> None:
        if self.clarification not in ("on", "off", "deny"):
            raise ValueError(f"clarification must be on, off or deny, got {self.clarification!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.max_clarifications < 1:
            raise ValueError(f"max_clarifications must be >= 1, got {self.max_clarifications}")
        if self.turn_rewards and len(self.turn_rewards) < self.max_clarifications + 1:
            raise ValueError(f"turn_rewards needs {self.max_clarifications + 1} entries (0..max_clarifications "
                             f"clarifications), got {len(self.turn_rewards)}")

    def reward(self, turns: int) -> float:
        """Reward of a correct answer after ``turns`` clarifications (:func:`turn_reward`)."""
        return turn_reward(turns, self.alpha, self.turn_rewards)


@dataclass
class Episode:
    """One caption and everything the environment did with it (the full transcript)."""

    problem_id: str
    group: int
    sample: int
    caption: str
    decision: str = ""                 # solved | ask | malformed | failed (of the first reasoner turn)
    question: str | None = None        # the reasoner's clarification question q1
    clarification: str | None = None   # the reference's answer c1
    turns: int = 0                     # clarifications answered before the final answer
    questions: list[str] = field(default_factory=list)        # every question asked, in turn (multi-turn)
    clarifications: list[str] = field(default_factory=list)   # the reference's answer to each
    prediction: str | None = None      # the reasoner's final answer
    correct: bool = False
    tier: str = "wrong"
    reward: float = 0.0
    malformed: str | None = None       # why a reply was malformed (counted, scored wrong)
    error: str | None = None           # service error (tier failed)
    deny_prediction: str | None = None
    deny_correct: bool | None = None
    replies: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _fail(ep: Episode, err: Exception, alpha: float) -> None:
    ep.decision = ep.decision or "failed"
    ep.error = f"{type(err).__name__}: {err}"
    ep.tier, ep.correct = "failed", False
    ep.reward = tier_reward("failed", alpha)


def run_episodes(
    problems: Sequence[Problem],
    captions: Sequence[Sequence[str]],
    reasoner: Reasoner,
    clarifier: Clarifier | None,
    cfg: EpisodeConfig,
) -> list[list[Episode]]:
    """Run one episode per caption; ``captions[g]`` are the samples for ``problems[g]``. Returns groups."""
    if len(problems) != len(captions):
        raise ValueError(f"{len(problems)} problems but {len(captions)} caption groups")
    groups = [[Episode(p.id, g, i, c) for i, c in enumerate(cs)] for g, (p, cs) in enumerate(zip(problems, captions))]
    flat = [ep for grp in groups for ep in grp]
    question = [p.question_with_choices() for p in problems]
    may_ask = cfg.clarification != "off"
    build = decision_prompt if may_ask else single_pass_prompt
    replies = reasoner.complete([build(question[ep.group], ep.caption) for ep in flat])
    _check_len(replies, flat, "reasoner")

    asked: list[Episode] = []
    for ep, rep in zip(flat, replies):
        if isinstance(rep, Exception):
            _fail(ep, rep, cfg.alpha)
            continue
        ep.replies.append(rep)
        r = parse_reply(rep)
        ep.decision = r.kind
        if r.kind == "malformed":
            ep.malformed = r.reason
        elif r.kind == "ask" and may_ask:
            ep.question = r.question
            ep.questions.append(r.question)
            asked.append(ep)
        elif r.kind == "ask":                                   # asked although it had to answer
            ep.malformed = "ask_in_single_pass"
        else:
            _score(ep, r.answer, problems[ep.group], cfg, turns=0)

    if asked and cfg.clarification == "on":
        if clarifier is None:
            raise ValueError("clarification='on' needs a clarifier (the reference captioner)")
        pending = list(asked)
        for turn in range(1, cfg.max_clarifications + 1):   # π_ref answers, the reasoner answers or asks again
            pending = _clarify(pending, problems, clarifier, cfg.alpha)
            may_ask = turn < cfg.max_clarifications
            finals = reasoner.complete([followup_prompt(question[ep.group], ep.caption,
                                                        list(zip(ep.questions, ep.clarifications)), may_ask)
                                        for ep in pending])
            _check_len(finals, pending, "reasoner")
            again = []
            for ep, rep in zip(pending, finals):
                r = None if isinstance(rep, Exception) else parse_reply(rep)
                if may_ask and r is not None and r.kind == "ask":
                    ep.replies.append(rep)
                    ep.questions.append(r.question)
                    again.append(ep)
                else:
                    _finish(ep, rep, problems[ep.group], cfg, turns=turn)
            pending = again
            if not pending:
                break

    if asked and (cfg.clarification == "deny" or cfg.record_deny):
        live = [ep for ep in asked if ep.tier != "failed" or cfg.clarification == "deny"]
        denies = reasoner.complete([deny_prompt(question[ep.group], ep.caption, ep.question) for ep in live])
        _check_len(denies, live, "reasoner")
        for ep, rep in zip(live, denies):
            if cfg.clarification == "deny":
                _finish(ep, rep, problems[ep.group], cfg, turns=0, deny=True)
            elif not isinstance(rep, Exception):
                r = parse_reply(rep)
                ep.deny_prediction = r.answer
                ep.deny_correct = r.kind == "solved" and grade(r.answer, problems[ep.group])
    return groups


def _check_len(out: Sequence, inp: Sequence, who: str) -> None:
    if len(out) != len(inp):
        raise RuntimeError(f"{who} returned {len(out)} replies for {len(inp)} prompts")


def _clarify(pending: list[Episode], problems: Sequence[Problem], clarifier: Clarifier, alpha: float) -> list[Episode]:
    """π_ref answers the newest question of every pending episode; returns those that got an answer.

    π_ref is frozen: each distinct (problem, question) of the batch is asked once and the answer shared."""
    keys = [(ep.group, ep.questions[-1]) for ep in pending]
    unique = list(dict.fromkeys(keys))
    got = clarifier.answer([problems[g].image for g, _ in unique], [q for _, q in unique])
    _check_len(got, unique, "clarifier")
    answer_of = dict(zip(unique, got))
    out = []
    for ep, key in zip(pending, keys):
        a = answer_of[key]
        if isinstance(a, Exception):
            _fail(ep, a, alpha)
            continue
        if ep.clarification is None:
            ep.clarification = a
        ep.clarifications.append(a)
        out.append(ep)
    return out


def _score(ep: Episode, answer: str | None, problem: Problem, cfg: EpisodeConfig, turns: int) -> None:
    """The reward of an answer after ``turns`` clarifications: the one place where rewards are assigned."""
    ep.prediction = answer
    ep.turns = turns
    ep.correct = bool(grade(answer, problem))
    ep.tier = ("direct_correct" if turns == 0 else "clarified_correct") if ep.correct else "wrong"
    ep.reward = cfg.reward(turns) if ep.correct else 0.0


def _finish(ep: Episode, rep, problem: Problem, cfg: EpisodeConfig, turns: int, deny: bool = False) -> None:
    if isinstance(rep, Exception):
        _fail(ep, rep, cfg.alpha)
        return
    ep.replies.append(rep)
    r = parse_reply(rep)
    if r.kind != "solved":
        ep.malformed = f"{'deny' if deny else 'final'}_{r.reason or 'ask_again'}"
        ep.tier, ep.reward, ep.correct, ep.turns = "wrong", 0.0, False, turns
        return
    _score(ep, r.answer, problem, cfg, turns=turns)
    if deny:
        ep.deny_prediction, ep.deny_correct = ep.prediction, ep.correct


# --- metrics -----------------------------------------------------------------------------------------------------

def episode_metrics(groups: Sequence[Sequence[Episode]]) -> dict[str, float]:
    """Counts and rates over a set of episodes (failed episodes are counted and excluded from the rates)."""
    flat = [ep for g in groups for ep in g]
    live = [ep for ep in flat if ep.tier != "failed"]
    n = max(len(live), 1)
    asked = [ep for ep in live if ep.decision == "ask"]
    denied = [ep for ep in asked if ep.deny_correct is not None]
    return {
        "episodes": len(flat),
        "failed": len(flat) - len(live),
        "malformed": sum(ep.malformed is not None for ep in live),
        "ambiguous": sum(parse_reply(r).ambiguous is not None for ep in live for r in ep.replies),
        "reward": sum(ep.reward for ep in live) / n,
        "accuracy": sum(ep.correct for ep in live) / n,
        "direct_correct": sum(ep.tier == "direct_correct" for ep in live) / n,
        "clarification_rate": len(asked) / n,
        "clarified_accuracy": sum(ep.correct for ep in asked) / max(len(asked), 1),
        "acc_deny": (sum(bool(ep.deny_correct) for ep in denied) / len(denied)) if denied else float("nan"),
        "caption_words": sum(len(ep.caption.split()) for ep in live) / n,
        "mean_turns": sum(ep.turns for ep in live) / n,
    }
