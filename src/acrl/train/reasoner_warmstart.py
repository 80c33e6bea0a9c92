"""Supervised warm start of the world's trainable reasoner on transcripts of the world reasoner.

Every batch is drawn fresh from the world's ``train`` split. Each problem gets a description (an oracle caption
with every fact, or a human-style caption stating each fact with some probability; sometimes with a repeated, a
contradicting or a wrong statement, as a trained captioner writes them) and one of the reasoner's prompts:

- the decision prompt (it may ask): the world reasoner asks about the first missing fact, else solves;
- the final prompt after one clarification (the question it would ask, or another one; π_ref's answer, sometimes
  "i cannot tell" or a wrong value): it solves, guessing the middle of a fact's range when it still lacks it;
- the single-pass and the denied prompt (it must answer from the description).

The target is the world reasoner's decision written as the tiny reasoner writes it (:func:`transcript`): the
question, or ``SOLVED`` + the working + ``\\boxed{answer}``. The working restates each needed fact with the value
the world reasoner read (``red bar = 7``; a guess where it lacks one) and then does the arithmetic, one operation
per step, so the model has to find the facts in the text and compute the answer from them; nothing in the prompt
states it.

Held-out checks (:func:`evaluate_reasoner`, ``val`` split): well-formed replies, accuracy with oracle captions,
asking about a missing fact (and whether that question is answerable), accuracy after the clarification, and
agreement with the world reasoner.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict

from acrl.backends.tiny import TinyReasoner
from acrl.backends.tiny.captioner import _TOKEN
from acrl.backends.tiny.reasoner import ASK, BOX_CLOSE, BOX_OPEN, SOLVED
from acrl.config import ReasonerWarmStartConfig, TinyReasonerConfig
from acrl.rollout.answers import grade_problem
from acrl.rollout.prompts import decision_prompt, deny_prompt, final_prompt, parse_prompt, single_pass_prompt
from acrl.rollout.replies import parse_reply
from acrl.train import supervised
from acrl.world import WorldConfig, language, make_problems, oracle_caption_for
from acrl.world.reasoner import WorldReasoner

# --- transcripts -------------------------------------------------------------------------------------------------

def _num(x: float) -> list[str]:
    s = language.format_number(x)
    return ["-", s[1:]] if s.startswith("-") else [s]


def fact_words(key: str) -> list[str]:
    """How the working names a fact: ``bar.red`` -> ``red bar``, ``count.blue`` -> ``blue shapes``,
    ``rect.width`` -> ``rectangle wide``, ``tri.base`` -> ``triangle base``."""
    kind, slot = key.split(".")
    if kind == "bar":
        return [slot, "bar"]
    if kind == "count":
        return [slot, "shapes"]
    if kind == "rect":
        return ["rectangle", "wide" if slot == "width" else "tall"]
    return ["triangle", slot]


def working(op: str, values: list[int], keys: list[str] | None = None) -> list[str]:
    """The working of an answer: each needed fact restated with the value used (``red bar = 7``), then the
    arithmetic of ``op``, one operation per step (``7 + 3 = 10 ; 10 + 5 = 15``)."""
    steps: list[list[str]] = [fact_words(k) + ["="] + _num(v) for k, v in zip(keys or [], values)]
    if op == "sum":
        acc = values[0]
        for v in values[1:]:
            steps.append(_num(acc) + ["+"] + _num(v) + ["="] + _num(acc + v))
            acc += v
    elif op == "diff":
        steps.append(_num(values[0]) + ["-"] + _num(values[1]) + ["="] + _num(values[0] - values[1]))
    elif op == "product":
        steps.append(_num(values[0]) + ["*"] + _num(values[1]) + ["="] + _num(values[0] * values[1]))
    elif op == "perimeter":
        s = values[0] + values[1]
        steps += [_num(values[0]) + ["+"] + _num(values[1]) + ["="] + _num(s), _num(s) + ["*", "2", "="] + _num(2 * s)]
    elif op == "half_product":
        p = values[0] * values[1]
        steps += [_num(values[0]) + ["*"] + _num(values[1]) + ["="] + _num(p), _num(p) + ["/", "2", "="] + _num(p / 2)]
    elif op != "first":
        raise ValueError(f"unknown op {op!r}")
    return [w for i, s in enumerate(steps) for w in ([";"] if i else []) + s]


def transcript(prompt: str, world: WorldReasoner) -> list[str]:
    """The world reasoner's reply to ``prompt`` as the tiny reasoner writes it (reply words)."""
    reply = parse_reply(world.reply(prompt))
    if reply.kind == "ask":
        return [ASK] + world_words(reply.question)
    sec = parse_prompt(prompt)
    answer = reply.answer or "0"
    match = language.match_question(sec["question"] or "")
    if match is None:
        return [SOLVED, BOX_OPEN] + _num(float(answer)) + [BOX_CLOSE]
    template, needed = match
    known, _ = world.read(sec["caption"] or "", world.read_budget)
    if sec["clarification"]:
        known.update(world.read(sec["clarification"], None)[0])
    values = [known.get(k, language.guess_value(k)) for k in needed]
    boxed = [answer] if answer.isalpha() else _num(float(answer))
    return [SOLVED] + working(template.op, values, needed) + [BOX_OPEN] + boxed + [BOX_CLOSE]


