"""The one sampler: captions of different lengths cut at the end token, chunked generation, the nucleus,
greedy decoding, and the KV cache given room for the caption."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from acrl.backends.hf.captioner import HFCaptioner  # noqa: E402
from acrl.backends.hf.sampler import with_room  # noqa: E402
from acrl.config import HFSettings  # noqa: E402

from .fixtures import LORA, QUESTIONS, square_images  # noqa: E402


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
    images = square_images(3, seed=3)
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


def test_shared_sampler_top_p_and_gradient_checkpointing(tiny_dirs):
    """A vanishing nucleus leaves only the arg-max token (sampling == greedy, each token of probability 1 in
    the renormalised nucleus, for the sampler and the teacher-forced pass alike); under gradient checkpointing
    the gradient pass takes the per-row path (checkpointed layers keep no cache) with the same gradients."""
    torch.manual_seed(6)
    cap = HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=LORA, settings=HFSettings(device="cpu", top_p=1e-6))
    images = square_images(2, seed=6)
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
    with_room(roomy, 2)
    storage = roomy.layers[0].keys.untyped_storage().data_ptr()
    for step in range(3):                                   # 2 fit in the room, the third does not
        for i in range(2):
            k, v = torch.randn(3, 2, 1, 4, generator=g), torch.randn(3, 2, 1, 4, generator=g)
            a, b = stock.update(k, v, i), roomy.update(k, v, i)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert roomy.get_seq_length() == stock.get_seq_length() == 6 + step
        same = roomy.layers[0].keys.untyped_storage().data_ptr() == storage
        assert same == (step < 2)
