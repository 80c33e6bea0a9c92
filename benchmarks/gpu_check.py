"""The GPU check: one training step of the HF captioner at real dimensions and the paper's shapes, random weights.

    benchmarks/gpu_check.sh [--families qwen2.5-vl-3b internvl-2b] [--problems 32] [--samples 8]
                            [--max-new-tokens 512] [--memory-cap-gib 80] [--out FILE]
    benchmarks/gpu_check.sh --dry-run      # the same phases on CPU at tiny dimensions (what CI runs)

For each family a model with the published dimensions (Qwen2.5-VL-3B-Instruct, InternVL3-2B-hf; :func:`real_config`)
is built from its config with random bf16 weights directly on the GPU (no downloads, nothing written to disk), with a
locally built processor whose images give about 1k visual tokens (Qwen: 896x896 = 1,024 tokens; InternVL: 4 tiles +
a thumbnail of 256 tokens). It then runs, with LoRA r 128 on every linear layer of the language model, gradient
checkpointing and micro-batch 8 (the paper configs):

* ``load``: the captioner and its start-up self-test (:meth:`acrl.backends.hf.captioner.HFCaptioner.self_test`);
* ``generation``: ``problems`` x ``samples`` captions of up to ``max_new_tokens`` tokens with the one sampler,
  plus the old log-probs from the teacher-forced pass;
* ``reference``: π_ref's log-probs (the adapter disabled);
* ``update``: one PPO update over all rows;
* ``adapter``: the adapter randomised to a visible scale must change the greedy captions of the start (an adapter
  that is ignored leaves them equal), and with the adapter disabled they must be the start's again (π_ref).

Per phase: seconds, peak allocated and peak reserved GiB with the process capped to ``--memory-cap-gib`` of the card
(``torch.cuda.set_per_process_memory_fraction``: an 80 GB card's out-of-memory shows on a 141 GB one). Per step:
the on-policy PPO ratio in bf16 (``ratio_mean`` and the largest ``|ratio - 1|``), and the mismatch between the
sampler's and the trainer's log-probs of the same tokens. The results file is rewritten after every phase, so a
timeout leaves what was measured. The vLLM engine is not part of this check (its machine has no vLLM).

Without CUDA (and without ``--dry-run``) it prints one line saying so and exits 2, writing nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))   # run from a checkout: this tree's acrl, installed or not

OUT = os.path.join(ROOT, "benchmarks", "results", "gpu_check.json")
PAPER = {"qwen2.5-vl-3b": "qwen2.5-vl-3b.yaml", "internvl-2b": "internvl-2b.yaml"}
FAMILY = {"qwen2.5-vl-3b": "qwen2.5-vl", "internvl-2b": "internvl"}   # the hf.tiny family (processor, tokenizer)
QWEN_IMAGE = 896                 # (896 / 28)^2 = 1,024 visual tokens
INTERNVL_TILES = 4               # 4 tiles + a thumbnail, 256 tokens each


def real_config(name: str):
    """The transformers config of ``name`` with the published dimensions (config.json of
    Qwen/Qwen2.5-VL-3B-Instruct and OpenGVLab/InternVL3-2B-hf), token ids from the local tokenizer."""
    from acrl.backends.hf.tiny import build_tokenizer

    if name not in PAPER:
        raise ValueError(f"unknown family {name!r} (available: {', '.join(PAPER)})")
    tok = build_tokenizer(FAMILY[name])
    ids = tok.convert_tokens_to_ids
    if name == "qwen2.5-vl-3b":
        from transformers import Qwen2_5_VLConfig

        text = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
                "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24],
                                                          "rope_theta": 1e6},
                "bos_token_id": None, "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<pad>")}
        vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                  "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu", "in_channels": 3}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                                video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                                vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True)
    from transformers import InternVLConfig

    text = {"model_type": "qwen2", "vocab_size": 151674, "hidden_size": 1536, "intermediate_size": 8960,
            "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "bos_token_id": None,
            "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<pad>")}
    vision = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
              "image_size": 448, "patch_size": 14, "use_qk_norm": False, "layer_scale_init_value": 0.1}
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=ids("<IMG_CONTEXT>"),
                          image_seq_length=256, downsample_ratio=0.5, tie_word_embeddings=False)


def meta_parameters(name: str) -> int:
    """Parameter count of the real-dimension model, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(real_config(name))
    return sum(p.numel() for p in model.parameters())


