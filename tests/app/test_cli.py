import json

import pytest
from conftest import MICRO, run_cli


def _lines(path):
    return [json.loads(x) for x in open(path) if x.strip()]


def test_help_lists_every_subcommand():
    out = run_cli("--help").stdout
    for cmd in ("world", "warmstart", "train", "eval", "demo"):
        assert cmd in out


def test_world_writes_dataset_and_contact_sheet(tmp_path):
    run_cli("world", "--out", tmp_path, "--n", 6, "--split", "test")
    rows = _lines(tmp_path / "problems.jsonl")
    assert len(rows) == 6 and all((tmp_path / r["image"]).exists() for r in rows)
    assert {"question", "answer", "facts", "needed", "human_caption", "clarifications"} <= set(rows[0])
    assert (tmp_path / "contact_sheet.png").stat().st_size > 1000


def test_train_checkpoint_resume_and_eval(tmp_path, micro_captioner):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", straight, "--steps", 4, "--quiet")
    run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", split, "--steps", 2, "--quiet")
    assert (split / "checkpoint" / "state.pt").exists() and (split / "checkpoint" / "policy" / "model.pt").exists()
    run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", split, "--steps", 4, "--resume",
            "--quiet")
    a, b = _lines(straight / "metrics.jsonl"), _lines(split / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    keys = ("reward", "clarification_rate", "loss", "kl_mean", "caption_tokens")
    for x, y in zip(a, b):   # resuming reproduces the uninterrupted run exactly
        assert all(abs(x[k] - y[k]) < 1e-6 for k in keys), (x, y)
    m = a[-1]
    for k in ("reward", "direct_correct", "clarification_rate", "clarified_accuracy", "uniform_frac", "kl_mean",
              "clip_frac", "caption_tokens", "time_generation", "time_reasoner", "time_clarification", "time_update"):
        assert k in m, k
    eps = _lines(straight / "episodes.jsonl")
    assert eps and {"caption", "decision", "tier", "reward", "replies"} <= set(eps[0])
    run_cli("eval", "--config", MICRO, "--captioner", straight / "checkpoint" / "policy",
            "--reference", micro_captioner, "--out", tmp_path / "ev")
    summary = json.load(open(tmp_path / "ev" / "summary.json"))
    assert summary["overall"]["n"] == 8
    assert 0 <= summary["overall"]["accuracy"] <= 1 and "by_family" in summary
    assert len(_lines(tmp_path / "ev" / "items.jsonl")) == 8


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, micro_captioner):
    p = run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", tmp_path / "none", "--resume",
                check=False)
    assert p.returncode != 0 and "checkpoint" in p.stderr


def test_unknown_config_key_is_a_clear_error(tmp_path):
    p = run_cli("train", "--config", MICRO, "--set", "train.lr_typo=1", "--out", tmp_path, check=False)
    assert p.returncode == 2 and "lr_typo" in p.stderr


def test_train_with_lora_through_the_cli(tmp_path, micro_captioner):
    run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", tmp_path, "--steps", 2,
            "--set", "captioner.lora.enabled=true", "--set", "captioner.lora.r=4", "--quiet")
    assert (tmp_path / "checkpoint" / "policy" / "adapter" / "adapter_config.json").exists()
    m = _lines(tmp_path / "metrics.jsonl")
    assert len(m) == 2 and all("loss" in x for x in m)


def test_missing_tracker_package_is_a_clear_error(tmp_path, micro_captioner):
    import importlib.util

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here: the missing-package error cannot occur")
    p = run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--out", tmp_path, "--report-to",
                "wandb", check=False)
    assert p.returncode == 2 and "pip install wandb" in p.stderr


def test_demo_pipeline_on_a_micro_budget(tmp_path):
    """The whole `acrl demo` pipeline (shipped captioner, both arms, report) on a tiny budget."""
    run_cli("demo", "--config", MICRO, "--out", tmp_path, "--set", "train.eval_every=2", "--set", "train.eval_n=8")
    report = (tmp_path / "report.md").read_text()
    assert "AC-RL" in report and "binary" in report and "single-pass" in report
    assert (tmp_path / "curves-default.png").stat().st_size > 5000
    for arm in ("pretrained", "acrl", "binary"):
        s = json.load(open(tmp_path / "default" / f"eval-{arm}" / "summary.json"))
        assert s["overall"]["n"] == 8
    hist = _lines(tmp_path / "default" / "acrl" / "metrics.jsonl")
    assert [h["step"] for h in hist] == [1, 2, 3] and "eval" in hist[1]
    assert (tmp_path / "world" / "contact_sheet.png").exists()


