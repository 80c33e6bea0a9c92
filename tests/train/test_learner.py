"""The learners (:mod:`acrl.train.learner`), co-training: the reasoner's rows, one step changes both models (and only
their trainable weights), a frozen reasoner is left alone, an HF LoRA reasoner in the loop. (The reasoner's reward is
tested in tests/core/test_reward.py; co-training through ``acrl train`` in tests/app/test_cli.py.)"""

import pytest
import torch

from acrl.app.assemble import build_learner, build_policy, world_source
from acrl.config import load_config
from acrl.rollout.episode import EpisodeConfig, run_episodes
from acrl.train.learner import reply_rows
from acrl.train.loop import Run, train
from acrl.world import make_problems, oracle_caption_for
from acrl.world.reasoner import OracleClarifier

STEP = ["train.steps=1", "train.problems_per_step=4", "train.samples_per_problem=4", "train.threads=1",
        "train.log_episodes=0", "reasoner.backend=tiny", "train.cotrain=true", "reasoner_train.lr=1e-3"]


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(module, before):
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


def test_every_reply_of_an_episode_becomes_a_row_with_its_sampling_logprobs():
    cfg = load_config(None, STEP)
    learner = build_learner(cfg)
    problems = make_problems("val", 3)
    captions = [[oracle_caption_for(p), oracle_caption_for(p).split(" ; ")[0], "a picture"] for p in problems]
    torch.manual_seed(0)
    groups = run_episodes(problems, captions, learner.recorder, OracleClarifier(problems), EpisodeConfig())
    batch, owners = reply_rows(groups, problems, learner.recorder.take(), max_clarifications=1)
    flat = [ep for g in groups for ep in g]
    assert len(owners) == sum(len(ep.replies) for ep in flat) > len(flat)      # decisions + post-clarification
    assert batch.texts == [r for ep in flat for r in ep.replies]
    assert torch.allclose(learner.reasoner.logprobs(batch), batch.logprobs, atol=1e-5)
    assert learner.recorder.batches == []
    with pytest.raises(RuntimeError, match="not sampled"):
        reply_rows(groups, problems, [], max_clarifications=1)


def test_a_cotraining_step_changes_both_models_and_only_their_trainable_weights(tmp_path):
    cfg = load_config(None, STEP)
    policy = build_policy(cfg)
    learner = build_learner(cfg)
    caption_before, cref_before = _snapshot(policy.model), _snapshot(policy.ref_model)
    reason_before, rref_before = _snapshot(learner.reasoner.model), _snapshot(learner.reasoner.ref_model)
    torch.manual_seed(0)
    hist = train(Run(cfg, str(tmp_path / "run"), policy, learner.recorder, policy, world_source(cfg),
                     colearner=learner), progress=False)
    assert len(_changed(policy.model, caption_before)) > len(caption_before) // 2
    assert len(_changed(learner.reasoner.model, reason_before)) > len(reason_before) // 2
    assert not _changed(policy.ref_model, cref_before)              # π_ref of the captioner stays frozen
    assert not _changed(learner.reasoner.ref_model, rref_before)    # the reasoner's KL anchor stays its start
    rec = hist[0]
    assert rec["reasoner_rows"] >= 16 and "reasoner_kl_mean" in rec and rec["reasoner_grad_norm"] > 0
    ckpt = tmp_path / "run" / "checkpoint"
    assert (ckpt / "reasoner" / "model.pt").exists() and (ckpt / "reasoner_state.pt").exists()


def test_the_frozen_reasoner_run_leaves_the_reasoner_alone(tmp_path):
    cfg = load_config(None, [s for s in STEP if not s.startswith("train.cotrain")])
    from acrl.app.assemble import build_reasoner

    reasoner = build_reasoner(cfg)
    before = _snapshot(reasoner.model)
    hist = train(Run(cfg, str(tmp_path / "run"), build_policy(cfg), reasoner, build_policy(cfg),
                     world_source(cfg)), progress=False)
    assert not _changed(reasoner.model, before) and not any(k.startswith("reasoner_") for k in hist[0])
    assert not (tmp_path / "run" / "checkpoint" / "reasoner").exists()


def test_the_reasoner_update_trains_only_the_hf_adapter_and_resumes(tmp_path, tiny_llm):
    cfg = load_config(None, [s for s in STEP if s != "reasoner.backend=tiny"] + [
        "reasoner.backend=hf", f"reasoner.model={tiny_llm}", "reasoner.max_tokens=6", "reasoner_train.lora.r=4"])
    learner = build_learner(cfg)
    model = learner.reasoner.model
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    problems = make_problems("val", 2)
    torch.manual_seed(0)
    groups = run_episodes(problems, [[oracle_caption_for(p)] * 4 for p in problems], learner.recorder,
                          OracleClarifier(problems), EpisodeConfig())
    for g in groups:            # a random LM is never right: give each group a spread of rewards
        g[0].correct = True
    rec = learner.update(groups, problems, step=0)
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in base.items())               # the base model is frozen
    assert all(not torch.equal(now[n], v) for n, v in adapter.items() if "lora_B" in n)
    assert rec["reasoner_rows"] == sum(len(ep.replies) for g in groups for ep in g) and rec["reasoner_grad_norm"] > 0
    learner.save(tmp_path)
    back = build_learner(cfg, str(tmp_path))
    back.load(str(tmp_path))   # the optimiser, as a resumed run's checkpoint loading does
    assert back.opt.state_dict()["state"] and all(
        torch.equal(p, now[n]) for n, p in back.reasoner.model.named_parameters())
