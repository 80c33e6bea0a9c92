"""Clipped surrogate + k3 KL: gradients checked with autograd on leaf tensors, aggregations by hand."""

import math

import pytest
import torch

from acrl.core.loss import AGGREGATIONS, aggregate, policy_loss

T = torch.tensor


def assert_close(actual, expected, rtol=1e-6, atol=1e-9):
    """Like torch.testing.assert_close (whose first call costs ~1.5 s of imports), for same-shape tensors."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape and torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual, expected)


def leaf(x):
    return T(x, dtype=torch.float64, requires_grad=True)


def one_token(log_ratio, adv, **kw):
    """Loss and d loss / d logp for a single token with logp - old_logp = log_ratio."""
    logp = leaf([[log_ratio]])
    loss, st = policy_loss(logp, torch.zeros(1, 1, dtype=torch.float64), T([adv]), torch.ones(1, 1),
                           kl_beta=0.0, **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), st


# two captions of lengths 3 and 1 in T = 4 slots, advantages 2 and -1
MASK = T([[1.0, 1, 1, 0], [1.0, 0, 0, 0]])
ADV = T([2.0, -1.0])


def test_gradient_at_ratio_one_for_each_aggregation():
    # at logp == old_logp the ratio is 1, nothing is clipped and d l_it / d logp_it = -A_i;
    # the aggregation then divides: seq-mean-token-mean by len_i * N, seq-mean-token-sum by N,
    # token-mean by the total token count (4), seq-mean-token-sum-norm by T * N = 8
    old = torch.randn(2, 4, dtype=torch.float64)
    expected = {
        "seq-mean-token-mean": [[-2 / 6] * 3 + [0], [1 / 2, 0, 0, 0]],
        "seq-mean-token-sum": [[-2 / 2] * 3 + [0], [1 / 2, 0, 0, 0]],
        "token-mean": [[-2 / 4] * 3 + [0], [1 / 4, 0, 0, 0]],
        "seq-mean-token-sum-norm": [[-2 / 8] * 3 + [0], [1 / 8, 0, 0, 0]],
    }
    # loss values (per-token loss is -A_i):  mean(-2, 1) = -0.5;  (-6 + 1)/2 = -2.5;  (-6 + 1)/4 = -1.25;
    # (-6/4 + 1/4)/2 = -0.625   -> the four aggregations differ on uneven lengths
    losses = {"seq-mean-token-mean": -0.5, "seq-mean-token-sum": -2.5, "token-mean": -1.25,
              "seq-mean-token-sum-norm": -0.625}
    assert set(expected) == set(AGGREGATIONS)
    for agg, grad in expected.items():
        logp = old.clone().requires_grad_(True)
        loss, st = policy_loss(logp, old, ADV, MASK, aggregation=agg)
        loss.backward()
        assert loss.item() == pytest.approx(losses[agg]), agg
        assert_close(logp.grad, T(grad, dtype=torch.float64))
        assert st["clip_frac"] == 0.0 and st["ratio_mean"] == pytest.approx(1.0) and st["n_tokens"] == 4


def test_clipping_boundaries_and_gradient_direction():
    up, down, d = math.log(1.2), math.log(0.8), 1e-3
    # A > 0: ratio > 1.2 -> clipped, no gradient (no push further up); just inside -> gradient -A * ratio
    loss, g, st = one_token(up + d, 1.0)
    assert g == 0.0 and st["clip_frac"] == 1.0 and loss == pytest.approx(-1.2)
    loss, g, st = one_token(up - d, 1.0)
    assert g == pytest.approx(-math.exp(up - d)) and st["clip_frac"] == 0.0
    # A > 0, ratio < 0.8: the unclipped term is the smaller objective -> it is used, gradient flows
    loss, g, st = one_token(down - d, 1.0)
    assert g == pytest.approx(-math.exp(down - d)) and st["clip_frac"] == 0.0
    # A < 0: ratio < 0.8 -> clipped, no gradient (no push further down); just inside -> gradient +ratio
    loss, g, st = one_token(down - d, -1.0)
    assert g == 0.0 and st["clip_frac"] == 1.0 and loss == pytest.approx(0.8)
    loss, g, st = one_token(down + d, -1.0)
    assert g == pytest.approx(math.exp(down + d)) and st["clip_frac"] == 0.0
    # A < 0, ratio > 1.2: unclipped term, gradient flows (this is what dual-clip bounds)
    loss, g, st = one_token(up + d, -1.0)
    assert g == pytest.approx(math.exp(up + d)) and st["clip_frac"] == 0.0


def test_asymmetric_clip():
    # ratio 1.25, A > 0: clipped with clip_high = 0.2, free with clip_high = 0.28 (DAPO clip-higher)
    lr = math.log(1.25)
    assert one_token(lr, 1.0)[1] == 0.0
    loss, g, _ = one_token(lr, 1.0, clip_high=0.28)
    assert loss == pytest.approx(-1.25) and g == pytest.approx(-1.25)
    # the low side is untouched: ratio 0.75, A < 0 is clipped at 0.8 -> loss 0.8, no gradient
    loss, g, _ = one_token(math.log(0.75), -1.0, clip_high=0.28)
    assert loss == pytest.approx(0.8) and g == 0.0
    loss, g, _ = one_token(math.log(0.75), -1.0, clip_low=0.3)
    assert loss == pytest.approx(0.75) and g == pytest.approx(0.75)


def test_dual_clip():
    # A = -1, ratio e^2 = 7.39: loss max(7.39, 1.2) = 7.39, capped at -A * 3 = 3 -> no gradient
    loss, g, st = one_token(2.0, -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0) and g == 0.0 and st["dual_clip_frac"] == 1.0
    # ratio 2 < 3: not capped, gradient = ratio = 2
    loss, g, st = one_token(math.log(2.0), -1.0, dual_clip=3.0)
    assert loss == pytest.approx(2.0) and g == pytest.approx(2.0) and st["dual_clip_frac"] == 0.0
    # positive advantages are never dual-clipped
    assert one_token(2.0, 1.0, dual_clip=3.0)[0] == pytest.approx(-1.2)
    with pytest.raises(ValueError):
        one_token(0.0, 1.0, dual_clip=1.0)


def test_k3_kl():
    logp0 = torch.log(T([[0.5, 0.25]], dtype=torch.float64))
    mask = torch.ones(1, 2)
    # ref == logp: k3 = e^0 - 0 - 1 = 0, the loss equals the loss without a reference
    loss_ref, st = policy_loss(logp0, logp0, T([1.0]), mask, ref_logp=logp0, kl_beta=0.5)
    loss_none, _ = policy_loss(logp0, logp0, T([1.0]), mask)
    assert st["kl_mean"] == 0.0 and loss_ref.item() == pytest.approx(loss_none.item())
    # ref - logp = d = 0.5 on both tokens: k3 = e^0.5 - 0.5 - 1 = 0.148721 > 0
    # d k3 / d logp = 1 - e^d = -0.648721; with kl_beta 0.5 and token mean over 2 tokens: grad += 0.5 * that / 2
    logp = logp0.clone().requires_grad_(True)
    loss, st = policy_loss(logp, logp0, T([1.0]), mask, ref_logp=logp0 + 0.5, kl_beta=0.5)
    k3 = math.exp(0.5) - 1.5
    assert st["kl_mean"] == pytest.approx(k3) and k3 == pytest.approx(0.148721, abs=1e-6)
    assert loss.item() == pytest.approx(-1.0 + 0.5 * k3)
    loss.backward()
    assert_close(logp.grad, T([[-0.5 + 0.25 * (1 - math.exp(0.5))] * 2], dtype=torch.float64))
    # negative d is also penalised: k3(-0.5) = e^-0.5 + 0.5 - 1 = 0.106531
    _, st = policy_loss(logp0, logp0, T([1.0]), mask, ref_logp=logp0 - 0.5)
    assert st["kl_mean"] == pytest.approx(math.exp(-0.5) - 0.5)
    # kl_beta = 0: KL is reported but not in the loss
    loss, st = policy_loss(logp0, logp0, T([1.0]), mask, ref_logp=logp0 + 0.5, kl_beta=0.0)
    assert loss.item() == pytest.approx(-1.0) and st["kl_mean"] == pytest.approx(k3)


def test_padding_gets_zero_gradient_even_with_garbage():
    logp = leaf([[-1.0, -2.0, 1e4], [-0.5, float("nan"), float("-inf")]])
    old = T([[-1.1, -2.0, 0.0], [-0.4, 0.0, float("inf")]], dtype=torch.float64)
    ref = T([[-1.0, -1.5, float("nan")], [-0.5, 3.0, 0.0]], dtype=torch.float64)
    mask = T([[1, 1, 0], [1, 0, 0]])
    for agg in AGGREGATIONS:
        logp.grad = None
        loss, st = policy_loss(logp, old, T([1.0, -0.5]), mask, ref_logp=ref, aggregation=agg, dual_clip=3.0)
        loss.backward()
        assert torch.isfinite(loss) and all(math.isfinite(v) for v in st.values()), agg
        assert torch.isfinite(logp.grad).all()
        assert logp.grad[0, 2] == 0 and logp.grad[1, 1] == 0 and logp.grad[1, 2] == 0
        assert logp.grad[0, 0] != 0 and logp.grad[1, 0] != 0


def test_empty_mask_does_not_nan():
    logp = leaf([[0.0, 0.0], [0.0, 0.0]])
    for agg in AGGREGATIONS:
        logp.grad = None
        loss, st = policy_loss(logp, logp.detach(), T([1.0, -1.0]), torch.zeros(2, 2), ref_logp=logp.detach(),
                               aggregation=agg)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 2))
        assert all(math.isfinite(v) for v in st.values()) and st["n_tokens"] == 0
    # one empty sequence among non-empty ones: seq-mean runs over the non-empty sequence only
    assert aggregate(T([[3.0, 3.0], [5.0, 5.0]]), T([[1.0, 1.0], [0.0, 0.0]]), "seq-mean-token-mean").item() == 3.0


def test_clip_fraction_stat():
    # tokens' ratios 1.5, 1.0, 0.5, 1.1 with A = +1: only 1.5 is clipped -> clip_frac 1/4; ratio mean 1.025, max 1.5
    logp = torch.log(T([[1.5, 1.0, 0.5, 1.1]]))
    _, st = policy_loss(logp, torch.zeros(1, 4), T([1.0]), torch.ones(1, 4))
    assert st["clip_frac"] == pytest.approx(0.25)
    assert st["ratio_mean"] == pytest.approx(1.025) and st["ratio_max"] == pytest.approx(1.5)


def test_argument_checks():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 3), aggregation="sum")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        policy_loss(x, x, T([0.0, float("nan")]), torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        policy_loss(x, x[:, :2], torch.zeros(2), torch.ones(2, 3))


def _two_rank_gradient(logp, old, adv, mask, cut, widths, aggregation, length_norm=None):
    """The gradient the trainer forms over two ranks: rank k holds rows [cuts] padded to ``widths[k]`` and weighs its
    loss by its share of the batch's sequences (its gradient is then summed with the other rank's)."""
    grad = torch.zeros_like(logp)
    n_seqs = float((mask.sum(1) > 0).sum())
    for rows, w in zip((slice(0, cut), slice(cut, None)), widths):
        x = leaf(logp[rows, :w].tolist())
        loss, _ = policy_loss(x, old[rows, :w], adv[rows], mask[rows, :w], kl_beta=0.0, aggregation=aggregation,
                              length_norm=length_norm)
        (loss * float((mask[rows].sum(1) > 0).sum()) / n_seqs).backward()
        grad[rows, :w] = x.grad
    return grad


def test_sum_norm_gradient_over_ranks_equals_the_single_process_gradient():
    """seq-mean-token-sum-norm with a constant L: two ranks whose rollouts are padded to their own widths (3 and 5)
    sum to the single-process gradient over the batch padded to the generation cap (8). With the padded width as the
    normaliser they do not."""
    torch.manual_seed(0)
    mask = T([[1.0, 1, 1, 0, 0, 0, 0, 0], [1.0, 1, 0, 0, 0, 0, 0, 0], [1.0, 1, 1, 1, 1, 0, 0, 0],
              [1.0, 0, 0, 0, 0, 0, 0, 0]])
    logp, old = -torch.rand(4, 8, dtype=torch.float64) * mask, -torch.rand(4, 8, dtype=torch.float64) * mask
    adv = T([1.5, -0.5, 0.7, -1.2], dtype=torch.float64)
    x = leaf(logp.tolist())
    loss, _ = policy_loss(x, old, adv, mask, kl_beta=0.0, aggregation="seq-mean-token-sum-norm", length_norm=8)
    loss.backward()
    split = _two_rank_gradient(logp, old, adv, mask, 2, (3, 5), "seq-mean-token-sum-norm", length_norm=8)
    assert_close(split, x.grad)
    by_width = _two_rank_gradient(logp, old, adv, mask, 2, (3, 5), "seq-mean-token-sum-norm")
    assert not torch.allclose(by_width, x.grad)     # the padded-width normaliser: a different gradient per rank
    # without length_norm the width is used: a rollout padded to the cap gives the same loss as length_norm = cap
    same, _ = policy_loss(logp, old, adv, mask, kl_beta=0.0, aggregation="seq-mean-token-sum-norm")
    assert abs(float(same) - float(loss)) < 1e-12
    with pytest.raises(ValueError, match="length_norm"):
        aggregate(logp, mask, "seq-mean-token-sum-norm", length_norm=0)


def test_sampler_mismatch_stats_and_truncated_importance_weights():
    """The sampler's log-probs (vLLM: bf16, other kernels) differ from the trainer's: their per-token KL and largest
    ratio are measured, and truncated importance sampling weights each token by min(pi_old / mu, cap)."""
    from acrl.core.loss import sampler_correction

    old = T([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]], dtype=torch.float64)
    sampler = T([[-1.2, -1.5, -0.5], [-0.1, -4.0, 9.0]], dtype=torch.float64)
    mask = T([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    weights, stats = sampler_correction(old, sampler, mask, cap=2.0)
    r = torch.exp(old - sampler)
    k3 = r - 1 - (old - sampler)
    assert_close(weights, (r.clamp(max=2.0) * mask))
    assert stats["sampler_kl"] == pytest.approx(float((k3 * mask).sum() / mask.sum()))
    assert stats["sampler_ratio_max"] == pytest.approx(math.exp(1.0))         # padding is not counted
    assert stats["sampler_tis_frac"] == pytest.approx(1 / 5)                  # tokens whose weight was capped
    ones, _ = sampler_correction(old, sampler, mask, cap=0.0)                 # 0: measured, not corrected
    assert_close(ones, mask)

    logp = leaf([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    adv = T([1.0, -0.5], dtype=torch.float64)
    plain, _ = policy_loss(logp, old, adv, mask, kl_beta=0.0, aggregation="token-mean")
    (g_plain,) = torch.autograd.grad(plain, logp)
    tis, _ = policy_loss(logp, old, adv, mask, kl_beta=0.0, aggregation="token-mean", is_weights=weights)
    (g_tis,) = torch.autograd.grad(tis, logp)
    assert_close(g_tis, g_plain * weights)                                     # each token's gradient reweighted
