"""Configuration: dataclasses with documented fields, loaded from YAML (``configs/``) with ``--set a.b=v`` overrides."""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import functools
import os
import pathlib
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import yaml

SCHEDULES = ("constant", "linear", "cosine", "step")   # train.alpha_schedule
AGGREGATIONS = ("seq-mean-token-mean", "seq-mean-token-sum", "token-mean", "seq-mean-token-sum-norm")
WORLD_FAMILIES = ("bars", "shapes", "rect", "tri")      # world.families
# Facts a question of each family can need (bar charts: up to world.n_bars); a test checks it against the templates.
WORLD_FACT_SIZES = {"bars": (1, 2, 3, 4), "shapes": (1, 2), "rect": (1, 2), "tri": (1, 2)}
EVAL_SECTIONS = ("world", "reasoner", "clarifier", "train")   # what an eval.sets entry may override


# Every field is checked against its type (from the annotation) and, where it has limits beyond its type, against
# the rule given beside it: ``setting(default, rule)``, a rule being (predicate, what the value must be).
def setting(default: Any, rule: tuple | None = None):
    """A dataclass field with its value rule in the field's metadata (read by :func:`_build`)."""
    meta = {"rule": rule} if rule else {}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _ge(lo):
    return (lambda v: v >= lo), f">= {lo}"


def _gt(lo):
    return (lambda v: v > lo), f"> {lo}"


def _one_of(*names):
    return (lambda v: v in names), "one of " + ", ".join(repr(n) for n in names)


def _csv_of(*names):
    return (lambda v: all(x in names for x in v.split(",") if x) if v else True), \
        "empty or a comma-separated list of " + ", ".join(names)


_PROB = ((lambda v: 0 <= v <= 1), "in [0, 1]")
_IN_0_1 = ((lambda v: 0 < v <= 1), "in (0, 1]")
_CLIP = ((lambda v: 0 <= v < 1), "in [0, 1)")
_EVAL_SETS = ((lambda v: all(isinstance(o, dict) and set(o) <= set(EVAL_SECTIONS) for o in v.values())),
              "a mapping of set names to overrides of the sections " + ", ".join(EVAL_SECTIONS))


@dataclass
class HFSettings:
    """Runtime settings of an :class:`HFCaptioner` (the ``captioner:`` config fields of the ``hf`` backend)."""

    dtype: str = setting("auto", _one_of("auto", "bf16", "fp16", "fp32"))
    """``auto`` (bf16 on a GPU that supports it, else fp32), ``bf16``, ``fp16`` or ``fp32``."""
    device: str = "auto"
    """``auto`` (``cuda`` when available), ``cpu``, ``cuda``, ``cuda:1``, ..."""
    attn_implementation: str = setting("sdpa", _one_of("sdpa", "eager", "flash_attention_2"))
    """``sdpa``, ``eager`` or ``flash_attention_2``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (saves memory on long prompts)."""
    max_pixels: int = setting(0, _ge(0))
    """Downscale images with more pixels than this before the processor (0: processor default)."""
    freeze_vision: bool = True
    """Keep the vision tower and projector frozen (LoRA targets only the language model; a full fine-tune trains
    only the language model)."""
    top_p: float = setting(1.0, _IN_0_1)
    """Nucleus sampling for training captions; every log-prob (sampler, old, new, π_ref) is then of the
    renormalised nucleus, so the sampling policy and the trained one are the same distribution."""
    generation_batch_size: int = setting(0, _ge(0))
    """Caption rows per ``generate`` call (0: all rows at once)."""
    logprob_batch_size: int = setting(0, _ge(0))
    """Rows per teacher-forced forward (0: the trainer's ``train.micro_batch`` when the captioner is given it,
    else 8). Chunks are aligned to multiples of this from row 0, so a micro-batch that is a multiple of it runs
    exactly the chunks of the recompute."""
    answer_max_new_tokens: int = setting(64, _ge(1))
    """Length cap of π_ref's clarification answers."""
    share_prompt_cache: bool = True
    """The teacher-forced log-prob passes (old, new, π_ref: always one function) run each problem's prompt
    (image included) once per row chunk and share its KV cache among the chunk's rows (same numbers up to float
    rounding; 1.6-2.4x faster with n=8 on CPU, ``benchmarks/results/hf_phases_qwen2-vl.json``). ``false``, or
    under ``gradient_checkpointing``: every row runs prompt + caption. Sampling always shares the prompt."""
    processor_kwargs: dict = field(default_factory=dict)
    """Extra image-processor arguments for every call, e.g. ``{max_patches: 6}`` (InternVL tiles) or
    ``{max_pixels: 401408}`` (Qwen-VL's own resize bound)."""
    trust_remote_code: bool = False
    """Passed to ``from_pretrained`` (not needed for the supported families)."""
    self_test: bool = True
    """Check the loaded checkpoint at start-up (``HFCaptioner.self_test``: incremental decode vs teacher-forced
    log-probs, LoRA layers present); a failure stops the run with its reason."""

    @classmethod
    def from_config(cls, cfg: Any) -> HFSettings:
        """The fields of this class that ``cfg`` (e.g. ``Config.captioner``) has; the rest keep defaults."""
        out = cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)})
        out.processor_kwargs = dict(out.processor_kwargs or {})
        return out


