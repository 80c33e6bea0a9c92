"""What the two tiny models share: the special tokens, the transformer pieces, one sampler, one teacher-forced
log-prob function, padding and masks, and the checkpoint format.

The sampler and the log-prob function see a model only through a closure, so one of each serves both models:

- ``step(tokens) -> logits``: feeds ``tokens`` [rows, k] after what it was fed before (it keeps its KV cache and
  positions) and returns the logits of every fed position (the sampler uses the last);
- ``forward(inputs) -> logits``: the teacher-forced pass; ``inputs`` are the replies shifted right by one (their
  padding read as ``<eos>``), the logits at column ``j`` predict token ``j``.

Attention projections are plain ``nn.Linear`` named ``q_proj/k_proj/v_proj/o_proj`` and the MLP ``fc1/fc2``, so
PEFT LoRA wraps them as in the Hugging Face models.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

# The head of every tiny vocabulary (the reasoner's extends the captioner's); CAPTION / ANSWER select the
# captioner's job.
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<caption>", "<answer>"]
PAD, BOS, EOS, UNK, CAPTION, ANSWER = range(6)


# --- transformer pieces -----------------------------------------------------------------------------------------
def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` [B, H, T, Dh] at ``positions`` [B, T]."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    ang = positions[:, None, :, None].float() * freq
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Attention(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def _split(self, x):
        b, t, d = x.shape
        return x.view(b, t, self.h, d // self.h).transpose(1, 2)

    def forward(self, x, kv=None, causal=False, cache=None, mask=None, positions=None):
        """``kv``: the memory for cross-attention (None: self-attention). ``mask``: boolean, True attends.
        ``positions``: rotary positions of self-attention (None: none). ``cache``: dict for incremental decoding."""
        q = self._split(self.q_proj(x))
        if kv is None:
            k, v = self._split(self.k_proj(x)), self._split(self.v_proj(x))
            if positions is not None:
                q, k = rotate(q, positions), rotate(k, positions)
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                cache["k"], cache["v"] = k, v
        elif cache is not None and "mk" in cache:
            k, v = cache["mk"], cache["mv"]
        else:
            k, v = self._split(self.k_proj(kv)), self._split(self.v_proj(kv))
            if cache is not None:
                cache["mk"], cache["mv"] = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and q.shape[2] > 1)
        b, h, t, dh = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * dh))


def _sub(cache, key):
    return None if cache is None else cache.setdefault(key, {})


class Block(nn.Module):
    """Pre-LN block: self-attention (causal, or under ``mask``; rotary at ``positions``), cross-attention to a
    ``memory`` when ``cross``, and the MLP."""

    def __init__(self, d: int, h: int, cross: bool = False):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, h)
        self.cross = cross
        if cross:
            self.ln2, self.xattn = nn.LayerNorm(d), Attention(d, h)
        self.ln3, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, memory=None, memory_mask=None, causal=False, cache=None, mask=None, positions=None):
        x = x + self.attn(self.ln1(x), causal=causal, mask=mask, positions=positions, cache=_sub(cache, "self"))
        if self.cross:
            x = x + self.xattn(self.ln2(x), kv=memory, mask=memory_mask, cache=_sub(cache, "cross"))
        return x + self.fc2(F.gelu(self.fc1(self.ln3(x))))


def init_weights(m: nn.Module) -> None:
    """Normal(0, 0.02) weights of linear layers and embeddings, zero biases (``model.apply(init_weights)``)."""
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


# --- padding and masks ------------------------------------------------------------------------------------------
def right_pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows], dtype=torch.long)


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and where they are real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows], dtype=torch.long)
    return ids, ids != PAD


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """Causal and key-padding mask [B, 1, T, T]; every position also sees itself (no all-masked row: padding
    positions stay finite and never reach a real one)."""
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    eye = torch.eye(t, dtype=torch.bool)
    return ((causal & valid[:, None, :]) | eye)[:, None]


# --- sampling and log-probs -------------------------------------------------------------------------------------
@torch.no_grad()
def sample(step, start: torch.Tensor, max_new: int, banned: list[int], temperature: float = 1.0,
           greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replies to ``start`` [rows, k] (fed first), token by token until every row wrote ``<eos>`` or ``max_new``
    tokens: ``(tokens, mask, logprobs)``, each [rows, max_new]; after its ``<eos>`` a row holds padding
    (log-prob 0). The ``banned`` tokens are never written; ``greedy``'s log-probs are at temperature 1."""
    logits = step(start)[:, -1].float()
    rows = start.shape[0]
    out = torch.full((rows, max_new), PAD, dtype=torch.long)
    lps = torch.zeros(rows, max_new)
    done = torch.zeros(rows, dtype=torch.bool)
    for t in range(max_new):
        logits[:, banned] = float("-inf")
        if greedy:
            nxt = logits.argmax(-1)
            lp = torch.log_softmax(logits, -1).gather(1, nxt[:, None])[:, 0]
        else:
            logp = torch.log_softmax(logits / temperature, -1)
            nxt = torch.multinomial(logp.exp(), 1)[:, 0]
            lp = logp.gather(1, nxt[:, None])[:, 0]
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        out[:, t] = nxt
        lps[:, t] = torch.where(done, torch.zeros_like(lp), lp)
        done |= nxt == EOS
        if done.all() or t + 1 == max_new:
            break
        logits = step(nxt[:, None])[:, -1].float()
    return out, (out != PAD).float(), lps


