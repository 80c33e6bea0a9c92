"""Peak memory of the old-log-prob pass (the teacher-forced recompute of a whole rollout) on a CPU model with
Qwen's 151,936-token vocabulary, at 32, 64, 128 and 256 rows x 256 caption tokens.

    python benchmarks/logprob_memory.py [--rows 32 64 128 256] [--tokens 256] [--chunk 8] [--baseline-rows 4 8]

Each cell runs in a fresh subprocess (``--cell``): it builds a tiny random Qwen2-VL with a 151,936-row output
head (``hf.tiny.build(vocab_size=...)``), a rollout of ``rows`` captions of ``tokens`` tokens (8 samples per
problem), resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` ← 5) and reads ``VmHWM`` after
``HFCaptioner.logprobs`` ran under ``no_grad`` in the policy's mode, i.e. exactly the recompute. The pass's peak is
``VmHWM`` minus the resident size before it. ``--baseline-rows``: the same cells through the old one-shot path (all
rows in one forward, then ``log_softmax`` of the full-vocabulary fp32 logits), at the sizes this machine affords.
Writes ``benchmarks/results/logprob_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VOCAB = 151_936
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "logprob_memory.json")


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cell(rows: int, tokens: int, chunk: int, baseline: bool) -> dict:
    """One measurement, in this (fresh) process."""
    import gc
    import tempfile

    import numpy as np
    import torch
    from PIL import Image

    from acrl.backends.hf.captioner import HFCaptioner
    from acrl.backends.hf.inputs import HFContext
    from acrl.backends.hf.logprobs import ban, caption_logits
    from acrl.backends.hf.tiny import make_tiny
    from acrl.config import HFSettings, LoraSettings
    from acrl.rollout.prompts import captioner_prompt
    from acrl.rollout.protocols import Rollout

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = make_tiny("qwen2-vl", os.path.join(tempfile.mkdtemp(), "m"), seed=0, vocab_size=VOCAB)
    cap = HFCaptioner.load(path, lora=LoraSettings(enabled=True, r=8, alpha=16),
                           settings=HFSettings(device="cpu", dtype="fp32", logprob_batch_size=chunk))
    n = 8
    problems = max(1, rows // n)
    rng = np.random.default_rng(0)
    encs = [cap.encode(Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)),
                       captioner_prompt("What is the height of the red bar?")) for _ in range(problems)]
    gen = torch.Generator().manual_seed(0)
    toks = torch.randint(20, len(cap.tokenizer) - 1, (rows, tokens), generator=gen)
    toks = torch.where(torch.isin(toks, cap.banned), torch.full_like(toks, 30), toks)
    roll = Rollout(texts=[[""] * n for _ in range(problems)], tokens=toks, mask=torch.ones(rows, tokens),
                   logprobs=torch.zeros(rows, tokens), temperature=1.0, context=HFContext(encs, n))
    gc.collect()
    before = _status_kb("VmRSS")
    exact = _reset_peak()
    t = time.perf_counter()
    with torch.no_grad(), cap._policy_mode() as model:
        if baseline:   # the old path: every row in one forward, full-vocabulary fp32 log_softmax
            logits = caption_logits(model, cap.feed, encs, [r // n for r in range(rows)], toks, cap._shares_prompt())
            logits = torch.cat(logits, 1) if isinstance(logits, list) else logits
            logp = torch.log_softmax(ban(logits.float(), cap.banned) / roll.temperature, -1)
            lp = logp.gather(-1, toks[..., None])[..., 0]
        else:
            lp = cap._logprobs(model, roll, 0, rows)
    seconds = time.perf_counter() - t
    peak = _status_kb("VmHWM")
    assert lp.shape == (rows, tokens) and bool(torch.isfinite(lp).all())
    return {"rows": rows, "tokens": tokens, "path": "one-shot (old)" if baseline else f"chunked, {chunk} rows",
            "rss_before_mb": round(before / 1024, 1), "peak_rss_mb": round(peak / 1024, 1),
            "pass_peak_mb": round((peak - before) / 1024, 1), "seconds": round(seconds, 2),
            "peak_counter_reset": exact}


def run_cell(rows: int, tokens: int, chunk: int, baseline: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--cell", str(rows), "--tokens", str(tokens), "--chunk",
           str(chunk)] + (["--baseline"] if baseline else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        return {"rows": rows, "tokens": tokens, "error": (proc.stderr.strip().splitlines() or ["?"])[-1],
                "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=4,
                    help="rows per forward (4 fp32 rows = the bytes of the paper configs' 8 bf16 rows)")
    ap.add_argument("--baseline-rows", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--cell", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(cell(args.cell, args.tokens, args.chunk, args.baseline)))
        return
    cells = [run_cell(r, args.tokens, args.chunk, False) for r in args.rows]
    base = [run_cell(r, args.tokens, args.chunk, True) for r in args.baseline_rows]
    peaks = [c["pass_peak_mb"] for c in cells if "pass_peak_mb" in c]
    result = {
        "what": "peak resident memory of the old-log-prob pass (teacher-forced recompute of a rollout), CPU, fp32",
        "model": "tiny random Qwen2-VL (hidden 64) with a 151,936-token output head", "vocab": VOCAB,
        "tokens_per_row": args.tokens, "chunk_rows": args.chunk, "cells": cells, "baseline_one_shot": base,
        "largest_over_smallest": round(max(peaks) / min(peaks), 3) if len(peaks) == len(cells) and peaks else None,
        "max_pass_peak_mb": max(peaks) if peaks else None,
        "one_full_vocab_fp32_row_mb": round(args.tokens * VOCAB * 4 / 2**20, 1),
        "threads": 1,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
