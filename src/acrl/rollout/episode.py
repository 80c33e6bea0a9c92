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

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from acrl.core.reward import tier_reward, turn_reward
from acrl.problem import Problem
from acrl.rollout.answers import grade_problem as grade
from acrl.rollout.prompts import decision_prompt, deny_prompt, followup_prompt, single_pass_prompt
from acrl.rollout.protocols import Clarifier, Reasoner
from acrl.rollout.replies import parse_reply


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
