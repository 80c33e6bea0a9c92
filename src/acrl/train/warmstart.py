"""Supervised warm start of the world captioner: the "pretrained captioner" that AC-RL starts from.

It learns two things from freshly generated problems every batch:

- captions written for people (``acrl.world.language.human_caption``): the figure, a remark, and each quantity only
  with probability ``fact_rate`` (0.3): the interface mismatch AC-RL has to fix;
- answers to clarification questions about one fact ("what is the height of the red bar ?" -> "the red bar is 7"),
  so the frozen copy can serve as the reference π_ref that answers the reasoner.

Curriculum (easy to hard): for the first ``qa_phase`` of the steps most batches are one-fact answers (learning to
perceive), then captions and answers are mixed. The result reads quantities well when asked and rarely volunteers
them, like a captioner trained on human captions.
"""

from __future__ import annotations

import random

import torch

from acrl.backends.tiny import TinyCaptioner, images_to_tensor
from acrl.backends.tiny.nn import ANSWER, CAPTION
from acrl.config import TinyVLMConfig, WarmStartConfig
from acrl.train import supervised
from acrl.world import WorldConfig, clarification_pairs, human_caption_for, language, make_problems


def _batch(cap: TinyCaptioner, world: WorldConfig, cfg: WarmStartConfig, step: int, rng: random.Random):
    problems = make_problems("train", cfg.batch_size, world, start=(step * cfg.batch_size) % 900_000_000)
    qa_rate = cfg.qa_rate_early if step < cfg.qa_phase * cfg.steps else cfg.qa_rate_late
    prompts, targets, modes = [], [], []
    for p in problems:
        if rng.random() < qa_rate:
            q, a = rng.choice(clarification_pairs(p))
            prompts.append(q), targets.append(a), modes.append(ANSWER)
        else:
            prompts.append(p.question_with_choices())
            targets.append(human_caption_for(p, rng, cfg.fact_rate))
            modes.append(CAPTION)
    pixels = images_to_tensor([p.image for p in problems], cap.cfg.image_size)
    enc = [cap.encode_prompts([pr], m)[0] for pr, m in zip(prompts, modes)]
    width = max(len(e) for e in enc)
    prompt = torch.stack([torch.nn.functional.pad(e, (0, width - len(e))) for e in enc])
    return pixels, prompt, cap.encode_targets(targets)


def evaluate_reading(cap: TinyCaptioner, world: WorldConfig, n: int = 200) -> dict:
    """Clarification-answer accuracy on held-out problems (per family), and what greedy captions mention."""
    problems = make_problems("val", n, world)
    rng = random.Random(0)
    asks = [rng.choice(clarification_pairs(p)) for p in problems]
    answers = cap.answer([p.image for p in problems], [q for q, _ in asks])
    per: dict[str, list[int]] = {}
    right_key = 0
    for p, (q, gold), a in zip(problems, asks, answers):
        per.setdefault(p.family, []).append(int(a.strip() == gold))
        got = dict(language.parse_facts(a))
        right_key += int(language.parse_clarification_question(q) in got)
    roll = cap.generate([p.image for p in problems], [p.question_with_choices() for p in problems], n=1, greedy=True)
    mentioned = correct = needed_hit = needed_total = 0
    for p, (c,) in zip(problems, roll.texts):
        facts = language.parse_facts(c)
        mentioned += len(facts)
        correct += sum(p.facts.get(k) == v for k, v in facts)
        needed_total += len(p.needed)
        needed_hit += sum(k in dict(facts) for k in p.needed)
    return {
        "answer_accuracy": sum(sum(v) for v in per.values()) / n,
        "answer_accuracy_by_family": {f: sum(v) / len(v) for f, v in sorted(per.items())},
        "answer_names_asked_fact": right_key / n,
        "caption_facts_per_caption": mentioned / n,
        "caption_facts_correct": correct / max(mentioned, 1),
        "caption_needed_facts_mentioned": needed_hit / max(needed_total, 1),
        "example_caption": roll.texts[0][0],
    }


def _summary(stats: dict) -> str:
    return (f"answer acc {stats['answer_accuracy']:.3f} {stats['answer_accuracy_by_family']} "
            f"needed-in-caption {stats['caption_needed_facts_mentioned']:.2f}")


def warm_start(out: str, cfg: WarmStartConfig, world: WorldConfig, model_cfg: TinyVLMConfig | None = None,
               log=print, resume: bool = False, overwrite: bool = True) -> TinyCaptioner:
    """Train the world captioner from scratch and save it to ``out`` (``out/model.pt`` appears only when it has
    finished; the latest held-out check is kept in ``out/progress/`` meanwhile, a resumable checkpoint every
    ``cfg.checkpoint_every`` steps; :mod:`acrl.train.supervised`). ``resume``: continue from the newest checkpoint
    (a finished one is returned as it is); ``overwrite``: replace what ``out`` holds (else an existing output is
    refused). Returns it."""
    model_cfg = model_cfg or TinyVLMConfig()
    how = supervised.open_output(out, "captioner warm start", cfg, world, model_cfg, resume, overwrite, log)
    if how == "finished":
        return TinyCaptioner.load(out)
    cap = TinyCaptioner.create(model_cfg, seed=cfg.seed)

    def loss(step: int, rng: random.Random):
        return cap.supervised_loss(*_batch(cap, world, cfg, step, rng))

    task = supervised.Task(cap, loss, lambda: evaluate_reading(cap, world, cfg.eval_n), _summary,
                           save_every=cfg.save_every)
    supervised.train(out, cfg, task, resume=how == "resume", log=log)
    return cap
