"""What ``acrl report`` reads (:mod:`acrl.app.report.runs`): finding runs, their records as episodes, the world
problems and images behind them."""

import json
import math

import pytest
from PIL import Image

from acrl.app.report.runs import (
    Run,
    clean,
    data_uri,
    eval_episode,
    find_runs,
    load_run,
    read_jsonl,
    run_config,
    sample_train_episodes,
    train_episode,
    world_problem,
)
from acrl.world import WorldConfig, make_problem


def _write(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_runs_are_found_at_any_depth_pretrained_first_and_labels_made_unique(tmp_path):
    root = tmp_path / "demo"
    for d in ("acrl", "eval-acrl", "eval-pretrained"):
        _write(root / "default" / d / ("metrics.jsonl" if d == "acrl" else "items.jsonl"))
    _write(root / "default" / "acrl" / "checkpoint-000002" / "items.jsonl")    # inside a checkpoint: not a run
    _write(root / "both" / "metrics.jsonl")
    _write(root / "both" / "summary.json", "{}")
    got = find_runs([str(root)])
    assert [(label, kind) for label, _, kind in got] == [
        ("both (train)", "train"), ("both (eval)", "eval"), ("default/eval-pretrained", "eval"),
        ("default/acrl", "train"), ("default/eval-acrl", "eval")]
    other = tmp_path / "other"
    _write(other / "items.jsonl")
    assert [label for label, _, _ in find_runs([str(root / "default" / "acrl"), str(other)])] == ["acrl", "other"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_runs([str(tmp_path / "missing")])


def test_unreadable_lines_are_counted_not_fatal(tmp_path):
    _write(tmp_path / "m.jsonl", '{"step": 1}\n\n[1, 2]\n{"step": 2}\n{"step": 3, "rew')
    rows, bad = read_jsonl(str(tmp_path / "m.jsonl"))
    assert rows == [{"step": 1}, {"step": 2}] and bad == 2
    _write(tmp_path / "run" / "metrics.jsonl", '{"step": 1, "reward": 0.5}\n{"ste')
    _write(tmp_path / "run" / "episodes.jsonl", '{"step": 1, "problem_id": "world-train-0000001", "tier": '
                                                '"direct_correct", "reward": 1.0, "latency": 2}\nnot json\n')
    run = load_run("r", str(tmp_path / "run"), "train")
    assert run.bad_lines == 2 and run.metrics == [{"step": 1, "reward": 0.5}] and run.summary == {"alpha": None}
    (e,) = run.episodes
    assert (e["pid"], e["tier"], e["reward"], e["source"], e["extra"]) == (
        "world-train-0000001", "direct_correct", 1.0, "train", {"latency": 2})


def test_a_runs_config_is_run_json_else_its_newest_checkpoint(tmp_path):
    assert run_config(str(tmp_path)) is None
    _write(tmp_path / "checkpoint-000002" / "config.json", '{"train": {"alpha": 0.2}}')
    _write(tmp_path / "checkpoint-000004" / "config.json", '{"train": {"alpha": 0.4}}')
    assert run_config(str(tmp_path)) == {"train": {"alpha": 0.4}}
    _write(tmp_path / "run.json", json.dumps({"config": {"train": {"alpha": 0.7}}}))
    assert run_config(str(tmp_path)) == {"train": {"alpha": 0.7}}


def test_a_training_episode_keeps_what_it_logged_and_the_rest_as_extra():
    rec = {"step": 3, "problem_id": "world-train-0000007", "sample": 1, "caption": "a chart", "decision": "ask",
           "question": "how wide is the rectangle ?", "clarification": "the rectangle is 4 wide", "prediction": "8",
           "tier": "clarified_correct", "reward": float("nan"), "replies": ["NEED MORE INFO\nhow wide ?"],
           "turns": 1}
    e = train_episode(rec, "acrl")
    assert (e["step"], e["sample"], e["asked"], e["clar_q"], e["final"]) == (
        3, 1, True, "how wide is the rectangle ?", "8")
    assert e["reward"] is None and e["replies"] == [{"label": "turn 1", "text": "NEED MORE INFO\nhow wide ?"}]
    assert e["extra"] == {"turns": 1} and e["question"] is None    # filled in from the world problem later
    assert train_episode({"problem_id": 5}, "r")["tier"] == "wrong"


def test_an_items_own_reward_wins_over_the_one_turn_tier_reward():
    base = {"id": "x", "asked": True, "clarified_correct": True, "failed": False}
    assert eval_episode(base, "r", alpha=0.5)["reward"] == 0.5
    assert eval_episode({**base, "reward": 0.49}, "r", alpha=0.5)["reward"] == 0.49


def test_the_dataset_of_an_evaluation():
    def run(*eps):
        return Run("r", "p", "eval", episodes=[{"pid": pid, "family": fam} for pid, fam in eps])

    assert run().dataset == "world" and run(("world-test-0000001", "bars")).dataset == "world"
    assert run(("mathvista-testmini-1", "mathvista"), ("mathvista-testmini-2", "mathvista")).dataset == "mathvista"
    assert run(("mathvista-testmini-1", "mathvista"), ("mmmu-1", "mmmu")).dataset == "mixed"


def test_world_problems_are_drawn_again_from_their_id():
    p = make_problem("test", 12)
    again = world_problem("world-test-0000012", WorldConfig())
    assert (again.question, again.answer, again.image.tobytes()) == (p.question, p.answer, p.image.tobytes())
    assert world_problem("world-test-0000012", WorldConfig(), question=p.question, answer=p.answer) is not None
    assert world_problem("world-test-0000012", WorldConfig(), question="another question ?") is None
    assert world_problem("world-dev-0000012", WorldConfig()) is None          # no such split
    assert world_problem("mathvista-testmini-12", WorldConfig()) is None


def test_images_become_data_uris_png_when_small_else_a_jpeg_thumbnail():
    assert data_uri(Image.new("RGB", (64, 64), "red")).startswith("data:image/png;base64,")
    big = data_uri(Image.new("RGBA", (1200, 600), "blue"))
    assert big.startswith("data:image/jpeg;base64,")
    import base64
    import io

    thumb = Image.open(io.BytesIO(base64.b64decode(big.split(",", 1)[1])))
    assert thumb.size == (320, 160)


def test_clean_makes_nan_and_infinities_null_at_any_depth():
    got = clean({"a": [1.0, float("nan"), {"b": float("inf")}], 2: (float("-inf"), "x")})
    assert got == {"a": [1.0, None, {"b": None}], "2": [None, "x"]}
    assert json.loads(json.dumps(got)) == got and not math.isnan(clean(0.5))


def test_replies_kept_as_a_dict_of_turns():
    item = {"id": "q", "replies": {"single_pass": "SOLVED 3", "decision": "NEED MORE INFO\nhow ?", "final": None},
            "errors": ["TimeoutError: reasoner"], "meta": {"op": "sum"}}
    e = eval_episode(item, "r")
    assert e["replies"] == [{"label": "single_pass", "text": "SOLVED 3"},
                            {"label": "decision", "text": "NEED MORE INFO\nhow ?"}]
    assert e["error"] == "TimeoutError: reasoner" and e["extra"] == {"meta": {"op": "sum"}}


def test_training_sample_keeps_whole_groups_across_the_run():
    eps = [{"step": s, "pid": f"p{s}-{g}", "sample": i} for s in range(1, 11) for g in range(2) for i in range(4)]
    got = sample_train_episodes(eps, 20)
    assert len(got) == 20
    groups = {(e["step"], e["pid"]) for e in got}
    assert len(groups) == 5 and all(sum((e["step"], e["pid"]) == k for e in got) == 4 for k in groups)
    assert (1, "p1-0") in groups and (10, "p10-1") in groups
    assert sample_train_episodes(eps, 1000) == eps


def test_eval_tiers():
    base = {"id": "x", "asked": False, "clarified_correct": False, "failed": False}
    assert eval_episode({**base, "clarified_correct": True}, "r")["tier"] == "direct_correct"
    assert eval_episode({**base, "asked": True, "clarified_correct": True}, "r")["tier"] == "clarified_correct"
    assert eval_episode(base, "r")["tier"] == "wrong"
    assert eval_episode({**base, "failed": True}, "r")["reward"] is None
