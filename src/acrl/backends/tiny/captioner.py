"""The embedded world's captioner: a small PyTorch vision-language model built from a config (no downloads).

Architecture (about 1M parameters at the defaults): a strided CNN turns the 64x64 image into 8x8 = 64 tokens, one
transformer encoder layer mixes them (2-D sin-cos positions); the prompt's tokens are embedded, **LayerNorm-ed** and
appended to the cross-attention memory (without that norm the model ignores its prompt); a pre-LN transformer
decoder with a KV cache writes the text; the output head is tied to the word embedding.

The model does two jobs, selected by a mode token before the prompt: ``<caption>`` + the problem's question (the
policy's caption c0) and ``<answer>`` + a clarification question (the reference's answer c1). With PEFT LoRA the
reference is the model with its adapter disabled.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from acrl.backends.tiny.nn import (
    ANSWER,
    BOS,
    CAPTION,
    EOS,
    PAD,
    SPECIALS,
    UNK,
    Block,
    init_weights,
    mean_nll,
    model_of,
    over_longest,
    read_checkpoint,
    right_pad,
    sample,
    teacher_forced,
    write_checkpoint,
)
from acrl.config import LoraSettings, TinyVLMConfig
from acrl.rollout.protocols import PolicyHooks, Rollout
from acrl.world import language

_BANNED = [i for i in range(len(SPECIALS)) if i != EOS]   # specials a model never writes (EOS it may)
_TOKEN = re.compile(r"\([a-z]\)|\d+\.\d+|\d+|[a-z]+|[^\sa-z\d]")


class WordTokenizer:
    """Lower-cased word-level tokenizer (numbers 0-99 are single tokens); unknown words map to ``<unk>``."""

    def __init__(self, vocab: list[str]):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts) -> WordTokenizer:
        words = {w for t in texts for w in _TOKEN.findall(t.lower())}
        words |= {str(i) for i in range(100)}
        return cls(SPECIALS + sorted(words - set(SPECIALS)))

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, UNK) for w in _TOKEN.findall(text.lower())]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i >= len(SPECIALS):
                out.append(self.vocab[i])
        return " ".join(out)


def world_tokenizer() -> WordTokenizer:
    """The tokenizer of the embedded world: every word its questions, captions and answers use."""
    texts = [t.text for t in language.TEMPLATES]
    colours = ["red", "green", "blue", "purple", "orange"]
    for c in colours:
        texts += [t.text.replace("{c1}", c).replace("{c2}", c).replace("{c3}", c).replace("{c4}", c)
                  for t in language.TEMPLATES]
        texts += [language.BASE_PHRASES[f].format(n=w, colour=c, article="an a") for f in language.BASE_PHRASES
                  for w in language.NUMBER_WORDS.values()]
    for sent, q, _, _ in language.FACT_KINDS.values():
        for s in colours + ["wide", "tall", "base", "height"]:
            texts += [sent.format(s=s, v=1), q.format(s=s)]
    texts += ["the bars are of similar height", "there are more red shapes", "the colours are balanced",
              "most shapes are circles squares", "it is a square wider than it is tall taller than wide",
              "the right angle is at the origin the base is longer than the height the two legs are equal",
              "shortest tallest", "choices (a) (b) (c) (d) (e) : ; ? . , - i cannot tell"]
    return WordTokenizer.build(texts)


def _sincos_2d(n: int, d: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    omega = 1.0 / (10000 ** (torch.arange(d // 4, dtype=torch.float32) / (d // 4)))
    parts = [torch.sin(x.flatten()[:, None] * omega), torch.cos(x.flatten()[:, None] * omega),
             torch.sin(y.flatten()[:, None] * omega), torch.cos(y.flatten()[:, None] * omega)]
    return torch.cat(parts, 1)


class TinyVLM(nn.Module):
    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.cfg = cfg
        d, w = cfg.d_model, cfg.cnn_width
        self.cnn = nn.Sequential(
            nn.Conv2d(3, w, 3, 2, 1), nn.GELU(), nn.Conv2d(w, 2 * w, 3, 2, 1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.GELU(), nn.Conv2d(2 * w, d, 3, 2, 1))
        grid = cfg.image_size // 8
        self.register_buffer("img_pos", _sincos_2d(grid, d), persistent=False)
        self.encoder = nn.ModuleList(Block(d, cfg.n_heads, cross=False) for _ in range(cfg.enc_layers))
        self.ln_img = nn.LayerNorm(d)
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.prompt_pos = nn.Embedding(cfg.max_prompt_tokens, d)
        self.ln_prompt = nn.LayerNorm(d)
        self.text_pos = nn.Embedding(cfg.max_new_tokens + 1, d)
        self.decoder = nn.ModuleList(Block(d, cfg.n_heads, cross=True) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.apply(init_weights)

    def encode(self, pixels: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory for cross-attention: image tokens + normalised prompt tokens; and its key-padding mask."""
        x = self.cnn(pixels).flatten(2).transpose(1, 2) + self.img_pos
        for blk in self.encoder:
            x = blk(x)
        x = self.ln_img(x)
        pos = torch.arange(prompt.shape[1], device=prompt.device)
        p = self.ln_prompt(self.embed(prompt) + self.prompt_pos(pos))
        memory = torch.cat([x, p], 1)
        keep = torch.cat([torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), prompt != PAD], 1)
        return memory, keep

    def decode(self, tokens, memory, keep, cache=None):
        """Logits of the text ``tokens`` (which start with BOS): causal over all of them without ``cache``; with
        it, ``tokens`` continue what the cache holds (incremental decoding)."""
        offset = 0 if cache is None else cache.get("offset", 0)
        if cache is not None:
            cache["offset"] = offset + tokens.shape[1]
        pos = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        h = self.embed(tokens) + self.text_pos(pos)
        mask = keep[:, None, None, :]
        for i, blk in enumerate(self.decoder):
            h = blk(h, memory, mask, causal=cache is None, cache=None if cache is None else cache.setdefault(i, {}))
        return F.linear(self.ln_f(h), self.embed.weight)


