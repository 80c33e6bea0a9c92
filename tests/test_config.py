"""The config: a leaf module, read and checked in one place, one-line errors naming the key or the file."""

import ast
import dataclasses
import pathlib
import subprocess
import sys

import pytest

from acrl import config
from acrl.config import Config, load_config

SRC = pathlib.Path(config.__file__)


def test_config_imports_nothing_from_acrl_and_loading_does_not_import_torch(tmp_path):
    tree = ast.parse(SRC.read_text())
    internal = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.level or
                                                                                 (n.module or "").startswith("acrl"))]
    assert not internal
    (tmp_path / "c.yaml").write_text("train:\n  steps: 3\n")
    code = (f"import sys; from acrl.config import load_config; load_config({str(tmp_path / 'c.yaml')!r}); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('acrl')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['acrl', 'acrl.config']"


def test_every_field_is_documented_in_its_class():
    undocumented = []
    for cls in [c for c in vars(config).values() if dataclasses.is_dataclass(c) and isinstance(c, type)]:
        doc = "".join(k.__doc__ or "" for k in cls.__mro__)
        undocumented += [f"{cls.__name__}.{f.name}" for f in dataclasses.fields(cls) if f.name not in doc]
    assert not undocumented


@pytest.mark.parametrize("text, words", [
    ("", "is empty"),
    ("train:\n  steps: 3\ntrain:\n  lr: 0.1\n", "'train' is given twice"),
    ("train:\n  steps: 3\n  steps: 4\n", "'steps' is given twice"),
    ("world:\n  families: [tri]\n  needed_facts: {3: 1.0}\n", "no family of world.families"),
    ("world:\n  families: [bars]\n  n_bars: 3\n  needed_facts: {4: 1.0}\n", "no family of world.families"),
    ("world:\n  needed_facts: {1: -1.0, 2: 0.5}\n", "needed_facts weights"),
])
def test_nonsense_in_a_config_file_is_refused_naming_it(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=words) as e:
        load_config(str(path))
    assert "\n" not in str(e.value)


def test_a_world_asking_partly_for_sizes_a_family_lacks_uses_the_nearest_one():
    cfg = load_config(None, ["world.families=[tri]"])        # default weights include 3-fact questions
    assert cfg.world.needed_facts[3] > 0


def test_fact_sizes_table_matches_the_world_templates():
    from acrl.world import language

    sizes: dict = {}
    for t in language.TEMPLATES:
        sizes.setdefault(t.family, set()).add(len(t.facts))
    assert {f: tuple(sorted(s)) for f, s in sizes.items()} == config.WORLD_FACT_SIZES


def test_a_bad_override_names_its_key():
    with pytest.raises(ValueError, match="train.lr"):
        load_config(None, ["train.lr=-1"])
    assert isinstance(load_config(None, []), Config)
