"""One assembly (:mod:`acrl.app.assemble`): the same config and seed give the same run through `acrl train` and
`acrl sweep`; a training set's held-out tail; a reasoner built only where its settings apply."""

import json
import random

import pytest
from conftest import MICRO, run_cli

from acrl.app.assemble import build_reasoner, data_source, make_run
from acrl.config import load_config
from acrl.world import make_problems
from acrl.world.export import write_dataset

SAME = ["--set", "train.steps=2", "--set", "train.eval_every=1", "--set", "train.eval_n=4",
        "--set", "train.clarifier_noise=0.3", "--set", "eval.sets={tri: {world: {families: [tri]}}}"]


def _metrics(path):
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in recs]


def test_train_and_sweep_write_identical_metrics(tmp_path):
    run_cli("train", "--config", MICRO, *SAME, "--quiet", "--out", tmp_path / "train")
    run_cli("sweep", "--config", MICRO, *SAME, "--seeds", "0", "--out", tmp_path / "sweep")
    a = _metrics(tmp_path / "train" / "metrics.jsonl")
    b = _metrics(tmp_path / "sweep" / "runs" / "base_seed=0" / "metrics.jsonl")
    assert [r["step"] for r in a] == [1, 2] and "tri.accuracy" in a[0]["eval"]   # every view, in both
    assert a == b


def test_make_run_holds_out_the_tail_of_a_training_set_for_the_curve(tmp_path):
    write_dataset(make_problems("train", 12), str(tmp_path / "data"), rng=random.Random(0))
    source, heldout = data_source(str(tmp_path / "data"), holdout=4)
    seen = {p.id for p in source(0, 40)}
    assert len(heldout) == 4 and not seen & {p.id for p in heldout} and len(seen) == 8
    cfg = load_config(MICRO, ["train.eval_every=1", "train.eval_n=4", "train.steps=1"])
    run = make_run(cfg, str(tmp_path / "run"), data=str(tmp_path / "data"))
    assert set(run.evaluate(0)) == {"accuracy", "clarification_rate", "accuracy_with_clarification"}


def test_few_shot_is_validated_and_refused_for_the_world_reasoner():
    with pytest.raises(ValueError, match="few_shot"):
        load_config(overrides=["reasoner.few_shot=-1"])
    with pytest.raises(ValueError, match="few_shot"):
        build_reasoner(load_config(overrides=["reasoner.few_shot=2"]))


def test_a_new_adapter_is_the_same_whatever_the_process_drew_before(tmp_path, micro_captioner):
    """A new LoRA adapter's random init comes from train.seed, not from the process's own start-up state."""
    import torch

    cfg = load_config(MICRO, ["captioner.lora.enabled=true", "train.steps=1"])
    weights = []
    for i in range(2):
        torch.manual_seed(1000 + i)   # whatever ran before in this process
        run = make_run(cfg, str(tmp_path / f"run{i}"), captioner=str(micro_captioner))
        weights.append([p.detach().clone() for p in run.policy.trainable_parameters()])
    assert weights[0] and all(torch.equal(a, b) for a, b in zip(*weights))
    assert any(a.abs().sum() > 0 for a in weights[0])
