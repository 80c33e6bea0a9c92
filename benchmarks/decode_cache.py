"""The caption decode loop with and without room in the KV cache (``acrl.backends.hf.sampler.with_room``), same process.

    python benchmarks/decode_cache.py [--size 5M] [--image-size 448] [--problems 4] [--samples 8] [--max-new-tokens 128]

On a random Qwen2-VL of ``benchmarks/vs_trl.py``'s ``SIZES``: ``sampler.sample_shared`` (one prefill per
problem, then the decode loop over the expanded cache), alternating the cache given room for the caption (what the
sampler does) with the stock ``DynamicCache`` layers (which concatenate the whole cache of every layer at each
step), ``--repeats`` times each, same seed (the same tokens). Reports the best and median seconds of each and
checks that both sampled the same tokens with the same log-probs. Writes ``benchmarks/results/decode_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="5M")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "decode_cache.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, HERE)
    import vs_trl

    from acrl.backends.hf import sampler
    from acrl.backends.hf.captioner import HFCaptioner
    from acrl.backends.hf.tiny import make_tiny
    from acrl.config import HFSettings, LoraSettings
    from acrl.rollout.prompts import captioner_prompt
    from acrl.world import make_problems

    if args.size not in vs_trl.SIZES:
        raise SystemExit(f"--size {args.size!r}: one of {', '.join(vs_trl.SIZES)}")
    with tempfile.TemporaryDirectory() as work:
        path = make_tiny("qwen2-vl", os.path.join(work, "model"), image_size=args.image_size,
                         **vs_trl.SIZES[args.size])
        cap = HFCaptioner.load(path, lora=LoraSettings(enabled=True, r=8, alpha=16),
                               settings=HFSettings(device="cpu", dtype="fp32"))
    problems = make_problems("train", args.problems)
    encs = [cap.encode(p.image, captioner_prompt(p.question_with_choices())) for p in problems]
    rows_of = [g for g in range(len(encs)) for _ in range(args.samples)]
    with_room = sampler.with_room

    def sample(room: bool):
        sampler.with_room = with_room if room else (lambda cache, n: None)
        torch.manual_seed(0)
        t = time.perf_counter()
        try:
            with torch.no_grad():
                tok, lp = sampler.sample_shared(cap.base_model(), cap.feed, encs, rows_of, 1.0, args.max_new_tokens,
                                                False, 1.0)
        finally:
            sampler.with_room = with_room
        return time.perf_counter() - t, tok, lp

    sample(True)                                            # warm-up
    times: dict[str, list[float]] = {"room": [], "stock": []}
    outs = {}
    for _ in range(args.repeats):
        for name in ("room", "stock"):
            dt, tok, lp = sample(name == "room")
            times[name].append(round(dt, 3))
            outs[name] = (tok, lp)
    same_tokens = bool(torch.equal(outs["room"][0], outs["stock"][0]))
    a, b = outs["room"][1], outs["stock"][1]
    fin = torch.isfinite(a)                               # the banned pad after an end token: -inf in both
    if not same_tokens or not torch.equal(fin, torch.isfinite(b)):
        raise SystemExit("the two caches sampled different tokens")
    diff = float((a[fin] - b[fin]).abs().max())
    res = {"what": "sampler.sample_shared: KV cache with room for the caption vs stock DynamicCache layers",
           "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "model_parameters": cap.num_parameters(),
                        "prompt_tokens": [int(e["input_ids"].shape[1]) for e in encs],
                        "steps": int(outs["room"][0].shape[1])},
           "seconds": times,
           "best": {k: min(v) for k, v in times.items()}, "median": {k: statistics.median(v) for k, v in times.items()},
           "same_tokens": same_tokens, "max_abs_logprob_diff": diff, "machine": vs_trl.machine()}
    res["speedup_median"] = round(res["median"]["stock"] / res["median"]["room"], 3)
    vs_trl.write_json(args.out, res)
    print(json.dumps({k: res[k] for k in ("seconds", "speedup_median", "same_tokens", "max_abs_logprob_diff")}))


if __name__ == "__main__":
    main()
