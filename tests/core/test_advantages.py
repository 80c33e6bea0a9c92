"""Hand-checked values for BNPO, its decomposition, GRPO, RLOO, REINFORCE and the uniform-group diagnostics."""

import math

import pytest
import torch

from acrl.core.advantages import (
    METHODS,
    bnpo_advantages,
    bnpo_decomposed_advantages,
    compute_advantages,
    fit_beta,
    group_diagnostics,
    grpo_advantages,
    reinforce_advantages,
    rloo_advantages,
)
from acrl.core.reward import tiered_components

T = torch.tensor


def assert_close(actual, expected, rtol=1e-6, atol=1e-9):
    """Like torch.testing.assert_close (whose first call costs ~1.5 s of imports), for same-shape tensors."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape and torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual, expected)

# The reference notes' demo batch: 4 problems x 8 tiered rewards (1 direct, 0.7 after clarification, 0 wrong).
#   4.4/8 = 0.55,   0/8 = 0,   7.7/8 = 0.9625,   1.4/8 = 0.175
DEMO = T([
    [1, 1, 1, 0.7, 0.7, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 0.7],
    [0.7, 0.7, 0, 0, 0, 0, 0, 0],
], dtype=torch.float64)


def beta_pdf(p, a, b):
    """Beta density written out by hand: p^(a-1) (1-p)^(b-1) Gamma(a+b) / (Gamma(a) Gamma(b))."""
    return p ** (a - 1) * (1 - p) ** (b - 1) * math.gamma(a + b) / (math.gamma(a) * math.gamma(b))


# --- BNPO ---------------------------------------------------------------------------------------------------------


def test_worked_example_beta_fit():
    # mu  = (0.55 + 0 + 0.9625 + 0.175)/4 = 1.6875/4 = 0.421875
    # dev = 0.128125, -0.421875, 0.540625, -0.246875
    # var = (0.016416 + 0.177979 + 0.292275 + 0.060947)/3 = 0.547617/3 = 0.182539   (unbiased)
    # k   = mu(1-mu)/var - 1 = 0.243896/0.182539 - 1 = 0.336129
    # a = k mu = 0.141806 -> alpha = 1 + a/3 = 1.047269;  b = k(1-mu) = 0.194323 -> beta = 1 + b/3 = 1.064774
    adv, st = bnpo_advantages(DEMO)
    assert st["mu"] == pytest.approx(0.421875)
    assert st["var"] == pytest.approx(0.547617 / 3, abs=1e-6)
    assert st["alpha"] == pytest.approx(1.047269, abs=1e-5)
    assert st["beta"] == pytest.approx(1.064774, abs=1e-5)
    assert st["fallback"] == 0.0 and st["n_fit_groups"] == 4
    # the lone 0.7 of the near-saturated group: (0.7 - 0.9625)/pdf(0.9625) = -0.2625/0.9015 = -0.2912
    # (GRPO scales the same sample to -2.47, see test_grpo_worked_example)
    a, b = st["alpha"], st["beta"]
    assert adv[2, 7].item() == pytest.approx(-0.2625 / beta_pdf(0.9625, a, b), rel=1e-9)
    assert adv[2, 7].item() == pytest.approx(-0.2912, abs=1e-4)
    # first group: 1 - 0.55 = 0.45 times 1/pdf(0.55)
    assert adv[0, 0].item() == pytest.approx(0.45 / beta_pdf(0.55, a, b), rel=1e-9)
    # the all-zero group has p = 0: pdf(0) = 0 -> weight capped, advantage exactly 0
    assert torch.equal(adv[1], torch.zeros(8, dtype=torch.float64))
    # weights of the groups with signal are ~1 (0.97 - 1.11); adv_abs_mean is over all 32 samples
    assert 1.0 < st["weight_max"] < 1.12
    assert st["adv_abs_mean"] == pytest.approx(adv.abs().mean().item())


def test_weight_cap_default_and_custom():
    # alpha = beta = 50 at p = 1/8: pdf = 0.125^49 0.875^49 / B(50, 50) ~ 1e-23 -> 1/pdf >> 1e6 -> weight = 1e6
    r = T([[1.0, 0, 0, 0, 0, 0, 0, 0], [1.0, 1, 0, 0, 0, 0, 0, 0]])
    adv, st = bnpo_advantages(r, alpha=50.0, beta=50.0)
    assert adv[0, 0].item() == pytest.approx(1e6 * 0.875)  # 875000
    assert adv[0, 1].item() == pytest.approx(-1e6 * 0.125)  # -125000
    assert st["weight_max"] == pytest.approx(1e6)
    adv2, _ = bnpo_advantages(r, alpha=50.0, beta=50.0, max_weight=2.0)
    assert adv2[0].tolist() == pytest.approx([2 * 0.875] + [2 * -0.125] * 7)
    with pytest.raises(ValueError):
        bnpo_advantages(r, max_weight=math.inf)


def test_saturated_groups_give_finite_zero_advantage():
    # p = 0 and p = 1 with alpha, beta > 1: pdf = 0, 1/pdf = inf -> capped, times (R - p) = 0 -> 0, never NaN
    r = T([[0.0, 0, 0, 0], [1.0, 1, 1, 1], [1.0, 0, 0, 0], [1.0, 1, 0, 0]])
    adv, _ = bnpo_advantages(r, alpha=3.0, beta=3.0)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:2], torch.zeros(2, 4))


def test_zero_variance_falls_back_to_reinforce():
    # every group has mean 0.5 -> var = 0 (the official code divides by zero) -> alpha = beta = 1, A = R - 0.5
    r = T([[1.0, 0, 1, 0], [0.0, 1, 1, 0], [1.0, 1, 0, 0]])
    adv, st = bnpo_advantages(r)
    assert (st["alpha"], st["beta"], st["fallback"], st["var"]) == (1.0, 1.0, 1.0, 0.0)
    assert torch.equal(adv, r - 0.5)


def test_single_group_falls_back():
    # one group: no unbiased variance -> alpha = beta = 1, A = R - mean = R - 0.425 (mean of 1, 0.7, 0, 0)
    r = T([[1.0, 0.7, 0, 0]])
    adv, st = bnpo_advantages(r)
    assert st["fallback"] == 1.0 and st["alpha"] == st["beta"] == 1.0
    assert adv[0].tolist() == pytest.approx([0.575, 0.275, -0.425, -0.425])


def test_all_uniform_batch_gives_zero_advantages():
    for r in (torch.zeros(4, 8), torch.ones(4, 8), T([[0.0] * 8, [1.0] * 8, [0.7] * 8])):
        for method in ("bnpo", "grpo", "rloo", "reinforce"):
            adv, _ = compute_advantages(r, method)
            assert torch.equal(adv, torch.zeros_like(r)), method
    # all-zero + all-one groups: mu = 0.5, var = 0.5 > mu(1-mu) = 0.25 -> k = -0.5 -> alpha = beta = 1 (clamp)
    _, st = bnpo_advantages(T([[0.0] * 8, [1.0] * 8]))
    assert (st["alpha"], st["beta"], st["fallback"]) == (1.0, 1.0, 0.0)


def test_alpha_beta_one_equals_reinforce():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 3, (6, 8), generator=g).float() * 0.5  # rewards in {0, 0.5, 1}
    adv, _ = bnpo_advantages(r, alpha=1.0, beta=1.0)
    ref, _ = reinforce_advantages(r)
    assert_close(adv, ref)


def test_alpha_beta_three_halves_equals_grpo_times_pi_over_8():
    # Beta(3/2, 3/2): pdf(p) = sqrt(p(1-p)) / B(3/2, 3/2),  B(3/2, 3/2) = Gamma(3/2)^2/Gamma(3) = (pi/4)/2 = pi/8.
    # For binary rewards sqrt(p(1-p)) is the group's population std, so A = (pi/8)(R - p)/std_pop.
    # grpo_advantages uses the unbiased std = std_pop sqrt(M/(M-1)) -> BNPO = (pi/8) sqrt(M/(M-1)) GRPO(eps=0).
    assert math.gamma(1.5) ** 2 / math.gamma(3.0) == pytest.approx(math.pi / 8)
    g = torch.Generator().manual_seed(1)
    r = torch.randint(0, 2, (10, 8), generator=g).double()
    r[0] = 1.0  # a uniform group: both sides give 0
    adv, _ = bnpo_advantages(r, alpha=1.5, beta=1.5)
    grpo, _ = grpo_advantages(r, eps=0.0)
    assert_close(adv, math.pi / 8 * math.sqrt(8 / 7) * grpo)


def test_fit_beta_edge_cases():
    assert fit_beta(T([]))[4] is True
    assert fit_beta(T([0.3]))[:2] == (1.0, 1.0)
    assert fit_beta(T([0.3, 0.3, 0.3]))[4] is True
    # p = (0.25, 0.75): mu = 0.5, var = 0.125, k = 0.25/0.125 - 1 = 1, a = b = 0.5 -> alpha = beta = 1 + 1/6
    a, b, mu, var, fb = fit_beta(T([0.25, 0.75]))
    assert (a, b, mu, var, fb) == pytest.approx((7 / 6, 7 / 6, 0.5, 0.125, False))


def test_rescaling_and_its_error_message():
    r = T([[1.0, -1, -1, 1], [1.0, 1, 1, -1], [-1.0, -1, -1, 1]])
    adv, st = bnpo_advantages(r, min_value=-1.0, max_value=1.0)
    ref, st_ref = bnpo_advantages((r + 1) / 2)
    assert_close(adv, ref)
    assert st["alpha"] == st_ref["alpha"]
    with pytest.raises(ValueError, match="1.5"):
        bnpo_advantages(T([[0.0, 1.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="-0.25"):
        bnpo_advantages(T([[0.0, -0.25], [0.0, 1.0]]))
    # round-off just outside the range is tolerated (|excess| <= 1e-6 of the range) and clipped
    adv, _ = bnpo_advantages(T([[1.0 + 1e-9, 0.0], [0.0, -1e-9]], dtype=torch.float64), alpha=1.0, beta=1.0)
    assert adv.flatten().tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="nan"):
        bnpo_advantages(T([[0.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="max_value"):
        bnpo_advantages(r, min_value=1.0, max_value=1.0)


# --- masks --------------------------------------------------------------------------------------------------------


def test_mask_excludes_failed_episodes():
    # group 0: valid (1, 0, 1), failed slot holds NaN -> mean 2/3 -> REINFORCE (1/3, -2/3, 0, 1/3)
    # group 1: a single valid sample -> advantage 0; group 2: no valid sample -> advantage 0, out of the fit
    r = T([[1.0, 0.0, float("nan"), 1.0], [1.0, 0.0, 0.0, 0.0], [0.7, 0.7, 1.0, 0.0]])
    m = T([[1, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]]).bool()
    adv, _ = reinforce_advantages(r, m)
    assert adv[0].tolist() == pytest.approx([1 / 3, -2 / 3, 0.0, 1 / 3])
    assert torch.equal(adv[1:], torch.zeros(2, 4))
    for method in ("bnpo", "grpo", "rloo"):
        adv, st = compute_advantages(r, method, mask=m)
        assert torch.isfinite(adv).all() and adv[0, 2] == 0 and torch.equal(adv[1:], torch.zeros(2, 4)), method
    adv, st = bnpo_advantages(r, m)
    # fit over groups 0 and 1 (p = 2/3 and 1): mu = 5/6, deviations -1/6 and +1/6,
    # unbiased var = (1/36 + 1/36)/(2 - 1) = 1/18; group 2 (no valid sample) stays out
    assert st["n_fit_groups"] == 2
    assert st["mu"] == pytest.approx(5 / 6) and st["var"] == pytest.approx(1 / 18)
    assert st["adv_abs_mean"] == pytest.approx(adv[m].abs().mean().item())  # over the 4 valid samples only


def test_masked_bnpo_equals_compacted_groups():
    # masking one slot per group == removing it (same valid count everywhere)
    full = T([[1.0, 0.7, 0.0, 9.0], [0.0, 9.0, 0.0, 1.0], [9.0, 1.0, 1.0, 0.7]])
    m = full != 9.0
    adv, st = bnpo_advantages(full, m)
    compact = T([[1.0, 0.7, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.7]])
    ref, st_ref = bnpo_advantages(compact)
    assert_close(adv[m].view(3, 3), ref)
    assert (st["alpha"], st["beta"]) == (st_ref["alpha"], st_ref["beta"])


def test_random_batches_never_nan():
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        r = T([0.0, 0.7, 1.0])[torch.randint(0, 3, (5, 8), generator=g)]
        m = torch.rand(5, 8, generator=g) > 0.3
        for method in ("bnpo", "grpo", "rloo", "reinforce"):
            adv, st = compute_advantages(r, method, mask=m)
            assert torch.isfinite(adv).all() and all(math.isfinite(v) for v in st.values()), method
        comps, w = tiered_components(r > 0, r == 1.0, 0.7)
        adv, st = compute_advantages(r, "bnpo_decomposed", mask=m, components=comps, weights=w)
        assert torch.isfinite(adv).all() and all(math.isfinite(v) for v in st.values())


# --- decomposition ------------------------------------------------------------------------------------------------


def test_decomposition_with_uniform_fits_equals_reinforce_on_total_reward():
    # one group -> every component falls back to alpha = beta = 1 ->
    # A = 0.7 (c - p_c) + 0.3 (d - p_d) = R - p_R.  Here R = (1, 0.7, 0.7, 0), p_R = 0.6 -> (0.4, 0.1, 0.1, -0.6)
    comps, w = tiered_components(T([[1, 1, 1, 0]]).bool(), T([[1, 0, 0, 1]]).bool(), 0.7)
    adv, st = bnpo_decomposed_advantages(comps, w)
    assert adv[0].tolist() == pytest.approx([0.4, 0.1, 0.1, -0.6])
    assert st["fallback/0"] == st["fallback/1"] == 1.0


def test_decomposition_hand_values():
    # correct c:                   group 0 = (1,1,0,0) p=0.5      group 1 = (1,0,0,0) p=0.25
    # direct-correct d:            group 0 = (1,0,0,0) p=0.25     group 1 = (0,0,0,0) p=0
    # component c: mu = 0.375, var = 2 * 0.125^2 = 0.03125, k = 0.234375/0.03125 - 1 = 6.5
    #   a = 6.5 * 0.375 = 2.4375 -> alpha = 1.8125;  b = 6.5 * 0.625 = 4.0625 -> beta = 2.354167
    # component d: mu = 0.125, var = 0.03125, k = 0.109375/0.03125 - 1 = 2.5
    #   a = 0.3125 -> alpha = 1.104167;  b = 2.1875 -> beta = 1.729167
    # A = 0.7 A_c + 0.3 A_d, group 1's d is all zero -> A_d = 0 there
    comps = T([[[1, 1], [1, 0], [0, 0], [0, 0]], [[1, 0], [0, 0], [0, 0], [0, 0]]]).double()
    adv, st = bnpo_decomposed_advantages(comps, [0.7, 0.3])
    assert (st["alpha/0"], st["beta/0"]) == pytest.approx((1.8125, 2.354167), abs=1e-6)
    assert (st["alpha/1"], st["beta/1"]) == pytest.approx((1.104167, 1.729167), abs=1e-6)
    wc0, wc1 = 1 / beta_pdf(0.5, 1.8125, 2 + 17 / 48), 1 / beta_pdf(0.25, 1.8125, 2 + 17 / 48)
    wd0 = 1 / beta_pdf(0.25, 1 + 5 / 48, 1 + 35 / 48)
    expect0 = [0.7 * wc0 * (c - 0.5) + 0.3 * wd0 * (d - 0.25) for c, d in ((1, 1), (1, 0), (0, 0), (0, 0))]
    expect1 = [0.7 * wc1 * (c - 0.25) for c in (1, 0, 0, 0)]
    assert adv[0].tolist() == pytest.approx(expect0, rel=1e-9)
    assert adv[1].tolist() == pytest.approx(expect1, rel=1e-9)


def test_constant_component_contributes_zero_without_nan():
    # nobody answers directly: the d component is all zero -> var = 0 -> fallback, A_d = 0, A = 0.7 A_c
    correct = T([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]).bool()
    comps, w = tiered_components(correct, torch.zeros_like(correct), 0.7)
    adv, st = bnpo_decomposed_advantages(comps, w)
    a_c, _ = bnpo_advantages(correct.float())
    assert torch.isfinite(adv).all() and st["fallback/1"] == 1.0
    assert_close(adv, 0.7 * a_c)


def test_equal_weights_reduce_to_official_mean():
    g = torch.Generator().manual_seed(3)
    comps = torch.randint(0, 2, (6, 8, 2), generator=g).double()
    adv, _ = bnpo_decomposed_advantages(comps, [1.0, 1.0])
    a0, _ = bnpo_advantages(comps[..., 0])
    a1, _ = bnpo_advantages(comps[..., 1])
    assert_close(adv, (a0 + a1) / 2)


def test_decomposition_argument_checks():
    comps = torch.zeros(2, 4, 2)
    with pytest.raises(ValueError, match="weights"):
        bnpo_decomposed_advantages(comps, [1.0])
    with pytest.raises(ValueError):
        bnpo_decomposed_advantages(comps[..., 0], [1.0])
    with pytest.raises(ValueError, match="components and weights"):
        compute_advantages(torch.zeros(2, 4), "bnpo_decomposed")
    # rewards must match sum_k w_k c_k (here alpha 0.5 rewards with 0.7 / 0.3 components)
    c, w = tiered_components(T([[1, 1, 0, 0]]).bool(), T([[0, 0, 0, 0]]).bool(), 0.7)
    with pytest.raises(ValueError, match="max gap"):
        compute_advantages(T([[0.5, 0.5, 0, 0]]), "bnpo_decomposed", components=c, weights=w)


# --- GRPO / RLOO / REINFORCE --------------------------------------------------------------------------------------


def test_grpo_hand_values():
    r = T([[1.0, 0, 0, 0], [1.0, 1, 1, 0]])
    # group 0: mean 0.25, unbiased var = (0.75^2 + 3 * 0.25^2)/3 = 0.75/3 = 0.25, std 0.5 -> (1.5, -0.5, -0.5, -0.5)
    adv, _ = grpo_advantages(r, eps=0.0)
    assert adv[0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])
    assert adv[1].tolist() == pytest.approx([0.5, 0.5, 0.5, -1.5])
    adv, _ = grpo_advantages(r)  # eps = 1e-4: 0.75 / 0.5001
    assert adv[0, 0].item() == pytest.approx(0.75 / 0.5001)
    # batch std: four 1s and four 0s, mean 0.5, unbiased var = 8 * 0.25 / 7 = 2/7
    adv, _ = grpo_advantages(r, eps=0.0, scale="batch")
    assert adv[0].tolist() == pytest.approx([x / math.sqrt(2 / 7) for x in (0.75, -0.25, -0.25, -0.25)])
    adv, _ = grpo_advantages(r, scale="none")  # Dr. GRPO: R - mean
    assert adv[0].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    with pytest.raises(ValueError, match="scale"):
        grpo_advantages(r, scale="token")


def test_grpo_worked_example():
    # lone 0.7 among seven 1s: mean 0.9625, unbiased var = (7 * 0.0375^2 + 0.2625^2)/7 = 0.07875/7 = 0.01125
    # std = 0.106066 -> A = -0.2625 / (0.106066 + 1e-4) = -2.4726
    adv, _ = grpo_advantages(DEMO)
    assert adv[2, 7].item() == pytest.approx(-0.2625 / (math.sqrt(0.01125) + 1e-4))
    assert adv[2, 7].item() == pytest.approx(-2.47, abs=0.01)


def test_rloo_hand_values():
    r = T([[1.0, 0, 0, 0], [1.0, 0.7, 0.0, 5.0]])
    m = T([[1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    adv, _ = rloo_advantages(r, m)
    # group 0: 1 - (0+0+0)/3 = 1;  0 - (1+0+0)/3 = -1/3
    assert adv[0].tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])
    # group 1 (3 valid): 1 - 0.7/2 = 0.65; 0.7 - 1/2 = 0.2; 0 - 1.7/2 = -0.85; masked -> 0
    assert adv[1].tolist() == pytest.approx([0.65, 0.2, -0.85, 0.0])
    # RLOO = n/(n-1) * (R - mean)
    ref, _ = reinforce_advantages(r, m)
    assert_close(adv[1], 1.5 * ref[1])


def test_compute_advantages_dispatch():
    r = DEMO.float()
    for method, fn in (("bnpo", bnpo_advantages), ("grpo", grpo_advantages), ("rloo", rloo_advantages),
                       ("reinforce", reinforce_advantages)):
        adv, st = compute_advantages(r, method)
        assert_close(adv, fn(r)[0])
        assert adv.dtype == torch.float32 and st["uniform_frac"] == 0.25
    adv, _ = compute_advantages(r, "grpo", scale="none")
    assert_close(adv, reinforce_advantages(r)[0])
    comps, w = tiered_components(r > 0, r == 1.0, 0.7)
    adv, st = compute_advantages(r, "bnpo_decomposed", components=comps, weights=w)
    assert_close(adv, bnpo_decomposed_advantages(comps, w)[0])
    assert "alpha/1" in st and st["n_all_zero"] == 1
    assert set(METHODS) == {"bnpo", "bnpo_decomposed", "grpo", "rloo", "reinforce"}
    with pytest.raises(ValueError, match="unknown advantage method 'ppo'"):
        compute_advantages(r, "ppo")


# --- diagnostics --------------------------------------------------------------------------------------------------


def test_uniform_and_all_zero_group_counts():
    r = T([[1.0, 1, 1], [0.0, 0, 0], [1.0, 0, 0.7], [0.7, 0.7, 0.0], [0.0, 1.0, 0.0]])
    m = T([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [0, 0, 0]]).bool()
    # valid groups: 0 uniform (all 1), 1 uniform all-zero, 2 mixed, 3 uniform (0.7, 0.7; the 0 is masked);
    # group 4 has no valid sample and does not count -> 3 uniform of 4, 1 all-zero
    d = group_diagnostics(r, m)
    assert d == {"n_groups": 4, "n_uniform": 3, "n_all_zero": 1, "uniform_frac": 0.75, "all_zero_frac": 0.25}
    assert group_diagnostics(r)["uniform_frac"] == pytest.approx(2 / 5)
    assert group_diagnostics(torch.zeros(0, 8))["uniform_frac"] == 0.0