def real_processor(name: str):
    """The family's processor at the paper's image size (~1k visual tokens), with the local tokenizer."""
    from acrl.backends.hf.loading import no_video_processor_class
    from acrl.backends.hf.tiny import build_tokenizer

    tok = build_tokenizer(FAMILY[name])
    if name == "qwen2.5-vl-3b":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

        ip = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                      min_pixels=QWEN_IMAGE * QWEN_IMAGE, max_pixels=QWEN_IMAGE * QWEN_IMAGE)
        return no_video_processor_class(Qwen2_5_VLProcessor)(image_processor=ip, tokenizer=tok,
                                                             chat_template=tok.chat_template)
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    ip = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True,
                                  max_patches=INTERNVL_TILES, image_mean=[0.485, 0.456, 0.406],
                                  image_std=[0.229, 0.224, 0.225])
    return no_video_processor_class(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=256,
                                                       chat_template=tok.chat_template)


def _images(k: int, size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size + size // 4 * (i % 2), 3), dtype=np.uint8))
            for i in range(k)]


class Meter:
    """Seconds and peak memory of a phase (CUDA: allocated and reserved, reset before it)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        rec = {}
        if self.cuda:
            torch.cuda.synchronize()
            rec = {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
        return out, {"seconds": round(time.perf_counter() - t, 3), **rec}


def build_captioner(name: str, dry: bool, cfg):
    """(captioner, image size): real dimensions in bf16 on the GPU, or (``dry``) the tiny family on CPU in fp32."""
    import torch
    from transformers import AutoModelForImageTextToText

    from acrl.backends.hf.captioner import HFCaptioner
    from acrl.backends.hf.tiny import build
    from acrl.config import HFSettings

    c = cfg.captioner
    if dry:
        model, proc = build(FAMILY[name], seed=0)
        size = 64
    else:
        with torch.device("cuda"):
            model = AutoModelForImageTextToText.from_config(real_config(name), dtype=torch.bfloat16)
        proc = real_processor(name)
        size = QWEN_IMAGE if name == "qwen2.5-vl-3b" else 448
        model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id
        model.generation_config.pad_token_id = model.config.get_text_config().pad_token_id
    cap = HFCaptioner(model.eval(), proc, c.lora, HFSettings.from_config(c), base_path="random-" + name,
                      micro_batch=cfg.train.micro_batch)
    return cap, size


def randomise_adapter(cap, std: float) -> None:
    """LoRA A and B drawn at ``std``: a fresh adapter's B is zero, so it changes nothing until trained."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in cap.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def check_family(name: str, args, res: dict, save) -> None:
    """The phases of one family, recorded into ``res`` as they finish (``save`` writes the results file)."""
    import torch

    from acrl.config import load_config
    from acrl.core.update import update
    from acrl.train.learner import captioner_update_settings

    cuda = not args.dry_run
    over = [f"train.problems_per_step={args.problems}", f"train.samples_per_problem={args.samples}",
            f"captioner.max_new_tokens={args.max_new_tokens}"]
    if args.dry_run:
        over += ["captioner.device=cpu", "captioner.dtype=fp32", "captioner.lora.r=8", "captioner.lora.alpha=16",
                 "train.micro_batch=4"]
    cfg = load_config(os.path.join(ROOT, "configs", PAPER[name]), over)
    tc, c = cfg.train, cfg.captioner
    meter = Meter(cuda)
    res.update(problems=args.problems, samples=args.samples, max_new_tokens=args.max_new_tokens,
               micro_batch=tc.micro_batch, lora_r=c.lora.r, phases={})
    if not args.dry_run:
        res["parameters"] = meta_parameters(name)
    save()
    (cap, size), res["phases"]["load"] = meter(lambda: build_captioner(name, args.dry_run, cfg))
    st, res["phases"]["self_test"] = meter(cap.self_test)
    res["self_test"] = st
    save()
    images = _images(args.problems, size)
    questions = [f"What is the height of bar {i}?" for i in range(args.problems)]
    image_id = getattr(cap.base_model().config, "image_token_id", None)
    res["visual_tokens"] = int((cap.encode(images[0], questions[0])["input_ids"] == image_id).sum())
    k = min(4, args.problems)
    start = cap.generate(images[:k], questions[:k], greedy=True, max_new_tokens=16).texts   # adapter B = 0
    torch.manual_seed(0)
    roll, res["phases"]["generation"] = meter(lambda: cap.generate(
        images, questions, n=args.samples, temperature=c.temperature or 1.0, max_new_tokens=args.max_new_tokens))
    res["caption_tokens"] = int(roll.mask.sum())
    res["caption_tokens_per_s"] = round(res["caption_tokens"] / max(res["phases"]["generation"]["seconds"], 1e-9), 1)
    res["mismatch"] = cap.logprob_mismatch(roll)
    save()
    from acrl.train.collect import reference_logprobs

    ref, res["phases"]["reference"] = meter(lambda: reference_logprobs(cap, roll, tc.micro_batch))
    save()
    opt = torch.optim.AdamW(cap.trainable_parameters(), lr=tc.lr)
    rows = roll.tokens.shape[0]
    adv = torch.linspace(-1, 1, rows)
    new = cap.logprobs(roll, slice(0, min(rows, tc.micro_batch))).detach()
    m = roll.mask[:new.shape[0]] > 0
    res["ratio_first_micro_batch_max_abs_dev"] = float((torch.exp(new - roll.logprobs[:new.shape[0]]) - 1)[m]
                                                       .abs().max()) if m.any() else None
    stats, res["phases"]["update"] = meter(lambda: update(cap, opt, roll, adv, torch.ones(rows, dtype=torch.bool),
                                                          captioner_update_settings(cfg), ref))
    res["update"] = {k: stats.get(k) for k in ("ratio_mean", "clip_frac", "grad_norm", "loss")}
    save()
    randomise_adapter(cap, std=0.02 if not args.dry_run else 0.3)
    after = cap.generate(images[:k], questions[:k], greedy=True, max_new_tokens=16).texts
    with cap.model.disable_adapter():
        off = cap.generate(images[:k], questions[:k], greedy=True, max_new_tokens=16).texts
    res["adapter"] = {"captions_changed": sum(a != b for a, b in zip(start, after)), "of": k,
                      "adapter_off_equals_start": off == start}
    save()