def world_words(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


# --- training data -----------------------------------------------------------------------------------------------

def training_caption(p, rng: random.Random, oracle_rate: float) -> str:
    """A description of problem ``p`` as captioners write them (see the module docstring)."""
    scene = p.meta["scene"]
    base = oracle_caption_for(p).split(" ; ")[0]
    remarks = language.remarks(p.family, p.facts, scene)
    if rng.random() < oracle_rate:
        stated = dict(p.facts)
    else:
        rate = rng.choice([0.0, 0.3, 0.5, 0.8])
        stated = {k: v for k, v in p.facts.items() if rng.random() < rate}
    parts = [language.fact_sentence(k, v) for k, v in stated.items()]
    parts += rng.sample(remarks, k=rng.randint(0, len(remarks)))
    rng.shuffle(parts)
    u = rng.random()
    if stated and u < 0.08:                          # a fact stated twice (the same value)
        k = rng.choice(list(stated))
        parts.insert(rng.randrange(len(parts) + 1), language.fact_sentence(k, stated[k]))
    elif stated and u < 0.14:                        # a contradiction: the world reasoner does not trust it
        k = rng.choice(list(stated))
        lo, hi = language.FACT_KINDS[k.split(".")[0]][3]
        parts.insert(rng.randrange(len(parts) + 1), language.fact_sentence(k, rng.randint(lo, hi)))
    elif parts and u < 0.22:                         # a wrong value (the reasoner reads what is written)
        k = rng.choice(list(p.facts))
        lo, hi = language.FACT_KINDS[k.split(".")[0]][3]
        parts.append(language.fact_sentence(k, rng.randint(lo, hi)))
    elif u < 0.28:                                   # filler that pushes facts out of the read budget
        parts = [rng.choice(remarks)] * rng.randint(2, 5) + parts
    return " ; ".join([base] + parts)


def _missing(p, caption: str, world: WorldReasoner) -> list[str]:
    known, _ = world.read(caption, world.read_budget)
    return [k for k in p.needed if k not in known]


def training_prompt(p, rng: random.Random, cfg: ReasonerWarmStartConfig, world: WorldReasoner) -> str:
    """One reasoner prompt about ``p`` (decision, final, single-pass or denied; see the module docstring)."""
    q = p.question_with_choices()
    u = rng.random()
    caption = training_caption(p, rng, cfg.oracle_rate if u >= cfg.final_rate else cfg.oracle_rate / 3)
    if u < cfg.final_rate:
        missing = _missing(p, caption, world)
        key = missing[0] if missing and rng.random() < 0.85 else rng.choice(list(p.facts))
        v = rng.random()
        if v < 0.1:
            answer = "i cannot tell"
        elif v < 0.2:
            lo, hi = language.FACT_KINDS[key.split(".")[0]][3]
            answer = language.fact_sentence(key, rng.randint(lo, hi))
        else:
            answer = language.clarification_answer(key, p.facts)
        return final_prompt(q, caption, language.clarification_question(key), answer)
    if u < cfg.final_rate + cfg.single_rate:
        if rng.random() < 0.8:
            return single_pass_prompt(q, caption)
        return deny_prompt(q, caption, language.clarification_question(rng.choice(list(p.facts))))
    return decision_prompt(q, caption)


def training_batch(reasoner: TinyReasoner, world_cfg: WorldConfig, cfg: ReasonerWarmStartConfig, step: int,
                   rng: random.Random, teacher: WorldReasoner) -> tuple[list[list[int]], list[list[int]]]:
    problems = make_problems("train", cfg.batch_size, world_cfg, start=(step * cfg.batch_size) % 900_000_000)
    prompts = [training_prompt(p, rng, cfg, teacher) for p in problems]
    targets = [reasoner.tokenizer.reply_ids(transcript(pr, teacher)) for pr in prompts]
    return reasoner.encode(prompts), targets


# --- held-out checks ---------------------------------------------------------------------------------------------

def _human_missing_one(p, rng: random.Random, world: WorldReasoner) -> tuple[str, str]:
    """A human-style caption that lacks exactly one needed fact (and that fact)."""
    key = rng.choice(p.needed)
    stated = {k: v for k, v in p.facts.items() if k != key}
    parts = [language.fact_sentence(k, v) for k, v in stated.items()] + [rng.choice(language.remarks(
        p.family, p.facts, p.meta["scene"]))]
    rng.shuffle(parts)
    return " ; ".join([oracle_caption_for(p).split(" ; ")[0]] + parts), key


def evaluate_reasoner(reasoner, world_cfg: WorldConfig, n: int = 300, read_budget: int = 6,
                      split: str = "val") -> dict:
    """Held-out protocol checks of a reasoner (any ``Reasoner``) on ``n`` problems of ``split``:

    - ``oracle_accuracy``: decision prompt with an oracle caption; SOLVED with the right answer;
    - ``missing_ask_rate``: decision prompt with a caption lacking one needed fact; it asks, and
      ``missing_question_answerable``: the question is about that missing fact (π_ref can answer it);
    - ``clarified_accuracy``: the final prompt after that question and its true answer;
    - ``single_pass_accuracy``: the single-pass prompt with the oracle caption;
    - ``well_formed``: share of all those replies that follow the protocol (SOLVED with an answer, or one
      question where it may ask); ``agreement``: share that say what the world reasoner says.
    """
    problems = make_problems(split, n, world_cfg)
    rng = random.Random(0)
    teacher = WorldReasoner(read_budget=read_budget)
    kinds, prompts, keys = [], [], []
    for p in problems:
        q = p.question_with_choices()
        oracle = oracle_caption_for(p)
        partial, key = _human_missing_one(p, rng, teacher)
        asked = language.clarification_question(key)
        for kind, prompt in (("oracle", decision_prompt(q, oracle)), ("missing", decision_prompt(q, partial)),
                             ("clarified", final_prompt(q, partial, asked, language.clarification_answer(
                                 key, p.facts))), ("single", single_pass_prompt(q, oracle))):
            kinds.append(kind), prompts.append(prompt), keys.append(key)
    replies = reasoner.complete(prompts)
    stats = {k: [] for k in ("oracle", "missing", "answerable", "clarified", "single", "formed", "agree")}
    for i, (kind, prompt, key, text) in enumerate(zip(kinds, prompts, keys, replies)):
        p = problems[i // 4]
        r = parse_reply(text)
        w = parse_reply(teacher.reply(prompt))
        may_ask = kind == "missing" or kind == "oracle"
        stats["formed"].append(r.kind == "solved" or (r.kind == "ask" and may_ask))
        stats["agree"].append(r.kind == w.kind and (r.answer == w.answer if r.kind == "solved"
                                                    else language.parse_clarification_question(r.question or "")
                                                    == language.parse_clarification_question(w.question or "")))
        correct = r.kind == "solved" and bool(grade_problem(r.answer, p))
        if kind == "missing":
            stats["missing"].append(r.kind == "ask")
            stats["answerable"].append(r.kind == "ask" and language.parse_clarification_question(
                r.question or "") == key)
        else:
            stats[kind].append(correct)

    def rate(v):
        return sum(v) / max(len(v), 1)

    return {"oracle_accuracy": rate(stats["oracle"]), "missing_ask_rate": rate(stats["missing"]),
            "missing_question_answerable": rate(stats["answerable"]),
            "clarified_accuracy": rate(stats["clarified"]), "single_pass_accuracy": rate(stats["single"]),
            "well_formed": rate(stats["formed"]), "agreement": rate(stats["agree"]), "n": n,
            "example": replies[0]}


# --- the warm start ----------------------------------------------------------------------------------------------

def _summary(stats: dict) -> str:
    return (f"oracle acc {stats['oracle_accuracy']:.3f} asks {stats['missing_ask_rate']:.3f} clarified "
            f"{stats['clarified_accuracy']:.3f} well-formed {stats['well_formed']:.3f} agreement "
            f"{stats['agreement']:.3f}")


def warm_start_reasoner(out: str, cfg: ReasonerWarmStartConfig, world_cfg: WorldConfig,
                        model_cfg: TinyReasonerConfig | None = None, log=print, resume: bool = False,
                        overwrite: bool = True) -> TinyReasoner:
    """Train the tiny reasoner from scratch on world-reasoner transcripts; save it (its log and ``heldout.json``)
    to ``out``. Checkpoints, ``resume`` and ``overwrite`` as :func:`acrl.train.warmstart.warm_start`."""
    model_cfg = model_cfg or TinyReasonerConfig()
    how = supervised.open_output(out, "reasoner warm start", cfg, world_cfg, model_cfg, resume, overwrite, log)
    if how == "finished":
        return TinyReasoner.load(out)
    reasoner = TinyReasoner.create(model_cfg, seed=cfg.seed)
    teacher = WorldReasoner(read_budget=cfg.read_budget)

    def loss(step: int, rng: random.Random):
        return reasoner.supervised_loss(*training_batch(reasoner, world_cfg, cfg, step, rng, teacher))

    header = {"config": asdict(cfg), "world": asdict(world_cfg), "model": asdict(reasoner.cfg),
              "parameters": reasoner.num_parameters()}
    task = supervised.Task(reasoner, loss, lambda: evaluate_reasoner(reasoner, world_cfg, cfg.eval_n, cfg.read_budget),
                           _summary, name="reasoner warmstart", header=header,
                           finish=lambda d: write_heldout(d, reasoner, world_cfg, cfg.read_budget))
    supervised.train(out, cfg, task, resume=how == "resume", log=log)
    return reasoner


def write_heldout(out: str, reasoner, world_cfg: WorldConfig, read_budget: int = 6, n: int = 1000) -> dict:
    """``out/heldout.json``: :func:`evaluate_reasoner` of ``reasoner`` and of its teacher on ``n`` test problems."""
    rec = {"split": "test", "n": n, "parameters": reasoner.num_parameters(),
           "tiny_reasoner": evaluate_reasoner(reasoner, world_cfg, n, read_budget, split="test"),
           "world_reasoner (the teacher)": evaluate_reasoner(WorldReasoner(read_budget), world_cfg, n, read_budget,
                                                             split="test")}
    with open(os.path.join(out, "heldout.json"), "w") as fh:
        json.dump(rec, fh, indent=1)
    return rec
