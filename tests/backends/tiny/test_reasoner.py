"""The world's trainable reasoner: vocabulary, transcripts, sampling and log-probs, persistence, the shipped warm
start."""

import json
import os

import pytest
import torch

from acrl.backends.tiny import TinyReasoner, world_reasoner_tokenizer, world_tokenizer
from acrl.config import SHIPPED_REASONER, TinyReasonerConfig
from acrl.rollout.episode import EpisodeConfig, run_episodes
from acrl.rollout.prompts import decision_prompt, final_prompt
from acrl.rollout.replies import parse_reply
from acrl.train.reasoner_warmstart import evaluate_reasoner
from acrl.world import WorldConfig, make_problems, oracle_caption_for

SMALL = TinyReasonerConfig(d_model=32, n_heads=2, n_layers=1, max_prompt_tokens=64, max_new_tokens=16)


def test_vocabulary_extends_the_captioners():
    tok = world_reasoner_tokenizer()
    base = world_tokenizer().vocab
    assert tok.vocab[:len(base)] == base                     # same word ids as the world captioner
    assert {"SOLVED", "NEED MORE INFO", "\\boxed{", "7.5", "<decide>"} <= set(tok.vocab[len(base):])
    assert len(set(tok.vocab)) == len(tok.vocab)


def test_prompt_encoding_keeps_sections_and_cuts_the_description_first():
    tok = world_reasoner_tokenizer()
    p = make_problems("val", 1)[0]
    full = tok.encode_prompt(final_prompt(p.question, oracle_caption_for(p), "how tall is it ?", "the red bar is 3"),
                             200)
    words = [tok.vocab[i] for i in full]
    assert words[1] == "<solve>" and words.count("<asked>") == 1 and words[-1] == "<reply>"
    assert words[words.index("<clarification>") + 1:-1] == ["the", "red", "bar", "is", "3"]
    asked, answer = "how tall is the rectangle ?", "the rectangle is 3 tall"
    cut = tok.encode_prompt(final_prompt(p.question, oracle_caption_for(p) + " ; the bars" * 40, asked, answer), 40)
    words = [tok.vocab[i] for i in cut]
    assert len(cut) == 40 and words[2] == "<question>"
    assert words[-14:] == ["<asked>", *asked.split(), "<clarification>", *answer.split(), "<reply>"]


def test_render_writes_the_protocol():
    tok = world_reasoner_tokenizer()
    text = tok.render(tok.reply_ids(["SOLVED", "2", "-", "6", "=", "-", "4", "\\boxed{", "-", "4", "}"]))
    assert text.endswith("\\boxed{-4}") and parse_reply(text).answer == "-4"
    ask = tok.render(tok.reply_ids(["NEED MORE INFO", "how", "tall", "is", "the", "rectangle", "?"]))
    assert ask == "NEED MORE INFO\nhow tall is the rectangle ?" and parse_reply(ask).kind == "ask"


def test_sampled_logprobs_match_the_update_pass_and_do_not_depend_on_the_batch():
    r = TinyReasoner.create(SMALL, seed=3)
    problems = make_problems("val", 6)
    prompts = [decision_prompt(p.question_with_choices(), oracle_caption_for(p)) for p in problems]
    prompts[2] = decision_prompt(problems[2].question, "a bar chart")          # rows of different lengths
    torch.manual_seed(0)
    batch = r.sample(prompts, temperature=1.0)
    assert batch.tokens.shape == (6, SMALL.max_new_tokens) and len(batch.texts) == 6
    assert torch.allclose(r.logprobs(batch), batch.logprobs, atol=1e-5)
    alone = r.logprobs(batch.select([2]))
    assert torch.allclose(alone, batch.logprobs[2:3], atol=1e-5)
    ref = r.logprobs(batch, reference=True)
    assert torch.allclose(ref, batch.logprobs, atol=1e-5) and not ref.requires_grad
    greedy = r.sample(prompts, greedy=True)
    assert r.complete(prompts) == greedy.texts == r.sample(prompts, greedy=True).texts   # temperature 0: greedy


def test_save_load_roundtrip_and_bad_checkpoints(tmp_path):
    r = TinyReasoner.create(SMALL, seed=1)
    r.save(tmp_path / "r")
    back = TinyReasoner.load(str(tmp_path / "r"))
    prompts = [decision_prompt(p.question, oracle_caption_for(p)) for p in make_problems("val", 3)]
    assert back.complete(prompts) == r.complete(prompts)
    with pytest.raises(FileNotFoundError, match="not found"):
        TinyReasoner.load(str(tmp_path / "nope"))
    (tmp_path / "r" / "model.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="corrupt"):
        TinyReasoner.load(str(tmp_path / "r"))


def test_shipped_reasoner_learned_the_protocol():
    """The shipped warm start on held-out problems: >= 95% well-formed replies, >= 90% correct with oracle
    captions; it asks about a missing fact and answers after the clarification."""
    assert os.path.isdir(SHIPPED_REASONER), "the warm-started world reasoner is shipped in src/acrl/assets"
    r = TinyReasoner.load(SHIPPED_REASONER)
    s = evaluate_reasoner(r, WorldConfig(), n=200, split="test")
    assert s["well_formed"] >= 0.95, s
    assert s["oracle_accuracy"] >= 0.90, s
    assert s["missing_ask_rate"] >= 0.9 and s["missing_question_answerable"] >= 0.8, s
    assert s["clarified_accuracy"] >= 0.85, s
    log = [json.loads(x) for x in open(os.path.join(SHIPPED_REASONER, "warmstart_log.jsonl"))]
    assert log[0]["parameters"] == r.num_parameters() and log[-1]["oracle_accuracy"] >= 0.9


def test_shipped_reasoner_runs_episodes_like_the_world_reasoner():
    from acrl.world.reasoner import OracleClarifier, WorldReasoner

    problems = make_problems("val", 4)
    captions = [[oracle_caption_for(p), oracle_caption_for(p).split(" ; ")[0]] for p in problems]
    ours, theirs = (run_episodes(problems, captions, r, OracleClarifier(problems), EpisodeConfig())
                    for r in (TinyReasoner.load(SHIPPED_REASONER), WorldReasoner(6)))
    flat = [(a, b) for ga, gb in zip(ours, theirs) for a, b in zip(ga, gb)]
    assert [a.decision for a, _ in flat] == [b.decision for _, b in flat] == ["solved", "ask"] * 4
    assert [a.question for a, _ in flat] == [b.question for _, b in flat]   # the same missing fact asked
    assert sum(a.correct for a, _ in flat[::2]) >= 3        # everything stated: right (one MC letter may slip)
