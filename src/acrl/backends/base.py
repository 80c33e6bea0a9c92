"""The trainable-captioner protocol the trainer talks to, and the rollout it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image


@dataclass
class Rollout:
    """Sampled captions with what the update needs.

    ``texts[g][i]`` is sample ``i`` of problem ``g``; tensors are flat over ``g * n + i`` rows:
    ``tokens`` (caption token ids incl. the end token, right-padded), ``mask`` (1 on caption tokens),
    ``logprobs`` (per-token log-probs under the sampling policy at ``temperature``: the "old" log-probs).
    ``context`` is backend-specific state for recomputing log-probs (encoded prompts, pixel values, ...).
    """

    texts: list[list[str]]
    tokens: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    temperature: float
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
