"""Answer extraction and grading for reasoner outputs.

The reasoner is asked to put its final answer in ``\\boxed{...}``. This module pulls that answer out of a
free-text completion (:func:`extract_boxed`, :func:`extract_answer`) and decides whether it matches a gold
answer (:func:`grade_answer`, :func:`grade`), according to the problem's ``answer_type``:

``integer`` / ``float``
    Numbers are parsed by a small, forgiving parser (thousands separators, ``%``, trailing units, ``x = 7``,
    ``\\frac{a}{b}``, unicode minus, scientific notation); anything it cannot read is evaluated through
    math-verify (``2\\sqrt{2}``, ``\\pi/4``, ...). With a tolerance the absolute difference must not exceed
    it; otherwise integers must be exactly equal (``7.0 == 7``) and floats equal to a relative 1e-6.
``multiple_choice``
    The gold is an option letter or an option text. A prediction is accepted as a letter (``B``, ``(B)``,
    ``B)``, ``Option B``, ``B: text``, ...), as the gold option's text, or as a number / expression equal to
    the gold option.
``free_form``
    Normalised string equality, then symbolic equivalence through math-verify (fractions vs decimals, radicals,
    ``x = 3`` vs ``3``, intervals, sets, ...). Plain words are only compared as strings.

Grading never raises: malformed input simply grades as ``False``.

math-verify's own timeouts rely on ``signal.alarm`` and therefore only work in the main thread; they are
switched off here (``parsing_timeout=None`` / ``timeout_seconds=None``) so that grading can run in worker
threads. In exchange, inputs that could make SymPy run for a very long time (very long strings, huge or
nested numeric exponents, factorials of large numbers) are kept away from math-verify.
"""

from __future__ import annotations

import logging
import math
import re
from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from acrl.problem import Problem

__all__ = ["extract_answer", "extract_boxed", "final_answer", "grade", "grade_answer", "parse_number", "strip_think"]

# Longest answer string handed to math-verify; final answers are short, anything longer is noise.
MAX_SYMBOLIC_CHARS = 600
# Largest numeric exponent / factorial argument allowed before an expression is considered too costly.
_MAX_EXPONENT = 10_000
_MAX_FACTORIAL = 1_000
_FLOAT_REL_TOL = 1e-6


# --------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------

