"""Saved captioners: a standard PEFT directory that PEFT itself loads, merged exports, π_ref = the starting
checkpoint when training starts from an adapter (also after a resume), and a loaded adapter's own settings."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from acrl.backends.hf.captioner import HFCaptioner  # noqa: E402
from acrl.backends.hf.checkpoint import export_merged  # noqa: E402
from acrl.config import HFSettings, LoraSettings  # noqa: E402

from .fixtures import LORA, QUESTIONS, randomize_adapter, sgd_step, square_images, tall_images  # noqa: E402


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_loads_the_saved_adapter_and_export_merges(tiny_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(1)
    base = tiny_dirs("qwen2-vl")
    cap = HFCaptioner.load(base, lora=LORA, settings=HFSettings(device="cpu", gradient_checkpointing=True))
    roll = cap.generate(square_images(), QUESTIONS, n=2, max_new_tokens=5)
    sgd_step(cap, roll)                                  # LoRA under gradient checkpointing gets gradients
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in cap.trainable_parameters())
    want = cap.logprobs(roll).detach()
    cap.save(str(tmp_path / "run"))
    peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), str(tmp_path / "run"))
    assert sum("lora_" in n for n, _ in peft.named_parameters()) == sum("lora_" in n for n, _ in
                                                                        cap.model.named_parameters())
    out = export_merged(str(tmp_path / "run"), str(tmp_path / "merged"))
    merged = HFCaptioner.load(out, settings=HFSettings(device="cpu"))  # a plain checkpoint: full fine-tune
    assert not any("lora_" in n for n, _ in merged.model.named_parameters())
    assert torch.allclose(merged.logprobs(roll).detach(), want, atol=1e-4)
    out2 = export_merged(cap, str(tmp_path / "merged2"))               # from a live policy
    assert os.path.exists(os.path.join(out2, "model.safetensors"))


def test_training_from_an_adapter_keeps_it_in_the_reference(tiny_dirs, tmp_path):
    """Starting from an adapter (an SFT or an earlier run): π_ref and the clarifier are base + that adapter, a new
    adapter trains on top, a resumed run rebuilds the same π_ref from its checkpoint, and another ``reference`` is
    loaded as a separate π_ref (``acrl eval --reference`` with LoRA)."""
    base = tiny_dirs("qwen2-vl")
    settings = HFSettings(device="cpu")
    torch.manual_seed(0)
    sft = HFCaptioner.load(base, lora=LORA, settings=settings)
    randomize_adapter(sft, std=0.2)
    sft.save(str(tmp_path / "sft"))
    roll = sft.generate(tall_images(), QUESTIONS, n=2, max_new_tokens=5)
    sft_lp, base_lp = sft.logprobs(roll).detach(), sft.logprobs(roll, reference=True)
    assert not torch.allclose(sft_lp, base_lp, atol=1e-3)
    questions = ["What colour is the bar?", "How tall is it?"]
    sft_answers = sft.policy_answer(tall_images(), questions)

    start = str(tmp_path / "sft")
    cap = HFCaptioner.load(start, lora=LORA, settings=settings, reference=start)    # what `acrl train` does
    assert cap.reference_adapters and cap.ref_model is None
    assert torch.allclose(cap.logprobs(roll, reference=True), sft_lp, atol=1e-5)   # π_ref = the SFT checkpoint
    assert torch.allclose(cap.logprobs(roll).detach(), sft_lp, atol=1e-5)          # the new adapter starts at 0
    assert cap.answer(tall_images(), questions) == sft_answers                         # the clarifier too
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


def test_a_loaded_adapter_keeps_its_rank_alpha_and_targets(tiny_dirs, tmp_path):
    torch.manual_seed(0)
    lora = LoraSettings(enabled=True, r=32, alpha=64, targets=r".*\.(q_proj|v_proj)")
    HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=lora, settings=HFSettings(device="cpu")).save(str(tmp_path / "r32"))
    again = HFCaptioner.load(str(tmp_path / "r32"), settings=HFSettings(device="cpu"))   # resume: lora=None
    assert (again.lora.enabled, again.lora.r, again.lora.alpha) == (True, 32, 64)
    assert "q_proj" in again.lora.targets and "k_proj" not in again.lora.targets
