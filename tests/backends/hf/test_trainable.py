"""The real-scale trainable reasoner: a Hugging Face causal LM with its own LoRA adapter, on a tiny random Llama
built from a config (no downloads)."""

import pytest
import torch

from acrl.config import LoraSettings
from acrl.rollout.episode import EpisodeConfig, run_episodes
from acrl.rollout.prompts import decision_prompt
from acrl.rollout.protocols import concat
from acrl.world import make_problems, oracle_caption_for

LORA = LoraSettings(enabled=True, r=4, alpha=8, targets=r".*\.(q_proj|k_proj|v_proj|o_proj)$")


def _prompts(n=4):
    return [decision_prompt(p.question_with_choices(), oracle_caption_for(p)) for p in make_problems("val", n)]


def test_only_the_adapter_trains_and_logprobs_are_one_path(tiny_llm):
    from acrl.backends.hf.trainable import HFTrainableReasoner

    r = HFTrainableReasoner(tiny_llm, lora=LORA, max_new_tokens=8, batch_size=3)
    names = [n for n, p in r.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    torch.manual_seed(0)
    batch = r.sample(_prompts(), temperature=1.0)
    assert batch.tokens.shape == (4, 8) and len(batch.texts) == 4
    # the update's pass recomputes the sampling log-probs; with a fresh adapter (B = 0) they equal the base model's
    assert torch.allclose(r.logprobs(batch), batch.logprobs, atol=1e-5)
    assert torch.allclose(r.logprobs(batch, reference=True), batch.logprobs, atol=1e-5)
    # rows are independent of their batch (left padding, positions from the mask)
    assert torch.allclose(r.logprobs(batch.select([1])), batch.logprobs[1:2], atol=1e-5)

    before = {n: p.detach().clone() for n, p in r.model.named_parameters()}
    opt = torch.optim.SGD(r.trainable_parameters(), lr=1.0)
    loss = -(r.logprobs(batch) * batch.mask).sum()
    loss.backward()
    opt.step()
    changed = {n for n, p in r.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert not torch.allclose(r.logprobs(batch), r.logprobs(batch, reference=True))   # the start is kept


def test_save_load_continue_and_serve_as_a_reasoner(tiny_llm, tmp_path):
    from acrl.app.assemble import build_reasoner
    from acrl.backends.hf.trainable import HFTrainableReasoner, is_trainable_checkpoint
    from acrl.config import load_config
    from acrl.world.reasoner import OracleClarifier

    r = HFTrainableReasoner(tiny_llm, lora=LORA, max_new_tokens=6)
    with torch.no_grad():
        for n, p in r.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    r.save(tmp_path / "reasoner")
    assert is_trainable_checkpoint(tmp_path / "reasoner")
    batch = r.sample(_prompts(3), greedy=True)
    back = HFTrainableReasoner.load(str(tmp_path / "reasoner"), max_new_tokens=6)
    assert torch.allclose(back.logprobs(batch), r.logprobs(batch), atol=1e-5)
    assert back.trainable_parameters()                       # it continues training its adapter
    built = build_reasoner(load_config(None, ["reasoner.backend=hf", f"reasoner.model={tmp_path / 'reasoner'}",
                                              "reasoner.max_tokens=6"]))
    assert isinstance(built, HFTrainableReasoner) and built.complete(batch.prompts) == batch.texts
    problems = make_problems("val", 2)
    groups = run_episodes(problems, [[oracle_caption_for(p)] * 2 for p in problems], built,
                          OracleClarifier(problems), EpisodeConfig())
    assert all(len(ep.replies) >= 1 for g in groups for ep in g)
    assert len(concat([batch, batch.select([0])])) == 4


def test_adapter_dropout_is_refused(tiny_llm):
    from acrl.backends.hf.trainable import HFTrainableReasoner

    with pytest.raises(ValueError, match="dropout"):
        HFTrainableReasoner(tiny_llm, lora=LoraSettings(enabled=True, r=2, dropout=0.1, targets=LORA.targets))


def test_logprob_passes_keep_only_reply_logits_in_row_chunks_with_checkpointing(tiny_llm):
    """Memory of a real co-trained reasoner: every teacher-forced forward materialises logits for the reply
    positions only (never prompt + reply x vocabulary), at most ``batch_size`` rows at a time, and with
    ``gradient_checkpointing`` the gradient pass runs checkpointed (only the token embedding hooked) with the
    same numbers and gradients."""
    from acrl.backends.hf.trainable import HFTrainableReasoner

    torch.manual_seed(0)
    r = HFTrainableReasoner(tiny_llm, lora=LORA, max_new_tokens=6, batch_size=2)
    ck = HFTrainableReasoner(tiny_llm, lora=LORA, max_new_tokens=6, batch_size=2, gradient_checkpointing=True)
    with torch.no_grad():                                    # the same trained-looking adapter in both
        for (n, p), (_, q) in zip(r.model.named_parameters(), ck.model.named_parameters()):
            if "lora_" in n:
                q.copy_(p.normal_(0, 0.3))
    batch = r.sample(_prompts(5), temperature=1.0)
    seen = []
    hook = r.model.get_base_model().get_output_embeddings().register_forward_hook(
        lambda _m, _i, out: seen.append(tuple(out.shape[:2])))
    try:
        lp = r.logprobs(batch)
    finally:
        hook.remove()
    t = int(batch.mask.sum(1).max())
    assert [rows for rows, _ in seen] == [2, 2, 1] and all(pos <= t for _, pos in seen), seen
    assert torch.allclose(lp.detach(), batch.logprobs, atol=1e-5)
    grads = []
    for m in (r, ck):
        m.model.zero_grad()
        (m.logprobs(batch) * batch.mask).sum().backward()
        grads.append([p.grad.clone() for p in m.trainable_parameters()])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*grads))
    base = ck.model.get_base_model()
    assert base.is_gradient_checkpointing if hasattr(base, "is_gradient_checkpointing") else True
    assert [n for n, m in base.named_modules() if m._forward_hooks] == [
        n for n, m in base.named_modules() if m is base.get_input_embeddings()]
    assert not ck.model.training                               # back in eval mode after the pass
    from acrl.app.assemble import build_trainable_reasoner
    from acrl.config import load_config

    cfg = load_config(None, ["reasoner.backend=hf", f"reasoner.model={tiny_llm}", "reasoner.max_tokens=4",
                             "reasoner_train.gradient_checkpointing=true", "reasoner_train.lora.enabled=true"])
    assert build_trainable_reasoner(cfg, tiny_llm).gradient_checkpointing
