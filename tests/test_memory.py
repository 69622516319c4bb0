"""The memory estimate (peftkit/model/memory.py): its parts against what the model really holds, and
its total against a run's measured peak."""

import json
from dataclasses import replace

import pytest
import torch

from peftkit.model import memory
from peftkit.recipe import registry
from peftkit.recipe.overrides import apply_overrides
from peftkit.model.loading import (base_path, load_model, prepare_for_training, resolve_precision,
                              attach_adapter)
from peftkit.model.summary import base_config
from peftkit.training.loop import train

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")

QLORA = "llama3-8b-qlora"
# A run whose logits (4096 positions x vocab 4096, float32) are far above glibc's largest mmap
# threshold, so their memory shows in RSS even in a test process whose heaps already hold
# freed memory from earlier tests.
MEASURED = ["model.tiny=true", "model.tiny_size=xs", "model.quantize=none",
            "model.compute_dtype=auto", "train.gradient_checkpointing=false",
            "data.format=text", "data.max_len=256", "data.eval_size=4", "train.batch_size=16",
            "train.grad_accum=1", "train.max_steps=2", "train.warmup_steps=0",
            "train.save_every=0"]
TOLERANCE = (0.5, 3.0)  # measured peak RSS above the start / estimate, CPU (docs/qlora-and-memory.md)


def recipe_with(*overrides):
    return apply_overrides(registry.resolve(QLORA).recipe, list(overrides))


def estimate_for(recipe, device="cpu", bf16_ok=None):
    config, _ = base_config(recipe)
    return memory.estimate(recipe, config, resolve_precision(recipe.model, recipe.launch, device,
                                                             bf16_ok=bf16_ok))


def base_part(est):
    return sum(v for k, v in est.parts.items() if k.startswith("base"))


def test_parts_add_up_to_the_total():
    est = estimate_for(recipe_with("model.tiny=true", "model.tiny_size=s"))
    assert est.total == sum(est.parts.values()) == est.to_dict()["total_bytes"]
    assert all(v > 0 for v in est.parts.values()) and est.parts.keys() == est.notes.keys()
    assert est.to_dict()["parts_bytes"] == est.parts


@pytest.fixture(scope="module")
def llama_8b():
    """Llama-3.1-8B on the meta device (no memory), from peftkit's table of shapes."""
    from transformers import AutoModelForCausalLM

    config, source = base_config(recipe_with())
    assert "table" in source or "config.json" in source
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def base_of(model, *overrides) -> int:
    recipe = recipe_with(*overrides)
    quantized, other, _ = memory.base_bytes(model, recipe, torch.bfloat16)
    return quantized + other


def test_nf4_base_is_smaller_than_int8_smaller_than_fp32_for_llama_8b(llama_8b):
    nf4 = base_of(llama_8b, "model.quantize=nf4")
    int8 = base_of(llama_8b, "model.quantize=int8", "model.compute_dtype=auto")
    bf16 = base_of(llama_8b, "model.quantize=none", "model.compute_dtype=auto")
    assert nf4 < int8 < bf16 == 8_030_261_248 * 2  # published parameter count, bf16
    # 6.98e9 params in quantized linears at ~0.52 B (nf4 + double quant) + the 1.05e9 of
    # embeddings and head, which k-bit preparation upcasts to float32.
    quantized, other, _ = memory.base_bytes(llama_8b, recipe_with(), torch.bfloat16)
    assert 3.5e9 < quantized < 3.7e9 and other == (8_030_261_248 - 6_979_321_856) * 4


def test_double_quant_saves_what_qlora_says(llama_8b):
    with_dq = base_of(llama_8b, "model.quantize=nf4")
    without = base_of(llama_8b, "model.quantize=nf4", "model.double_quant=false")
    saved_bits = 8 * (without - with_dq) / 6_979_321_856
    assert 0.35 < saved_bits < 0.4  # QLoRA paper: ~0.37 bit per parameter


def live_base_bytes(base) -> tuple[int, int]:
    """(bytes of quantized layers incl. their quantization state, bytes of other weights) of a
    loaded model, counted from its tensors."""
    import bitsandbytes as bnb

    quantized, seen = 0, set()
    for module in base.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            qs = w.quant_state
            parts = [w.data, qs.absmax, qs.code]
            if qs.nested:
                parts += [qs.offset, qs.state2.absmax, qs.state2.code]
        elif isinstance(module, bnb.nn.Linear8bitLt):
            w = module.weight
            parts = [w.data, w.SCB]
        else:
            continue
        quantized += sum(t.numel() * t.element_size() for t in parts)
        seen.add(id(w))
    other = sum(p.numel() * p.element_size() for p in base.parameters() if id(p) not in seen)
    return quantized, other


@pytest.mark.parametrize("overrides", [(), ("model.double_quant=false",), ("model.quantize=fp4",),
                                       ("model.quantize=int8", "model.compute_dtype=auto")])
def test_base_estimate_matches_the_loaded_quantized_model(overrides):
    pytest.importorskip("bitsandbytes")
    recipe = recipe_with("model.tiny=true", "model.tiny_size=xs", *overrides)
    precision = resolve_precision(recipe.model, recipe.launch, "cpu")
    base = load_model(base_path(recipe.model), recipe.model, precision.dtype,
                      precision.compute_dtype, "cpu")
    base = prepare_for_training(base, recipe.model, False)
    est = estimate_for(recipe)
    quantized, other = live_base_bytes(base)
    assert est.parts["base: quantized linears"] == pytest.approx(quantized, rel=0.01)
    assert est.parts["base: other weights"] == other


def saved_for_backward(model, ids) -> int:
    """Bytes autograd saves for backward in one decoder forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_base_model().get_decoder()(input_ids=ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_activation_estimate_matches_what_autograd_saves(dropout):
    recipe = recipe_with("model.tiny=true", "model.tiny_size=s", "model.quantize=none",
                         "model.compute_dtype=auto", "train.gradient_checkpointing=false",
                         "data.max_len=128", "train.batch_size=2", f"adapter.dropout={dropout}")
    base = load_model(base_path(recipe.model), recipe.model, torch.float32)
    model = attach_adapter(prepare_for_training(base, recipe.model, False), recipe.adapter)
    model.train()
    ids = torch.randint(3, 4000, (2, 128), generator=torch.Generator().manual_seed(0))
    saved = saved_for_backward(model, ids)
    assert estimate_for(recipe).parts["activations"] == pytest.approx(saved, rel=0.15)


def test_checkpointing_shrinks_the_activations():
    tiny = ("model.tiny=true", "model.tiny_size=s")
    plain = estimate_for(recipe_with(*tiny, "train.gradient_checkpointing=false"))
    checkpointed = estimate_for(recipe_with(*tiny))
    assert checkpointed.parts["activations"] < plain.parts["activations"] / 5


def test_result_json_records_estimate_and_measured_peak(tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(f"w{i * j % 997}" for j in range(600))})
                            + "\n" for i in range(40)))
    entry = registry.resolve(QLORA)
    recipe = apply_overrides(entry.recipe, [*MEASURED, f"data.train={text}",
                                            f"train.output_dir={tmp_path}"])
    result = train(recipe, str(entry.path))
    saved = json.loads((result.path / "result.json").read_text())["memory"]
    expected = estimate_for(recipe)
    assert saved["estimate"]["total_bytes"] == expected.total
    measured = saved["measured"]["above_baseline_bytes"]
    assert measured > 0 and saved["measured_over_estimate"] == measured / expected.total
    low, high = TOLERANCE
    assert low <= measured / expected.total <= high, (measured, expected.parts)
