"""AC-RL's tiered reward as a reward function for TRL's ``GRPOTrainer``.

TRL owns the policy, the sampling and the update; AC-RL supplies the environment: each completion is a caption
``c0`` that the frozen reasoner reads, may ask one clarification question about (answered from the image by the
reference π_ref), and answers. The reward is the tiered reward of :mod:`acrl.rollout.episode` (1 correct without
clarification, ``alpha`` correct after one, 0 wrong)::

    from trl import GRPOConfig, GRPOTrainer
    from acrl.world.reasoner import WorldReasoner
    from acrl.integrations.trl import adapter_disabled_clarifier, make_acrl_reward, world_dataset

    reward = make_acrl_reward(WorldReasoner(), clarifier=None, alpha=0.7)
    trainer = GRPOTrainer(model=model, processing_class=processor, reward_funcs=[reward],
                          train_dataset=world_dataset(1024), peft_config=LoraConfig(...), args=GRPOConfig(...))
    reward.clarifier = adapter_disabled_clarifier(trainer.model, processor)   # π_ref = policy, adapter off
    trainer.train()

The reward function has TRL's signature ``(prompts, completions, **columns) -> list[float | None]``. It rebuilds a
:class:`~acrl.problem.Problem` per prompt from the dataset columns (``image``, ``question``, ``answer``,
``answer_type``, ``choices``, ``tolerance``, ``problem_id``), runs all completions of the call as one batch of
episodes (:func:`acrl.rollout.episode.run_episodes`, clarification on) and returns the tiered rewards. A failed episode
(the reasoner or clarifier service gave up) returns ``None``: TRL 1.16 turns it into NaN, leaves it out of its
group's baseline and gives it a zero advantage, as AC-RL's own trainer does. Episode rates go to TRL's logs via
``log_metric`` (``acrl/clarification_rate``, ``acrl/direct_correct``, ...) and the tier of each completion via
``log_extra`` (the completions table).

The reference π_ref must stay frozen while TRL trains the policy. Two ways:

* :func:`adapter_disabled_clarifier` over TRL's PEFT model: the policy's own weights with the LoRA adapter
  disabled (what AC-RL's trainer does; no second copy in memory). Build it after ``GRPOTrainer(...)`` has wrapped
  the model and assign it to ``reward.clarifier``.
* :func:`frozen_clarifier`: a separate frozen copy loaded from the starting checkpoint (full fine-tuning, or to
  keep π_ref on another device), or any other ``Clarifier``, e.g. a served VLM
  (:class:`acrl.backends.openai_api.OpenAIClarifier`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image

from acrl.backends.hf.captioner import HFCaptioner
from acrl.backends.hf.checkpoint import load_merged_model, resolve_checkpoint
from acrl.backends.hf.loading import load_processor
from acrl.config import HFSettings
from acrl.data.parsing import answer_type_of
from acrl.data.records import compose_images
from acrl.problem import Problem
from acrl.rollout.episode import Episode, EpisodeConfig, run_episodes
from acrl.rollout.metrics import episode_metrics
from acrl.rollout.prompts import captioner_prompt
from acrl.rollout.protocols import Clarifier, Reasoner
from acrl.world import WorldConfig, make_problems

__all__ = [
    "ACRLReward", "make_acrl_reward", "completion_text", "problem_from_columns", "world_dataset",
    "world_dataset_rows", "adapter_disabled_clarifier", "frozen_clarifier", "METRICS",
]

# episode_metrics keys logged through TRL's ``log_metric`` (as ``acrl/<key>``)
METRICS = ("clarification_rate", "direct_correct", "accuracy", "clarified_accuracy", "malformed", "ambiguous",
           "failed")
_TRL_ONLY = ("trainer_state", "completion_ids", "environments", "log_metric", "log_extra")


# --- reading TRL's inputs ----------------------------------------------------------------------------------------

def completion_text(completion: Any) -> str:
    """The caption in one TRL completion: a plain string, or a conversational completion (a list of messages, of
    which the last assistant turn counts; its content a string or a list of ``{"type": "text"}`` blocks)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    if isinstance(completion, Sequence):
        msgs = [m for m in completion if isinstance(m, Mapping)]
        turns = [m for m in msgs if m.get("role", "assistant") == "assistant"] or msgs
        if turns:
            content = turns[-1].get("content")
            if content is None:
                return ""
            if isinstance(content, str):
                return content
            return "".join(b.get("text") or "" for b in content if isinstance(b, Mapping) and b.get("type") == "text")
    raise TypeError(f"cannot read a caption from a completion of type {type(completion).__name__}: {completion!r}")


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _image(value: Any) -> Image.Image:
    if isinstance(value, (list, tuple)):
        imgs = [v for v in value if v is not None]
        if len(imgs) == 1:
            return _image(imgs[0])
        if imgs:
            return compose_images([_image(v) for v in imgs], labels=[f"image {k}" for k in range(1, len(imgs) + 1)])
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, Mapping) and (value.get("bytes") or value.get("path")):   # an undecoded datasets Image
        import io

        return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    raise ValueError(f"the image column holds {type(value).__name__}, not an image")