def images_to_tensor(images: list[Image.Image], size: int = 64) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size)) if im.size != (size, size)
                               else im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div_(127.5).sub_(1.0).contiguous()


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _plain_state(state: dict) -> dict:
    """A PEFT-wrapped model's state dict without its adapter, under the plain :class:`TinyVLM` keys."""
    return {k.replace("base_layer.", ""): v for k, v in state.items() if "lora_" not in k}


@dataclass
class _Context:
    pixels: torch.Tensor  # one row per problem (not per sample): the encoder runs once per problem
    prompt: torch.Tensor
    n: int


class TinyCaptioner(PolicyHooks):
    """``Policy`` implementation over :class:`TinyVLM` (full fine-tuning or PEFT LoRA)."""

    def __init__(self, model, tokenizer: WordTokenizer, lora: LoraSettings | None = None):
        """``model``: a :class:`TinyVLM` (a new adapter is added when ``lora.enabled``) or a ``PeftModel`` over one
        (its adapter keeps training with its own settings)."""
        from peft import PeftModel

        self.tokenizer = tokenizer
        self.lora = lora or LoraSettings()
        if isinstance(model, PeftModel):
            c = model.peft_config[model.active_adapter]
            targets = c.target_modules if isinstance(c.target_modules, str) else "|".join(sorted(c.target_modules))
            self.lora = LoraSettings(enabled=True, r=int(c.r), alpha=int(c.lora_alpha),
                                     dropout=float(c.lora_dropout or 0.0), targets=targets)
            self.model, self.ref_model = model, None
            self.cfg = model.get_base_model().cfg
            return
        self.cfg = model.cfg
        if self.lora.enabled:
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(model, LoraConfig(
                r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                target_modules=self.lora.targets))
            self.ref_model = None
        else:
            self.model = model
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    # --- construction / persistence ---------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: TinyVLMConfig | None = None, tokenizer: WordTokenizer | None = None,
               lora: LoraSettings | None = None, seed: int = 0) -> TinyCaptioner:
        tokenizer = tokenizer or world_tokenizer()
        cfg = copy.deepcopy(cfg or TinyVLMConfig())
        cfg.vocab_size = len(tokenizer)
        torch.manual_seed(seed)
        return cls(TinyVLM(cfg), tokenizer, lora)

    @classmethod
    def load(cls, path: str, lora: LoraSettings | None = None, reference: str | None = None) -> TinyCaptioner:
        """Load ``model.pt`` + ``config.json`` + ``vocab.json`` (+ an ``adapter/`` saved by a LoRA run).

        A checkpoint's ``adapter/`` is always used: with LoRA off it is merged into the weights (all of which
        train); with LoRA on and ``reference`` the same checkpoint as ``path`` (training *starts* here) it is
        merged too and a new adapter trains on top, so π_ref (adapter disabled) is this checkpoint; otherwise
        (``path`` *continues* a run) the adapter keeps training with its own settings and π_ref is the
        checkpoint's base weights (``model.pt``: the starting checkpoint's weights).

        ``reference``: π_ref's checkpoint. Full fine-tune: loaded unless it is ``path`` (default: a frozen copy
        of ``path``). LoRA: used as a separate frozen model when its weights differ from the adapter-disabled
        model's.
        """
        model, tok = read_checkpoint(path, "captioner", TinyVLMConfig, WordTokenizer, TinyVLM)
        adapter = os.path.join(path, "adapter")
        lora_on = bool(lora is not None and lora.enabled)
        starts_here = reference is not None and os.path.abspath(reference) == os.path.abspath(path)
        if os.path.isdir(adapter):
            if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
                raise FileNotFoundError(f"captioner checkpoint {path!r} has an adapter/ without adapter_config.json")
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter, is_trainable=lora_on and not starts_here)
            if not lora_on or starts_here:
                model = model.merge_and_unload()
        cap = cls(model, tok, lora)
        if reference and os.path.abspath(reference) != os.path.abspath(path):
            ref = cls.load(reference).model.eval().requires_grad_(False)
            if not cap.lora.enabled or not _same_weights(ref.state_dict(), cap.reference_state()):
                cap.ref_model = ref
        return cap

    def reference_state(self) -> dict:
        """π_ref's weights as a plain :class:`TinyVLM` state dict (LoRA: the adapter-disabled model's)."""
        if self.ref_model is not None:
            return self.ref_model.state_dict()
        return _plain_state(self.base_model().state_dict())

    def base_model(self) -> TinyVLM:
        return self.model.get_base_model() if self.lora.enabled else self.model

    def save(self, path: str) -> None:
        """Write the checkpoint. With LoRA: the frozen base weights (π_ref's: the starting adapter merged) plus a
        standard PEFT ``adapter/`` directory."""
        if self.lora.enabled:
            write_checkpoint(path, self.cfg, self.tokenizer.vocab, _plain_state(self.base_model().state_dict()))
            self.model.save_pretrained(os.path.join(path, "adapter"))
        else:
            write_checkpoint(path, self.cfg, self.tokenizer.vocab, self.model.state_dict())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.base_model().parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # --- encoding ---------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], mode: int) -> torch.Tensor:
        """Prompt rows ``mode + words`` (``mode``: CAPTION or ANSWER) right-padded."""
        return right_pad([([mode] + self.tokenizer.encode(p))[:self.cfg.max_prompt_tokens] for p in prompts])

    def encode_targets(self, texts: list[str]) -> torch.Tensor:
        """Target rows ``tokens + <eos>`` right-padded (for supervised warm start)."""
        return right_pad([self.tokenizer.encode(t)[:self.cfg.max_new_tokens - 1] + [EOS] for t in texts])

    # --- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _sample(self, model, pixels, prompt, n, temperature, max_new, greedy):
        """``n`` texts per image/prompt row (``(tokens, mask, logprobs)``), the encoder run once per row."""
        memory, keep = model.encode(pixels, prompt)
        if n > 1:
            memory, keep = memory.repeat_interleave(n, 0), keep.repeat_interleave(n, 0)
        cache: dict = {}
        start = torch.full((memory.shape[0], 1), BOS, dtype=torch.long)
        return sample(lambda tokens: model.decode(tokens, memory, keep, cache), start, max_new, _BANNED,
                      temperature, greedy)

    def generate(self, images, prompts, n=1, temperature=1.0, max_new_tokens=None, greedy=False) -> Rollout:
        pixels = images_to_tensor(images, self.cfg.image_size)
        prompt = self.encode_prompts(prompts, CAPTION)
        max_new = min(max_new_tokens or self.cfg.max_new_tokens, self.cfg.max_new_tokens)
        self.model.eval()
        tokens, mask, lps = self._sample(self.model, pixels, prompt, n, temperature, max_new, greedy)
        texts = [self.tokenizer.decode(r) for r in tokens.tolist()]
        return Rollout(texts=[texts[g * n:(g + 1) * n] for g in range(len(images))], tokens=tokens, mask=mask,
                       logprobs=lps, temperature=1.0 if greedy else temperature,
                       context=_Context(pixels, prompt, n))

    @torch.no_grad()
    def _answers(self, model, images, questions) -> list[str]:
        pixels = images_to_tensor(images, self.cfg.image_size)
        prompt = self.encode_prompts(questions, ANSWER)
        model.eval()
        tokens, *_ = self._sample(model, pixels, prompt, 1, 1.0, self.cfg.max_new_tokens, greedy=True)
        return [self.tokenizer.decode(r) for r in tokens.tolist()]

    def answer(self, images, questions) -> list[str]:
        """The ``Clarifier`` protocol: π_ref's greedy answers to clarification questions."""
        if not images:
            return []
        with model_of(self.model, self.ref_model, use_reference=True) as ref:
            return self._answers(ref, images, questions)

    # --- log-probs --------------------------------------------------------------------------------------------
    def _token_logprobs(self, model, pixels, prompt, tokens, temperature, n=1, first=0):
        """Log-probs of ``tokens`` rows; image/prompt row ``(first + r) // n`` conditions token row ``r``."""
        g0, g1 = first // n, (first + tokens.shape[0] - 1) // n + 1
        memory, keep = model.encode(pixels[g0:g1], prompt[g0:g1])
        idx = torch.arange(first, first + tokens.shape[0]) // n - g0
        bos = torch.full((tokens.shape[0], 1), BOS, dtype=torch.long)
        return teacher_forced(lambda inputs: model.decode(torch.cat([bos, inputs], 1), memory[idx], keep[idx]),
                              tokens, _BANNED, temperature)

    def logprobs(self, rollout: Rollout, rows: slice | None = None, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs of ``rollout.tokens[rows]``: π_θ (train mode with dropout off, so the update
        computes the sampling policy's function) with gradient, or π_ref without. Only the columns up to the
        longest caption run; the rest is padding (0)."""
        start, stop, _ = (rows or slice(None)).indices(rollout.tokens.shape[0])
        ctx = rollout.context
        with model_of(self.model, self.ref_model, reference) as model:
            return over_longest(lambda tokens: self._token_logprobs(
                model, ctx.pixels, ctx.prompt, tokens, rollout.temperature, ctx.n, start), rollout.tokens[start:stop])

    def supervised_loss(self, pixels: torch.Tensor, prompt: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy of ``targets`` (warm start; dropout on)."""
        self.model.train()
        return mean_nll(self._token_logprobs(self.model, pixels, prompt, targets, 1.0), targets)
