"""Learners: a policy with its optimiser, reward view, advantages and update. One per trained model.

- :class:`CaptionerLearner`: the captioner, from the tiered AC-RL reward of the step's episodes (BNPO groups of
  M captions), clipped surrogate + KL to π_ref over the caption tokens.
- :class:`ReasonerLearner`: bidirectional co-training (``train.cotrain``). The paper freezes the reasoner; here it
  also learns from the same episodes: reward ``correct − question_cost × questions asked``, its own advantages
  over the same groups, clipped surrogate + KL to its frozen start over the rows of its replies (the decision
  and the answer after the clarification each carry the episode's advantage). Its replies are sampled at
  ``reasoner_train.temperature`` and recorded (:class:`RecordingReasoner`) while the episodes run.

The loop (:func:`acrl.train.loop.train`) calls every learner the same way: ``learn(step)`` after the step's
episodes, ``save`` / ``load`` inside the run's checkpoints (the captioner: ``policy/`` and its optimiser in
``state.pt``; the reasoner: ``reasoner/`` and ``reasoner_state.pt``). Evaluation stays the paper's: greedy caption,
single pass; a co-trained reasoner replies greedily there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from acrl.config import Config
from acrl.core.advantages import compute_advantages
from acrl.core.reward import reasoner_rewards, tiered_components
from acrl.core.update import UpdateSettings, update
from acrl.problem import Problem
from acrl.rollout.episode import Episode
from acrl.rollout.prompts import decision_prompt, followup_prompt
from acrl.rollout.protocols import Policy, ReplyBatch, TrainableReasoner, concat
from acrl.train.checkpoint import CheckpointError
from acrl.train.distributed import SINGLE, Dist

REASONER_DIR, STATE_FILE = "reasoner", "reasoner_state.pt"


class RecordingReasoner:
    """The trainable reasoner as the episodes' ``Reasoner``: replies sampled at ``temperature``, every sampled
    batch kept (with tokens and log-probs) until :meth:`take`."""

    def __init__(self, inner: TrainableReasoner, temperature: float):
        self.inner, self.temperature = inner, temperature
        self.batches: list[ReplyBatch] = []

    def complete(self, prompts: list[str]) -> list[str]:
        batch = self.inner.sample(prompts, temperature=self.temperature)
        self.batches.append(batch)
        return batch.texts

    def take(self) -> list[ReplyBatch]:
        out, self.batches = self.batches, []
        return out




def episode_prompts(ep: Episode, question: str, max_clarifications: int) -> list[str]:
    """The prompts of the reasoner's replies in ``ep``, in order (as :func:`acrl.rollout.episode.run_episodes` built
    them): the decision, then one follow-up per clarification answered."""
    prompts = [decision_prompt(question, ep.caption)]
    turns = list(zip(ep.questions, ep.clarifications))
    for t in range(1, len(ep.replies)):
        prompts.append(followup_prompt(question, ep.caption, turns[:t], may_ask=t < max_clarifications))
    return prompts


def reply_rows(groups: Sequence[Sequence[Episode]], problems: Sequence[Problem], sampled: list[ReplyBatch],
               max_clarifications: int) -> tuple[ReplyBatch | None, list[tuple[int, int]]]:
    """The reasoner's replies of every valid episode as one batch, and the ``(group, sample)`` of each row.

    A reply is found among the sampled batches by its prompt and text (equal prompts and texts have equal
    tokens and log-probs: the policy did not change while the episodes ran)."""
    where = {(p, t): (b, i) for b in sampled for i, (p, t) in enumerate(zip(b.prompts, b.texts))}
    picked: list[ReplyBatch] = []
    owners: list[tuple[int, int]] = []
    for g, grp in enumerate(groups):
        question = problems[g].question_with_choices()
        for ep in grp:
            if ep.tier == "failed":
                continue
            for prompt, text in zip(episode_prompts(ep, question, max_clarifications), ep.replies):
                if (prompt, text) not in where:
                    raise RuntimeError(f"co-training: episode {ep.problem_id}/{ep.sample} has a reasoner reply "
                                       f"that was not sampled in this step")
                b, i = where[(prompt, text)]
                picked.append(b.select([i]))
                owners.append((g, ep.sample))
    return (concat(picked) if picked else None), owners


def captioner_update_settings(cfg: Config) -> UpdateSettings:
    """The captioner's update knobs (``train.*``; the caption cap normalises ``seq-mean-token-sum-norm``)."""
    tc = cfg.train
    return UpdateSettings(epochs=tc.epochs, micro_batch=tc.micro_batch, clip_low=tc.clip_low, clip_high=tc.clip_high,
                          kl_beta=tc.kl_beta, aggregation=tc.aggregation, grad_clip=tc.grad_clip,
                          length_norm=cfg.captioner.max_new_tokens, tis_cap=tc.tis_cap)


