"""Build backends from a config. The only place that maps config names to backend classes."""

from __future__ import annotations

import os

import torch

from acrl.config import SHIPPED_CAPTIONER, SHIPPED_REASONER, Config


def captioner_path(cfg: Config) -> str:
    if cfg.captioner.backend == "hf":
        if not cfg.captioner.path:
            raise ValueError("captioner.path is required for backend hf (model directory, hub name or checkpoint); "
                             "for a CPU check: acrl make-tiny --family qwen2-vl --out DIR")
        return cfg.captioner.path
    return cfg.captioner.path or SHIPPED_CAPTIONER


def build_policy(cfg: Config, path: str | None = None, reference: str | None = None):
    """The trainable captioner. ``path`` overrides ``cfg.captioner.path``; ``reference`` is π_ref's checkpoint."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.captioner.backend == "hf":
        from acrl.backends.hf import HFCaptioner, HFSettings

        policy = HFCaptioner.load(path or captioner_path(cfg), lora=cfg.captioner.lora,
                                  settings=HFSettings.from_config(cfg.captioner), reference=reference,
                                  micro_batch=cfg.train.micro_batch)
        if cfg.captioner.rollout_engine == "vllm":
            from acrl.backends.vllm_engine import RunShapes, make_engine

            policy.rollout_engine = make_engine(policy, cfg.captioner.vllm, RunShapes.from_config(cfg))
        elif cfg.captioner.rollout_engine != "hf":
            raise ValueError(f"unknown captioner.rollout_engine {cfg.captioner.rollout_engine!r} (hf, vllm)")
        return policy
    if cfg.captioner.backend != "tiny":
        raise ValueError(f"unknown captioner backend {cfg.captioner.backend!r} (available: tiny, hf)")
    from acrl.backends.tiny import TinyCaptioner

    path = path or captioner_path(cfg)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"captioner checkpoint {path!r} not found; run `acrl warmstart --out {path}` to create it")
    return TinyCaptioner.load(path, lora=cfg.captioner.lora, reference=reference)


def build_reasoner(cfg: Config):
    rc = cfg.reasoner
    if rc.few_shot and rc.backend in ("world", "tiny"):
        raise ValueError(f"reasoner.few_shot is for LLM reasoners (openai, hf); the {rc.backend} reasoner reads no "
                         f"examples (set reasoner.few_shot=0)")
    if rc.backend == "world":
        from acrl.world.reasoner import WorldReasoner

        return WorldReasoner(read_budget=rc.read_budget, noise=rc.noise, seed=rc.noise_seed)
    if rc.noise:
        raise ValueError(f"reasoner.noise is a world-reasoner setting; reasoner.backend={rc.backend!r} has its own "
                         f"errors (set reasoner.noise=0)")
    if rc.backend == "openai":
        from acrl.backends.openai_api import OpenAIReasoner

        return OpenAIReasoner.from_config(rc, few_shot=rc.few_shot).check()      # fails fast, naming the URL
    if rc.backend == "hf":
        from acrl.backends.hf_reasoner import HFReasoner
        from acrl.backends.hf_trainable import HFTrainableReasoner, is_trainable_checkpoint

        if not rc.model:
            raise ValueError("reasoner.backend=hf needs reasoner.model (a model directory or hub id)")
        kw = {"max_new_tokens": rc.max_tokens, "temperature": rc.temperature, "batch_size": rc.batch_size,
              "think": rc.think, "few_shot": rc.few_shot}
        if os.path.isdir(rc.model) and is_trainable_checkpoint(rc.model):   # a co-trained reasoner's adapter
            return HFTrainableReasoner.load(rc.model, **kw)
        return HFReasoner(rc.model, **kw)
    if rc.backend == "tiny":
        from acrl.backends.tiny_reasoner import TinyReasoner

        return TinyReasoner.load(rc.model or SHIPPED_REASONER, temperature=rc.temperature)
    raise ValueError(f"unknown reasoner backend {rc.backend!r} (available: world, openai, hf, tiny)")


def build_trainable_reasoner(cfg: Config, path: str, reference: str | None = None):
    """The reasoner co-training trains (``train.cotrain``), loaded from ``path`` (its start, or a checkpoint's
    ``reasoner/``); ``reference``: its start, the frozen KL anchor (tiny; hf: the adapter-disabled model)."""
    rc = cfg.reasoner
    if rc.backend == "tiny":
        from acrl.backends.tiny_reasoner import TinyReasoner

        return TinyReasoner.load(path, reference=reference, temperature=rc.temperature)
    if rc.backend == "hf":
        from acrl.backends.hf_trainable import HFTrainableReasoner, is_trainable_checkpoint

        kw = {"max_new_tokens": rc.max_tokens, "temperature": rc.temperature, "batch_size": rc.batch_size,
              "think": rc.think}
        if os.path.isdir(path) and is_trainable_checkpoint(path):
            return HFTrainableReasoner.load(path, **kw)
        return HFTrainableReasoner(path, lora=cfg.reasoner_train.lora, **kw)
    raise ValueError(f"reasoner.backend={rc.backend!r} cannot be trained (co-training needs tiny or hf)")


def build_clarifier(cfg: Config, reference, noise: float = 0.0, seed: int = 0):
    """π_ref (or a served VLM) as the clarifier, optionally made imperfect (world regime with a noisy clarifier)."""
    clarifier = reference
    if cfg.clarifier.backend == "openai":
        from acrl.backends.openai_api import OpenAIClarifier

        clarifier = OpenAIClarifier.from_config(cfg.clarifier).check()
    elif cfg.clarifier.backend != "reference":
        raise ValueError(f"unknown clarifier backend {cfg.clarifier.backend!r} (available: reference, openai)")
    if noise > 0:
        from acrl.world.reasoner import NoisyClarifier

        return NoisyClarifier(clarifier, noise, seed)
    return clarifier


def data_source(path: str, limit: int | None = None, report_to: str | None = None):
    """Training problems from a local visual-math set (ViRL39K, Geometry3K, ...), cycled in a fixed order.

    Every skipped row is counted: one line on stdout (with the first few by id and reason) and, with
    ``report_to``, all of them in ``report_to/bad_rows.jsonl``."""
    import json

    from acrl.data import load_training_set

    res = load_training_set(path, limit=limit)
    if not res.problems:
        raise ValueError(f"training set {path!r} has no usable rows ({len(res.bad)} bad"
                         + (f", e.g. {res.bad[0].id}: {res.bad[0].reason}" if res.bad else "") + ")")
    print(f"training set: {res.describe()}")
    if report_to:
        os.makedirs(report_to, exist_ok=True)
        with open(os.path.join(report_to, "bad_rows.jsonl"), "w") as fh:
            fh.writelines(json.dumps({"id": b.id, "reason": b.reason}) + "\n" for b in res.bad)
    problems = res.problems
    return lambda start, n: [problems[(start + i) % len(problems)] for i in range(n)]


def world_source(cfg: Config, split: str = "train"):
    from acrl.world import make_problems

    return lambda start, n: make_problems(split, n, cfg.world, start=start)