@dataclass
class LoraSettings:
    """LoRA on the decoder (and optionally encoder) linear layers through PEFT."""

    enabled: bool = False
    """Train a LoRA adapter instead of all weights; the reference is the adapter-disabled model."""
    r: int = setting(16, _ge(1))
    """Rank of the adapter's matrices."""
    alpha: int = setting(32, _gt(0))
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = setting(0.0, _CLIP)
    """LoRA dropout, in [0, 1). Only supervised warm-start passes apply it: the RL log-prob passes run with
    dropout off (old and new log-probs must be the same function), and the ``hf`` backend refuses a new adapter
    with dropout > 0 for that reason."""
    targets: str = r".*decoder.*\.(q_proj|k_proj|v_proj|o_proj|fc1|fc2)"
    """Regex of module names to adapt."""


@dataclass
class TinyVLMConfig:
    """Size of the tiny captioner."""

    vocab_size: int = setting(0, _ge(0))
    """Filled from the tokenizer."""
    d_model: int = setting(128, _ge(1))
    """Width of encoder and decoder."""
    n_heads: int = setting(4, _ge(1))
    """Attention heads."""
    n_layers: int = setting(2, _ge(1))
    """Decoder layers."""
    enc_layers: int = setting(1, _ge(0))
    """Transformer layers over the image tokens."""
    cnn_width: int = setting(32, _ge(1))
    """Channels of the first conv layer (stride 8 overall: 64x64 -> 8x8 tokens)."""
    max_prompt_tokens: int = setting(40, _ge(1))
    """Prompt (mode token + question) length cap."""
    max_new_tokens: int = setting(48, _ge(1))
    """Longest text the model writes."""
    image_size: int = setting(64, _ge(8))
    """Input side length in pixels."""


@dataclass
class TinyReasonerConfig:
    """Size of the tiny reasoner."""

    vocab_size: int = setting(0, _ge(0))
    """Filled from the tokenizer."""
    d_model: int = setting(128, _ge(1))
    """Width of the transformer."""
    n_heads: int = setting(4, _ge(1))
    """Attention heads."""
    n_layers: int = setting(4, _ge(1))
    """Transformer layers."""
    max_prompt_tokens: int = setting(112, _ge(8))
    """Prompt length cap (the description is cut first)."""
    max_new_tokens: int = setting(48, _ge(4))
    """Longest reply."""
    shift: int = setting(3, _ge(0))
    """Previous tokens whose embeddings are mixed into each position's input (a causal token shift: "the red bar
    is 7" puts "red bar is" next to the 7, so one attention step finds a fact by its name); 0: none."""


@dataclass
class VLLMSettings:
    """The ``captioner.vllm`` config section (used when ``captioner.rollout_engine: vllm``)."""

    mode: str = setting("colocate", _one_of("colocate", "server"))
    """``colocate`` (an engine inside each training process) or ``server`` (a running ``vllm serve``)."""
    gpu_memory_utilization: float = setting(0.3, _IN_0_1)
    """(colocate) share of the GPU's memory vLLM may take (weights + KV cache); the training model, its
    activations and optimizer state need the rest."""
    max_model_len: int = setting(0, _ge(0))
    """(colocate) context length of the engine (0: from the run: the prompt with its image, 1024 question tokens
    and the longest caption or answer, not the model's own 128k)."""
    max_lora_rank: int = setting(0, _ge(0))
    """Largest adapter rank the engine accepts (0: the captioner's rank, rounded up to a size vLLM supports).
    The server must be started with ``--max-lora-rank`` at least this."""
    sleep_level: int = setting(1, _one_of(0, 1, 2))
    """1: offload the weights to host memory and drop the KV cache during each update (colocate: ``llm.sleep``;
    server: ``POST /sleep``, which needs ``VLLM_SERVER_DEV_MODE=1``); 0: stay awake (a server on its own GPUs)."""
    enforce_eager: bool = False
    """(colocate) no CUDA graphs (less memory, slower decoding)."""
    seed: int = 0
    """(colocate) sampling seed of the engine (plus the rank under ``accelerate launch``)."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """(server) e.g. ``http://127.0.0.1:8000/v1``."""
    model: str = ""
    """(server) served name of the base model (``--served-model-name``; empty: the server's first model)."""
    api_key_env: str = "OPENAI_API_KEY"
    """(server) environment variable holding the API key (unset: none is sent)."""
    adapter_dir: str = ""
    """Where adapters are written, in the engine's dtype (empty: a temporary directory under /dev/shm where it
    exists; server: a path it can read)."""
    concurrency: int = setting(32, _ge(1))
    """(server) chat requests in flight."""
    timeout: float = setting(600.0, _gt(0))
    """(server) seconds per request."""
    engine_kwargs: dict = field(default_factory=dict)
    """(colocate) more ``vllm.LLM(...)`` arguments, e.g. ``{max_num_seqs: 256}``."""
    self_check: bool = True
    """At start, sample the probe image: captions at temperature 1 must differ and the engine's log-probs must
    be the training model's (``acrl.backends.vllm_engine._Engine.self_check``)."""
    logprob_tolerance: float = setting(0.05, _gt(0))
    """The self-check's largest mean per-token gap between the engine's and the training model's log-probs (bf16
    engines differ by about 0.01)."""


