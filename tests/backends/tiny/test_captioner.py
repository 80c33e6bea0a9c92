import pytest
import torch

from acrl.backends.tiny import TinyCaptioner, world_tokenizer
from acrl.config import LoraSettings, TinyVLMConfig
from acrl.world import make_problems

SMALL = TinyVLMConfig(d_model=32, n_heads=2, n_layers=1, cnn_width=8, max_new_tokens=10)


def _batch(n=3):
    ps = make_problems("train", n)
    return [p.image for p in ps], [p.question_with_choices() for p in ps]


def test_tokenizer_round_trip_and_unknown_words():
    tok = world_tokenizer()
    text = "a bar chart with three bars ; the red bar is 7"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("zebra")[0] == 3    # <unk>


def test_generate_shapes_and_logprobs_match_generation():
    torch.manual_seed(0)
    cap = TinyCaptioner.create(SMALL)
    images, prompts = _batch()
    roll = cap.generate(images, prompts, n=4, temperature=1.0)
    assert len(roll.texts) == 3 and all(len(g) == 4 for g in roll.texts)
    assert roll.tokens.shape == roll.mask.shape == roll.logprobs.shape and roll.tokens.shape[0] == 12
    lp = cap.logprobs(roll)
    assert torch.allclose(lp, roll.logprobs, atol=1e-4)
    part = torch.cat([cap.logprobs(roll, slice(0, 5)), cap.logprobs(roll, slice(5, 12))])
    assert torch.allclose(part, lp, atol=1e-5)
    assert torch.allclose(cap.logprobs(roll, reference=True), lp, atol=1e-5)   # before training π = π_ref


def test_greedy_is_deterministic():
    cap = TinyCaptioner.create(SMALL)
    images, prompts = _batch()
    assert cap.generate(images, prompts, greedy=True).texts == cap.generate(images, prompts, greedy=True).texts


def _one_step(cap, roll):
    opt = torch.optim.SGD(cap.trainable_parameters(), lr=1.0)
    (-(cap.logprobs(roll) * roll.mask).sum()).backward()
    opt.step()


def test_full_finetune_keeps_a_frozen_reference():
    torch.manual_seed(0)
    cap = TinyCaptioner.create(SMALL)
    images, prompts = _batch()
    roll = cap.generate(images, prompts, n=2)
    ref_before = cap.logprobs(roll, reference=True)
    _one_step(cap, roll)
    assert not torch.allclose(cap.logprobs(roll).detach(), ref_before, atol=1e-4)
    assert torch.allclose(cap.logprobs(roll, reference=True), ref_before, atol=1e-6)


