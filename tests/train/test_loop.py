"""The training loop (:mod:`acrl.train.loop`) with the research features: the scheduled α and the turns recorded at
every step."""

import json

import pytest

from acrl.config import load_config
from acrl.train.loop import Run, train


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
