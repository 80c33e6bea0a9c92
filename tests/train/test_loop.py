"""The training loop (:mod:`acrl.train.loop`) with the research features: the scheduled α and the turns recorded at
every step; and the config rules that guard these features."""

import json

import pytest

from acrl.config import eval_view, load_config
from acrl.train.loop import Run, train


@pytest.mark.parametrize("override,message", [
    (["train.max_clarifications=2", "train.turn_rewards=[1, 0.5]"], "turn_rewards needs max_clarifications"),
    (["train.turn_rewards=[1, 0.5]", "train.alpha_schedule=linear"], "cannot be combined"),
    (["train.advantage=bnpo_decomposed", "train.max_clarifications=2"], "bnpo_decomposed"),
    (["train.alpha_schedule=exp"], "train.alpha_schedule='exp': must be one of"),
    (["train.alpha_end=1.5"], "train.alpha_end=1.5"),
    (["train.max_clarifications=0"], "train.max_clarifications=0"),
    (["train.turn_rewards=[1, 2]"], "train.turn_rewards"),
    (["reasoner.noise=-0.1"], "reasoner.noise"),
    (["warmstart.save_every=-1"], "warmstart.save_every"),
    (["eval.sets={x: {model: {d_model: 8}}}"], "eval.sets"),
    (["eval.sets={x: {world: {n_bars: 7}}}"], "eval.sets.x"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, override)


def test_eval_view_applies_a_sets_overrides():
    cfg = load_config(None, ["eval.sets={tri: {world: {families: [tri]}, reasoner: {read_budget: 2}}}"])
    view = eval_view(cfg, "tri")
    assert view.world.families == ["tri"] and view.reasoner.read_budget == 2
    assert cfg.world.families != ["tri"] and view.eval.sets == {}
    with pytest.raises(ValueError, match="'nope' is not in eval.sets"):
        eval_view(cfg, "nope")


def test_train_records_the_scheduled_alpha_and_turns(tmp_path):
    from acrl.app.assemble import world_source
    from acrl.backends.tiny import TinyCaptioner
    from acrl.config import TinyVLMConfig
    from acrl.world import make_problems
    from acrl.world.reasoner import OracleClarifier, WorldReasoner

    cfg = load_config(None, ["train.steps=3", "train.problems_per_step=2", "train.samples_per_problem=2",
                             "train.alpha=1", "train.alpha_schedule=linear", "train.alpha_end=0",
                             "train.max_clarifications=3", "train.threads=1", "train.checkpoint_every=3",
                             "captioner.max_new_tokens=6"])
    policy = TinyCaptioner.create(TinyVLMConfig(d_model=32, n_heads=2, n_layers=1, enc_layers=0, cnn_width=8))
    problems = make_problems("train", 6, cfg.world)
    hist = train(Run(cfg, str(tmp_path), policy, WorldReasoner(), OracleClarifier(problems), world_source(cfg)),
                     progress=False)
    assert [h["reward_alpha"] for h in hist] == pytest.approx([1.0, 0.5, 0.0])
    assert all(0 <= h["mean_turns"] <= 3 for h in hist)
    eps = [json.loads(x) for x in open(tmp_path / "episodes.jsonl")]
    asked = [e for e in eps if e["decision"] == "ask"]
    assert asked and all(1 <= len(e["questions"]) <= 3 for e in asked)
    # an untrained captioner names no fact: the world reasoner asks for each needed fact in turn
    assert max(e["turns"] for e in asked) >= 2
