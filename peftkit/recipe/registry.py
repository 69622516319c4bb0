"""Find recipes by name (the shipped `recipes/` directory) or by path (a user's own .py file)."""

from __future__ import annotations

import importlib.resources
import importlib.util
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from peftkit.recipe.overrides import suggest
from peftkit.recipe.schema import Recipe
from peftkit.recipe.validate import problems_of
from peftkit.errors import ConfigError, UserError


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    recipe: Recipe
    description: str


def recipes_dir() -> Path:
    """The shipped recipes: `peftkit.recipes` in a wheel, the repo's `recipes/` in a checkout."""
    return Path(str(importlib.resources.files("peftkit.recipes")))


def name_of(path: Path) -> str:
    return path.stem.replace("_", "-")


def load_file(path: Path) -> Entry:
    """Import a recipe module from a file and return its validated RECIPE."""
    if not path.is_file():
        raise UserError(f"recipe file {path} not found")
    module_name = f"_peftkit_recipe_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"{path}: not a Python module; recipes are .py files defining RECIPE")
    module = importlib.util.module_from_spec(spec)
    # A recipe is read, not installed: leave no __pycache__ next to the user's file.
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as exc:  # a user's recipe can fail in any way; say where
        line = _line_in(exc, path)
        raise UserError(f"{path}{line}: recipe failed to load: {type(exc).__name__}: {exc}") \
            from exc
    finally:
        sys.dont_write_bytecode = writes_bytecode
        sys.modules.pop(module_name, None)
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, Recipe):
        raise UserError(f"{path}: defines no RECIPE = Recipe(...); see `peftkit cp demo x.py` "
                        "for an example")
    doc = (module.__doc__ or "").strip().splitlines()
    name = recipe.name or name_of(path)
    problems = problems_of(recipe)
    if problems:
        raise ConfigError([f"{name}: {p}" for p in problems])
    return Entry(name=name, path=path, recipe=replace(recipe, name=name),
                 description=doc[0] if doc else "")


def _line_in(exc: BaseException, path: Path) -> str:
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f":{exc.lineno}"
    tb = exc.__traceback__
    line = ""
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
            line = f":{tb.tb_lineno}"
        tb = tb.tb_next
    return line


def shipped() -> dict[str, Entry]:
    """All shipped recipes by name; two recipes with one name is an error."""
    entries: dict[str, Entry] = {}
    for path in sorted(recipes_dir().glob("*.py")):
        if path.name.startswith("_"):
            continue
        entry = load_file(path)
        if entry.name in entries:
            raise UserError(f"recipe name {entry.name!r} is defined twice: "
                            f"{entries[entry.name].path} and {path}")
        entries[entry.name] = entry
    return entries


def shipped_names() -> list[str]:
    return sorted(shipped())


def resolve(name_or_path: str) -> Entry:
    """A shipped recipe by name, or a user's recipe by path (anything ending in .py)."""
    if name_or_path.endswith(".py") or "/" in name_or_path:
        return load_file(Path(name_or_path))
    path = recipes_dir() / (name_or_path.replace("-", "_") + ".py")
    if path.is_file():
        return load_file(path)
    # An explicit `name=` inside a module can differ from its file stem.
    for entry in shipped().values():
        if entry.name == name_or_path:
            return entry
    raise UserError(f"unknown recipe {name_or_path!r}{suggest(name_or_path, shipped_names())}; "
                    "`peftkit ls` lists them")
