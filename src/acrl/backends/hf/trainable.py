"""A Hugging Face causal LM reasoner with its own LoRA adapter: the real-scale trainable reasoner of co-training.

It is :class:`acrl.backends.hf.reasoner.HFReasoner` (the in-process path of ``reasoner.backend=hf``: the same chat
template, the same ``think`` handling) with a PEFT LoRA adapter on the attention projections, and the learning
interface of :mod:`acrl.rollout.protocols`:

- ``sample``: ``generate`` with every sampling option neutral except the temperature (no top-k / top-p, the
  checkpoint's ``generation_config.json`` hidden), cut at the first end token; the "old" log-probs are then
  computed by the same teacher-forced pass the update uses (one log-prob path), without gradient;
- ``logprobs``: that pass (left-padded prompt + reply, position ids from the attention mask, the adapter on);
  ``reference=True``: the same with the adapter disabled (the frozen start, the KL anchor). Memory: ``batch_size``
  rows per forward, logits of the reply positions only (``logits_to_keep``), reduced one row at a time, and with
  ``gradient_checkpointing`` the gradient pass recomputes activations (prompts of ~10k tokens);
- ``save``: the adapter (``adapter/``, standard PEFT files) and ``trainable_reasoner.json`` naming the base model;
  :meth:`HFTrainableReasoner.load` continues from such a directory.

So a real run can train, e.g., a 7B reasoner's adapter next to the captioner's (``acrl train --cotrain`` with
``reasoner.backend=hf``); ``acrl eval --set reasoner.backend=hf --set reasoner.model=RUN/checkpoint/reasoner``
evaluates the co-trained reasoner (greedy).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict

import torch
import torch.nn.functional as F

from acrl.backends.hf.loading import enable_checkpointing, on_device
from acrl.backends.hf.logprobs import row_chunks, token_logprobs
from acrl.backends.hf.reasoner import HFReasoner
from acrl.config import LoraSettings
from acrl.rollout.protocols import ReplyBatch

META = "trainable_reasoner.json"


def is_trainable_checkpoint(path: str) -> bool:
    """Whether ``path`` is a directory written by :meth:`HFTrainableReasoner.save`."""
    return os.path.isfile(os.path.join(path, META))


@contextlib.contextmanager
def _plain_generation_config(model):
    """Hide the checkpoint's ``generation_config.json`` (e.g. Qwen2.5-VL-Instruct's top_k=1, top_p=0.001,
    repetition_penalty=1.05) during ``generate``: HF fills every unset option from it, which would warp the
    logits before the recorder and bias the sampling policy away from softmax(logits / T)."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig(
        eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id, bos_token_id=saved.bos_token_id)
    try:
        yield
    finally:
        model.generation_config = saved