_BOX_CMD_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_THINK_BLOCK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_THINK_OPEN_RE = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE_RE = re.compile(r"</think>", re.IGNORECASE)
_ANSWER_PHRASE_RE = re.compile(
    r"(?:\bfinal\s+answer|\banswer)(?:\s+is\b\s*:?|\s*[:=])[ \t]*(?P<ans>[^\n]*)",
    re.IGNORECASE,
)
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")
_ANSWER_TAG_RE = re.compile(r"<answer>(?P<ans>.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
# "**Final Answer**" / "### Final answer" on a line of its own, the answer on the next line (R1-style)
_ANSWER_HEADING_RE = re.compile(r"(?im)^[#*\s]*final\s+answer[*:\s]*$\n+\s*(?P<ans>[^\n]+)")


def strip_think(text: str) -> str:
    """Remove reasoning blocks: every ``<think>...</think>``, a dangling ``...</think>`` prefix (the opening
    tag was part of the prompt), and an unclosed ``<think>`` together with everything after it."""
    text = _THINK_BLOCK_RE.sub(" ", text)
    closes = list(_THINK_CLOSE_RE.finditer(text))
    if closes:
        text = text[closes[-1].end():]
    opened = _THINK_OPEN_RE.search(text)
    if opened:
        text = text[: opened.start()]
    return text


def _match_brace(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos`` (escaped ``\\{``/``\\}`` are skipped), or None."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Nested braces are matched properly; a box nested inside another box belongs to the outer one, and a box
    whose only content is another box is unwrapped. ``\\boxed 5`` (a single token after a space) is accepted
    too. A box whose braces never close (a truncated completion) is ignored. Returns None when no box exists.
    """
    if not text:
        return None
    found: str | None = None
    pos = 0
    while True:
        m = _BOX_CMD_RE.search(text, pos)
        if m is None:
            break
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            close = _match_brace(text, i)
            if close is None:
                pos = m.end()
                continue
            found = text[i + 1:close]
            pos = close + 1
        elif i > m.end():
            tok = re.match(r"[^\s$]+", text[i:])
            if tok is None:
                pos = i
                continue
            found = tok.group(0).rstrip(".,;")
            pos = i + tok.end()
        else:
            pos = m.end()
    if found is None:
        return None
    found = found.strip()
    while True:
        inner = re.fullmatch(r"\\(?:boxed|fbox)\s*\{(.*)\}", found, re.DOTALL)
        if inner is None or _match_brace(found, found.index("{")) != len(found) - 1:
            break
        found = inner.group(1).strip()
    return found


def _clean_answer_span(ans: str) -> str:
    ans = ans.strip()
    m = _SENTENCE_END_RE.search(ans)
    if m:
        ans = ans[: m.start()]
    ans = ans.replace("**", "").strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]"), ("$$", "$$"), ("$", "$")):
        if ans.startswith(left) and ans.endswith(right) and len(ans) >= len(left) + len(right):
            ans = ans[len(left): len(ans) - len(right)].strip()
            break
    return ans.strip().rstrip(".,;").strip()


def extract_answer(text: str | None) -> str | None:
    """The final answer in a reasoner completion.

    Reasoning blocks are removed first (see :func:`strip_think`). Then the last ``\\boxed{...}`` wins; without a
    box, the last ``<answer>...</answer>`` tag, then the last "Final answer: X" / "The answer is X" /
    "Answer: X" phrase (up to the end of its line or sentence; surrounding ``$``, ``**`` and a trailing period
    are removed), then a "**Final Answer**" heading followed by the answer on the next line. Returns None when
    none is present (see :func:`final_answer` for the fallbacks used in grading).
    """
    if not text:
        return None
    body = strip_think(text)
    boxed = extract_boxed(body)
    if boxed is not None:
        return boxed
    tags = [m.group("ans").strip() for m in _ANSWER_TAG_RE.finditer(body)]
    if tags and tags[-1]:
        return _clean_answer_span(extract_answer(tags[-1]) or tags[-1]) or None
    for m in reversed(list(_ANSWER_PHRASE_RE.finditer(body))):
        ans = _clean_answer_span(m.group("ans"))
        if ans:
            boxed = extract_boxed(ans)
            return boxed if boxed is not None else ans
    heads = list(_ANSWER_HEADING_RE.finditer(body))
    if heads:
        ans = _clean_answer_span(heads[-1].group("ans"))
        if ans:
            return ans
    return None


# The last sentence's conclusion: "So the length of AB is 5 cm." -> "5 cm"; "Thus x = 3." -> "3".
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\\$*(])|\n+")
_CONCLUSION_MARK_RE = re.compile(
    r"(?:\bis\b|\bare\b|\bequal\s+to\b|\bequals?\b|\bbe\b|\bgives\b|\bget\b|\bhave\b|=|≈|\\approx|:"
    r"|\bapproximately\b|\babout\b)", re.IGNORECASE)
_OPTION_MENTION_RE = re.compile(r"\b(?:option|choice)\s*[:\s]?\s*\(?([A-Z])\)?(?![A-Za-z])|\(([A-Z])\)(?![A-Za-z])")
_KEYWORD_RE = re.compile(r"^\W*(?:solved|answer)\b\W*", re.IGNORECASE)
_MATHY_RE = re.compile(r"\d|\\frac|\\sqrt|\\pi|π|√")


def _unmath(s: str) -> str:
    return re.sub(r"\\[()\[\]]", " ", s).replace("**", "").replace("$", " ").strip()


def _pick_number(span: str, question_numbers: set[str]) -> str | None:
    """``span`` itself, or the one number in it that the question does not already state ("12 bars are taller
    than 10" -> "12"); None when every number in it comes from the question."""
    nums = _NUMBER_TOKEN_RE.findall(span)
    if not nums:
        return span
    keep = [n for n in nums if n.replace(",", "") not in question_numbers]
    if not keep:
        return None
    if len(nums) > 1 and len(keep) == 1 and not re.search(r"[\\^/*+=<>×÷]", span):
        return keep[0]
    return span


def _conclusion(body: str, question: str = "") -> str | None:
    """The answer a reply states in its last sentence without a box or an answer phrase: an option mention
    ("option B", "(B)") when there is one, else what follows the last "is" / "=" / "equals" ... (the last such
    mark followed by a number that the question does not already state, when there is one), else the
    sentence itself (its one new number, if it has one)."""
    qnums = {n.replace(",", "") for n in _NUMBER_TOKEN_RE.findall(question or "")}
    body = re.sub(r"\b(i\.e|e\.g|resp|approx|vs)\.", r"\1", body, flags=re.IGNORECASE)
    sentences = [x.strip() for x in _SENTENCE_SPLIT_RE.split(body) if x and x.strip(" \t*#>-")]
    if not sentences:
        return None
    last = _KEYWORD_RE.sub("", sentences[-1]).strip()
    if not last:
        return None
    mention = _OPTION_MENTION_RE.findall(last)
    if mention:
        a, b = mention[-1]
        return f"option {a or b}"
    prose = re.sub(r"\\[A-Za-z]+|\\text\s*\{[^{}]*\}", " ", last)
    if not re.search(r"[A-Za-z]{3,}", prose):
        return _clean_answer_span(_unmath(last)) or None      # an answer written as bare maths: keep it whole
    if re.search(r"=[^=]*(?:,|;|\band\b)[^=]*=", last):
        return _clean_answer_span(_unmath(last)) or None      # "x = 3, y = 4": several values, no one answer
    marks = list(_CONCLUSION_MARK_RE.finditer(last))
    spans = [_clean_answer_span(_unmath(last[m.end():])) for m in reversed(marks)]
    spans = [sp for sp in spans if sp]
    for sp in spans:
        if _MATHY_RE.search(sp):
            picked = _pick_number(sp, qnums)
            if picked is not None:
                return picked
    whole = _clean_answer_span(_unmath(last))
    if _MATHY_RE.search(whole):
        picked = _pick_number(whole, qnums)
        if picked is not None and picked != whole:
            return picked
    if spans:
        return spans[0]
    return whole or None


def final_answer(text: str | None, question: str = "") -> str | None:
    """The answer to grade in a reply: :func:`extract_answer` (box, ``<answer>`` tag, "the answer is",
    "Final Answer" heading), else the conclusion of the reply's last sentence (see :func:`_conclusion`;
    ``question`` tells it which numbers are only restated from the question)."""
    if not text:
        return None
    found = extract_answer(text)
    if found is not None:
        return found
    body = strip_think(text).strip()
    return _conclusion(body, question) if body else None


# --------------------------------------------------------------------------------------------------------------
# Normalisation and number parsing
# --------------------------------------------------------------------------------------------------------------

_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mathit|operatorname|mbox|textnormal)\s*\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_UNICODE_MAP = {
    "\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": "\\times ", "\u00b7": "\\cdot ", "\u2264": "\\le ",
    "\u2265": "\\ge ", "\u2260": "\\neq ", "\u221e": "\\infty ", "\u03c0": "\\pi ", "\u00a0": " ",
    "\u2009": " ", "\u202f": " ",
}
_UNICODE_TRANS = str.maketrans(_UNICODE_MAP)


def _unwrap_text(s: str) -> str:
    prev = None
    while prev != s:
        prev = s
        s = _TEXT_WRAP_RE.sub(r"\1", s)
    return s


def _basic_clean(s: str) -> str:
    """Unicode and LaTeX-markup clean-up shared by every comparison (keeps the mathematical content)."""
    s = s.translate(_UNICODE_TRANS)
    s = re.sub(r"\u221a\s*(\d+(?:\.\d+)?|[A-Za-z])", r"\\sqrt{\1}", s)
    s = s.replace("\u221a", "\\sqrt")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "%")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("{,}", ",")
    s = _SPACING_RE.sub(" ", s)
    s = s.replace("**", "")
    s = s.strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left): len(s) - len(right)].strip()
    return s


