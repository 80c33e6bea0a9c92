"""Build backends from a config. The only place that maps config names to backend classes."""

from __future__ import annotations

import os

import torch

from acrl.config import SHIPPED_CAPTIONER, Config


def captioner_path(cfg: Config) -> str:
    return cfg.captioner.path or SHIPPED_CAPTIONER


def build_policy(cfg: Config, path: str | None = None, reference: str | None = None):
    """The trainable captioner. ``path`` overrides ``cfg.captioner.path``; ``reference`` is π_ref's checkpoint."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.captioner.backend != "tiny":
        raise ValueError(f"unknown captioner backend {cfg.captioner.backend!r} (available: tiny)")
    from acrl.backends.tiny import TinyCaptioner

    path = path or captioner_path(cfg)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"captioner checkpoint {path!r} not found; run `acrl warmstart --out {path}` to create it")
    return TinyCaptioner.load(path, lora=cfg.captioner.lora, reference=reference)


def build_reasoner(cfg: Config):
    if cfg.reasoner.backend == "world":
        from acrl.backends.world import WorldReasoner

        return WorldReasoner(read_budget=cfg.reasoner.read_budget)
    raise ValueError(f"unknown reasoner backend {cfg.reasoner.backend!r} (available: world)")


def build_clarifier(cfg: Config, reference, noise: float = 0.0, seed: int = 0):
    """π_ref as the clarifier, optionally made imperfect (world regime with a noisy clarifier)."""
    if noise > 0:
        from acrl.backends.world import NoisyClarifier

        return NoisyClarifier(reference, noise, seed)
    return reference


def world_source(cfg: Config, split: str = "train"):
    from acrl.world import make_problems

    return lambda start, n: make_problems(split, n, cfg.world, start=start)
