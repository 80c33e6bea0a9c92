"""acrl.integrations.trl: the AC-RL reward in TRL's reward-function form, the world dataset, a GRPOTrainer smoke run."""

import math
import random

import pytest
import torch

pytest.importorskip("datasets")

from acrl.integrations.trl import (
    completion_text,
    make_acrl_reward,
    problem_from_columns,
    world_dataset,
)
from acrl.rollout.episode import EpisodeConfig, run_episodes
from acrl.rollout.metrics import episode_metrics
from acrl.world import WorldConfig, human_caption_for, language, make_problems, oracle_caption_for
from acrl.world.reasoner import OracleClarifier, WorldReasoner

try:
    import trl  # noqa: F401
    HAVE_TRL = True
except ImportError:
    HAVE_TRL = False
needs_trl = pytest.mark.skipif(not HAVE_TRL, reason="trl is not installed (pip install -e '.[trl]'); the "
                                                   "GRPOTrainer tests need it")
M = 4


class PixelOracle:
    """Answers clarifications from the true facts, keyed by the image's pixels (works on images that went through
    a datasets PNG round trip, unlike OracleClarifier's object identity)."""

    def __init__(self, problems):
        self.facts = {p.image.convert("RGB").tobytes(): p.facts for p in problems}
        self.calls = 0

    def answer(self, images, questions):
        self.calls += len(questions)
        out = []
        for img, q in zip(images, questions):
            facts = self.facts.get(img.convert("RGB").tobytes(), {})
            key = language.parse_clarification_question(q)
            out.append(language.clarification_answer(key, facts) if key in facts else "i cannot tell")
        return out


@pytest.fixture(scope="module")
def world():
    problems = make_problems("train", 8, WorldConfig(seed=3))
    rng = random.Random(0)
    captions = [[oracle_caption_for(p) if i == 0 else human_caption_for(p, rng, fact_rate=0.5 * (i - 1))
                 for i in range(M)] for p in problems]
    return problems, captions


def trl_columns(ds, m=M):
    """Reward kwargs as GRPOTrainer builds them: every dataset column, each row repeated m times in a row."""
    rows = [ds[i] for i in range(len(ds)) for _ in range(m)]
    return {k: [r[k] for r in rows] for k in ds.column_names if k != "prompt"}, [r["prompt"] for r in rows]


def expected_rewards(problems, captions, clarifier, alpha=0.7):
    groups = run_episodes(problems, captions, WorldReasoner(), clarifier, EpisodeConfig(alpha=alpha))
    return [ep.reward for g in groups for ep in g], groups


def test_world_dataset_layout(world):
    problems, _ = world
    ds = world_dataset(0, problems=problems)
    assert len(ds) == len(problems)
    row = ds[0]
    turn = row["prompt"][0]
    assert turn["role"] == "user" and [c["type"] for c in turn["content"]] == ["image", "text"]
    assert problems[0].question in turn["content"][1]["text"]
    assert row["image"].size == problems[0].image.size
    assert row["image"].convert("RGB").tobytes() == problems[0].image.convert("RGB").tobytes()
    for i, p in enumerate(problems):
        q = problem_from_columns({k: [ds[i][k]] for k in ds.column_names}, 0, p.id)
        assert (q.id, q.question, q.answer, q.answer_type, q.choices, q.tolerance) == \
            (p.id, p.question, p.answer, p.answer_type, p.choices, p.tolerance)
        assert ("Choices:" in ds[i]["prompt"][0]["content"][1]["text"]) == bool(p.choices)
    drawn = world_dataset(3, WorldConfig(seed=3))
    assert drawn["problem_id"] == [p.id for p in problems[:3]]


def test_reward_equals_run_episodes_conversational(world):
    problems, captions = world
    ds = world_dataset(0, problems=problems)
    columns, prompts = trl_columns(ds)
    completions = [[{"role": "assistant", "content": c}] for cs in captions for c in cs]
    logged, extra = {}, {}
    reward = make_acrl_reward(WorldReasoner(), PixelOracle(problems), alpha=0.7)
    got = reward(prompts=prompts, completions=completions, completion_ids=[[0]] * len(completions),
                 trainer_state=None, log_metric=logged.__setitem__, log_extra=extra.__setitem__, **columns)
    want, groups = expected_rewards(problems, captions, PixelOracle(problems))
    assert got == want
    tiers = {ep.tier for g in groups for ep in g}
    assert {"direct_correct", "clarified_correct", "wrong"} <= tiers        # every tier is exercised
    assert [len(g) for g in reward.last_episodes] == [M] * len(problems)      # one group per prompt
    m = episode_metrics(groups)
    assert logged["acrl/clarification_rate"] == pytest.approx(m["clarification_rate"])
    assert logged["acrl/direct_correct"] == pytest.approx(m["direct_correct"])
    assert logged["acrl/failed"] == 0.0
    assert extra["acrl_tier"] == [ep.tier for g in groups for ep in g]


