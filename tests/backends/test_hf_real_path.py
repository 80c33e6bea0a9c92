"""The path a first real run takes, at CPU scale on tiny random checkpoints: log-probs in bounded row chunks,
an on-policy PPO ratio of exactly 1 with the paper configs' LoRA settings, π_ref = the starting checkpoint,
LoRA settings from a loaded adapter, and no bf16 full fine-tune."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("peft")

from acrl.backends import hf_tiny  # noqa: E402
from acrl.backends.hf import HFCaptioner, HFSettings, export_merged, row_chunks, token_logprobs  # noqa: E402
from acrl.config import LoraSettings  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER = {"internvl": "internvl-2b.yaml"}   # every other family: the Qwen2.5-VL-3B config
LORA = LoraSettings(enabled=True, r=4, alpha=8)
QUESTIONS = ["What is the height of the red bar?", "How many circles are there?"]


def _images(k=2, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64 + 16 * i, 64, 3), dtype=np.uint8)) for i in range(k)]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-tiny")
    cache = {}

    def get(family):
        if hf_tiny.unavailable(family):
            pytest.skip(hf_tiny.unavailable(family))
        if family not in cache:
            cache[family] = hf_tiny.make_tiny(family, str(root / family), seed=0)
        return cache[family]

    return get


def _randomize_adapter(cap, seed=0, std=0.05):
    """Give the adapter non-zero B matrices, as after some training (a fresh adapter's B = 0 hides dropout)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cap.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _paper_config(family):
    from acrl.config import load_config

    return load_config(os.path.join(ROOT, "configs", PAPER.get(family, "qwen2.5-vl-3b.yaml")),
                       ["captioner.device=cpu", "captioner.dtype=fp32", "captioner.max_new_tokens=6"])


def _check_on_policy_ratio(family, tiny_dirs, tmp_path):
    """The paper config's captioner settings (LoRA rank/alpha/dropout, gradient checkpointing, shared prompt
    cache, micro-batch 8 of 16 rows) in fp32: every token's ratio at the first update is 1 to
    1e-6. The adapter is a trained one saved with LoRA dropout 0.05 in its config (as the paper configs had)."""
    from acrl.core.update import update
    from acrl.train.learner import captioner_update_settings

    cfg = _paper_config(family)
    c = cfg.captioner
    assert c.gradient_checkpointing and c.share_prompt_cache and cfg.train.micro_batch == 8
    settings = HFSettings.from_config(c)
    torch.manual_seed(0)
    start = HFCaptioner.load(tiny_dirs(family), lora=c.lora, settings=settings)
    _randomize_adapter(start)
    start.save(str(tmp_path / "adapter"))
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    conf["lora_dropout"] = 0.05
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(conf))
    cap = HFCaptioner.load(str(tmp_path / "adapter"), settings=settings, micro_batch=cfg.train.micro_batch)
    assert cap.lora.r == c.lora.r and cap.lora.dropout == 0.05      # the adapter's own settings
    torch.manual_seed(1)
    roll = cap.generate(_images(), QUESTIONS, n=cfg.train.samples_per_problem, temperature=c.temperature,
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


def test_paper_configs_use_no_lora_dropout_and_a_new_adapter_refuses_it(tiny_dirs):
    for name in ("qwen2.5-vl-3b.yaml", "internvl-2b.yaml"):
        assert _paper_config("internvl" if "internvl" in name else "qwen").captioner.lora.dropout == 0
    with pytest.raises(ValueError, match="lora.dropout=0.05"):
        HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=LoraSettings(enabled=True, r=4, alpha=8, dropout=0.05),
                         settings=HFSettings(device="cpu"))


# --- item 1: bounded memory --------------------------------------------------------------------------------------
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
        roll = cap.generate(_images(), QUESTIONS, n=4, max_new_tokens=5)
        recompute = [s for s in seen if s[1] > 1]            # the teacher-forced forwards (sampling: 1 position)
        assert recompute and max(r for r, _ in recompute) <= 3 and sum(r for r, _ in recompute) == 8
        seen.clear()
        cap.generate(_images(), QUESTIONS, n=1, max_new_tokens=5, greedy=True)
        assert all(p == 1 for _, p in seen)                  # sampling only
    finally:
        handle.remove()
    assert roll.tokens.shape == (8, 5)                     # padded to the generation cap
    default = HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=LORA, settings=HFSettings(device="cpu"))
    assert default.logprob_rows() == 8
    assert HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=LORA, settings=HFSettings(device="cpu", logprob_batch_size=2),
                            micro_batch=16).logprob_rows() == 2