class CaptionerLearner:
    """The captioner π_θ with its optimiser: tiered rewards -> advantages over each group of M -> PPO update.

    Under ``accelerate launch`` every rank holds a replica; the advantages are computed over the gathered batch and
    each rank updates from its own rows (``dist``)."""

    def __init__(self, policy: Policy, cfg: Config, dist: Dist = SINGLE):
        tc = cfg.train
        self.policy, self.tc, self.dist = policy, tc, dist
        dist.broadcast(policy.trainable_parameters())   # every replica starts from rank 0's weights
        self.opt = torch.optim.AdamW(policy.trainable_parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.settings = captioner_update_settings(cfg)

    def learn(self, step, k: int) -> dict:
        """Update π_θ from the episodes of training step ``k`` (0-based, collected by :func:`acrl.train.collect
        .collect`); returns the advantage and update statistics."""
        tc, mine = self.tc, step.mine
        for g in self.opt.param_groups:
            g["lr"] = tc.lr * min(1.0, (k + 1) / tc.warmup) if tc.warmup else tc.lr
        kw = {}
        if tc.advantage == "bnpo_decomposed":
            correct = torch.tensor([[ep.correct for ep in g] for g in step.groups])
            direct = torch.tensor([[ep.tier == "direct_correct" for ep in g] for g in step.groups])
            kw["components"], kw["weights"] = tiered_components(correct, direct, step.alpha)
        adv, ast = compute_advantages(torch.nan_to_num(step.rewards, nan=0.0), tc.advantage, mask=step.valid, **kw)
        self.policy.before_update()
        stats = update(self.policy, self.opt, step.rollout, adv[mine].reshape(-1), step.valid[mine].reshape(-1),
                       self.settings, step.ref, self.dist)
        self.policy.after_update()
        return {**{k: v for k, v in ast.items() if isinstance(v, (int, float))}, **stats,
                "caption_tokens": float(self.dist.all_sum(step.rollout.mask.sum()) / step.rewards.numel()),
                "lr": self.opt.param_groups[0]["lr"]}

    def save(self, checkpoint_dir: str) -> dict:
        self.policy.save(os.path.join(checkpoint_dir, "policy"))
        return {"optimizer": self.opt.state_dict()}

    def load(self, checkpoint_dir: str, blob: dict) -> None:
        """Restore the optimiser (the policy's weights were loaded from the checkpoint's ``policy/``)."""
        try:
            self.opt.load_state_dict(blob["optimizer"])
        except Exception as e:   # noqa: BLE001 - torch raises many kinds; all mean the same to the user
            raise CheckpointError(f"checkpoint {checkpoint_dir} is corrupt: its optimiser state does not fit the "
                                  f"policy ({type(e).__name__})") from None


class ReasonerLearner:
    """The reasoner's optimiser and update in a co-training run (see the module docstring).

    ``reasoner``: the trainable reasoner (its frozen start is its KL anchor); ``cfg``: the run's full config
    (``reasoner_train``, ``train.max_clarifications``)."""

    def __init__(self, reasoner: TrainableReasoner, cfg):
        self.reasoner, self.cfg, self.rt = reasoner, cfg, cfg.reasoner_train
        self.recorder = RecordingReasoner(reasoner, self.rt.temperature)
        self.opt = torch.optim.AdamW(reasoner.trainable_parameters(), lr=self.rt.lr, weight_decay=self.rt.weight_decay)
        self.settings = UpdateSettings(
            epochs=1, micro_batch=self.rt.micro_batch, clip_low=self.rt.clip_low, clip_high=self.rt.clip_high,
            kl_beta=self.rt.kl_beta, aggregation=self.rt.aggregation, grad_clip=self.rt.grad_clip,
            length_norm=reasoner.max_new_tokens)

    def _set_lr(self, step: int) -> float:
        lr = self.rt.lr * min(1.0, (step + 1) / self.rt.warmup) if self.rt.warmup else self.rt.lr
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr

    def advantages(self, rewards: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, dict]:
        kw = {}
        if self.rt.advantage == "bnpo":   # rewards lie in [-cost * K, 1]
            kw = {"min_value": -self.rt.question_cost * self.cfg.train.max_clarifications, "max_value": 1.0}
        return compute_advantages(rewards, self.rt.advantage, mask=valid, **kw)

    def learn(self, step, k: int) -> dict:
        """One update of the reasoner from the episodes of training step ``k`` (0-based); its metrics
        (``reasoner_*``)."""
        return self.update(step.groups, step.problems, k)

    def update(self, groups: Sequence[Sequence[Episode]], problems: Sequence[Problem], step: int) -> dict:
        """One update of the reasoner from the step's episodes; returns its metrics (``reasoner_*``)."""
        sampled = self.recorder.take()
        rewards, valid = reasoner_rewards(groups, self.rt.question_cost)
        adv, ast = self.advantages(rewards, valid)
        batch, owners = reply_rows(groups, problems, sampled, self.cfg.train.max_clarifications)
        rec = {"reasoner_reward": float(rewards[valid].mean()) if bool(valid.any()) else 0.0,
               "reasoner_lr": self._set_lr(step), "reasoner_rows": len(owners),
               "reasoner_adv_abs_mean": float(ast.get("adv_abs_mean", 0.0)),
               "reasoner_uniform_frac": float(ast.get("uniform_frac", 0.0))}
        if batch is None:
            return rec
        row_adv = torch.stack([adv[g, i] for g, i in owners]).float()
        stats = update(self.reasoner, self.opt, batch, row_adv, torch.ones(len(owners), dtype=torch.bool),
                       self.settings)
        rec.update({f"reasoner_{k}": v for k, v in stats.items()})
        return rec

    # --- checkpoints: written inside the run's checkpoint directory -------------------------------------------
    def save(self, checkpoint_dir: str) -> dict:
        self.reasoner.save(os.path.join(checkpoint_dir, REASONER_DIR))
        torch.save({"optimizer": self.opt.state_dict()}, os.path.join(checkpoint_dir, STATE_FILE))
        return {}

    def load(self, checkpoint_dir: str, blob: dict | None = None) -> None:
        """Restore the optimiser of a checkpoint (the reasoner's weights were loaded from its ``reasoner/``)."""
        path = os.path.join(checkpoint_dir, STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {checkpoint_dir} has no {STATE_FILE}: it is not a co-training "
                                    f"checkpoint (resume it without train.cotrain)")
        try:
            self.opt.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["optimizer"])
        except Exception as e:   # noqa: BLE001 - torch raises many kinds; all mean the same to the user
            raise ValueError(f"checkpoint {path} is corrupt ({type(e).__name__})") from None
