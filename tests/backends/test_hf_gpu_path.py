"""What a first GPU run depends on, checked at CPU scale: the rank's device in worker threads, no backward through
the frozen vision tower, batching that equals the processor's for every family, one BOS, LoRA on every linear layer
of the language model only, and the start-up self-test."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("peft")

from acrl.backends import hf_tiny  # noqa: E402
from acrl.backends.hf import (  # noqa: E402
    HFCaptioner,
    HFSettings,
    _collate,
    _language_model_prefix,
    device_scope,
    resolve_device,
)
from acrl.config import LoraSettings  # noqa: E402

LORA = LoraSettings(enabled=True, r=4, alpha=8)
ALL = LoraSettings(enabled=True, r=4, alpha=8, targets="all-linear")


def _images(shapes=((64, 64), (40, 90)), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


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


# --- item 1: the rank's GPU in every thread ------------------------------------------------------------------------
def test_cuda_resolves_to_the_launchers_local_rank_in_two_processes():
    """Two processes as ``accelerate launch`` starts them (LOCAL_RANK 0 and 1): a bare ``cuda`` names each one's own
    GPU, so tensors moved there from any thread land where the model is."""
    code = "from acrl.backends.hf import resolve_device; print(resolve_device('cuda'), resolve_device('cpu'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "LOCAL_RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert outs == [["cuda:0", "cpu"], ["cuda:1", "cpu"]]
    assert resolve_device("cuda:3") == "cuda:3"
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu" and resolve_device(None) == "cpu"


class _Entered(Exception):
    """Raised by the fake ``torch.cuda.device`` on entry: which device a call selected, before any tensor work."""


class _FakeCudaDevice:
    def __init__(self, index):
        self.index = index

    def __enter__(self):
        raise _Entered(self.index)

    def __exit__(self, *exc):
        return False


def test_reasoner_and_clarifier_calls_select_their_gpu_in_a_worker_thread(tiny_llm, tiny_dirs, monkeypatch):
    """The trainer runs the episodes (reasoner, clarifier) in a worker thread, whose current CUDA device is cuda:0
    whatever the rank: every call selects its object's device first (a fake ``torch.cuda.device`` reports which)."""
    from acrl.backends.hf_reasoner import HFReasoner

    reasoner = HFReasoner(tiny_llm, max_new_tokens=4, device="cpu")
    cap = HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=LORA, settings=HFSettings(device="cpu", self_test=False))
    monkeypatch.setattr(torch.cuda, "device", _FakeCudaDevice)
    reasoner.device = cap.device = "cuda:1"     # as on rank 1
    calls = [lambda: reasoner.complete(["what is 2 + 2?"]),
             lambda: cap.answer(_images()[:1], ["what colour?"]),
             lambda: cap.generate(_images()[:1], ["what?"], n=2, max_new_tokens=2)]
    with ThreadPoolExecutor(1) as pool:
        for call in calls:
            with pytest.raises(_Entered) as hit:
                pool.submit(call).result()
            assert hit.value.args == (1,)
    with device_scope("cpu"):                   # nothing to select elsewhere
        pass


# --- item 2: no backward through the frozen vision tower -----------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2.5-vl", "internvl"])
def test_checkpointing_hooks_only_the_text_embedding(family, tiny_dirs):
    """Under gradient checkpointing only the language model's token embedding gets the input-gradient hook: the
    vision tower's output needs no gradient in the update's pass, and the LoRA layers still get theirs."""
    torch.manual_seed(0)
    cap = HFCaptioner.load(tiny_dirs(family), lora=LORA,
                           settings=HFSettings(device="cpu", gradient_checkpointing=True))
    base = cap.base_model()
    vision = base.model.visual if hasattr(base.model, "visual") else base.model.vision_tower
    seen, text = [], []
    hooks = [vision.register_forward_hook(lambda _m, _i, out: seen.append(
        (out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)).requires_grad)),
        base.get_input_embeddings().register_forward_hook(lambda _m, _i, out: text.append(out.requires_grad))]
    try:
        roll = cap.generate(_images(), ["q one", "q two"], n=2, max_new_tokens=4)
        seen.clear(), text.clear()
        (cap.logprobs(roll) * roll.mask).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    assert seen and not any(seen)               # nothing to back-propagate through the vision tower
    assert text and all(text)                   # the text embedding's output carries the gradient path
    assert all(p.grad.abs().sum() > 0 for n, p in cap.model.named_parameters() if "lora_B" in n)   # A: B = 0


