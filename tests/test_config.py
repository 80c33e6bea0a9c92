"""The config: a leaf module, read and checked in one place, one-line errors naming the key or the file."""

import ast
import dataclasses
import pathlib
import subprocess
import sys

import pytest
import yaml

from acrl import config
from acrl.config import Config, eval_view, load_config

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


def _settings_classes():
    return [c for c in vars(config).values() if dataclasses.is_dataclass(c) and isinstance(c, type)]


def test_every_field_has_its_documentation_beside_it():
    tree = ast.parse(SRC.read_text())
    undocumented = []
    for node in [n for n in tree.body if isinstance(n, ast.ClassDef)]:
        for a, b in zip(node.body, node.body[1:] + [None]):
            if isinstance(a, ast.AnnAssign) and not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
                                                     and len(b.value.value.split()) >= 2):
                undocumented.append(f"{node.name}.{a.target.id}")
    assert not undocumented
    docs = config.field_docs()
    assert {c.__name__ for c in _settings_classes()} <= set(docs)
    for cls in _settings_classes():   # inherited fields carry their base class's documentation
        assert set(docs[cls.__name__]) == {f.name for f in dataclasses.fields(cls)}, cls.__name__
    assert docs["CaptionerConfig"]["top_p"] == docs["HFSettings"]["top_p"]


def test_each_rule_sits_beside_its_field_and_names_the_key():
    ruled = [(cls, f) for cls in _settings_classes() for f in dataclasses.fields(cls) if f.metadata.get("rule")]
    assert len(ruled) > 100
    for key, bad in [("captioner.lora.r", 0), ("reasoner_train.lora.r", 0), ("captioner.top_p", 0),
                     ("train.samples_per_problem", 1), ("world.n_bars", 5), ("reasoner_model.shift", -1),
                     ("warmstart.seed", -1), ("eval.sets", "{x: {model: {}}}")]:
        with pytest.raises(ValueError, match=rf"config {key}=.*must be") as e:
            load_config(None, [f"{key}={bad}"])
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, words", [
    (["train.turn_rewards=[1, 0.5]", "train.max_clarifications=2"], "train.turn_rewards needs"),
    (["train.turn_rewards=[1, 0.5]", "train.alpha_schedule=linear"], "train.alpha_schedule"),
    (["train.advantage=bnpo_decomposed", "train.max_clarifications=2"], "bnpo_decomposed"),
    (["train.cotrain=true"], "reasoner.backend must be tiny or hf"),
    (["reasoner.backend=hf"], "reasoner.model"),
    (["reasoner.few_shot=2"], "reasoner.few_shot"),
    (["reasoner.backend=tiny", "reasoner.noise=0.1"], "reasoner.noise"),
    (["eval.sets={hf: {reasoner: {backend: hf}}}"], "eval.sets.hf: .*reasoner.model"),
])
def test_rules_across_fields_are_checked_in_one_place_naming_the_keys(overrides, words):
    with pytest.raises(ValueError, match=words) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=words):   # a config changed in code is checked the same way
        cfg = load_config(None, [])
        for ov in overrides:
            key, value = ov.split("=", 1)
            section, *path, name = key.split(".")
            node = getattr(cfg, section)
            for p in path:
                node = getattr(node, p)
            setattr(node, name, yaml.safe_load(value))
        config.validate(cfg)


def test_the_printed_config_reads_back_as_the_same_config(tmp_path):
    cfg = load_config(None, ["train.turn_rewards=[1, 0.5]", "world.needed_facts={1: 2, 2: 1}",
                             "captioner.processor_kwargs={max_pixels: 401408}",
                             "eval.sets={tri: {world: {families: [tri]}}}",
                             "reasoner.cache=memory", "train.report_to=''"])
    for docs in (False, True):
        text = config.to_yaml(cfg, docs=docs)
        (tmp_path / "c.yaml").write_text(text)
        assert load_config(str(tmp_path / "c.yaml")) == cfg
        assert ("# Problems per step (B)." in text) == docs


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


def test_an_evaluation_set_may_read_with_a_reasoner_that_co_training_could_not_train():
    cfg = load_config(None, ["train.cotrain=true", "reasoner.backend=tiny",
                             "eval.sets={world-reasoner: {reasoner: {backend: world}}}"])
    assert config.eval_view(cfg, "world-reasoner").reasoner.backend == "world"


@pytest.mark.parametrize("override,message", [
    (["train.max_clarifications=2", "train.turn_rewards=[1, 0.5]"], "turn_rewards needs train.max_clarifications"),
    (["train.turn_rewards=[1, 0.5]", "train.alpha_schedule=linear"], "cannot be combined"),
    (["train.advantage=bnpo_decomposed", "train.max_clarifications=2"], "bnpo_decomposed"),
    (["train.alpha_schedule=exp"], "train.alpha_schedule='exp': must be one of"),
    (["train.alpha_end=1.5"], "train.alpha_end=1.5"),
    (["train.max_clarifications=0"], "train.max_clarifications=0"),
    (["train.turn_rewards=[1, 2]"], "train.turn_rewards"),
    (["reasoner.noise=-0.1"], "reasoner.noise"),
    (["warmstart.save_every=-1"], "warmstart.save_every"),
    (["eval.sets={x: {model: {d_model: 8}}}"], "eval.sets"),
    (["eval.sets={x: {world: {n_bars: 7}}}"], "eval.sets.x"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, override)


def test_eval_view_applies_a_sets_overrides():
    cfg = load_config(None, ["eval.sets={tri: {world: {families: [tri]}, reasoner: {read_budget: 2}}}"])
    view = eval_view(cfg, "tri")
    assert view.world.families == ["tri"] and view.reasoner.read_budget == 2
    assert cfg.world.families != ["tri"] and view.eval.sets == {}
    with pytest.raises(ValueError, match="'nope' is not in eval.sets"):
        eval_view(cfg, "nope")


@pytest.mark.parametrize("override,message", [
    (["train.cotrain=true"], "reasoner.backend must be tiny or hf"),
    (["train.cotrain=true", "reasoner.backend=hf", "reasoner.model=x", "reasoner_train.lora.enabled=false"],
     "lora.enabled must be true"),
    (["reasoner_train.question_cost=-0.1"], "reasoner_train.question_cost"),
    (["reasoner_train.advantage=bnpo_decomposed"], "reasoner_train.advantage"),
    (["reasoner_train.temperature=0"], "reasoner_train.temperature"),
])
def test_bad_cotraining_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override)
