"""The protocols every backend implements (policy, reasoner, clarifier, trainable reasoner) and the sampled rows
they return: one :class:`Samples` record of tensors, which captions (:class:`Rollout`) and reasoner replies
(:class:`ReplyBatch`) extend with what their log-prob recomputation needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class Samples:
    """Sampled token rows with what an update needs: ``tokens`` (ids incl. the end token, right-padded), ``mask``
    (1 on sampled tokens), ``logprobs`` (per token under the sampling policy at ``temperature``: the "old"
    log-probs; greedy rows are scored at temperature 1)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    temperature: float


@dataclass
class Rollout(Samples):
    """Sampled captions. ``texts[g][i]`` is sample ``i`` of problem ``g``; the rows are flat over ``g * n + i``.
    ``context`` is backend-specific state for recomputing log-probs (encoded prompts, pixel values, ...)."""

    texts: list[list[str]] = field(default_factory=list)
    context: Any = None

    @property
    def n(self) -> int:
        return len(self.texts[0]) if self.texts else 0


class Policy(Protocol):
    """A trainable captioner π_θ with its frozen reference π_ref (a copy, or the same model with LoRA disabled)."""

    def generate(self, images: list[Image.Image], prompts: list[str], n: int, temperature: float = 1.0,
                 max_new_tokens: int = 48, greedy: bool = False) -> Rollout:
        """Sample ``n`` captions per (image, question) with per-token log-probs (no gradient)."""
        ...

    def logprobs(self, rollout: Rollout, rows: slice | None = None, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs of ``rollout.tokens[rows]`` under π_θ (with gradient) or π_ref (without)."""
        ...

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        """π_ref answers clarification questions from the image (greedy). This is the training-time clarifier."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def save(self, path: str) -> None: ...

    def before_update(self) -> None:
        """Called before each optimisation step (a vLLM rollout engine sleeps to free memory)."""

    def after_update(self) -> None:
        """Called after each optimisation step (a vLLM rollout engine receives the new adapter)."""

    def set_sampling_seed(self, seed: int) -> None:
        """Seed the next ``generate`` (engines with their own random streams: vLLM)."""


class PolicyHooks:
    """No-op defaults of :class:`Policy`'s hooks, for policies that need none (inherit it)."""

    def before_update(self) -> None:
        return None

    def after_update(self) -> None:
        return None

    def set_sampling_seed(self, seed: int) -> None:
        return None



class Reasoner(Protocol):
    """A frozen text-only reasoner: a batch of prompts in, one reply per prompt out.

    A reply that could not be obtained (service error after retries) is returned as an ``Exception`` instance in
    its slot; the episode is then marked ``failed``.
    """

    def complete(self, prompts: list[str]) -> list[str | Exception]: ...


class Clarifier(Protocol):
    """The frozen reference captioner π_ref answering clarification questions from the image."""

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str | Exception]: ...


@dataclass
class ReplyBatch(Samples):
    """Sampled reasoner replies, one row per prompt; the rows are padded with ``pad_id`` to a constant width (the
    generation cap). ``prompt_ids`` are the encoded prompts (the backend's own ids, unpadded), from which
    ``logprobs()`` recomputes."""

    prompts: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, rows: list[int]) -> ReplyBatch:
        """The batch of rows ``rows`` (in that order)."""
        idx = torch.tensor(rows, dtype=torch.long)
        return ReplyBatch(self.tokens[idx], self.mask[idx], self.logprobs[idx], self.temperature,
                          prompts=[self.prompts[i] for i in rows], texts=[self.texts[i] for i in rows],
                          prompt_ids=[self.prompt_ids[i] for i in rows], pad_id=self.pad_id)


def concat(batches: list[ReplyBatch]) -> ReplyBatch:
    """One batch of the rows of ``batches``, in order (widths padded to the widest)."""
    if not batches:
        raise ValueError("concat needs at least one reply batch")
    if len({b.temperature for b in batches}) > 1 or len({b.pad_id for b in batches}) > 1:
        raise ValueError("reply batches sampled at different temperatures (or pad ids) cannot be concatenated")
    width = max(b.tokens.shape[1] for b in batches)

    def pad(t, value):
        return F.pad(t, (0, width - t.shape[1]), value=value)

    b0 = batches[0]
    return ReplyBatch(torch.cat([pad(b.tokens, b.pad_id) for b in batches]),
                      torch.cat([pad(b.mask, 0.0) for b in batches]),
                      torch.cat([pad(b.logprobs, 0.0) for b in batches]), b0.temperature,
                      prompts=[p for b in batches for p in b.prompts], texts=[t for b in batches for t in b.texts],
                      prompt_ids=[p for b in batches for p in b.prompt_ids], pad_id=b0.pad_id)


class TrainableReasoner(Protocol):
    """A reasoner policy π_φ with its frozen starting copy (see the module docstring)."""

    temperature: float   # how ``complete`` samples (0: greedy)
    max_new_tokens: int  # the reply cap: every ReplyBatch is padded to it

    def complete(self, prompts: list[str]) -> list[str]: ...

    def sample(self, prompts: list[str], temperature: float = 1.0, greedy: bool = False) -> ReplyBatch: ...

    def logprobs(self, batch: ReplyBatch, rows: slice | None = None, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs of ``batch.tokens[rows]`` (width of ``batch.tokens``, 0 on padding)."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def save(self, path: str) -> None: ...