def problem_from_columns(columns: Mapping[str, Sequence[Any]], i: int, problem_id: str | None = None,
                         image_key: str = "image") -> Problem:
    """The :class:`Problem` of row ``i`` of TRL's reward columns.

    Needs ``question`` and ``answer`` and an image (``image_key``, or ``images``); reads ``answer_type``,
    ``choices`` (a list of option texts; empty: none) and ``tolerance`` when present. Without ``answer_type``,
    options make it ``multiple_choice`` and otherwise it is inferred from the answer.
    """
    def col(name: str, default: Any = None) -> Any:
        return columns[name][i] if name in columns else default

    missing = [c for c in ("question", "answer") if c not in columns]
    img_col = image_key if image_key in columns else "images" if "images" in columns else None
    if img_col is None:
        missing.append(image_key)
    if missing:
        raise KeyError(f"the AC-RL reward needs the dataset column(s) {missing} (have: {sorted(columns)}); "
                       "acrl.integrations.trl.world_dataset shows the expected layout")
    answer = str(col("answer"))
    choices = col("choices")
    choices = [str(c) for c in choices] if choices else None
    answer_type = col("answer_type")
    if _missing(answer_type) or not answer_type:
        answer_type = "multiple_choice" if choices else answer_type_of(answer)
    tol = col("tolerance")
    return Problem(id=str(problem_id if problem_id is not None else f"row-{i}"), image=_image(col(img_col)),
                   question=str(col("question")), answer=answer, answer_type=str(answer_type), choices=choices,
                   tolerance=None if _missing(tol) else float(tol), source="trl")


# --- the reward function -----------------------------------------------------------------------------------------

