"""Loading: the rank's device in every thread, gradient checkpointing that skips the frozen vision tower, LoRA on
every linear layer of the language model only (no dropout), settings, and errors for missing checkpoints."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("peft")

from acrl.backends.hf import tiny  # noqa: E402
from acrl.backends.hf.captioner import HFCaptioner  # noqa: E402
from acrl.backends.hf.loading import (  # noqa: E402
    device_scope,
    language_model_prefix,
    lora_target_modules,
    resolve_device,
)
from acrl.config import HFSettings, LoraSettings  # noqa: E402

from .fixtures import LORA, paper_config, shaped_images  # noqa: E402


def test_cuda_resolves_to_the_launchers_local_rank_in_two_processes():
    """Two processes as ``accelerate launch`` starts them (LOCAL_RANK 0 and 1): a bare ``cuda`` names each one's own
    GPU, so tensors moved there from any thread land where the model is."""
    code = "from acrl.backends.hf.loading import resolve_device; print(resolve_device('cuda'), resolve_device('cpu'))"
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
    from acrl.backends.hf.reasoner import HFReasoner

    reasoner = HFReasoner(tiny_llm, max_new_tokens=4, device="cpu")
    cap = HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=LORA, settings=HFSettings(device="cpu", self_test=False))
    monkeypatch.setattr(torch.cuda, "device", _FakeCudaDevice)
    reasoner.device = cap.feed.device = "cuda:1"     # as on rank 1
    calls = [lambda: reasoner.complete(["what is 2 + 2?"]),
             lambda: cap.answer(shaped_images()[:1], ["what colour?"]),
             lambda: cap.generate(shaped_images()[:1], ["what?"], n=2, max_new_tokens=2)]
    with ThreadPoolExecutor(1) as pool:
        for call in calls:
            with pytest.raises(_Entered) as hit:
                pool.submit(call).result()
            assert hit.value.args == (1,)
    with device_scope("cpu"):                   # nothing to select elsewhere
        pass


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
        roll = cap.generate(shaped_images(), ["q one", "q two"], n=2, max_new_tokens=4)
        seen.clear(), text.clear()
        (cap.logprobs(roll) * roll.mask).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    assert seen and not any(seen)               # nothing to back-propagate through the vision tower
    assert text and all(text)                   # the text embedding's output carries the gradient path
    assert all(p.grad.abs().sum() > 0 for n, p in cap.model.named_parameters() if "lora_B" in n)   # A: B = 0


@pytest.mark.parametrize("family", ["qwen3-vl", "idefics3"])
def test_lora_all_linear_covers_the_language_model_only(family, tiny_dirs):
    """The default targets are every linear layer of the language model (attention and MLP), none of the vision
    tower, the projector or the output head."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs(family))
    lm = language_model_prefix(model)
    names = lora_target_modules(model, "all-linear")
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(names) == {n for n in linear if n.startswith(lm + ".")}
    assert {n.split(".")[-1] for n in names} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
    assert linear - set(names)                 # the vision tower / projector / head stay out
    cap = HFCaptioner(model, tiny.build(family)[1], LoraSettings(enabled=True, r=2, alpha=4),
                      HFSettings(device="cpu"))
    assert cap.lora.targets == "all-linear" and cap.self_test()["lora_targets"] == len(names)


def test_settings_targets_images_and_errors(tiny_dirs, monkeypatch):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs("qwen2-vl"))
    names = lora_target_modules(model, r".*\.(q_proj|v_proj)")
    assert names and all(n.startswith("model.language_model.") for n in names)
    with pytest.raises(ValueError, match="matches no linear layer"):
        lora_target_modules(model, r".*\.nothing_here")
    assert len(lora_target_modules(model, r".*\.(qkv|proj|q_proj)", freeze_vision=False)) > len(
        lora_target_modules(model, r".*\.(qkv|proj|q_proj)"))

    class Cfg:   # the captioner section of a config: unknown attributes are ignored
        dtype, max_pixels, top_p, backend = "fp32", 1000, 0.9, "hf"

    s = HFSettings.from_config(Cfg)
    assert (s.dtype, s.max_pixels, s.top_p, s.device) == ("fp32", 1000, 0.9, "auto")
    cap = HFCaptioner(model, tiny.build("qwen2-vl")[1], LORA, HFSettings(device="cpu", max_pixels=40 * 40))
    big = cap._fit(Image.new("RGB", (120, 80)))
    assert big.width * big.height <= 40 * 40 and abs(big.width / big.height - 1.5) < 0.1

    with pytest.raises(FileNotFoundError):
        HFCaptioner.load("/nonexistent/dir/captioner")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="acrl-test/no-such-model"):
        HFCaptioner.load("acrl-test/no-such-model")


def test_paper_configs_use_no_lora_dropout_and_a_new_adapter_refuses_it(tiny_dirs):
    for name in ("qwen2.5-vl-3b.yaml", "internvl-2b.yaml"):
        assert paper_config("internvl" if "internvl" in name else "qwen").captioner.lora.dropout == 0
    with pytest.raises(ValueError, match="lora.dropout=0.05"):
        HFCaptioner.load(tiny_dirs("qwen2-vl"), lora=LoraSettings(enabled=True, r=4, alpha=8, dropout=0.05),
                         settings=HFSettings(device="cpu"))
