"""Tiny random Hugging Face vision-language checkpoints, built locally (no downloads), one per family.

``make_tiny(family, out_dir, seed)`` trains a 400-token byte-level BPE tokenizer on a small synthetic corpus
(the project's prompts plus embedded-world questions and captions), builds the family's processor and a
randomly initialised model of 0.14-0.22M parameters, and writes both with ``save_pretrained``. The directory
loads like a hub checkpoint: ``HFCaptioner.load(out_dir)`` (see :mod:`acrl.backends.hf.captioner`).

Families (``FAMILIES``): ``qwen2-vl``, ``qwen2.5-vl``, ``qwen3-vl`` (M-RoPE, deep-stack features), ``internvl``
(the transformers-native InternVL), ``gemma3`` (bidirectional attention over image tokens, sliding-window layers,
a template and tokenizer that both emit BOS), ``idefics3`` (the SmolVLM architecture: images split into padded
5-D tiles with a ``pixel_attention_mask``), ``llava`` (SigLIP vision tower + Llama) and ``llava-onevision``
(any-resolution patches, padded per image). Every processor resizes images to a few tokens (Qwen2/2.5: 2x2
merged patches of 14 px = 4 image tokens at 56x56; InternVL: 4 tokens; Llava: 16; Gemma 3: 4 pooled tokens).

Without torchvision, the Qwen-VL and InternVL processors can't build their video processors; the processor is
then built through :func:`acrl.backends.hf.loading.no_video_processor_class`, a subclass that drops the video
processor and keeps the original class name, so the saved files are the standard ones.
"""

from __future__ import annotations

import functools
import json
import os
import random
from typing import Any

from acrl.backends.hf.loading import no_video_processor_class
from acrl.rollout.prompts import captioner_prompt, clarify_prompt
from acrl.world import language

IMAGE_SIZE = 56
VOCAB_SIZE = 400

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>",
            "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",   # Qwen-VL
            "<img>", "</img>", "<IMG_CONTEXT>", "<video>",                              # InternVL
            "<image>",                                                                  # Llava, Idefics3
            "<bos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",       # Gemma 3
            "<fake_token_around_image>", "<global-img>"]                                # Idefics3
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]           # Idefics3 tile markers

_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_INTERNVL_TEMPLATE = _QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n")
_LLAVA_TEMPLATE = _QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\n")
_GEMMA_TEMPLATE = "{{ bos_token }}" + _QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>",
                                                             "<start_of_image>")
_IDEFICS_TEMPLATE = _QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")


def _corpus() -> list[str]:
    """Prompts, questions, captions and clarifications of the embedded world (a few hundred lines)."""
    lines = [captioner_prompt("x"), clarify_prompt("x")]
    try:   # the world's wording helps but is not essential to a tokenizer

        lines += [t.text for t in language.TEMPLATES]
        lines += [str(v) for v in language.BASE_PHRASES.values()]
        for sent, q, _, _ in language.FACT_KINDS.values():
            for s in ("red", "green", "blue", "purple", "orange", "base", "height", "wide", "tall"):
                lines += [sent.format(s=s, v=random.Random(s).randint(1, 20)), q.format(s=s)]
    except (ImportError, AttributeError, KeyError, ValueError, IndexError):
        lines += ["the red bar is 7", "how tall is the blue bar ?"]
    lines += ["the red bar is 7 ; the blue bar is 12 ; the green bar is 3 .",
              "a right triangle with base 6 and height 8 . SOLVED \\boxed{24}",
              "there are 3 red circles , 2 blue squares and 1 green triangle ."]
    lines += [f"{a} plus {b} is {a + b}" for a in range(20) for b in range(0, 20, 3)]
    return lines


