"""One PPO-style update (:mod:`acrl.core.update`) on a tiny tensor policy: micro-batches add up to the loss of the
whole batch, failed rows carry no gradient, π_ref's log-probs are computed when missing, the ratio is clipped, the
gradient norm is capped, and ranks holding parts of a batch add up to one process holding it all."""

from types import SimpleNamespace

import pytest
import torch

from acrl.core.loss import AGGREGATIONS, policy_loss
from acrl.core.update import UpdateSettings, update

VOCAB, ROWS, WIDTH = 5, 5, 4


class TablePolicy:
    """log π(token) = log_softmax(θ)[token], the same at every position; π_ref: a second, frozen table."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.nn.Parameter(torch.randn(VOCAB, generator=g))
        self.ref = torch.randn(VOCAB, generator=g)
        self.calls = []

    def logprobs(self, batch, rows=slice(None), reference=False):
        self.calls.append((rows.start, rows.stop, reference))
        return torch.log_softmax(self.ref if reference else self.theta, 0)[batch.tokens[rows]]

    def trainable_parameters(self):
        return [self.theta]


def _batch(old_shift=0.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (ROWS, WIDTH), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float)
    old = (torch.log_softmax(TablePolicy().theta.detach(), 0)[tokens] + old_shift) * mask
    return SimpleNamespace(tokens=tokens, mask=mask, logprobs=old)


ADV = torch.tensor([1.0, -0.5, 2.0, 0.0, -1.0])
ALL = torch.ones(ROWS, dtype=torch.bool)


def _grad(policy, batch, adv, valid, s, lr=0.0, ref=None, dist=None):
    """Run ``update`` with plain SGD (``lr`` 0: the parameters stay, the gradient is left in ``.grad``)."""
    stats = update(policy, torch.optim.SGD(policy.trainable_parameters(), lr=lr), batch, adv, valid, s, ref=ref,
                   dist=dist)
    return policy.theta.grad.clone() if policy.theta.grad is not None else None, stats


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_add_up_to_the_loss_of_the_whole_batch(aggregation):
    s = UpdateSettings(micro_batch=2, aggregation=aggregation, kl_beta=0.1, grad_clip=1e9, length_norm=WIDTH)
    policy, batch = TablePolicy(), _batch()
    grad, stats = _grad(policy, batch, ADV, ALL, s)
    whole = TablePolicy()
    ref = torch.log_softmax(whole.ref, 0)[batch.tokens]
    loss, _ = policy_loss(torch.log_softmax(whole.theta, 0)[batch.tokens], batch.logprobs, ADV, batch.mask, ref,
                          kl_beta=0.1, aggregation=aggregation, length_norm=WIDTH)
    loss.backward()
    assert torch.allclose(grad, whole.theta.grad, atol=1e-6)
    assert stats["loss"] == pytest.approx(float(loss.detach()), abs=1e-6)
    assert stats["grad_norm"] == pytest.approx(float(whole.theta.grad.norm()), rel=1e-5)


def test_failed_rows_carry_no_gradient():
    s = UpdateSettings(micro_batch=2, grad_clip=1e9, kl_beta=0.1)
    batch, valid = _batch(), torch.tensor([True, False, True, True, False])
    grad, _ = _grad(TablePolicy(), batch, ADV, valid, s)
    keep = valid.nonzero().squeeze(1)
    only = SimpleNamespace(tokens=batch.tokens[keep], mask=batch.mask[keep], logprobs=batch.logprobs[keep])
    grad_only, _ = _grad(TablePolicy(), only, ADV[keep], ALL[keep], s)
    assert torch.allclose(grad, grad_only, atol=1e-6)


def test_a_micro_batch_of_failed_rows_is_not_run_and_nothing_valid_trains_nothing():
    s = UpdateSettings(micro_batch=2, kl_beta=0.0)
    policy = TablePolicy()
    _grad(policy, _batch(), ADV, torch.tensor([True, True, False, False, True]), s)
    assert [c for c in policy.calls if not c[2]] == [(0, 2, False), (4, 6, False)]
    policy = TablePolicy()
    before = policy.theta.detach().clone()
    grad, stats = _grad(policy, _batch(), ADV, torch.zeros(ROWS, dtype=torch.bool), s, lr=1.0)
    assert grad is None and stats == {"grad_norm": 0.0} and torch.equal(policy.theta.detach(), before)


def test_reference_logprobs_are_computed_once_per_update_in_micro_batches_when_missing():
    policy = TablePolicy()
    _grad(policy, _batch(), ADV, ALL, UpdateSettings(micro_batch=2, epochs=2, kl_beta=0.1))
    assert [c for c in policy.calls if c[2]] == [(0, 2, True), (2, 4, True), (4, 6, True)]
    for s, ref in ((UpdateSettings(kl_beta=0.1), torch.zeros(ROWS, WIDTH)), (UpdateSettings(kl_beta=0.0), None)):
        policy = TablePolicy()
        _, stats = _grad(policy, _batch(), ADV, ALL, s, ref=ref)
        assert not any(c[2] for c in policy.calls)
        assert (stats["kl_mean"] > 0) == (ref is not None)          # no π_ref, no KL term


def test_a_ratio_beyond_the_clip_range_stops_the_gradient_of_a_positive_advantage():
    s = UpdateSettings(kl_beta=0.0, grad_clip=1e9, clip_high=0.2)
    batch = _batch(old_shift=-1.0)                                  # ratio e ≈ 2.7 on every token
    pos = ADV.abs() + 0.5
    grad, stats = _grad(TablePolicy(), batch, pos, ALL, s)
    assert stats["clip_frac"] == 1.0 and stats["ratio_mean"] == pytest.approx(torch.e, rel=1e-5)
    assert float(grad.abs().max()) == 0.0
    grad, stats = _grad(TablePolicy(), batch, -pos, ALL, s)        # a negative advantage: the ratio is not cut
    assert stats["clip_frac"] == 0.0 and float(grad.abs().max()) > 0


def test_the_gradient_norm_is_reported_before_it_is_capped():
    s = UpdateSettings(kl_beta=0.0, grad_clip=1e-3)
    policy = TablePolicy()
    before = policy.theta.detach().clone()
    grad, stats = _grad(policy, _batch(), ADV, ALL, s, lr=1.0)
    assert stats["grad_norm"] > 1e-2
    assert float((policy.theta.detach() - before).norm()) == pytest.approx(1e-3, rel=1e-4)


def test_several_epochs_move_the_policy_off_its_sampling_ratio():
    _, one = _grad(TablePolicy(), _batch(), ADV, ALL, UpdateSettings(kl_beta=0.0, grad_clip=1e9), lr=5.0)
    _, three = _grad(TablePolicy(), _batch(), ADV, ALL, UpdateSettings(kl_beta=0.0, epochs=3, grad_clip=1e9), lr=5.0)
    assert one["ratio_mean"] == pytest.approx(1.0)                 # the first epoch is on-policy
    assert abs(three["ratio_mean"] - 1.0) > 1e-3                     # the stats are the last epoch's


class _Rank:
    """The distributed operations of one rank of two, the other rank's share given: its token / sequence counts and
    its gradient."""

    def __init__(self, other_counts, other_grad=None):
        self.other_counts, self.other_grad, self.calls = other_counts, other_grad, 0

    def all_sum(self, t):
        self.calls += 1
        return t + self.other_counts if self.calls == 1 else t

    def sum_gradients(self, params):
        if self.other_grad is not None:
            params[0].grad += self.other_grad


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_two_ranks_holding_parts_of_a_batch_add_up_to_one_process(aggregation):
    s = UpdateSettings(micro_batch=2, aggregation=aggregation, kl_beta=0.1, grad_clip=1e9)
    batch = _batch()

    def part(rows):
        return SimpleNamespace(tokens=batch.tokens[rows], mask=batch.mask[rows], logprobs=batch.logprobs[rows])

    def counts(rows):
        m = batch.mask[rows]
        return torch.stack([m.sum(), (m.sum(1) > 0).sum().float()])

    a, b = slice(0, 3), slice(3, 5)
    grad_b, _ = _grad(TablePolicy(), part(b), ADV[b], ALL[b], s, dist=_Rank(counts(a)))
    summed, _ = _grad(TablePolicy(), part(a), ADV[a], ALL[a], s, dist=_Rank(counts(b), grad_b))
    alone, _ = _grad(TablePolicy(), batch, ADV, ALL, s)
    assert torch.allclose(summed, alone, atol=1e-6)


def test_the_samplers_log_probs_are_measured_and_truncated_when_asked():
    batch = _batch()
    batch.context = SimpleNamespace(sampler_logprobs=batch.logprobs - 0.5 * batch.mask)   # the trainer's ratio e^.5
    s = UpdateSettings(kl_beta=0.0, grad_clip=1e9)
    plain, stats = _grad(TablePolicy(), batch, ADV, ALL, s)
    assert stats["sampler_ratio_max"] == pytest.approx(float(torch.exp(torch.tensor(0.5))), rel=1e-5)
    assert stats["sampler_kl"] > 0 and stats["sampler_tis_frac"] == 0.0
    capped, stats = _grad(TablePolicy(), batch, ADV, ALL, UpdateSettings(kl_beta=0.0, grad_clip=1e9, tis_cap=1.2))
    assert stats["sampler_tis_frac"] == 1.0
    assert torch.allclose(capped, 1.2 * plain, atol=1e-6)           # every token's weight capped at 1.2
