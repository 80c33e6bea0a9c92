"""The pieces both tiny models share: the sampler and the teacher-forced log-probs agree, the KV cache computes
the full pass, the checkpoint format round-trips with one-line errors."""

import pytest
import torch

from acrl.backends.tiny.nn import (
    BOS,
    EOS,
    PAD,
    Block,
    causal_mask,
    over_longest,
    read_checkpoint,
    sample,
    teacher_forced,
    write_checkpoint,
)
from acrl.config import TinyReasonerConfig

V, BANNED = 9, [PAD, BOS, 3]


def _bigram(seed=0):
    """A model whose next-token logits depend on the previous token only; ``<eos>`` is likely."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, V, generator=g)
    table[:, EOS] += 1.5
    start = (torch.arange(40) % 6 + 3)[:, None]   # rows start from different tokens
    return (lambda tokens: table[tokens]), (lambda inputs: table[torch.cat([start, inputs], 1)]), start


@pytest.mark.parametrize("greedy", [False, True])
def test_sampled_logprobs_are_the_teacher_forced_ones(greedy):
    step, forward, start = _bigram()
    torch.manual_seed(0)
    tokens, mask, lps = sample(step, start, 30, BANNED, temperature=0.7, greedy=greedy)
    assert tokens.shape == mask.shape == lps.shape == (40, 30)
    assert not torch.isin(tokens, torch.tensor([BOS, 3])).any()          # banned tokens are never written
    assert torch.equal(mask, (tokens != PAD).float()) and (lps[tokens == PAD] == 0).all()
    ended = (tokens == EOS).cumsum(1) - (tokens == EOS).long()           # a row is padding after its <eos>
    assert (tokens[ended > 0] == PAD).all() and (tokens == EOS).any()
    assert torch.equal(mask.sum(1) > 0, torch.ones(40, dtype=torch.bool))
    t = 1.0 if greedy else 0.7                                           # greedy log-probs: at temperature 1
    assert torch.allclose(teacher_forced(forward, tokens, BANNED, t), lps, atol=1e-6)
    assert greedy or mask.sum(1).max() < 30                              # then the trimmed pass is padded back
    assert torch.allclose(over_longest(lambda x: teacher_forced(forward, x, BANNED, t), tokens), lps, atol=1e-6)
    if greedy:
        assert torch.equal(tokens[:, 0], step(start)[:, -1].masked_fill(torch.isin(torch.arange(V), torch.tensor(
            BANNED)), float("-inf")).argmax(-1))


def test_sampling_draws_the_same_numbers_from_the_same_seed():
    step, _, start = _bigram()
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(sample(step, start, 12, BANNED, temperature=1.3)[0])
    assert torch.equal(*draws)


def test_the_kv_cache_computes_the_full_pass():
    torch.manual_seed(0)
    d, t = 16, 7
    x = torch.randn(3, t, d)
    rotary = Block(d, 2).eval()
    valid = torch.ones(3, t, dtype=torch.bool)
    positions = torch.arange(t).expand(3, t)
    full = rotary(x, mask=causal_mask(valid), positions=positions)
    cache: dict = {}
    steps = [rotary(x[:, :3], mask=causal_mask(valid[:, :3]), positions=positions[:, :3], cache=cache)]
    for i in range(3, t):
        steps.append(rotary(x[:, i:i + 1], mask=valid[:, None, None, :i + 1], positions=positions[:, i:i + 1],
                            cache=cache))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    cross = Block(d, 2, cross=True).eval()
    memory, keep = torch.randn(3, 5, d), torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 5])
    full = cross(x, memory, keep[:, None, None, :], causal=True)
    cache = {}
    steps = [cross(x[:, i:i + 1], memory, keep[:, None, None, :], cache=cache) for i in range(t)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


class _Model(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.lin = torch.nn.Linear(cfg.d_model, 2)


def test_checkpoints_round_trip_with_one_line_errors(tmp_path):
    cfg = TinyReasonerConfig(d_model=4)
    model = _Model(cfg)
    write_checkpoint(str(tmp_path / "ck"), cfg, ["<pad>", "a"], model.state_dict())
    back, vocab = read_checkpoint(str(tmp_path / "ck"), "reasoner", TinyReasonerConfig, list, _Model)
    assert vocab == ["<pad>", "a"] and torch.equal(back.lin.weight, model.lin.weight)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_checkpoint(str(tmp_path / "nope"), "reasoner", TinyReasonerConfig, list, _Model)
    torch.save({"other": torch.zeros(1)}, tmp_path / "ck" / "model.pt")
    with pytest.raises(ValueError, match="not a tiny reasoner's weights"):
        read_checkpoint(str(tmp_path / "ck"), "reasoner", TinyReasonerConfig, list, _Model)
    (tmp_path / "ck" / "config.json").write_text('{"no_such_field": 1}')
    with pytest.raises(ValueError, match="config.json or vocab.json is corrupt"):
        read_checkpoint(str(tmp_path / "ck"), "reasoner", TinyReasonerConfig, list, _Model)
    (tmp_path / "ck" / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no vocab.json"):
        read_checkpoint(str(tmp_path / "ck"), "reasoner", TinyReasonerConfig, list, _Model)
