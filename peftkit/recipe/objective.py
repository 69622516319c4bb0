"""Validation of the training objective's settings (train.objective and its knobs): which
combinations mean something, reported with every other recipe problem at once."""

from __future__ import annotations

import math

from peftkit.recipe.schema import Recipe

PREFERENCE_OBJECTIVES = ("dpo", "orpo")


def _finite_positive(problems: list[str], key: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        problems.append(f"{key}={value!r}: must be a finite number > 0")


def objective_problems(recipe: Recipe) -> list[str]:
    t, d, a, m = recipe.train, recipe.data, recipe.adapter, recipe.model
    problems: list[str] = []
    _finite_positive(problems, "train.beta", t.beta)
    _finite_positive(problems, "train.orpo_lambda", t.orpo_lambda)
    if not (isinstance(t.label_smoothing, (int, float)) and 0 <= t.label_smoothing < 0.5):
        problems.append(f"train.label_smoothing={t.label_smoothing!r}: must be in [0, 0.5)")
    elif t.label_smoothing and not (t.objective == "dpo" and t.dpo_loss == "sigmoid"):
        problems.append(f"train.label_smoothing={t.label_smoothing!r}: only applies to "
                        "train.objective=dpo with train.dpo_loss=sigmoid")
    if m.adapter_init and a.init != "default":
        problems.append(f"adapter.init={a.init!r}: model.adapter_init={m.adapter_init!r} "
                        "already gives the starting weights; leave adapter.init=default")
    if t.objective not in PREFERENCE_OBJECTIVES:
        return problems
    this = f"train.objective={t.objective}"
    # The reference is the base with the adapter disabled: an init that rewrites the base
    # weights (PiSSA, OLoRA, LoftQ keep a residual) would make it a different model.
    if a.init not in ("default", "gaussian") and not m.adapter_init:
        problems.append(f"adapter.init={a.init!r}: {this} compares with the base model with "
                        "the adapter disabled, which this init changes; use default or gaussian")
    if d.format != "auto":
        problems.append(f"data.format={d.format!r}: {this} reads prompt/chosen/rejected "
                        "pairs; leave data.format=auto")
    if d.loss_on != "completion":
        problems.append(f"data.loss_on={d.loss_on!r}: {this} scores only the responses; "
                        "leave data.loss_on=completion")
    if t.eval_generate:
        problems.append(f"train.eval_generate={t.eval_generate}: not available with {this} "
                        "(held-out pairs are scored by preference accuracy instead); set 0")
    if a.method == "prompt_tuning":
        problems.append(f"adapter.method=prompt_tuning: not available with {this}; use lora "
                        "or ia3")
    return problems
