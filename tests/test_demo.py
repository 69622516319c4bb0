"""The real-model demo (recipes/demo.py), cheaply: its held-out answers cannot come from the
training data, and the recipe runs end to end in its tiny form. (The real run is `make demo`.)"""

import json

from peftkit.data.sources import resolve_source
from peftkit.recipe import registry
from peftkit.recipe.overrides import apply_overrides
from peftkit.training.loop import train


def rows(source: str) -> list[dict]:
    lines = open(resolve_source(source), encoding="utf-8").read().splitlines()
    return [json.loads(line)["messages"] for line in lines]


def test_held_out_capitals_never_appear_in_training():
    data = registry.resolve("demo").recipe.data
    train_text = json.dumps(rows(data.train))
    held_out = rows(data.eval)
    assert len(held_out) >= 20
    for user, assistant in held_out:
        country = user["content"].removeprefix("What is the capital of ").rstrip("?")
        assert country not in train_text and assistant["content"] not in train_text, country


def test_demo_runs_in_tiny_form(tmp_path):
    entry = registry.resolve("demo")
    recipe = apply_overrides(entry.recipe, [
        "model.tiny=true", "model.tiny_size=xs", "train.max_steps=2", "train.warmup_steps=0",
        "train.eval_generate=4", "train.max_new_tokens=4", f"train.output_dir={tmp_path}"])
    result = train(recipe, str(entry.path))
    assert result.steps == 2 and "exact_match" in result.evals["after"]
    assert result.forgetting is None  # off for a tiny base: its "general ability" is noise
    assert (result.path / "adapter" / "adapter_model.safetensors").is_file()
