"""Training invariants, asserted numerically on tiny models (DESIGN.md, "Correctness invariants")."""

import json
import math

import pytest
import torch

from peftkit.recipe import registry
from peftkit.recipe.overrides import apply_overrides
from peftkit.training.loop import train

# The demo task at the smallest tiny size: each run takes a few seconds.
FAST = ["model.tiny_size=xs", "data.max_samples=512", "train.eval_generate=0",
        "train.log_every=1", "train.warmup_steps=0", "adapter.dropout=0.0"]


def run(tmp_path, *overrides, recipe="tiny-demo", **kwargs):
    entry = registry.resolve(recipe)
    cfg = apply_overrides(entry.recipe, [*FAST, f"train.output_dir={tmp_path}", *overrides])
    return train(cfg, str(entry.path), **kwargs)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def losses(path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short demo run shared by the invariant tests below."""
    tmp = tmp_path_factory.mktemp("runs")
    return run(tmp, "train.max_steps=6", "train.batch_size=8")


def test_only_adapter_weights_change(trained):
    from transformers import AutoModelForCausalLM

    base_dir = json.loads((trained.path / "recipe.json").read_text())["base_path"]
    fresh = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    base_after = trained.model.get_base_model()
    compared = 0
    for name, param in base_after.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        key = name.replace("base_layer.", "").replace("original_module.", "")
        assert torch.equal(param.detach(), fresh[key]), f"base weight {key} changed"
        assert not param.requires_grad
        compared += 1
    assert compared >= len(fresh) - 1  # every base tensor was checked
    lora_b = [p for n, p in base_after.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero; it trained


def test_saved_adapter_loads_in_plain_peft_with_same_logits(trained):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    adapter = trained.path / "adapter"
    config = PeftConfig.from_pretrained(adapter)
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path), adapter).eval()
    ours = trained.model.eval()
    ids = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5, rtol=0), (expected - got).abs().max()


def test_grad_accumulation_equals_large_batch(tmp_path):
    big = run(tmp_path / "a", "train.max_steps=2", "train.batch_size=8", "train.grad_accum=1")
    acc = run(tmp_path / "b", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=4")
    assert losses(big.path) == pytest.approx(losses(acc.path), rel=1e-5)
    a, b = adapter_tensors(big.model), adapter_tensors(acc.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name


def test_resume_continues_the_same_trajectory(tmp_path):
    common = ["train.batch_size=4", "train.scheduler=constant", "train.save_every=2"]
    straight = run(tmp_path / "a", "train.max_steps=4", *common)
    run(tmp_path / "b", "train.max_steps=2", *common)
    resumed = run(tmp_path / "b", "train.max_steps=4", *common, resume=True)
    assert losses(resumed.path) == losses(straight.path)  # bitwise on CPU
    a, b = adapter_tensors(straight.model), adapter_tensors(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)


SHIPPED = registry.shipped_names()


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_trains_in_tiny_form(tmp_path, name, alpaca_file):
    entry = registry.resolve(name)
    overrides = ["model.tiny=true", "model.tiny_size=xs", "train.max_steps=8",
                 "train.batch_size=8", "train.grad_accum=1", "train.lr=5e-3",
                 "train.save_every=0", "train.eval_every=0", "data.eval_size=32",
                 "data.max_len=64"]
    if entry.recipe.data.train.count("/") == 1 and not entry.recipe.data.train.startswith("peftkit:"):
        overrides += [f"data.train={alpaca_file}", "data.eval="]  # Hub data: use local rows
    result = run(tmp_path, *overrides, recipe=name)
    history = losses(result.path)
    assert all(math.isfinite(x) for x in history)
    before, after = result.evals["before"]["eval_loss"], result.evals["after"]["eval_loss"]
    assert after < before, (name, before, after)
    assert (result.path / "adapter" / "adapter_model.safetensors").is_file()