@functools.lru_cache(maxsize=4)
def _tokenizer_json(seed: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    lines = _corpus()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((lines[rng.randrange(len(lines))] for _ in range(4 * len(lines))), trainer)
    return tok.to_str()


def build_tokenizer(family: str, seed: int = 0):
    """A fast tokenizer with the family's special tokens and chat template. Gemma 3's adds BOS when it encodes
    (as the released one) and its template writes BOS as well."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    extra: dict = {}
    template = _QWEN_TEMPLATE
    raw = Tokenizer.from_str(_tokenizer_json(seed))
    if family == "gemma3":
        template = _GEMMA_TEMPLATE
        bos = raw.token_to_id("<bos>")
        raw.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", bos)])
        extra = {"bos_token": "<bos>", "extra_special_tokens": {
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}}
    elif family == "idefics3":
        template = _IDEFICS_TEMPLATE
    elif family == "internvl":
        template = _INTERNVL_TEMPLATE
        extra = {"extra_special_tokens": {"start_image_token": "<img>", "end_image_token": "</img>",
                                          "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}}
    elif family in ("llava", "llava-onevision"):
        template = _LLAVA_TEMPLATE
        extra = {"extra_special_tokens": {"image_token": "<image>"}}
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<pad>", **extra)
    if family == "idefics3":
        fast.add_special_tokens({"additional_special_tokens": ROW_COL})
    fast.chat_template = template
    return fast


def unavailable(family: str) -> str:
    """Why ``family`` cannot be built with the installed transformers ('' when it can): e.g. transformers 5.17's
    Idefics3 image processor needs torchvision even in its PIL variant."""
    if family == "idefics3":
        import transformers

        try:
            transformers.Idefics3ImageProcessorPil()
        except ImportError as e:
            return f"idefics3's image processor cannot be built with transformers {transformers.__version__}: " \
                   f"{str(e).strip().splitlines()[0]}"
    return ""


def _text_config(tok, hidden=64, layers=2, heads=4, kv_heads=2, vocab_size=0, intermediate_size=0, **kw) -> dict:
    ids = tok.convert_tokens_to_ids
    return {"vocab_size": max(vocab_size, len(tok)), "hidden_size": hidden,
            "intermediate_size": intermediate_size or 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": 1024, "bos_token_id": None, "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<pad>"), **kw}


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's M-RoPE split of ``head_dim / 2`` rotary pairs into (temporal, height, width): 1/4, 3/8, 3/8
    (the released [16, 24, 24] of head_dim 128; [2, 3, 3] of the tiny head_dim 16)."""
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


# --- one builder per family: (tokenizer, vocab_size[, dimensions]) -> (model, processor) ---------------------
def _qwen2_parts(tok, vocab_size: int, image_size: int, text: dict) -> tuple[dict, Any, dict, int]:
    """What Qwen2-VL and Qwen2.5-VL share: (text config, image processor, token ids, text hidden size)."""
    from transformers import Qwen2VLImageProcessorPil

    ids = tok.convert_tokens_to_ids
    dims = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, **text}
    if "intermediate" in dims:
        dims["intermediate_size"] = dims.pop("intermediate")
    hidden = dims["hidden"]
    # mrope_section sums to head_dim / 2 (head_dim 16 for the default: [2, 3, 3])
    text_cfg = _text_config(tok, vocab_size=vocab_size, **dims, rope_parameters={
        "rope_type": "default", "mrope_section": mrope_section(hidden // dims["heads"]), "rope_theta": 1e4})
    ip = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                  min_pixels=image_size * image_size, max_pixels=image_size * image_size)
    common = {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
              "vision_start_token_id": ids("<|vision_start|>"),
              "vision_end_token_id": ids("<|vision_end|>"), "tie_word_embeddings": True}
    return text_cfg, ip, common, hidden


def _qwen2_vl(tok, vocab_size: int, image_size: int, text: dict, vision: dict | None):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    text_cfg, ip, common, hidden = _qwen2_parts(tok, vocab_size, image_size, text)
    vision = {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, **(vision or {}), "hidden_size": hidden}
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text_cfg, vision_config=vision, **common))
    return model, no_video_processor_class(Qwen2VLProcessor)(image_processor=ip, tokenizer=tok,
                                                             chat_template=tok.chat_template)


def _qwen2_5_vl(tok, vocab_size: int, image_size: int, text: dict, vision: dict | None):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    text_cfg, ip, common, hidden = _qwen2_parts(tok, vocab_size, image_size, text)
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
              "fullatt_block_indexes": [1], **(vision or {}), "out_hidden_size": hidden}
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text_cfg, vision_config=vision,
                                                                **common))
    return model, no_video_processor_class(Qwen2_5_VLProcessor)(image_processor=ip, tokenizer=tok,
                                                                chat_template=tok.chat_template)


