"""Multi-process training on CPU (gloo): two ranks update exactly like one process on the same global batch.

To make the comparison exact, every run sees the same captions: the policy below samples the *whole* step's batch
with a fixed seed and hands each rank its share (the trainer gives rank r the r-th contiguous block of problems).
The reasoner is a deterministic function of the caption with a mix of direct, clarified, wrong and failed
episodes, so the BNPO fit, the validity masks and the loss normalisation all matter. The same two processes then
check that a resumed two-rank run (per-rank random states in the checkpoint) reproduces an uninterrupted one, and
a last test runs the real CLI under ``accelerate launch`` with ``configs/accelerate/ddp.yaml``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib

import pytest
import torch
import torch.multiprocessing as mp
from conftest import MICRO as MICRO_YAML
from conftest import ROOT
from PIL import Image

from acrl.backends.tiny import TinyCaptioner
from acrl.backends.tiny.captioner import _Context
from acrl.config import Config, TinyVLMConfig
from acrl.problem import Problem
from acrl.rollout.prompts import parse_prompt
from acrl.rollout.protocols import Rollout
from acrl.train.collect import rollout_step
from acrl.train.distributed import SINGLE, Dist, setup, shard
from acrl.train.loop import Run, train

MICRO = TinyVLMConfig(d_model=32, n_heads=2, n_layers=1, cnn_width=8, max_new_tokens=8)
COLOURS = ["red", "green", "blue", "purple", "orange", "white", "black", "yellow"]


def problems(start: int, n: int) -> list[Problem]:
    return [Problem(id=f"p{i}", image=Image.new("RGB", (64, 64), COLOURS[i % len(COLOURS)]),
                    question=f"how many shapes are in figure {i}?", answer=str(i % 7)) for i in range(start, start + n)]


class Reasoner:
    """Decides from a hash of the caption: answer right, answer wrong, ask, or fail (a service error)."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.calls = delay, []

    def complete(self, prompts):
        t0 = time.perf_counter()
        time.sleep(self.delay)
        out = []
        for prompt in prompts:
            sec = parse_prompt(prompt)
            gold = str(int(sec["question"].split()[-1].rstrip("?")) % 7)
            h = zlib.crc32(((sec["caption"] or "") + (sec["clarification"] or "")).encode())
            if sec["mode"] == "final":
                out.append(f"SOLVED \\boxed{{{gold if h % 2 else 99}}}")
            else:
                out.append([f"SOLVED \\boxed{{{gold}}}", "SOLVED \\boxed{99}", "NEED MORE INFO\nWhat colour is it?",
                            RuntimeError("reasoner unavailable"), f"SOLVED \\boxed{{{gold}}}"][h % 5])
        self.calls.append((t0, time.perf_counter()))
        return out


class SharedSampling:
    """A TinyCaptioner whose ``generate`` samples the step's whole batch with a fixed seed and returns this rank's
    rows: one process and every rank of a multi-process run then see the same captions."""

    def __init__(self, inner: TinyCaptioner, batch: int, rank: int = 0, world: int = 1):
        self.inner, self.batch, self.rank, self.world, self.calls = inner, batch, rank, world, 0

    def generate(self, images, prompts, n, **kw):
        whole = problems(self.calls * self.batch, self.batch)
        self.calls += 1
        torch.manual_seed(1000 + self.calls)
        roll = self.inner.generate([p.image for p in whole], [p.question_with_choices() for p in whole], n, **kw)
        g = shard(self.batch, Dist(self.rank, self.world))
        assert prompts == [p.question_with_choices() for p in whole[g]], "the trainer's shard is not contiguous"
        r = slice(g.start * n, g.stop * n)
        ctx = roll.context
        return Rollout(roll.tokens[r], roll.mask[r], roll.logprobs[r], roll.temperature, texts=roll.texts[g],
                       context=_Context(ctx.pixels[g], ctx.prompt[g], n))

    def __getattr__(self, name):
        return getattr(self.inner, name)


