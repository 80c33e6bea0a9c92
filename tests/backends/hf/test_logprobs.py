"""The one teacher-forced log-prob function: an on-policy PPO ratio of exactly 1 with the paper configs' settings,
the sampling distribution's log-probs, bounded row chunks, and the shared-prompt path equal to the per-row one."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("peft")

from acrl.backends.hf import tiny  # noqa: E402
from acrl.backends.hf.captioner import HFCaptioner  # noqa: E402
from acrl.backends.hf.logprobs import row_chunks, token_logprobs  # noqa: E402
from acrl.config import HFSettings  # noqa: E402

from .fixtures import LORA, QUESTIONS, paper_config, randomize_adapter, tall_images  # noqa: E402


def _check_on_policy_ratio(family, tiny_dirs, tmp_path):
    """The paper config's captioner settings (LoRA rank/alpha/dropout, gradient checkpointing, shared prompt
    cache, micro-batch 8 of 16 rows) in fp32: every token's ratio at the first update is 1 to
    1e-6. The adapter is a trained one saved with LoRA dropout 0.05 in its config (as the paper configs had)."""
    from acrl.core.update import update
    from acrl.train.learner import captioner_update_settings

    cfg = paper_config(family)
    c = cfg.captioner
    assert c.gradient_checkpointing and c.share_prompt_cache and cfg.train.micro_batch == 8
    settings = HFSettings.from_config(c)
    torch.manual_seed(0)
    start = HFCaptioner.load(tiny_dirs(family), lora=c.lora, settings=settings)
    randomize_adapter(start)
    start.save(str(tmp_path / "adapter"))
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    conf["lora_dropout"] = 0.05
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(conf))
    cap = HFCaptioner.load(str(tmp_path / "adapter"), settings=settings, micro_batch=cfg.train.micro_batch)
    assert cap.lora.r == c.lora.r and cap.lora.dropout == 0.05      # the adapter's own settings
    torch.manual_seed(1)
    roll = cap.generate(tall_images(), QUESTIONS, n=cfg.train.samples_per_problem, temperature=c.temperature,
                        max_new_tokens=c.max_new_tokens)
    assert roll.tokens.shape == (16, 6)
    for i in range(0, 16, cfg.train.micro_batch):            # what the trainer's micro-batches see
        sl = slice(i, i + cfg.train.micro_batch)
        new = cap.logprobs(roll, sl)
        assert new.requires_grad
        ratio = torch.exp(new.detach() - roll.logprobs[sl])[roll.mask[sl] > 0]
        assert (ratio - 1).abs().max() <= 1e-6, (ratio - 1).abs().max()
    opt = torch.optim.AdamW(cap.trainable_parameters(), lr=cfg.train.lr)
    adv = torch.linspace(-1, 1, 16)
    stats = update(cap, opt, roll, adv, torch.ones(16, dtype=torch.bool), captioner_update_settings(cfg))
    assert abs(stats["ratio_mean"] - 1) <= 1e-6 and stats["clip_frac"] == 0.0 and stats["grad_norm"] > 0


def test_on_policy_ratio_qwen2_vl(tiny_dirs, tmp_path):
    _check_on_policy_ratio("qwen2-vl", tiny_dirs, tmp_path)


def test_on_policy_ratio_qwen2_5_vl(tiny_dirs, tmp_path):
    _check_on_policy_ratio("qwen2.5-vl", tiny_dirs, tmp_path)


def test_on_policy_ratio_internvl(tiny_dirs, tmp_path):
    _check_on_policy_ratio("internvl", tiny_dirs, tmp_path)


def test_on_policy_ratio_llava(tiny_dirs, tmp_path):
    _check_on_policy_ratio("llava", tiny_dirs, tmp_path)


@pytest.mark.parametrize("family", ["qwen3-vl", "gemma3", "idefics3", "llava-onevision"])
def test_on_policy_ratio_newer_families(family, tiny_dirs, tmp_path):
    _check_on_policy_ratio(family, tiny_dirs, tmp_path)


def test_token_logprobs_is_log_softmax_at_the_chosen_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50, dtype=torch.bfloat16) * 4
    tokens = torch.randint(0, 50, (3, 5))
    tokens[0, 0] = 7
    banned = torch.tensor([7, 9])
    want = torch.log_softmax(logits.float().index_fill(-1, banned, float("-inf")) / 0.7, -1)
    want = want.gather(-1, tokens[..., None])[..., 0]
    got = token_logprobs(logits, tokens, 0.7, banned)
    assert got.dtype == torch.float32 and got[0, 0] == float("-inf")
    assert torch.allclose(got[1:], want[1:], atol=1e-5) and torch.allclose(got[0, 1:], want[0, 1:], atol=1e-5)
    x = logits.float().requires_grad_(True)                      # differentiable like log_softmax
    token_logprobs(x, tokens[1:2].expand(3, -1), 1.0).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert row_chunks(3, 13, 4) == [(3, 4), (4, 8), (8, 12), (12, 13)] and row_chunks(5, 5, 4) == []


def _count_head_rows(cap):
    """Rows and positions of every output-head call (the logits a forward materialises)."""
    seen = []
    head = cap.base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[:2])))
    return seen, handle


def test_logprob_passes_run_in_micro_batch_chunks_and_greedy_skips_the_recompute(tiny_dirs):
    """With logprob_batch_size 0 the old log-probs of the rollout are taken train.micro_batch rows per forward (not
    all rows at once), and greedy generation (evaluation) runs no recompute at all."""
    settings = HFSettings(device="cpu", self_test=False)
    torch.manual_seed(0)
    cap = HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=LORA, settings=settings, micro_batch=3)
    assert cap.logprob_rows() == 3
    seen, handle = _count_head_rows(cap)
    try:
        roll = cap.generate(tall_images(), QUESTIONS, n=4, max_new_tokens=5)
        recompute = [s for s in seen if s[1] > 1]            # the teacher-forced forwards (sampling: 1 position)
        assert recompute and max(r for r, _ in recompute) <= 3 and sum(r for r, _ in recompute) == 8
        seen.clear()
        cap.generate(tall_images(), QUESTIONS, n=1, max_new_tokens=5, greedy=True)
        assert all(p == 1 for _, p in seen)                  # sampling only
    finally:
        handle.remove()
    assert roll.tokens.shape == (8, 5)                     # padded to the generation cap
    default = HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=LORA, settings=HFSettings(device="cpu"))
    assert default.logprob_rows() == 8
    assert HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=LORA, settings=HFSettings(device="cpu", logprob_batch_size=2),
                            micro_batch=16).logprob_rows() == 2


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_shared_prompt_cache_matches_per_row_path(family, tiny_dirs):
    """Prompt sharing (one prompt forward per problem, cache expanded to its samples) gives the per-row path's
    numbers: log-probs of π_θ and π_ref, LoRA gradients (the prompt's share included), greedy captions and
    answers; sampled log-probs match a teacher-forced recomputation. Images of different sizes (prompts of
    different lengths, left padding), captions of different lengths, log-prob chunks that split problems."""
    torch.manual_seed(5)
    cap = HFCaptioner.load(tiny_dirs(family), lora=LORA, settings=HFSettings(device="cpu", logprob_batch_size=5))
    assert cap.settings.share_prompt_cache
    with torch.no_grad():                                   # an adapter that changes the prompt's keys/values
        for p in cap.trainable_parameters():
            p.normal_(0.0, 0.2)
    eos = cap.eos_ids[0]

    def boost(_m, _i, out):
        out = out.clone()
        out[..., eos] += 3.0
        return out

    hook = cap.base_model().get_output_embeddings().register_forward_hook(boost)
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in [(64, 64), (40, 90), (120, 50)]]
    questions = QUESTIONS + ["Which shape is the largest of them all?"]
    roll = cap.generate(images, questions, n=3, temperature=0.9, max_new_tokens=8)
    assert roll.mask.sum(1).min() < roll.mask.sum(1).max()

    def run():
        cap.model.zero_grad()
        lp = cap.logprobs(roll)
        (lp * roll.mask).sum().backward()
        grads = [p.grad.clone() for p in cap.trainable_parameters()]
        greedy = cap.generate(images, questions, greedy=True, max_new_tokens=8)
        return lp.detach(), cap.logprobs(roll, reference=True), grads, greedy, cap.answer(images, questions)

    fast = run()
    cap.settings.share_prompt_cache = False
    slow = run()
    assert torch.allclose(fast[0], roll.context.sampler_logprobs, atol=1e-5)
    assert torch.allclose(fast[0], slow[0], atol=1e-5)
    assert torch.allclose(fast[1], slow[1], atol=1e-5)
    assert all(g.abs().sum() > 0 for g in slow[2])
    for a, b in zip(fast[2], slow[2]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max())), (a - b).abs().max()
    assert fast[3].texts == slow[3].texts and torch.equal(fast[3].tokens, slow[3].tokens)
    assert torch.allclose(fast[3].logprobs, slow[3].logprobs, atol=1e-5)
    assert fast[4] == slow[4]
    old = cap.generate(images, questions, n=2, temperature=1.3, max_new_tokens=6)   # per-row teacher forcing
    assert torch.allclose(cap.logprobs(old).detach(), old.context.sampler_logprobs, atol=1e-5)
    hook.remove()