def _fail(msg: str) -> int:
    print(f"gpu_check: {msg}", file=sys.stderr)
    return 2


def verdict(res: dict) -> list[str]:
    """What in a family's results is not a pass (empty: it passed)."""
    bad = []
    if "error" in res:
        return [res["error"]]
    if not res.get("self_test", {}).get("ok"):
        bad.append(f"self-test failed: {res.get('self_test')}")
    if res.get("adapter", {}).get("captions_changed", 0) == 0:
        bad.append("the randomised adapter changed no caption (adapter ignored?)")
    if not res.get("adapter", {}).get("adapter_off_equals_start"):
        bad.append("with the adapter disabled the captions differ from the start (π_ref is not the base)")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=list(PAPER), choices=list(PAPER))
    ap.add_argument("--problems", type=int, default=None, help="problems per step (paper: 32; dry run: 2)")
    ap.add_argument("--samples", type=int, default=None, help="captions per problem (paper: 8; dry run: 2)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="caption cap (paper: 512; dry run: 6)")
    ap.add_argument("--memory-cap-gib", type=float, default=80.0, help="cap the process to this much of the card")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--dry-run", action="store_true", help="the same phases on CPU at tiny dimensions")
    args = ap.parse_args(argv)
    paper = (2, 2, 6) if args.dry_run else (32, 8, 512)
    args.problems = args.problems or paper[0]
    args.samples = args.samples or paper[1]
    args.max_new_tokens = args.max_new_tokens or paper[2]
    try:
        import torch
    except ImportError as e:
        return _fail(f"torch is not importable ({e}); nothing was run")
    result: dict = {"mode": "dry-run (CPU, tiny dimensions)" if args.dry_run else "gpu", "torch": torch.__version__,
                    "families": {}}
    if not args.dry_run:
        if not torch.cuda.is_available():
            return _fail(f"no CUDA device visible to torch {torch.__version__}; nothing was run or written "
                         f"(--dry-run runs the same phases on CPU at tiny dimensions)")
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
        result.update(device=torch.cuda.get_device_name(0), card_gib=round(total / 2**30, 1),
                      memory_cap_gib=args.memory_cap_gib)
    import transformers

    result["transformers"] = transformers.__version__
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(tmp, args.out)

    failed = []
    for name in args.families:
        fam: dict = {}
        result["families"][name] = fam
        try:
            check_family(name, args, fam, save)
        except Exception as err:  # noqa: BLE001 - one family's failure is recorded, the next still runs
            fam["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        bad = verdict(fam)
        fam["verdict"] = "pass" if not bad else bad
        failed += [f"{name}: {b}" for b in bad]
        save()
        if not args.dry_run:
            torch.cuda.empty_cache()
    print(json.dumps(result, indent=1))
    if failed:
        return _fail("; ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
