"""The one sampler of the HF captioner: a shared-prefix KV-cache decode loop.

Each distinct prompt is prefilled once (KV cache on), the cache is expanded to the problem's rows and given room
for the caption up front (:func:`with_room`), and the captions are sampled in a plain decode loop over it from
the distribution :mod:`acrl.backends.hf.logprobs` scores (banned logits / T, ``top_p``: the renormalised
nucleus). Its per-token log-probs are kept only to measure the sampler/trainer mismatch
(``HFCaptioner.logprob_mismatch``); the old log-probs of a rollout come from the teacher-forced pass.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from acrl.backends.hf.inputs import Feed
from acrl.backends.hf.logprobs import ban, nucleus
from acrl.rollout.protocols import Rollout


@functools.lru_cache(maxsize=1)
def _roomy_layer():
    """A transformers ``DynamicLayer`` whose keys/values are views of a buffer with room for more positions
    (``room_k`` / ``room_v``): ``update`` writes new positions in place while they fit, else concatenates."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            n, m = self.keys.shape[-2], key_states.shape[-2]
            if n + m > self.room_k.shape[-2]:                      # out of room: the stock concatenation
                return super().update(key_states, value_states, *args, **kwargs)
            self.room_k[..., n:n + m, :] = key_states
            self.room_v[..., n:n + m, :] = value_states
            self.keys, self.values = self.room_k[..., :n + m, :], self.room_v[..., :n + m, :]
            return self.keys, self.values

    return DynamicLayer, RoomyLayer


def with_room(cache, room: int) -> None:
    """Give each plain layer of a filled KV cache a buffer with ``room`` more positions, in place: decode steps
    then write their keys/values into it and attend over views of the filled part, where the stock layer
    concatenates, i.e. copies the whole cache of every layer at every step (on a CPU, with a prompt of a few
    hundred tokens, that copy was most of a decode step). Same values; layers of other kinds (sliding windows)
    are left as they are."""
    plain, roomy = _roomy_layer()
    layers = getattr(cache, "layers", None) or []
    for i, layer in enumerate(layers):
        if type(layer) is not plain or not layer.is_initialized or layer.keys is None:
            continue
        new = roomy()
        n = layer.keys.shape[-2]
        for name, t in (("room_k", layer.keys), ("room_v", layer.values)):
            buf = t.new_empty(*t.shape[:-2], n + room, t.shape[-1])
            buf[..., :n, :] = t
            setattr(new, name, buf)
        new.keys, new.values = new.room_k[..., :n, :], new.room_v[..., :n, :]
        new.device, new.is_initialized = layer.device, True
        layers[i] = new


@torch.no_grad()
def sample(model, feed: Feed, encs: list[dict], rows_of: list[int], temperature: float, max_new: int,
           greedy: bool, top_p: float = 1.0, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample rows (``rows_of[r]``: encoding index) in chunks of ``chunk`` rows (0: all at once); tokens, mask,
    sampler log-probs (CPU, right-padded, zero after the first end token)."""
    chunk = chunk or len(rows_of)
    parts = [sample_shared(model, feed, encs, rows_of[i:i + chunk], temperature, max_new, greedy, top_p)
             for i in range(0, len(rows_of), chunk)]
    width = max(g.shape[1] for g, _ in parts)
    tokens = torch.cat([F.pad(g, (0, width - g.shape[1]), value=feed.pad_id) for g, _ in parts])
    lps = torch.cat([F.pad(lp, (0, width - lp.shape[1])) for _, lp in parts]).float()
    is_eos = torch.isin(tokens, torch.tensor(feed.eos_ids))
    before = (is_eos.long().cumsum(1) - is_eos.long()) == 0     # up to and including the first end token
    mask = before.float()
    tokens = torch.where(before, tokens, torch.full_like(tokens, feed.pad_id))
    return tokens, mask, torch.where(before, lps, torch.zeros_like(lps))


def sample_shared(model, feed: Feed, encs: list[dict], rows_of: list[int], temperature: float, max_new: int,
                  greedy: bool, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode loop: prefill each distinct prompt once, then sample all rows over the shared cache (given
    room for the ``max_new`` tokens up front). Tokens (pad after an end token) and the log-probs of the sampled
    tokens under the distribution they were drawn from, both (rows, steps) on CPU."""
    uniq = sorted(set(rows_of))
    where = {g: k for k, g in enumerate(uniq)}
    cache, att, logits, deltas = feed.prefill(model, [encs[g] for g in uniq], [where[g] for g in rows_of])
    with_room(cache, max_new)
    temp, top_p = (1.0, 1.0) if greedy else (temperature, top_p)
    banned = feed.banned.to(logits.device)
    eos = torch.tensor(feed.eos_ids, device=logits.device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    toks = [torch.zeros(logits.shape[0], 0, dtype=torch.long, device=logits.device)]
    lps = [torch.zeros(logits.shape[0], 0, device=logits.device)]
    for step in range(max_new):
        logp = torch.log_softmax(ban(logits.float(), banned) / temp, -1)
        if top_p < 1.0:
            logp = torch.log_softmax(nucleus(logp, top_p), -1)
        if greedy:
            tok = logp.argmax(-1)
        else:
            # exponential race == multinomial over softmax(log-probs), without its per-row overhead
            race = torch.empty_like(logp).exponential_().log()
            tok = (logp - race).argmax(-1)
        tok = torch.where(done, torch.full_like(tok, feed.pad_id), tok)
        toks.append(tok[:, None])
        lps.append(logp.gather(1, tok[:, None]))
        done |= torch.isin(tok, eos)
        if step == max_new - 1 or bool(done.all()):
            break
        logits, att = feed.extend(model, cache, att, deltas, tok[:, None], logits_to_keep=1)
        logits = logits[:, -1]
    return torch.cat(toks, 1).cpu(), torch.cat(lps, 1).cpu()


def pad_rollout(roll: Rollout, width: int, pad_id: int) -> Rollout:
    """``roll`` with tokens / mask / log-probs right-padded to ``width`` columns (the generation cap), so that
    the rollout's width is a constant across steps and ranks (never cut: a wider rollout stays as it is)."""
    extra = width - roll.tokens.shape[1]
    if extra > 0:
        roll.tokens = F.pad(roll.tokens, (0, extra), value=pad_id)
        roll.mask = F.pad(roll.mask, (0, extra))
        roll.logprobs = F.pad(roll.logprobs, (0, extra))
    return roll
