"""The GPU check: the real path at real dimensions, with random weights and no downloads.

    python benchmarks/gpu_check.py [--families qwen2.5-vl-3b internvl-2b] [--steps 3] [--out FILE] [--dry-run]

For each family a model with the *real* dimensions (Qwen2.5-VL-3B-Instruct, InternVL3-2B-hf) is built from its
config (:func:`real_config`), randomly initialised in bf16 on the GPU and saved with a locally built processor
(the tiny checkpoints' tokenizer; the 151k-row head keeps the real size). Then, with the paper config's captioner
and train settings (``configs/qwen2.5-vl-3b.yaml``, ``configs/internvl-2b.yaml``):

* ``--steps`` training steps (rollout of B x M captions, π_ref log-probs, the update) with the HF rollout engine,
  peak GPU memory per phase (``torch.cuda.max_memory_allocated``, reset before each phase);
* the vLLM rollout engine for real (``VLLMRolloutEngine``): captions with the current adapter, π_ref's answers
  with none, and the agreement of the engine's log-probs with the training model's on the same tokens;
* tokens/s of acrl's engine rollouts vs raw ``LLM.generate`` of the same prompts.

Writes ``benchmarks/results/gpu_check.json``. Without CUDA it says so and exits 0, writing nothing; ``--dry-run``
only builds the configs and counts parameters on the meta device (what a CPU can check).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "gpu_check.json")
PAPER = {"qwen2.5-vl-3b": "qwen2.5-vl-3b.yaml", "internvl-2b": "internvl-2b.yaml"}
FAMILY = {"qwen2.5-vl-3b": "qwen2.5-vl", "internvl-2b": "internvl"}   # the hf_tiny family (processor, tokenizer)


def real_config(name: str):
    """The transformers config of ``name`` with the published dimensions (config.json of
    Qwen/Qwen2.5-VL-3B-Instruct and OpenGVLab/InternVL3-2B-hf), token ids from the local tokenizer."""
    from acrl.backends import hf_tiny

    if name not in PAPER:
        raise ValueError(f"unknown family {name!r} (available: {', '.join(PAPER)})")
    tok = hf_tiny.build_tokenizer(FAMILY[name])
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
    if name == "internvl-2b":
        from transformers import InternVLConfig

        text = {"model_type": "qwen2", "vocab_size": 151674, "hidden_size": 1536, "intermediate_size": 8960,
                "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "bos_token_id": None,
                "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<pad>")}
        vision = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                  "image_size": 448, "patch_size": 14, "use_qk_norm": False, "layer_scale_init_value": 0.1}
        return InternVLConfig(text_config=text, vision_config=vision, image_token_id=ids("<IMG_CONTEXT>"),
                              image_seq_length=256, downsample_ratio=0.5, tie_word_embeddings=False)
    raise ValueError(f"unknown family {name!r} (available: {', '.join(PAPER)})")


def meta_parameters(name: str) -> int:
    """Parameter count of the real-dimension model, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(real_config(name))
    return sum(p.numel() for p in model.parameters())


def _processor(name: str):
    """The family's processor at real image settings, with the local tokenizer."""
    from acrl.backends import hf_tiny
    from acrl.backends.hf import no_video_processor_class

    tok = hf_tiny.build_tokenizer(FAMILY[name])
    if name == "qwen2.5-vl-3b":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

        ip = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136,
                                      max_pixels=802816)
        return no_video_processor_class(Qwen2_5_VLProcessor)(image_processor=ip, tokenizer=tok,
                                                             chat_template=tok.chat_template)
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    ip = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, max_patches=6,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return no_video_processor_class(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=256,
                                                       chat_template=tok.chat_template)


