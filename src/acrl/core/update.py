"""One PPO-style update of a policy over a batch of sampled sequences (captions, or a co-trained reasoner's replies).

Pure algorithm: the policy is anything with ``logprobs(batch, rows, reference=False)`` and
``trainable_parameters()``; the batch carries ``tokens``, ``mask`` and the sampler's ``logprobs``. Several
processes pass a ``dist`` with ``all_sum`` and ``sum_gradients`` (:mod:`acrl.train.distributed`); alone, none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from acrl.core.loss import policy_loss, sampler_correction

_STATS = ("loss", "kl_mean", "clip_frac", "ratio_mean")


@dataclass(frozen=True)
class UpdateSettings:
    """The knobs of one update (``train.*`` for the captioner, ``reasoner_train.*`` for a co-trained reasoner).

    ``length_norm``: the generation cap, the constant of the ``seq-mean-token-sum-norm`` aggregation.
    ``tis_cap``: truncated importance sampling between the sampler's and the trainer's old log-probs (0: off)."""

    epochs: int = 1
    micro_batch: int = 128
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_beta: float = 0.02
    aggregation: str = "seq-mean-token-mean"
    grad_clip: float = 1.0
    length_norm: int = 1
    tis_cap: float = 0.0


class _Alone:
    """The distributed operations of a single process: identities."""

    @staticmethod
    def all_sum(t: torch.Tensor) -> torch.Tensor:
        return t

    @staticmethod
    def sum_gradients(params) -> None:
        return None


def reference_logprobs(policy, batch, micro_batch: int) -> torch.Tensor:
    """π_ref's per-token log-probs of every row of ``batch`` (no gradient), ``micro_batch`` rows per forward."""
    rows = batch.tokens.shape[0]
    return torch.cat([policy.logprobs(batch, slice(i, i + micro_batch), reference=True)
                      for i in range(0, rows, micro_batch)])


def update(policy, opt: torch.optim.Optimizer, batch, advantages: torch.Tensor, valid: torch.Tensor,
           s: UpdateSettings, ref: torch.Tensor | None = None, dist=None) -> dict:
    """``s.epochs`` optimisation epochs over ``batch``; only valid (non-failed) rows carry gradient.

    ``ref``: π_ref's log-probs of the batch (computed here when missing and ``kl_beta > 0``). With several
    processes, ``batch`` holds this rank's rows: the loss is normalised by the token / sequence counts of the
    whole batch, so the gradients summed over ranks equal the single-process gradient of the whole batch.
    """
    dist = dist or _Alone()
    rows = batch.tokens.shape[0]
    mask = batch.mask * valid[:, None].float()
    adv = advantages.to(torch.float32)
    if ref is None and s.kl_beta > 0:
        ref = reference_logprobs(policy, batch, s.micro_batch)
    tis, sampler_stats = None, {}
    sampler = getattr(getattr(batch, "context", None), "sampler_logprobs", None)   # kept by HFCaptioner.generate
    if sampler is not None:   # the old log-probs are the trainer's: the sampler's differ (vLLM, bf16)
        weights, sampler_stats = sampler_correction(batch.logprobs, sampler, mask, s.tis_cap)
        tis = weights if s.tis_cap > 0 else None
    counts = dist.all_sum(torch.stack([mask.sum(), (mask.sum(1) > 0).sum().float()]))
    total_tokens, n_seqs = counts.clamp(min=1)
    params = policy.trainable_parameters()
    stats: dict[str, float] = {}
    for _ in range(s.epochs):
        opt.zero_grad(set_to_none=True)
        agg = torch.zeros(len(_STATS) + 1, dtype=torch.float64)   # share-weighted stats, then "trained at all"
        for i in range(0, rows, s.micro_batch):
            sl = slice(i, i + s.micro_batch)
            m = mask[sl]
            if m.sum() == 0:
                continue
            logp = policy.logprobs(batch, sl)
            loss, st = policy_loss(logp, batch.logprobs[sl], adv[sl], m, None if ref is None else ref[sl],
                                   clip_low=s.clip_low, clip_high=s.clip_high, kl_beta=s.kl_beta,
                                   aggregation=s.aggregation, length_norm=s.length_norm,
                                   is_weights=None if tis is None else tis[sl])
            share = (m.sum() / total_tokens) if s.aggregation == "token-mean" else ((m.sum(1) > 0).sum() / n_seqs)
            (loss * share).backward()
            agg += torch.tensor([float(st[k]) * float(share) for k in _STATS] + [1.0], dtype=torch.float64)
        dist.sum_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        agg = dist.all_sum(agg)
        stats = {**(dict(zip(_STATS, agg.tolist())) if agg[-1] > 0 else {}), "grad_norm": float(grad_norm),
                 **sampler_stats}   # this rank's rows
    return stats
