"""The embedded world's trainable reasoner: a small text-only transformer that writes the reply protocol.

It reads the same prompts as every reasoner (``acrl.rollout.prompts``): the prompt's sections (question,
description, the clarifications asked and answered) are recovered with :func:`acrl.rollout.prompts.parse_prompt` and
encoded with the world captioner's word vocabulary, extended by section markers, two mode tokens (``<decide>``: it
may ask, ``<solve>``: it must answer) and the reply's own tokens (``SOLVED``, ``NEED MORE INFO``, ``\\boxed{``,
``}``, ``+ * / =``, the option letters and the half numbers ``0.5`` .. ``99.5``). It writes, token by token,

    SOLVED red bar = 7 ; blue bar = 3 ; 7 + 3 = 10 \\boxed{10}      or    NEED MORE INFO
                                                                       what is the height of the red bar ?

which :func:`acrl.rollout.replies.parse_reply` reads like any LLM's reply. The working before the box is what the model
has to do itself: restate each needed fact with the value it found in the description or the clarification,
then the arithmetic, one operation per step (partial sums, ``w + h`` then ``* 2``, ``b * h`` then ``/ 2``).

Architecture (about 0.88M parameters at the defaults): a decoder-only pre-LN transformer over the world
captioner's :class:`acrl.backends.tiny.Attention` projections with rotary positions, a causal token shift at the
input (each position also sees the embeddings of the three tokens before it, so a fact is found by its name in
one attention step), the output head tied to the word embedding. Prompts are left-padded, so every reply starts
in the same column; a KV cache serves sampling. Attention projections are named ``q_proj/k_proj/v_proj/o_proj``
and the MLP ``fc1/fc2`` as in the captioner, so PEFT LoRA can wrap them.

Warm start: :mod:`acrl.train.reasoner_warmstart` (supervision on the world reasoner's transcripts).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from acrl.backends.tiny import BOS, EOS, PAD, SPECIALS, Attention, WordTokenizer, read_config_and_vocab, world_tokenizer
from acrl.config import TinyReasonerConfig
from acrl.rollout.prompts import parse_prompt
from acrl.rollout.protocols import ReplyBatch

MARKERS = ["<question>", "<description>", "<asked>", "<clarification>", "<decide>", "<solve>", "<reply>"]
SOLVED, ASK, BOX_OPEN, BOX_CLOSE = "SOLVED", "NEED MORE INFO", "\\boxed{", "}"
REPLY_WORDS = [SOLVED, ASK, BOX_OPEN, BOX_CLOSE, "+", "-", "*", "/", "=", ";", "A", "B", "C", "D", "E"]
HALVES = [f"{k}.5" for k in range(100)]


def reasoner_vocab(base: list[str]) -> list[str]:
    """The captioner's vocabulary ``base`` extended by the reasoner's markers, reply words and half numbers."""
    have = set(base)
    return list(base) + [w for w in MARKERS + REPLY_WORDS + HALVES if w not in have]


class ReasonerTokenizer:
    """Prompt sections in (lower-cased words, as the captioner's tokenizer), reply tokens in and out."""

    def __init__(self, vocab: list[str]):
        self.words = WordTokenizer(vocab)
        self.vocab = self.words.vocab
        self.index = self.words.index
        missing = [w for w in MARKERS + REPLY_WORDS if w not in self.index]
        if missing:
            raise ValueError(f"reasoner vocabulary lacks {missing}")
        self.marker = {m: self.index[m] for m in MARKERS}
        # what the model never writes: every special but the end token, and the prompt's markers
        self.banned = [i for i in range(len(SPECIALS)) if i != EOS] + list(self.marker.values())

    def __len__(self) -> int:
        return len(self.vocab)

    def encode_prompt(self, prompt: str, max_tokens: int) -> list[int]:
        """``<bos> <decide|solve> <question> q.. <description> c.. [<asked> q.. <clarification> a..]* <reply>``;
        the description is cut first when the whole does not fit in ``max_tokens``."""
        sec = parse_prompt(prompt)
        m = self.marker
        head = [BOS, m["<decide>"] if sec["mode"] == "decide" else m["<solve>"], m["<question>"]]
        head += self.words.encode(sec["question"] or "")
        tail = []
        for q, a in sec["turns"]:
            tail += [m["<asked>"]] + self.words.encode(q) + [m["<clarification>"]] + self.words.encode(a)
        tail += [m["<reply>"]]
        room = max(0, max_tokens - len(head) - len(tail) - 1)
        ids = head + [m["<description>"]] + self.words.encode(sec["caption"] or "")[:room] + tail
        return ids[-max_tokens:] if len(ids) > max_tokens else ids

    def reply_ids(self, words: list[str]) -> list[int]:
        """Ids of reply tokens (case-sensitive reply words, lower-case world words), ending with ``<eos>``."""
        out = []
        for w in words:
            i = self.index.get(w)
            if i is None:
                i = self.index.get(w.lower(), self.words.index.get("<unk>"))
            out.append(i)
        return out + [EOS]

    def render(self, ids) -> str:
        """Reply text of token ids (up to ``<eos>``): words joined by spaces, ``NEED MORE INFO`` on its own line,
        the box written ``\\boxed{-3}``."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i >= len(SPECIALS) and self.vocab[i] not in self.marker:
                words.append(self.vocab[i])
        text = " ".join(words).replace(ASK + " ", ASK + "\n")
        return re.sub(r"\\boxed\{ (.*?) ?\}", lambda mt: BOX_OPEN + mt.group(1).replace(" ", "") + BOX_CLOSE, text)


def world_reasoner_tokenizer() -> ReasonerTokenizer:
    return ReasonerTokenizer(reasoner_vocab(world_tokenizer().vocab))




def _rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` [B, H, T, Dh] at ``positions`` [B, T]."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    ang = positions[:, None, :, None].float() * freq
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class RotaryAttention(Attention):
    """The captioner's attention (projections ``q_proj/k_proj/v_proj/o_proj``) as masked self-attention with
    rotary positions and a KV cache."""

    def forward(self, x, positions, mask, cache=None):
        q, k, v = (self._split(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _rotate(q, positions), _rotate(k, positions)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, h, t, dh = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * dh))


class ReasonerBlock(nn.Module):
    """Pre-LN block: rotary self-attention and the captioner's MLP (``fc1/fc2``)."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), RotaryAttention(d, h)
        self.ln3, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, positions, mask, cache=None):
        x = x + self.attn(self.ln1(x), positions, mask, cache)
        return x + self.fc2(F.gelu(self.fc1(self.ln3(x))))