def _norm_text(s: str) -> str:
    """Loose textual form: markup removed, lower case, single spaces, no trailing period or quotes."""
    s = _unwrap_text(_basic_clean(s))
    s = re.sub(r"\s+", " ", s).strip().lower()
    s = s.strip("\"'`")
    s = s.rstrip(".").strip()
    return s


_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?"
_NUMBER_RE = re.compile(
    r"^(?P<neg>[+-]?)\s*(?:"
    r"\\frac\s*\{\s*(?P<fn>\d+(?:\.\d+)?)\s*\}\s*\{\s*(?P<fd>\d+(?:\.\d+)?)\s*\}"
    r"|\\frac\s*(?P<sn>\d)\s*(?P<sd>\d)"
    rf"|(?P<num>{_NUM})(?:\s*/\s*(?P<den>{_NUM}))?"
    r"(?:\s*(?:\\times|\\cdot|\*|x)\s*10\s*\^\s*\{?\s*(?P<exp>[+-]?\d+)\s*\}?)?"
    r")\s*(?P<pct>%|percent\b)?(?P<rest>.*)$",
    re.DOTALL,
)
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|\u00b0")
_UNIT_POWER_RE = re.compile(r"\^\s*\{?\s*[23]\s*\}?|[\u00b2\u00b3]")
_UNIT_TAIL_RE = re.compile(r"^[A-Za-z\u00b5\u03a9\s/.\-']*$")
_NOT_UNITS = {
    "pi", "i", "j", "e", "x", "y", "z", "n", "k", "sqrt", "or", "and", "to", "times", "plus", "minus", "over",
    "divided", "multiplied", "squared", "cubed", "root", "of", "pm", "mp", "infty", "inf", "infinity",
}


