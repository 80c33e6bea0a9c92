"""What every reasoner and captioner reads: the prompts of the protocol, worked few-shot demonstrations, and the
parser that recovers a prompt's sections."""

from __future__ import annotations

import re
from collections.abc import Sequence

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
