"""Configuration: dataclasses with documented fields, loaded from YAML (``configs/``) with ``--set a.b=v`` overrides."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import yaml

SCHEDULES = ("constant", "linear", "cosine", "step")   # train.alpha_schedule
WORLD_FAMILIES = ("bars", "shapes", "rect", "tri")      # world.families
# Facts a question of each family can need (bar charts: up to world.n_bars); a test checks it against the templates.
WORLD_FACT_SIZES = {"bars": (1, 2, 3, 4), "shapes": (1, 2), "rect": (1, 2), "tri": (1, 2)}


@dataclass
class HFSettings:
    """Runtime settings of an :class:`HFCaptioner` (the ``captioner:`` config fields of the ``hf`` backend).

    Attributes:
        dtype: ``auto`` (bf16 on a GPU that supports it, else fp32), ``bf16``, ``fp16`` or ``fp32``.
        device: ``auto`` (``cuda`` when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
        gradient_checkpointing: recompute activations in the backward pass (saves memory on long prompts).
        max_pixels: downscale images with more pixels than this before the processor (0: processor default).
        freeze_vision: keep the vision tower and projector frozen (LoRA targets only the language model; a
            full fine-tune trains only the language model).
        top_p: nucleus sampling for training captions; every log-prob (sampler, old, new, π_ref) is then of the
            renormalised nucleus, so the sampling policy and the trained one are the same distribution.
        generation_batch_size: caption rows per ``generate`` call (0: all rows at once).
        logprob_batch_size: rows per teacher-forced forward (0: the trainer's ``train.micro_batch`` when the
            captioner is given it, else 8). Chunks are aligned to multiples of this from row 0, so a micro-batch
            that is a multiple of it runs exactly the chunks of the recompute.
        answer_max_new_tokens: length cap of π_ref's clarification answers.
        share_prompt_cache: the teacher-forced log-prob passes (old, new, π_ref: always one function) run each
            problem's prompt (image included) once per row chunk and share its KV cache among the chunk's rows
            (same numbers up to float rounding; 1.6-2.4x faster with n=8 on CPU,
            ``benchmarks/results/hf_phases_qwen2-vl.json``). ``false``, or under ``gradient_checkpointing``:
            every row runs prompt + caption. Sampling always shares the prompt.
        processor_kwargs: extra image-processor arguments for every call, e.g. ``{max_patches: 6}`` (InternVL
            tiles) or ``{max_pixels: 401408}`` (Qwen-VL's own resize bound).
        trust_remote_code: passed to ``from_pretrained`` (not needed for the supported families).
        self_test: check the loaded checkpoint at start-up (``HFCaptioner.self_test``: incremental decode vs
            teacher-forced log-probs, LoRA layers present); a failure stops the run with its reason.
    """

    dtype: str = "auto"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    max_pixels: int = 0
    freeze_vision: bool = True
    top_p: float = 1.0
    generation_batch_size: int = 0
    logprob_batch_size: int = 0
    answer_max_new_tokens: int = 64
    share_prompt_cache: bool = True
    processor_kwargs: dict = field(default_factory=dict)
    trust_remote_code: bool = False
    self_test: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> HFSettings:
        """The fields of this class that ``cfg`` (e.g. ``Config.captioner``) has; the rest keep defaults."""
        out = cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)})
        out.processor_kwargs = dict(out.processor_kwargs or {})
        return out


@dataclass
class LoraSettings:
    """LoRA on the decoder (and optionally encoder) linear layers through PEFT.

    Attributes:
        enabled: train a LoRA adapter instead of all weights; the reference is the adapter-disabled model.
        r: rank. alpha: scaling numerator.
        dropout: LoRA dropout, in [0, 1). Only supervised warm-start passes apply it: the RL log-prob passes run
            with dropout off (old and new log-probs must be the same function), and the ``hf`` backend refuses a
            new adapter with dropout > 0 for that reason.
        targets: regex of module names to adapt.
    """

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: str = r".*decoder.*\.(q_proj|k_proj|v_proj|o_proj|fc1|fc2)"


@dataclass
class TinyVLMConfig:
    """Size of the tiny captioner.

    Attributes:
        vocab_size: filled from the tokenizer.
        d_model: width of encoder and decoder.
        n_heads: attention heads.
        n_layers: decoder layers.
        enc_layers: transformer layers over the image tokens.
        cnn_width: channels of the first conv layer (stride 8 overall: 64x64 -> 8x8 tokens).
        max_prompt_tokens: prompt (mode token + question) length cap.
        max_new_tokens: longest text the model writes.
        image_size: input side length in pixels.
    """

    vocab_size: int = 0
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    enc_layers: int = 1
    cnn_width: int = 32
    max_prompt_tokens: int = 40
    max_new_tokens: int = 48
    image_size: int = 64


@dataclass
class TinyReasonerConfig:
    """Size of the tiny reasoner.

    Attributes:
        vocab_size: filled from the tokenizer.
        d_model: width. n_heads: attention heads. n_layers: transformer layers.
        max_prompt_tokens: prompt length cap (the description is cut first).
        max_new_tokens: longest reply.
        shift: previous tokens whose embeddings are mixed into each position's input (a causal token shift:
            "the red bar is 7" puts "red bar is" next to the 7, so one attention step finds a fact by its name);
            0: none.
    """

    vocab_size: int = 0
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    max_prompt_tokens: int = 112
    max_new_tokens: int = 48
    shift: int = 3


@dataclass
class VLLMSettings:
    """The ``captioner.vllm`` config section (used when ``captioner.rollout_engine: vllm``).

    Attributes:
        mode: ``colocate`` (an engine inside each training process) or ``server`` (a running ``vllm serve``).
        gpu_memory_utilization: (colocate) share of the GPU's memory vLLM may take (weights + KV cache); the
            training model, its activations and optimizer state need the rest.
        max_model_len: (colocate) context length of the engine (0: from the run: the prompt with its image,
            1024 question tokens and the longest caption or answer, not the model's own 128k).
        max_lora_rank: largest adapter rank the engine accepts (0: the captioner's rank, rounded up to a size vLLM
            supports). The server must be started with ``--max-lora-rank`` at least this.
        sleep_level: 1: offload the weights to host memory and drop the KV cache during each update (colocate:
            ``llm.sleep``; server: ``POST /sleep``, which needs ``VLLM_SERVER_DEV_MODE=1``); 0: stay awake (a
            server on its own GPUs).
        enforce_eager: (colocate) no CUDA graphs (less memory, slower decoding).
        seed: (colocate) sampling seed of the engine (plus the rank under ``accelerate launch``).
        base_url: (server) e.g. ``http://127.0.0.1:8000/v1``.
        model: (server) served name of the base model (``--served-model-name``; empty: the server's first model).
        api_key_env: (server) environment variable holding the API key (unset: none is sent).
        adapter_dir: where adapters are written, in the engine's dtype (empty: a temporary directory under
            /dev/shm where it exists; server: a path it can read).
        concurrency: (server) chat requests in flight.
        timeout: (server) seconds per request.
        engine_kwargs: (colocate) more ``vllm.LLM(...)`` arguments, e.g. ``{max_num_seqs: 256}``.
        self_check: at start, sample the probe image: captions at temperature 1 must differ and the engine's
            log-probs must be the training model's (``acrl.backends.vllm_engine._Engine.self_check``).
        logprob_tolerance: the self-check's largest mean per-token gap between the engine's and the training
            model's log-probs (bf16 engines differ by about 0.01).
    """

    mode: str = "colocate"
    gpu_memory_utilization: float = 0.3
    max_model_len: int = 0
    max_lora_rank: int = 0
    sleep_level: int = 1
    enforce_eager: bool = False
    seed: int = 0
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    adapter_dir: str = ""
    concurrency: int = 32
    timeout: float = 600.0
    engine_kwargs: dict = field(default_factory=dict)
    self_check: bool = True
    logprob_tolerance: float = 0.05


@dataclass
class WarmStartConfig:
    """Supervised warm start.

    Attributes:
        steps: optimisation steps. batch_size: examples per step (fresh problems each step).
        lr: peak AdamW learning rate (linear warm-up for ``warmup`` steps, then cosine to 10%).
        weight_decay: AdamW weight decay. grad_clip: max gradient norm.
        qa_phase: fraction of steps in the answer-heavy first phase. qa_rate_early / qa_rate_late: share of
            clarification-answer examples in each phase (the rest are human-style captions).
        fact_rate: probability that a human caption states each quantity.
        eval_every: steps between held-out checks (0: only at the end). eval_n: held-out problems per check.
        seed: seed for model init and data order.
        save_every: also save the captioner every this many steps to ``OUT/step-<n>/`` (intermediate warm
            starts, e.g. a partly trained π_ref for the reference-sensitivity study); 0: only the final one.
        checkpoint_every: save a resumable checkpoint (model, optimiser, data order) every this many steps to
            ``OUT/checkpoint-<n>/``; ``acrl warmstart --resume`` continues from the newest; 0: none.
    """

    steps: int = 5000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    qa_phase: float = 0.3
    qa_rate_early: float = 0.85
    qa_rate_late: float = 0.5
    fact_rate: float = 0.3
    eval_every: int = 500
    eval_n: int = 200
    seed: int = 0
    save_every: int = 0
    checkpoint_every: int = 200


@dataclass
class ReasonerWarmStartConfig:
    """Supervised warm start of the tiny reasoner.

    Attributes:
        steps: optimisation steps. batch_size: examples per step (fresh problems each step).
        lr: peak AdamW learning rate (linear warm-up for ``warmup`` steps, then cosine to 10%).
        weight_decay: AdamW weight decay. grad_clip: max gradient norm.
        oracle_rate: share of descriptions that state every fact (the rest are human-style captions).
        final_rate / single_rate: share of final (after one clarification) and single-pass / denied prompts;
            the rest are decision prompts.
        read_budget: statements of a description the world reasoner (the teacher) reads.
        eval_every: steps between held-out checks (0: only at the end). eval_n: held-out problems per check.
        seed: seed of model init and data.
        checkpoint_every: save a resumable checkpoint every this many steps (``OUT/checkpoint-<n>/``); 0: none.
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    oracle_rate: float = 0.35
    final_rate: float = 0.3
    single_rate: float = 0.2
    read_budget: int = 6
    eval_every: int = 150
    eval_n: int = 150
    seed: int = 0
    checkpoint_every: int = 150


@dataclass
class WorldConfig:
    """How problems are drawn.

    Attributes:
        families: which figure families to draw from (``bars``, ``shapes``, ``rect``, ``tri``), uniformly.
        n_bars: bars per bar chart (3 or 4).
        needed_facts: relative weights of questions needing 1, 2, 3, 4 facts. A family without a question of the
            drawn size uses its nearest size (only bar charts have 3- and 4-fact questions).
        mc_rate: probability that a question is multiple choice (4 numeric options, gold is a letter).
        fact_rate: probability that a human-style caption mentions each quantity of the scene.
        seed: world seed; the same (seed, split, index) always gives the same problem.
    """

    families: list[str] = field(default_factory=lambda: list(WORLD_FAMILIES))
    n_bars: int = 3
    needed_facts: dict[int, float] = field(default_factory=lambda: {1: 0.15, 2: 0.6, 3: 0.25})
    mc_rate: float = 0.15
    fact_rate: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in WORLD_FAMILIES]
        if bad or not self.families:
            raise ValueError(f"world families {bad or self.families} not in {WORLD_FAMILIES}")
        if self.n_bars not in (2, 3, 4):
            raise ValueError(f"n_bars must be 2, 3 or 4, got {self.n_bars}")
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
            generation_batch_size, logprob_batch_size, answer_max_new_tokens, processor_kwargs, self_test,
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
    """The text-only reasoner (frozen, unless ``train.cotrain``).

    Attributes:
        backend: ``world`` (deterministic world reasoner), ``openai`` (any OpenAI-compatible endpoint: vLLM,
            SGLang, ``acrl serve reasoner``), ``hf`` (a local Hugging Face text LLM, in process; with
            ``train.cotrain`` it trains a LoRA adapter) or ``tiny`` (the world's small transformer reasoner,
            trainable; warm-started by ``acrl warmstart --reasoner``).
        read_budget: (world) statements of a caption the world reasoner reads before it stops reading.
        base_url: (openai) the server, e.g. ``http://127.0.0.1:8000/v1``.
        model: (openai) served model name (empty: the server's first); (hf) model directory or hub id, or a
            co-trained reasoner's checkpoint (``RUN/checkpoint-N/reasoner``); (tiny) checkpoint directory
            (empty: the shipped warm-started world reasoner).
        api_key_env: (openai) environment variable holding the API key.
        concurrency: (openai) requests in flight at once.
        timeout: (openai) seconds per request. max_retries: (openai) retries on connection errors, 429 and 5xx.
        temperature: sampling temperature of the reasoner. max_tokens: reply length cap.
        think: ``strip`` or ``keep`` R1-style ``<think>`` blocks before parsing.
        cache: (openai) response cache for temperature-0 calls: ``""``, ``memory`` or a ``.jsonl`` path.
        batch_size: (hf) prompts per generate call.
        noise: (world) probability that an answer of the reasoner is LLM-like wrong: built on a misread value
            (one needed fact off), or, when it could answer, a question about a fact it already has.
        noise_seed: (world) seed of those slips; a slip depends only on (seed, prompt), like a cached
            temperature-0 LLM.
        few_shot: (openai, hf) worked demonstrations of the reply protocol sent before each prompt as earlier
            chat turns (0: none; at most 3 for a decision, 2 for the other turns); helps small LLMs follow it.
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
    noise: float = 0.0
    noise_seed: int = 0
    few_shot: int = 0


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
        alpha: reward for a correct answer after one clarification (0.7 in the paper, 0 = binary ablation); after
            k clarifications ``alpha ** k`` (unless ``turn_rewards``).
        alpha_schedule: ``constant`` | ``linear`` | ``cosine`` | ``step``: α moves from ``alpha`` at the first step
            to ``alpha_end`` at the last (``step``: switches at the fraction ``alpha_step_at`` of the run).
        alpha_end: α at the end of a schedule. alpha_step_at: where a ``step`` schedule switches (0..1).
        max_clarifications: questions the reasoner may ask in turn (K; 1 = the paper); π_ref answers each.
        turn_rewards: reward of a correct answer after 0, 1, ..., K clarifications, e.g. ``[1, 0.7, 0.5]``
            (empty: ``alpha ** k``); needs K + 1 entries and a constant α.
        reference: π_ref's checkpoint (answers clarifications and anchors the KL); empty: the starting captioner.
        advantage: ``bnpo`` | ``bnpo_decomposed`` | ``grpo`` | ``rloo`` | ``reinforce``.
        lr: AdamW learning rate (constant after ``warmup`` steps of linear warm-up).
        warmup: warm-up steps. weight_decay: AdamW weight decay. grad_clip: max gradient norm.
        clip_low / clip_high: PPO ratio clip range [1-clip_low, 1+clip_high].
        kl_beta: weight of the k3 KL penalty to π_ref.
        aggregation: token aggregation of the loss (``seq-mean-token-mean``, ``seq-mean-token-sum``, ``token-mean``,
            ``seq-mean-token-sum-norm``).
        tis_cap: truncated importance sampling between the sampler's log-probs and the trainer's (a vLLM engine
            captioner): each token's surrogate is weighted by min(π_old / μ, tis_cap);
            0: off. The gap is logged either way (``sampler_kl``, ``sampler_ratio_max``). TRL's default cap is 2.
        epochs: optimisation passes over each rollout batch (old log-probs kept for the ratio).
        micro_batch: caption rows per forward/backward (gradients accumulate over the step).
        clarifier_noise: probability that π_ref's answer states a wrong value (world regime "noisy clarifier").
        max_failed_fraction: a step whose share of failed episodes (the reasoner or clarifier service did not
            answer after its own retries) exceeds this does not count: it is retried whole from the same random
            state (see ``step_retries``), so a counted step is the step a run without the fault would have taken.
            Default 0: any failed episode retries the step. Above 0, failed episodes up to this share are masked
            out of the update and counted (``failed_episodes`` in metrics.jsonl).
        eval_every: steps between held-out evaluations during training (0: none). eval_n: problems per check.
        checkpoint_every: steps between checkpoints (the last step, and a stop on SIGINT / SIGTERM or an outage,
            always write one).
        keep_checkpoints: how many of the newest checkpoints (``OUT/checkpoint-<step>/``) to keep (0: all).
        log_episodes: groups per step whose transcripts go to ``episodes.jsonl``.
        seed: seed of model sampling and data order.
        threads: torch CPU threads (0: torch's default).
        cotrain: also train the reasoner on the same episodes (``reasoner_train``; needs ``reasoner.backend``
            ``tiny`` or ``hf``); default false: the paper's frozen reasoner.
        report_to: also send step metrics to experiment trackers through accelerate (``tensorboard``, ``wandb``,
            ``all``; empty: only ``metrics.jsonl``). The tracker's package must be installed.
        overlap: compute π_ref's log-probs for the KL term while the step's episodes run (in a worker thread),
            so the reasoner's calls do not wait for them; the results are the same either way.
        step_retries: times a step whose episodes failed (a service outage) is retried, from the same random
            state, before the run checkpoints and exits with an error saying how to resume.
        retry_wait: seconds before the first retry; the wait doubles with each retry (at most 120 s each).
    """

    steps: int = 100
    problems_per_step: int = 16
    samples_per_problem: int = 8
    alpha: float = 0.7
    alpha_schedule: str = "constant"
    alpha_end: float = 0.0
    alpha_step_at: float = 0.5
    max_clarifications: int = 1
    turn_rewards: list[float] = field(default_factory=list)
    reference: str = ""
    advantage: str = "bnpo"
    lr: float = 3e-4
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_beta: float = 0.02
    tis_cap: float = 0.0
    aggregation: str = "seq-mean-token-mean"
    epochs: int = 1
    micro_batch: int = 128
    clarifier_noise: float = 0.0
    max_failed_fraction: float = 0.0
    eval_every: int = 0
    eval_n: int = 200
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_episodes: int = 2
    seed: int = 0
    threads: int = 0
    cotrain: bool = False
    report_to: str = ""
    overlap: bool = True
    step_retries: int = 6
    retry_wait: float = 5.0

    def __post_init__(self) -> None:
        if self.turn_rewards and len(self.turn_rewards) < self.max_clarifications + 1:
            raise ValueError(f"turn_rewards needs max_clarifications + 1 = {self.max_clarifications + 1} entries "
                             f"(rewards after 0..{self.max_clarifications} clarifications), got "
                             f"{len(self.turn_rewards)}")
        if self.turn_rewards and self.alpha_schedule != "constant":
            raise ValueError("turn_rewards fixes every turn's reward: it cannot be combined with an alpha_schedule")
        if self.advantage == "bnpo_decomposed" and (self.max_clarifications > 1 or self.turn_rewards
                                                    or self.alpha_schedule != "constant"):
            raise ValueError("advantage bnpo_decomposed is defined for the paper's reward (one clarification, "
                             "constant alpha)")


@dataclass
class ReasonerLoraSettings(LoraSettings):
    """LoRA of an hf reasoner in co-training (the fields of :class:`acrl.backends.tiny.LoraSettings`): on by
    default, on the attention projections of every layer."""

    enabled: bool = True
    targets: str = r".*\.(q_proj|k_proj|v_proj|o_proj)$"


@dataclass
class ReasonerTrainConfig:
    """The reasoner's side of co-training (``train.cotrain``): its own reward, advantages, optimiser and KL.

    Reward of an episode for the reasoner: 1 for a correct final answer, 0 otherwise, minus ``question_cost`` for
    every clarification question it asked. Advantages are taken over the same groups of M episodes as the
    captioner's; every reply of the reasoner in an episode (the decision, and the answer after the
    clarification) carries the episode's advantage.

    Attributes:
        question_cost: reward subtracted per question asked (0: asking is free).
        temperature: sampling temperature of the reasoner's replies in training episodes (evaluation is greedy).
        advantage: ``bnpo`` | ``grpo`` | ``rloo`` | ``reinforce``.
        lr: AdamW learning rate (constant after ``warmup`` steps). warmup, weight_decay, grad_clip: as in ``train``.
        clip_low / clip_high: PPO ratio clip range. kl_beta: weight of the k3 KL to the reasoner's frozen start.
        aggregation: token aggregation of the loss (as ``train.aggregation``).
        micro_batch: reply rows per forward/backward.
        lora: (hf) the reasoner's LoRA adapter (``enabled`` must be true for hf: the adapter is what trains).
        gradient_checkpointing: (hf) recompute the reasoner's activations in its gradient pass (prompts of
            thousands of tokens x ``micro_batch`` rows).
    """

    question_cost: float = 0.1
    temperature: float = 1.0
    advantage: str = "bnpo"
    lr: float = 1e-4
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_beta: float = 0.02
    aggregation: str = "seq-mean-token-mean"
    micro_batch: int = 128
    lora: ReasonerLoraSettings = field(default_factory=ReasonerLoraSettings)
    gradient_checkpointing: bool = False


@dataclass
class EvalConfig:
    """Held-out evaluation.

    Attributes:
        split: world split to evaluate on. n: number of problems.
        batch_size: problems per captioning batch.
        reference: checkpoint of π_ref that answers clarifications (empty: the shipped warm-started captioner).
        sets: named evaluation sets beyond the training distribution, each a mapping of section overrides
            (``world``, ``reasoner``, ``clarifier``, ``train``) applied to this config for that evaluation, e.g.
            ``{tri: {world: {families: [tri]}}, noisy: {reasoner: {noise: 0.2}}}``
            (held-out families, question sizes, another reasoner); see :func:`eval_view`.
    """

    split: str = "test"
    n: int = 500
    batch_size: int = 100
    reference: str = ""
    sets: dict[str, dict] = field(default_factory=dict)


@dataclass
class Config:
    """Everything one run needs. Sections: world, captioner, model (tiny captioner size), reasoner, clarifier,
    warmstart, train, eval; for the trainable world reasoner reasoner_model (its size) and reasoner_warmstart,
    and for co-training reasoner_train."""

    world: WorldConfig = field(default_factory=WorldConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    model: TinyVLMConfig = field(default_factory=TinyVLMConfig)
    reasoner: ReasonerConfig = field(default_factory=ReasonerConfig)
    clarifier: ClarifierConfig = field(default_factory=ClarifierConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reasoner_model: TinyReasonerConfig = field(default_factory=TinyReasonerConfig)
    reasoner_warmstart: ReasonerWarmStartConfig = field(default_factory=ReasonerWarmStartConfig)
    reasoner_train: ReasonerTrainConfig = field(default_factory=ReasonerTrainConfig)


# --- validation: every field is checked against its type (from the dataclass annotations) and, where it has
# limits beyond its type, against the rule below. This table is the one place that says what a value may be.

def _ge(lo):
    return (lambda v: v >= lo), f">= {lo}"


def _gt(lo):
    return (lambda v: v > lo), f"> {lo}"


def _within(lo, hi):
    return (lambda v: lo <= v <= hi), f"in [{lo}, {hi}]"


def _one_of(*names):
    return (lambda v: v in names), "one of " + ", ".join(repr(n) for n in names)


def _csv_of(*names):
    return (lambda v: all(x in names for x in v.split(",") if x) if v else True), \
        "empty or a comma-separated list of " + ", ".join(names)


_PROB = _within(0.0, 1.0)
EVAL_SECTIONS = ("world", "reasoner", "clarifier", "train")
RULES: dict[str, tuple] = {
    "world.mc_rate": _PROB, "world.fact_rate": _PROB, "world.seed": _ge(0),
    "captioner.backend": _one_of("tiny", "hf"),
    "captioner.rollout_engine": _one_of("hf", "vllm"),
    "captioner.temperature": (_ge(0.0)[0], ">= 0 (0: greedy)"),
    "captioner.max_new_tokens": _ge(1),
    "captioner.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "captioner.dtype": _one_of("auto", "bf16", "fp16", "fp32"),
    "captioner.attn_implementation": _one_of("sdpa", "eager", "flash_attention_2"),
    "captioner.max_pixels": _ge(0), "captioner.generation_batch_size": _ge(0),
    "captioner.logprob_batch_size": _ge(0), "captioner.answer_max_new_tokens": _ge(1),
    "captioner.lora.r": _ge(1), "captioner.lora.alpha": _gt(0), "captioner.lora.dropout": (lambda v: 0 <= v < 1,
                                                                                            "in [0, 1)"),
    "captioner.vllm.mode": _one_of("colocate", "server"),
    "captioner.vllm.gpu_memory_utilization": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "captioner.vllm.max_model_len": _ge(0), "captioner.vllm.max_lora_rank": _ge(0),
    "captioner.vllm.sleep_level": _one_of(0, 1, 2), "captioner.vllm.concurrency": _ge(1),
    "captioner.vllm.timeout": _gt(0), "captioner.vllm.logprob_tolerance": _gt(0),
    "model.vocab_size": _ge(0), "model.d_model": _ge(1), "model.n_heads": _ge(1), "model.n_layers": _ge(1),
    "model.enc_layers": _ge(0), "model.cnn_width": _ge(1), "model.max_prompt_tokens": _ge(1),
    "model.max_new_tokens": _ge(1), "model.image_size": _ge(8),
    "reasoner.backend": _one_of("world", "openai", "hf", "tiny"), "reasoner.read_budget": _ge(1),
    "reasoner.concurrency": _ge(1), "reasoner.timeout": _gt(0), "reasoner.max_retries": _ge(0),
    "reasoner.temperature": _ge(0.0), "reasoner.max_tokens": _ge(1), "reasoner.think": _one_of("strip", "keep"),
    "reasoner.batch_size": _ge(1), "reasoner.noise": _PROB, "reasoner.noise_seed": _ge(0),
    "reasoner.few_shot": _ge(0),
    "clarifier.backend": _one_of("reference", "openai"), "clarifier.concurrency": _ge(1),
    "clarifier.timeout": _gt(0), "clarifier.max_retries": _ge(0), "clarifier.temperature": _ge(0.0),
    "clarifier.max_tokens": _ge(1),
    "warmstart.steps": _ge(1), "warmstart.batch_size": _ge(1), "warmstart.lr": _gt(0), "warmstart.warmup": _ge(0),
    "warmstart.weight_decay": _ge(0), "warmstart.grad_clip": _gt(0), "warmstart.qa_phase": _PROB,
    "warmstart.qa_rate_early": _PROB, "warmstart.qa_rate_late": _PROB, "warmstart.fact_rate": _PROB,
    "warmstart.eval_every": _ge(0), "warmstart.eval_n": _ge(1), "warmstart.save_every": _ge(0),
    "warmstart.checkpoint_every": _ge(0), "reasoner_warmstart.checkpoint_every": _ge(0),
    "train.steps": _ge(1), "train.problems_per_step": _ge(1),
    "train.samples_per_problem": (lambda v: v >= 2, ">= 2 (an advantage group needs at least two samples)"),
    "train.alpha": _PROB, "train.alpha_schedule": _one_of(*SCHEDULES), "train.alpha_end": _PROB,
    "train.alpha_step_at": _PROB, "train.max_clarifications": _ge(1),
    "train.turn_rewards": (lambda v: all(0 <= x <= 1 for x in v), "a list of rewards in [0, 1]"),
    "train.advantage": _one_of("bnpo", "bnpo_decomposed", "grpo", "rloo", "reinforce"),
    "train.lr": _gt(0), "train.warmup": _ge(0), "train.weight_decay": _ge(0), "train.grad_clip": _gt(0),
    "train.clip_low": (lambda v: 0 <= v < 1, "in [0, 1)"), "train.clip_high": _ge(0), "train.kl_beta": _ge(0),
    "train.tis_cap": _ge(0),
    "train.aggregation": _one_of("seq-mean-token-mean", "seq-mean-token-sum", "token-mean",
                                 "seq-mean-token-sum-norm"),
    "train.epochs": _ge(1), "train.micro_batch": _ge(1), "train.clarifier_noise": _PROB,
    "train.max_failed_fraction": _PROB, "train.eval_every": _ge(0), "train.eval_n": _ge(1),
    "train.checkpoint_every": _ge(1), "train.keep_checkpoints": _ge(0), "train.log_episodes": _ge(0),
    "train.seed": _ge(0), "train.threads": _ge(0),
    "train.report_to": _csv_of("tensorboard", "wandb", "all"),
    "train.step_retries": _ge(0), "train.retry_wait": _ge(0),
    "reasoner_model.vocab_size": _ge(0), "reasoner_model.d_model": _ge(1), "reasoner_model.n_heads": _ge(1),
    "reasoner_model.n_layers": _ge(1), "reasoner_model.max_prompt_tokens": _ge(8),
    "reasoner_model.max_new_tokens": _ge(4),
    "reasoner_warmstart.steps": _ge(1), "reasoner_warmstart.batch_size": _ge(1), "reasoner_warmstart.lr": _gt(0),
    "reasoner_warmstart.warmup": _ge(0), "reasoner_warmstart.weight_decay": _ge(0),
    "reasoner_warmstart.grad_clip": _gt(0), "reasoner_warmstart.oracle_rate": _PROB,
    "reasoner_warmstart.final_rate": _PROB, "reasoner_warmstart.single_rate": _PROB,
    "reasoner_warmstart.read_budget": _ge(1), "reasoner_warmstart.eval_every": _ge(0),
    "reasoner_warmstart.eval_n": _ge(1), "reasoner_warmstart.seed": _ge(0),
    "reasoner_train.question_cost": _ge(0.0), "reasoner_train.temperature": _gt(0.0),
    "reasoner_train.advantage": _one_of("bnpo", "grpo", "rloo", "reinforce"),
    "reasoner_train.lr": _gt(0), "reasoner_train.warmup": _ge(0), "reasoner_train.weight_decay": _ge(0),
    "reasoner_train.grad_clip": _gt(0), "reasoner_train.clip_low": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "reasoner_train.clip_high": _ge(0), "reasoner_train.kl_beta": _ge(0),
    "reasoner_train.aggregation": _one_of("seq-mean-token-mean", "seq-mean-token-sum", "token-mean",
                                          "seq-mean-token-sum-norm"),
    "reasoner_train.micro_batch": _ge(1), "reasoner_train.lora.r": _ge(1), "reasoner_train.lora.alpha": _gt(0),
    "reasoner_train.lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eval.split": _one_of("train", "val", "test"), "eval.n": _ge(1), "eval.batch_size": _ge(1),
    "eval.sets": (lambda v: all(isinstance(o, dict) and set(o) <= set(EVAL_SECTIONS) for o in v.values()),
                  "a mapping of set names to overrides of the sections " + ", ".join(EVAL_SECTIONS)),
}


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
    names = {f.name for f in dataclasses.fields(cls)}
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
        if key in RULES:
            ok, allowed = RULES[key]
            if not ok(v):
                raise ValueError(f"config {key}={v!r}: must be {allowed}")
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:   # a section's own cross-field checks (__post_init__)
        raise ValueError(f"config {where or 'root'}: {e}") from e


def validate(cfg: Config) -> Config:
    """Check every field of a built config (e.g. after code changed it) as :func:`load_config` does."""
    return _checked(_build(Config, to_dict(cfg), ""))


def _checked(cfg: Config) -> Config:
    for name in cfg.eval.sets:   # every evaluation set must give a valid config
        eval_view(cfg, name)
    if cfg.train.cotrain and cfg.reasoner.backend not in ("tiny", "hf"):
        raise ValueError(f"config train.cotrain=true trains the reasoner: reasoner.backend must be tiny or hf, "
                         f"got {cfg.reasoner.backend!r}")
    if cfg.train.cotrain and cfg.reasoner.backend == "hf" and not cfg.reasoner_train.lora.enabled:
        raise ValueError("config train.cotrain=true with reasoner.backend=hf trains a LoRA adapter: "
                         "reasoner_train.lora.enabled must be true")
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
        return _build(Config, data, "")
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
    checked (:data:`RULES`). ``base``: start from these values (a stored run's config) instead of the defaults,
    when no file is given."""
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
