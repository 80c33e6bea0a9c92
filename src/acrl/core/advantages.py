"""Group-relative advantages: BNPO (Beta normalisation), its advantage decomposition, GRPO, RLOO, REINFORCE.

Every function takes group-shaped rewards ``R: Tensor[G, M]`` (G problems x M sampled captions each) and an
optional ``mask: Tensor[G, M] bool`` (False = failed episode: it is left out of every statistic of its group and
gets advantage 0). Groups may hold different numbers of valid samples; a group with fewer than two valid samples
has no baseline to compare against and gets advantage 0. Outputs have the shape of ``R`` and are always finite.

BNPO (Xiao, Zhang, Cao, arXiv 2506.02864; official code ``recipe/bnpo/src/bnpo_ray_trainer.py::
compute_bnpo_outcome_advantage``) divides the group-centred reward by a Beta density of the group's success rate:

    s_i   = (R_i - min_value) / (max_value - min_value)                     rescale to [0, 1]
    p_g   = mean_{i in g} s_i                                               Monte-Carlo success rate of group g
    mu    = mean_g p_g,   var = sum_g (p_g - mu)^2 / (n_groups - 1)         over the batch, unbiased
    k     = mu (1 - mu) / var - 1,   a = k mu,   b = k (1 - mu)             method of moments, p ~ Beta(a, b)
    alpha = max(1, 1 + a/3),   beta = max(1, 1 + b/3)                       variance-optimal normaliser
    w_g   = min(1 / Beta_pdf(p_g; alpha, beta), max_weight)                 cap 1e6 as in the official code
    A_i   = w_g (s_i - p_g)

Special cases: alpha = beta = 1 is REINFORCE with the group-mean baseline (w = 1); alpha = beta = 3/2 gives
Beta_pdf(p) = sqrt(p(1-p)) / B(3/2, 3/2), so for binary rewards A = (pi/8) (R - p) / std_Bernoulli, i.e. GRPO
up to the constant B(3/2, 3/2) = pi/8.

Guards the official code lacks (all documented in the reference notes, section 5.3): the Beta fit falls back to
alpha = beta = 1 when fewer than two groups enter it or when var is zero / tiny / non-finite (the official code
would produce NaN); the density is evaluated in log-space with ``xlogy`` so that p = 0 or 1 gives a weight of
``max_weight`` (and advantage 0, since every reward in such a group equals p) instead of inf * 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

METHODS = ("bnpo", "bnpo_decomposed", "grpo", "rloo", "reinforce")
GRPO_SCALES = ("group", "batch", "none")
VAR_EPS = 1e-12  # below this the batch variance of p_g is treated as zero (Beta fit falls back to uniform)


# --- shared helpers ----------------------------------------------------------------------------------------------


def _prepare(rewards: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate shapes; return (rewards as float64 with invalid slots zeroed, bool mask, n_valid[G], mean[G])."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G, M], got shape {tuple(rewards.shape)}")
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    elif mask.shape != rewards.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != rewards shape {tuple(rewards.shape)}")
    mask = mask.to(torch.bool)
    r = torch.where(mask, rewards.to(torch.float64), 0.0)
    n = mask.sum(dim=1).to(torch.float64)
    mean = r.sum(dim=1) / n.clamp(min=1.0)
    return r, mask, n, mean


def _out_dtype(rewards: Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()


def _non_uniform(r: Tensor, mask: Tensor, tol: float = 1e-8) -> Tensor:
    """Per group: True if its valid rewards are not all equal (within tol)."""
    hi = torch.where(mask, r, -math.inf).amax(dim=1)
    lo = torch.where(mask, r, math.inf).amin(dim=1)
    return (hi - lo) > tol


def _finish(adv: Tensor, r: Tensor, mask: Tensor, n: Tensor, rewards: Tensor) -> Tensor:
    """Zero the advantage of invalid samples, of groups with < 2 valid samples and of uniform groups (all valid
    rewards equal: zero in exact arithmetic, made exactly zero here); cast back to the input dtype."""
    keep = mask & ((n >= 2) & _non_uniform(r, mask)).unsqueeze(1)
    return torch.where(keep, adv, 0.0).to(_out_dtype(rewards))


def _abs_mean(adv: Tensor, mask: Tensor) -> float:
    return float(adv.abs().masked_select(mask).mean()) if bool(mask.any()) else 0.0


# --- BNPO ---------------------------------------------------------------------------------------------------------


def fit_beta(p_hat: Tensor) -> tuple[float, float, float, float, bool]:
    """Method-of-moments Beta fit of the per-group success rates and BNPO's normaliser parameters.

    Returns ``(alpha, beta, mu, var, fallback)`` with mu the mean and var the unbiased variance of ``p_hat`` and
    alpha = max(1, 1 + a/3), beta = max(1, 1 + b/3), a = k mu, b = k (1 - mu), k = mu (1 - mu)/var - 1.
    ``fallback`` is True (and alpha = beta = 1) when there are fewer than two groups or var <= VAR_EPS or the
    fit is not finite. A negative k (var > mu(1-mu), possible with the unbiased estimator) gives alpha = beta = 1
    through the clamp, as in the official code.
    """
    p = p_hat.to(torch.float64).flatten()
    if p.numel() == 0:
        return 1.0, 1.0, 0.0, 0.0, True
    mu = float(p.mean())
    if p.numel() < 2:
        return 1.0, 1.0, mu, 0.0, True
    var = float(p.var(unbiased=True))
    if not math.isfinite(var) or var <= VAR_EPS:
        return 1.0, 1.0, mu, var if math.isfinite(var) else 0.0, True
    k = mu * (1.0 - mu) / var - 1.0
    alpha, beta = max(1.0, 1.0 + k * mu / 3.0), max(1.0, 1.0 + k * (1.0 - mu) / 3.0)
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        return 1.0, 1.0, mu, var, True
    return alpha, beta, mu, var, False


def beta_log_pdf(p: Tensor, alpha: float, beta: float) -> Tensor:
    """log Beta_pdf(p; alpha, beta) = (alpha-1) log p + (beta-1) log(1-p) - log B(alpha, beta).

    Uses ``xlogy`` / ``xlog1py`` so that 0 * log 0 = 0 (alpha = 1 or beta = 1 at the end points) and p = 0 or 1
    with alpha, beta > 1 gives -inf (density 0) rather than NaN.
    """
    log_b = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    a1 = torch.full_like(p, alpha - 1.0)
    b1 = torch.full_like(p, beta - 1.0)
    return torch.special.xlogy(a1, p) + torch.special.xlog1py(b1, -p) - log_b


def bnpo_advantages(
    rewards: Tensor,
    mask: Tensor | None = None,
    min_value: float = 0.0,
    max_value: float = 1.0,
    max_weight: float = 1e6,
    alpha: float | None = None,
    beta: float | None = None,
) -> tuple[Tensor, dict]:
    """BNPO advantages A_i = min(1 / Beta_pdf(p_g; alpha, beta), max_weight) * (s_i - p_g) (see module docstring).

    Which groups enter the Beta fit: every group with at least one valid sample. Without a mask this is every
    group of the batch, exactly as in the official code (uniform 0/1 groups included, they shape mu and var).
    Groups whose samples all failed have no p_g and are left out; a group with one valid sample enters the fit
    with p_g = its reward (the official code's p_g = 0 for size-1 groups is a quirk not reproduced) but, like every
    group with < 2 valid samples, gets advantage 0.

    ``alpha`` / ``beta`` override the fitted normaliser parameters (e.g. 1, 1 for REINFORCE or 1.5, 1.5 for
    GRPO-like scaling). Advantages are in rescaled units (rewards divided by max_value - min_value).

    Returns ``(advantages[G, M], stats)`` with stats ``alpha, beta, mu, var, fallback`` (1.0 when the uniform
    fallback was used), ``n_fit_groups``, ``adv_abs_mean`` (over valid samples) and ``weight_max`` (largest weight
    among groups with >= 2 valid samples and non-identical rewards, i.e. groups that carry signal; 0 if none).
    """
    if not max_value > min_value:
        raise ValueError(f"max_value ({max_value}) must exceed min_value ({min_value})")
    if not (math.isfinite(max_weight) and max_weight > 0):
        raise ValueError(f"max_weight must be finite and positive, got {max_weight}")
    r, mask, n, _ = _prepare(rewards, mask)
    valid = r.masked_select(mask)
    tol = 1e-6 * (max_value - min_value)  # float round-off (e.g. 0.7 + 0.3 in float32) is not an error
    bad = valid[~((valid >= min_value - tol) & (valid <= max_value + tol))]  # also catches NaN
    if bad.numel():
        raise ValueError(
            f"reward {bad[0].item()!r} outside [min_value, max_value] = [{min_value}, {max_value}]; "
            "adjust min_value / max_value so that every reward rescales into [0, 1]"
        )
    s = torch.where(mask, ((r - min_value) / (max_value - min_value)).clamp(0.0, 1.0), 0.0)
    p_hat = (s.sum(dim=1) / n.clamp(min=1.0)).clamp(0.0, 1.0)

    fit = n >= 1
    fa, fb, mu, var, fallback = fit_beta(p_hat[fit])
    a = fa if alpha is None else float(alpha)
    b = fb if beta is None else float(beta)
    if a <= 0 or b <= 0:
        raise ValueError(f"Beta parameters must be positive, got alpha={a}, beta={b}")

    log_w = (-beta_log_pdf(p_hat, a, b)).clamp(max=math.log(max_weight))  # weight = min(1/pdf, max_weight)
    w = torch.exp(log_w)  # pdf = inf (only with alpha or beta < 1) gives log_w = -inf -> w = 0, still finite
    adv = _finish(w.unsqueeze(1) * (s - p_hat.unsqueeze(1)), s, mask, n, rewards)

    signal = (n >= 2) & _non_uniform(s, mask)
    stats = {
        "alpha": a,
        "beta": b,
        "mu": mu,
        "var": var,
        "fallback": float(fallback and alpha is None and beta is None),
        "n_fit_groups": float(fit.sum()),
        "adv_abs_mean": _abs_mean(adv, mask),
        "weight_max": float(w[signal].max()) if bool(signal.any()) else 0.0,
    }
    return adv, stats


def bnpo_decomposed_advantages(
    components: Tensor,
    weights: Sequence[float],
    mask: Tensor | None = None,
    **bnpo_kw,
) -> tuple[Tensor, dict]:
    """BNPO advantage decomposition: one BNPO per reward component, combined with the reward's own weights.

    ``components: Tensor[G, M, K]`` holds each component in [0, 1] (usually a 0/1 indicator) and the scalar
    reward is R = sum_k weights[k] * components[..., k]. Each component gets its own Beta fit and advantage A_k
    (``bnpo_advantages`` with min 0, max 1); the combination is the weighted mean

        A = sum_k weights[k] * A_k / sum_k weights[k].

    Why this and not the official code's plain mean (sum_k A_k / K): the official code decomposes accuracy and
    format rewards of equal weight 1, where both coincide. For the tiered reward R = 0.7 * correct +
    0.3 * direct_correct a plain mean would treat "correct" and "without clarification" as equally important
    (effectively alpha = 0.5). The weighted mean keeps the reward's tiers: when every fit is uniform
    (alpha = beta = 1) it equals exactly (R - p_R) / sum(weights), i.e. BNPO / REINFORCE on the total reward
    rescaled to [0, 1]; with sum(weights) = 1 the advantage is in reward units.

    A component constant across the whole batch has var = 0, falls back to alpha = beta = 1 and contributes
    weights[k] * (c - p_g) = 0 with no NaN (the official code would produce NaN here).

    ``bnpo_kw`` go to every per-component call (``max_weight``, ``alpha``/``beta`` overrides). Stats: the
    per-component BNPO stats under ``"<key>/<k>"`` plus the combined ``adv_abs_mean``.
    """
    if components.dim() != 3:
        raise ValueError(f"components must be [G, M, K], got shape {tuple(components.shape)}")
    k_comp = components.shape[-1]
    w = [float(x) for x in weights]
    if len(w) != k_comp:
        raise ValueError(f"{len(w)} weights for {k_comp} components")
    if any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be finite, non-negative and sum to > 0, got {w}")
    total = torch.zeros(components.shape[:2], dtype=torch.float64, device=components.device)
    stats: dict = {}
    for k in range(k_comp):
        a_k, s_k = bnpo_advantages(components[..., k], mask, min_value=0.0, max_value=1.0, **bnpo_kw)
        total = total + w[k] * a_k.to(torch.float64)
        stats.update({f"{key}/{k}": val for key, val in s_k.items()})
    adv = (total / sum(w)).to(_out_dtype(components))
    _, valid, _, _ = _prepare(components[..., 0], mask)
    stats["adv_abs_mean"] = _abs_mean(adv, valid)
    return adv, stats




# --- GRPO, RLOO, REINFORCE ----------------------------------------------------------------------------------------


def grpo_advantages(
    rewards: Tensor, mask: Tensor | None = None, eps: float = 1e-4, scale: str = "group"
) -> tuple[Tensor, dict]:
    """GRPO: A_i = (R_i - mean_g) / (std + eps), stds unbiased (N - 1), as in TRL.

    ``scale``: ``"group"`` divides by the group's std, ``"batch"`` by the std of all valid rewards of the batch,
    ``"none"`` does not divide (Dr. GRPO, arXiv 2503.20783: A_i = R_i - mean_g).
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"unknown GRPO scale {scale!r}; expected one of {GRPO_SCALES}")
    r, mask, n, mean = _prepare(rewards, mask)
    centred = torch.where(mask, r - mean.unsqueeze(1), 0.0)
    if scale == "group":
        denom = (centred.pow(2).sum(dim=1) / (n - 1).clamp(min=1.0)).sqrt().unsqueeze(1) + eps
    elif scale == "batch":
        valid = r.masked_select(mask)
        denom = (valid.std(unbiased=True) if valid.numel() > 1 else valid.new_zeros(())) + eps
    else:
        denom = torch.ones((), dtype=r.dtype, device=r.device)
    denom = torch.where(denom > 0, denom, 1.0)  # eps = 0 with a zero std: those groups are uniform -> A = 0
    adv = _finish(centred / denom, r, mask, n, rewards)
    return adv, {"adv_abs_mean": _abs_mean(adv, mask)}


