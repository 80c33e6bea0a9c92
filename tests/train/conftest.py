"""Helpers of the training tests: a batch of coloured problems, a reasoner that decides from a hash of the caption,
and a captioner that samples a step's whole batch so that every rank sees the same captions."""

import time
import zlib

import torch
from PIL import Image

from acrl.backends.tiny import TinyCaptioner
from acrl.backends.tiny.captioner import _Context
from acrl.config import Config, TinyVLMConfig
from acrl.problem import Problem
from acrl.rollout.prompts import parse_prompt
from acrl.rollout.protocols import Rollout
from acrl.train.distributed import Dist, shard

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