def _internvl(tok, vocab_size: int):
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )

    ids = tok.convert_tokens_to_ids
    ip = GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=False,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    seq = (IMAGE_SIZE // 14) ** 2 // 4
    cfg = InternVLConfig(
        text_config={"model_type": "qwen2", **_text_config(tok, vocab_size=vocab_size)},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 64, "image_size": IMAGE_SIZE, "patch_size": 14},
        image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=seq, downsample_ratio=0.5,
        tie_word_embeddings=True)
    model = InternVLForConditionalGeneration(cfg)
    return model, no_video_processor_class(InternVLProcessor)(
        image_processor=ip, tokenizer=tok, image_seq_length=seq, chat_template=tok.chat_template)


def _qwen3_vl(tok, vocab_size: int):
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )

    ids = tok.convert_tokens_to_ids
    # 16-px patches merged 2x2: a 64x64 image is 4 tokens; deep-stack features from vision layer 0
    text_cfg = _text_config(tok, vocab_size=vocab_size, head_dim=16, rope_parameters={
        "rope_type": "default", "mrope_section": mrope_section(16), "mrope_interleaved": True,
        "rope_theta": 1e4})
    vis = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
           "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64,
           "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}
    cfg = Qwen3VLConfig(text_config=text_cfg, vision_config=vis, image_token_id=ids("<|image_pad|>"),
                        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                        vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True)
    model = Qwen3VLForConditionalGeneration(cfg)
    ip = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=64 * 64,
                                  max_pixels=64 * 64)
    return model, no_video_processor_class(Qwen3VLProcessor)(image_processor=ip, tokenizer=tok,
                                                             chat_template=tok.chat_template)


def _gemma3(tok, vocab_size: int):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    ids = tok.convert_tokens_to_ids
    text_cfg = _text_config(tok, vocab_size=vocab_size, head_dim=16, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
    text_cfg["bos_token_id"] = ids("<bos>")
    cfg = Gemma3Config(text_config=text_cfg, vision_config={
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "image_size": IMAGE_SIZE, "patch_size": 14}, mm_tokens_per_image=4,
        boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"), tie_word_embeddings=True)
    model = Gemma3ForConditionalGeneration(cfg)
    ip = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return model, Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4,
                                  chat_template=tok.chat_template)


def _idefics3(tok, vocab_size: int):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    # images up to 112 px split into 56-px tiles (+ a global one): 1 to 5 tiles of 4 tokens each
    cfg = Idefics3Config(text_config={"model_type": "llama", **_text_config(tok, vocab_size=vocab_size)},
                         vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 14},
                         scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         tie_word_embeddings=True)
    model = Idefics3ForConditionalGeneration(cfg)
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 2 * IMAGE_SIZE},
                                   max_image_size={"longest_edge": IMAGE_SIZE})
    return model, Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                                    chat_template=tok.chat_template)


def _llava_onevision(tok, vocab_size: int):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    ids = tok.convert_tokens_to_ids
    # any-resolution: a 28-px base view plus 28-px patches of the best grid (up to 2x2), 4 tokens each
    grid = [[28, 28], [28, 56], [56, 28], [56, 56]]
    cfg = LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **_text_config(tok, vocab_size=vocab_size)},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        image_token_index=ids("<image>"), video_token_index=ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=grid, tie_word_embeddings=True)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    ip = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, crop_size={"height": 28, "width": 28},
                                         image_grid_pinpoints=grid)
    return model, no_video_processor_class(LlavaOnevisionProcessor)(
        image_processor=ip, tokenizer=tok, num_image_tokens=4, vision_feature_select_strategy="full",
        chat_template=tok.chat_template)


def _llava(tok, vocab_size: int):
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    ip = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="full", image_token="<image>",
                          num_additional_image_tokens=0, chat_template=tok.chat_template)
    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=14),
        text_config=LlamaConfig(**_text_config(tok, vocab_size=vocab_size)),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=True)
    return LlavaForConditionalGeneration(cfg), proc


