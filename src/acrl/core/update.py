"""One PPO-style update of a policy over a batch of sampled captions."""

from __future__ import annotations

import torch

from acrl.config import Config
from acrl.core.loss import policy_loss, sampler_correction
from acrl.rollout.protocols import Policy
from acrl.train.collect import reference_logprobs
from acrl.train.distributed import SINGLE, Dist

_STATS = ("loss", "kl_mean", "clip_frac", "ratio_mean")


def update(policy: Policy, opt: torch.optim.Optimizer, rollout, advantages: torch.Tensor, valid: torch.Tensor,
           cfg: Config, ref: torch.Tensor | None = None, dist: Dist = SINGLE) -> dict:
    """One or more optimisation epochs over the rollout; only valid (non-failed) caption rows carry gradient.

    ``ref``: π_ref's log-probs of the rollout (computed here when missing and ``kl_beta > 0``). With several
    processes, ``rollout`` holds this rank's rows: the loss is normalised by the token / sequence counts of the
    whole batch, so the gradients summed over ranks equal the single-process gradient of the whole batch.
    """
    tc = cfg.train
    rows = rollout.tokens.shape[0]
    mask = rollout.mask * valid[:, None].float()
    adv = advantages.to(torch.float32)
    if ref is None and tc.kl_beta > 0:
        ref = reference_logprobs(policy, rollout, tc.micro_batch)
    tis, sampler_stats = None, {}
    sampler = getattr(rollout, "sampler_logprobs", None)   # a Rollout's (a ReplyBatch has none)
    if sampler is not None:   # old log-probs recomputed: the sampler's differ (vLLM, bf16)
        weights, sampler_stats = sampler_correction(rollout.logprobs, sampler, mask, tc.tis_cap)
        tis = weights if tc.tis_cap > 0 else None
    counts = dist.all_sum(torch.stack([mask.sum(), (mask.sum(1) > 0).sum().float()]))
    total_tokens, n_seqs = counts.clamp(min=1)
    params = policy.trainable_parameters()
    stats: dict[str, float] = {}
    for _ in range(tc.epochs):
        opt.zero_grad(set_to_none=True)
        agg = torch.zeros(len(_STATS) + 1, dtype=torch.float64)   # share-weighted stats, then "trained at all"
        for i in range(0, rows, tc.micro_batch):
            sl = slice(i, i + tc.micro_batch)
            m = mask[sl]
            if m.sum() == 0:
                continue
            logp = policy.logprobs(rollout, sl)
            loss, st = policy_loss(logp, rollout.logprobs[sl], adv[sl], m, None if ref is None else ref[sl],
                                   clip_low=tc.clip_low, clip_high=tc.clip_high, kl_beta=tc.kl_beta,
                                   aggregation=tc.aggregation, length_norm=cfg.captioner.max_new_tokens,
                                   is_weights=None if tis is None else tis[sl])
            share = (m.sum() / total_tokens) if tc.aggregation == "token-mean" else ((m.sum(1) > 0).sum() / n_seqs)
            (loss * share).backward()
            agg += torch.tensor([float(st[k]) * float(share) for k in _STATS] + [1.0], dtype=torch.float64)
        dist.sum_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        agg = dist.all_sum(agg)
        stats = {**(dict(zip(_STATS, agg.tolist())) if agg[-1] > 0 else {}), "grad_norm": float(grad_norm),
                 **sampler_stats}   # this rank's rows
    return stats


def _call_hook(policy: Policy, name: str, *args) -> None:
    """Call ``policy.<name>(*args)`` if the policy defines it (``before_update`` / ``after_update`` /
    ``set_sampling_seed``)."""
    hook = getattr(policy, name, None)
    if callable(hook):
        hook(*args)
