"""The reasoner's reply protocol: SOLVED with \\boxed{answer}, or NEED MORE INFO with one question."""

from __future__ import annotations

import re
from dataclasses import dataclass

from acrl.rollout.grading import extract_answer, extract_boxed, strip_think


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
