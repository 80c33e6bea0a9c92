"""``acrl eval --benchmark``: every benchmark that loads is evaluated, the rest are listed with their reason."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from data.fixtures import Img, mathverse_text_only_rows, mathvista_rows, wemath_rows, write_parquet

from acrl.app.benchmarks import eval_benchmarks
from acrl.data.benchmarks import BENCHMARKS

CFG = SimpleNamespace(eval=SimpleNamespace(batch_size=4))


class Policy:
    def generate(self, images, prompts, n=1, greedy=True, **kw):
        return SimpleNamespace(texts=[[f"a drawing {im.size[0]} pixels wide"] * n for im in images])


class Reasoner:
    def complete(self, prompts):
        return ["SOLVED \\boxed{12}" for _ in prompts]


class Clarifier:
    def answer(self, images, questions):
        return ["12" for _ in questions]


def run(tmp_path, data, **kw):
    return eval_benchmarks(CFG, Policy(), Clarifier(), "cap", data=str(data), out=str(tmp_path / "out"),
                           reasoner=Reasoner(), **kw)


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "benchmarks"
    write_parquet(mathvista_rows(), root / "MathVista" / "data" / "testmini-00000-of-00001.parquet")
    rows = wemath_rows()
    rows[0] = dict(rows[0], image_path=Img("x.png", broken=True))       # 1 of 7 bad: over 5%, under 20%
    write_parquet(rows, root / "We-Math" / "data" / "testmini-00000-of-00001.parquet")
    (root / "MMMU").mkdir()                                              # present but empty
    return root


def test_all_evaluates_what_loads_and_lists_the_rest(tmp_path, data_dir):
    assert run(tmp_path, data_dir, benchmark="all") == 1               # not every benchmark found was evaluated
    index = json.loads((tmp_path / "out" / "summary.json").read_text())["benchmarks"]
    assert [r["benchmark"] for r in index] == list(BENCHMARKS)
    status = {r["benchmark"]: r for r in index}
    assert status["mathvista"]["status"] == "evaluated" and status["mathvista"]["counts"]["problems"] == 5
    assert status["mathvista"]["accuracy"] == pytest.approx(1 / 5)     # only pid 3 has the gold 12
    assert status["wemath"]["status"] == "not loaded" and "1 of 7 rows unusable" in status["wemath"]["reason"]
    assert status["mmmu"]["status"] == "not loaded" and "no dataset found" in status["mmmu"]["reason"]
    assert status["dynamath"]["status"] == "not found"
    assert (tmp_path / "out" / "mathvista" / "items.jsonl").exists()
    assert "| wemath | not loaded |" in (tmp_path / "out" / "table.md").read_text()


def test_max_bad_fraction_lets_a_benchmark_through(tmp_path, data_dir):
    import shutil

    shutil.rmtree(data_dir / "MMMU")
    assert run(tmp_path, data_dir, benchmark="all", max_bad_fraction=0.2) == 0
    s = json.loads((tmp_path / "out" / "wemath" / "summary.json").read_text())
    assert s["counts"] == {"rows": 7, "problems": 6, "bad_rows": 1, "text_only": 0, "evaluated": 6, "failed": 0}
    assert s["bad_rows"][0]["id"] == "wemath-testmini-1-2steps_1"
    assert s["wemath"]["n_groups"] == 1 and s["wemath"]["incomplete_groups"] == 1   # the 2-step group lost a row
    with pytest.raises(ValueError, match="between 0 and 1"):
        run(tmp_path, data_dir, benchmark="wemath", max_bad_fraction=1.5)


def test_nothing_loaded_is_an_error(tmp_path):
    (tmp_path / "MathVista").mkdir()
    with pytest.raises(ValueError, match="no benchmark could be loaded"):
        run(tmp_path, tmp_path, benchmark="all")
    index = json.loads((tmp_path / "out" / "summary.json").read_text())["benchmarks"]
    assert index[0]["status"] == "not loaded"


def test_text_only_split_through_the_runner(tmp_path):
    write_parquet(mathverse_text_only_rows(), tmp_path / "mv" / "testmini_text_only.parquet")
    assert run(tmp_path, tmp_path / "mv", benchmark="mathverse", split="testmini_text_only") == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["counts"]["text_only"] == 1 and s["overall"]["n"] == 1


def test_every_episode_failing_is_not_success(tmp_path):
    class Down:
        def complete(self, prompts):
            return [ConnectionError("refused") for _ in prompts]

    write_parquet(mathvista_rows(), tmp_path / "mv" / "testmini.parquet")
    code = eval_benchmarks(CFG, Policy(), Clarifier(), "cap", benchmark="mathvista", data=str(tmp_path / "mv"),
                           out=str(tmp_path / "out"), reasoner=Down())
    assert code == 2
