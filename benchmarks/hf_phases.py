"""HFCaptioner phases with and without prompt sharing (``captioner.share_prompt_cache``), same process.

    python benchmarks/hf_phases.py [--family qwen2-vl] [--problems 16] [--samples 8] [--max-new-tokens 32]

On a tiny random checkpoint (``make_tiny``): ``generate`` (B problems x M samples), π_ref's teacher-forced
log-probs and π_θ's forward+backward, both in micro-batches as the trainer runs them; the best of ``--repeats``
timings for each. Also checks that both paths give the same log-probs. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(min(times), 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen2-vl")
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from acrl.backends.hf.captioner import HFCaptioner
    from acrl.backends.hf.tiny import make_tiny
    from acrl.config import HFSettings, LoraSettings
    from acrl.world import make_problems

    path = make_tiny(args.family, tempfile.mkdtemp() + "/model")
    cap = HFCaptioner.load(path, lora=LoraSettings(enabled=True, r=8, alpha=16),
                           settings=HFSettings(device="cpu", dtype="fp32"))
    problems = make_problems("train", args.problems)
    images, questions = [p.image for p in problems], [p.question_with_choices() for p in problems]
    torch.manual_seed(0)
    roll = cap.generate(images, questions, n=args.samples, max_new_tokens=args.max_new_tokens)
    rows, mb = roll.tokens.shape[0], args.micro_batch

    def reference():
        return torch.cat([cap.logprobs(roll, slice(i, i + mb), reference=True) for i in range(0, rows, mb)])

    def policy():
        cap.model.zero_grad()
        for i in range(0, rows, mb):
            cap.logprobs(roll, slice(i, i + mb)).sum().backward()

    out: dict = {"family": args.family, "rows": rows, "caption_tokens": roll.tokens.shape[1], "seconds": {}}
    lps = {}
    for share in (False, True):
        cap.settings.share_prompt_cache = share
        lps[share] = reference()
        out["seconds"]["shared" if share else "per_row"] = {
            "generate": best(lambda: cap.generate(images, questions, n=args.samples,
                                                  max_new_tokens=args.max_new_tokens), args.repeats),
            "reference_logprobs": best(reference, args.repeats),
            "policy_forward_backward": best(policy, args.repeats),
            "answer": best(lambda: cap.answer(images, questions), args.repeats),
        }
    a, b = out["seconds"]["per_row"], out["seconds"]["shared"]
    out["speedup"] = {k: round(a[k] / b[k], 2) for k in a}
    out["max_abs_logprob_diff"] = float((lps[True] - lps[False]).abs().max())
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"hf_phases_{args.family}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
