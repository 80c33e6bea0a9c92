"""Assemble runs from a config: the one place that maps config names to backend classes, and the one place a
training run is put together (:func:`make_run`, used by ``acrl train``, ``acrl sweep`` and ``acrl demo``, so one
config and seed give the same run through every command).

Seeds of the environment, fixed here once: the training clarifier (a noisy π_ref) draws from ``train.seed +
rank``; every evaluation clarifier from :data:`EVAL_SEED`, so all arms and seeds are evaluated under the same
noise.
"""

from __future__ import annotations

import json
import os

import torch

from acrl.backends.hf.captioner import HFCaptioner
from acrl.backends.hf.reasoner import HFReasoner
from acrl.backends.hf.trainable import HFTrainableReasoner, is_trainable_checkpoint
from acrl.backends.openai_api import OpenAIClarifier, OpenAIReasoner
from acrl.backends.tiny import TinyCaptioner, TinyReasoner
from acrl.backends.vllm_engine import RunShapes, make_engine
from acrl.config import SHIPPED_CAPTIONER, SHIPPED_REASONER, Config, HFSettings, eval_view
from acrl.data import load_training_set
from acrl.eval.evaluate import evaluate
from acrl.problem import Problem
from acrl.train import checkpoint
from acrl.train.distributed import setup
from acrl.train.learner import REASONER_DIR, ReasonerLearner
from acrl.train.loop import Run
from acrl.train.run import prepare
from acrl.world import make_problems
from acrl.world.reasoner import NoisyClarifier, WorldReasoner


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
        policy = HFCaptioner.load(path or captioner_path(cfg), lora=cfg.captioner.lora,
                                  settings=HFSettings.from_config(cfg.captioner), reference=reference,
                                  micro_batch=cfg.train.micro_batch)
        if cfg.captioner.rollout_engine == "vllm":
            policy.rollout_engine = make_engine(policy, cfg.captioner.vllm, RunShapes.from_config(cfg))
        return policy

    path = path or captioner_path(cfg)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"captioner checkpoint {path!r} not found; run `acrl warmstart --out {path}` to create it")
    return TinyCaptioner.load(path, lora=cfg.captioner.lora, reference=reference)


def build_reasoner(cfg: Config):
    rc = cfg.reasoner
    if rc.backend == "world":
        return WorldReasoner(read_budget=rc.read_budget, noise=rc.noise, seed=rc.noise_seed)
    if rc.backend == "openai":
        return OpenAIReasoner.from_config(rc, few_shot=rc.few_shot).check()      # fails fast, naming the URL
    if rc.backend == "hf":
        kw = {"max_new_tokens": rc.max_tokens, "temperature": rc.temperature, "batch_size": rc.batch_size,
              "think": rc.think, "few_shot": rc.few_shot}
        if os.path.isdir(rc.model) and is_trainable_checkpoint(rc.model):   # a co-trained reasoner's adapter
            return HFTrainableReasoner.load(rc.model, **kw)
        return HFReasoner(rc.model, **kw)
    if rc.backend == "tiny":
        return TinyReasoner.load(rc.model or SHIPPED_REASONER, temperature=rc.temperature)
    raise ValueError(f"unknown reasoner backend {rc.backend!r} (available: world, openai, hf, tiny)")


def build_trainable_reasoner(cfg: Config, path: str, reference: str | None = None):
    """The reasoner co-training trains (``train.cotrain``), loaded from ``path`` (its start, or a checkpoint's
    ``reasoner/``); ``reference``: its start, the frozen KL anchor (tiny; hf: the adapter-disabled model)."""
    rc = cfg.reasoner
    if rc.backend == "tiny":
        return TinyReasoner.load(path, reference=reference, temperature=rc.temperature)
    if rc.backend == "hf":
        kw = {"max_new_tokens": rc.max_tokens, "temperature": rc.temperature, "batch_size": rc.batch_size,
              "think": rc.think, "gradient_checkpointing": cfg.reasoner_train.gradient_checkpointing}
        if os.path.isdir(path) and is_trainable_checkpoint(path):
            return HFTrainableReasoner.load(path, **kw)
        return HFTrainableReasoner(path, lora=cfg.reasoner_train.lora, **kw)
    raise ValueError(f"reasoner.backend={rc.backend!r} cannot be trained (co-training needs tiny or hf)")