def test_eval_on_a_benchmark_copy(tmp_path, micro_captioner):
    from data.fixtures import mathvista_rows, write_parquet

    write_parquet(mathvista_rows(), tmp_path / "mathvista" / "data" / "testmini-00000-of-00001.parquet")
    run_cli("eval", "--config", MICRO, "--captioner", micro_captioner, "--reference", micro_captioner,
            "--benchmark", "mathvista", "--data", tmp_path / "mathvista", "--out", tmp_path / "ev")
    s = json.load(open(tmp_path / "ev" / "summary.json"))
    assert s["overall"]["n"] == len(_lines(tmp_path / "ev" / "items.jsonl")) > 0
    assert s["by_category"] and "bad_rows" in s
    assert (tmp_path / "ev" / "by_category.png").stat().st_size > 3000
    p = run_cli("eval", "--config", MICRO, "--captioner", micro_captioner, "--benchmark", "mathvista",
                "--out", tmp_path / "x", check=False)
    assert p.returncode == 2 and "--data" in p.stderr
    p = run_cli("eval", "--config", MICRO, "--captioner", micro_captioner, "--benchmark", "mathvista",
                "--data", tmp_path / "mathvista", "--judge-url", "http://127.0.0.1:9/v1", "--out", tmp_path / "y",
                check=False)
    assert p.returncode == 2 and "127.0.0.1:9" in p.stderr


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "internvl", "llava"])
def test_tiny_hf_family_trains_and_evaluates_through_the_cli(tmp_path, family):
    run_cli("make-tiny", "--family", family, "--out", tmp_path / "base")
    cfg = f"configs/{family}-tiny.yaml"
    common = ["--set", f"captioner.path={tmp_path / 'base'}", "--set", "train.threads=1"]
    run_cli("train", "--config", cfg, *common, "--out", tmp_path / "run", "--steps", 2, "--quiet")
    m = _lines(tmp_path / "run" / "metrics.jsonl")
    assert [x["step"] for x in m] == [1, 2] and all("loss" in x for x in m)
    adapter = tmp_path / "run" / "checkpoint" / "policy"
    run_cli("eval", "--config", cfg, *common, "--captioner", adapter, "--n", 4, "--out", tmp_path / "ev")
    assert json.load(open(tmp_path / "ev" / "summary.json"))["overall"]["n"] == 4
    if family == "qwen2-vl":
        run_cli("export", "--merge", "--checkpoint", adapter, "--out", tmp_path / "merged")
        assert (tmp_path / "merged" / "config.json").exists()


def test_train_on_a_local_training_set(tmp_path, micro_captioner):
    from data.fixtures import geometry3k_rows, write_parquet

    write_parquet(geometry3k_rows(), tmp_path / "g3k" / "data" / "train-00000-of-00001.parquet")
    run_cli("train", "--config", MICRO, "--captioner", micro_captioner, "--data", tmp_path / "g3k",
            "--out", tmp_path / "run", "--steps", 2, "--quiet")
    eps = _lines(tmp_path / "run" / "episodes.jsonl")
    assert eps and not any(e["problem_id"].startswith("world-") for e in eps)


def test_eval_sets_and_turns_through_the_cli(tmp_path, micro_captioner):
    """`acrl eval --eval-set` evaluates in each named world/reasoner view (its own output folder), and the
    reasoner may ask up to train.max_clarifications times, as in multi-turn training."""
    sets = "eval.sets={tri-only: {world: {families: [tri], needed_facts: {1: 0.5, 2: 0.5}}}}"
    run_cli("eval", "--config", MICRO, "--captioner", micro_captioner, "--set", sets,
            "--set", "train.max_clarifications=3", "--set", "train.turn_rewards=[1, 0.7, 0.5, 0.3]",
            "--eval-set", "all", "--out", tmp_path / "ev")
    inside = json.load(open(tmp_path / "ev" / "in" / "summary.json"))
    tri = json.load(open(tmp_path / "ev" / "tri-only" / "summary.json"))
    assert tri["eval_set"] == "tri-only" and set(tri["by_family"]) == {"tri"}
    assert set(inside["by_family"]) != {"tri"}
    items = _lines(tmp_path / "ev" / "in" / "items.jsonl") + _lines(tmp_path / "ev" / "tri-only" / "items.jsonl")
    assert max(r["turns"] for r in items) > 1   # a micro captioner leaves facts out: the reasoner asks again
    assert max(r["turns"] for r in items) <= 3
    run_cli("eval", "--config", MICRO, "--captioner", micro_captioner, "--out", tmp_path / "one")
    one = _lines(tmp_path / "one" / "items.jsonl")
    assert max(r.get("turns", int(r["asked"])) for r in one) <= 1
    p = run_cli("eval", "--config", MICRO, "--captioner", micro_captioner, "--eval-set", "nope",
                "--out", tmp_path / "bad", check=False)
    assert p.returncode == 2 and "nope" in p.stderr and "eval.sets" in p.stderr


def test_config_prints_what_a_run_would_use_and_reads_back(tmp_path):
    out = run_cli("config", "--config", MICRO, "--set", "train.lr=5e-4", "--docs").stdout
    assert "  lr: 0.0005" in out and "# AdamW learning rate" in out
    (tmp_path / "printed.yaml").write_text(out)
    again = run_cli("config", "--config", tmp_path / "printed.yaml", "--out", tmp_path / "again.yaml")
    assert again.stdout == "" and (tmp_path / "again.yaml").read_text() == run_cli(
        "config", "--config", MICRO, "--set", "train.lr=5e-4").stdout
    bad = run_cli("config", "--set", "train.lr=-1", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "train.lr" in bad.stderr
