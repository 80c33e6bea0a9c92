"""Multi-process training on CPU (gloo): two ranks update exactly like one process on the same global batch.

To make the comparison exact, every run sees the same captions: the policy (``SharedSampling``) samples the *whole*
step's batch with a fixed seed and hands each rank its share (the trainer gives rank r the r-th contiguous block of
problems). The reasoner is a deterministic function of the caption with a mix of direct, clarified, wrong and failed
episodes, so the BNPO fit, the validity masks and the loss normalisation all matter. The same two processes then
check that a resumed two-rank run (per-rank random states in the checkpoint) reproduces an uninterrupted one, and
a last test runs the real CLI under ``accelerate launch`` with ``configs/accelerate/ddp.yaml``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import MICRO as MICRO_YAML
from conftest import ROOT, free_port, lines

from acrl.backends.tiny import TinyCaptioner
from acrl.train.distributed import SINGLE, Dist, setup, shard
from acrl.train.loop import Run, train
from train.conftest import MICRO, Reasoner, SharedSampling, config, problems


def run(out: str, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """Train the micro captioner for two steps; returns its trainable parameters."""
    cfg = config()
    policy = SharedSampling(TinyCaptioner.create(MICRO, seed=0), cfg.train.problems_per_step, rank, world)
    train(Run(cfg, out, policy, Reasoner(), policy, problems), progress=False)
    return [p.detach().clone() for p in policy.trainable_parameters()]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    params = run(os.path.join(out, "shared"), rank, world)
    torch.save(params, os.path.join(out, "shared", f"params-rank{rank}.pt"))

    # Resuming: each rank samples its own captions (its own seed); a straight run vs. one step + --resume.
    base = os.path.join(out, f"base-rank{rank}")
    TinyCaptioner.create(MICRO, seed=0).save(base)
    cfg = config()
    for name, steps, resume in (("straight", 2, False), ("split", 1, False), ("split", 2, True)):
        cfg.train.steps = steps
        run_dir = os.path.join(out, name)
        policy = TinyCaptioner.load(os.path.join(run_dir, "checkpoint", "policy") if resume else base, reference=base)
        train(Run(cfg, run_dir, policy, Reasoner(), policy, problems, resume=resume), progress=False)
    torch.distributed.destroy_process_group()


def _without_times(records):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in records]


def test_two_processes_update_like_one_and_resume(tmp_path):
    one = run(str(tmp_path / "one"))
    procs = mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not procs.join(timeout=1):   # re-raises a rank's exception
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.terminate()
            pytest.fail("the two ranks did not finish within 240 s (a collective that never completes?)")
    two = tmp_path / "shared"
    ranks = [torch.load(two / f"params-rank{r}.pt") for r in range(2)]
    for a, b, c in zip(one, *ranks):
        assert torch.equal(b, c)                      # the replicas stay identical
        assert torch.allclose(a, b, atol=1e-6, rtol=0), float((a - b).abs().max())
    start = TinyCaptioner.create(MICRO, seed=0).trainable_parameters()
    assert max(float((a - p.detach()).abs().max()) for a, p in zip(one, start)) > 1e-4   # moved far beyond 1e-6

    m1, m2 = lines(tmp_path / "one" / "metrics.jsonl"), lines(two / "metrics.jsonl")
    assert [m["step"] for m in m2] == [1, 2]           # only rank 0 writes
    for x, y in zip(m1, m2):
        assert {k for k in x if not k.startswith("time_")} == {k for k in y if not k.startswith("time_")}
        for k, v in x.items():
            if not k.startswith("time_") and isinstance(v, float):
                assert abs(v - y[k]) < 1e-6, (k, v, y[k])
            elif not k.startswith("time_"):
                assert v == y[k], k
    assert 0 < m1[0]["failed"] < m1[0]["episodes"] and m1[0]["clarification_rate"] > 0 and "loss" in m1[0]
    assert lines(tmp_path / "one" / "episodes.jsonl") == lines(two / "episodes.jsonl")   # the whole batch
    state = torch.load(two / "checkpoint" / "state.pt", weights_only=False)
    assert len(state["rng"]) == 2 and state["step"] == 2

    straight, split = tmp_path / "straight", tmp_path / "split"   # resuming reproduces the uninterrupted run
    assert _without_times(lines(straight / "metrics.jsonl")) == _without_times(lines(split / "metrics.jsonl"))
    assert lines(straight / "episodes.jsonl") == lines(split / "episodes.jsonl")
    a, b = (torch.load(d / "checkpoint" / "policy" / "model.pt") for d in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = setup()
    assert d is SINGLE and d.is_main and (d.rank, d.world) == (0, 1)
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(d.all_sum(x), x) and d.gather("a") == ["a"]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    d.sum_gradients([p])
    d.broadcast([p])
    assert torch.equal(p.grad, torch.full((2,), 3.0)) and torch.equal(p.data, torch.ones(2))
    assert shard(6, Dist(1, 3)) == slice(2, 4)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        shard(5, Dist(0, 2))


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_sharded_launches_are_refused_with_a_pointer(monkeypatch, flag):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(flag, "true")
    with pytest.raises(ValueError, match="docs/scaling.md"):
        setup()


def test_accelerate_launch_runs_the_cli_on_two_cpu_ranks(tmp_path, micro_captioner):
    """`accelerate launch --config_file configs/accelerate/ddp.yaml` with two processes on CPU (gloo)."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch",
           "--config_file", os.path.join(ROOT, "configs", "accelerate", "ddp.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "acrl", "train", "--config", MICRO_YAML,
           "--captioner", str(micro_captioner), "--out", str(tmp_path), "--steps", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = lines(tmp_path / "metrics.jsonl")
    assert [x["step"] for x in m] == [1, 2] and all(x["episodes"] == 2 * 4 and "loss" in x for x in m)
    assert len(torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["rng"]) == 2
