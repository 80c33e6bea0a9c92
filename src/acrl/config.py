"""Configuration: dataclasses with documented fields, loaded from YAML (``configs/``) with ``--set a.b=v`` overrides."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import yaml

from acrl.backends.hf import HFSettings
from acrl.backends.tiny import LoraSettings, TinyVLMConfig
from acrl.backends.vllm_engine import VLLMSettings
from acrl.warmstart import WarmStartConfig
from acrl.world import WorldConfig

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
SHIPPED_CAPTIONER = os.path.join(ASSETS, "world-captioner")


@dataclass
class CaptionerConfig(HFSettings):
    """The trainable captioner (and, through it, the reference π_ref).

    Attributes:
        backend: ``tiny`` (the embedded world's PyTorch VLM) or ``hf`` (a Hugging Face VLM: Qwen2-VL, Qwen2.5-VL,
            InternVL, Llava).
        path: checkpoint directory (hf: also a hub name or a saved adapter); empty (tiny) = the shipped
            warm-started world captioner.
        lora: LoRA settings (``lora.enabled: false`` trains all weights and keeps a frozen copy as π_ref; with LoRA
            π_ref is the same model with the adapter disabled).
        temperature: sampling temperature for training captions.
        max_new_tokens: caption length cap in tokens.
        (hf) dtype, device, attn_implementation, gradient_checkpointing, max_pixels, freeze_vision, top_p,
            generation_batch_size, logprob_batch_size, recompute_logprobs, answer_max_new_tokens, processor_kwargs,
            trust_remote_code, share_prompt_cache: inherited from and documented in
            :class:`acrl.backends.hf.HFSettings` (one definition, one set of defaults).
        rollout_engine: (hf) what samples the captions and π_ref's answers: ``hf`` (the training model itself) or
            ``vllm`` (a vLLM engine with the base weights and the current LoRA adapter; needs ``lora.enabled``
            and the ``[gpu]`` extra; see docs/scaling.md).
        vllm: (hf, ``rollout_engine: vllm``) the engine's settings: ``mode`` (colocate | server),
            ``gpu_memory_utilization``, ``sleep_level``, ... (:class:`acrl.backends.vllm_engine.VLLMSettings`).
    """

    backend: str = "tiny"
    path: str = ""
    lora: LoraSettings = field(default_factory=LoraSettings)
    temperature: float = 1.0
    max_new_tokens: int = 40
    rollout_engine: str = "hf"
    vllm: VLLMSettings = field(default_factory=VLLMSettings)


@dataclass
class ReasonerConfig:
    """The frozen text-only reasoner.

    Attributes:
        backend: ``world`` (deterministic world reasoner), ``openai`` (any OpenAI-compatible endpoint: vLLM,
            SGLang, ``acrl serve reasoner``) or ``hf`` (a local Hugging Face text LLM, in process).
        read_budget: (world) statements of a caption the world reasoner reads before it stops reading.
        base_url: (openai) the server, e.g. ``http://127.0.0.1:8000/v1``.
        model: (openai) served model name (empty: the server's first); (hf) model directory or hub id.
        api_key_env: (openai) environment variable holding the API key.
        concurrency: (openai) requests in flight at once.
        timeout: (openai) seconds per request. max_retries: (openai) retries on connection errors, 429 and 5xx.
        temperature: sampling temperature of the reasoner. max_tokens: reply length cap.
        think: ``strip`` or ``keep`` R1-style ``<think>`` blocks before parsing.
        cache: (openai) response cache for temperature-0 calls: ``""``, ``memory`` or a ``.jsonl`` path.
        batch_size: (hf) prompts per generate call.
    """

    backend: str = "world"
    read_budget: int = 6
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 32
    timeout: float = 300.0
    max_retries: int = 4
    temperature: float = 0.0
    max_tokens: int = 4096
    think: str = "strip"
    cache: str = ""
    batch_size: int = 8


@dataclass
class ClarifierConfig:
    """Who answers clarification questions.

    Attributes:
        backend: ``reference`` (π_ref in process: the frozen starting captioner) or ``openai`` (a VLM behind an
            OpenAI-compatible endpoint: vLLM, ``acrl serve clarifier``).
        base_url, model, api_key_env, concurrency, timeout, max_retries, temperature, max_tokens, cache: as in
            :class:`ReasonerConfig`.
    """

    backend: str = "reference"
    base_url: str = "http://127.0.0.1:8001/v1"
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 32
    timeout: float = 60.0
    max_retries: int = 4
    temperature: float = 0.0
    max_tokens: int = 64
    cache: str = ""


@dataclass
class TrainConfig:
    """AC-RL training.

    Attributes:
        steps: optimisation steps (each: sample problems, M captions each, episodes, one update).
        problems_per_step: problems per step (B).
        samples_per_problem: captions per problem (M, the advantage group; 8 in the paper).
        alpha: reward for a correct answer after one clarification (0.7 in the paper, 0 = binary ablation).
        advantage: ``bnpo`` | ``bnpo_decomposed`` | ``grpo`` | ``rloo`` | ``reinforce``.
        lr: AdamW learning rate (constant after ``warmup`` steps of linear warm-up).
        warmup: warm-up steps. weight_decay: AdamW weight decay. grad_clip: max gradient norm.
        clip_low / clip_high: PPO ratio clip range [1-clip_low, 1+clip_high].
        kl_beta: weight of the k3 KL penalty to π_ref.
        aggregation: token aggregation of the loss (``seq-mean-token-mean``, ``seq-mean-token-sum``, ``token-mean``,
            ``seq-mean-token-sum-norm``).
        epochs: optimisation passes over each rollout batch (old log-probs kept for the ratio).
        micro_batch: caption rows per forward/backward (gradients accumulate over the step).
        clarifier_noise: probability that π_ref's answer states a wrong value (world regime "noisy clarifier").
        max_failed_fraction: skip a step whose failed-episode share exceeds this.
        eval_every: steps between held-out evaluations during training (0: none). eval_n: problems per check.
        checkpoint_every: steps between checkpoints (the last step always writes one).
        log_episodes: groups per step whose transcripts go to ``episodes.jsonl``.
        seed: seed of model sampling and data order.
        threads: torch CPU threads (0: torch's default).
        report_to: also send step metrics to experiment trackers through accelerate (``tensorboard``, ``wandb``,
            ``all``; empty: only ``metrics.jsonl``). The tracker's package must be installed.
        overlap: compute π_ref's log-probs for the KL term while the step's episodes run (in a worker thread),
            so the reasoner's calls do not wait for them; the results are the same either way.
    """

    steps: int = 100
    problems_per_step: int = 16
    samples_per_problem: int = 8
    alpha: float = 0.7
    advantage: str = "bnpo"
    lr: float = 3e-4
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_beta: float = 0.02
    aggregation: str = "seq-mean-token-mean"
    epochs: int = 1
    micro_batch: int = 128
    clarifier_noise: float = 0.0
    max_failed_fraction: float = 0.5
    eval_every: int = 0
    eval_n: int = 200
    checkpoint_every: int = 50
    log_episodes: int = 2
    seed: int = 0
    threads: int = 0
    report_to: str = ""
    overlap: bool = True


@dataclass
class EvalConfig:
    """Held-out evaluation.

    Attributes:
        split: world split to evaluate on. n: number of problems.
        batch_size: problems per captioning batch.
        reference: checkpoint of π_ref that answers clarifications (empty: the shipped warm-started captioner).
    """

    split: str = "test"
    n: int = 500
    batch_size: int = 100
    reference: str = ""


@dataclass
class Config:
    """Everything one run needs. Sections: world, captioner, model (tiny captioner size), reasoner, clarifier,
    warmstart, train, eval."""

    world: WorldConfig = field(default_factory=WorldConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    model: TinyVLMConfig = field(default_factory=TinyVLMConfig)
    reasoner: ReasonerConfig = field(default_factory=ReasonerConfig)
    clarifier: ClarifierConfig = field(default_factory=ClarifierConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or 'root'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or 'root'}; known: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kwargs[k] = _build(t, v, f"{where}.{k}".lstrip("."))
        else:
            kwargs[k] = v
    return cls(**kwargs)


def _coerce(value: str) -> Any:
    return yaml.safe_load(value)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (sections as in :class:`Config`) and apply ``key.sub=value`` overrides."""
    data: dict[str, Any] = {}
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file {path!r} not found")
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    for ov in overrides or []:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like section.key=value")
        key, value = ov.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _coerce(value)
    return _build(Config, data, "")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