SIZED = {"qwen2-vl": _qwen2_vl, "qwen2.5-vl": _qwen2_5_vl}   # the families built at other dimensions too
BUILDERS = {**SIZED, "qwen3-vl": _qwen3_vl, "internvl": _internvl, "gemma3": _gemma3, "idefics3": _idefics3,
            "llava": _llava, "llava-onevision": _llava_onevision}
FAMILIES = tuple(BUILDERS)


def build(family: str, seed: int = 0, vocab_size: int = 0, image_size: int = IMAGE_SIZE, text: dict | None = None,
          vision: dict | None = None):
    """(model, processor) for ``family``, randomly initialised with ``seed``. ``vocab_size``: rows of the
    embedding and output head (0: the tokenizer's 400; larger, e.g. Qwen's 151,936, for memory checks: the rows
    past the tokenizer are never sampled).

    Larger models of the same architecture (Qwen-VL families only): ``image_size`` (the processor resizes every
    image to it: Qwen ``(image_size / 28)^2`` image tokens), ``text`` (``hidden``, ``layers``, ``heads``,
    ``kv_heads``, ``intermediate``; default 64, 2, 4, 2, 2 x hidden) and ``vision`` (Qwen2-VL vision config
    fields, e.g. ``depth``, ``embed_dim``, ``num_heads``; its output width is always the text ``hidden``)."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r} (available: {', '.join(FAMILIES)})")
    if (image_size != IMAGE_SIZE or text or vision) and family not in SIZED:
        raise ValueError(f"image_size / text / vision dimensions are supported for qwen2-vl and qwen2.5-vl, "
                         f"not {family!r}")
    if image_size % 28:
        raise ValueError(f"image_size must be a multiple of 28 (14-px patches merged 2x2); got {image_size}")
    text = dict(text or {})
    unknown = set(text) - {"hidden", "layers", "heads", "kv_heads", "intermediate"}
    if unknown:
        raise ValueError(f"unknown text dimension(s) {sorted(unknown)} (hidden, layers, heads, kv_heads, "
                         f"intermediate)")
    tok = build_tokenizer(family, seed)
    torch.manual_seed(seed)
    sizes = {"image_size": image_size, "text": text, "vision": vision} if family in SIZED else {}
    model, proc = BUILDERS[family](tok, vocab_size, **sizes)
    ids = tok.convert_tokens_to_ids
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<pad>")
    model.generation_config.bos_token_id = None
    return model.eval(), proc


def make_tiny(family: str, out_dir: str, seed: int = 0, vocab_size: int = 0, image_size: int = IMAGE_SIZE,
              text: dict | None = None, vision: dict | None = None) -> str:
    """Write a tiny random checkpoint of ``family`` (model + processor) to ``out_dir``; return ``out_dir``.
    ``image_size`` / ``text`` / ``vision``: larger Qwen-VL models, see :func:`build`."""
    model, proc = build(family, seed, vocab_size, image_size, text, vision)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "acrl_tiny.json"), "w") as fh:
        json.dump({"family": family, "seed": seed, "image_size": image_size,
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "text": text or {}, "vision": vision or {}}, fh, indent=1)
    return out_dir


def make_tiny_for_vllm(family: str, out_dir: str, seed: int = 0, hidden: int = 128, layers: int = 2) -> str:
    """A tiny random Qwen-VL checkpoint that vLLM's CPU build runs: head size 32 in the text and vision towers (CPU
    attention supports 32 and up, not the default 16) and a saved video-processor config (vLLM builds the video
    processor even with videos off)."""
    if family not in ("qwen2-vl", "qwen2.5-vl"):
        raise ValueError(f"make_tiny_for_vllm supports qwen2-vl and qwen2.5-vl, not {family!r}")
    vision = {"embed_dim": 64, "num_heads": 2} if family == "qwen2-vl" else \
        {"hidden_size": 64, "num_heads": 2, "intermediate_size": 128}
    path = make_tiny(family, out_dir, seed=seed, vision=vision,
                     text={"hidden": hidden, "layers": layers, "heads": hidden // 32, "kv_heads": max(1, hidden // 64)})
    cfg_path = os.path.join(path, "processor_config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    image = {k: v for k, v in cfg["image_processor"].items() if k != "image_processor_type"}
    cfg["video_processor"] = {**image, "video_processor_type": "Qwen2VLVideoProcessor"}
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh, indent=1)
    return path