# --- item 5: any family the processor batches --------------------------------------------------------------------
@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_batches_equal_the_processors_own_and_bos_appears_once(family, tiny_dirs):
    """Per-problem encodings batched by ``_collate`` equal the processor's batch of the same prompts with left
    padding (Idefics3's padded tiles and pixel mask, LLaVA-OneVision's padded patches, Qwen's patch lists), and a
    template that writes BOS does not get a second one from the processor."""
    cap = HFCaptioner.load(tiny_dirs(family), lora=LORA, settings=HFSettings(device="cpu", self_test=False))
    images = _images(((64, 64), (40, 110)))
    texts = ["a short question?", "a much longer question about the picture with many words in it?"]
    encs = [cap.encode(im, t) for im, t in zip(images, texts)]
    ours = _collate(encs, cap.pad_id)
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


@pytest.mark.parametrize("family", ["qwen3-vl", "idefics3"])
def test_lora_all_linear_covers_the_language_model_only(family, tiny_dirs):
    """The default targets are every linear layer of the language model (attention and MLP), none of the vision
    tower, the projector or the output head."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs(family))
    lm = _language_model_prefix(model)
    names = HFCaptioner.lora_target_modules(model, "all-linear")
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(names) == {n for n in linear if n.startswith(lm + ".")}
    assert {n.split(".")[-1] for n in names} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
    assert linear - set(names)                 # the vision tower / projector / head stay out
    cap = HFCaptioner(model, hf_tiny.build(family)[1], LoraSettings(enabled=True, r=2, alpha=4),
                      HFSettings(device="cpu"))
    assert cap.lora.targets == "all-linear" and cap.self_test()["lora_targets"] == len(names)


def test_self_test_passes_on_a_good_checkpoint_and_names_what_is_broken(tiny_dirs, monkeypatch):
    cap = HFCaptioner.load(tiny_dirs("qwen2.5-vl"), lora=LORA, settings=HFSettings(device="cpu"))
    good = cap.self_test()
    assert good["ok"] and good["tokens"] > 0 and good["max_abs"] < 1e-5 and good["lora_targets"] > 0
    before = [p.detach().clone() for p in cap.trainable_parameters()]
    # positions that ignore the M-RoPE offsets after the prefill: decode and teacher forcing disagree
    monkeypatch.setattr(HFCaptioner, "_positions", lambda self, att, t, deltas=None: (
        {} if deltas is None else {"position_ids": ((att.cumsum(-1) - 1)[:, -t:])[None].expand(3, -1, -1)}))
    bad = cap.self_test()
    assert not bad["ok"] and "disagree" in bad["problem"]
    assert all(torch.equal(p, b) for p, b in zip(cap.trainable_parameters(), before))   # adapter restored
    monkeypatch.undo()
    monkeypatch.setattr(HFCaptioner, "self_test", lambda self: {"ok": False, "problem": "x disagree"})
    with pytest.raises(ValueError, match="failed its start-up self-test: x disagree"):
        HFCaptioner.load(tiny_dirs("qwen2.5-vl"), lora=LORA, settings=HFSettings(device="cpu"))


# --- item 3: image features once per problem ---------------------------------------------------------------------
@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_per_row_passes_encode_each_problems_image_once(family, tiny_dirs):
    """Under gradient checkpointing every log-prob row runs prompt + caption; the frozen vision tower still runs
    once per problem of a chunk (not once per row), with the numbers and LoRA gradients of running it per row."""
    torch.manual_seed(0)
    cap = HFCaptioner.load(tiny_dirs(family), lora=LORA, settings=HFSettings(
        device="cpu", gradient_checkpointing=True, logprob_batch_size=6, self_test=False))
    with torch.no_grad():
        for p in cap.trainable_parameters():
            p.normal_(0.0, 0.2)
    roll = cap.generate(_images(((64, 64), (40, 110), (90, 50))), ["q one", "question two?", "q3"], n=3,
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
                cap._image_features_once = lambda *a: __import__("contextlib").nullcontext()
            cap.model.zero_grad()
            lp = cap.logprobs(roll)
            (lp * roll.mask).sum().backward()
            return lp.detach(), [p.grad.clone() for p in cap.trainable_parameters()], list(calls)
        finally:
            del inner.get_image_features
            cap.__dict__.pop("_image_features_once", None)

    fast, slow = run(True), run(False)
    # chunks [0, 6) (problems 0, 1) and [6, 9) (problem 2): one call per problem and a third of the pixels (or
    # less: the per-row batches also carry the padding of per-image tensors)
    assert len(fast[2]) == 3 and len(slow[2]) == 2 and 3 * sum(fast[2]) <= sum(slow[2])
    assert torch.allclose(fast[0], slow[0], atol=1e-5)
    for a, b in zip(fast[1], slow[1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max())), float((a - b).abs().max())
