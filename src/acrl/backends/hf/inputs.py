"""What a vision-language model is fed: batched processor outputs, positions, a prompt prefill over a KV cache.

* Each problem is encoded once by the processor (:class:`HFContext` keeps the encodings of a rollout); rows are
  batched the way the processor batches (:func:`collate`: left padding, per-image tensors such as Idefics3's
  tiles or LLaVA-OneVision's patches zero-padded to the largest), so any family the processor supports batches;
* positions come from the attention mask (:meth:`Feed.positions`): the model's own M-RoPE indices for the
  Qwen-VL families (its ``rope_deltas`` recomputed at every prefill and expanded to the rows sharing a prompt),
  else the running count of attended tokens;
* :meth:`Feed.prefill` runs each distinct prompt once and expands its KV cache to the rows that share it;
  :meth:`Feed.extend` runs tokens after what a cache holds (the sampler's decode steps, the captions of the
  shared teacher-forced pass);
* in a per-row pass the frozen vision tower runs once per problem, not once per row
  (:func:`image_features_once`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from acrl.backends.hf.loading import language_model_prefix

_SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
_PER_LAYER = ("deepstack_features", "hidden_states", "attentions")   # vision-output fields holding one entry per layer


@dataclass
class HFContext:
    """Per-problem processor outputs (batch of 1, on CPU); rollout row ``r`` uses problem ``r // n``.
    ``sampler_logprobs``: the sampler's own log-probs of the rollout's tokens (the mismatch metric only)."""

    encodings: list[dict[str, torch.Tensor]]
    n: int
    sampler_logprobs: torch.Tensor | None = None
    top_p: float = 1.0          # the nucleus the captions were drawn from (1: none; greedy rollouts)


def _pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` zero-padded at the end of every dim but the first to ``shape[1:]``."""
    pad: list[int] = []
    for have, want in zip(reversed(t.shape[1:]), reversed(shape[1:])):
        pad += [0, want - have]
    return F.pad(t, pad) if any(pad) else t


def collate(encs: list[dict[str, torch.Tensor]], pad_id: int, tails: torch.Tensor | None = None,
            device: str = "cpu") -> dict[str, torch.Tensor]:
    """Batch per-problem processor outputs the way the processor batches a list: token rows left-padded (mask 0,
    type 0), every other tensor concatenated along its first dim after zero-padding the rest to the largest
    (Idefics3's tiles and ``pixel_attention_mask``, LLaVA-OneVision's patches: padded images the models drop;
    Qwen's flat patch lists and grids: plain concatenation). ``tails`` (caption tokens: mask 1, type 0) are
    appended on the right."""
    width = max(e["input_ids"].shape[1] for e in encs)
    out: dict[str, Any] = {}
    ids, att, types = [], [], {}
    for e in encs:
        k = width - e["input_ids"].shape[1]
        ids.append(F.pad(e["input_ids"][0], (k, 0), value=pad_id))
        att.append(F.pad(torch.ones(e["input_ids"].shape[1], dtype=torch.long), (k, 0), value=0))
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in e:
                types.setdefault(key, []).append(F.pad(e[key][0], (k, 0), value=0))
    out["input_ids"], out["attention_mask"] = torch.stack(ids), torch.stack(att)
    out.update({k: torch.stack(v) for k, v in types.items()})
    if tails is not None:
        out["input_ids"] = torch.cat([out["input_ids"], tails], 1)
        out["attention_mask"] = torch.cat([out["attention_mask"], torch.ones_like(tails)], 1)
        for k in types:
            out[k] = torch.cat([out[k], torch.zeros_like(tails, dtype=out[k].dtype)], 1)
    for key in encs[0]:
        if key not in _SEQ_KEYS:
            parts = [e[key] for e in encs]
            shape = tuple(max(p.shape[d] for p in parts) for d in range(parts[0].dim()))
            out[key] = torch.cat([_pad_to(p, shape) for p in parts], 0)
    return {k: v.to(device) for k, v in out.items()}


def _banned_tokens(model, processor, tokenizer, pad_id: int, eos_ids: list[int]) -> torch.Tensor:
    """Ids a caption never contains: image/video placeholders and markers, padding (unless it ends a caption),
    and the unused rows of a head larger than the tokenizer. Masked in sampling and in every log-prob."""
    ids: set[int] = set()
    cfg = model.config
    for src in (cfg, processor, tokenizer):
        for key in dir(src) if src is not cfg else list(cfg.to_dict()):
            if key.endswith(("_token_id", "_token_index")) and not key.startswith(("eos", "bos", "pad")):
                with contextlib.suppress(Exception):
                    v = getattr(src, key)
                    if isinstance(v, int) and v >= 0:
                        ids.add(v)
    if pad_id not in eos_ids:
        ids.add(pad_id)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids |= set(range(len(tokenizer), vocab))
    return torch.tensor(sorted(i for i in ids if i < vocab and i not in eos_ids), dtype=torch.long)


