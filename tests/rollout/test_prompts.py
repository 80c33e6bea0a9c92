"""The reasoner's prompts (:mod:`acrl.rollout.prompts`): every prompt read back by ``parse_prompt``, follow-up turns,
and the few-shot demonstrations of the protocol that help small LLM reasoners."""

import pytest

from acrl.backends.openai_api import OpenAIReasoner
from acrl.rollout.prompts import (
    decision_prompt,
    deny_prompt,
    few_shot_messages,
    final_prompt,
    followup_prompt,
    parse_prompt,
    prompt_kind,
    single_pass_prompt,
)
from acrl.rollout.replies import parse_reply
from acrl.world import make_problems

Q, C = "what is the sum of the red and blue bars ?", "a bar chart with three bars ; the red bar is 4"
PROMPTS = {"decision": decision_prompt(Q, C), "single_pass": single_pass_prompt(Q, C),
           "final": followup_prompt(Q, C, [("how tall is the blue bar ?", "the blue bar is 2")]),
           "followup": followup_prompt(Q, C, [("how tall is the blue bar ?", "the blue bar is 2")], may_ask=True),
           "deny": deny_prompt(Q, C, "how tall is the blue bar ?")}


@pytest.mark.parametrize("kind", list(PROMPTS))
def test_demonstrations_use_the_prompts_own_template_and_follow_the_protocol(kind):
    prompt = PROMPTS[kind]
    assert prompt_kind(prompt) == kind
    msgs = few_shot_messages(prompt, 3)
    assert msgs and [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
    for user, reply in zip(msgs[::2], msgs[1::2]):
        assert prompt_kind(user["content"]) == kind          # the same turn, so the format to continue is shown
        r = parse_reply(reply["content"])
        assert r.kind in (("solved", "ask") if kind == "decision" else ("solved",)) and r.ambiguous is None
    kinds = {parse_reply(m["content"]).kind for m in msgs[1::2]}
    assert kinds == ({"solved", "ask"} if kind == "decision" else {"solved"})   # a decision shows both choices
    assert few_shot_messages(prompt, 0) == [] and len(few_shot_messages(prompt, 1)) == 2


def test_demonstrations_never_quote_the_world():
    """The examples come from no split: none of their questions is a world question."""
    world = {p.question for s in ("train", "val", "test") for p in make_problems(s, 200)}
    shown = {m["content"].split("Question: ")[1].split("\n")[0] for m in few_shot_messages(PROMPTS["decision"], 3)
             if m["role"] == "user"}
    assert shown and not shown & world


def test_openai_reasoner_sends_demonstrations_before_the_prompt():
    r = OpenAIReasoner("http://127.0.0.1:9/v1", "m", few_shot=2, system="be brief")
    msgs = r._messages(PROMPTS["decision"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[-1]["content"] == PROMPTS["decision"]
    assert OpenAIReasoner("http://127.0.0.1:9/v1", "m")._messages("x") == [{"role": "user", "content": "x"}]


def test_prompts_round_trip_through_parse_prompt():
    q, c = "what is the sum of the red and blue bars ?", "a bar chart ; the red bar is 3"
    d = parse_prompt(decision_prompt(q, c))
    assert (d["question"], d["caption"], d["mode"]) == (q, c, "decide")
    assert parse_prompt(single_pass_prompt(q, c))["mode"] == "answer"
    f = parse_prompt(final_prompt(q, c, "what is the height of the blue bar ?", "the blue bar is 4"))
    assert (f["mode"], f["asked"], f["clarification"], f["caption"]) == (
        "final", "what is the height of the blue bar ?", "the blue bar is 4", c)


def test_followup_prompt_with_one_turn_is_the_final_prompt():
    assert followup_prompt("q?", "cap", [("a?", "b.")]) == final_prompt("q?", "cap", "a?", "b.")
    two = followup_prompt("q?", "cap", [("a?", "b."), ("c?", "d.")], may_ask=True)
    sec = parse_prompt(two)
    assert sec["mode"] == "decide" and sec["turns"] == [("a?", "b."), ("c?", "d.")]
    assert sec["caption"] == "cap" and sec["asked"] == "a?" and sec["clarification"] == "b.\nd."
    last = parse_prompt(followup_prompt("q?", "cap", [("a?", "b."), ("c?", "d.")]))
    assert last["mode"] == "final" and "NEED MORE INFO" not in followup_prompt("q?", "cap", [("a?", "b.")] * 2)
    assert parse_prompt(final_prompt("q?", "cap", "a?", "b."))["turns"] == [("a?", "b.")]