def build_clarifier(cfg: Config, reference, noise: float = 0.0, seed: int = 0):
    """π_ref (or a served VLM) as the clarifier, optionally made imperfect (world regime with a noisy clarifier)."""
    clarifier = reference
    if cfg.clarifier.backend == "openai":
        clarifier = OpenAIClarifier.from_config(cfg.clarifier).check()
    elif cfg.clarifier.backend != "reference":
        raise ValueError(f"unknown clarifier backend {cfg.clarifier.backend!r} (available: reference, openai)")
    if noise > 0:
        return NoisyClarifier(clarifier, noise, seed)
    return clarifier


def data_source(path: str, limit: int | None = None, report_to: str | None = None, holdout: int = 0):
    """Training problems from a local visual-math set (ViRL39K, Geometry3K, ...), cycled in a fixed order, and the
    last ``holdout`` of them held out (never trained on) for the held-out curve. Returns ``(source, held out)``.

    Every skipped row is counted: one line on stdout (with the first few by id and reason) and, with
    ``report_to``, all of them in ``report_to/bad_rows.jsonl``."""
    res = load_training_set(path, limit=limit)
    if not res.problems:
        raise ValueError(f"training set {path!r} has no usable rows ({len(res.bad)} bad"
                         + (f", e.g. {res.bad[0].id}: {res.bad[0].reason}" if res.bad else "") + ")")
    if holdout and len(res.problems) <= holdout:
        raise ValueError(f"training set {path!r} has {len(res.problems)} usable rows: too few to hold out "
                         f"train.eval_n={holdout} for the held-out curve (lower train.eval_n)")
    print(f"training set: {res.describe()}" + (f"; the last {holdout} held out for evaluation" if holdout else ""))
    if report_to:
        os.makedirs(report_to, exist_ok=True)
        with open(os.path.join(report_to, "bad_rows.jsonl"), "w") as fh:
            fh.writelines(json.dumps({"id": b.id, "reason": b.reason}) + "\n" for b in res.bad)
    problems = res.problems[:len(res.problems) - holdout]
    heldout = res.problems[len(problems):]
    return (lambda start, n: [problems[(start + i) % len(problems)] for i in range(n)]), heldout


def world_source(cfg: Config, split: str = "train"):
    """The embedded world's problems of ``split``, generated on demand from the run's world config."""
    return lambda start, n: make_problems(split, n, cfg.world, start=start)


def reasoner_start(cfg) -> str:
    """The reasoner a co-training run starts from (and anchors its KL to)."""
    if cfg.reasoner.backend == "hf":
        return cfg.reasoner.model
    return cfg.reasoner.model or SHIPPED_REASONER


def build_learner(cfg, checkpoint_dir: str | None = None) -> ReasonerLearner:
    """The co-training learner of ``cfg``: the reasoner from ``checkpoint_dir``'s ``reasoner/`` (resume, with its
    optimiser) or from its start (:func:`reasoner_start`)."""
    start = reasoner_start(cfg)
    path = os.path.join(checkpoint_dir, REASONER_DIR) if checkpoint_dir else start
    if checkpoint_dir and not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {checkpoint_dir} has no {REASONER_DIR}/: it is not a co-training "
                                f"checkpoint (resume it without train.cotrain)")
    return ReasonerLearner(build_trainable_reasoner(cfg, path, reference=start), cfg)


EVAL_SEED = 777                # the evaluation clarifier's noise stream (all arms and seeds alike)
CURVE_KEYS = ("accuracy", "clarification_rate", "accuracy_with_clarification")


def shares_reference(cfg: Config) -> bool:
    """With an hf LoRA captioner, the policy's own ``answer()`` is π_ref (adapter disabled): no second copy."""
    return cfg.captioner.backend == "hf" and cfg.captioner.lora.enabled


def views(cfg: Config) -> dict[str, Config]:
    """The evaluated worlds: ``in`` (the training one) and every ``eval.sets`` view."""
    return {"in": cfg, **{name: eval_view(cfg, name) for name in cfg.eval.sets}}


