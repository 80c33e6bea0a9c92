"""CPU time of the tiny reasoner's warm start, one thread.

    python benchmarks/reasoner_warmstart_time.py [--steps 30]

Runs ``--steps`` optimisation steps of :func:`acrl.train.reasoner_warmstart.warm_start_reasoner`'s loop (fresh batches
of 64 prompts, the default model) and one held-out check, timing each with ``time.process_time`` (this
process's CPU seconds, so other load on a shared machine does not count) and wall time. Extrapolates to the
default 2000 steps with a check every 150. Writes ``benchmarks/results/reasoner_warmstart_time.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

import torch

from acrl.backends.tiny import TinyReasoner
from acrl.train.reasoner_warmstart import ReasonerWarmStartConfig, evaluate_reasoner, training_batch
from acrl.world import WorldConfig
from acrl.world.reasoner import WorldReasoner

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg, world = ReasonerWarmStartConfig(), WorldConfig()
    reasoner = TinyReasoner.create(seed=0)
    opt = torch.optim.AdamW(reasoner.model.parameters(), lr=cfg.lr)
    teacher, rng = WorldReasoner(cfg.read_budget), random.Random(0)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for step in range(args.steps):
        prompts, targets = training_batch(reasoner, world, cfg, step, rng, teacher)
        loss = reasoner.supervised_loss(prompts, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step_cpu, step_wall = ((time.process_time() - cpu0) / args.steps, (time.perf_counter() - wall0) / args.steps)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    evaluate_reasoner(reasoner, world, cfg.eval_n)
    check_cpu, check_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    checks = cfg.steps // cfg.eval_every + 1
    out = {"steps_timed": args.steps, "batch_size": cfg.batch_size, "parameters": reasoner.num_parameters(),
           "cpu_s_per_step": round(step_cpu, 4), "wall_s_per_step": round(step_wall, 4),
           "cpu_s_per_check": round(check_cpu, 2), "wall_s_per_check": round(check_wall, 2),
           "default_steps": cfg.steps, "default_checks": checks,
           "estimated_cpu_minutes_default_run": round((cfg.steps * step_cpu + checks * check_cpu) / 60, 1),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or
           platform.machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "reasoner_warmstart_time.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