class HFTrainableReasoner(HFReasoner):
    """``Reasoner`` + ``TrainableReasoner`` over a causal LM with a LoRA adapter (see the module docstring)."""

    def __init__(self, model_path: str, lora: LoraSettings | None = None, adapter: str | None = None,
                 gradient_checkpointing: bool = False, **kw):
        super().__init__(model_path, **kw)
        from peft import LoraConfig, PeftModel, get_peft_model

        self.base_path = os.path.abspath(model_path) if os.path.isdir(model_path) else model_path
        if adapter:
            self.model = PeftModel.from_pretrained(self.model, adapter, is_trainable=True)
            c = self.model.peft_config[self.model.active_adapter]
            targets = c.target_modules if isinstance(c.target_modules, str) else "|".join(sorted(c.target_modules))
            self.lora = LoraSettings(enabled=True, r=int(c.r), alpha=int(c.lora_alpha),
                                     dropout=float(c.lora_dropout or 0.0), targets=targets)
        else:
            self.lora = lora or LoraSettings(enabled=True, targets=r".*\.(q_proj|k_proj|v_proj|o_proj)$")
            if not self.lora.enabled:
                raise ValueError("the hf trainable reasoner trains a LoRA adapter: lora.enabled must be true")
            if self.lora.dropout > 0:
                raise ValueError(f"reasoner LoRA dropout {self.lora.dropout}: dropout makes the update's log-probs "
                                 f"differ from the sampling policy's; use 0")
            self.model = get_peft_model(self.model, LoraConfig(r=self.lora.r, lora_alpha=self.lora.alpha,
                                                               lora_dropout=0.0, target_modules=self.lora.targets))
        self.model.to(self.device).eval()   # no dropout anywhere: sampling and update compute one function
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            enable_checkpointing(self.model.get_base_model())
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id
        self.eos_ids = sorted({i for i in (tok.eos_token_id, getattr(self.model.generation_config, "eos_token_id",
                                                                       None)) if isinstance(i, int)})

    @classmethod
    def load(cls, path: str, **kw) -> HFTrainableReasoner:
        """Continue from a directory written by :meth:`save` (its base model plus its adapter)."""
        try:
            with open(os.path.join(path, META)) as fh:
                meta = json.load(fh)
            base = meta["base"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"reasoner checkpoint {path!r}: {META} is missing or corrupt ({e})") from None
        return cls(base, adapter=os.path.join(path, "adapter"), **kw)

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(os.path.join(path, "adapter"))
        with open(os.path.join(path, META), "w") as fh:
            json.dump({"base": self.base_path, "lora": asdict(self.lora)}, fh, indent=1)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def encode(self, prompts: list[str]) -> list[list[int]]:
        tok = self.tokenizer
        templated = bool(getattr(tok, "chat_template", None))
        return [tok(self.render([{"role": "user", "content": p}]), add_special_tokens=not templated)["input_ids"]
                for p in prompts]

    # --- sampling ---------------------------------------------------------------------------------------------
    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
        attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return ids.to(self.device), attn.to(self.device)

    def _cut(self, gen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens up to and including the first end token, the rest padding; and their mask."""
        is_eos = torch.isin(gen, torch.tensor(self.eos_ids, device=gen.device))
        keep = (is_eos.long().cumsum(1) - is_eos.long()) == 0
        return torch.where(keep, gen, torch.full_like(gen, self.pad_id)), keep.float()

    @on_device
    @torch.no_grad()
    def sample(self, prompts: list[str], temperature: float = 1.0, greedy: bool = False) -> ReplyBatch:
        from transformers import GenerationConfig

        max_new = self.max_new_tokens
        prompt_ids = self.encode(prompts)
        tokens = torch.full((len(prompts), max_new), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), max_new)
        gcfg = GenerationConfig(do_sample=not greedy, max_new_tokens=max_new, eos_token_id=self.eos_ids,
                                pad_token_id=self.pad_id, temperature=1.0 if greedy else temperature, top_k=0,
                                top_p=1.0, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                                use_cache=True)
        for s in range(0, len(prompts), self.batch_size):
            ids, attn = self._left_pad(prompt_ids[s:s + self.batch_size])
            with _plain_generation_config(self.model.get_base_model()):
                gen = self.model.generate(input_ids=ids, attention_mask=attn, generation_config=gcfg)
            gen, keep = self._cut(gen[:, ids.shape[1]:].cpu())
            tokens[s:s + len(gen), :gen.shape[1]], mask[s:s + len(gen), :gen.shape[1]] = gen, keep
        temp = 1.0 if greedy else temperature
        batch = ReplyBatch(tokens, mask, torch.zeros_like(mask), temp, prompts=list(prompts),
                           prompt_ids=prompt_ids, pad_id=self.pad_id)
        batch.logprobs = torch.cat([self._logprobs(self.model, batch, i, min(i + self.batch_size, len(prompts)))
                                    for i in range(0, len(prompts), self.batch_size)]) if prompts else mask
        tok = self.tokenizer
        batch.texts = [self._post(tok.decode(r[m.bool()], skip_special_tokens=True)) for r, m in zip(tokens, mask)]
        return batch

    def complete(self, prompts: list[str]) -> list[str]:
        """The ``Reasoner`` protocol: replies at ``self.temperature`` (0: greedy)."""
        if not prompts:
            return []
        t = self.temperature
        return self.sample(prompts, temperature=t or 1.0, greedy=t == 0).texts

    # --- log-probs --------------------------------------------------------------------------------------------
    def _logprobs(self, model, batch: ReplyBatch, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` in chunks of ``batch_size`` (aligned as :func:`acrl.backends.hf.logprobs.row_chunks`);
        each forward keeps the logits of its reply positions only."""
        parts = [self._chunk_logprobs(model, batch, a, b) for a, b in row_chunks(start, stop, self.batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, batch.tokens.shape[1])

    def _chunk_logprobs(self, model, batch: ReplyBatch, start: int, stop: int) -> torch.Tensor:
        tokens = batch.tokens[start:stop]
        width = tokens.shape[1]
        t = max(1, int(batch.mask[start:stop].sum(1).max())) if tokens.numel() else 1
        tokens = tokens[:, :t].to(self.device)
        ids, attn = self._left_pad(batch.prompt_ids[start:stop])
        seq = torch.cat([ids, tokens[:, :-1]], 1)
        full = torch.cat([attn, torch.ones_like(tokens[:, :-1])], 1)
        pos = (full.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=seq, attention_mask=full, position_ids=pos, logits_to_keep=t).logits
        lp = token_logprobs(logits, tokens, batch.temperature) * batch.mask[start:stop, :t].to(logits.device)
        return F.pad(lp, (0, width - t)).cpu()   # next to the batch's old log-probs (differentiable)

    @contextlib.contextmanager
    def _gradient_mode(self):
        """Train mode (where checkpointing acts) with every dropout layer off, for the gradient pass; eval after."""
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            yield
            return
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        try:
            yield
        finally:
            self.model.eval()

    @contextlib.contextmanager
    def _reference(self):
        with self.model.disable_adapter():
            yield self.model

    @on_device
    def logprobs(self, batch: ReplyBatch, rows: slice | None = None, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs of ``batch.tokens[rows]``: with the adapter (gradient) or without it (the frozen
        start, no gradient)."""
        start, stop, _ = (rows or slice(None)).indices(batch.tokens.shape[0])
        if reference:
            with torch.no_grad(), self._reference() as ref:
                return self._logprobs(ref, batch, start, stop)
        with self._gradient_mode():
            return self._logprobs(self.model, batch, start, stop)