def config() -> Config:
    cfg = Config()
    cfg.captioner.max_new_tokens = 8
    for k, v in dict(steps=2, problems_per_step=4, samples_per_problem=4, micro_batch=3, lr=3e-4, kl_beta=0.1,
                     checkpoint_every=1, log_episodes=4, advantage="bnpo",
                     max_failed_fraction=0.5).items():   # a few failed episodes are masked, not retried
        setattr(cfg.train, k, v)
    return cfg


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(path):
    return [json.loads(x) for x in open(path) if x.strip()]


def _without_times(records):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in records]


def test_two_processes_update_like_one_and_resume(tmp_path):
    one = run(str(tmp_path / "one"))
    procs = mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
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

    m1, m2 = _lines(tmp_path / "one" / "metrics.jsonl"), _lines(two / "metrics.jsonl")
    assert [m["step"] for m in m2] == [1, 2]           # only rank 0 writes
    for x, y in zip(m1, m2):
        assert {k for k in x if not k.startswith("time_")} == {k for k in y if not k.startswith("time_")}
        for k, v in x.items():
            if not k.startswith("time_") and isinstance(v, float):
                assert abs(v - y[k]) < 1e-6, (k, v, y[k])
            elif not k.startswith("time_"):
                assert v == y[k], k
    assert 0 < m1[0]["failed"] < m1[0]["episodes"] and m1[0]["clarification_rate"] > 0 and "loss" in m1[0]
    assert _lines(tmp_path / "one" / "episodes.jsonl") == _lines(two / "episodes.jsonl")   # the whole batch
    state = torch.load(two / "checkpoint" / "state.pt", weights_only=False)
    assert len(state["rng"]) == 2 and state["step"] == 2

    straight, split = tmp_path / "straight", tmp_path / "split"   # resuming reproduces the uninterrupted run
    assert _without_times(_lines(straight / "metrics.jsonl")) == _without_times(_lines(split / "metrics.jsonl"))
    assert _lines(straight / "episodes.jsonl") == _lines(split / "episodes.jsonl")
    a, b = (torch.load(d / "checkpoint" / "policy" / "model.pt") for d in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_overlapped_reference_pass_changes_nothing():
    """The episodes run in a thread while π_ref's log-probs are computed; results equal the sequential path."""
    cfg = config()
    out = {}
    for overlap in (False, True):
        policy = SharedSampling(TinyCaptioner.create(MICRO, seed=0), cfg.train.problems_per_step)
        reasoner = Reasoner(delay=0.2)
        torch.manual_seed(0)
        roll, groups, ref, times = rollout_step(policy, problems(0, 4), reasoner, policy, cfg, overlap=overlap)
        out[overlap] = roll, json.dumps([[ep.to_json() for ep in g] for g in groups]), ref   # NaN == NaN
        if overlap:
            assert times["reference"] > 0 and times["episodes"] >= 0.2
    (r0, g0, ref0), (r1, g1, ref1) = out[False], out[True]
    assert torch.equal(r0.tokens, r1.tokens) and g0 == g1 and torch.equal(ref0, ref1)


def test_overlap_really_overlaps():
    cfg = config()
    policy = SharedSampling(TinyCaptioner.create(MICRO, seed=0), cfg.train.problems_per_step)
    seen = {}
    inner_logprobs = policy.inner.logprobs

    def logprobs(*a, **kw):   # record when the reference pass runs and in which thread
        seen.setdefault("start", time.perf_counter())
        seen["thread"] = threading.current_thread()
        return inner_logprobs(*a, **kw)

    policy.inner.logprobs = logprobs
    reasoner = Reasoner(delay=0.3)
    rollout_step(policy, problems(0, 4), reasoner, policy, cfg, overlap=True)
    first_call_start, first_call_end = reasoner.calls[0]
    assert seen["thread"] is threading.main_thread()
    assert seen["start"] < first_call_end


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
           "--main_process_port", str(_free_port()), "-m", "acrl", "train", "--config", MICRO_YAML,
           "--captioner", str(micro_captioner), "--out", str(tmp_path), "--steps", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = _lines(tmp_path / "metrics.jsonl")
    assert [x["step"] for x in m] == [1, 2] and all(x["episodes"] == 2 * 4 and "loss" in x for x in m)
    assert len(torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["rng"]) == 2
