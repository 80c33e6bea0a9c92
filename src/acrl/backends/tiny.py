"""The embedded world's captioner: a small PyTorch vision-language model built from a config (no downloads).

Architecture (about 1M parameters at the defaults): a strided CNN turns the 64x64 image into 8x8 = 64 tokens, one
transformer encoder layer mixes them (2-D sin-cos positions); the prompt's tokens are embedded, **LayerNorm-ed** and
appended to the cross-attention memory (without that norm the model ignores its prompt); a pre-LN transformer
decoder with a KV cache writes the text; the output head is tied to the word embedding.

The model does two jobs, selected by a mode token before the prompt: ``<caption>`` + the problem's question (the
policy's caption c0) and ``<answer>`` + a clarification question (the reference's answer c1).

Attention projections are plain ``nn.Linear`` named ``q_proj/k_proj/v_proj/o_proj`` and the MLP ``fc1/fc2``, so
PEFT LoRA wraps them as in the Hugging Face models; the reference is then the model with its adapter disabled.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from acrl.config import LoraSettings, TinyVLMConfig
from acrl.rollout.protocols import PolicyHooks, Rollout
from acrl.world import language

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<caption>", "<answer>"]
PAD, BOS, EOS, UNK, CAPTION, ANSWER = range(6)
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




class Attention(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def _split(self, x):
        b, t, d = x.shape
        return x.view(b, t, self.h, d // self.h).transpose(1, 2)

    def forward(self, x, kv=None, causal=False, cache=None, mask=None):
        """``kv`` is the memory for cross-attention (None: self-attention). ``cache``: dict for incremental decoding."""
        q = self._split(self.q_proj(x))
        if kv is None:
            k, v = self._split(self.k_proj(x)), self._split(self.v_proj(x))
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


class Block(nn.Module):
    def __init__(self, d: int, h: int, cross: bool):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, h)
        self.cross = cross
        if cross:
            self.ln2, self.xattn = nn.LayerNorm(d), Attention(d, h)
        self.ln3, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, memory=None, memory_mask=None, causal=False, cache=None):
        x = x + self.attn(self.ln1(x), causal=causal, cache=None if cache is None else cache.setdefault("self", {}))
        if self.cross:
            x = x + self.xattn(self.ln2(x), kv=memory, mask=memory_mask,
                               cache=None if cache is None else cache.setdefault("cross", {}))
        return x + self.fc2(F.gelu(self.fc1(self.ln3(x))))


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
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

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

    def decode(self, tokens, memory, keep, cache=None, offset=0):
        pos = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        h = self.embed(tokens) + self.text_pos(pos)
        mask = keep[:, None, None, :]
        for i, blk in enumerate(self.decoder):
            h = blk(h, memory, mask, causal=cache is None, cache=None if cache is None else cache.setdefault(i, {}))
        return F.linear(self.ln_f(h), self.embed.weight)

    def forward(self, pixels, prompt, tokens):
        """Teacher-forced logits for ``tokens`` (which start with BOS)."""
        memory, keep = self.encode(pixels, prompt)
        return self.decode(tokens, memory, keep)


def images_to_tensor(images: list[Image.Image], size: int = 64) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size)) if im.size != (size, size)
                               else im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div_(127.5).sub_(1.0).contiguous()




def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
        cfg, tok = read_config_and_vocab(path, "captioner", TinyVLMConfig, WordTokenizer)
        model = TinyVLM(cfg)
        try:
            state = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:   # noqa: BLE001 - torch's unpickling errors advise weights_only=False: not here
            raise ValueError(f"captioner checkpoint {os.path.join(path, 'model.pt')!r} is corrupt or not a "
                             f"captioner's weights ({type(e).__name__})") from None
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
        return {k.replace("base_layer.", ""): v for k, v in self.base_model().state_dict().items() if "lora_" not in k}

    def base_model(self) -> TinyVLM:
        return self.model.get_base_model() if self.lora.enabled else self.model

    def save(self, path: str) -> None:
        """Write the checkpoint. With LoRA: the frozen base weights plus a standard PEFT ``adapter/`` directory."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as fh:
            json.dump(asdict(self.cfg), fh, indent=1)
        with open(os.path.join(path, "vocab.json"), "w") as fh:
            json.dump(self.tokenizer.vocab, fh)
        if self.lora.enabled:
            base = {k.replace("base_layer.", ""): v for k, v in self.base_model().state_dict().items()
                    if "lora_" not in k}
            torch.save(base, os.path.join(path, "model.pt"))   # π_ref's weights (the starting adapter merged)
            self.model.save_pretrained(os.path.join(path, "adapter"))
        else:
            torch.save(self.model.state_dict(), os.path.join(path, "model.pt"))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.base_model().parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # --- encoding ---------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], mode: int) -> torch.Tensor:
        n = self.cfg.max_prompt_tokens
        rows = [([mode] + self.tokenizer.encode(p))[:n] for p in prompts]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [PAD] * (width - len(r)) for r in rows], dtype=torch.long)

    def encode_targets(self, texts: list[str]) -> torch.Tensor:
        """Target rows ``tokens + <eos>`` right-padded (for supervised warm start)."""
        m = self.cfg.max_new_tokens
        rows = [(self.tokenizer.encode(t)[: m - 1]) + [EOS] for t in texts]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [PAD] * (width - len(r)) for r in rows], dtype=torch.long)

    @contextlib.contextmanager
    def _reference(self):
        """The frozen reference π_ref: the initial copy (full fine-tuning), a separately loaded reference, or the
        adapter-disabled model (LoRA)."""
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.model.disable_adapter():
                yield self.model

    # --- generation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _sample(self, model, pixels, prompt, n, temperature, max_new, greedy):
        memory, keep = model.encode(pixels, prompt)
        if n > 1:
            memory, keep = memory.repeat_interleave(n, 0), keep.repeat_interleave(n, 0)
        rows = memory.shape[0]
        cache: dict = {}
        tok = torch.full((rows, 1), BOS, dtype=torch.long)
        out = torch.full((rows, max_new), PAD, dtype=torch.long)
        lps = torch.zeros(rows, max_new)
        done = torch.zeros(rows, dtype=torch.bool)
        for t in range(max_new):
            logits = model.decode(tok, memory, keep, cache=cache, offset=t)[:, -1].float()
            logits[:, _BANNED] = float("-inf")
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
            if done.all():
                out, lps = out[:, : t + 1], lps[:, : t + 1]
                break
            tok = nxt[:, None]
        mask = (out != PAD).float()
        return out, mask, lps, memory, keep

    def generate(self, images, prompts, n=1, temperature=1.0, max_new_tokens=None, greedy=False) -> Rollout:
        pixels = images_to_tensor(images, self.cfg.image_size)
        prompt = self.encode_prompts(prompts, CAPTION)
        max_new = min(max_new_tokens or self.cfg.max_new_tokens, self.cfg.max_new_tokens)
        self.model.eval()
        tokens, mask, lps, _, _ = self._sample(self.model, pixels, prompt, n, temperature, max_new, greedy)
        extra = max_new - tokens.shape[1]   # constant width (the generation cap): the loss's length normaliser
        tokens, mask, lps = F.pad(tokens, (0, extra), value=PAD), F.pad(mask, (0, extra)), F.pad(lps, (0, extra))
        texts = [self.tokenizer.decode(r) for r in tokens.tolist()]
        return Rollout(texts=[texts[g * n:(g + 1) * n] for g in range(len(images))], tokens=tokens, mask=mask,
                       logprobs=lps, temperature=1.0 if greedy else temperature,
                       context=_Context(pixels, prompt, n))

    @torch.no_grad()
    def answer(self, images, questions) -> list[str]:
        if not images:
            return []
        pixels = images_to_tensor(images, self.cfg.image_size)
        prompt = self.encode_prompts(questions, ANSWER)
        with self._reference() as ref:
            ref.eval()
            tokens, *_ = self._sample(ref, pixels, prompt, 1, 1.0, self.cfg.max_new_tokens, greedy=True)
        return [self.tokenizer.decode(r) for r in tokens.tolist()]

    @torch.no_grad()
    def policy_answer(self, images, questions) -> list[str]:
        """Answers by the current policy (diagnostics; training uses the reference's answers)."""
        pixels = images_to_tensor(images, self.cfg.image_size)
        prompt = self.encode_prompts(questions, ANSWER)
        self.model.eval()
        tokens, *_ = self._sample(self.model, pixels, prompt, 1, 1.0, self.cfg.max_new_tokens, greedy=True)
        return [self.tokenizer.decode(r) for r in tokens.tolist()]

    # --- log-probs --------------------------------------------------------------------------------------------
    def _token_logprobs(self, model, pixels, prompt, tokens, temperature, n=1, first=0):
        """Log-probs of ``tokens`` rows; image/prompt row ``(first + r) // n`` conditions token row ``r``."""
        inp = torch.cat([torch.full((tokens.shape[0], 1), BOS, dtype=torch.long), tokens[:, :-1]], 1)
        inp = torch.where(inp == PAD, torch.full_like(inp, EOS), inp)
        g0, g1 = first // n, (first + tokens.shape[0] - 1) // n + 1
        memory, keep = model.encode(pixels[g0:g1], prompt[g0:g1])
        idx = torch.arange(first, first + tokens.shape[0]) // n - g0
        logits = model.decode(inp, memory[idx], keep[idx]).float()
        logits[..., _BANNED] = float("-inf")
        logp = torch.log_softmax(logits / temperature, -1)
        safe = torch.where(tokens == PAD, torch.full_like(tokens, EOS), tokens)
        return logp.gather(-1, safe[..., None])[..., 0] * (tokens != PAD)

    def logprobs(self, rollout: Rollout, rows: slice | None = None, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs of ``rollout.tokens[rows]``: π_θ (train mode with dropout off, so the update
        computes the sampling policy's function) with gradient, or π_ref without. Only the columns up to the
        longest caption run; the rest is padding (0)."""
        start, stop, _ = (rows or slice(None)).indices(rollout.tokens.shape[0])
        ctx = rollout.context
        tokens = rollout.tokens[start:stop]
        width = tokens.shape[1]
        t = max(1, int((tokens != PAD).sum(1).max())) if tokens.numel() else 1
        args = (ctx.pixels, ctx.prompt, tokens[:, :t], rollout.temperature, ctx.n, start)
        if reference:
            with torch.no_grad(), self._reference() as ref:
                return F.pad(self._token_logprobs(ref, *args), (0, width - t))
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        return F.pad(self._token_logprobs(self.model, *args), (0, width - t))

    def supervised_loss(self, pixels: torch.Tensor, prompt: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy of ``targets`` (warm start)."""
        self.model.train()
        return -self._token_logprobs(self.model, pixels, prompt, targets, 1.0).sum() / (targets != PAD).sum()


def read_config_and_vocab(path: str, what: str, config_cls, tokenizer_cls):
    """``config.json`` and ``vocab.json`` of a tiny checkpoint directory (which must also hold ``model.pt``), with
    one-line errors naming the checkpoint (``what``: captioner, reasoner)."""
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
    return cfg, tok
