"""PPO-style clipped surrogate with a k3 KL penalty to the frozen reference, over caption tokens.

For caption i with sequence advantage A_i and token t (mask m_it = 1 for caption tokens incl. EOS):

    r_it  = exp(logp_it - old_logp_it)                                       importance ratio
    pg_it = max(-A_i r_it, -A_i clip(r_it, 1 - clip_low, 1 + clip_high))     = -min(r A, clip(r) A)
    pg_it = min(pg_it, -A_i * dual_clip)            if A_i < 0 and dual_clip  (dual-clip, Ye et al. 2020)
    d_it  = ref_logp_it - logp_it
    kl_it = exp(d_it) - d_it - 1                                             k3 estimator of KL(pi || ref), >= 0
    l_it  = pg_it + kl_beta * kl_it

The per-token loss l is then aggregated (``aggregation``):

    "seq-mean-token-mean"      mean_i [ sum_t m l / sum_t m ]                GRPO (each caption weighs the same)
    "seq-mean-token-sum"       mean_i [ sum_t m l ]                          BNPO run.sh (verl loss_agg_mode)
    "token-mean"               sum_it m l / sum_it m                         DAPO (each token weighs the same)
    "seq-mean-token-sum-norm"  mean_i [ sum_t m l / L ]                      Dr. GRPO (constant length normaliser)

L (``length_norm``) is a constant: the generation cap (``captioner.max_new_tokens``). It must not be the padded
width of a batch, which changes per step, per micro-batch and per rank (then the gradients summed over ranks are
not the single-process gradient); without ``length_norm`` the width ``mask.shape[1]`` is used, which is the cap
for rollouts padded to it (every backend pads its rollouts to ``max_new_tokens``).

"mean_i" runs over sequences with at least one token; an all-padding batch gives loss 0 (with a gradient of
zeros), never NaN. Log-ratios are clamped to [-20, 20] before exp (as verl does) and padding positions are
replaced by 0 before any arithmetic, so garbage (even inf / NaN) in padded log-probs gets zero gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("seq-mean-token-mean", "seq-mean-token-sum", "token-mean", "seq-mean-token-sum-norm")
LOG_RATIO_CLAMP = 20.0


def aggregate(loss: Tensor, mask: Tensor, aggregation: str, length_norm: int | None = None) -> Tensor:
    """Reduce a per-token loss [N, T] to a scalar with one of ``AGGREGATIONS`` (see module docstring).

    ``length_norm``: the constant L of ``seq-mean-token-sum-norm`` (default: ``mask.shape[1]``)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    if length_norm is not None and length_norm < 1:
        raise ValueError(f"length_norm must be >= 1, got {length_norm}")
    loss = torch.where(mask.to(torch.bool), loss, 0.0)
    if aggregation == "token-mean":
        return loss.sum() / mask.sum().clamp(min=1.0)
    lengths = mask.sum(dim=1)
    seq = loss.sum(dim=1)
    if aggregation == "seq-mean-token-mean":
        seq = seq / lengths.clamp(min=1.0)
    elif aggregation == "seq-mean-token-sum-norm":
        seq = seq / (length_norm or mask.shape[1])
    return seq.sum() / (lengths > 0).sum().clamp(min=1)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_beta: float = 0.02,
    aggregation: str = "seq-mean-token-mean",
    dual_clip: float | None = None,
    length_norm: int | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Clipped surrogate + kl_beta * k3 KL, aggregated over caption tokens (formulas in the module docstring).

    Args:
        logp: [N, T] log-probs of the sampled caption tokens under the current policy (carries the gradient).
        old_logp: [N, T] the same under the sampling policy (no gradient is taken through it).
        advantages: [N] one advantage per caption, broadcast over its tokens.
        mask: [N, T] 1 for caption tokens (incl. EOS), 0 for padding.
        ref_logp: [N, T] frozen-reference log-probs; the KL term enters the loss only if given and kl_beta > 0
            (if given with kl_beta = 0 it is still reported in the stats).
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high] (asymmetric, DAPO-style).
        dual_clip: if set (> 1), the loss of a negative-advantage token is capped at -A * dual_clip.
        length_norm: the constant normaliser of ``seq-mean-token-sum-norm`` (the generation cap); default: the
            padded width ``T``.
        is_weights: [N, T] per-token weights of the surrogate (truncated importance sampling between the sampler
            and the trainer, :func:`sampler_correction`); no gradient is taken through them.

    Returns ``(loss, stats)``; stats are floats: ``loss``, ``pg_loss``, ``kl_loss`` (aggregated like the loss),
    ``kl_mean`` (token mean of k3), ``clip_frac`` (share of tokens whose clipped branch is active, i.e. the
    gradient is cut), ``dual_clip_frac``, ``ratio_mean``, ``ratio_max`` (over valid tokens) and ``n_tokens``.
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, old_logp, mask must share shape [N, T]; got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} != logp shape {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [N] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    if not bool(torch.isfinite(advantages).all()):
        raise ValueError("advantages contain NaN or inf")
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")

    dtype = torch.promote_types(logp.dtype, torch.float32)  # bf16 / fp16 log-probs are upcast (token counts)
    logp, old_logp = logp.to(dtype), old_logp.to(dtype)
    ref_logp = None if ref_logp is None else ref_logp.to(dtype)
    valid = mask.to(torch.bool)
    m = valid.to(dtype)
    adv = advantages.to(dtype).unsqueeze(1)

    log_ratio = torch.where(valid, logp - old_logp.detach(), 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    clipped = valid & (pg_clipped > pg_unclipped)
    dual = torch.zeros_like(valid)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual = valid & (adv < 0) & (pg > cap)
        pg = torch.where(adv < 0, torch.minimum(pg, cap), pg)

    if is_weights is not None:
        pg = pg * is_weights.detach().to(dtype)

    if ref_logp is not None:  # computed for the stats even when kl_beta = 0
        d = torch.where(valid, ref_logp.detach() - logp, 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.exp(d) - d - 1.0
    else:
        kl = torch.zeros_like(pg)

    loss = aggregate(pg + kl_beta * kl if (ref_logp is not None and kl_beta > 0) else pg, m, aggregation,
                     length_norm)

    with torch.no_grad():
        n_tok = float(m.sum())
        denom = max(n_tok, 1.0)
        r_valid = ratio.detach().masked_select(valid)
        stats = {
            "loss": float(loss),
            "pg_loss": float(aggregate(pg.detach(), m, aggregation, length_norm)),
            "kl_loss": float(aggregate(kl.detach(), m, aggregation, length_norm)),
            "kl_mean": float((kl.detach() * m).sum()) / denom,
            "clip_frac": float(clipped.sum()) / denom,
            "dual_clip_frac": float(dual.sum()) / denom,
            "ratio_mean": float(r_valid.mean()) if r_valid.numel() else 1.0,
            "ratio_max": float(r_valid.max()) if r_valid.numel() else 1.0,
            "n_tokens": n_tok,
        }
    return loss, stats


def sampler_correction(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float = 0.0) -> tuple[Tensor, dict]:
    """The gap between the sampler (e.g. vLLM: bf16, its own kernels) and the trainer's old log-probs on the sampled
    tokens, and truncated importance sampling over it (TIS, as TRL's ``vllm_importance_sampling_correction``).

    With ``r = pi_old / mu = exp(old_logp - sampler_logp)`` per token: weights ``min(r, cap)`` on caption tokens
    (``cap`` 0: all 1, the gap is only measured), and stats ``sampler_kl`` (token mean of the k3 estimate
    ``r - 1 - log r`` of KL(mu || pi_old)), ``sampler_ratio_max`` and ``sampler_tis_frac`` (share of tokens whose
    weight was capped).
    """
    valid = mask.to(torch.bool)
    m = valid.to(old_logp.dtype)
    log_r = torch.where(valid, old_logp - sampler_logp, 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    r = torch.exp(log_r)
    weights = (r.clamp(max=cap) if cap > 0 else torch.ones_like(r)) * m
    denom = max(float(m.sum()), 1.0)
    r_valid = r.masked_select(valid)
    stats = {"sampler_kl": float(((r - 1.0 - log_r) * m).sum()) / denom,
             "sampler_ratio_max": float(r_valid.max()) if r_valid.numel() else 1.0,
             "sampler_tis_frac": float((valid & (r > cap)).sum()) / denom if cap > 0 else 0.0}
    return weights, stats
