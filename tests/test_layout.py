"""The tests mirror the package: every module of ``src/acrl`` that defines a function or a class has its test module
at the same path, ``tests/<path>/test_<name>.py`` (a package's ``__init__.py``: ``tests/<path>/<package>/
test_<package>.py``), and every test module is named after the module it tests. Exemptions are listed with a reason."""

import ast
import os

from conftest import ROOT

SRC = os.path.join(ROOT, "src", "acrl")
TESTS = os.path.join(ROOT, "tests")

# module (or folder, ending in /) -> why it has no test module of its own
NO_TEST_MODULE = {
}
# test module (or folder) -> what it tests instead of a module of src/acrl
NOT_A_MODULE = {
    "backends/test_vllm_real.py": "vllm_engine and openai_api against a real vLLM (make test-vllm, its own venv)",
    "backends/test_clarifier_after_training.py": "a property of every captioner backend (tiny, hf): training "
                                                 "leaves π_ref, the clarifier, unchanged",
    "test_layout.py": "the layout of the tests themselves",
    "test_docs.py": "the docs name code that exists",
}


def _exempt(path: str, table: dict) -> bool:
    return any(path == k or (k.endswith("/") and path.startswith(k)) for k in table)


def _modules(with_behaviour: bool = True) -> dict[str, str]:
    """``{module path under src/acrl: its test module under tests}`` for every module (that defines something)."""
    out = {}
    for d, _, files in os.walk(SRC):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.relpath(os.path.join(d, f), SRC)
            with open(os.path.join(d, f)) as fh:
                tree = ast.parse(fh.read())
            if with_behaviour and not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                                          for n in tree.body):
                continue                                   # re-exports, constants, an entry point
            folder, name = os.path.split(path)
            if name == "__init__.py":
                name = os.path.basename(folder) + ".py"
            out[path] = os.path.join(folder, f"test_{name}")
    return out


def _test_modules() -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), TESTS) for d, _, files in os.walk(TESTS) for f in files
                  if f.startswith("test_") and f.endswith(".py"))


def test_every_module_with_behaviour_has_its_test_module():
    missing = [f"{m} -> tests/{t}" for m, t in _modules().items()
               if not _exempt(m, NO_TEST_MODULE) and not os.path.exists(os.path.join(TESTS, t))]
    assert not missing, "modules without their test module:\n" + "\n".join(missing)


def test_every_test_module_is_named_after_the_module_it_tests():
    tested = set(_modules(with_behaviour=False).values())
    scripts = {os.path.join("benchmarks", f"test_{f}") for f in os.listdir(os.path.join(ROOT, "benchmarks"))
               if f.endswith(".py")}                       # the repository's benchmark scripts
    stray = [t for t in _test_modules() if t not in tested | scripts and not _exempt(t, NOT_A_MODULE)]
    assert not stray, "test modules named after no module (move their tests to the module they test):\n" + \
        "\n".join(stray)


def test_every_exemption_is_still_needed():
    modules, tests = list(_modules()), _test_modules()
    stale = [k for k in NO_TEST_MODULE if not any(_exempt(m, {k: ""}) for m in modules)]
    stale += [k for k in NOT_A_MODULE if not any(_exempt(t, {k: ""}) for t in tests)]
    assert not stale, f"exemptions that match nothing: {stale}"


# The layers of src/acrl, bottom to top: a module imports only from its own layer or below (README: Layout).
LAYERS = [("config", "problem", "outdir", "sigterm"), ("core",), ("rollout",), ("backends", "world", "data"),
          ("eval",), ("train",), ("app", "integrations"), ("launch", "__main__")]


def test_imports_point_down_the_layers_and_sit_at_module_top():
    rank = {name: i for i, names in enumerate(LAYERS) for name in names}
    upward, inside = [], []
    for path in _modules(with_behaviour=False):
        top = path.split(os.sep)[0].removesuffix(".py")
        if top == "__init__":
            continue
        with open(os.path.join(SRC, path)) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("acrl."):
                target = node.module.split(".")[1]
                if rank[target] > rank[top]:
                    upward.append(f"{path} imports {node.module}")
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            inside += [f"{path}:{fn.name} imports {n.module}" for n in ast.walk(fn)
                       if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("acrl")]
    assert not upward, "imports up the layers:\n" + "\n".join(upward)
    assert not inside, "acrl imports inside functions (they belong at module top):\n" + "\n".join(inside)