@dataclass
class Feed:
    """What the sampler and the teacher-forced pass know about a model besides its weights: its end and padding
    ids, the ids a caption never contains (``banned``), its device, whether it takes M-RoPE positions, and the
    name of its KV-cache argument."""

    pad_id: int
    eos_ids: list[int]
    banned: torch.Tensor
    device: str
    mrope: bool
    cache_kw: str

    @classmethod
    def of(cls, model, processor, tokenizer, device: str) -> Feed:
        """The feed of ``model`` (the plain model, no adapter wrapper) with ``processor`` / ``tokenizer``."""
        gc = model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else tokenizer.eos_token_id
        eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        pad = gc.pad_token_id if gc.pad_token_id is not None else tokenizer.pad_token_id
        pad_id = int(pad if pad is not None else eos_ids[0])
        mrope = hasattr(getattr(model, "model", None), "rope_deltas")   # M-RoPE offsets there
        params = inspect.signature(model.forward).parameters
        return cls(pad_id=pad_id, eos_ids=eos_ids, banned=_banned_tokens(model, processor, tokenizer, pad_id, eos_ids),
                   device=device, mrope=mrope, cache_kw="cache" if "cache" in params else "past_key_values")

    def positions(self, att: torch.Tensor, t: int, deltas: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``position_ids`` of the last ``t`` tokens of rows with attention mask ``att``: the count of attended
        tokens before each. M-RoPE models: nothing for a prefill (the model computes its 3-D positions from the
        mask and the image grids, and its ``rope_deltas``); after one, the text position plus the row's delta."""
        pos = (att.cumsum(-1) - 1).clamp(min=0)[:, -t:]
        if not self.mrope:
            return {"position_ids": pos}
        if deltas is None:
            return {}
        return {"position_ids": (pos + deltas.to(pos.device)).unsqueeze(0).expand(3, -1, -1)}

    def prefill(self, model, encs: list[dict], groups: list[int]):
        """Forward of the distinct prompts ``encs`` (KV cache on), expanded to rows (``groups[r]``: index into
        ``encs``): (cache, attention mask, logits after the prompt, M-RoPE deltas or None), all with
        ``len(groups)`` rows. The model's ``rope_deltas`` are reset, recomputed by this prefill and expanded."""
        batch = collate(encs, self.pad_id, device=self.device)
        att = batch["attention_mask"]
        if self.mrope:
            model.model.rope_deltas = None
        out = model(**batch, **self.positions(att, att.shape[1]), use_cache=True, logits_to_keep=1)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        logits = out.logits[:, -1]
        deltas = model.model.rope_deltas if self.mrope else None
        if deltas is None and self.mrope:
            raise RuntimeError("the M-RoPE model computed no rope_deltas in its prefill")
        if groups != list(range(len(encs))):
            idx = torch.tensor(groups, device=att.device)
            cache.batch_select_indices(idx)
            att, logits = att[idx], logits[idx]
            deltas = deltas[idx.to(deltas.device)] if deltas is not None else None
        return cache, att, logits, deltas

    def extend(self, model, cache, att: torch.Tensor, deltas, tokens: torch.Tensor, **kw):
        """Forward of ``tokens`` (rows, t) after what ``cache`` holds; returns (logits, extended mask)."""
        att = torch.cat([att, torch.ones_like(tokens)], 1)
        pos = self.positions(att, tokens.shape[1], deltas)
        out = model(input_ids=tokens, attention_mask=att, use_cache=True, **pos,
                    **{self.cache_kw: cache}, **kw)
        return out.logits, att


# --- the vision tower once per problem ----------------------------------------------------------------------
def _cat_features(outs: list, per_layer: bool = False):
    """The outputs of a vision encoder run on single images, combined as one run on all of them returns them:
    tensors concatenated along the first dim, sequences of per-image tensors chained, per-layer sequences
    (``per_layer``, the :data:`_PER_LAYER` fields, e.g. Qwen3-VL's deep-stack features) and sequences of
    sequences combined element-wise, output records field by field."""
    first = outs[0]
    if first is None:
        return None
    if torch.is_tensor(first):
        return torch.cat(outs, 0)
    if isinstance(first, (list, tuple)):
        if not per_layer and all(torch.is_tensor(x) for x in first):
            return type(first)(x for o in outs for x in o)
        return type(first)(_cat_features([o[i] for o in outs]) for i in range(len(first)))
    if isinstance(first, dict):     # transformers' ModelOutput records are dicts
        out = copy.copy(first)
        for k in first.keys():
            out[k] = _cat_features([o[k] for o in outs], per_layer=k in _PER_LAYER)
        return out
    raise TypeError(f"cannot combine vision outputs of type {type(first).__name__}")


@contextlib.contextmanager
def image_features_once(model, encs: list[dict], groups: list[int]):
    """During one per-row forward: the vision tower runs once per problem (without gradient) instead of once per
    row. The model's ``get_image_features`` is replaced by one that encodes each distinct problem's image alone
    and hands every row its problem's features, concatenated as a batch's would be (:func:`_cat_features`).
    Only while no vision weight trains (the features take no gradient). The swap is on the model object:
    another thread must not run the same model meanwhile (the trainer's clarifier and its log-prob passes take
    turns through a lock)."""
    inner = getattr(model, "model", None)
    original = getattr(inner, "get_image_features", None)
    vision_trains = any(p.requires_grad for n, p in model.named_parameters()
                        if not n.startswith(language_model_prefix(model) + ".") and "lm_head" not in n)
    if original is None or len(set(groups)) == len(groups) or vision_trains:
        yield
        return
    sig = inspect.signature(type(inner).get_image_features)   # of the function: (self, pixel_values, ...)
    var_kw = next((n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    def once(*args, **kwargs):
        bound = sig.bind(None, *args, **kwargs).arguments
        bound.pop(next(iter(sig.parameters)))
        memo = {}
        with torch.no_grad():
            for g in sorted(set(groups)):
                call = dict(bound)
                extra = dict(call.pop(var_kw, {}) or {})
                for k, v in list(call.items()) + list(extra.items()):
                    if torch.is_tensor(v) and k in encs[g]:
                        own = encs[g][k].to(v.device)
                        (call if k in call else extra)[k] = own.to(v.dtype) if v.is_floating_point() else own
                memo[g] = original(**call, **extra)
        return _cat_features([memo[g] for g in groups])

    own = inner.__dict__.get("get_image_features")
    inner.get_image_features = once
    try:
        yield
    finally:
        if own is None:
            del inner.get_image_features
        else:
            inner.get_image_features = own