class TinyLM(nn.Module):
    """Decoder-only transformer over left-padded prompt + reply rows."""

    def __init__(self, cfg: TinyReasonerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.shift = nn.Linear(cfg.shift * d, d, bias=False) if cfg.shift else None
        self.blocks = nn.ModuleList(ReasonerBlock(d, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.apply(self._init)

    def _inputs(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """Token embeddings (padding: zero) plus the token shift over the ``shift`` previous ones."""
        e = self.embed(tokens) * (tokens != PAD)[..., None]
        if self.shift is None:
            return e
        s, (b, t, d) = self.cfg.shift, e.shape
        prev = cache.get("prev") if cache is not None else None
        ext = torch.cat([prev if prev is not None else e.new_zeros(b, s, d), e], 1)
        if cache is not None:
            cache["prev"] = ext[:, -s:]
        window = torch.cat([ext[:, s - k:s - k + t] for k in range(1, s + 1)], -1)
        return e + self.shift(window)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache=None):
        """Logits of every position. ``mask``: boolean [B, 1, Tq, Tk] (True: attend); ``cache``: dict for
        incremental decoding (then ``Tk`` counts the cached keys too)."""
        h = self._inputs(tokens, cache)
        for i, blk in enumerate(self.blocks):
            h = blk(h, positions, mask, cache=None if cache is None else cache.setdefault(i, {}))
        return F.linear(self.ln_f(h), self.embed.weight)


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows], dtype=torch.long)
    return ids, ids != PAD


def _full_mask(valid: torch.Tensor) -> torch.Tensor:
    """Causal and key-padding mask [B, 1, T, T]; every position also sees itself (no all-masked row: padding
    positions stay finite and never reach a real one)."""
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    eye = torch.eye(t, dtype=torch.bool)
    return ((causal & valid[:, None, :]) | eye)[:, None]


class TinyReasoner:
    """``Reasoner`` + :class:`acrl.rollout.protocols.TrainableReasoner` over :class:`TinyLM` (all weights train;
    π_ref of the reasoner is a frozen copy of its starting weights)."""

    def __init__(self, model: TinyLM, tokenizer: ReasonerTokenizer, temperature: float = 0.0,
                 reference: TinyLM | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, model.cfg
        self.temperature = temperature
        self.ref_model = (reference or copy.deepcopy(model)).eval().requires_grad_(False)

    # --- construction / persistence ---------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: TinyReasonerConfig | None = None, seed: int = 0, temperature: float = 0.0) -> TinyReasoner:
        tok = world_reasoner_tokenizer()
        cfg = copy.deepcopy(cfg or TinyReasonerConfig())
        cfg.vocab_size = len(tok)
        torch.manual_seed(seed)
        return cls(TinyLM(cfg), tok, temperature)

    @staticmethod
    def _read(path: str) -> tuple[TinyLM, ReasonerTokenizer]:
        cfg, tok = read_config_and_vocab(path, "reasoner", TinyReasonerConfig, ReasonerTokenizer)
        model = TinyLM(cfg)
        try:
            model.load_state_dict(torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True))
        except Exception as e:   # noqa: BLE001 - torch raises many kinds; all mean the same to the user
            raise ValueError(f"reasoner checkpoint {os.path.join(path, 'model.pt')!r} is corrupt or not a tiny "
                             f"reasoner's weights ({type(e).__name__})") from None
        return model, tok

    @classmethod
    def load(cls, path: str, reference: str | None = None, temperature: float = 0.0) -> TinyReasoner:
        """Load ``model.pt`` + ``config.json`` + ``vocab.json``. ``reference``: the checkpoint of the frozen
        starting copy (the KL anchor) when it is not ``path`` (a resumed run continues from its checkpoint)."""
        model, tok = cls._read(path)
        ref = None
        if reference and os.path.abspath(reference) != os.path.abspath(path):
            ref, ref_tok = cls._read(reference)
            if ref_tok.vocab != tok.vocab:
                raise ValueError(f"reasoner reference {reference!r} has another vocabulary than {path!r}")
        return cls(model, tok, temperature, ref)

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as fh:
            json.dump(asdict(self.cfg), fh, indent=1)
        with open(os.path.join(path, "vocab.json"), "w") as fh:
            json.dump(self.tokenizer.vocab, fh)
        torch.save(self.model.state_dict(), os.path.join(path, "model.pt"))

    @property
    def max_new_tokens(self) -> int:
        return self.cfg.max_new_tokens

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode_prompt(p, self.cfg.max_prompt_tokens) for p in prompts]

    @contextlib.contextmanager
    def _policy_mode(self):
        """Train mode (the model has no dropout: train and eval compute the same function)."""
        self.model.train()
        yield self.model

    # --- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _sample(self, model: TinyLM, prompt_ids: list[list[int]], temperature: float, greedy: bool):
        ids, valid = _left_pad(prompt_ids)
        rows, width = ids.shape
        max_new = self.cfg.max_new_tokens
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        cache: dict = {}
        logits = model(ids, pos, _full_mask(valid), cache=cache)[:, -1].float()
        keys = valid.clone()
        nxt_pos = valid.long().sum(1)
        out = torch.full((rows, max_new), PAD, dtype=torch.long)
        lps = torch.zeros(rows, max_new)
        done = torch.zeros(rows, dtype=torch.bool)
        banned = self.tokenizer.banned
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
            keys = torch.cat([keys, torch.ones(rows, 1, dtype=torch.bool)], 1)
            logits = model(nxt[:, None], (nxt_pos + t)[:, None], keys[:, None, None, :], cache=cache)[:, -1].float()
        return out, (out != PAD).float(), lps

    def sample(self, prompts: list[str], temperature: float = 1.0, greedy: bool = False) -> ReplyBatch:
        """One reply per prompt, sampled at ``temperature`` (or greedy), with per-token log-probs."""
        prompt_ids = self.encode(prompts)
        if not prompts:
            empty = torch.zeros(0, self.cfg.max_new_tokens)
            return ReplyBatch([], [], empty.long(), empty, empty, 1.0, [], PAD)
        with self._policy_mode() as model:
            tokens, mask, lps = self._sample(model, prompt_ids, temperature, greedy)
        texts = [self.tokenizer.render(r) for r in tokens.tolist()]
        return ReplyBatch(list(prompts), texts, tokens, mask, lps, 1.0 if greedy else temperature, prompt_ids, PAD)

    def complete(self, prompts: list[str]) -> list[str]:
        """The ``Reasoner`` protocol: replies at ``self.temperature`` (0: greedy)."""
        t = self.temperature
        return self.sample(prompts, temperature=t or 1.0, greedy=t == 0).texts

    # --- log-probs --------------------------------------------------------------------------------------------
    def _token_logprobs(self, model: TinyLM, prompt_ids: list[list[int]], tokens: torch.Tensor,
                        temperature: float) -> torch.Tensor:
        ids, valid = _left_pad(prompt_ids)
        p = ids.shape[1]
        inp = torch.where(tokens[:, :-1] == PAD, torch.full_like(tokens[:, :-1], EOS), tokens[:, :-1])
        seq = torch.cat([ids, inp], 1)
        keys = torch.cat([valid, torch.ones_like(inp, dtype=torch.bool)], 1)
        n = valid.long().sum(1, keepdim=True)
        pos = torch.cat([(valid.long().cumsum(1) - 1).clamp(min=0), n + torch.arange(inp.shape[1])[None]], 1)
        logits = model(seq, pos, _full_mask(keys))[:, p - 1:].float()
        logits[..., self.tokenizer.banned] = float("-inf")
        logp = torch.log_softmax(logits / temperature, -1)
        safe = torch.where(tokens == PAD, torch.full_like(tokens, EOS), tokens)
        return logp.gather(-1, safe[..., None])[..., 0] * (tokens != PAD)

    def logprobs(self, batch: ReplyBatch, rows: slice | None = None, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs of ``batch.tokens[rows]`` under π_φ (with gradient) or its frozen start (without).
        Only the columns up to the longest reply run; the rest is padding (0)."""
        start, stop, _ = (rows or slice(None)).indices(batch.tokens.shape[0])
        tokens = batch.tokens[start:stop]
        width = tokens.shape[1]
        t = max(1, int((tokens != PAD).sum(1).max())) if tokens.numel() else 1
        args = (batch.prompt_ids[start:stop], tokens[:, :t], batch.temperature)
        if reference:
            with torch.no_grad():
                return F.pad(self._token_logprobs(self.ref_model, *args), (0, width - t))
        with self._policy_mode() as model:
            return F.pad(self._token_logprobs(model, *args), (0, width - t))

    def supervised_loss(self, prompt_ids: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
        """Mean token cross-entropy of the reply ``targets`` (ids ending with ``<eos>``; warm start)."""
        width = max(len(t) for t in targets)
        tokens = torch.tensor([t + [PAD] * (width - len(t)) for t in targets], dtype=torch.long)
        with self._policy_mode() as model:
            lp = self._token_logprobs(model, prompt_ids, tokens, 1.0)
        return -lp.sum() / (tokens != PAD).sum()
