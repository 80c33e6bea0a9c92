"""The episode runner (:mod:`acrl.rollout.episode`): every tier and its reward, the binary ablation, single-pass and
denial modes, several clarification turns, π_ref asked once per distinct question."""

import math

import pytest

from acrl.problem import Problem
from acrl.rollout.episode import EpisodeConfig, run_episodes
from acrl.rollout.metrics import episode_metrics
from acrl.rollout.prompts import parse_prompt


def _problem(i=0, answer="7"):
    return Problem(id=f"p{i}", image=None, question="what is the height of the red bar ?", answer=answer)


class ScriptedReasoner:
    """Replies by caption: 'solve:X' -> SOLVED X; 'ask' -> NEED MORE INFO; 'junk' -> malformed; 'boom' -> error."""

    def __init__(self):
        self.prompts = []

    def complete(self, prompts):
        self.prompts.append(list(prompts))
        out = []
        for p in prompts:
            sec = parse_prompt(p)
            cap = sec["caption"]
            if sec["mode"] == "final":
                out.append(f"SOLVED \\boxed{{{sec['clarification'].split()[-1]}}}")
            elif cap.startswith("solve:"):
                out.append(f"<think>easy</think>SOLVED \\boxed{{{cap.split(':')[1]}}}")
            elif cap == "ask" and sec["mode"] == "decide":
                out.append("need more info\n  What is the height of the red bar?")
            elif cap == "ask":
                out.append("SOLVED \\boxed{5}")          # forced to answer: a guess
            elif cap == "boom":
                out.append(RuntimeError("HTTP 500 from reasoner"))
            else:
                out.append("I am not sure what to do.")
        return out


class RecordingClarifier:
    def __init__(self, value="7"):
        self.calls, self.value = [], value

    def answer(self, images, questions):
        self.calls.append(list(questions))
        return [f"the red bar is {self.value}" for _ in questions]


def test_every_tier_and_reward():
    ps = [_problem(0), _problem(1)]
    caps = [["solve:7", "solve:3", "ask", "junk"], ["ask", "boom", "solve:7", "ask"]]
    clar = RecordingClarifier()
    groups = run_episodes(ps, caps, ScriptedReasoner(), clar, EpisodeConfig(alpha=0.7))
    tiers = [[e.tier for e in g] for g in groups]
    assert tiers == [["direct_correct", "wrong", "clarified_correct", "wrong"],
                     ["clarified_correct", "failed", "direct_correct", "clarified_correct"]]
    rewards = [e.reward for e in groups[0]]
    assert rewards == [1.0, 0.0, 0.7, 0.0]
    assert math.isnan(groups[1][1].reward) and "HTTP 500" in groups[1][1].error
    assert groups[0][3].malformed == "no_decision"
    # only the clarified subset went to the reference, in one batch, each distinct (problem, question) once
    assert clar.calls == [["What is the height of the red bar?"] * 2]
    ep = groups[0][2]
    assert ep.question and ep.clarification == "the red bar is 7" and len(ep.replies) == 2
    m = episode_metrics(groups)
    assert m["failed"] == 1 and m["malformed"] == 1
    assert m["clarification_rate"] == pytest.approx(3 / 7)


def test_binary_ablation_gives_zero_for_clarified_answers():
    groups = run_episodes([_problem()], [["ask", "solve:7"]], ScriptedReasoner(), RecordingClarifier(),
                          EpisodeConfig(alpha=0.0))
    assert [e.reward for e in groups[0]] == [0.0, 1.0]
    assert groups[0][0].tier == "clarified_correct"


def test_single_pass_mode_never_clarifies():
    r, clar = ScriptedReasoner(), RecordingClarifier()
    groups = run_episodes([_problem()], [["ask", "solve:7"]], r, clar, EpisodeConfig(clarification="off"))
    assert clar.calls == []
    assert all("NEED MORE INFO" not in p for p in r.prompts[0])
    assert groups[0][0].prediction == "5" and groups[0][0].tier == "wrong"
    assert groups[0][1].tier == "direct_correct"


def test_deny_mode_and_record_deny():
    r = ScriptedReasoner()
    g = run_episodes([_problem(answer="5")], [["ask"]], r, RecordingClarifier(), EpisodeConfig(record_deny=True))
    assert g[0][0].tier == "wrong" and g[0][0].deny_correct is True     # clarified 7 is wrong; the guess 5 is right
    clar = RecordingClarifier()
    g = run_episodes([_problem(answer="5")], [["ask"]], ScriptedReasoner(), clar, EpisodeConfig(clarification="deny"))
    assert clar.calls == [] and g[0][0].deny_correct is True