def _strip_outer(s: str) -> str:
    """Remove one pair of enclosing ``()``/``{}``/``[]`` that wraps the whole string."""
    while len(s) >= 2 and (s[0], s[-1]) in {("(", ")"), ("{", "}"), ("[", "]")}:
        depth = 0
        for i, c in enumerate(s):
            depth += c in "({["
            depth -= c in ")}]"
            if depth == 0 and i < len(s) - 1:
                return s
        if "," in s[1:-1]:
            return s
        s = s[1:-1].strip()
    return s


def _to_fraction(tok: str) -> Fraction:
    return Fraction(tok.replace(",", ""))


def parse_number(text: str | None) -> tuple[Fraction, bool] | None:
    """Read a plain number from an answer string; returns ``(value, had_percent_sign)`` or None.

    Understands ``1,000``, ``7.50``, ``-3`` / ``−3``, ``.5``, ``1e-3``, ``1.5 \\times 10^{3}``, ``15/2``,
    ``\\frac{15}{2}`` / ``\\dfrac``, ``\\frac12``, ``3%`` / ``3\\%``, ``30^\\circ``, a leading ``x =`` and trailing
    unit words (``7 cm``, ``7 units``, ``5 m^2``). Anything else (``2\\sqrt{2}``, ``3 or 4``, ``2\\pi``) gives None.
    """
    if text is None:
        return None
    s = _unwrap_text(_basic_clean(str(text)))
    if not s or len(s) > 300:
        return None
    s = _DEGREE_RE.sub(" ", s)
    s = s.replace("\\approx", "=").replace("\u2248", "=").replace("\\simeq", "=")
    if "=" in s and not re.search(r",(?!\d{3}(?!\d))|;", s):
        s = s.split("=")[-1]
    s = _strip_outer(s.strip().rstrip(".").strip())
    m = _NUMBER_RE.match(s)
    if m is None:
        return None
    rest = m.group("rest").strip().rstrip(".").strip()
    if rest:
        tail = _UNIT_POWER_RE.sub("", rest)
        if not _UNIT_TAIL_RE.match(tail):
            return None
        words = tail.lower().split()
        if not words or words[0] in _NOT_UNITS or tail.lower().strip() in _NOT_UNITS:
            return None
    sign = -1 if m.group("neg") == "-" else 1
    if m.group("fn") is not None:
        den = _to_fraction(m.group("fd"))
        if den == 0:
            return None
        value = _to_fraction(m.group("fn")) / den
    elif m.group("sn") is not None:
        den = Fraction(int(m.group("sd")))
        if den == 0:
            return None
        value = Fraction(int(m.group("sn"))) / den
    else:
        value = _to_fraction(m.group("num"))
        if m.group("den") is not None:
            den = _to_fraction(m.group("den"))
            if den == 0:
                return None
            value /= den
        if m.group("exp") is not None:
            exp = int(m.group("exp"))
            if abs(exp) > 400:
                return None
            value *= Fraction(10) ** exp
    return sign * value, m.group("pct") is not None


