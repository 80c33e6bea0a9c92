"""The records every backend returns (:mod:`acrl.rollout.protocols`): a rollout's shape, reply batches selected and
concatenated row by row, and the no-op hooks a policy inherits."""

import pytest
import torch

from acrl.rollout.protocols import PolicyHooks, ReplyBatch, Rollout, concat


def _batch(texts, width, temperature=1.0, pad_id=0, start=0):
    n = len(texts)
    tokens = torch.arange(start, start + n * width).reshape(n, width) + 1
    mask = torch.ones(n, width)
    mask[:, -1] = 0
    tokens[:, -1] = pad_id
    return ReplyBatch(tokens, mask, -mask * 0.5, temperature, prompts=[f"prompt {t}" for t in texts],
                      texts=list(texts), prompt_ids=[[i] * (i + 1) for i in range(start, start + n)], pad_id=pad_id)


def test_a_rollout_counts_its_samples_per_problem():
    texts = [["a", "b", "c"], ["d", "e", "f"]]
    roll = Rollout(torch.zeros(6, 2), torch.ones(6, 2), torch.zeros(6, 2), 1.0, texts=texts)
    assert roll.n == 3 and Rollout(torch.zeros(0), torch.zeros(0), torch.zeros(0), 1.0).n == 0


def test_select_keeps_the_rows_asked_for_in_that_order():
    b = _batch(["x", "y", "z"], width=3)
    s = b.select([2, 0])
    assert len(s) == 2 and s.texts == ["z", "x"] and s.prompts == ["prompt z", "prompt x"]
    assert torch.equal(s.tokens, b.tokens[[2, 0]]) and torch.equal(s.logprobs, b.logprobs[[2, 0]])
    assert s.prompt_ids == [[2, 2, 2], [0]] and (s.temperature, s.pad_id) == (1.0, 0)


def test_concat_pads_every_batch_to_the_widest():
    a, b = _batch(["x"], width=2, pad_id=9), _batch(["y", "z"], width=4, pad_id=9, start=10)
    c = concat([a, b])
    assert c.texts == ["x", "y", "z"] and c.prompt_ids == [[0], [10] * 11, [11] * 12]
    assert c.tokens.shape == (3, 4) and c.tokens[0].tolist() == [a.tokens[0, 0].item(), 9, 9, 9]
    assert c.mask[0].tolist() == [1, 0, 0, 0] and c.logprobs[0].tolist() == [-0.5, 0, 0, 0]
    assert torch.equal(c.tokens[1:], b.tokens) and torch.equal(c.mask[1:], b.mask)


def test_concat_refuses_nothing_and_batches_sampled_differently():
    with pytest.raises(ValueError, match="at least one"):
        concat([])
    with pytest.raises(ValueError, match="different temperatures"):
        concat([_batch(["x"], 2), _batch(["y"], 2, temperature=0.7)])
    with pytest.raises(ValueError, match="pad ids"):
        concat([_batch(["x"], 2), _batch(["y"], 2, pad_id=3)])


def test_a_policy_without_hooks_inherits_ones_that_do_nothing():
    class Policy(PolicyHooks):
        pass

    p = Policy()
    assert p.before_update() is None and p.after_update() is None and p.set_sampling_seed(7) is None
    assert vars(p) == {}                                             # nothing stored, nothing changed
