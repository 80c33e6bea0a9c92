"""The embedded world (:mod:`acrl.world`): problems drawn deterministically by split and seed, every family and fact
count, answerable from an oracle caption, a missing fact asked for and answered, human captions at their fact
rate."""

import random

import pytest

from acrl.rollout.episode import EpisodeConfig, run_episodes
from acrl.world import (
    FAMILIES,
    WorldConfig,
    clarification_pairs,
    human_caption_for,
    language,
    make_problem,
    make_problems,
    oracle_caption_for,
)
from acrl.world.reasoner import OracleClarifier, WorldReasoner


def test_deterministic_by_seed():
    a, b = make_problem("train", 17), make_problem("train", 17)
    assert a.question == b.question and a.answer == b.answer and a.facts == b.facts
    assert a.image.tobytes() == b.image.tobytes()
    c = make_problem("train", 17, WorldConfig(seed=1))
    assert (c.facts, c.question, c.image.tobytes()) != (a.facts, a.question, a.image.tobytes())


def test_splits_are_disjoint():
    train = make_problems("train", 200)
    test = make_problems("test", 200)
    assert not {p.id for p in train} & {p.id for p in test}
    same_pixels = {p.image.tobytes() for p in train} & {p.image.tobytes() for p in test}
    assert len(same_pixels) <= 2          # identical pictures only by coincidence of a tiny scene


def test_every_family_and_fact_count_appears():
    ps = make_problems("train", 400)
    assert {p.family for p in ps} == set(FAMILIES)
    assert {len(p.needed) for p in ps} == {1, 2, 3}
    assert any(p.answer_type == "multiple_choice" for p in ps)
    for p in ps:
        assert p.image.size == (64, 64)
        assert set(p.needed) <= set(p.facts)
        if p.answer_type == "multiple_choice":
            assert p.answer in "ABCD" and len(p.choices) == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_captions_solve_every_question(family):
    cfg = WorldConfig(families=[family])
    ps = make_problems("test", 150, cfg)
    groups = run_episodes(ps, [[oracle_caption_for(p)] for p in ps], WorldReasoner(), None,
                          EpisodeConfig(clarification="off"))
    assert all(g[0].correct for g in groups), [(g[0].caption, g[0].replies) for g in groups if not g[0].correct]


def test_missing_fact_triggers_clarification_and_oracle_answer_fixes_it():
    ps = [p for p in make_problems("test", 300) if len(p.needed) == 1][:40]
    base = [language.oracle_caption(p.family, {k: v for k, v in p.facts.items() if k not in p.needed},
                                    p.meta["scene"]) for p in ps]
    groups = run_episodes(ps, [[c] for c in base], WorldReasoner(), OracleClarifier(ps), EpisodeConfig())
    for p, (ep,) in zip(ps, groups):
        assert ep.decision == "ask"
        assert language.parse_clarification_question(ep.question) == p.needed[0]
        assert ep.tier == "clarified_correct" and ep.reward == pytest.approx(0.7)


def test_human_captions_mention_quantities_at_the_fact_rate():
    ps = make_problems("train", 300)
    rng = random.Random(0)
    stated = total = 0
    for p in ps:
        cap = human_caption_for(p, rng, 0.3)
        facts = dict(language.parse_facts(cap))
        assert all(p.facts[k] == v for k, v in facts.items())
        stated += len(facts)
        total += len(p.facts)
    assert 0.25 < stated / total < 0.35


def test_clarification_pairs_round_trip():
    p = make_problem("train", 3)
    for q, a in clarification_pairs(p):
        key = language.parse_clarification_question(q)
        assert dict(language.parse_facts(a)) == {key: p.facts[key]}


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="families"):
        WorldConfig(families=["pie"])
    with pytest.raises(ValueError, match="split"):
        make_problem("dev", 0)
