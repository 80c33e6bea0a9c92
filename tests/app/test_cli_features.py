"""CLI smoke tests of the research features on micro budgets: multi-turn, α schedules, π_ref from another
checkpoint (and the warm start's intermediate checkpoints), the noisy reasoner, evaluation sets."""

import json

from conftest import MICRO, run_cli


def _lines(path):
    return [json.loads(x) for x in open(path) if x.strip()]


def test_warmstart_writes_intermediate_checkpoints_and_train_takes_a_reference(tmp_path):
    ws = tmp_path / "ws"
    run_cli("warmstart", "--config", MICRO, "--out", ws, "--set", "warmstart.save_every=2")
    assert (ws / "step-0" / "model.pt").exists() and (ws / "step-2" / "model.pt").exists()
    assert not (ws / "step-4").exists() and (ws / "model.pt").exists()     # the last step is the checkpoint itself
    out = tmp_path / "run"
    run_cli("train", "--config", MICRO, "--captioner", ws, "--reference", ws / "step-0", "--out", out, "--quiet")
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["train"]["reference"] == str(ws / "step-0")
    # the KL term is measured against π_ref: zero at the first step when π_ref is the start, not against step-0
    same = tmp_path / "same"
    run_cli("train", "--config", MICRO, "--captioner", ws, "--out", same, "--quiet")
    assert _lines(same / "metrics.jsonl")[0]["kl_mean"] < 1e-6
    assert _lines(out / "metrics.jsonl")[0]["kl_mean"] > 1e-3


def test_train_multi_turn_with_a_schedule_and_a_noisy_reasoner(tmp_path, micro_captioner):
    out = tmp_path / "run"
    run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", out, "--quiet",
            "--set", "train.max_clarifications=3", "--set", "train.turn_rewards=[1, 0.6, 0.3, 0.1]",
            "--set", "reasoner.noise=0.3")
    rows = _lines(out / "metrics.jsonl")
    assert len(rows) == 3 and all("mean_turns" in r for r in rows)
    out2 = tmp_path / "run2"
    run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", out2, "--quiet",
            "--set", "train.alpha=1", "--set", "train.alpha_schedule=cosine", "--set", "train.alpha_end=0")
    assert [r["reward_alpha"] for r in _lines(out2 / "metrics.jsonl")] == [1.0, 0.5, 0.0]


def test_bad_research_values_are_one_line_errors(tmp_path):
    p = run_cli("train", "--config", MICRO, "--out", tmp_path, "--set", "train.alpha_schedule=exp", check=False)
    assert p.returncode == 2 and "train.alpha_schedule='exp'" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("train", "--config", MICRO, "--out", tmp_path, "--set", "reasoner.backend=openai",
                "--set", "reasoner.noise=0.1", "--set", "reasoner.base_url=http://127.0.0.1:9/v1", check=False)
    assert p.returncode == 2 and "reasoner.noise" in p.stderr