@dataclass
class WarmStartConfig:
    """Supervised warm start."""

    steps: int = setting(5000, _ge(1))
    """Optimisation steps."""
    batch_size: int = setting(32, _ge(1))
    """Examples per step (fresh problems each step)."""
    lr: float = setting(1e-3, _gt(0))
    """Peak AdamW learning rate (linear warm-up for ``warmup`` steps, then cosine to 10%)."""
    warmup: int = setting(100, _ge(0))
    """Steps of linear learning-rate warm-up."""
    weight_decay: float = setting(0.01, _ge(0))
    """AdamW weight decay."""
    grad_clip: float = setting(1.0, _gt(0))
    """Max gradient norm."""
    qa_phase: float = setting(0.3, _PROB)
    """Fraction of steps in the answer-heavy first phase."""
    qa_rate_early: float = setting(0.85, _PROB)
    """Share of clarification-answer examples in the first (``qa_phase``) phase (the rest are human-style
    captions)."""
    qa_rate_late: float = setting(0.5, _PROB)
    """Share of clarification-answer examples after the first phase."""
    fact_rate: float = setting(0.3, _PROB)
    """Probability that a human caption states each quantity."""
    eval_every: int = setting(500, _ge(0))
    """Steps between held-out checks (0: only at the end)."""
    eval_n: int = setting(200, _ge(1))
    """Held-out problems per check."""
    seed: int = setting(0, _ge(0))
    """Seed for model init and data order."""
    save_every: int = setting(0, _ge(0))
    """Also save the captioner every this many steps to ``OUT/step-<n>/`` (intermediate warm starts, e.g. a
    partly trained π_ref for the reference-sensitivity study); 0: only the final one."""
    checkpoint_every: int = setting(200, _ge(0))
    """Save a resumable checkpoint (model, optimiser, data order) every this many steps to
    ``OUT/checkpoint-<n>/``; ``acrl warmstart --resume`` continues from the newest; 0: none."""


@dataclass
class ReasonerWarmStartConfig:
    """Supervised warm start of the tiny reasoner."""

    steps: int = setting(2000, _ge(1))
    """Optimisation steps."""
    batch_size: int = setting(64, _ge(1))
    """Examples per step (fresh problems each step)."""
    lr: float = setting(2e-3, _gt(0))
    """Peak AdamW learning rate (linear warm-up for ``warmup`` steps, then cosine to 10%)."""
    warmup: int = setting(100, _ge(0))
    """Steps of linear learning-rate warm-up."""
    weight_decay: float = setting(0.01, _ge(0))
    """AdamW weight decay."""
    grad_clip: float = setting(1.0, _gt(0))
    """Max gradient norm."""
    oracle_rate: float = setting(0.35, _PROB)
    """Share of descriptions that state every fact (the rest are human-style captions)."""
    final_rate: float = setting(0.3, _PROB)
    """Share of final prompts (the answer after one clarification); the rest, beyond ``single_rate``, are
    decision prompts."""
    single_rate: float = setting(0.2, _PROB)
    """Share of single-pass / denied prompts (answer without asking)."""
    read_budget: int = setting(6, _ge(1))
    """Statements of a description the world reasoner (the teacher) reads."""
    eval_every: int = setting(150, _ge(0))
    """Steps between held-out checks (0: only at the end)."""
    eval_n: int = setting(150, _ge(1))
    """Held-out problems per check."""
    seed: int = setting(0, _ge(0))
    """Seed of model init and data."""
    checkpoint_every: int = setting(150, _ge(0))
    """Save a resumable checkpoint every this many steps (``OUT/checkpoint-<n>/``); 0: none."""


@dataclass
class WorldConfig:
    """How problems are drawn."""

    families: list[str] = field(default_factory=lambda: list(WORLD_FAMILIES))
    """Which figure families to draw from (``bars``, ``shapes``, ``rect``, ``tri``), uniformly."""
    n_bars: int = setting(3, _one_of(2, 3, 4))
    """Bars per bar chart."""
    needed_facts: dict[int, float] = field(default_factory=lambda: {1: 0.15, 2: 0.6, 3: 0.25})
    """Relative weights of questions needing 1, 2, 3, 4 facts. A family without a question of the drawn size
    uses its nearest size (only bar charts have 3- and 4-fact questions)."""
    mc_rate: float = setting(0.15, _PROB)
    """Probability that a question is multiple choice (4 numeric options, gold is a letter)."""
    fact_rate: float = setting(0.3, _PROB)
    """Probability that a human-style caption mentions each quantity of the scene."""
    seed: int = setting(0, _ge(0))
    """World seed; the same (seed, split, index) always gives the same problem."""

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in WORLD_FAMILIES]
        if bad or not self.families:
            raise ValueError(f"world families {bad or self.families} not in {WORLD_FAMILIES}")
        self.needed_facts = {int(k): float(v) for k, v in self.needed_facts.items()}
        if any(w < 0 for w in self.needed_facts.values()) or sum(self.needed_facts.values()) <= 0:
            raise ValueError(f"world.needed_facts weights must be >= 0 with a positive sum, got {self.needed_facts}")
        wanted = {k for k, w in self.needed_facts.items() if w > 0}
        possible = {s for f in self.families for s in WORLD_FACT_SIZES[f] if f != "bars" or s <= self.n_bars}
        if not wanted & possible:
            raise ValueError(f"world.needed_facts asks only for questions needing {sorted(wanted)} facts, which no "
                             f"family of world.families {self.families} has (they need {sorted(possible)})")