def test_lora_trains_only_adapter_and_reference_is_the_disabled_adapter(tmp_path):
    torch.manual_seed(0)
    base = TinyCaptioner.create(SMALL)
    base.save(tmp_path / "base")
    cap = TinyCaptioner.load(str(tmp_path / "base"), lora=LoraSettings(enabled=True, r=4, alpha=8))
    names = [n for n, p in cap.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    frozen = {n: p.detach().clone() for n, p in cap.model.named_parameters() if not p.requires_grad}
    images, prompts = _batch()
    roll = cap.generate(images, prompts, n=2)
    ref_before = cap.logprobs(roll, reference=True)
    for _ in range(2):   # lora_B starts at 0: the first step moves B, the second makes the adapter matter
        _one_step(cap, roll)
    for n, p in cap.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    after = cap.logprobs(roll).detach()
    assert not torch.allclose(after, ref_before, atol=1e-4)
    assert torch.allclose(cap.logprobs(roll, reference=True), ref_before, atol=1e-6)
    # save -> load round trip: adapter and base come back
    cap.save(str(tmp_path / "run"))
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    again = TinyCaptioner.load(str(tmp_path / "run"), lora=LoraSettings(enabled=True, r=4, alpha=8))
    assert torch.allclose(again.logprobs(roll).detach(), after, atol=1e-5)
    assert torch.allclose(again.logprobs(roll, reference=True), ref_before, atol=1e-5)


def test_reference_answers_use_the_answer_mode():
    cap = TinyCaptioner.create(SMALL)
    images, _ = _batch(2)
    out = cap.answer(images, ["what is the height of the red bar ?"] * 2)
    assert len(out) == 2 and all(isinstance(a, str) for a in out)
    assert cap.answer([], []) == []


def _trained_lora_checkpoint(tmp_path):
    """A tiny LoRA run's checkpoint (``run/``, adapter trained two steps on top of ``base/``) and a rollout."""
    torch.manual_seed(0)
    TinyCaptioner.create(SMALL).save(tmp_path / "base")
    cap = TinyCaptioner.load(str(tmp_path / "base"), lora=LoraSettings(enabled=True, r=4, alpha=8))
    images, prompts = _batch()
    roll = cap.generate(images, prompts, n=2)
    for _ in range(2):
        _one_step(cap, roll)
    cap.save(str(tmp_path / "run"))
    return cap, roll, cap.logprobs(roll).detach(), cap.logprobs(roll, reference=True)


def test_a_lora_checkpoint_with_lora_off_loads_its_adapter(tmp_path):
    """Evaluating a tiny LoRA run with ``lora.enabled: false`` must report the trained model, not the base."""
    _, roll, trained, base = _trained_lora_checkpoint(tmp_path)
    assert not torch.allclose(trained, base, atol=1e-4)
    plain = TinyCaptioner.load(str(tmp_path / "run"))                  # LoRA off: the adapter merged
    assert not plain.lora.enabled and not any("lora_" in n for n, _ in plain.model.named_parameters())
    assert torch.allclose(plain.logprobs(roll).detach(), trained, atol=1e-5)
    (tmp_path / "run" / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        TinyCaptioner.load(str(tmp_path / "run"))


def test_training_from_an_adapter_uses_it_as_the_reference(tmp_path):
    """Starting from a LoRA checkpoint (reference = the same checkpoint): π_ref and the clarifier are that checkpoint,
    a new adapter trains on top; resuming the new run (reference = where it started) keeps that π_ref."""
    _, roll, trained, _ = _trained_lora_checkpoint(tmp_path)
    lora = LoraSettings(enabled=True, r=4, alpha=8)
    start = str(tmp_path / "run")
    cap = TinyCaptioner.load(start, lora=lora, reference=start)
    assert torch.allclose(cap.logprobs(roll, reference=True), trained, atol=1e-5)   # π_ref = the checkpoint
    assert torch.allclose(cap.logprobs(roll).detach(), trained, atol=1e-5)          # new adapter starts at 0
    images, _ = _batch()
    questions = ["what is the height of the red bar ?"] * 3
    plain = TinyCaptioner.load(start)
    assert cap.answer(images, questions) == plain.answer(images, questions)        # the clarifier, too
    for _ in range(2):
        _one_step(cap, roll)
    assert not torch.allclose(cap.logprobs(roll).detach(), trained, atol=1e-4)
    cap.save(str(tmp_path / "run2"))
    resumed = TinyCaptioner.load(str(tmp_path / "run2"), lora=lora, reference=start)
    assert resumed.ref_model is None                                                  # shared: no second copy
    assert torch.allclose(resumed.logprobs(roll, reference=True), trained, atol=1e-5)
    other = TinyCaptioner.load(str(tmp_path / "run2"), lora=lora, reference=str(tmp_path / "base"))
    assert other.ref_model is not None                                                # another π_ref: honoured
    assert not torch.allclose(other.logprobs(roll, reference=True), trained, atol=1e-4)


def test_rollouts_have_the_width_of_the_generation_cap():
    torch.manual_seed(0)
    cap = TinyCaptioner.create(SMALL)
    images, prompts = _batch()
    for max_new in (4, 10):
        roll = cap.generate(images, prompts, n=2, max_new_tokens=max_new)
        assert roll.tokens.shape[1] == max_new
        assert torch.allclose(cap.logprobs(roll).detach(), roll.logprobs, atol=1e-4)
