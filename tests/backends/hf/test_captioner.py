"""HFCaptioner, the Policy, on tiny random checkpoints of each supported family (built locally, no downloads):
generate, log-probs, a LoRA or full fine-tuning step, save and load, π_ref's answers, the start-up self-test."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("peft")

from acrl.backends.hf import tiny  # noqa: E402
from acrl.backends.hf.captioner import HFCaptioner  # noqa: E402
from acrl.backends.hf.inputs import Feed  # noqa: E402
from acrl.backends.hf.loading import language_model_prefix  # noqa: E402
from acrl.config import HFSettings, LoraSettings  # noqa: E402

from .fixtures import LORA, QUESTIONS, sgd_step, square_images  # noqa: E402


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_family_generate_logprobs_lora_step_save_load(family, tiny_dirs, tmp_path):
    torch.manual_seed(0)
    cap = HFCaptioner.load(tiny_dirs(family), lora=LORA, settings=HFSettings(device="cpu"))
    images = square_images()
    roll = cap.generate(images, QUESTIONS, n=2, temperature=1.0, max_new_tokens=6)
    assert len(roll.texts) == 2
    assert all(len(g) == 2 and all(isinstance(t, str) for t in g) for g in roll.texts)
    assert roll.tokens.shape == roll.mask.shape == roll.logprobs.shape and roll.tokens.shape[0] == 4
    assert roll.tokens.shape[1] <= 6 and (roll.mask.sum(1) > 0).all()
    assert (roll.logprobs <= 0).all() and (roll.logprobs[roll.mask == 0] == 0).all()

    lp = cap.logprobs(roll)
    assert lp.requires_grad and lp.shape == roll.tokens.shape
    assert torch.equal(lp.detach(), roll.logprobs)                 # old log-probs: the same function
    samp = roll.context.sampler_logprobs                            # the sampler's: equal to 1e-5 in fp32
    assert torch.allclose(samp, roll.logprobs, atol=1e-5), (samp - roll.logprobs).abs().max()
    part = torch.cat([cap.logprobs(roll, slice(0, 1)), cap.logprobs(roll, slice(1, 4))]).detach()
    assert torch.allclose(part, lp.detach(), atol=1e-5)
    ref_before = cap.logprobs(roll, reference=True)
    assert not ref_before.requires_grad
    assert torch.allclose(ref_before, lp.detach(), atol=1e-5)        # before training π_θ = π_ref

    names = [n for n, p in cap.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    prefix = "base_model.model." + language_model_prefix(cap.base_model()) + "."
    assert all(n.startswith(prefix) for n in names)      # no adapter on the vision tower or the projector
    frozen = {n: p.detach().clone() for n, p in cap.model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in cap.model.named_parameters() if p.requires_grad}
    sgd_step(cap, roll)
    for n, p in cap.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, lora_before[n]) for n, p in cap.model.named_parameters()
               if n in lora_before)
    after = cap.logprobs(roll).detach()
    assert not torch.allclose(after, ref_before, atol=1e-4)
    assert torch.allclose(cap.logprobs(roll, reference=True), ref_before, atol=1e-6)

    cap.save(str(tmp_path / "run"))
    assert (tmp_path / "run" / "adapter_config.json").exists()
    meta = json.loads((tmp_path / "run" / "acrl_captioner.json").read_text())
    assert meta["lora"] and os.path.samefile(meta["base"], tiny_dirs(family))
    again = HFCaptioner.load(str(tmp_path / "run"), lora=LORA, settings=HFSettings(device="cpu"))
    assert torch.allclose(again.logprobs(roll).detach(), after, atol=1e-5)
    assert torch.allclose(again.logprobs(roll, reference=True), ref_before, atol=1e-6)
    assert again.trainable_parameters()                                 # a resumed adapter keeps training

    answers = again.answer(images, ["What colour is the bar?", "How tall is it?"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert again.answer([], []) == []


def test_full_finetune_keeps_frozen_reference_and_vision(tiny_dirs, tmp_path):
    torch.manual_seed(3)
    full = LoraSettings(enabled=False)
    cap = HFCaptioner.load(tiny_dirs("qwen2.5-vl"), lora=full,
                           settings=HFSettings(device="cpu", gradient_checkpointing=True))
    assert cap.ref_model is not None
    trainable = {n for n, p in cap.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.language_model.", "lm_head")) for n in trainable)
    roll = cap.generate(square_images(), QUESTIONS, n=2, temperature=0.7, max_new_tokens=5)
    ref_before = cap.logprobs(roll, reference=True)
    assert torch.allclose(cap.logprobs(roll).detach(), roll.context.sampler_logprobs, atol=1e-5)
    vision = {n: p.detach().clone() for n, p in cap.model.named_parameters() if n not in trainable}
    sgd_step(cap, roll, lr=0.5)
    assert all(torch.equal(p, vision[n]) for n, p in cap.model.named_parameters() if n in vision)
    after = cap.logprobs(roll).detach()
    assert not torch.allclose(after, ref_before, atol=1e-4)
    assert torch.allclose(cap.logprobs(roll, reference=True), ref_before, atol=1e-6)
    cap.save(str(tmp_path / "full"))                      # a whole checkpoint; π_ref from `reference`
    again = HFCaptioner.load(str(tmp_path / "full"), lora=full, settings=HFSettings(device="cpu"),
                             reference=tiny_dirs("qwen2.5-vl"))
    assert torch.allclose(again.logprobs(roll).detach(), after, atol=1e-5)
    assert torch.allclose(again.logprobs(roll, reference=True), ref_before, atol=1e-6)


def test_trainer_update_on_hf_policy_with_image_tiles(tiny_dirs):
    from acrl.config import Config
    from acrl.core.update import update
    from acrl.train.learner import captioner_update_settings

    torch.manual_seed(4)   # InternVL with tiling: images of different shapes give different numbers of tiles
    settings = HFSettings(device="cpu", processor_kwargs={"crop_to_patches": True, "max_patches": 3})
    cap = HFCaptioner.load(tiny_dirs("internvl"), lora=LORA, settings=settings)
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (150, 60), "blue")]
    tiles = [cap.encode(im, "q")["pixel_values"].shape[0] for im in images]
    assert tiles[0] != tiles[1]
    roll = cap.generate(images, QUESTIONS, n=2, max_new_tokens=5)
    assert torch.allclose(cap.logprobs(roll, slice(1, 3)).detach(), roll.context.sampler_logprobs[1:3], atol=1e-5)
    cfg = Config()
    cfg.train.micro_batch = 3
    opt = torch.optim.AdamW(cap.trainable_parameters(), lr=1e-2)
    stats = update(cap, opt, roll, torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.ones(4, dtype=torch.bool),
                   captioner_update_settings(cfg))
    assert np.isfinite(stats["loss"]) and stats["grad_norm"] > 0


def test_self_test_passes_on_a_good_checkpoint_and_names_what_is_broken(tiny_dirs, monkeypatch):
    cap = HFCaptioner.load(tiny_dirs("qwen2.5-vl"), lora=LORA, settings=HFSettings(device="cpu"))
    good = cap.self_test()
    assert good["ok"] and good["tokens"] > 0 and good["max_abs"] < 1e-5 and good["lora_targets"] > 0
    before = [p.detach().clone() for p in cap.trainable_parameters()]
    # positions that ignore the M-RoPE offsets after the prefill: decode and teacher forcing disagree
    monkeypatch.setattr(Feed, "positions", lambda self, att, t, deltas=None: (
        {} if deltas is None else {"position_ids": ((att.cumsum(-1) - 1)[:, -t:])[None].expand(3, -1, -1)}))
    bad = cap.self_test()
    assert not bad["ok"] and "disagree" in bad["problem"]
    assert all(torch.equal(p, b) for p, b in zip(cap.trainable_parameters(), before))   # adapter restored
    monkeypatch.undo()
    monkeypatch.setattr(HFCaptioner, "self_test", lambda self: {"ok": False, "problem": "x disagree"})
    with pytest.raises(ValueError, match="failed its start-up self-test: x disagree"):
        HFCaptioner.load(tiny_dirs("qwen2.5-vl"), lora=LORA, settings=HFSettings(device="cpu"))


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