ASSETS = os.path.join(os.path.dirname(__file__), "assets")
SHIPPED_CAPTIONER = os.path.join(ASSETS, "world-captioner")
SHIPPED_REASONER = os.path.join(ASSETS, "world-reasoner")


@dataclass
class CaptionerConfig(HFSettings):
    """The trainable captioner (and, through it, the reference π_ref). The ``hf`` backend's runtime fields
    (``dtype``, ``device``, ``top_p``, ...) are inherited from :class:`HFSettings`."""

    backend: str = setting("tiny", _one_of("tiny", "hf"))
    """``tiny`` (the embedded world's PyTorch VLM) or ``hf`` (a Hugging Face VLM: Qwen2-VL, Qwen2.5-VL,
    InternVL, Llava)."""
    path: str = ""
    """Checkpoint directory (hf: also a hub name or a saved adapter); empty (tiny) = the shipped warm-started
    world captioner."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings (``lora.enabled: false`` trains all weights and keeps a frozen copy as π_ref; with LoRA
    π_ref is the same model with the adapter disabled)."""
    temperature: float = setting(1.0, (_ge(0.0)[0], ">= 0 (0: greedy)"))
    """Sampling temperature for training captions."""
    max_new_tokens: int = setting(40, _ge(1))
    """Caption length cap in tokens."""
    rollout_engine: str = setting("hf", _one_of("hf", "vllm"))
    """(hf) what samples the captions and π_ref's answers: ``hf`` (the training model itself) or ``vllm`` (a
    vLLM engine with the base weights and the current LoRA adapter; needs ``lora.enabled`` and the ``[gpu]``
    extra; see docs/scaling.md)."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """(hf, ``rollout_engine: vllm``) the engine's settings: ``mode`` (colocate | server),
    ``gpu_memory_utilization``, ``sleep_level``, ... (:class:`VLLMSettings`)."""


@dataclass
class ReasonerConfig:
    """The text-only reasoner (frozen, unless ``train.cotrain``)."""

    backend: str = setting("world", _one_of("world", "openai", "hf", "tiny"))
    """``world`` (deterministic world reasoner), ``openai`` (any OpenAI-compatible endpoint: vLLM, SGLang,
    ``acrl serve reasoner``), ``hf`` (a local Hugging Face text LLM, in process; with ``train.cotrain`` it
    trains a LoRA adapter) or ``tiny`` (the world's small transformer reasoner, trainable; warm-started by
    ``acrl warmstart --reasoner``)."""
    read_budget: int = setting(6, _ge(1))
    """(world) statements of a caption the world reasoner reads before it stops reading."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """(openai) the server, e.g. ``http://127.0.0.1:8000/v1``."""
    model: str = ""
    """(openai) served model name (empty: the server's first); (hf) model directory or hub id, or a co-trained
    reasoner's checkpoint (``RUN/checkpoint-N/reasoner``); (tiny) checkpoint directory (empty: the shipped
    warm-started world reasoner)."""
    api_key_env: str = "OPENAI_API_KEY"
    """(openai) environment variable holding the API key."""
    concurrency: int = setting(32, _ge(1))
    """(openai) requests in flight at once."""
    timeout: float = setting(300.0, _gt(0))
    """(openai) seconds per request."""
    max_retries: int = setting(4, _ge(0))
    """(openai) retries on connection errors, 429 and 5xx."""
    temperature: float = setting(0.0, _ge(0.0))
    """Sampling temperature of the reasoner."""
    max_tokens: int = setting(4096, _ge(1))
    """Reply length cap."""
    think: str = setting("strip", _one_of("strip", "keep"))
    """``strip`` or ``keep`` R1-style ``<think>`` blocks before parsing."""
    cache: str = ""
    """(openai) response cache for temperature-0 calls: ``""``, ``memory`` or a ``.jsonl`` path."""
    batch_size: int = setting(8, _ge(1))
    """(hf) prompts per generate call."""
    noise: float = setting(0.0, _PROB)
    """(world) probability that an answer of the reasoner is LLM-like wrong: built on a misread value (one
    needed fact off), or, when it could answer, a question about a fact it already has."""
    noise_seed: int = setting(0, _ge(0))
    """(world) seed of those slips; a slip depends only on (seed, prompt), like a cached temperature-0 LLM."""
    few_shot: int = setting(0, _ge(0))
    """(openai, hf) worked demonstrations of the reply protocol sent before each prompt as earlier chat turns
    (0: none; at most 3 for a decision, 2 for the other turns); helps small LLMs follow it."""


