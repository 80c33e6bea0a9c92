"""acrl's rollout through its vLLM engine against raw ``LLM.generate``: the same engine, prompts, n, lengths, seeds
and adapter, in one process. Writes ``benchmarks/results/vllm_overhead.json``.

    python benchmarks/vllm_overhead.py [--rounds 7] [--out benchmarks/results/vllm_overhead.json]

Needs vLLM (``make vllm-venv``; run it with ``.venv-vllm/bin/python``). One rollout step, both ways:

- acrl: ``VLLMRolloutEngine.generate`` (captions with log-probs, turned into the Rollout the trainer reads: prompt
  rendering, image fitting, the per-problem encodings of the teacher-forced pass), ``push_adapter`` (the adapter
  saved and handed over as a new LoRARequest) and ``answer`` (π_ref's greedy answers, adapter off);
- raw: ``llm.generate`` on the same rendered prompts and images with the same ``SamplingParams`` (seeds included,
  so both sample the same tokens), a plain ``save_pretrained`` of the adapter and a new ``LoRARequest``, and
  ``llm.generate`` of the answers.

Prefix caching is off (the side run second would otherwise find the other's prompts cached) and the order
alternates per round; the median round's seconds are compared. Throughput: caption tokens per second of whole
steps, over all rounds.
Two sizes of step on a tiny random Qwen2-VL (head size 32; CPU attention needs it). The goal: acrl within 1.2x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from acrl.backends.hf.captioner import HFCaptioner  # noqa: E402
from acrl.backends.hf.tiny import make_tiny_for_vllm  # noqa: E402
from acrl.backends.vllm_engine import RunShapes, VLLMRolloutEngine  # noqa: E402
from acrl.config import HFSettings, LoraSettings, VLLMSettings  # noqa: E402
from acrl.rollout.prompts import captioner_prompt, clarify_prompt  # noqa: E402

SIZES = [{"problems": 4, "samples": 4, "max_new_tokens": 32}, {"problems": 8, "samples": 8, "max_new_tokens": 64}]
GOAL = 1.2
QUESTIONS = ["What is the height of the red bar?", "How many circles are there?", "Which bar is the tallest?",
             "What colour is the largest shape?"]


def _images(k: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(k)]


def _randomise(cap, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cap.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def acrl_step(engine, cap, images, questions, size, seed) -> int:
    engine.sampling_seed = seed
    roll = engine.generate(images, questions, n=size["samples"], temperature=1.0,
                           max_new_tokens=size["max_new_tokens"])
    engine.push_adapter()
    engine.answer(images, questions)
    return int(roll.mask.sum())


def raw_step(engine, cap, images, questions, size, seed, state: dict) -> int:
    """The same step written against vLLM directly; ``state``: this side's current LoRARequest and its count."""
    from vllm.lora.request import LoRARequest

    engine.sampling_seed = seed
    seeds = engine.seeds(len(questions), size["samples"])     # the same seeds: the same tokens
    requests = [{"prompt": engine.chat_text(captioner_prompt(q)), "multi_modal_data": {"image": cap._fit(im)}}
                for im, q in zip(images, questions)]
    params = [engine._params(size["samples"], 1.0, size["max_new_tokens"], False, 1.0, s) for s in seeds]
    outs = engine.llm.generate(requests, params, lora_request=state.get("lora", engine.lora), use_tqdm=False)
    eos = set(cap.eos_ids)
    tokens = sum(next((i + 1 for i, t in enumerate(o.token_ids) if t in eos), len(o.token_ids))
                 for r in outs for o in r.outputs)
    state["version"] = state.get("version", 0) + 1
    path = os.path.join(state["root"], f"raw-{state['version']}")
    cap.model.save_pretrained(path)
    state["lora"] = LoRARequest(f"raw-{state['version']}", 100_000 + state["version"], path)
    answers = [{"prompt": engine.chat_text(clarify_prompt(q)), "multi_modal_data": {"image": cap._fit(im)}}
               for im, q in zip(images, questions)]
    engine.llm.generate(answers, engine._params(1, 1.0, cap.settings.answer_max_new_tokens, True),
                        lora_request=None, use_tqdm=False)
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "vllm_overhead.json"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm

    work = tempfile.mkdtemp(prefix="acrl-vllm-overhead-")
    path = make_tiny_for_vllm("qwen2-vl", os.path.join(work, "base"))
    torch.manual_seed(0)
    cap = HFCaptioner.load(path, lora=LoraSettings(enabled=True, r=8, alpha=16),
                           settings=HFSettings(device="cpu", dtype="fp32"))
    _randomise(cap, 0)
    biggest = max(s["problems"] * s["samples"] for s in SIZES)
    t = time.perf_counter()
    engine = VLLMRolloutEngine(cap, VLLMSettings(sleep_level=0, enforce_eager=True, adapter_dir=work,
                                                 engine_kwargs={"enable_prefix_caching": False}),
                               shapes=RunShapes(sequences=biggest, max_new_tokens=max(s["max_new_tokens"]
                                                                                      for s in SIZES)))
    start_s = time.perf_counter() - t
    results = []
    try:
        for size in SIZES:
            images = _images(size["problems"])
            questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(size["problems"])]
            state = {"root": work}
            sides = {"acrl": partial(acrl_step, engine, cap, images, questions, size),
                     "raw": partial(raw_step, engine, cap, images, questions, size, state=state)}
            for fn in sides.values():                        # warm-up (kernels, processor caches), not timed
                fn(1)
            times: dict[str, list[float]] = {"acrl": [], "raw": []}
            tokens: dict[str, list[int]] = {"acrl": [], "raw": []}
            for r in range(args.rounds):
                order = ["acrl", "raw"] if r % 2 == 0 else ["raw", "acrl"]
                for side in order:
                    t = time.perf_counter()
                    tokens[side].append(sides[side](100 + r))
                    times[side].append(time.perf_counter() - t)
            row = {**size}
            for side in ("acrl", "raw"):
                sec = statistics.median(times[side])
                row[side] = {"seconds_median": round(sec, 4), "seconds": [round(x, 4) for x in times[side]],
                             "caption_tokens": tokens[side],
                             "tokens_per_s": round(sum(tokens[side]) / sum(times[side]), 1)}
            row["same_tokens"] = tokens["acrl"] == tokens["raw"]
            row["ratio_acrl_over_raw_seconds"] = round(row["acrl"]["seconds_median"] / row["raw"]["seconds_median"], 3)
            results.append(row)
            print(json.dumps(row))
    finally:
        engine.close()
    out = {
        "what": "one rollout step (captions with log-probs, adapter push, pi_ref answers) through acrl's vLLM engine "
                "vs raw LLM.generate on the same engine, prompts, seeds and adapter",
        "model": "tiny random Qwen2-VL (hidden 128, 2 layers, head size 32, 112x112 images: 16 visual tokens), "
                 "fp32, LoRA r 8, --enforce-eager, no prefix caching",
        "vllm": getattr(vllm, "__version__", "?"), "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores shared, load average at the end "
                   f"{os.getloadavg()[0]:.1f}",
        "engine_start_s": round(start_s, 1), "rounds": args.rounds, "goal_ratio": GOAL, "sizes": results,
        "goal_met": all(r["ratio_acrl_over_raw_seconds"] <= GOAL for r in results),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {args.out}: acrl / raw seconds = {[r['ratio_acrl_over_raw_seconds'] for r in results]}")


if __name__ == "__main__":
    main()
