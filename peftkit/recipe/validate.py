"""Validation of a recipe: every problem at once, each naming its field, the bad value and
what is allowed, before anything loads."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from peftkit.adapters.registry import adapter_problems
from peftkit.errors import ConfigError
from peftkit.recipe.objective import objective_problems
from peftkit.recipe.schema import SECTIONS, Hub, Model, Recipe, field_types, type_name
from peftkit.recipe.train_sources import eval_problems, parse_train


def _check_types(section: str, obj: Any) -> tuple[list[str], list[str]]:
    """(type problems, choice problems) of one section. Range checks need correct types, so
    type problems stop validation early; choice problems do not."""
    problems, bad_choices = [], []
    for name, tp in field_types(type(obj)).items():
        value = getattr(obj, name)
        allowed = tuple(a for a in typing.get_args(tp)) or (tp,)
        allowed = tuple(float if a is float else a for a in allowed)
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            problems.append(f"{section}.{name}={value!r}: expected {type_name(tp)}")
            continue
        choices = dataclasses.fields(type(obj))[
            [f.name for f in dataclasses.fields(type(obj))].index(name)].metadata.get("choices")
        if choices and value not in choices:
            shown = ", ".join(str(c).lower() if c is None else str(c) for c in choices)
            bad_choices.append(f"{section}.{name}={value!r}: must be one of {shown}")
    return problems, bad_choices


def _positive(problems: list[str], key: str, value: float, allow_zero: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison
        problems.append(f"{key}={value!r}: must be a finite number")
    elif isinstance(value, (int, float)) and (value < 0 or (value == 0 and not allow_zero)):
        need = ">= 0" if allow_zero else "> 0"
        problems.append(f"{key}={value!r}: must be {need}")


def _quantization_problems(m: Model) -> list[str]:
    """Settings that only mean something for (4-bit) quantization."""
    problems = []
    four_bit = m.quantize in ("nf4", "fp4")
    only = "only applies to 4-bit quantization (model.quantize=nf4 or fp4)"
    if not four_bit and m.double_quant is False:
        problems.append(f"model.double_quant=False: {only}")
    if not four_bit and m.quant_storage != "auto":
        problems.append(f"model.quant_storage={m.quant_storage!r}: {only}")
    if not four_bit and m.compute_dtype != "auto":
        problems.append(f"model.compute_dtype={m.compute_dtype!r}: {only} (8-bit layers compute "
                        "in the activation dtype; an unquantized base uses model.dtype)")
    if not m.quantize and m.upcast_unquantized:
        problems.append("model.upcast_unquantized=True: only applies to a quantized base "
                        "(model.quantize=nf4, fp4 or int8); an unquantized base uses model.dtype")
    return problems


def _gguf_problems(m: Model) -> list[str]:
    if not m.gguf_file:
        return []
    if m.name.lower().endswith(".gguf"):
        return [f"model.gguf_file={m.gguf_file!r}: model.name is a GGUF file already; set "
                "one of the two"]
    if not m.gguf_file.lower().endswith(".gguf"):
        return [f"model.gguf_file={m.gguf_file!r}: expected a file name ending in .gguf"]
    return []


def problems_of(recipe: Recipe) -> list[str]:
    problems: list[str] = []
    choice_problems: list[str] = []
    for section in SECTIONS:
        obj = getattr(recipe, section)
        if not isinstance(obj, SECTIONS[section]):
            problems.append(f"{section}: expected a {SECTIONS[section].__name__}(...) section")
            continue
        type_problems, bad_choices = _check_types(section, obj)
        problems += type_problems
        choice_problems += bad_choices
    if problems:
        return problems + choice_problems
    problems = choice_problems
    m, a, d, t, lch = recipe.model, recipe.adapter, recipe.data, recipe.train, recipe.launch
    if not m.name:
        problems.append("model.name: empty; name a Hub model id or a local path")
    problems += _quantization_problems(m)
    problems += _gguf_problems(m)
    problems += adapter_problems(m, a)
    _positive(problems, "adapter.r", a.r)
    _positive(problems, "adapter.alpha", a.alpha)
    if not 0 <= a.dropout < 1:
        problems.append(f"adapter.dropout={a.dropout!r}: must be in [0, 1)")
    if not a.targets.strip():
        problems.append("adapter.targets: empty; use all-linear or module names")
    problems += parse_train(d.train)[1] + eval_problems(d.eval)  # sources and mix weights
    _positive(problems, "data.max_len", d.max_len)
    _positive(problems, "data.eval_size", d.eval_size, allow_zero=True)
    _positive(problems, "data.max_samples", d.max_samples, allow_zero=True)
    _positive(problems, "train.lr", t.lr)
    _positive(problems, "train.batch_size", t.batch_size)
    _positive(problems, "train.grad_accum", t.grad_accum)
    _positive(problems, "train.epochs", t.epochs)
    for key in ("max_steps", "warmup_steps", "max_grad_norm", "weight_decay", "log_every",
                "eval_every", "save_every", "eval_generate", "forgetting_warn"):
        _positive(problems, f"train.{key}", getattr(t, key), allow_zero=True)
    _positive(problems, "train.keep_checkpoints", t.keep_checkpoints)
    _positive(problems, "train.max_new_tokens", t.max_new_tokens)
    _positive(problems, "launch.num_processes", lch.num_processes)
    if t.max_steps > 0 and t.warmup_steps > t.max_steps:
        problems.append(f"train.warmup_steps={t.warmup_steps}: longer than "
                        f"train.max_steps={t.max_steps}")
    if recipe.name and not all(c.isalnum() or c in "-_." for c in recipe.name):
        problems.append(f"name={recipe.name!r}: use letters, digits, '-', '_' or '.'")
    problems += hub_problems(recipe.hub)
    problems += objective_problems(recipe)
    return problems


def hub_problems(h: Hub) -> list[str]:
    problems = []
    if h.repo_id and (h.repo_id.count("/") != 1 or not all(
            part and all(c.isalnum() or c in "-_." for c in part)
            for part in h.repo_id.split("/"))):
        problems.append(f"hub.repo_id={h.repo_id!r}: expected owner/name (letters, digits, "
                        "'-', '_', '.')")
    if h.push_at_end and not h.repo_id:
        problems.append("hub.push_at_end=True: hub.repo_id is empty; set hub.repo_id=owner/name")
    if h.revision and (h.revision != h.revision.strip() or " " in h.revision):
        problems.append(f"hub.revision={h.revision!r}: a branch name has no spaces")
    return problems


def validate(recipe: Recipe) -> Recipe:
    problems = problems_of(recipe)
    if problems:
        raise ConfigError(problems)
    return recipe
