"""HFCaptioner on tiny random checkpoints of each supported family, built locally (no downloads)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("peft")

from acrl.backends import hf_tiny
from acrl.backends.hf import HFCaptioner, HFSettings, _language_model_prefix, _with_room, export_merged
from acrl.config import LoraSettings

LORA = LoraSettings(enabled=True, r=4, alpha=8)
QUESTIONS = ["What is the height of the red bar?", "How many circles are there?"]


def _images(k=2, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(k)]


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


def _sgd_step(cap, roll, lr=1.0):
    opt = torch.optim.SGD(cap.trainable_parameters(), lr=lr)
    opt.zero_grad()
    (-(cap.logprobs(roll) * roll.mask).sum()).backward()
    opt.step()


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_family_generate_logprobs_lora_step_save_load(family, tiny_dirs, tmp_path):
    torch.manual_seed(0)
    cap = HFCaptioner.load(tiny_dirs(family), lora=LORA, settings=HFSettings(device="cpu"))
    images = _images()
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
    prefix = "base_model.model." + _language_model_prefix(cap.base_model()) + "."
    assert all(n.startswith(prefix) for n in names)      # no adapter on the vision tower or the projector
    frozen = {n: p.detach().clone() for n, p in cap.model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in cap.model.named_parameters() if p.requires_grad}
    _sgd_step(cap, roll)
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


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_loads_the_saved_adapter_and_export_merges(tiny_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(1)
    base = tiny_dirs("qwen2-vl")
    cap = HFCaptioner.load(base, lora=LORA, settings=HFSettings(device="cpu", gradient_checkpointing=True))
    roll = cap.generate(_images(), QUESTIONS, n=2, max_new_tokens=5)
    _sgd_step(cap, roll)                                  # LoRA under gradient checkpointing gets gradients
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


def test_variable_length_captions_greedy_and_chunked_batches(tiny_dirs):
    """End tokens made likely (a hook on the head) -> captions of different lengths; chunked generation and
    log-prob batches give the same numbers (top-p filters sampling only); greedy is deterministic."""
    torch.manual_seed(2)
    settings = HFSettings(device="cpu", generation_batch_size=3, logprob_batch_size=3, top_p=0.8)
    cap = HFCaptioner.load(tiny_dirs("llava"), lora=LORA, settings=settings)
    eos = cap.eos_ids[0]

    def boost(_m, _i, out):
        out = out.clone()
        out[..., eos] += 4.0
        return out

    cap.base_model().get_output_embeddings().register_forward_hook(boost)
    gc = cap.base_model().generation_config   # checkpoint sampling defaults (as Qwen2.5-VL's) are ignored
    gc.top_k, gc.top_p, gc.temperature, gc.repetition_penalty, gc.min_p = 1, 0.001, 0.1, 1.5, 0.9
    images = _images(3, seed=3)
    roll = cap.generate(images, QUESTIONS + ["Which shape is largest?"], n=3, max_new_tokens=8)
    lengths = roll.mask.sum(1)
    assert lengths.min() < lengths.max()
    assert any(len(set(g)) > 1 for g in roll.texts)                   # sampled, not greedy
    for row, m in zip(roll.tokens, roll.mask):
        k = int(m.sum())
        assert (m[:k] == 1).all() and (m[k:] == 0).all()
        if k < roll.tokens.shape[1]:
            assert row[k - 1] == eos and (row[k:] == cap.pad_id).all()
    assert torch.allclose(cap.logprobs(roll).detach(), roll.context.sampler_logprobs, atol=1e-5)   # the nucleus
    g1 = cap.generate(images, QUESTIONS + ["x"], greedy=True, max_new_tokens=5)
    g2 = cap.generate(images, QUESTIONS + ["x"], greedy=True, max_new_tokens=5)
    assert g1.texts == g2.texts and g1.temperature == 1.0
    assert torch.allclose(cap.logprobs(g1).detach(), g1.logprobs, atol=1e-5)   # greedy: the sampler's, no top-p


def test_full_finetune_keeps_frozen_reference_and_vision(tiny_dirs, tmp_path):
    torch.manual_seed(3)
    full = LoraSettings(enabled=False)
    cap = HFCaptioner.load(tiny_dirs("qwen2.5-vl"), lora=full,
                           settings=HFSettings(device="cpu", gradient_checkpointing=True))
    assert cap.ref_model is not None
    trainable = {n for n, p in cap.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.language_model.", "lm_head")) for n in trainable)
    roll = cap.generate(_images(), QUESTIONS, n=2, temperature=0.7, max_new_tokens=5)
    ref_before = cap.logprobs(roll, reference=True)
    assert torch.allclose(cap.logprobs(roll).detach(), roll.context.sampler_logprobs, atol=1e-5)
    vision = {n: p.detach().clone() for n, p in cap.model.named_parameters() if n not in trainable}
    _sgd_step(cap, roll, lr=0.5)
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


def test_settings_targets_images_and_errors(tiny_dirs, monkeypatch):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs("qwen2-vl"))
    names = HFCaptioner.lora_target_modules(model, r".*\.(q_proj|v_proj)")
    assert names and all(n.startswith("model.language_model.") for n in names)
    with pytest.raises(ValueError, match="matches no linear layer"):
        HFCaptioner.lora_target_modules(model, r".*\.nothing_here")
    assert len(HFCaptioner.lora_target_modules(model, r".*\.(qkv|proj|q_proj)", freeze_vision=False)) > len(
        HFCaptioner.lora_target_modules(model, r".*\.(qkv|proj|q_proj)"))

    class Cfg:   # the captioner section of a config: unknown attributes are ignored
        dtype, max_pixels, top_p, backend = "fp32", 1000, 0.9, "hf"

    s = HFSettings.from_config(Cfg)
    assert (s.dtype, s.max_pixels, s.top_p, s.device) == ("fp32", 1000, 0.9, "auto")
    cap = HFCaptioner(model, hf_tiny.build("qwen2-vl")[1], LORA, HFSettings(device="cpu", max_pixels=40 * 40))
    big = cap._fit(Image.new("RGB", (120, 80)))
    assert big.width * big.height <= 40 * 40 and abs(big.width / big.height - 1.5) < 0.1

    with pytest.raises(FileNotFoundError):
        HFCaptioner.load("/nonexistent/dir/captioner")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="acrl-test/no-such-model"):
        HFCaptioner.load("acrl-test/no-such-model")


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
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


def test_shared_sampler_top_p_and_gradient_checkpointing(tiny_dirs):
    """A vanishing nucleus leaves only the arg-max token (sampling == greedy, each token of probability 1 in
    the renormalised nucleus, for the sampler and the teacher-forced pass alike); under gradient checkpointing
    the gradient pass takes the per-row path (checkpointed layers keep no cache) with the same gradients."""
    torch.manual_seed(6)
    cap = HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=LORA, settings=HFSettings(device="cpu", top_p=1e-6))
    images = _images(2, seed=6)
    sampled = cap.generate(images, QUESTIONS, n=3, max_new_tokens=6)
    greedy = cap.generate(images, QUESTIONS, greedy=True, max_new_tokens=6)
    assert all(g == [t] * 3 for g, t in zip(sampled.texts, [g[0] for g in greedy.texts]))
    assert sampled.mask.sum() > 0 and torch.equal(sampled.logprobs, torch.zeros_like(sampled.logprobs))
    assert torch.equal(sampled.context.sampler_logprobs, sampled.logprobs)

    with torch.no_grad():
        for p in cap.trainable_parameters():
            p.normal_(0.0, 0.2)
    ckpt = HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=LORA,
                            settings=HFSettings(device="cpu", gradient_checkpointing=True))
    with torch.no_grad():
        for p, q in zip(ckpt.trainable_parameters(), cap.trainable_parameters()):
            p.copy_(q)
    grads = []
    for c in (cap, ckpt):
        c.model.zero_grad()
        (c.logprobs(sampled) * sampled.mask).sum().backward()
        grads.append([p.grad.clone() for p in c.trainable_parameters()])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*grads))
    assert all(g.abs().sum() > 0 for g in grads[1])


def test_cache_with_room_gives_the_stock_cache_values_without_concatenating():
    """_with_room: decode-step updates land in a preallocated buffer (the returned keys are views of one storage)
    and equal the stock DynamicCache's concatenation, also past the room (then it concatenates)."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)) for _ in range(2)]
    stock, roomy = DynamicCache(), DynamicCache()
    for i, (k, v) in enumerate(kv):
        stock.update(k, v, i)
        roomy.update(k.clone(), v.clone(), i)
    _with_room(roomy, 2)
    storage = roomy.layers[0].keys.untyped_storage().data_ptr()
    for step in range(3):                                   # 2 fit in the room, the third does not
        for i in range(2):
            k, v = torch.randn(3, 2, 1, 4, generator=g), torch.randn(3, 2, 1, 4, generator=g)
            a, b = stock.update(k, v, i), roomy.update(k, v, i)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert roomy.get_seq_length() == stock.get_seq_length() == 6 + step
        same = roomy.layers[0].keys.untyped_storage().data_ptr() == storage
        assert same == (step < 2)
