"""The reasoner's warm start: the working it writes, transcripts that say what the world reasoner says, the
held-out checks, the CLI."""

import json
import random

import pytest
from conftest import run_cli

from acrl.backends.tiny import world_reasoner_tokenizer
from acrl.rollout.replies import parse_reply
from acrl.train.reasoner_warmstart import (
    ReasonerWarmStartConfig,
    evaluate_reasoner,
    training_prompt,
    transcript,
    working,
)
from acrl.world import WorldConfig, make_problems
from acrl.world.reasoner import WorldReasoner


@pytest.mark.parametrize("op,values,expect", [
    ("first", [4], []),
    ("sum", [7, 3, 5], ["7", "+", "3", "=", "10", ";", "10", "+", "5", "=", "15"]),
    ("diff", [2, 6], ["2", "-", "6", "=", "-", "4"]),
    ("perimeter", [3, 4], ["3", "+", "4", "=", "7", ";", "7", "*", "2", "=", "14"]),
    ("half_product", [3, 5], ["3", "*", "5", "=", "15", ";", "15", "/", "2", "=", "7.5"]),
])
def test_working_is_the_arithmetic_step_by_step(op, values, expect):
    assert working(op, values) == expect


def test_transcripts_say_what_the_world_reasoner_says():
    """Rendered and parsed, every supervision target has the world reasoner's decision, question and answer."""
    world, rng, tok = WorldReasoner(6), random.Random(1), world_reasoner_tokenizer()
    kinds = set()
    for p in make_problems("train", 300):
        prompt = training_prompt(p, rng, ReasonerWarmStartConfig(), world)
        ours = parse_reply(tok.render(tok.reply_ids(transcript(prompt, world))))
        theirs = parse_reply(world.reply(prompt))
        assert (ours.kind, ours.answer, ours.question) == (theirs.kind, theirs.answer, theirs.question), prompt
        kinds.add(ours.kind)
    assert kinds == {"solved", "ask"}


def test_working_restates_the_facts_it_uses():
    assert working("sum", [7, 3], ["bar.red", "count.blue"]) == [
        "red", "bar", "=", "7", ";", "blue", "shapes", "=", "3", ";", "7", "+", "3", "=", "10"]
    assert working("first", [4], ["rect.width"]) == ["rectangle", "wide", "=", "4"]


def test_the_checks_score_the_teacher_perfectly():
    """The held-out checks measure the protocol: the world reasoner itself passes every one."""
    s = evaluate_reasoner(WorldReasoner(6), WorldConfig(), n=60)
    for k in ("oracle_accuracy", "missing_ask_rate", "missing_question_answerable", "clarified_accuracy",
              "single_pass_accuracy", "well_formed", "agreement"):
        assert s[k] == 1.0, (k, s)


def test_cli_warmstart_reasoner_smoke(tmp_path):
    out = tmp_path / "reasoner"
    p = run_cli("warmstart", "--reasoner", "--out", out, "--steps", 3, "--set", "reasoner_warmstart.batch_size=8",
                "--set", "reasoner_warmstart.eval_n=6", "--set", "reasoner_model.d_model=32", "--set",
                "reasoner_model.n_layers=1", "--set", "train.threads=1")
    assert "warm-started reasoner written to" in p.stdout
    log = [json.loads(x) for x in open(out / "warmstart_log.jsonl")]
    assert log[0]["model"]["d_model"] == 32 and log[-1]["step"] == 3 and 0 <= log[-1]["well_formed"] <= 1
    assert {"config.json", "vocab.json", "model.pt"} <= {f.name for f in out.iterdir()}
    bad = run_cli("warmstart", "--reasoner", "--out", out, "--set", "reasoner_warmstart.oracle_rate=2", check=False)
    assert bad.returncode == 2 and "reasoner_warmstart.oracle_rate" in bad.stderr
