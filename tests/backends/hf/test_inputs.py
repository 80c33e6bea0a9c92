"""What the model is fed: per-problem encodings batched as the processor batches them (every family, one BOS),
and the frozen vision tower run once per problem in a per-row pass."""

import contextlib

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from acrl.backends.hf import logprobs as hf_logprobs  # noqa: E402
from acrl.backends.hf import tiny  # noqa: E402
from acrl.backends.hf.captioner import HFCaptioner  # noqa: E402
from acrl.backends.hf.inputs import collate  # noqa: E402
from acrl.config import HFSettings  # noqa: E402

from .fixtures import LORA, shaped_images  # noqa: E402


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_batches_equal_the_processors_own_and_bos_appears_once(family, tiny_dirs):
    """Per-problem encodings batched by ``collate`` equal the processor's batch of the same prompts with left
    padding (Idefics3's padded tiles and pixel mask, LLaVA-OneVision's padded patches, Qwen's patch lists), and a
    template that writes BOS does not get a second one from the processor."""
    cap = HFCaptioner.load(tiny_dirs(family), lora=LORA, settings=HFSettings(device="cpu", self_test=False))
    images = shaped_images(((64, 64), (40, 110)))
    texts = ["a short question?", "a much longer question about the picture with many words in it?"]
    encs = [cap.encode(im, t) for im, t in zip(images, texts)]
    ours = collate(encs, cap.pad_id)
    proc = cap.processor
    prompts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                          "text": t}]}],
                                        add_generation_prompt=True, tokenize=False) for t in texts]
    want = proc(text=prompts, images=[[cap._fit(im)] for im in images], padding=True, padding_side="left",
                add_special_tokens=False, return_tensors="pt")
    want = {k: v for k, v in want.items() if isinstance(v, torch.Tensor)}
    assert set(ours) == set(want), (set(ours) ^ set(want))
    for k in want:
        assert ours[k].shape == want[k].shape and torch.equal(ours[k].to(want[k].dtype), want[k]), k
    bos = cap.tokenizer.bos_token_id
    if family == "gemma3":
        plain = proc(text=prompts[:1], images=[[images[0]]], return_tensors="pt")["input_ids"][0]
        assert bos is not None and plain.tolist().count(bos) == 2     # what the processor alone would give
    if bos is not None:
        assert [e["input_ids"][0].tolist().count(bos) for e in encs] == [1, 1]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_per_row_passes_encode_each_problems_image_once(family, tiny_dirs, monkeypatch):
    """Under gradient checkpointing every log-prob row runs prompt + caption; the frozen vision tower still runs
    once per problem of a chunk (not once per row), with the numbers and LoRA gradients of running it per row."""
    torch.manual_seed(0)
    cap = HFCaptioner.load(tiny_dirs(family), lora=LORA, settings=HFSettings(
        device="cpu", gradient_checkpointing=True, logprob_batch_size=6, self_test=False))
    with torch.no_grad():
        for p in cap.trainable_parameters():
            p.normal_(0.0, 0.2)
    roll = cap.generate(shaped_images(((64, 64), (40, 110), (90, 50))), ["q one", "question two?", "q3"], n=3,
                        max_new_tokens=4)
    inner = cap.base_model().model
    calls = []
    original = inner.get_image_features

    def spy(*a, **k):                              # pixels encoded per call
        calls.append((a[0] if a else k["pixel_values"]).numel())
        return original(*a, **k)

    def run(once: bool):
        calls.clear()
        inner.get_image_features = spy
        try:
            if not once:
                monkeypatch.setattr(hf_logprobs, "image_features_once", lambda *a: contextlib.nullcontext())
            cap.model.zero_grad()
            lp = cap.logprobs(roll)
            (lp * roll.mask).sum().backward()
            return lp.detach(), [p.grad.clone() for p in cap.trainable_parameters()], list(calls)
        finally:
            del inner.get_image_features
            monkeypatch.undo()

    fast, slow = run(True), run(False)
    # chunks [0, 6) (problems 0, 1) and [6, 9) (problem 2): one call per problem and a third of the pixels (or
    # less: the per-row batches also carry the padding of per-image tensors)
    assert len(fast[2]) == 3 and len(slow[2]) == 2 and 3 * sum(fast[2]) <= sum(slow[2])
    assert torch.allclose(fast[0], slow[0], atol=1e-5)
    for a, b in zip(fast[1], slow[1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max())), float((a - b).abs().max())
