"""The clarifier is π_ref, the frozen starting checkpoint, after training steps through the trainer's ``train()``:
the policy moves, π_ref's answers and log-probs do not (tiny world captioner and a tiny Hugging Face one)."""

import os

import pytest
import torch

from acrl.app.assemble import world_source
from acrl.backends.tiny import TinyCaptioner
from acrl.config import SHIPPED_CAPTIONER, LoraSettings, load_config
from acrl.train.loop import Run, train
from acrl.world import make_problems

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUESTIONS = ["what is the height of the red bar ?", "how many circles are there ?", "how wide is it ?"]


def _probe(policy):
    problems = make_problems("val", 3)
    images = [p.image for p in problems]
    roll = policy.generate(images, [p.question_with_choices() for p in problems], n=2, max_new_tokens=8)
    return images, roll


class CoinReasoner:
    """Right on captions of even character count, wrong otherwise: rewards that vary within every group, so the
    policy gets a gradient whatever it writes (a random model's captions would all be wrong)."""

    def __init__(self, cfg, n=64):
        self.problems = world_source(cfg)(0, n)

    def complete(self, prompts):
        out = []
        for prompt in prompts:
            p = next((p for p in self.problems if p.question in prompt), None)
            out.append(f"SOLVED \\boxed{{{p.answer if p is not None and len(prompt) % 2 == 0 else 'nothing'}}}")
        return out


def _train(cfg, policy, out):
    return train(Run(cfg, str(out), policy, CoinReasoner(cfg), policy, world_source(cfg)), progress=False)


@pytest.mark.parametrize("lora", [False, True])
def test_tiny_clarifier_is_the_frozen_start_after_training(tmp_path, lora):
    torch.manual_seed(0)
    settings = LoraSettings(enabled=lora, r=4, alpha=8)
    policy = TinyCaptioner.load(SHIPPED_CAPTIONER, lora=settings, reference=SHIPPED_CAPTIONER)
    start = TinyCaptioner.load(SHIPPED_CAPTIONER)
    images, roll = _probe(start)
    answers, ref_lp = start.answer(images, QUESTIONS), start.logprobs(roll).detach()
    cfg = load_config(os.path.join(ROOT, "configs", "micro.yaml"),
                      ["train.steps=3", "train.lr=0.05", "train.checkpoint_every=100", "train.log_episodes=0"])
    hist = _train(cfg, policy, tmp_path / "run")
    assert [h["step"] for h in hist] == [1, 2, 3]
    assert not torch.allclose(policy.logprobs(roll).detach(), ref_lp, atol=1e-3)       # the policy moved
    assert policy.answer(images, QUESTIONS) == answers                                  # the clarifier did not
    assert torch.allclose(policy.logprobs(roll, reference=True), ref_lp, atol=1e-5)


def test_hf_clarifier_is_the_frozen_start_after_training(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from acrl.backends.hf.captioner import HFCaptioner
    from acrl.backends.hf.tiny import make_tiny
    from acrl.config import HFSettings

    base = make_tiny("qwen2-vl", str(tmp_path / "base"), seed=0)
    cfg = load_config(os.path.join(ROOT, "configs", "qwen2-vl-tiny.yaml"),
                      ["train.steps=2", "train.problems_per_step=2", "train.samples_per_problem=2", "train.lr=0.05",
                       "train.checkpoint_every=100", "train.log_episodes=0", "train.threads=1",
                       "captioner.max_new_tokens=6"])
    torch.manual_seed(0)
    policy = HFCaptioner.load(base, lora=cfg.captioner.lora, settings=HFSettings.from_config(cfg.captioner),
                              reference=base, micro_batch=cfg.train.micro_batch)
    start = HFCaptioner.load(base, settings=HFSettings(device="cpu"))
    images, roll = _probe(start)
    answers, ref_lp = start.answer(images, QUESTIONS), start.logprobs(roll).detach()
    hist = _train(cfg, policy, tmp_path / "run")
    assert [h["step"] for h in hist] == [1, 2]
    assert not torch.allclose(policy.logprobs(roll).detach(), ref_lp, atol=1e-4)
    assert policy.answer(images, QUESTIONS) == answers
    assert torch.allclose(policy.logprobs(roll, reference=True), ref_lp, atol=1e-5)