class ACRLReward:
    """A TRL reward function running AC-RL episodes; build it with :func:`make_acrl_reward`.

    ``reasoner`` and ``clarifier`` are plain attributes: the clarifier may be assigned after the trainer exists
    (see :func:`adapter_disabled_clarifier`). ``last_episodes`` holds the episode groups of the latest call.
    """

    def __init__(self, reasoner: Reasoner, clarifier: Clarifier | None, alpha: float = 0.7,
                 problem_key: str | None = "problem_id", problems: Mapping[str, Problem] | Sequence[Problem] | None
                 = None, image_key: str = "image", clarification: str = "on", name: str = "acrl"):
        self.reasoner, self.clarifier = reasoner, clarifier
        self.config = EpisodeConfig(alpha=alpha, clarification=clarification)
        self.problem_key, self.image_key = problem_key, image_key
        if problems is not None and not isinstance(problems, Mapping):
            problems = {p.id: p for p in problems}
        self.problems: Mapping[str, Problem] = problems or {}
        self.__name__ = name        # TRL names the reward's log entries after it (rewards/<name>/mean)
        self.last_episodes: list[list[Episode]] = []

    def _groups(self, columns: Mapping[str, Sequence[Any]], n: int) -> tuple[list[list[int]], list[str | None]]:
        """Rows of one problem: consecutive rows with the same ``problem_key`` (TRL repeats each prompt
        ``num_generations`` times in a row). Without the key column every row is its own problem."""
        if not self.problem_key or self.problem_key not in columns:
            return [[i] for i in range(n)], [None] * n
        keys = [str(k) for k in columns[self.problem_key]]
        groups: list[list[int]] = []
        for i in range(n):
            if groups and keys[groups[-1][0]] == keys[i]:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups, keys

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None,
                 **columns: Any) -> list[float | None]:
        if completions is None:
            raise TypeError("the AC-RL reward needs `completions` (TRL passes them by keyword)")
        log_metric: Callable[[str, float], None] | None = columns.get("log_metric")
        log_extra: Callable[[str, list], None] | None = columns.get("log_extra")
        columns = {k: v for k, v in columns.items() if k not in _TRL_ONLY}
        n = len(completions)
        bad = [k for k, v in columns.items() if isinstance(v, (list, tuple)) and len(v) != n]
        if bad:
            raise ValueError(f"columns {bad} do not have one value per completion ({n})")
        if self.config.clarification == "on" and self.clarifier is None:
            raise ValueError("the AC-RL reward has no clarifier (π_ref): pass one to make_acrl_reward or assign "
                             "reward.clarifier, e.g. adapter_disabled_clarifier(trainer.model, processor)")
        texts = [completion_text(c) for c in completions]
        groups, keys = self._groups(columns, n)
        problems = []
        for g in groups:
            key = keys[g[0]]
            known = self.problems.get(key) if key is not None else None
            problems.append(known or problem_from_columns(columns, g[0], key, self.image_key))
        episodes = run_episodes(problems, [[texts[i] for i in g] for g in groups], self.reasoner, self.clarifier,
                                self.config)
        rewards: list[float | None] = [None] * n
        tiers = [""] * n
        for g, grp in zip(groups, episodes):
            for i, ep in zip(g, grp):
                rewards[i] = None if ep.tier == "failed" else float(ep.reward)
                tiers[i] = ep.tier
        self.last_episodes = episodes
        if log_metric is not None:
            m = episode_metrics(episodes)
            for k in METRICS:
                value = m[k] / max(m["episodes"], 1) if k in ("malformed", "ambiguous", "failed") else m[k]
                log_metric(f"acrl/{k}", float(value))
        if log_extra is not None:
            log_extra("acrl_tier", tiers)
        return rewards


def make_acrl_reward(reasoner: Reasoner, clarifier: Clarifier | None, alpha: float = 0.7,
                     problem_key: str | None = "problem_id",
                     problems: Mapping[str, Problem] | Sequence[Problem] | None = None, image_key: str = "image",
                     clarification: str = "on", name: str = "acrl") -> ACRLReward:
    """AC-RL's tiered reward as a TRL reward function (``reward_funcs=[make_acrl_reward(...)]``).

    Args:
        reasoner: the frozen text-only reasoner (``WorldReasoner``, ``OpenAIReasoner``, ``HFReasoner``, ...).
        clarifier: π_ref answering the reasoner's clarification question from the image; ``None`` to assign it
            later (``reward.clarifier = ...``) once TRL has built the PEFT model.
        alpha: reward of a correct answer after one clarification (0.7 in the paper; 0 = binary ablation).
        problem_key: dataset column identifying a problem; consecutive completions with the same key form one
            episode group and share one rebuilt :class:`Problem`. ``None`` or absent: one problem per row.
        problems: optional known problems by id (or a list, keyed by ``Problem.id``): a row whose key is found
            uses that object (its image, facts, grading metadata) instead of one rebuilt from the columns.
        image_key: the image column (``images`` with a list is also read).
        clarification: ``on`` (training, the default), ``deny`` or ``off`` (see :class:`EpisodeConfig`).
        name: the reward's name in TRL's logs.

    Returns a callable ``(prompts, completions, **columns) -> list[float | None]`` (``None``: failed episode).
    """
    return ACRLReward(reasoner, clarifier, alpha=alpha, problem_key=problem_key, problems=problems,
                      image_key=image_key, clarification=clarification, name=name)


# --- π_ref for TRL users ------------------------------------------------------------------------------------------

