"""Co-training: the reasoner's reward and rows, one step changes both models (and only their trainable weights),
resume reproduces both, the CLI end to end, an HF LoRA reasoner in the loop."""

import json
import os

import pytest
import torch
from conftest import MICRO, run_cli

from acrl.app.assemble import build_learner, build_policy, world_source
from acrl.config import SHIPPED_REASONER, load_config
from acrl.core.reward import reasoner_rewards
from acrl.rollout.episode import Episode, EpisodeConfig, run_episodes
from acrl.train.learner import reply_rows
from acrl.train.loop import Run, train
from acrl.world import make_problems, oracle_caption_for
from acrl.world.reasoner import OracleClarifier

STEP = ["train.steps=1", "train.problems_per_step=4", "train.samples_per_problem=4", "train.threads=1",
        "train.log_episodes=0", "reasoner.backend=tiny", "train.cotrain=true", "reasoner_train.lr=1e-3"]


def _lines(path):
    return [json.loads(x) for x in open(path) if x.strip()]


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(module, before):
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


def test_reasoner_reward_is_correct_minus_the_cost_of_questions():
    eps = [Episode("p", 0, 0, "c", correct=True), Episode("p", 0, 1, "c", correct=True, questions=["q"]),
           Episode("p", 0, 2, "c", questions=["q"]), Episode("p", 0, 3, "c", tier="failed")]
    r, valid = reasoner_rewards([eps], 0.25)
    assert r.tolist() == [[1.0, 0.75, -0.25, 0.0]] and valid.tolist() == [[True, True, True, False]]


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


@pytest.mark.parametrize("override,message", [
    (["train.cotrain=true"], "reasoner.backend must be tiny or hf"),
    (["train.cotrain=true", "reasoner.backend=hf", "reasoner.model=x", "reasoner_train.lora.enabled=false"],
     "lora.enabled must be true"),
    (["reasoner_train.question_cost=-0.1"], "reasoner_train.question_cost"),
    (["reasoner_train.advantage=bnpo_decomposed"], "reasoner_train.advantage"),
    (["reasoner_train.temperature=0"], "reasoner_train.temperature"),
])
def test_bad_cotraining_configs_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override)


def test_cli_cotrain_resume_reproduces_both_models_then_eval(tmp_path):
    """The shipped captioner and reasoner (a micro budget of steps): both models learn, the resumed run is the
    uninterrupted one, and acrl eval reads the co-trained reasoner."""
    common = ("--config", MICRO, "--cotrain", "--quiet", "--set", "reasoner.backend=tiny", "--set",
              "train.checkpoint_every=1", "--set", "train.problems_per_step=4")
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli("train", *common, "--out", straight, "--steps", 3)
    run_cli("train", *common, "--out", split, "--steps", 2)
    run_cli("train", *common, "--out", split, "--steps", 3, "--resume")
    a, b = _lines(straight / "metrics.jsonl"), _lines(split / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for k in ("reward", "loss", "reasoner_reward", "reasoner_loss", "reasoner_kl_mean", "reasoner_rows"):
            assert abs(x[k] - y[k]) < 1e-6, (k, x, y)
    for part in ("policy", "reasoner"):
        sa = torch.load(straight / "checkpoint" / part / "model.pt")
        sb = torch.load(split / "checkpoint" / part / "model.pt")
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    start = torch.load(os.path.join(SHIPPED_REASONER, "model.pt"))
    assert any(not torch.equal(start[k], sb[k]) for k in sb)         # the reasoner trained
    run_cli("eval", "--config", MICRO, "--captioner", straight / "checkpoint" / "policy", "--set",
            "reasoner.backend=tiny", "--set",
            f"reasoner.model={straight / 'checkpoint' / 'reasoner'}", "--out", tmp_path / "ev")
    summary = json.load(open(tmp_path / "ev" / "summary.json"))
    assert summary["overall"]["n"] == 8 and 0 <= summary["overall"]["accuracy"] <= 1
    p = run_cli("train", "--config", MICRO, "--out", straight, "--resume", "--quiet", "--steps", 4, check=False)
    assert p.returncode == 2 and "train.cotrain: run has True" in p.stderr      # not silently frozen
    run_cli("train", "--out", straight, "--resume", "--quiet", "--steps", 4)   # the stored run: co-training
    last = _lines(straight / "metrics.jsonl")[-1]
    assert last["step"] == 4 and "reasoner_loss" in last


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


def test_question_quality_counts_questions_about_missing_and_answerable_facts():
    from acrl.eval.metrics import question_quality

    p = next(p for p in make_problems("val", 50) if p.family == "bars" and len(p.needed) == 2)
    a, b = p.needed
    other = next(k for k in p.facts if k not in p.needed)
    stated = f"the {a.split('.')[1]} bar is {p.facts[a]}"
    items = [
        {"id": p.id, "caption": stated, "asked": True,
         "clarification_question": f"what is the height of the {b.split('.')[1]} bar ?"},   # the missing one
        {"id": p.id, "caption": stated, "asked": True,
         "clarification_question": f"what is the height of the {other.split('.')[1]} bar ?"},   # answerable only
        {"id": p.id, "caption": stated, "asked": True, "clarification_question": "what is it ?"},  # neither
        {"id": p.id, "caption": stated, "asked": False, "clarification_question": None},
        {"id": p.id, "caption": oracle_caption_for(p), "asked": False, "clarification_question": None},
    ]
    q = question_quality(items, [p])
    assert q["question_about_missing"] == pytest.approx(1 / 3)
    assert q["question_answerable"] == pytest.approx(2 / 3)
    assert q["asks_when_missing"] == pytest.approx(1 / 4)       # 4 captions miss a fact; one question helped


def test_sweep_evaluates_the_cotrained_reasoner_and_the_frozen_world_reasoner(tmp_path):
    out = tmp_path / "sw"
    run_cli("sweep", "--config", MICRO, "--set", "train.steps=2", "--set", "train.eval_every=2", "--set",
            "train.eval_n=4", "--set", "reasoner.backend=tiny", "--set", "train.problems_per_step=4",
            "--set", "eval.sets={world-reasoner: {reasoner: {backend: world}}}",
            "--arm", "frozen:train.cotrain=false", "--arm", "cotrain:train.cotrain=true", "--seeds", "0",
            "--out", out)
    for arm in ("frozen", "cotrain"):
        r = json.loads((out / "runs" / f"{arm}_seed=0" / "result.json").read_text())
        assert set(r["final"]) == {"in", "world-reasoner"}
        assert {"question_about_missing", "question_answerable", "asks_when_missing"} <= set(r["final"]["in"])
    assert (out / "runs" / "cotrain_seed=0" / "checkpoint" / "reasoner" / "model.pt").exists()
    assert not (out / "runs" / "frozen_seed=0" / "checkpoint" / "reasoner").exists()
    res = json.loads((out / "results.json").read_text())
    assert "in/final_question_about_missing" in res["arms"]["cotrain"]["metrics"]