# --------------------------------------------------------------------------------------------------------------
# math-verify glue
# --------------------------------------------------------------------------------------------------------------


class _DropTimeoutNotice(logging.Filter):
    """math-verify warns once that its timeouts are off; that is intentional here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutNotice())

_MV: dict[str, Any] = {}


def _mv() -> dict[str, Any]:
    """Lazily import math-verify (its first import compiles large regexes)."""
    if not _MV:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        _MV.update(
            parse=parse,
            verify=verify,
            config=(LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()),
        )
    return _MV


def _prepare_symbolic(s: str) -> str:
    """Make plain-text maths digestible for the LaTeX parser (``pi``, ``sqrt(2)``, ``inf``, ``1e3``)."""
    s = _basic_clean(s)
    s = re.sub(r"(?<![\\A-Za-z])pi(?![A-Za-z])", r"\\pi ", s)
    s = re.sub(r"(?<![\\A-Za-z])sqrt\s*\(([^()]*)\)", r"\\sqrt{\1}", s)
    s = re.sub(r"(?<![\\A-Za-z])sqrt(?![A-Za-z])", r"\\sqrt", s)
    s = re.sub(r"(?<![\\A-Za-z])(?:infinity|inf)(?![A-Za-z])", r"\\infty ", s)
    s = re.sub(r"(\d(?:\.\d+)?)[eE]([+-]?\d+)(?![A-Za-z\d])", r"\1\\times 10^{\2}", s)
    return s.strip().rstrip(".").strip()


def _is_safe_expr(expr: Any) -> bool:
    """False for SymPy expressions whose evaluation could take very long (huge / nested numeric powers,
    factorials of large numbers)."""
    import sympy

    try:
        if isinstance(expr, sympy.MatrixBase):
            return all(_is_safe_expr(e) for e in expr)
        if not isinstance(expr, sympy.Basic):
            return True
        for node in sympy.preorder_traversal(expr):
            if isinstance(node, sympy.Pow):
                exp = node.exp
                if exp.is_number:
                    if exp.has(sympy.Pow, sympy.factorial, sympy.gamma, sympy.exp):
                        return False
                    val = complex(sympy.N(exp, 15))
                    if abs(val) > _MAX_EXPONENT:
                        return False
                elif any(abs(a) > _MAX_EXPONENT for a in exp.atoms(sympy.Number)):
                    return False
            elif isinstance(node, (sympy.factorial, sympy.factorial2, sympy.gamma, sympy.binomial)):
                for arg in node.args:
                    if not arg.is_number or arg.has(sympy.Pow, sympy.factorial):
                        return False
                    if abs(complex(sympy.N(arg, 15))) > _MAX_FACTORIAL:
                        return False
        return True
    except Exception:  # noqa: BLE001 - anything odd is treated as unsafe
        return False


def _mv_parse(s: str) -> list[Any]:
    """math-verify parse of a bare answer string (wrapped in ``\\boxed{}``), or [] if unsafe / unparsable."""
    if not s or len(s) > MAX_SYMBOLIC_CHARS:
        return []
    mv = _mv()
    body = _prepare_symbolic(s)
    if not body:
        return []
    wrapped = body if _BOX_CMD_RE.search(body) else "\\boxed{" + body + "}"
    parsed = mv["parse"](wrapped, extraction_config=mv["config"], parsing_timeout=None)
    if not all(_is_safe_expr(p) for p in parsed):
        return []
    return list(parsed)


def _mv_equal(pred: str, gold: str) -> bool:
    gold_p = _mv_parse(gold)
    if not gold_p:
        return False
    pred_p = _mv_parse(pred)
    if not pred_p:
        return False
    return bool(_mv()["verify"](gold_p, pred_p, timeout_seconds=None))


def _symbolic_number(s: str) -> complex | None:
    """Numeric value of an answer that math-verify can parse into a closed-form number (``2\\sqrt{2}``)."""
    import sympy

    for expr in _mv_parse(s):
        if not isinstance(expr, sympy.Basic):
            continue
        if isinstance(expr, sympy.Eq):
            expr = expr.rhs
        if getattr(expr, "is_number", False):
            val = complex(sympy.N(expr, 30))
            if math.isfinite(val.real) and math.isfinite(val.imag):
                return val
    return None


# --------------------------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------------------------

_WORDS_RE = re.compile(r"^[a-z][a-z'\- ]*[a-z]$")
_MATH_WORDS = {"pi", "inf", "infty", "infinity", "oo", "sqrt"}


def _is_textual(norm: str) -> bool:
    """True for plain words ("yes", "east", "no solution") that math-verify would read as symbol products."""
    if not _WORDS_RE.match(norm) or re.search(r"[a-z]{2}", norm) is None:
        return False
    return not any(w in _MATH_WORDS for w in re.split(r"[\s\-]+", norm))


def _free_form_equal(pred: str, gold: str) -> bool:
    np_, ng = _norm_text(pred), _norm_text(gold)
    if not np_ or not ng:
        return False
    if np_ == ng:
        return True
    if _is_textual(np_) or _is_textual(ng):
        return False
    if _mv_equal(pred, gold):
        return True
    # a gold with units or a label ("Area $=9 \\pi \\mathrm{cm}^{2}$", "60^\\circ"): compare the numbers
    bare_gold = _strip_units(gold)
    if bare_gold != gold.replace("$", "").strip() and _values(bare_gold) is not None:
        return bool(_numeric_equal(pred, bare_gold, "float", None))
    return False


Number = Fraction | float | complex


_UNIT_WORDS = (
    r"cm|mm|km|dm|m|in|inch(?:es)?|ft|feet|foot|yd|yards?|mi|miles?|units?|sq\.?|square|cubic|cu|"
    r"meters?|metres?|centimet(?:er|re)s?|millimet(?:er|re)s?|kilomet(?:er|re)s?|N|kN|newtons?|kg|g|mg|grams?|"
    r"kilograms?|lbs?|pounds?|oz|s|sec|seconds?|mins?|minutes?|h|hrs?|hours?|days?|weeks?|months?|years?|"
    r"degrees?|deg|rad|radians?|m/s|km/h|mph|L|mL|ml|liters?|litres?|J|kJ|joules?|W|kW|watts?|V|volts?|Pa|kPa|"
    r"Ω|ohms?|dollars?|cents?|yuan|people|persons?|students?|times|pieces?|percent"
)
_UNIT_TAIL_STRIP_RE = re.compile(
    r"(?:\s*(?:\\(?:mathrm|text|mbox|operatorname)\s*\{\s*)?(?:" + _UNIT_WORDS + r")(?:\s*\})?"
    r"(?:\s*\^\s*\{?\s*[23]\s*\}?|[²³])?(?:\s*\})?\s*\.?)+$")
_DEGREE_TAIL_RE = re.compile(r"(?:\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°)\s*$")
_NUMBER_TOKEN_RE = re.compile(r"(?<![\w.])[+-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w.])|(?<![\w.])\.\d+")


def _strip_units(s: str) -> str:
    """``Area = 9\\pi \\mathrm{cm}^{2}`` -> ``9\\pi``; ``12 N`` -> ``12``; ``120°`` -> ``120``; ``102, option B``
    -> ``102``. Units are only removed after a number, a brace, a parenthesis or pi."""
    s = s.replace("$", "").strip().rstrip(".").strip()
    s = _OPTION_MENTION_RE.sub("", s).strip().rstrip(",;").strip()
    if "=" in s and not re.search(r",(?!\d{3}(?!\d))|;", s):
        s = s.split("=")[-1].strip()
    for _ in range(3):
        before = s
        s = _DEGREE_TAIL_RE.sub("", s).strip()
        m = _UNIT_TAIL_STRIP_RE.search(s)
        if m and m.start() > 0 and re.search(r"(?:\d|\}|\)|\\pi|π)\s*$", s[: m.start()]):
            s = s[: m.start()].strip()
        if s == before:
            break
    return s


def _values(s: str) -> list[Number] | None:
    parsed = parse_number(s)
    if parsed is not None:
        value, pct = parsed
        return [value, value / 100] if pct else [value]
    val = _symbolic_number(s)
    if val is None:
        return None
    if abs(val.imag) > 1e-12 * max(1.0, abs(val.real)):
        return [val]
    return [val.real]


def _number_candidates(s: str) -> list[Number] | None:
    """Values an answer may denote: the number itself and, for ``x%``, also ``x/100``. Tried in order, the
    first readable form wins: the answer as written, without its units / option mention / ``label =``, and the
    only number it contains (``the length of 5 cm`` -> 5; none when it contains several)."""
    vals = _values(s)
    if vals is not None:
        return vals
    bare = _strip_units(s)
    if bare and bare != s:
        vals = _values(bare)
        if vals is not None:
            return vals
    plain = _unwrap_text(_basic_clean(s))
    numbers = _NUMBER_TOKEN_RE.findall(plain)
    rest = _NUMBER_TOKEN_RE.sub(" ", plain)
    if len(numbers) == 1 and not re.search(r"[\\^/*+=<>×÷]|\d|(?<![A-Za-z])[a-zA-Z](?![A-Za-z])|\bor\b|\band\b"
                                            r"|\bnot\b|\bno\b", rest):
        return _values(numbers[0])      # "the length of 5 cm", "about 12 people" (words only around it)
    return None


def _close(p: Number, g: Number, answer_type: str, tolerance: float | None) -> bool:
    if isinstance(p, complex) or isinstance(g, complex):
        return abs(complex(p) - complex(g)) <= (tolerance or 0.0) + 1e-9 * max(1.0, abs(complex(g)))
    if tolerance is not None:
        diff = abs(Fraction(p) - Fraction(g))
        return diff <= Fraction(tolerance) + Fraction(1, 10**9) * max(1, abs(Fraction(g)))
    if answer_type == "integer":
        if isinstance(p, Fraction) and isinstance(g, Fraction):
            return p == g
        return math.isclose(float(p), float(g), rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(p, Fraction) and isinstance(g, Fraction) and p == g:
        return True
    return math.isclose(float(p), float(g), rel_tol=_FLOAT_REL_TOL, abs_tol=1e-9)


def _numeric_equal(pred: str, gold: str, answer_type: str, tolerance: float | None) -> bool | None:
    """Numeric comparison; None when either side is not a number."""
    pv = _number_candidates(pred)
    if pv is None:
        return None
    gv = _number_candidates(gold)
    if gv is None:
        return None
    return any(_close(p, g, answer_type, tolerance) for p in pv for g in gv)


_LETTER_PREFIX = r"(?:(?i:option|choice|answer)\s*:?\s*)?"
_EXACT_LETTER_RE = re.compile(rf"^{_LETTER_PREFIX}[(\[]?([A-Za-z])[)\]]?[.:]?$")
_LEADING_LETTER_RE = re.compile(
    rf"^{_LETTER_PREFIX}(?:[(\[]([A-Za-z])[)\]]\s*|([A-Z])[).:]\s+|([A-Z])[):：](?=[^\s:])|([a-z])\)\s+)\S")


def _mc_clean(s: str) -> str:
    s = _unwrap_text(_basic_clean(s))
    s = s.replace("*", "").replace("`", "")
    return re.sub(r"\s+", " ", s).strip().strip("\"'").strip()


def _letter_index(letter: str, n: int | None) -> int | None:
    idx = ord(letter.upper()) - 65
    if n is not None and not 0 <= idx < n:
        return None
    return idx


def _exact_letter(pred: str) -> str | None:
    m = _EXACT_LETTER_RE.match(pred)
    if m is None:
        return None
    return m.group(1).upper()


def _leading_letter(pred: str) -> str | None:
    m = _LEADING_LETTER_RE.match(pred)
    if m is None:
        return None
    return (m.group(1) or m.group(2) or m.group(3) or m.group(4)).upper()


def _gold_index(gold: str, choices: list[str]) -> int | None:
    g = _mc_clean(gold)
    letter = _exact_letter(g)
    if letter is not None:
        idx = _letter_index(letter, len(choices))
        if idx is not None:
            return idx
    ng = _norm_text(gold)
    for i, c in enumerate(choices):
        if _norm_text(str(c)) == ng:
            return i
    return None


def _grade_multiple_choice(pred: str, gold: str, choices: list[str] | None) -> bool:
    p = _mc_clean(pred)
    if not p:
        return False
    if not choices:
        gl, pl = _exact_letter(_mc_clean(gold)), _exact_letter(p) or _leading_letter(p)
        if gl is not None and pl is not None:
            return gl == pl
        return _free_form_equal(pred, gold)
    choices = [str(c) for c in choices]
    gold_idx = _gold_index(gold, choices)
    if gold_idx is None:
        return _free_form_equal(pred, gold)
    n = len(choices)

    letter = _exact_letter(p)
    if letter is not None:
        idx = _letter_index(letter, n)
        if idx is not None:
            return idx == gold_idx

    npred = _norm_text(p)
    text_hits = [i for i, c in enumerate(choices) if _norm_text(c) == npred]
    if text_hits:
        return gold_idx in text_hits

    letter = _leading_letter(p)
    if letter is not None:
        idx = _letter_index(letter, n)
        if idx is not None:
            return idx == gold_idx

    mentions = {a or b for a, b in _OPTION_MENTION_RE.findall(p)}
    if len(mentions) == 1:                       # "... is 102, option B": the letter the reply names
        idx = _letter_index(mentions.pop(), n)
        if idx is not None:
            return idx == gold_idx

    gold_text = choices[gold_idx]
    numeric = _numeric_equal(p, gold_text, "float", None)
    if numeric is not None:
        return numeric
    if _is_textual(npred) or _is_textual(_norm_text(gold_text)):
        return False
    return _mv_equal(p, gold_text)


def _prediction_text(prediction: Any, question: str = "") -> str | None:
    if prediction is None:
        return None
    text = prediction if isinstance(prediction, str) else str(prediction)
    if not text.strip():
        return None
    extracted = final_answer(text, question)
    if extracted is not None:
        return extracted
    body = strip_think(text).strip()
    return body or None


def _grade(prediction: Any, gold: Any, answer_type: str, choices: list[str] | None,
           tolerance: float | None, question: str = "") -> bool:
    pred = _prediction_text(prediction, question)
    if pred is None or gold is None:
        return False
    gold_s = str(gold).strip()
    if not gold_s:
        return False
    if answer_type == "multiple_choice":
        return _grade_multiple_choice(pred, gold_s, choices)
    if answer_type in ("integer", "float"):
        numeric = _numeric_equal(pred, gold_s, answer_type, tolerance)
        if numeric is not None:
            return numeric
        return _free_form_equal(pred, gold_s)
    return _free_form_equal(pred, gold_s)


def grade_answer(
    prediction: str | None,
    gold: str,
    answer_type: str = "free_form",
    choices: list[str] | None = None,
    tolerance: float | None = None,
    question: str = "",
) -> bool:
    """Whether ``prediction`` matches ``gold``.

    ``prediction`` may be a bare answer or a whole completion: ``<think>`` blocks are dropped and the boxed /
    "answer is" answer is used when present (see :func:`extract_answer`). ``answer_type`` is one of
    ``integer``, ``float``, ``multiple_choice`` or ``free_form`` (unknown types grade as free form); ``choices``
    are the option texts for multiple choice and ``tolerance`` an absolute numeric tolerance; ``question`` (optional)
    lets a reply without a box or answer phrase be read from its last sentence without mistaking a number the
    question states for the answer. Never raises:
    empty, missing or malformed predictions, and any internal error, give ``False``.
    """
    try:
        tol = None if tolerance is None else abs(float(tolerance))
        if tol is not None and not math.isfinite(tol):
            tol = None
        return bool(_grade(prediction, gold, answer_type, choices, tol, question))
    except Exception:  # noqa: BLE001 - grading must never raise
        return False
    except BaseException as exc:  # math-verify's TimeoutException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        return False


def grade(prediction: str | None, problem: Problem) -> bool:
    """Grade ``prediction`` against a :class:`~acrl.problem.Problem` (its answer, type, choices, tolerance)."""
    return grade_answer(
        prediction,
        problem.answer,
        answer_type=problem.answer_type,
        choices=problem.choices,
        tolerance=problem.tolerance,
        question=problem.question,
    )