# --- item 3: π_ref is the starting checkpoint ---------------------------------------------------------------------
def test_training_from_an_adapter_keeps_it_in_the_reference(tiny_dirs, tmp_path):
    """Starting from an adapter (an SFT or an earlier run): π_ref and the clarifier are base + that adapter, a new
    adapter trains on top, a resumed run rebuilds the same π_ref from its checkpoint, and another ``reference`` is
    loaded as a separate π_ref (``acrl eval --reference`` with LoRA)."""
    base = tiny_dirs("qwen2-vl")
    settings = HFSettings(device="cpu")
    torch.manual_seed(0)
    sft = HFCaptioner.load(base, lora=LORA, settings=settings)
    _randomize_adapter(sft, std=0.2)
    sft.save(str(tmp_path / "sft"))
    roll = sft.generate(_images(), QUESTIONS, n=2, max_new_tokens=5)
    sft_lp, base_lp = sft.logprobs(roll).detach(), sft.logprobs(roll, reference=True)
    assert not torch.allclose(sft_lp, base_lp, atol=1e-3)
    questions = ["What colour is the bar?", "How tall is it?"]
    sft_answers = sft.policy_answer(_images(), questions)

    start = str(tmp_path / "sft")
    cap = HFCaptioner.load(start, lora=LORA, settings=settings, reference=start)    # what `acrl train` does
    assert cap.reference_adapters and cap.ref_model is None
    assert torch.allclose(cap.logprobs(roll, reference=True), sft_lp, atol=1e-5)   # π_ref = the SFT checkpoint
    assert torch.allclose(cap.logprobs(roll).detach(), sft_lp, atol=1e-5)          # the new adapter starts at 0
    assert cap.answer(_images(), questions) == sft_answers                         # the clarifier too
    opt = torch.optim.SGD(cap.trainable_parameters(), lr=1.0)
    for _ in range(2):
        opt.zero_grad()
        (-(cap.logprobs(roll) * roll.mask).sum()).backward()
        opt.step()
    after = cap.logprobs(roll).detach()
    assert not torch.allclose(after, sft_lp, atol=1e-4)
    cap.save(str(tmp_path / "run" / "policy"))
    meta = json.loads((tmp_path / "run" / "policy" / "acrl_captioner.json").read_text())
    assert meta["reference_adapters"] == ["reference/0"]
    assert (tmp_path / "run" / "policy" / "reference" / "0" / "adapter_config.json").exists()

    resumed = HFCaptioner.load(str(tmp_path / "run" / "policy"), lora=LORA, settings=settings, reference=start)
    assert resumed.ref_model is None                                                # shared, no second copy
    assert torch.allclose(resumed.logprobs(roll, reference=True), sft_lp, atol=1e-5)
    assert torch.allclose(resumed.logprobs(roll).detach(), after, atol=1e-5)
    merged = HFCaptioner.load(export_merged(str(tmp_path / "run" / "policy"), str(tmp_path / "merged")),
                              settings=settings)
    assert torch.allclose(merged.logprobs(roll).detach(), after, atol=1e-4)        # export merges both adapters

    other = HFCaptioner.load(str(tmp_path / "run" / "policy"), lora=LORA, settings=settings, reference=base)
    assert other.ref_model is not None                                              # --reference honoured
    assert torch.allclose(other.logprobs(roll, reference=True), base_lp, atol=1e-5)


# --- item 4: a loaded adapter keeps its own settings --------------------------------------------------------------
def test_a_loaded_adapter_keeps_its_rank_alpha_and_targets(tiny_dirs, tmp_path):
    torch.manual_seed(0)
    lora = LoraSettings(enabled=True, r=32, alpha=64, targets=r".*\.(q_proj|v_proj)")
    HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=lora, settings=HFSettings(device="cpu")).save(str(tmp_path / "r32"))
    again = HFCaptioner.load(str(tmp_path / "r32"), settings=HFSettings(device="cpu"))   # resume: lora=None
    assert (again.lora.enabled, again.lora.r, again.lora.alpha) == (True, 32, 64)
    assert "q_proj" in again.lora.targets and "k_proj" not in again.lora.targets


# --- item 7: bf16 weights -----------------------------------------------------------------------------------------
def test_full_bf16_fine_tune_is_refused_and_lora_adapters_stay_fp32(tiny_dirs):
    settings = HFSettings(device="cpu", dtype="bf16")
    full = HFCaptioner.load(tiny_dirs("qwen2-vl"), settings=settings)
    with pytest.raises(ValueError, match="full fine-tuning of bfloat16 weights"):
        full.trainable_parameters()
    assert HFCaptioner.load(tiny_dirs("qwen2-vl"), settings=HFSettings(device="cpu", dtype="fp32")
                            ).trainable_parameters()
    lora = HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=LORA, settings=settings)
    params = lora.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    assert next(lora.base_model().get_output_embeddings().parameters()).dtype == torch.bfloat16
