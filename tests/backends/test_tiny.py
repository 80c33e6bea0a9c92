import torch

from acrl.backends.tiny import LoraSettings, TinyCaptioner, TinyVLMConfig, world_tokenizer
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