class _TrainModeKeeper:
    """Wraps an ``HFCaptioner`` whose model is shared with a trainer: answering must not leave it in eval mode."""

    def __init__(self, captioner):
        self.captioner = captioner

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        model = self.captioner.model
        modes = {m: m.training for m in model.modules()}
        try:
            return self.captioner.answer(images, questions)
        finally:
            for m, mode in modes.items():
                m.training = mode


def adapter_disabled_clarifier(model, processor, settings=None) -> Clarifier:
    """π_ref = TRL's policy with its LoRA adapter disabled (shared weights; AC-RL's own default).

    ``model`` is the PEFT model that ``GRPOTrainer`` trains (``trainer.model``, after it applied ``peft_config``);
    its base weights never change under LoRA, so the disabled-adapter model is the starting captioner. Answers are
    greedy, at most ``settings.answer_max_new_tokens`` tokens (an :class:`acrl.config.HFSettings`).
    """
    from peft import PeftModel


    if not isinstance(model, PeftModel):
        raise TypeError(f"adapter_disabled_clarifier needs the trainer's PEFT model, got {type(model).__name__}; "
                        "without LoRA use frozen_clarifier(starting_checkpoint)")
    modes = {m: m.training for m in model.modules()}
    cap = HFCaptioner(model, processor, settings=settings or HFSettings(device=str(next(model.parameters()).device)))
    for m, mode in modes.items():
        m.training = mode
    return _TrainModeKeeper(cap)


def frozen_clarifier(path: str, settings=None) -> Clarifier:
    """π_ref as a separate frozen copy of the starting checkpoint ``path`` (a model directory, hub name, or an
    AC-RL / PEFT adapter directory, merged). One copy of the weights, no gradients."""
    settings = settings or HFSettings()
    base, _ = resolve_checkpoint(path)
    model = load_merged_model(path, settings).eval().requires_grad_(False)
    return HFCaptioner(model, load_processor(base, settings.trust_remote_code), lora=None, settings=settings,
                       base_path=base, reference_model=model)


# --- datasets -----------------------------------------------------------------------------------------------------

def world_dataset_rows(problems: Sequence[Problem]) -> dict[str, list]:
    """Column dict of ``problems`` in TRL's conversational VLM layout (see :func:`world_dataset`)."""
    return {
        "prompt": [[{"role": "user", "content": [
            {"type": "image", "text": None},
            {"type": "text", "text": captioner_prompt(p.question_with_choices())}]}] for p in problems],
        "image": [p.image for p in problems],
        "problem_id": [p.id for p in problems],
        "question": [p.question for p in problems],
        "answer": [p.answer for p in problems],
        "answer_type": [p.answer_type for p in problems],
        "choices": [list(p.choices or []) for p in problems],
        "tolerance": [p.tolerance for p in problems],
    }


def world_dataset(n: int, cfg=None, split: str = "train", start: int = 0, problems: Sequence[Problem] | None = None):
    """A ``datasets.Dataset`` of ``n`` world problems for ``GRPOTrainer``.

    ``prompt`` is one user turn ``[{"type": "image"}, {"type": "text", "text": captioner_prompt(question)}]``
    (the prompt AC-RL's captioner sees; TRL fills the image placeholder from the ``image`` column), plus the
    answer columns the reward reads: ``problem_id``, ``question``, ``answer``, ``answer_type``, ``choices``,
    ``tolerance``. ``cfg``: a :class:`acrl.world.WorldConfig` or a :class:`acrl.config.Config` (its ``world``);
    ``problems``: use these instead of drawing ``n`` from ``split``.
    """
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature


    if problems is None:
        wcfg = getattr(cfg, "world", cfg) or WorldConfig()
        problems = make_problems(split, n, wcfg, start=start)
    features = Features({
        "prompt": List({"role": Value("string"),
                        "content": List({"type": Value("string"), "text": Value("string")})}),
        "image": ImageFeature(),
        "problem_id": Value("string"), "question": Value("string"), "answer": Value("string"),
        "answer_type": Value("string"), "choices": List(Value("string")), "tolerance": Value("float64"),
    })
    return Dataset.from_dict(world_dataset_rows(problems), features=features)