@dataclass
class ClarifierConfig:
    """Who answers clarification questions."""

    backend: str = setting("reference", _one_of("reference", "openai"))
    """``reference`` (π_ref in process: the frozen starting captioner) or ``openai`` (a VLM behind an
    OpenAI-compatible endpoint: vLLM, ``acrl serve clarifier``)."""
    base_url: str = "http://127.0.0.1:8001/v1"
    """As in :class:`ReasonerConfig`."""
    model: str = ""
    """As in :class:`ReasonerConfig`."""
    api_key_env: str = "OPENAI_API_KEY"
    """As in :class:`ReasonerConfig`."""
    concurrency: int = setting(32, _ge(1))
    """As in :class:`ReasonerConfig`."""
    timeout: float = setting(60.0, _gt(0))
    """As in :class:`ReasonerConfig`."""
    max_retries: int = setting(4, _ge(0))
    """As in :class:`ReasonerConfig`."""
    temperature: float = setting(0.0, _ge(0.0))
    """As in :class:`ReasonerConfig`."""
    max_tokens: int = setting(64, _ge(1))
    """As in :class:`ReasonerConfig`."""
    cache: str = ""
    """As in :class:`ReasonerConfig`."""


@dataclass
class TrainConfig:
    """AC-RL training."""

    steps: int = setting(100, _ge(1))
    """Optimisation steps (each: sample problems, M captions each, episodes, one update)."""
    problems_per_step: int = setting(16, _ge(1))
    """Problems per step (B)."""
    samples_per_problem: int = setting(8, (lambda v: v >= 2, ">= 2 (an advantage group needs at least two samples)"))
    """Captions per problem (M, the advantage group; 8 in the paper)."""
    alpha: float = setting(0.7, _PROB)
    """Reward for a correct answer after one clarification (0.7 in the paper, 0 = binary ablation); after k
    clarifications ``alpha ** k`` (unless ``turn_rewards``)."""
    alpha_schedule: str = setting("constant", _one_of(*SCHEDULES))
    """``constant`` | ``linear`` | ``cosine`` | ``step``: α moves from ``alpha`` at the first step to
    ``alpha_end`` at the last (``step``: switches at the fraction ``alpha_step_at`` of the run)."""
    alpha_end: float = setting(0.0, _PROB)
    """α at the end of a schedule."""
    alpha_step_at: float = setting(0.5, _PROB)
    """Where a ``step`` schedule switches (0..1)."""
    max_clarifications: int = setting(1, _ge(1))
    """Questions the reasoner may ask in turn (K; 1 = the paper); π_ref answers each."""
    turn_rewards: list[float] = setting([], (lambda v: all(0 <= x <= 1 for x in v), "a list of rewards in [0, 1]"))
    """Reward of a correct answer after 0, 1, ..., K clarifications, e.g. ``[1, 0.7, 0.5]`` (empty: ``alpha **
    k``); needs K + 1 entries and a constant α."""
    reference: str = ""
    """π_ref's checkpoint (answers clarifications and anchors the KL); empty: the starting captioner."""
    advantage: str = setting("bnpo", _one_of("bnpo", "bnpo_decomposed", "grpo", "rloo", "reinforce"))
    """``bnpo`` | ``bnpo_decomposed`` | ``grpo`` | ``rloo`` | ``reinforce``."""
    lr: float = setting(3e-4, _gt(0))
    """AdamW learning rate (constant after ``warmup`` steps of linear warm-up)."""
    warmup: int = setting(0, _ge(0))
    """Warm-up steps."""
    weight_decay: float = setting(0.0, _ge(0))
    """AdamW weight decay."""
    grad_clip: float = setting(1.0, _gt(0))
    """Max gradient norm."""
    clip_low: float = setting(0.2, _CLIP)
    """Lower side of the PPO ratio clip range [1-clip_low, 1+clip_high]."""
    clip_high: float = setting(0.2, _ge(0))
    """Upper side of the PPO ratio clip range."""
    kl_beta: float = setting(0.02, _ge(0))
    """Weight of the k3 KL penalty to π_ref."""
    tis_cap: float = setting(0.0, _ge(0))
    """Truncated importance sampling between the sampler's log-probs and the trainer's (a vLLM engine
    captioner): each token's surrogate is weighted by min(π_old / μ, tis_cap); 0: off. The gap is logged either
    way (``sampler_kl``, ``sampler_ratio_max``). TRL's default cap is 2."""
    aggregation: str = setting("seq-mean-token-mean", _one_of(*AGGREGATIONS))
    """Token aggregation of the loss (``seq-mean-token-mean``, ``seq-mean-token-sum``, ``token-mean``,
    ``seq-mean-token-sum-norm``)."""
    epochs: int = setting(1, _ge(1))
    """Optimisation passes over each rollout batch (old log-probs kept for the ratio)."""
    micro_batch: int = setting(128, _ge(1))
    """Caption rows per forward/backward (gradients accumulate over the step)."""
    clarifier_noise: float = setting(0.0, _PROB)
    """Probability that π_ref's answer states a wrong value (world regime "noisy clarifier")."""
    max_failed_fraction: float = setting(0.0, _PROB)
    """A step whose share of failed episodes (the reasoner or clarifier service did not answer after its own
    retries) exceeds this does not count: it is retried whole from the same random state (see ``step_retries``),
    so a counted step is the step a run without the fault would have taken. Default 0: any failed episode
    retries the step. Above 0, failed episodes up to this share are masked out of the update and counted
    (``failed_episodes`` in metrics.jsonl)."""
    eval_every: int = setting(0, _ge(0))
    """Steps between held-out evaluations during training (0: none)."""
    eval_n: int = setting(200, _ge(1))
    """Problems per check."""
    checkpoint_every: int = setting(50, _ge(1))
    """Steps between checkpoints (the last step, and a stop on SIGINT / SIGTERM or an outage, always write one)."""
    keep_checkpoints: int = setting(2, _ge(0))
    """How many of the newest checkpoints (``OUT/checkpoint-<step>/``) to keep (0: all)."""
    log_episodes: int = setting(2, _ge(0))
    """Groups per step whose transcripts go to ``episodes.jsonl``."""
    seed: int = setting(0, _ge(0))
    """Seed of model sampling and data order."""
    threads: int = setting(0, _ge(0))
    """Torch CPU threads (0: torch's default)."""
    cotrain: bool = False
    """Also train the reasoner on the same episodes (``reasoner_train``; needs ``reasoner.backend`` ``tiny`` or
    ``hf``); default false: the paper's frozen reasoner."""
    report_to: str = setting("", _csv_of("tensorboard", "wandb", "all"))
    """Also send step metrics to experiment trackers through accelerate (``tensorboard``, ``wandb``, ``all``;
    empty: only ``metrics.jsonl``). The tracker's package must be installed."""
    overlap: bool = True
    """Compute π_ref's log-probs for the KL term while the step's episodes run (in a worker thread), so the
    reasoner's calls do not wait for them; the results are the same either way."""
    step_retries: int = setting(6, _ge(0))
    """Times a step whose episodes failed (a service outage) is retried, from the same random state, before the
    run checkpoints and exits with an error saying how to resume."""
    retry_wait: float = setting(5.0, _ge(0))
    """Seconds before the first retry; the wait doubles with each retry (at most 120 s each)."""