def test_reward_plain_strings_known_problems_and_alpha(world):
    problems, captions = world
    columns, prompts = trl_columns(world_dataset(0, problems=problems))
    flat = [c for cs in captions for c in cs]
    # known problems: the original objects (their images) are used, so an identity-keyed oracle works
    reward = make_acrl_reward(WorldReasoner(), OracleClarifier(problems), alpha=0.4, problems=problems)
    want, _ = expected_rewards(problems, captions, OracleClarifier(problems), alpha=0.4)
    assert reward(prompts, flat, **columns) == want
    # no key column: one problem per row, same rewards
    no_key = {k: v for k, v in columns.items() if k != "problem_id"}
    reward = make_acrl_reward(WorldReasoner(), PixelOracle(problems), alpha=0.4)
    assert reward(prompts, flat, **no_key) == want
    assert len(reward.last_episodes) == len(flat)


def test_failed_episodes_return_none(world):
    problems, captions = world

    class Flaky:
        def __init__(self):
            self.inner, self.n = PixelOracle(problems), 0

        def answer(self, images, questions):
            out = self.inner.answer(images, questions)
            return [RuntimeError("HTTP 503") if i % 2 == 0 else a for i, a in enumerate(out)]

    columns, prompts = trl_columns(world_dataset(0, problems=problems))
    flat = [c for cs in captions for c in cs]
    got = make_acrl_reward(WorldReasoner(), Flaky())(prompts, flat, **columns)
    want, groups = expected_rewards(problems, captions, Flaky())
    eps = [ep for g in groups for ep in g]
    assert any(ep.tier == "failed" for ep in eps)
    for r, w, ep in zip(got, want, eps):
        if ep.tier == "failed":
            assert r is None and math.isnan(w)
        else:
            assert r == w


def test_reward_errors_and_completion_text(world):
    problems, captions = world
    columns, prompts = trl_columns(world_dataset(0, problems=problems[:1]))
    with pytest.raises(ValueError, match="no clarifier"):
        make_acrl_reward(WorldReasoner(), None)(prompts, captions[0], **columns)
    with pytest.raises(KeyError, match="answer"):
        make_acrl_reward(WorldReasoner(), PixelOracle(problems))(
            prompts, captions[0], **{k: v for k, v in columns.items() if k != "answer"})
    with pytest.raises(ValueError, match="one value per completion"):
        make_acrl_reward(WorldReasoner(), PixelOracle(problems))(prompts, captions[0][:2], **columns)
    assert completion_text("a b") == "a b"
    assert completion_text([{"role": "assistant", "content": "x"}]) == "x"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "x"},
                                                             {"type": "text", "text": "y"}]}]) == "xy"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}]) == "c"


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    pytest.importorskip("transformers")
    from acrl.backends.hf.tiny import make_tiny

    return make_tiny("qwen2-vl", str(tmp_path_factory.mktemp("trl") / "qwen2-vl"), seed=0)


@needs_trl
def test_grpo_trainer_smoke(tiny_qwen, tmp_path):
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from acrl.backends.hf.loading import load_model, load_processor, lora_target_modules
    from acrl.config import HFSettings
    from acrl.integrations.trl import adapter_disabled_clarifier

    torch.manual_seed(0)
    settings = HFSettings(device="cpu", dtype="fp32", answer_max_new_tokens=6)
    model = load_model(tiny_qwen, settings)
    proc = load_processor(tiny_qwen)
    proc.tokenizer.padding_side = "left"
    targets = lora_target_modules(model, r".*\.(q_proj|v_proj)")
    reward = make_acrl_reward(WorldReasoner(), None, alpha=0.7)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, fp16=False,
                      activation_checkpointing=False, use_vllm=False, num_generations=4, per_device_train_batch_size=8,
                      gradient_accumulation_steps=1, max_completion_length=4, max_steps=1, learning_rate=1e-4,
                      beta=0.02, loss_type="grpo", report_to="none", save_strategy="no", logging_steps=1,
                      dataloader_num_workers=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, processing_class=proc,
                          train_dataset=world_dataset(2, WorldConfig(seed=1)),
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    reward.clarifier = adapter_disabled_clarifier(trainer.model, proc, settings)
    trainer.train()
    logs = next(h for h in trainer.state.log_history if "rewards/acrl/mean" in h)
    assert math.isfinite(logs["rewards/acrl/mean"])
    assert logs["acrl/clarification_rate"] >= 0.0 and "acrl/direct_correct" in logs
    assert sum(len(g) for g in reward.last_episodes) == 8


def test_frozen_clarifier(tiny_qwen):
    pytest.importorskip("peft")
    from acrl.config import HFSettings
    from acrl.integrations.trl import frozen_clarifier

    clar = frozen_clarifier(tiny_qwen, HFSettings(device="cpu", dtype="fp32", answer_max_new_tokens=4))
    p = make_problems("train", 1)[0]
    out = clar.answer([p.image, p.image], ["what is the base of the triangle ?"] * 2)
    assert len(out) == 2 and all(isinstance(a, str) for a in out) and out[0] == out[1]    # greedy
    assert not any(q.requires_grad for q in clar.base_model().parameters())
