"""Command-line overrides: "section.field=value" strings converted by the field's declared
type, applied to a recipe and validated together (every problem reported at once)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from peftkit.errors import ConfigError
from peftkit.recipe.schema import SECTIONS, Recipe, field_types, type_name
from peftkit.recipe.validate import problems_of


def _convert(text: str, tp: Any, choices: tuple = ()) -> Any:
    """Convert a command-line string to the field type `tp` (raises ValueError)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(text, inner[0])
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            # allow 1e3-style integers, but not 2.5
            number = float(text)
            if not number.is_integer():
                raise ValueError("expected an integer") from None
            return int(number)
    if tp is float:
        return float(text)
    if tp is str and not choices and text.lower() in ("none", "null"):
        return ""  # no value, as for optional fields: data.eval=null names no dataset "null"
    return text


def suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def parse_overrides(items: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Parse `section.field=value` strings. Returns ({section: {field: value}}, problems)."""
    parsed: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    all_keys = [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)]
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            problems.append(f"override '{item}': expected section.field=value "
                            f"(e.g. train.lr=1e-4)")
            continue
        section, dot, name = key.partition(".")
        if section == "name" and not dot:
            parsed.setdefault("", {})["name"] = text
            continue
        cls = SECTIONS.get(section)
        types_ = field_types(cls) if cls else {}
        choices = {f.name: f.metadata.get("choices") or () for f in dataclasses.fields(cls)
                   } if cls else {}
        if not dot or cls is None or name not in types_:
            problems.append(f"unknown setting '{key}'{suggest(key, all_keys)}")
            continue
        try:
            parsed.setdefault(section, {})[name] = _convert(text, types_[name], choices[name])
        except ValueError:
            problems.append(f"{key}={text!r}: expected {type_name(types_[name])}")
    return parsed, problems


def apply_overrides(recipe: Recipe, items: list[str]) -> Recipe:
    """Return a recipe with `section.field=value` overrides applied and validated; every
    problem (unknown keys, unconvertible values, out-of-range values) is reported at once."""
    parsed, problems = parse_overrides(items)
    changes: dict[str, Any] = {}
    for section, values in parsed.items():
        if section == "":
            changes.update(values)
        else:
            changes[section] = dataclasses.replace(getattr(recipe, section), **values)
    recipe = dataclasses.replace(recipe, **changes)
    problems += problems_of(recipe)
    if problems:
        raise ConfigError(problems)
    return recipe
