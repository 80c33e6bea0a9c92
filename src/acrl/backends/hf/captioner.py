"""``HFCaptioner``: a Hugging Face image-text-to-text model (Qwen2-VL, Qwen2.5-VL, InternVL, Llava, ...) as a
``Policy``, over the one sampler (:mod:`~acrl.backends.hf.sampler`) and the one teacher-forced log-prob function
(:mod:`~acrl.backends.hf.logprobs`).

* The user turn is ``[image, captioner_prompt(question)]`` rendered by the processor's chat template (which
  writes the special tokens itself: the processor then adds none, so no second BOS); images larger than
  ``max_pixels`` are downscaled first;
* every teacher-forced pass (old log-probs, update, π_ref) runs in the same mode (dropout off, see
  :meth:`HFCaptioner._policy_mode`), in the same row chunks (``logprob_batch_size``, else the trainer's
  micro-batch) and on the same path: ``share_prompt_cache`` (default, not under gradient checkpointing, which
  drops the cache) runs each prompt once per chunk, else every row runs prompt + caption;
* :meth:`HFCaptioner.self_test` (run by :meth:`HFCaptioner.load`): incremental decode vs teacher-forced
  log-probs on two left-padded rows with images of different sizes, and a non-zero LoRA target count;
* PEFT LoRA on every linear layer of the language model (vision tower and projector frozen by default); the
  reference π_ref is the same weights under ``disable_adapter()``. Without LoRA a frozen copy is kept. A
  ``reference`` checkpoint that is not the policy's own starting point is loaded as a separate frozen model
  (the checkpoint format and π_ref's lineage: :mod:`~acrl.backends.hf.checkpoint`).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from PIL import Image

from acrl.backends.hf.checkpoint import (
    identity,
    lineage,
    load_merged_model,
    merge_adapters,
    reference_adapters,
    resolve_checkpoint,
    write_checkpoint,
    write_without_adapter,
)
from acrl.backends.hf.inputs import Feed, HFContext
from acrl.backends.hf.loading import (
    add_adapter,
    enable_checkpointing,
    load_model,
    load_processor,
    lora_from_adapter_dir,
    lora_from_peft,
    lora_settings,
    on_device,
    quiet,
    train_language_model_only,
)
from acrl.backends.hf.logprobs import caption_logprobs
from acrl.backends.hf.sampler import pad_rollout, sample
from acrl.config import HFSettings
from acrl.rollout.prompts import captioner_prompt, clarify_prompt
from acrl.rollout.protocols import Rollout

DEFAULT_LOGPROB_ROWS = 8             # rows per teacher-forced forward when neither setting names a number


class HFCaptioner:
    """``Policy`` over a Hugging Face image-text-to-text model (PEFT LoRA or full fine-tuning)."""

    rollout_engine = None   # samples captions and π_ref's answers instead (acrl.backends.vllm_engine); None: HF

    def before_update(self) -> None:
        """Called by the trainer before each optimisation step: the rollout engine frees the GPU."""
        if self.rollout_engine is not None:
            self.rollout_engine.sleep()

    def after_update(self) -> None:
        """Called by the trainer after each optimisation step: the rollout engine gets the new adapter."""
        if self.rollout_engine is not None:
            self.rollout_engine.push_adapter()

    def set_sampling_seed(self, seed: int) -> None:
        """Called by the trainer before each step with a seed derived from (train.seed, step, rank): a rollout
        engine seeds its requests from it, so a resumed run samples as the uninterrupted one (HF sampling draws
        from torch's RNG, whose CPU and CUDA states the checkpoint restores)."""
        if self.rollout_engine is not None:
            self.rollout_engine.sampling_seed = seed

    def __init__(self, model, processor, lora: Any = None, settings: HFSettings | None = None,
                 base_path: str = "", reference_model=None, micro_batch: int = 0,
                 reference_adapters: list[str] | None = None, reference_sources: list[str] | None = None):
        """``model``: a plain model (a new adapter is added when ``lora.enabled``) or a ``PeftModel`` (its adapter
        keeps training with its own settings). ``reference_model``: π_ref as a separate frozen model (default:
        LoRA: the adapter disabled; full fine-tune: a frozen copy). ``micro_batch``: the trainer's rows per
        forward/backward (``train.micro_batch``), the row chunk of every teacher-forced pass unless
        ``settings.logprob_batch_size`` is set. ``reference_adapters`` / ``reference_sources``: adapter
        directories already merged into ``model``'s weights (π_ref = base + them), and where they came from;
        saved with every checkpoint."""
        from peft import PeftModel

        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.settings = settings or HFSettings()
        self.base_path = base_path
        self.micro_batch = int(micro_batch or 0)
        self.reference_adapters = list(reference_adapters or [])
        self.reference_sources = list(reference_sources or self.reference_adapters)
        device = str(next(model.parameters()).device)
        self.lora = lora_settings(lora)
        if isinstance(model, PeftModel):
            self.lora = lora_from_peft(model)   # rank, alpha, targets as saved: the engine must match them
            self.model = model
            self.ref_model = None
        elif self.lora.enabled:
            self.model = add_adapter(model, self.lora, self.settings.freeze_vision)
            self.ref_model = None
        else:
            self.model = model
            self.ref_model = (reference_model or copy.deepcopy(model)).eval().requires_grad_(False)
            if self.settings.freeze_vision:
                train_language_model_only(model)
        if self.lora.enabled and reference_model is not None:
            self.ref_model = reference_model.eval().requires_grad_(False)
        if self.lora.enabled:
            peft_cfg = self.model.peft_config[self.model.active_adapter]
            peft_cfg.base_model_name_or_path = base_path or peft_cfg.base_model_name_or_path
        if self.settings.gradient_checkpointing:
            enable_checkpointing(self.base_model())
        self.feed = Feed.of(self.base_model(), processor, self.tokenizer, device)
        self.model.eval()

    # the model's conventions (the vLLM engine mirrors them); the device every public method runs under
    @property
    def pad_id(self) -> int:
        return self.feed.pad_id

    @property
    def eos_ids(self) -> list[int]:
        return self.feed.eos_ids

    @property
    def banned(self) -> torch.Tensor:
        return self.feed.banned

    @property
    def device(self) -> str:
        return self.feed.device

    # --- construction / persistence -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, lora: Any = None, settings: HFSettings | None = None,
             reference: str | None = None, micro_batch: int = 0) -> HFCaptioner:
        """Load a base checkpoint (local directory or hub name), an ``HFCaptioner.save`` directory (adapter +
        json pointing at the base) or a plain PEFT adapter directory.

        ``reference``: π_ref's checkpoint. The same checkpoint as ``path`` means training *starts* here: a saved
        adapter is merged into the base weights and a new adapter (``lora``'s settings, or the saved adapter's
        shape when ``lora`` is None) trains on top, so π_ref is this checkpoint. A different one (or None) means
        ``path`` *continues* a run: its adapter keeps training with its own rank/targets, and π_ref is what the
        adapter is disabled to (the base plus the adapters the run started from); if ``reference`` names another
        model, that one is loaded as a separate frozen π_ref. With ``lora.enabled: false`` a saved adapter is
        merged and all weights train (π_ref: a frozen copy, or ``reference``).
        ``micro_batch``: the trainer's ``train.micro_batch`` (see :class:`HFCaptioner`).
        """
        settings = settings or HFSettings()
        base, adapter = resolve_checkpoint(path)
        refs, sources = reference_adapters(path)
        model = merge_adapters(load_model(base, settings), refs)
        processor = load_processor(base, settings.trust_remote_code)
        wants_lora = getattr(lora, "enabled", False) if adapter is None else getattr(lora, "enabled", True)
        starts_here = reference is not None and lineage(reference) == lineage(path)
        new_lora = lora
        if adapter is not None and wants_lora and not starts_here:     # continue the saved adapter
            from peft import PeftModel

            with quiet():
                model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        elif adapter is not None:                                       # start from it: merge it into π_ref
            model = merge_adapters(model, [adapter])
            if wants_lora:
                refs, sources = refs + [adapter], sources + [identity(adapter)]
                new_lora = lora if lora is not None else lora_from_adapter_dir(adapter)
        own = (identity(base), tuple(sources)) if wants_lora else lineage(path)   # π_ref of this policy
        ref = None
        if reference and lineage(reference) != own:
            ref = load_merged_model(reference, settings)
        cap = cls(model, processor, new_lora, settings, base_path=base, reference_model=ref,
                  micro_batch=micro_batch, reference_adapters=refs if wants_lora else [],
                  reference_sources=sources if wants_lora else [])
        if settings.self_test:
            report = cap.self_test()
            if not report["ok"]:
                raise ValueError(f"captioner {path!r} failed its start-up self-test: {report['problem']} "
                                   f"(captioner.self_test: false skips it)")
        return cap

    def base_model(self):
        return self.model.get_base_model() if self.lora.enabled else self.model

    def save(self, path: str) -> None:
        """LoRA: a standard PEFT directory + ``acrl_captioner.json`` naming the base, and the adapters merged
        into π_ref copied to ``reference/<i>`` (then the adapter applies to base + those, in order:
        ``load_merged_model`` and ``export_merged`` do that; plain ``PeftModel.from_pretrained(base, path)`` only
        when there are none). Full fine-tune: the whole model and processor (``save_pretrained``)."""
        write_checkpoint(path, self.model, self.processor, self.lora.enabled, self.base_path,
                         self.reference_adapters, self.reference_sources,
                         getattr(self.base_model().config, "model_type", ""))

    def reference_checkpoint(self, out: str) -> str:
        """A directory holding π_ref's weights as one plain checkpoint, for engines that load a model by path
        (vLLM): the base checkpoint itself when no adapter was merged into it, else the merged weights (exactly
        the training model's, adapter layers stripped) written to ``out``."""
        if not self.lora.enabled or not self.reference_adapters:
            return self.base_path
        return write_without_adapter(self.base_model(), self.processor, out)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.base_model().parameters())

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimiser updates (LoRA: the adapter, kept in fp32 by PEFT). A full fine-tune refuses weights
        in bf16/fp16: AdamW would update them in place with no fp32 master copy, and at learning rates like
        1e-5 most updates round away."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        low = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype in (torch.bfloat16,
                                                                                           torch.float16)})
        if low and not self.lora.enabled:
            raise ValueError(
                f"full fine-tuning of {'/'.join(low)} weights: AdamW has no fp32 master weights here and most "
                f"updates round away; use LoRA (captioner.lora.enabled: true) or captioner.dtype: fp32")
        return params

    @contextlib.contextmanager
    def _reference(self):
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.model.disable_adapter():
                yield self.base_model()

    @contextlib.contextmanager
    def _policy_mode(self):
        """The mode of every π_θ teacher-forced pass, old log-probs and update alike: train mode (gradient
        checkpointing is active only there) with every dropout layer off (LoRA dropout of a loaded adapter
        included), so both passes compute the same function. Back to eval mode afterwards."""
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        try:
            yield self.base_model()
        finally:
            self.model.eval()

    # --- encoding -------------------------------------------------------------------------------------------
    def _fit(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        cap = self.settings.max_pixels
        if cap and image.width * image.height > cap:
            s = (cap / (image.width * image.height)) ** 0.5
            image = image.resize((max(1, int(image.width * s)), max(1, int(image.height * s))), Image.BICUBIC)
        return image

    def encode(self, image: Image.Image, text: str) -> dict[str, torch.Tensor]:
        """Processor output for one user turn ``[image, text]`` + the generation prompt (batch of 1). The chat
        template writes the special tokens (BOS included), so the processor adds none."""
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        enc = self.processor(text=[prompt], images=[[self._fit(image)]], return_tensors="pt",
                             add_special_tokens=False, **(self.settings.processor_kwargs or {}))
        return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k != "attention_mask"}

    def _decode(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
        rows = [t[: int(m.sum())].tolist() for t, m in zip(tokens, mask)]
        return [s.strip() for s in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    # --- sampling -------------------------------------------------------------------------------------------
    def _sample(self, model, encs: list[dict], rows_of: list[int], temperature: float, max_new: int,
                greedy: bool, top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return sample(model, self.feed, encs, rows_of, temperature, max_new, greedy, top_p,
                      self.settings.generation_batch_size)

    @on_device
    def generate(self, images: list[Image.Image], prompts: list[str], n: int = 1, temperature: float = 1.0,
                 max_new_tokens: int = 48, greedy: bool = False) -> Rollout:
        """``n`` captions per (image, question); ``prompts`` are questions for ``captioner_prompt``. With a
        ``rollout_engine`` (e.g. vLLM) the engine samples; the Rollout is the same either way. A sampled rollout's
        ``logprobs`` (the PPO's old log-probs) come from :meth:`logprobs` without gradient; the sampler's own are
        kept in ``context.sampler_logprobs`` (:meth:`logprob_mismatch`). Greedy rollouts (evaluation) keep the
        sampler's: nothing trains on them."""
        self.model.eval()
        if self.rollout_engine is not None:
            roll = self.rollout_engine.generate(images, prompts, n, temperature, max_new_tokens, greedy)
        else:
            encs = [self.encode(im, captioner_prompt(q)) for im, q in zip(images, prompts)]
            rows_of = [g for g in range(len(encs)) for _ in range(n)]
            tokens, mask, lps = self._sample(self.base_model(), encs, rows_of, temperature, max_new_tokens,
                                             greedy, self.settings.top_p)
            texts = self._decode(tokens, mask)
            roll = Rollout(texts=[texts[g * n:(g + 1) * n] for g in range(len(encs))], tokens=tokens, mask=mask,
                           logprobs=lps, temperature=1.0 if greedy else temperature, context=HFContext(encs, n))
        roll = pad_rollout(roll, max_new_tokens, self.pad_id)   # constant width: the length normaliser
        roll.context.sampler_logprobs = roll.logprobs
        roll.context.top_p = 1.0 if greedy else self.settings.top_p
        if not greedy:
            with torch.no_grad(), self._policy_mode() as model:
                roll.logprobs = self._logprobs(model, roll, 0, roll.tokens.shape[0])
        return roll

    @staticmethod
    def logprob_mismatch(rollout: Rollout) -> dict[str, float]:
        """How far the sampler's log-probs of a rollout's tokens are from the trainer's (its ``logprobs``): max and
        mean absolute difference over caption tokens, and the mean of ``exp(trainer - sampler) - 1``."""
        samp = getattr(rollout.context, "sampler_logprobs", None)
        m = rollout.mask > 0
        if samp is None or not bool(m.any()):
            return {"tokens": 0, "max_abs": 0.0, "mean_abs": 0.0, "ratio_mean_minus_1": 0.0}
        d = (rollout.logprobs - samp)[m]
        return {"tokens": int(m.sum()), "max_abs": float(d.abs().max()), "mean_abs": float(d.abs().mean()),
                "ratio_mean_minus_1": float(torch.exp(d).mean() - 1)}

    @on_device
    @torch.no_grad()
    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        """π_ref (adapter disabled / frozen copy) answers clarification questions, greedy."""
        if not images:
            return []
        if self.rollout_engine is not None and self.ref_model is None:   # the engine without adapter is π_ref
            return self.rollout_engine.answer(images, questions)
        encs = [self.encode(im, clarify_prompt(q)) for im, q in zip(images, questions)]
        with self._reference() as ref:
            ref.eval()
            tokens, mask, _ = self._sample(ref, encs, list(range(len(encs))), 1.0,
                                           self.settings.answer_max_new_tokens, greedy=True)
        return self._decode(tokens, mask)

    @on_device
    @torch.no_grad()
    def policy_answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        """Answers by the current policy (diagnostics; training uses the reference's answers)."""
        encs = [self.encode(im, clarify_prompt(q)) for im, q in zip(images, questions)]
        self.model.eval()
        tokens, mask, _ = self._sample(self.base_model(), encs, list(range(len(encs))), 1.0,
                                       self.settings.answer_max_new_tokens, greedy=True)
        return self._decode(tokens, mask)

    # --- log-probs ------------------------------------------------------------------------------------------
    def _shares_prompt(self) -> bool:
        """Whether the teacher-forced passes run prompts once per chunk: not under gradient checkpointing
        (checkpointed layers drop the KV cache), and then for *every* pass, with or without gradient, so that old
        and new log-probs come from the same numerics."""
        return self.settings.share_prompt_cache and not self.settings.gradient_checkpointing

    def logprob_rows(self) -> int:
        """Rows per teacher-forced forward: ``logprob_batch_size``, else the trainer's micro-batch, else 8."""
        return self.settings.logprob_batch_size or self.micro_batch or DEFAULT_LOGPROB_ROWS

    def _logprobs(self, model, rollout: Rollout, start: int, stop: int, shared: bool | None = None) -> torch.Tensor:
        """Log-probs of rows ``[start, stop)`` under ``model`` (:func:`~acrl.backends.hf.logprobs.caption_logprobs`
        in :meth:`logprob_rows` chunks); ``shared``: the prompt-sharing path or not (default:
        :meth:`_shares_prompt`)."""
        shared = self._shares_prompt() if shared is None else shared
        return caption_logprobs(model, self.feed, rollout, start, stop, self.logprob_rows(), shared)

    @on_device
    def logprobs(self, rollout: Rollout, rows: slice | None = None, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs of ``rollout.tokens[rows]`` (CPU float32): π_θ with gradient, π_ref without."""
        start, stop, _ = (rows or slice(None)).indices(rollout.tokens.shape[0])
        if reference:
            with torch.no_grad(), self._reference() as ref:
                ref.eval()
                return self._logprobs(ref, rollout, start, stop)
        with self._policy_mode() as model:
            return self._logprobs(model, rollout, start, stop)

    # --- start-up check -------------------------------------------------------------------------------------
    @on_device
    @torch.no_grad()
    def self_test(self, tokens: int = 4) -> dict:
        """Check the loaded checkpoint the way training uses it: greedy incremental decode of two prompts of
        different lengths with images of different sizes (left-padded together) against the teacher-forced
        log-probs of the same tokens (prompt + caption in one forward, positions computed afresh), with the
        adapter randomised for the test (so its layers take part; restored after); and a non-zero count of LoRA
        layers on the language model. Draws no random numbers.
        ``{"ok", "problem", "lora_targets", "max_abs", "mean_abs", "tokens"}``; fp32 must agree to 1e-5 per token
        (positions off by a constant give ~1e-4 on the tiny builds), bf16/fp16 to 0.1 on average (a bound not yet
        measured on a GPU)."""
        lora = [p for n, p in self.model.named_parameters() if "lora_" in n] if self.lora.enabled else []
        report: dict = {"ok": True, "problem": "", "lora_targets": sum(
            1 for m in self.model.modules() if hasattr(m, "lora_A")) if self.lora.enabled else 0}
        if self.lora.enabled and not report["lora_targets"]:
            return {**report, "ok": False, "problem": "LoRA adapts no layer of the language model"}
        images = [Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (40, 120), (30, 30, 200))]
        encs = [self.encode(im, captioner_prompt(q)) for im, q in
                zip(images, ["What is shown?", "What colour is the largest shape in the picture?"])]
        saved = [p.detach().clone() for p in lora]
        g = torch.Generator().manual_seed(0)
        try:
            for p in lora:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
            self.model.eval()
            tokens, mask, lps = self._sample(self.base_model(), encs, [0, 1], 1.0, tokens, greedy=True)
            roll = Rollout(texts=[[""], [""]], tokens=tokens, mask=mask, logprobs=lps, temperature=1.0,
                           context=HFContext(encs, 1, sampler_logprobs=lps))
            with self._policy_mode() as model:   # the per-row pass: prompt + caption in one forward, no cache
                roll.logprobs = self._logprobs(model, roll, 0, 2, shared=False)
        finally:
            for p, s in zip(lora, saved):
                p.copy_(s)
        mm = self.logprob_mismatch(roll)
        report.update(max_abs=mm["max_abs"], mean_abs=mm["mean_abs"], tokens=mm["tokens"])
        half = next(self.base_model().parameters()).dtype in (torch.bfloat16, torch.float16)
        bad = mm["mean_abs"] > 0.1 if half else mm["max_abs"] > 1e-5
        if bad or not bool(torch.isfinite(roll.logprobs).all()):
            report.update(ok=False, problem=f"incremental decode and teacher-forced log-probs disagree "
                                            f"(max {mm['max_abs']:.3g}, mean {mm['mean_abs']:.3g} over "
                                            f"{mm['tokens']} tokens)")
        return report