@dataclass
class ReasonerLoraSettings(LoraSettings):
    """LoRA of an hf reasoner in co-training (the fields of :class:`LoraSettings`): on by
    default, on the attention projections of every layer."""

    enabled: bool = True
    """The adapter is what trains, so it is on by default (and must be on for an hf reasoner)."""
    targets: str = r".*\.(q_proj|k_proj|v_proj|o_proj)$"
    """Regex of module names to adapt: the attention projections of every layer."""


@dataclass
class ReasonerTrainConfig:
    """The reasoner's side of co-training (``train.cotrain``): its own reward, advantages, optimiser and KL.

    Reward of an episode for the reasoner: 1 for a correct final answer, 0 otherwise, minus ``question_cost``
    for every clarification question it asked. Advantages are taken over the same groups of M episodes as the
    captioner's; every reply of the reasoner in an episode (the decision, and the answer after the
    clarification) carries the episode's advantage."""

    question_cost: float = setting(0.1, _ge(0.0))
    """Reward subtracted per question asked (0: asking is free)."""
    temperature: float = setting(1.0, _gt(0.0))
    """Sampling temperature of the reasoner's replies in training episodes (evaluation is greedy)."""
    advantage: str = setting("bnpo", _one_of("bnpo", "grpo", "rloo", "reinforce"))
    """``bnpo`` | ``grpo`` | ``rloo`` | ``reinforce``."""
    lr: float = setting(1e-4, _gt(0))
    """AdamW learning rate (constant after ``warmup`` steps)."""
    warmup: int = setting(0, _ge(0))
    """Steps of linear learning-rate warm-up."""
    weight_decay: float = setting(0.0, _ge(0))
    """AdamW weight decay."""
    grad_clip: float = setting(1.0, _gt(0))
    """Max gradient norm."""
    clip_low: float = setting(0.2, _CLIP)
    """Lower side of the PPO ratio clip range [1-clip_low, 1+clip_high]."""
    clip_high: float = setting(0.2, _ge(0))
    """Upper side of the PPO ratio clip range."""
    kl_beta: float = setting(0.02, _ge(0))
    """Weight of the k3 KL to the reasoner's frozen start."""
    aggregation: str = setting("seq-mean-token-mean", _one_of(*AGGREGATIONS))
    """Token aggregation of the loss (as ``train.aggregation``)."""
    micro_batch: int = setting(128, _ge(1))
    """Reply rows per forward/backward."""
    lora: ReasonerLoraSettings = field(default_factory=ReasonerLoraSettings)
    """(hf) the reasoner's LoRA adapter (``enabled`` must be true for hf: the adapter is what trains)."""
    gradient_checkpointing: bool = False
    """(hf) recompute the reasoner's activations in its gradient pass (prompts of thousands of tokens x
    ``micro_batch`` rows)."""


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    split: str = setting("test", _one_of("train", "val", "test"))
    """World split to evaluate on."""
    n: int = setting(500, _ge(1))
    """Number of problems."""
    batch_size: int = setting(100, _ge(1))
    """Problems per captioning batch."""
    reference: str = ""
    """Checkpoint of π_ref that answers clarifications (empty: the shipped warm-started captioner)."""
    sets: dict[str, dict] = setting({}, _EVAL_SETS)
    """Named evaluation sets beyond the training distribution, each a mapping of section overrides (``world``,
    ``reasoner``, ``clarifier``, ``train``) applied to this config for that evaluation, e.g. ``{tri: {world:
    {families: [tri]}}, noisy: {reasoner: {noise: 0.2}}}`` (held-out families, question sizes, another
    reasoner); see :func:`eval_view`."""


