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

Architecture (about 0.88M parameters at the defaults): a decoder-only pre-LN transformer of the captioner's blocks
(:class:`acrl.backends.tiny.nn.Block`) with rotary positions, a causal token shift at the input (each position
also sees the embeddings of the three tokens before it, so a fact is found by its name in one attention step), the
output head tied to the word embedding. Prompts are left-padded, so every reply starts in the same column; a KV
cache serves sampling.

Warm start: :mod:`acrl.train.reasoner_warmstart` (supervision on the world reasoner's transcripts).
"""

from __future__ import annotations

import copy
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from acrl.backends.tiny.captioner import WordTokenizer, world_tokenizer
from acrl.backends.tiny.nn import (
    BOS,
    EOS,
    PAD,
    SPECIALS,
    Block,
    causal_mask,
    init_weights,
    left_pad,
    mean_nll,
    model_of,
    over_longest,
    read_checkpoint,
    right_pad,
    sample,
    teacher_forced,
    write_checkpoint,
)
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


class TinyLM(nn.Module):
    """Decoder-only transformer over left-padded prompt + reply rows."""

    def __init__(self, cfg: TinyReasonerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.shift = nn.Linear(cfg.shift * d, d, bias=False) if cfg.shift else None
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.apply(init_weights)

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

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache=None):
        """Logits of every position. ``mask``: boolean [B, 1, Tq, Tk] (True: attend); ``cache``: dict for
        incremental decoding (then ``Tk`` counts the cached keys too)."""
        h = self._inputs(tokens, cache)
        for i, blk in enumerate(self.blocks):
            h = blk(h, mask=mask, positions=positions, cache=None if cache is None else cache.setdefault(i, {}))
        return F.linear(self.ln_f(h), self.embed.weight)

    def stepper(self, valid: torch.Tensor):
        """``step(tokens) -> logits`` for :func:`acrl.backends.tiny.nn.sample`: first the left-padded prompt rows
        (``valid``: where they are real tokens), then one token per row at a time."""
        cache: dict = {}
        keys, nxt = valid, valid.long().sum(1)

        def step(tokens: torch.Tensor) -> torch.Tensor:
            nonlocal keys, nxt
            if not cache:
                return self(tokens, (valid.long().cumsum(1) - 1).clamp(min=0), causal_mask(valid), cache)
            keys = torch.cat([keys, torch.ones(keys.shape[0], 1, dtype=torch.bool)], 1)
            logits = self(tokens, nxt[:, None], keys[:, None, None, :], cache)
            nxt = nxt + 1
            return logits
        return step


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

    @classmethod
    def load(cls, path: str, reference: str | None = None, temperature: float = 0.0) -> TinyReasoner:
        """Load ``model.pt`` + ``config.json`` + ``vocab.json``. ``reference``: the checkpoint of the frozen
        starting copy (the KL anchor) when it is not ``path`` (a resumed run continues from its checkpoint)."""
        model, tok = read_checkpoint(path, "reasoner", TinyReasonerConfig, ReasonerTokenizer, TinyLM)
        ref = None
        if reference and os.path.abspath(reference) != os.path.abspath(path):
            ref, ref_tok = read_checkpoint(reference, "reasoner", TinyReasonerConfig, ReasonerTokenizer, TinyLM)
            if ref_tok.vocab != tok.vocab:
                raise ValueError(f"reasoner reference {reference!r} has another vocabulary than {path!r}")
        return cls(model, tok, temperature, ref)

    def save(self, path: str) -> None:
        write_checkpoint(path, self.cfg, self.tokenizer.vocab, self.model.state_dict())

    @property
    def max_new_tokens(self) -> int:
        return self.cfg.max_new_tokens

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode_prompt(p, self.cfg.max_prompt_tokens) for p in prompts]

    # --- sampling ---------------------------------------------------------------------------------------------
    def sample(self, prompts: list[str], temperature: float = 1.0, greedy: bool = False) -> ReplyBatch:
        """One reply per prompt, sampled at ``temperature`` (or greedy), with per-token log-probs. The model runs
        in train mode (it has no dropout: train and eval compute the same function)."""
        prompt_ids = self.encode(prompts)
        if not prompts:
            empty = torch.zeros(0, self.cfg.max_new_tokens)
            return ReplyBatch(empty.long(), empty, empty, 1.0, pad_id=PAD)
        self.model.train()
        ids, valid = left_pad(prompt_ids)
        tokens, mask, lps = sample(self.model.stepper(valid), ids, self.cfg.max_new_tokens, self.tokenizer.banned,
                                   temperature, greedy)
        texts = [self.tokenizer.render(r) for r in tokens.tolist()]
        return ReplyBatch(tokens, mask, lps, 1.0 if greedy else temperature, prompts=list(prompts), texts=texts,
                          prompt_ids=prompt_ids, pad_id=PAD)

    def complete(self, prompts: list[str]) -> list[str]:
        """The ``Reasoner`` protocol: replies at ``self.temperature`` (0: greedy)."""
        t = self.temperature
        return self.sample(prompts, temperature=t or 1.0, greedy=t == 0).texts

    # --- log-probs --------------------------------------------------------------------------------------------
    def _token_logprobs(self, model: TinyLM, prompt_ids: list[list[int]], tokens: torch.Tensor,
                        temperature: float) -> torch.Tensor:
        ids, valid = left_pad(prompt_ids)
        p, n = ids.shape[1], valid.long().sum(1, keepdim=True)

        def forward(inputs: torch.Tensor) -> torch.Tensor:
            keys = torch.cat([valid, torch.ones_like(inputs, dtype=torch.bool)], 1)
            pos = torch.cat([(valid.long().cumsum(1) - 1).clamp(min=0), n + torch.arange(inputs.shape[1])[None]], 1)
            return model(torch.cat([ids, inputs], 1), pos, causal_mask(keys))[:, p - 1:]
        return teacher_forced(forward, tokens, self.tokenizer.banned, temperature)

    def logprobs(self, batch: ReplyBatch, rows: slice | None = None, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs of ``batch.tokens[rows]`` under π_φ (with gradient) or its frozen start (without).
        Only the columns up to the longest reply run; the rest is padding (0)."""
        start, stop, _ = (rows or slice(None)).indices(batch.tokens.shape[0])
        with model_of(self.model, self.ref_model, reference) as model:
            return over_longest(lambda tokens: self._token_logprobs(
                model, batch.prompt_ids[start:stop], tokens, batch.temperature), batch.tokens[start:stop])

    def supervised_loss(self, prompt_ids: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
        """Mean token cross-entropy of the reply ``targets`` (ids ending with ``<eos>``; warm start)."""
        tokens = right_pad(targets)
        self.model.train()
        return mean_nll(self._token_logprobs(self.model, prompt_ids, tokens, 1.0), tokens)
