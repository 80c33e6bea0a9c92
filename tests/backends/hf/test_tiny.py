"""Random Qwen-VL checkpoints of other sizes (acrl.backends.hf.tiny.build with text / vision dims and an image
size): the config carries the dimensions, M-RoPE splits the head, the processor gives (image_size / 28)^2 image
tokens for a square image (the world's), and the model runs a forward; bad dimensions are refused by name."""

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from acrl.backends.hf import tiny  # noqa: E402


def test_mrope_section_splits_half_the_head():
    assert tiny.mrope_section(16) == [2, 3, 3]          # the tiny checkpoints
    assert tiny.mrope_section(128) == [16, 24, 24]      # Qwen2-VL-2B / Qwen2.5-VL-3B
    assert sum(tiny.mrope_section(64)) == 32


def test_larger_qwen2_vl_dims_image_tokens_and_forward():
    text = {"hidden": 128, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 320}
    model, proc = tiny.build("qwen2-vl", image_size=112, text=text, vision={"depth": 1, "embed_dim": 48})
    tc = model.config.text_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads,
            tc.intermediate_size) == (128, 1, 2, 1, 320)
    assert tc.rope_parameters["mrope_section"] == [8, 12, 12]
    assert model.config.vision_config.embed_dim == 48 and model.config.vision_config.hidden_size == 128
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how tall is the bar ?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = proc(text=[prompt], images=[Image.new("RGB", (64, 64), (200, 10, 10))], return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == (112 // 28) ** 2
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], tc.vocab_size) and torch.isfinite(logits).all()
    small, _ = tiny.build("qwen2-vl")
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in small.parameters())


def test_bad_dims_are_refused_by_name():
    with pytest.raises(ValueError, match="layerz"):
        tiny.build("qwen2-vl", text={"layerz": 2})
    with pytest.raises(ValueError, match="image_size"):
        tiny.build("qwen2-vl", image_size=100)
    with pytest.raises(ValueError, match="llava"):
        tiny.build("llava", image_size=112)
