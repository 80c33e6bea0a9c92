"""Benchmark and training-set loaders (local copies only) and benchmark-aware grading.

Public API::

    load_benchmark(name, path, split=None, limit=None, max_bad_fraction=0.05, **options) -> LoadResult
    load_all(data_dir, names=None, split=None, limit=None) -> {name: LoadResult}
    load_training_set(path, split=None, limit=None, max_bad_fraction=0.05) -> LoadResult
    grade_problem(prediction, problem) -> bool   # grading.grade plus letter-set / alternative golds

Benchmarks: mathvista, mathverse, mathvision, wemath, dynamath, logicvista, mmmu (see ``docs/benchmarks.md``).
"""

from acrl.data.benchmarks import BENCHMARKS, BenchmarkSpec, find_benchmark_dirs, load_all, load_benchmark
from acrl.data.parsing import ImageOptionsProblem
from acrl.data.records import BadRow, LoadResult, compose_images
from acrl.data.training import load_training_set
from acrl.rollout.answers import grade_letter_set, grade_problem, prediction_letters

BENCHMARK_NAMES = tuple(BENCHMARKS)

__all__ = [
    "BENCHMARKS", "BENCHMARK_NAMES", "BadRow", "BenchmarkSpec", "ImageOptionsProblem", "LoadResult",
    "compose_images", "find_benchmark_dirs", "grade_letter_set", "grade_problem", "load_all", "load_benchmark",
    "load_training_set", "prediction_letters",
]