def write_checkpoint(name: str, out: str) -> str:
    """A random bf16 checkpoint of the real-dimension model (built directly on the GPU) plus its processor."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(real_config(name), dtype=torch.bfloat16)
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    model.save_pretrained(out)
    _processor(name).save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def _images(k: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (448 + 32 * (i % 3), 560, 3), dtype=np.uint8)) for i in range(k)]


def _phase(fn):
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, {"seconds": round(time.perf_counter() - t, 3),
                 "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def check_family(name: str, steps: int, problems: int, max_new: int) -> dict:
    import torch

    from acrl.backends.hf import HFCaptioner, HFSettings
    from acrl.config import load_config
    from acrl.core.update import update
    from acrl.train.collect import reference_logprobs

    cfg = load_config(os.path.join(ROOT, "configs", PAPER[name]),
                      [f"train.problems_per_step={problems}", f"captioner.max_new_tokens={max_new}"])
    tc, c = cfg.train, cfg.captioner
    res: dict = {"parameters": meta_parameters(name), "problems": problems, "samples": tc.samples_per_problem,
                 "max_new_tokens": max_new, "micro_batch": tc.micro_batch, "lora_r": c.lora.r}
    work = tempfile.mkdtemp(prefix=f"gpu-check-{name}-")
    path, timing = _phase(lambda: write_checkpoint(name, os.path.join(work, "base")))
    res["write_checkpoint"] = timing
    cap, res["load"] = _phase(lambda: HFCaptioner.load(path, lora=c.lora, settings=HFSettings.from_config(c),
                                                        micro_batch=tc.micro_batch))
    opt = torch.optim.AdamW(cap.trainable_parameters(), lr=tc.lr)
    images, questions = _images(problems), [f"What is the height of bar {i}?" for i in range(problems)]
    res["steps"] = []
    for _ in range(steps):
        roll, gen = _phase(lambda: cap.generate(images, questions, n=tc.samples_per_problem,
                                                temperature=c.temperature, max_new_tokens=max_new))
        ref, refp = _phase(lambda r=roll: reference_logprobs(cap, r, tc.micro_batch))
        adv = torch.randn(roll.tokens.shape[0])
        valid = torch.ones_like(adv, dtype=torch.bool)
        stats, upd = _phase(lambda r=roll, a=adv, v=valid, x=ref: update(cap, opt, r, a, v, cfg, x))
        res["steps"].append({"generation": gen, "reference": refp, "update": upd,
                             "caption_tokens": float(roll.mask.sum()), "ratio_mean": stats.get("ratio_mean"),
                             "clip_frac": stats.get("clip_frac"), "grad_norm": stats.get("grad_norm")})
    res["vllm"] = check_vllm(cap, cfg, images, questions, max_new)
    return res


def check_vllm(cap, cfg, images, questions, max_new) -> dict:
    """The colocated vLLM engine for real: captions with the adapter, answers without, HF-vs-vLLM log-probs,
    and tokens/s of the engine's rollouts vs raw ``LLM.generate`` of the same requests."""
    import torch

    try:
        import vllm  # noqa: F401
    except ImportError:
        return {"skipped": "vLLM is not installed (pip install -e '.[gpu]')"}
    from acrl.backends.vllm_engine import VLLMRolloutEngine, VLLMSettings
    from acrl.rollout.prompts import captioner_prompt

    n = cfg.train.samples_per_problem
    engine = VLLMRolloutEngine(cap, VLLMSettings(gpu_memory_utilization=0.35, max_model_len=4096))
    out: dict = {"max_lora_rank": engine.engine_kwargs()["max_lora_rank"]}
    engine.generate(images[:1], questions[:1], n=1, max_new_tokens=4)                    # warm-up
    t = time.perf_counter()
    roll = engine.generate(images, questions, n=n, temperature=1.0, max_new_tokens=max_new)
    acrl_s = time.perf_counter() - t
    tokens = float(roll.mask.sum())
    reqs = engine._requests(images, [captioner_prompt(q) for q in questions])
    params = engine._params(n, 1.0, max_new, False)
    t = time.perf_counter()
    raw = engine.llm.generate(reqs, params, lora_request=engine.lora, use_tqdm=False)
    raw_s = time.perf_counter() - t
    raw_tokens = sum(len(o.token_ids) for r in raw for o in r.outputs)
    out["tokens_per_s"] = {"acrl_engine": round(tokens / acrl_s, 1), "raw_vllm_generate": round(raw_tokens / raw_s, 1)}
    engine.sleep()
    with torch.no_grad():
        hf = cap.logprobs(roll).detach()
    m = roll.mask > 0
    diff = (hf - roll.logprobs).abs()[m]
    out["logprob_agreement"] = {"max_abs": round(float(diff.max()), 5), "mean_abs": round(float(diff.mean()), 6),
                                "tokens": int(m.sum())}
    engine.wake_up()
    answers = engine.answer(images[:4], ["What colour is the first bar?"] * 4)
    out["answers"] = {"n": len(answers), "nonempty": sum(bool(a) for a in answers)}
    engine.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=list(PAPER), choices=list(PAPER))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--problems", type=int, default=8, help="problems per step (x M = 8 samples)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--dry-run", action="store_true", help="build the real-dimension configs on the meta device only")
    args = ap.parse_args(argv)
    if args.dry_run:
        print(json.dumps({n: {"parameters": meta_parameters(n)} for n in args.families}, indent=1))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing was run and nothing was written")
        return 0
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "families": {}}
    for name in args.families:
        try:
            result["families"][name] = check_family(name, args.steps, args.problems, args.max_new_tokens)
        except Exception as err:  # noqa: BLE001 - one family's failure is recorded, the other still runs
            result["families"][name] = {"error": f"{type(err).__name__}: {err}"}
        torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result, indent=1))
    return 0 if all("error" not in v for v in result["families"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