def rloo_advantages(rewards: Tensor, mask: Tensor | None = None) -> tuple[Tensor, dict]:
    """RLOO: A_i = R_i - (sum_{j in g, j != i} R_j) / (n_g - 1) = n_g / (n_g - 1) * (R_i - mean_g)."""
    r, mask, n, _ = _prepare(rewards, mask)
    others = (r.sum(dim=1, keepdim=True) - r) / (n - 1).clamp(min=1.0).unsqueeze(1)
    adv = _finish(r - others, r, mask, n, rewards)
    return adv, {"adv_abs_mean": _abs_mean(adv, mask)}


def reinforce_advantages(rewards: Tensor, mask: Tensor | None = None) -> tuple[Tensor, dict]:
    """REINFORCE with the group-mean baseline, no scaling: A_i = R_i - mean_g (BNPO with alpha = beta = 1)."""
    r, mask, n, mean = _prepare(rewards, mask)
    adv = _finish(r - mean.unsqueeze(1), r, mask, n, rewards)
    return adv, {"adv_abs_mean": _abs_mean(adv, mask)}


# --- dispatch and diagnostics -------------------------------------------------------------------------------------


def compute_advantages(
    rewards: Tensor,
    method: str,
    mask: Tensor | None = None,
    components: Tensor | None = None,
    weights: Sequence[float] | None = None,
    **kw,
) -> tuple[Tensor, dict]:
    """Advantages by name: ``bnpo``, ``bnpo_decomposed``, ``grpo``, ``rloo`` or ``reinforce``.

    ``kw`` go to the chosen function. ``bnpo_decomposed`` needs ``components`` and ``weights`` and checks that
    ``rewards`` equals sum_k weights[k] * components[..., k] on valid samples (catches a reward / tier mismatch).
    The stats always include the group diagnostics of ``group_diagnostics`` on ``rewards``.
    """
    if method == "bnpo":
        adv, stats = bnpo_advantages(rewards, mask, **kw)
    elif method == "bnpo_decomposed":
        if components is None or weights is None:
            raise ValueError("method 'bnpo_decomposed' needs components and weights (see tiered_components)")
        recon = (components.to(torch.float64) * torch.tensor(weights, dtype=torch.float64,
                                                              device=components.device)).sum(-1)
        _, m, _, _ = _prepare(rewards, mask)
        gap = (recon - rewards.to(torch.float64)).abs().masked_select(m)
        if gap.numel() and not bool((gap <= 1e-6).all()):
            raise ValueError(f"rewards != sum_k weights[k] * components[..., k] (max gap {float(gap.max()):.3g})")
        adv, stats = bnpo_decomposed_advantages(components, weights, mask, **kw)
    elif method == "grpo":
        adv, stats = grpo_advantages(rewards, mask, **kw)
    elif method == "rloo":
        adv, stats = rloo_advantages(rewards, mask, **kw)
    elif method == "reinforce":
        adv, stats = reinforce_advantages(rewards, mask, **kw)
    else:
        raise ValueError(f"unknown advantage method {method!r}; expected one of {METHODS}")
    stats.update(group_diagnostics(rewards, mask))
    return adv, stats


def group_diagnostics(rewards: Tensor, mask: Tensor | None = None) -> dict:
    """Uniform-reward diagnostics (AC-RL App. C): groups whose valid rewards are all equal carry no gradient.

    Only groups with >= 1 valid sample count; a group with a single valid sample counts as uniform. Returns
    ``n_groups``, ``n_uniform``, ``n_all_zero`` (uniform at reward 0), ``uniform_frac`` and ``all_zero_frac``.
    """
    r, mask, n, _ = _prepare(rewards, mask)
    present = n >= 1
    uniform = present & ~_non_uniform(r, mask)
    all_zero = uniform & (torch.where(mask, r.abs(), 0.0).amax(dim=1) <= 1e-8)
    g = int(present.sum())
    return {
        "n_groups": g,
        "n_uniform": int(uniform.sum()),
        "n_all_zero": int(all_zero.sum()),
        "uniform_frac": int(uniform.sum()) / max(g, 1),
        "all_zero_frac": int(all_zero.sum()) / max(g, 1),
    }

