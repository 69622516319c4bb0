"""peftkit.recipe: the recipe schema, overrides, validation, and loading (registry)."""

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import pytest

from peftkit.recipe import schema as config
from peftkit.recipe import registry
from peftkit.recipe import Data, Lora, Model, Recipe, Train
from peftkit.recipe.overrides import apply_overrides, parse_overrides
from peftkit.recipe.schema import SECTIONS, describe_fields, recipe_from_dict
from peftkit.recipe.validate import problems_of, validate
from peftkit.errors import ConfigError, UserError

ALL_KEYS = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def minimal(**sections) -> Recipe:
    """The smallest valid recipe, with some sections replaced."""
    parts = dict(model=Model("org/model"), data=Data("train.jsonl"))
    parts.update(sections)
    return Recipe(**parts)


def names_field(problem: str, key: str) -> bool:
    """`problem` names the setting `key` (and not merely a longer key that starts with it)."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", problem) is not None


def suggestions(problem: str) -> str:
    assert "did you mean" in problem, problem
    return problem.split("did you mean", 1)[1]


# ---------------------------------------------------------------------------------------------
# Shipped recipes and names

def test_every_shipped_recipe_validates_and_is_described():
    entries = registry.shipped()
    files = [p for p in registry.recipes_dir().glob("*.py") if not p.name.startswith("_")]
    # one entry per file: no two files collapsed onto one name
    assert len(entries) == len(files) >= 4
    assert {e.path.resolve() for e in entries.values()} == {p.resolve() for p in files}
    for name, entry in entries.items():
        assert entry.name == name == entry.recipe.name
        assert problems_of(entry.recipe) == [], name
        assert validate(entry.recipe) is entry.recipe
        assert entry.description.strip() == entry.description, name
        assert entry.description and "\n" not in entry.description, name
        assert entry.recipe.model.name and entry.recipe.data.train, name


def test_shipped_names_are_unique_and_resolve_to_their_recipe():
    entries = registry.shipped()
    assert "tiny-demo" in entries and "llama3-8b-lora" in entries
    for name, entry in entries.items():
        resolved = registry.resolve(name)
        assert resolved.name == name
        assert resolved.path.resolve() == entry.path.resolve()
        assert resolved.recipe == entry.recipe


def test_shipped_name_clash_is_an_error(tmp_path, monkeypatch):
    source = (registry.recipes_dir() / "tiny_demo.py").read_text()
    (tmp_path / "one.py").write_text(source.replace("launch=", "name='same', launch=", 1))
    (tmp_path / "two.py").write_text(source.replace("launch=", "name='same', launch=", 1))
    monkeypatch.setattr(registry, "recipes_dir", lambda: tmp_path)
    with pytest.raises(UserError, match="'same' is defined twice"):
        registry.shipped()


@pytest.mark.parametrize("stem, name", [("llama3_8b_lora", "llama3-8b-lora"), ("tiny_demo", "tiny-demo"),
                                        ("a_b_c", "a-b-c"), ("already-dashed", "already-dashed")])
def test_name_of_maps_underscores_to_dashes(stem, name):
    assert registry.name_of(Path("some_dir") / f"{stem}.py") == name


def test_qwen_recipe_has_an_explicit_name_and_resolves_by_it():
    entries = registry.shipped()
    assert "qwen2.5-7b-lora" in entries
    assert "qwen2-5-7b-lora" not in entries  # the stem-derived name is not registered
    entry = registry.resolve("qwen2.5-7b-lora")
    assert entry.path.name == "qwen2_5_7b_lora.py"
    assert entry.recipe.name == entry.name == "qwen2.5-7b-lora"
    assert entry.recipe.model.name == "Qwen/Qwen2.5-7B-Instruct"


def test_shipped_names_are_the_registered_names():
    # typo suggestions come from this list: it must hold what `peftkit ls` shows
    assert registry.shipped_names() == sorted(registry.shipped())
    with pytest.raises(UserError) as info:
        registry.resolve("qwen2.5-7b-lra")
    assert "qwen2.5-7b-lora" in suggestions(str(info.value))


def test_unknown_recipe_suggests_the_closest():
    with pytest.raises(UserError) as info:
        registry.resolve("dmeo")
    assert "unknown recipe 'dmeo'" in str(info.value)
    assert "demo" in suggestions(str(info.value))
    assert info.value.exit_code == 2


# ---------------------------------------------------------------------------------------------
# parse_overrides: conversion by the field's declared type

@pytest.mark.parametrize("item, section, key, expected", [
    ("train.batch_size=8", "train", "batch_size", 8),
    ("train.max_steps=1e3", "train", "max_steps", 1000),
    ("train.max_steps=2E2", "train", "max_steps", 200),
    ("train.seed=-3", "train", "seed", -3),
    ("train.lr=1e-4", "train", "lr", 1e-4),
    ("train.lr=0.0003", "train", "lr", 3e-4),
    ("train.epochs=2", "train", "epochs", 2.0),
    ("adapter.alpha=64", "adapter", "alpha", 64.0),
    ("model.quantize=none", "model", "quantize", None),
    ("model.quantize=None", "model", "quantize", None),
    ("model.quantize=null", "model", "quantize", None),
    ("model.quantize=nf4", "model", "quantize", "nf4"),
    ("model.revision=main", "model", "revision", "main"),
    ("model.revision=", "model", "revision", None),
    ("data.train=my.jsonl", "data", "train", "my.jsonl"),
    ("data.system_prompt=a=b", "data", "system_prompt", "a=b"),  # split at the first '='
    ("data.train=", "data", "train", ""),
    # a free-text field has no "null": no value, not a file or Hub dataset named "null"
    ("data.eval=null", "data", "eval", ""),
    ("data.eval=None", "data", "eval", ""),
    ("hub.repo_id=none", "hub", "repo_id", ""),
    # where "none" is one of the choices it stays that choice
    ("adapter.bias=none", "adapter", "bias", "none"),
    ("train.report_to=none", "train", "report_to", "none"),
    ("adapter.targets=q_proj,v_proj", "adapter", "targets", "q_proj,v_proj"),
])
def test_parse_overrides_converts_by_field_type(item, section, key, expected):
    parsed, problems = parse_overrides([item])
    assert problems == []
    value = parsed[section][key]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("True", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("off", False)])
def test_parse_overrides_bools(text, expected):
    parsed, problems = parse_overrides([f"model.tiny={text}", f"adapter.use_dora={text}"])
    assert problems == []
    assert parsed["model"]["tiny"] is expected and parsed["adapter"]["use_dora"] is expected


@pytest.mark.parametrize("item, expect", [
    ("train.max_steps=2.5", "expected int"),
    ("train.max_steps=abc", "expected int"),
    ("train.max_steps=inf", "expected int"),
    ("train.batch_size=", "expected int"),
    ("train.lr=fast", "expected float"),
    ("model.tiny=maybe", "expected bool"),
    ("model.tiny=2", "expected bool"),
])
def test_parse_overrides_bad_values(item, expect):
    parsed, problems = parse_overrides([item])
    key = item.partition("=")[0]
    assert parsed == {}
    assert len(problems) == 1
    assert names_field(problems[0], key) and expect in problems[0]


def test_parse_overrides_unknown_keys_suggest_the_closest():
    parsed, problems = parse_overrides(["adapter.rr=4", "trian.lr=1e-4"])
    assert parsed == {} and len(problems) == 2
    rr, trian = problems
    assert "unknown setting 'adapter.rr'" in rr
    assert names_field(suggestions(rr), "adapter.r")
    assert "unknown setting 'trian.lr'" in trian
    assert names_field(suggestions(trian), "train.lr")


@pytest.mark.parametrize("item", ["adapter=4", "adapter.=4", "=4", "adapter.r.x=4",
                                  "nosuch.field=1", "train.lrr=0.1", "name.x=a"])
def test_parse_overrides_unknown_keys_are_errors(item):
    parsed, problems = parse_overrides([item])
    assert parsed == {} and len(problems) == 1
    assert "unknown setting" in problems[0]


def test_parse_overrides_missing_equals_is_an_error():
    parsed, problems = parse_overrides(["train.lr", "adapter.r=8"])
    assert parsed == {"adapter": {"r": 8}}
    assert len(problems) == 1
    assert "'train.lr'" in problems[0] and "section.field=value" in problems[0]


def test_parse_overrides_name_and_empty():
    assert parse_overrides([]) == ({}, [])
    assert parse_overrides(["name=my-run"]) == ({"": {"name": "my-run"}}, [])


# ---------------------------------------------------------------------------------------------
# apply_overrides: a new, validated recipe; every problem at once

def test_apply_overrides_returns_a_new_recipe():
    recipe = registry.resolve("tiny-demo").recipe
    changed = apply_overrides(recipe, ["adapter.r=8", "train.lr=1e-4", "model.quantize=nf4",
                                       "name=other"])
    assert (changed.adapter.r, changed.train.lr, changed.model.quantize) == (8, 1e-4, "nf4")
    assert changed.name == "other"
    assert (recipe.adapter.r, recipe.train.lr, recipe.model.quantize) == (16, 1e-3, None)
    assert dataclasses.replace(changed, adapter=recipe.adapter, train=recipe.train,
                               model=recipe.model, name=recipe.name) == recipe
    assert apply_overrides(recipe, []) == recipe


def _problems(recipe, items) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        apply_overrides(recipe, items)
    exc = info.value
    assert isinstance(exc, UserError) and exc.exit_code == 2
    assert "\n" not in str(exc)
    return exc


def test_apply_overrides_reports_every_problem_at_once():
    recipe = registry.resolve("tiny-demo").recipe
    items = ["foo.bar=1", "train.batch_size=abc", "train.lr=-1", "adapter.dropout=1.5",
             "adapter.r=0"]
    exc = _problems(recipe, items)
    keys = ["foo.bar", "train.batch_size", "train.lr", "adapter.dropout", "adapter.r"]
    assert len(exc.problems) == len(keys)
    for key in keys:
        assert sum(names_field(p, key) for p in exc.problems) == 1, (key, exc.problems)
    assert str(exc).startswith(f"invalid recipe ({len(keys)} problems): ")
    for problem in exc.problems:
        assert problem in str(exc)


def test_apply_overrides_reports_choice_and_range_problems_together():
    recipe = registry.resolve("tiny-demo").recipe
    items = ["foo.bar=1", "train.batch_size=abc", "train.lr=-1", "adapter.dropout=1.5",
             "adapter.r=0", "train.scheduler=foo"]
    exc = _problems(recipe, items)
    keys = ["foo.bar", "train.batch_size", "train.lr", "adapter.dropout", "adapter.r",
            "train.scheduler"]
    assert len(exc.problems) == len(keys)
    for key in keys:
        assert sum(names_field(p, key) for p in exc.problems) == 1, (key, exc.problems)


@pytest.mark.parametrize("item, key, expect", [
    ("train.scheduler=foo", "train.scheduler", "must be one of cosine, linear, constant"),
    ("model.quantize=nf8", "model.quantize", "must be one of none, nf4, fp4, int8"),
    ("adapter.r=0", "adapter.r", "must be > 0"),
    ("train.lr=0", "train.lr", "must be > 0"),
    ("train.lr=-1e-4", "train.lr", "must be > 0"),
    ("adapter.dropout=1.5", "adapter.dropout", "must be in [0, 1)"),
    ("adapter.dropout=1", "adapter.dropout", "must be in [0, 1)"),
    ("adapter.dropout=-0.1", "adapter.dropout", "must be in [0, 1)"),
    ("adapter.dropout=nan", "adapter.dropout", "must be in [0, 1)"),
    ("train.max_steps=-1", "train.max_steps", "must be >= 0"),
    ("train.batch_size=0", "train.batch_size", "must be > 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints", "must be > 0"),
    ("launch.num_processes=0", "launch.num_processes", "must be > 0"),
    ("adapter.targets= ", "adapter.targets", "empty"),
])
def test_apply_overrides_out_of_range(item, key, expect):
    exc = _problems(minimal(), [item])
    assert len(exc.problems) == 1
    assert names_field(exc.problems[0], key) and expect in exc.problems[0]
    assert str(exc) == "invalid recipe: " + exc.problems[0]


@pytest.mark.parametrize("item", ["train.lr=nan", "train.lr=inf", "train.epochs=nan",
                                  "adapter.alpha=nan", "train.max_grad_norm=nan"])
def test_apply_overrides_rejects_non_finite_numbers(item):
    exc = _problems(minimal(), [item])
    assert len(exc.problems) == 1
    assert names_field(exc.problems[0], item.partition("=")[0])
    assert "finite" in exc.problems[0]


# ---------------------------------------------------------------------------------------------
# problems_of / validate

def test_minimal_recipe_is_valid():
    assert problems_of(minimal()) == []
    assert problems_of(minimal(name="ok-name_1.0")) == []
    assert problems_of(minimal(train=Train(max_steps=10, warmup_steps=10))) == []
    # warmup is only compared with max_steps when max_steps is set
    assert problems_of(minimal(train=Train(max_steps=0, warmup_steps=500))) == []
    # ints are fine where a float is declared
    assert problems_of(minimal(train=Train(lr=1), adapter=Lora(alpha=16))) == []


@pytest.mark.parametrize("recipe, key", [
    (minimal(model=Model("")), "model.name"),
    (minimal(data=Data("")), "data.train"),
    (minimal(train=Train(max_steps=10, warmup_steps=11)), "train.warmup_steps"),
    (minimal(name="bad name!"), "name"),
    (minimal(name="a/b"), "name"),
    (minimal(adapter=Lora(r="8")), "adapter.r"),
    (minimal(adapter=Lora(r=True)), "adapter.r"),
    (minimal(model=Model("x", tiny=1)), "model.tiny"),
    (minimal(model=Model("x", tiny_size="huge")), "model.tiny_size"),
])
def test_problems_of_names_the_field(recipe, key):
    problems = problems_of(recipe)
    assert len(problems) == 1, problems
    assert names_field(problems[0], key), problems
    assert problems[0].startswith(key), problems
    with pytest.raises(ConfigError) as info:
        validate(recipe)
    assert info.value.problems == problems


def test_problems_of_warmup_mentions_both_fields():
    (problem,) = problems_of(minimal(train=Train(max_steps=3, warmup_steps=20)))
    assert "train.warmup_steps=20" in problem and "train.max_steps=3" in problem


def test_problems_of_reports_several_problems():
    recipe = Recipe(model=Model(""), data=Data(""), name="bad name",
                    train=Train(max_steps=1, warmup_steps=2))
    problems = problems_of(recipe)
    for key in ("model.name", "data.train", "train.warmup_steps"):
        assert sum(names_field(p, key) for p in problems) == 1, (key, problems)
    assert sum(p.startswith("name='bad name'") for p in problems) == 1, problems
    assert len(problems) == 4


def test_problems_of_wrong_section_type():
    problems = problems_of(minimal(adapter="lora"))
    assert problems == ["adapter: expected a Lora(...) section"]


# ---------------------------------------------------------------------------------------------
# Round trip, field docs

def test_recipe_round_trips_through_dict_and_json():
    recipes = [e.recipe for e in registry.shipped().values()]
    recipes.append(apply_overrides(recipes[0], ["model.quantize=nf4", "model.revision=abc",
                                                "adapter.use_dora=true", "name=x"]))
    recipes.append(minimal())
    for recipe in recipes:
        assert recipe_from_dict(recipe.to_dict()) == recipe
        assert recipe_from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_describe_fields_covers_every_field_with_a_doc():
    rows = describe_fields()
    keys = [row[0] for row in rows]
    assert len(keys) == len(set(keys)) == len(ALL_KEYS)
    assert set(keys) == ALL_KEYS
    for key, type_name, default, doc in rows:
        assert type_name and doc.strip(), key
        assert "\n" not in doc, key
    by_key = {row[0]: row for row in rows}
    assert by_key["train.lr"][1:3] == ("float", repr(2e-4))
    assert by_key["adapter.r"][1:3] == ("int", "16")
    assert by_key["model.quantize"][1] == "str or none"
    assert by_key["train.scheduler"][3].endswith("[cosine|linear|constant]")
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert by_key[f"{section}.{f.name}"][3].startswith(f.metadata["doc"])


def test_mutable_defaults_are_refused():
    with pytest.raises(TypeError):
        config._f([], "a list")


# ---------------------------------------------------------------------------------------------
# registry.load_file: a user's recipe file

DEMO_SOURCE = (Path(__file__).resolve().parents[1] / "recipes" / "tiny_demo.py").read_text()


def _load_error(path: Path) -> UserError:
    with pytest.raises(UserError) as info:
        registry.load_file(path)
    exc = info.value
    assert exc.exit_code == 2
    message = str(exc)
    assert message and "\n" not in message, message
    return exc


def test_load_file_valid_user_recipe(tmp_path):
    path = tmp_path / "my_recipe.py"
    path.write_text(DEMO_SOURCE)
    entry = registry.load_file(path)
    assert entry.name == entry.recipe.name == "my-recipe"
    assert entry.description == DEMO_SOURCE.splitlines()[0].strip('"')
    assert entry.recipe == dataclasses.replace(registry.resolve("tiny-demo").recipe, name="my-recipe")
    # the module does not linger in sys.modules
    assert not [m for m in sys.modules if m.startswith("_peftkit_recipe_")]


def test_load_file_explicit_name(tmp_path):
    path = tmp_path / "whatever.py"
    path.write_text(DEMO_SOURCE.replace("launch=", "name='custom-1', launch=", 1))
    assert registry.load_file(path).name == "custom-1"


def test_load_file_missing(tmp_path):
    path = tmp_path / "nope.py"
    exc = _load_error(path)
    assert str(path) in str(exc) and "not found" in str(exc)


def test_load_file_syntax_error_names_path_and_line(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text('"""Broken."""\nx = 1\nRECIPE = Recipe(model=\n')
    exc = _load_error(path)
    assert f"{path}:3" in str(exc) and "SyntaxError" in str(exc)


def test_load_file_raising_module_names_path_and_line(tmp_path):
    path = tmp_path / "raising.py"
    path.write_text('"""Raises."""\n\nraise RuntimeError("boom")\n')
    exc = _load_error(path)
    assert f"{path}:3" in str(exc) and "RuntimeError: boom" in str(exc)


def test_load_file_relative_path_names_the_line(tmp_path, monkeypatch):
    # the module's co_filename is absolute; the user typed a relative path
    monkeypatch.chdir(tmp_path)
    Path("raising.py").write_text('"""Raises."""\n\nraise RuntimeError("boom")\n')
    exc = _load_error(Path("raising.py"))
    assert str(exc).startswith("raising.py:3: ")


def test_load_file_bad_import_names_path_and_line(tmp_path):
    path = tmp_path / "bad_import.py"
    path.write_text("import peftkit_no_such_module\n")
    exc = _load_error(path)
    assert f"{path}:1" in str(exc) and "ModuleNotFoundError" in str(exc)


def test_load_file_without_recipe(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text('"""Nothing here."""\nX = 1\n')
    exc = _load_error(path)
    assert str(path) in str(exc) and "RECIPE" in str(exc)


def test_load_file_recipe_of_wrong_type(tmp_path):
    path = tmp_path / "wrong.py"
    path.write_text('RECIPE = {"model": {"name": "x"}}\n')
    exc = _load_error(path)
    assert str(path) in str(exc) and "RECIPE = Recipe(...)" in str(exc)


def test_load_file_not_python(tmp_path):
    path = tmp_path / "recipe.txt"
    path.write_text(DEMO_SOURCE)
    exc = _load_error(path)
    assert str(path) in str(exc) and ".py" in str(exc)


def test_load_file_invalid_recipe_is_a_config_error(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(DEMO_SOURCE.replace("Model(\"peftkit/tiny-llama-demo\"", "Model(\"\"")
                    .replace("r=16", "r=0"))
    exc = _load_error(path)
    assert isinstance(exc, ConfigError)
    assert len(exc.problems) == 2
    assert all(p.startswith("bad: ") for p in exc.problems)
    assert any(names_field(p, "model.name") for p in exc.problems)
    assert any(names_field(p, "adapter.r") for p in exc.problems)


def test_load_file_sees_edits(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(DEMO_SOURCE)
    assert registry.load_file(path).recipe.adapter.r == 16
    path.write_text(DEMO_SOURCE.replace("r=16", "r=4"))
    assert registry.load_file(path).recipe.adapter.r == 4


def test_load_file_never_uses_stale_bytecode(tmp_path, monkeypatch):
    # a __pycache__ next to the recipe would be trusted while mtime (1 s) and size match
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as for a user without the env var
    path = tmp_path / "mine.py"
    path.write_text(DEMO_SOURCE)
    stamp = path.stat().st_mtime
    assert registry.load_file(path).recipe.adapter.r == 16
    path.write_text(DEMO_SOURCE.replace("r=16", "r=32"))  # same size
    os.utime(path, (stamp, stamp))  # an edit within the same second
    assert registry.load_file(path).recipe.adapter.r == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.py"]


def test_config_error_message_shape():
    one = ConfigError("a: bad")
    many = ConfigError(["a: bad", "b: worse"])
    assert str(one) == "invalid recipe: a: bad" and one.problems == ["a: bad"]
    assert str(many) == "invalid recipe (2 problems): a: bad; b: worse"
    assert ConfigError.exit_code == 2
