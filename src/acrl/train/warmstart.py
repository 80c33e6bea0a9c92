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

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict

import torch

from acrl import outdir
from acrl.backends.tiny import TinyCaptioner, images_to_tensor
from acrl.backends.tiny.nn import ANSWER, CAPTION
from acrl.config import TinyVLMConfig, WarmStartConfig
from acrl.train import checkpoint
from acrl.train.run import truncate_jsonl
from acrl.world import WorldConfig, clarification_pairs, human_caption_for, language, make_problems

PROGRESS = "progress"   # OUT/progress/: the model of the latest held-out check while a warm start runs
STATE = "state.pt"      # in OUT/checkpoint-<n>/: model, optimiser, data order and running loss after step n


# --- the output directory and resumable checkpoints, shared by the captioner and the reasoner warm starts ----------

def open_output(out: str, resume: bool, overwrite: bool, what: str, spec: dict | None = None) -> str:
    """Claim ``out`` (one owner) and say how to start: ``"finished"`` (``resume`` of a finished warm start: nothing
    to do), ``"resume"`` (continue from the newest checkpoint) or ``"fresh"``. An existing output is refused unless
    ``resume`` or ``overwrite`` (then emptied first); a resumed one must have been started with the same ``spec``
    (its settings)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the warm start, or replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a directory")
    outdir.own(out, f"acrl warmstart ({what})")
    finished = os.path.exists(os.path.join(out, "model.pt"))
    have = outdir.contents(out)
    if have and not (resume or overwrite):
        raise outdir.OutputExists(
            f"--out {out} holds a finished {what} (model.pt); pass --overwrite to replace it" if finished else
            f"--out {out} holds an interrupted {what} ({', '.join(have[:3])}); continue it with --resume or replace "
            f"it with --overwrite")
    if have and overwrite:
        outdir.clear(out)
    elif have and spec is not None and os.path.exists(os.path.join(out, outdir.SPEC)):
        outdir.same_job(out, spec)
    if spec is not None:
        outdir.write_json(os.path.join(out, outdir.SPEC), spec)
    if have and overwrite:
        return "fresh"
    if finished:
        drop_checkpoints(out)   # a kill between publishing the model and removing them
        return "finished"
    return "resume" if have else "fresh"


def save_state(out: str, step: int, model, opt, rng: random.Random, running: float | None, seconds: float) -> None:
    """A resumable checkpoint after ``step`` (written whole or not at all, see :mod:`acrl.train.checkpoint`)."""
    state = {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.getstate(),
             "torch_rng": torch.get_rng_state(), "running": running, "seconds": seconds}
    checkpoint.save(out, step, lambda d: torch.save(state, os.path.join(d, STATE)), keep=1)


def load_state(out: str, model, opt, rng: random.Random, log_path: str, log=print) -> tuple[int, float | None, float]:
    """Restore the newest complete checkpoint in ``out``: (step, running loss, seconds so far); (0, None, 0.0) when
    there is none. The log keeps only the records the checkpoint covers."""
    found = checkpoint.latest(out)
    for why in found.skipped or []:
        log(f"resume: skipping {why}")
    if found.path is None or not os.path.exists(os.path.join(found.path, STATE)):
        log(f"resume: {out} has no complete checkpoint yet; starting from step 0")
        with contextlib.suppress(FileNotFoundError):
            os.remove(log_path)
        return 0, None, 0.0
    st = torch.load(os.path.join(found.path, STATE), map_location="cpu", weights_only=False)
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    rng.setstate(st["rng"])
    torch.set_rng_state(st["torch_rng"])
    for msg in truncate_jsonl(log_path, st["step"]):
        log(f"resume: {msg}")
    log(f"resume: continuing from {found.path} (step {st['step']})")
    return st["step"], st["running"], st["seconds"]


def drop_checkpoints(out: str) -> None:
    for name in os.listdir(out):
        if name.startswith(("checkpoint", ".checkpoint")):
            p = os.path.join(out, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)




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


def evaluate_reading(cap: TinyCaptioner, world: WorldConfig, n: int = 200, policy: bool = False) -> dict:
    """Clarification-answer accuracy on held-out problems (per family), and what greedy captions mention."""
    problems = make_problems("val", n, world)
    rng = random.Random(0)
    asks = [rng.choice(clarification_pairs(p)) for p in problems]
    fn = cap.policy_answer if policy else cap.answer
    answers = fn([p.image for p in problems], [q for q, _ in asks])
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


def lr_at(cfg, step: int) -> float:
    """The warm starts' learning rate at ``step``: linear warm-up over ``cfg.warmup`` steps, then cosine decay to
    a tenth of ``cfg.lr`` at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def warm_start(out: str, cfg: WarmStartConfig, world: WorldConfig, model_cfg: TinyVLMConfig | None = None,
               log=print, resume: bool = False, overwrite: bool = True) -> TinyCaptioner:
    """Train the world captioner from scratch and save it to ``out`` (``out/model.pt`` appears only when it has
    finished; the latest held-out check is kept in ``out/progress/`` meanwhile, a resumable checkpoint every
    ``cfg.checkpoint_every`` steps). ``resume``: continue from the newest checkpoint (a finished one is returned
    as it is); ``overwrite``: replace what ``out`` holds (else an existing output is refused). Returns it."""
    spec = {"warmstart": asdict(cfg), "world": asdict(world), "model": asdict(model_cfg or TinyVLMConfig())}
    spec["warmstart"].pop("checkpoint_every")   # how often it is saved does not change what it computes
    how = open_output(out, resume, overwrite, "captioner warm start", spec)
    if how == "finished":
        log(f"warmstart: {out} is already finished")
        return TinyCaptioner.load(out)
    torch.manual_seed(cfg.seed)
    cap = TinyCaptioner.create(model_cfg, seed=cfg.seed)
    model = cap.model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    rng = random.Random(cfg.seed)
    log_path = os.path.join(out, "warmstart_log.jsonl")
    first, running, before = load_state(out, model, opt, rng, log_path, log) if how == "resume" else (0, None, 0.0)
    t0 = time.time() - before
    if cfg.save_every and first == 0:
        cap.save(os.path.join(out, "step-0"))   # the untrained captioner, for an untrained π_ref
    with open(log_path, "a" if first else "w") as logf:
        for step in range(first, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            pixels, prompt, targets = _batch(cap, world, cfg, step, rng)
            loss = cap.supervised_loss(pixels, prompt, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            last = step + 1 == cfg.steps
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and not last:
                cap.save(os.path.join(out, f"step-{step + 1}"))
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
                cap.ref_model.load_state_dict(model.state_dict())
                stats = evaluate_reading(cap, world, cfg.eval_n)
                rec = {"step": step + 1, "loss": round(running, 4), "seconds": round(time.time() - t0, 1), **stats}
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log(f"warmstart step {step + 1}/{cfg.steps} loss {running:.3f} answer acc "
                    f"{stats['answer_accuracy']:.3f} {stats['answer_accuracy_by_family']} "
                    f"needed-in-caption {stats['caption_needed_facts_mentioned']:.2f} ({time.time() - t0:.0f}s)")
                if not last:   # the check's model, apart: OUT/model.pt means a finished warm start
                    cap.save(os.path.join(out, PROGRESS))
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and not last:
                save_state(out, step + 1, model, opt, rng, running, time.time() - t0)
    cap.ref_model.load_state_dict(model.state_dict())
    checkpoint.publish(cap.save, out)
    shutil.rmtree(os.path.join(out, PROGRESS), ignore_errors=True)
    drop_checkpoints(out)
    return cap