@dataclass
class Config:
    """Everything one run needs, one section per field."""

    world: WorldConfig = field(default_factory=WorldConfig)
    """How problems of the embedded world are drawn."""
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    """The trainable captioner."""
    model: TinyVLMConfig = field(default_factory=TinyVLMConfig)
    """Size of the tiny (world) captioner."""
    reasoner: ReasonerConfig = field(default_factory=ReasonerConfig)
    """The text-only reasoner."""
    clarifier: ClarifierConfig = field(default_factory=ClarifierConfig)
    """Who answers clarification questions in training and evaluation."""
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    """The world captioner's supervised warm start (``acrl warmstart``)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """AC-RL training."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    reasoner_model: TinyReasonerConfig = field(default_factory=TinyReasonerConfig)
    """Size of the tiny (world) reasoner."""
    reasoner_warmstart: ReasonerWarmStartConfig = field(default_factory=ReasonerWarmStartConfig)
    """The tiny reasoner's supervised warm start (``acrl warmstart --reasoner``)."""
    reasoner_train: ReasonerTrainConfig = field(default_factory=ReasonerTrainConfig)
    """The reasoner's side of co-training (``train.cotrain``)."""


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _check_type(value: Any, t, key: str) -> Any:
    """``value`` as type ``t`` (ints are accepted for floats), or a ValueError naming ``key``."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(t):
            if arm is type(None) and value is None:
                return None
        for arm in typing.get_args(t):
            if arm is not type(None):
                with contextlib.suppress(ValueError):
                    return _check_type(value, arm, key)
        raise ValueError(f"config {key}={value!r}: expected {_type_name(t)}")
    if t is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):   # YAML 1.1 reads 1e-4 as a string
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value:   # NaN
                raise ValueError(f"config {key}={value!r}: expected a number, got NaN")
            return float(value)
        raise ValueError(f"config {key}={value!r}: expected a number, got {type(value).__name__}")
    if t is int:
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):   # e.g. a JSON object's keys
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"config {key}={value!r}: expected an integer, got {type(value).__name__}")
    if t is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config {key}={value!r}: expected true or false")
    if t is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"config {key}={value!r}: expected a string, got {type(value).__name__}")
    if t is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {key}={value!r}: expected a list")
        (arg,) = typing.get_args(t) or (Any,)
        return [v if arg is Any else _check_type(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if t is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config {key}={value!r}: expected a mapping")
        kt, vt = typing.get_args(t) or (Any, Any)
        return {(k if kt is Any else _check_type(k, kt, f"{key} key")):
                (v if vt is Any else _check_type(v, vt, f"{key}[{k!r}]")) for k, v in value.items()}
    return value


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or 'root'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    rules = {f.name: f.metadata.get("rule") for f in dataclasses.fields(cls)}
    names = set(rules)
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or 'root'}; known: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        t, key = hints[k], f"{where}.{k}".lstrip(".")
        if dataclasses.is_dataclass(t):
            kwargs[k] = _build(t, v, key)
            continue
        v = _check_type(v, t, key)
        rule = rules[k]
        if rule and not rule[0](v):
            raise ValueError(f"config {key}={v!r}: must be {rule[1]}")
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:   # a section's own cross-field checks (__post_init__)
        raise ValueError(f"config {where or 'root'}: {e}") from e


def validate(cfg: Config) -> Config:
    """Check every field of a built config (e.g. after code changed it) as :func:`load_config` does."""
    return _checked(_build(Config, to_dict(cfg), ""))


def _checked(cfg: Config, view: bool = False) -> Config:
    """The rules that tie fields together (each field's own rule is beside it); a one-line error naming them.
    ``view``: an evaluation set's config, which trains nothing (its reasoner is only read)."""
    t, rc = cfg.train, cfg.reasoner
    if t.turn_rewards and len(t.turn_rewards) < t.max_clarifications + 1:
        raise ValueError(f"config train.turn_rewards needs train.max_clarifications + 1 = {t.max_clarifications + 1} "
                         f"entries (rewards after 0..{t.max_clarifications} clarifications), got {len(t.turn_rewards)}")
    if t.turn_rewards and t.alpha_schedule != "constant":
        raise ValueError("config train.turn_rewards fixes every turn's reward: it cannot be combined with "
                         "train.alpha_schedule")
    if t.advantage == "bnpo_decomposed" and (t.max_clarifications > 1 or t.turn_rewards
                                             or t.alpha_schedule != "constant"):
        raise ValueError("config train.advantage=bnpo_decomposed is defined for the paper's reward (one "
                         "clarification, constant alpha)")
    if t.cotrain and not view and rc.backend not in ("tiny", "hf"):
        raise ValueError(f"config train.cotrain=true trains the reasoner: reasoner.backend must be tiny or hf, "
                         f"got {rc.backend!r}")
    if t.cotrain and not view and rc.backend == "hf" and not cfg.reasoner_train.lora.enabled:
        raise ValueError("config train.cotrain=true with reasoner.backend=hf trains a LoRA adapter: "
                         "reasoner_train.lora.enabled must be true")
    if rc.backend == "hf" and not rc.model:
        raise ValueError("config reasoner.backend=hf needs reasoner.model (a model directory or hub id)")
    if rc.few_shot and rc.backend in ("world", "tiny"):
        raise ValueError(f"config reasoner.few_shot is for LLM reasoners (openai, hf); the {rc.backend} reasoner "
                         f"reads no examples (set reasoner.few_shot=0)")
    if rc.noise and rc.backend != "world":
        raise ValueError(f"config reasoner.noise is a world-reasoner setting; reasoner.backend={rc.backend!r} has "
                         f"its own errors (set reasoner.noise=0)")
    for name in cfg.eval.sets:   # every evaluation set must give a valid config
        eval_view(cfg, name)
    return cfg


def eval_view(cfg: Config, name: str) -> Config:
    """The config that evaluation set ``name`` (``eval.sets``) describes: this config with the set's section
    overrides applied, every value checked as in :func:`load_config`."""
    if name not in cfg.eval.sets:
        raise ValueError(f"evaluation set {name!r} is not in eval.sets ({', '.join(cfg.eval.sets) or 'none'})")
    data = to_dict(cfg)
    data["eval"]["sets"] = {}
    for section, values in cfg.eval.sets[name].items():
        if not isinstance(values, dict):
            raise ValueError(f"config eval.sets.{name}.{section} must be a mapping, got {type(values).__name__}")
        data[section] = {**data[section], **copy.deepcopy(values)}
    try:
        return _checked(_build(Config, data, ""), view=True)
    except ValueError as e:
        raise ValueError(f"config eval.sets.{name}: {e}") from None


def _coerce(value: str) -> Any:
    return yaml.safe_load(value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML without silent last-one-wins: a key given twice in one mapping is an error naming its line."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ValueError(f"line {key_node.start_mark.line + 1}: {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)   # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ValueError(f"{where}: YAML syntax error: {e.problem or e.context}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable YAML file ({e})") from None
    if data is None:
        raise ValueError(f"{path}: the config file is empty (give at least one section, or no --config for the "
                         f"defaults)")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Read a YAML file (sections as in :class:`Config`) and apply ``key.sub=value`` overrides; every value is
    checked (its type and the rule beside its field, then :func:`_checked`). ``base``: start from these values
    (a stored run's config) instead of the defaults, when no file is given."""
    data: dict[str, Any] = _read_yaml(path) if path else copy.deepcopy(base or {})
    for ov in overrides or []:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like section.key=value")
        key, value = ov.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {ov!r}: {p!r} is not a section")
        node[parts[-1]] = _coerce(value)
    return _checked(_build(Config, data, ""))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


@functools.cache
def field_docs() -> dict[str, dict[str, str]]:
    """Each settings class's field documentation (the string literal beside each field), inherited ones included:
    ``{class name: {field: text}}``."""
    tree = ast.parse(pathlib.Path(__file__).read_text(encoding="utf-8"))
    own: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            own[node.name] = {a.target.id: " ".join(b.value.value.split())
                              for a, b in zip(node.body, node.body[1:])
                              if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                              and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    classes = {n: c for n, c in globals().items() if isinstance(c, type) and dataclasses.is_dataclass(c)}
    return {n: {k: v for base in reversed(c.__mro__) for k, v in own.get(base.__name__, {}).items()}
            for n, c in classes.items()}


def to_yaml(cfg, docs: bool = False) -> str:
    """``cfg`` as a YAML config file that :func:`load_config` reads back; ``docs``: each field's documentation as a
    comment above it."""
    def emit(obj, indent: str) -> list[str]:
        out, notes = [], field_docs().get(type(obj).__name__, {})
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if docs and notes.get(f.name):
                lines = textwrap.wrap(notes[f.name], 116 - len(indent), break_on_hyphens=False)
                out += [f"{indent}# {line}" for line in lines]
            if dataclasses.is_dataclass(value):
                out += [f"{indent}{f.name}:"] + emit(value, indent + "  ")
            else:
                text = yaml.safe_dump({f.name: value}, default_flow_style=True, allow_unicode=True, width=10**6)
                out.append(indent + text.strip().removeprefix("{").removesuffix("}"))
        return out
    return "\n".join(emit(cfg, "")) + "\n"