def test_an_unknown_mode_and_a_short_turn_reward_table_are_refused():
    with pytest.raises(ValueError):
        EpisodeConfig(clarification="maybe")
    with pytest.raises(ValueError, match="turn_rewards needs 3"):
        EpisodeConfig(max_clarifications=2, turn_rewards=[1, 0.5])


def test_clarification_on_needs_a_clarifier():
    with pytest.raises(ValueError, match="clarifier"):
        run_episodes([_problem()], [["ask"]], ScriptedReasoner(), None, EpisodeConfig())


# --- multi-turn clarification and its rewards ------------------------------------------------------------------

def _bars_problem(i=0):
    return Problem(id=f"b{i}", image=None, question="what is the sum of the red and green and blue bars ?",
                   answer="12")


class CountingReasoner:
    """Asks until it has heard ``need`` answers (the caption says how many: 'need:N'), then answers 12."""

    def __init__(self):
        self.prompts = []

    def complete(self, prompts):
        self.prompts.append(list(prompts))
        out = []
        for p in prompts:
            sec = parse_prompt(p)
            need, heard = int(sec["caption"].split(":")[1]), len(sec["turns"])
            if heard >= need:
                out.append("SOLVED \\boxed{12}")
            elif sec["mode"] == "decide":
                out.append(f"NEED MORE INFO\nWhat is fact {heard + 1}?")
            else:
                out.append("SOLVED \\boxed{0}")    # forced to answer without what it needs: wrong
        return out


class EchoClarifier:
    def __init__(self):
        self.calls = []

    def answer(self, images, questions):
        self.calls.append(list(questions))
        return [f"answer to {q}" for q in questions]


@pytest.mark.parametrize("k,table,rewards,turns", [
    # K=1 (the paper): one question is answered, a second one is refused -> wrong
    (1, None, [1.0, 0.7, 0.0, 0.0], [0, 1, 1, 1]),
    (2, None, [1.0, 0.7, 0.7 ** 2, 0.0], [0, 1, 2, 2]),
    (3, None, [1.0, 0.7, 0.7 ** 2, 0.7 ** 3], [0, 1, 2, 3]),
    (3, [1.0, 0.6, 0.5, 0.1], [1.0, 0.6, 0.5, 0.1], [0, 1, 2, 3]),
    (2, [1.0, 0.9, 0.2], [1.0, 0.9, 0.2, 0.0], [0, 1, 2, 2]),
])
def test_multi_turn_reward_table(k, table, rewards, turns):
    caps = [["need:0", "need:1", "need:2", "need:3"]]
    r, clar = CountingReasoner(), EchoClarifier()
    groups = run_episodes([_bars_problem()], caps, r, clar,
                          EpisodeConfig(alpha=0.7, max_clarifications=k, turn_rewards=table))
    eps = groups[0]
    assert [e.reward for e in eps] == pytest.approx(rewards)
    assert [e.turns for e in eps] == turns
    # the tiers keep their meaning: direct, clarified (any number of turns), wrong
    assert [e.tier for e in eps] == ["direct_correct"] + ["clarified_correct" if x else "wrong" for x in rewards[1:]]
    # every question is answered in its turn, one batch per turn; the episode keeps all of them
    # (π_ref is frozen: the same question about the same problem is answered once per turn)
    assert len(clar.calls) == min(k, 3) and clar.calls[0] == ["What is fact 1?"]
    assert eps[3].questions == [f"What is fact {i + 1}?" for i in range(min(k, 3))]
    assert eps[3].clarifications[0] == "answer to What is fact 1?" == eps[3].clarification
    if k == 1:   # must answer after its one question: a guess
        assert eps[2].prediction == "0" and eps[2].malformed is None


def test_binary_stays_binary_over_several_turns():
    groups = run_episodes([_bars_problem()], [["need:0", "need:1", "need:2"]], CountingReasoner(), EchoClarifier(),
                          EpisodeConfig(alpha=0.0, max_clarifications=3))
    assert [e.reward for e in groups[0]] == [1.0, 0.0, 0.0]
    assert [e.correct for e in groups[0]] == [True, True, True]