def teacher_forced(forward, tokens: torch.Tensor, banned: list[int], temperature: float) -> torch.Tensor:
    """Per-token log-probs of the reply rows ``tokens`` (right-padded, 0 at padding) as :func:`sample` computes
    them: ``forward`` reads the rows shifted right by one, padding read as ``<eos>``."""
    inputs = tokens[:, :-1]
    logits = forward(torch.where(inputs == PAD, torch.full_like(inputs, EOS), inputs)).float()
    logits[..., banned] = float("-inf")
    logp = torch.log_softmax(logits / temperature, -1)
    safe = torch.where(tokens == PAD, torch.full_like(tokens, EOS), tokens)
    return logp.gather(-1, safe[..., None])[..., 0] * (tokens != PAD)


def over_longest(fn, tokens: torch.Tensor) -> torch.Tensor:
    """``fn(tokens)`` over the columns up to the longest row only, padded back to the full width with zeros."""
    t = max(1, int((tokens != PAD).sum(1).max())) if tokens.numel() else 1
    return F.pad(fn(tokens[:, :t]), (0, tokens.shape[1] - t))


def mean_nll(logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of the right-padded ``tokens`` given their log-probs (supervised warm starts)."""
    return -logprobs.sum() / (tokens != PAD).sum()


@contextlib.contextmanager
def model_of(policy: nn.Module, reference: nn.Module | None, use_reference: bool):
    """The model a pass runs: π_ref without gradient (``reference``, or ``policy`` with its PEFT adapter disabled
    when None), or π with gradient, in train mode with dropout off (the update computes the function the replies
    were sampled from)."""
    if use_reference:
        with torch.no_grad():
            if reference is not None:
                yield reference
            else:
                with policy.disable_adapter():
                    yield policy
        return
    policy.train()
    for m in policy.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    yield policy


# --- checkpoints ------------------------------------------------------------------------------------------------
def write_checkpoint(path: str, cfg, vocab: list[str], state: dict) -> None:
    """``config.json`` (the model's config dataclass), ``vocab.json`` and ``model.pt`` (``state``)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(asdict(cfg), fh, indent=1)
    with open(os.path.join(path, "vocab.json"), "w") as fh:
        json.dump(vocab, fh)
    torch.save(state, os.path.join(path, "model.pt"))


def read_checkpoint(path: str, what: str, config_cls, tokenizer_cls, model_cls):
    """``(model, tokenizer)`` of a checkpoint :func:`write_checkpoint` wrote, with one-line errors naming the
    checkpoint (``what``: captioner, reasoner)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} checkpoint directory {path!r} not found")
    for f in ("config.json", "vocab.json", "model.pt"):
        if not os.path.exists(os.path.join(path, f)):
            raise FileNotFoundError(f"{what} checkpoint {path!r} has no {f}")
    try:
        with open(os.path.join(path, "config.json")) as fh:
            cfg = config_cls(**json.load(fh))
        with open(os.path.join(path, "vocab.json")) as fh:
            tok = tokenizer_cls(json.load(fh))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} checkpoint {path!r}: config.json or vocab.json is corrupt ({e})") from None
    model = model_cls(cfg)
    weights = os.path.join(path, "model.pt")
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as e:   # noqa: BLE001 - torch raises many kinds (its unpickling errors advise weights_only=False)
        raise ValueError(f"{what} checkpoint {weights!r} is corrupt or not a tiny {what}'s weights "
                         f"({type(e).__name__})") from None
    return model, tok
