"""The one teacher-forced log-prob function of the HF captioner, and the distribution it scores.

The distribution is the sampler's: ``softmax(logits / T)`` over the allowed tokens (:func:`ban`), restricted to
the nucleus of mass ``top_p`` and renormalised (:func:`nucleus`). :func:`caption_logprobs` gives the old
log-probs of a sampled rollout, the update's and π_ref's: same row chunks (:func:`row_chunks`), same
distribution as the sampler's, so the PPO ratio of the on-policy step is 1 up to nothing. It only materialises
the logits of the caption positions, reduced one row at a time (:func:`token_logprobs`). ``shared``: it runs
each prompt once per chunk and the captions over the expanded cache, keeping the gradient through the cached
prompt keys/values; else every row runs prompt + caption (the frozen vision tower still once per problem). The
caller fixes the choice per captioner, so old and new log-probs always come from the same numerics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from acrl.backends.hf.inputs import Feed, HFContext, collate, image_features_once
from acrl.rollout.protocols import Rollout


def ban(logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with the ``banned`` ids set to -inf."""
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned.to(logits.device), float("-inf"))
    return logits


def nucleus(logp: torch.Tensor, top_p: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``logp`` (..., V) with the tokens outside the nucleus (the shortest prefix of mass >= ``top_p``) set to
    -inf; ``keep`` (..., 1): token ids kept whatever their rank."""
    if top_p >= 1.0:
        return logp
    srt, idx = logp.sort(-1, descending=True)
    drop = srt.exp().cumsum(-1) - srt.exp() > top_p
    if keep is not None:
        drop &= idx != keep
    return logp.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   banned: torch.Tensor | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Log-probs of ``tokens`` under the sampling distribution of ``logits`` (``(rows, t, V)`` in any dtype;
    ``tokens``: (rows, t)), in fp32: ``softmax(logits / T)`` over the allowed tokens, restricted to the nucleus
    of mass ``top_p`` and renormalised (the chosen token always counted in, so a token the sampler drew at a
    float-rounding boundary never gets -inf). The chosen token's logit minus a logsumexp, one row at a time: the
    largest temporary is one row's (t, V) fp32 logits, never the chunk's (as TRL's ``selective_log_softmax``)."""
    out = []
    for r in range(logits.shape[0]):
        row = ban(logits[r].float(), banned) / temperature
        tok = tokens[r, :, None].to(row.device)
        if top_p < 1.0:
            row = nucleus(torch.log_softmax(row, -1), top_p, keep=tok)
        out.append(row.gather(-1, tok)[:, 0] - torch.logsumexp(row, -1))
    return torch.stack(out) if out else logits.new_zeros(tokens.shape, dtype=torch.float32)


def row_chunks(start: int, stop: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut at the multiples of ``chunk``: the same rows always share a forward, whichever slice
    of the rollout is asked for (a micro-batch that is a multiple of ``chunk`` runs the recompute's chunks)."""
    out, a = [], start
    while a < stop:
        b = min(stop, (a // chunk + 1) * chunk)
        out.append((a, b))
        a = b
    return out


def caption_logits(model, feed: Feed, encs: list[dict], groups: list[int], tails: torch.Tensor,
                   shared: bool) -> torch.Tensor | list[torch.Tensor]:
    """Logits predicting each of the ``t`` caption tokens ``tails`` (rows, t); row ``r`` follows the prompt
    ``encs[groups[r]]``. The shared path returns them as consecutive pieces along t (no concatenated copy)."""
    t = tails.shape[1]
    if shared:   # prompt once per problem, then captions (but the last token) over the expanded cache
        cache, att, first, deltas = feed.prefill(model, encs, groups)
        if t == 1:
            return [first[:, None]]
        logits, _ = feed.extend(model, cache, att, deltas, tails[:, :-1].to(att.device))
        return [first[:, None], logits]
    batch = collate([encs[g] for g in groups], feed.pad_id, tails, feed.device)
    if feed.mrope:
        model.model.rope_deltas = None
    att = batch["attention_mask"]
    with image_features_once(model, encs, groups):
        return model(**batch, **feed.positions(att, att.shape[1]), use_cache=False,
                     logits_to_keep=t + 1).logits[:, :-1]


def caption_logprobs(model, feed: Feed, rollout: Rollout, start: int, stop: int, chunk: int,
                     shared: bool) -> torch.Tensor:
    """Log-probs of rows ``[start, stop)`` (CPU float32, masked, as wide as the rollout), one forward per chunk
    of :func:`row_chunks` (``chunk`` rows), each chunk's logits only over its caption positions and reduced by
    :func:`token_logprobs` before the next chunk runs. ``shared``: the prompt-sharing path or not."""
    ctx: HFContext = rollout.context
    width = rollout.tokens.shape[1]
    top_p = getattr(ctx, "top_p", 1.0)
    parts = []
    for a, b in row_chunks(start, stop, chunk):
        mask = rollout.mask[a:b]
        t = max(1, int(mask.sum(1).max()))
        tails = rollout.tokens[a:b, :t]
        g0, g1 = a // ctx.n, (b - 1) // ctx.n + 1
        logits = caption_logits(model, feed, ctx.encodings[g0:g1], [r // ctx.n - g0 for r in range(a, b)],
                                tails, shared)
        safe = torch.where(mask[:, :t] > 0, tails, torch.full_like(tails, feed.eos_ids[0]))  # no -inf * 0
        pieces, lps, k = logits if isinstance(logits, list) else [logits], [], 0
        del logits
        while pieces:
            piece = pieces.pop(0)
            lps.append(token_logprobs(piece, safe[:, k:k + piece.shape[1]], rollout.temperature,
                                      feed.banned.to(piece.device), top_p))
            k += piece.shape[1]
            del piece
        lp = torch.cat(lps, 1)
        parts.append(F.pad(lp.cpu() * mask[:, :t], (0, width - t)))
    if not parts:
        return torch.zeros(0, width)
    return torch.cat(parts)
