"""The world reasoner (:mod:`acrl.world.reasoner`): how it reads a caption (contradictions, a reading budget), and
its LLM-like noise (reasoner.noise): its rate, its two kinds of slip, its determinism."""

import pytest

from acrl.rollout.prompts import decision_prompt, single_pass_prompt
from acrl.world import WorldConfig, make_problems, oracle_caption_for
from acrl.world.reasoner import WorldReasoner

PROBLEMS = make_problems("test", 600, WorldConfig(mc_rate=0.0))   # free-form: a misread always changes the answer


def _prompts(build):
    return [build(p.question_with_choices(), oracle_caption_for(p)) for p in PROBLEMS]


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.3])
def test_noisy_reasoner_changes_answers_at_its_rate(noise):
    prompts = _prompts(single_pass_prompt)
    clean = WorldReasoner().complete(prompts)
    noisy = WorldReasoner(noise=noise, seed=1)
    got = noisy.complete(prompts)
    changed = sum(a != b for a, b in zip(clean, got)) / len(prompts)
    assert noisy.slips / len(prompts) == pytest.approx(changed)        # every slip changed the reply
    assert changed == pytest.approx(noise, abs=0.04)                  # 600 draws: 3 sigma at noise 0.3
    assert all(g.startswith("SOLVED") for g in got)                   # it must answer: only misreads


def test_noisy_reasoner_also_asks_needlessly_when_it_may_ask():
    prompts = _prompts(decision_prompt)                               # captions state every fact
    clean = WorldReasoner().complete(prompts)
    got = WorldReasoner(noise=0.4, seed=0).complete(prompts)
    assert all(c.startswith("SOLVED") for c in clean)
    asks = sum(g.startswith("NEED MORE INFO") for g in got) / len(got)
    misreads = sum(g.startswith("SOLVED") and g != c for g, c in zip(got, clean)) / len(got)
    assert asks == pytest.approx(0.2, abs=0.05) and misreads == pytest.approx(0.2, abs=0.05)


def test_a_slip_depends_only_on_seed_and_prompt():
    prompts = _prompts(single_pass_prompt)[:100]
    a = WorldReasoner(noise=0.5, seed=3).complete(prompts)
    assert a == WorldReasoner(noise=0.5, seed=3).complete(list(reversed(prompts)))[::-1]
    assert a != WorldReasoner(noise=0.5, seed=4).complete(prompts)


def test_bad_noise_is_named():
    with pytest.raises(ValueError, match="noise must be in"):
        WorldReasoner(noise=1.5)


def test_reasoner_is_confused_by_contradictions_and_reads_within_budget():
    r = WorldReasoner(read_budget=3)
    known, conflicts = r.read("the red bar is 4 ; the red bar is 7 ; the blue bar is 2", 3)
    assert conflicts == {"bar.red"} and known == {"bar.blue": 2}
    known, _ = r.read("a bar chart ; the red bar is 4 ; the red bar is 4 ; the blue bar is 2", 3)
    assert known == {"bar.red": 4}        # the fourth statement is past the budget