def evaluators(cfg: Config, policy, reference, colearner=None) -> dict[str, tuple]:
    """(reasoner, clarifier, max clarifications) per evaluated view; a co-trained reasoner is evaluated (greedy)
    wherever the run's reasoner is."""
    return {name: (colearner.reasoner if colearner and v.reasoner == cfg.reasoner else build_reasoner(v),
                   build_clarifier(v, reference, v.train.clarifier_noise, EVAL_SEED), v.train.max_clarifications)
            for name, v in views(cfg).items()}


def periodic_eval(cfg: Config, policy, reference, colearner=None, heldout: list[Problem] | None = None):
    """The held-out curve of a training run: every view's ``val`` problems (``train.eval_n``), or the held-out
    slice of the training data (``heldout``) when the run trains on a data set; keys of views other than ``in``
    are prefixed with the view's name."""
    evals, vs = evaluators(cfg, policy, reference, colearner), views(cfg)
    if heldout is not None:
        evals = {"in": evals["in"]}
    sets = {name: heldout if heldout is not None else make_problems("val", cfg.train.eval_n, vs[name].world)
            for name in evals}

    def curve(step: int) -> dict:
        out = {}
        for name, (reasoner, _, k) in evals.items():   # a fresh noise stream: every evaluation sees the same noise
            clarifier = build_clarifier(vs[name], reference, vs[name].train.clarifier_noise, EVAL_SEED)
            s, _ = evaluate(policy, reasoner, clarifier, sets[name], cfg.eval.batch_size, max_clarifications=k)
            out.update({(key if name == "in" else f"{name}.{key}"): s["overall"][key] for key in CURVE_KEYS})
        return out
    return curve


def make_run(cfg: Config, out: str, captioner: str | None = None, data: str | None = None,
             resume: bool | str = False, overwrite: bool = False, allow_change: bool = False,
             stored: dict | None = None) -> Run:
    """The training run of ``cfg`` in ``out``: policy (from the checkpoint when resuming), π_ref, the training
    reasoner and clarifier, the co-trained reasoner's learner, the held-out curve and the problem source.

    ``captioner``: the starting checkpoint (default: ``captioner.path`` or the shipped world captioner), also π_ref
    unless ``train.reference``. ``data``: a local training set (default: the embedded world); its last
    ``train.eval_n`` problems are held out for the curve. ``resume``: continue the run in ``out`` (True), or
    ``"auto"``: continue it when it has a checkpoint, else start it afresh. ``stored``: the run's ``run.json``
    (read by the caller to load ``cfg``)."""
    dist = setup()   # under `accelerate launch`: join the process group and pick this rank's GPU before loading
    if resume == "auto":
        resume = bool(checkpoint.latest(out).path)
        overwrite = overwrite or not resume
    base = captioner or (stored or {}).get("captioner") or captioner_path(cfg)
    reference = cfg.train.reference or base   # π_ref: answers clarifications, anchors the KL
    data = data or (stored or {}).get("data")
    found = prepare(out, cfg, base, data, stored, resume, overwrite, allow_change, dist)
    checkpoint.set_seed(cfg.train.seed)   # a new adapter's init: the same on every rank and in every process
    policy = build_policy(cfg, path=os.path.join(found, "policy") if found else base, reference=reference)
    clarifier = build_clarifier(cfg, policy, cfg.train.clarifier_noise, cfg.train.seed + dist.rank)
    colearner = build_learner(cfg, found) if cfg.train.cotrain else None
    problems, heldout = world_source(cfg), None
    if data:
        problems, heldout = data_source(data, holdout=cfg.train.eval_n if cfg.train.eval_every else 0,
                                        report_to=out if dist.is_main else None)
    curve, ref_policy = None, None
    if dist.is_main:   # only rank 0 evaluates
        ref_policy = policy if shares_reference(cfg) else build_policy(cfg, path=reference)
        curve = periodic_eval(cfg, policy, ref_policy, colearner, heldout) if cfg.train.eval_every else None
    return Run(cfg, out, policy, colearner.recorder if colearner else build_reasoner(cfg), clarifier, problems,
               evaluate=curve, colearner=colearner, reference=ref_policy, resume=found or False,
               overwrite=overwrite)
