"""Training throughput of the demo configuration: episodes per second and the per-phase time split.

    python benchmarks/train_throughput.py [--steps 15] [--threads 1 2] [--captioner PATH]

Runs the same training once per thread count, in one process, and writes
``benchmarks/results/train_throughput.json`` (and prints it). The first step of each run is excluded as warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

from acrl.app.assemble import build_clarifier, build_policy, build_reasoner, captioner_path, world_source
from acrl.config import load_config
from acrl.train.loop import Run, train

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(HERE, "..", "configs", "demo.yaml"))
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--captioner", default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "train_throughput.json"))
    args = ap.parse_args()
    runs = [measure(args, t) for t in args.threads]
    result = {"what": "AC-RL training steps on the embedded world (tiny captioner, world reasoner)",
              "config": os.path.relpath(args.config, os.path.join(HERE, "..")), "runs": runs,
              "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
              "load_average_before": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}
    if len(runs) > 1:
        first = runs[0]["seconds_per_step"]
        result["speed_ratio_vs_first"] = {str(r["threads"]): round(first / r["seconds_per_step"], 3) for r in runs}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result, indent=1))


def measure(args, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = load_config(args.config, [f"train.steps={args.steps}", "train.eval_every=0",
                                    f"train.checkpoint_every={args.steps + 1}"])
    base = args.captioner or captioner_path(cfg)
    policy = build_policy(cfg, path=base, reference=base)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        hist = train(Run(cfg, tmp, policy, build_reasoner(cfg), build_clarifier(cfg, policy), world_source(cfg)),
                         progress=False)
        wall = time.perf_counter() - t0
    steady = hist[1:]
    phases = ("generation", "reasoner", "clarification", "update")
    per_phase = {p: sum(h.get(f"time_{p}", 0.0) for h in steady) / len(steady) for p in phases}
    step_time = sum(h["time_step"] for h in steady) / len(steady)
    eps = cfg.train.problems_per_step * cfg.train.samples_per_problem
    return {
        "episodes_per_step": eps, "steps_measured": len(steady), "threads": threads,
        "seconds_per_step": round(step_time, 4), "episodes_per_second": round(eps / step_time, 1),
        "seconds_per_phase": {k: round(v, 4) for k, v in per_phase.items()},
        "share_per_phase": {k: round(v / step_time, 3) for k, v in per_phase.items()},
        "other_seconds_per_step": round(step_time - sum(per_phase.values()), 4),
        "wall_seconds_total": round(wall, 1),
    }


if __name__ == "__main__":
    main()
