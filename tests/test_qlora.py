"""QLoRA: tiny models on a real bitsandbytes 4-/8-bit base, on CPU (peftkit/quantize.py)."""

import sys
import warnings
from dataclasses import replace

import pytest
import torch

from peftkit.model import quantize
from peftkit.recipe import registry
from peftkit.cli.app import main
from peftkit.recipe import Model
from peftkit.recipe.overrides import apply_overrides
from peftkit.recipe.validate import problems_of
from peftkit.errors import UserError
from peftkit.model.loading import (attach_adapter, base_path, load_model, prepare_for_training,
                              resolve_precision)
from peftkit.training.loop import train

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")

QLORA = "llama3-8b-qlora"
TINY = ["model.tiny=true", "model.tiny_size=xs", "data.max_len=64", "data.eval_size=32",
        "train.batch_size=8", "train.grad_accum=1", "train.lr=5e-3", "train.warmup_steps=0",
        "train.save_every=0", "train.eval_every=0", "train.log_every=1", "adapter.dropout=0.0"]


def tiny_model(quantize_: str | None) -> Model:
    model = registry.resolve(QLORA).recipe.model
    return replace(model, tiny=True, tiny_size="xs", quantize=quantize_, compute_dtype="auto")


def quantized_state(base) -> dict[str, torch.Tensor]:
    """Every quantized tensor of the base as stored (packed 4-bit/int8 weights, absmax, scales).
    `state_dict` returns the canonical layout whatever bitsandbytes did in memory."""
    return {k: v.detach().clone() for k, v in base.state_dict().items()
            if v.dtype in (torch.uint8, torch.int8) or "absmax" in k or "SCB" in k}


@pytest.mark.parametrize("kind, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_tiny_base_loads_quantized_under_the_adapter(kind, layer):
    model = tiny_model(kind)
    precision = resolve_precision(model, registry.resolve(QLORA).recipe.launch, "cpu")
    base = load_model(base_path(model), model, precision.dtype, precision.compute_dtype, "cpu")
    peft_model = attach_adapter(prepare_for_training(base, model, False),
                                registry.resolve(QLORA).recipe.adapter)
    adapted = [m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(type(m.get_base_layer()).__name__ == layer for m in adapted)
    assert all(isinstance(m.get_base_layer(), (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
               for m in adapted)
    head = peft_model.get_base_model().get_output_embeddings()
    assert type(head) is torch.nn.Linear  # bitsandbytes leaves the LM head unquantized
    if kind == "nf4":  # auto compute dtype on CPU is float32
        assert adapted[0].get_base_layer().compute_dtype == torch.float32


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, alpaca_file):
    """One short QLoRA run (nf4, double quant, gradient checkpointing) shared below."""
    entry = registry.resolve(QLORA)
    recipe = apply_overrides(entry.recipe, [
        *TINY, "train.max_steps=8", f"data.train={alpaca_file}", "data.eval=",
        f"train.output_dir={tmp_path_factory.mktemp('runs')}"])
    assert recipe.model.quantize == "nf4" and recipe.train.gradient_checkpointing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(recipe, str(entry.path))
    return recipe, result, [str(w.message) for w in caught]


def test_qlora_trains_while_the_quantized_base_stays_bit_identical(qlora_run):
    recipe, result, caught = qlora_run
    before, after = result.evals["before"]["eval_loss"], result.evals["after"]["eval_loss"]
    assert after < before - 0.05, (before, after)
    base = result.model.get_base_model()
    fresh = load_model(base_path(recipe.model), recipe.model, torch.float32, torch.float32,
                       "cpu")
    trained, expected = quantized_state(base), quantized_state(fresh)
    trained = {k.replace("base_layer.", ""): v for k, v in trained.items()}
    assert expected and trained.keys() == expected.keys()
    assert any(v.dtype == torch.uint8 and "absmax" not in k for k, v in expected.items())
    for key, value in expected.items():
        assert torch.equal(trained[key], value), f"quantized base tensor {key} changed"
    assert base.is_activation_checkpointing  # on, and through peftkit's one switch:
    assert not [w for w in caught if "use_reentrant" in w]


def test_an_evaluation_does_not_change_the_training_gradients():
    """A held-out evaluation runs the 4-bit layers without gradients; on CPUs with AVX512-BF16,
    bitsandbytes would then repack their weights into an inference layout with no backward,
    and training after it would get wrong gradients (quantize.keep_cpu_layout_trainable)."""
    model = tiny_model("nf4")
    base = load_model(base_path(model), model, torch.float32, torch.float32, "cpu")
    peft_model = attach_adapter(prepare_for_training(base, model, False),
                                replace(registry.resolve(QLORA).recipe.adapter, dropout=0.0,
                                        init="gaussian"))
    ids = torch.randint(3, 4000, (2, 16), generator=torch.Generator().manual_seed(0))

    def gradients():
        peft_model.train()
        peft_model.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    fresh = gradients()
    peft_model.eval()
    with torch.no_grad():
        peft_model(input_ids=ids)
    after = gradients()
    assert all(torch.allclose(fresh[n], after[n], atol=1e-6, rtol=1e-5) for n in fresh)
    assert any(g.abs().sum() > 0 for n, g in fresh.items() if ".layers.0.self_attn.q_proj" in n)


def test_a_loaded_4bit_base_computes_in_eval_what_it_computes_in_training():
    """`peftkit merge`, eval and generate run the reloaded 4-bit base in eval mode without
    gradients. On CPUs with AVX512-BF16, bitsandbytes would switch each layer to its bf16
    inference kernel there (activations and absmax rounded to bf16), and the reloaded model
    would no longer compute the probe loss training recorded: on SmolLM2-135M that failed
    the merge's "as trained" check (1.3% off, allowed 0.1%). load_model keeps the float32
    path, so eval and training forwards agree to the last bit."""
    model = tiny_model("nf4")
    base = load_model(base_path(model), model, torch.float32, torch.float32, "cpu")
    ids = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base.train()  # bitsandbytes never repacks in train mode: the training path
        trained = base(input_ids=ids).logits
        base.eval()
        got = base(input_ids=ids).logits
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                              for m in layers)
    assert torch.equal(trained, got), (trained - got).abs().max()


def test_saved_qlora_adapter_loads_in_plain_peft_with_same_logits(qlora_run):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    recipe, result, _ = qlora_run
    adapter = result.path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(
        PeftConfig.from_pretrained(adapter).base_model_name_or_path,
        quantization_config=quantize.bnb_config(recipe.model, torch.float32), dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, adapter)
    ours = result.model
    ids = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    # Train mode (dropout is 0): the float32 path peftkit trains with. In eval mode without
    # gradients, bitsandbytes may switch a plain model's 4-bit layers to its bf16 CPU
    # inference kernel (AVX512-BF16 machines), which agrees only to bf16 precision.
    for model in (plain, ours):
        model.train()
    with torch.no_grad():
        expected, got = ours(input_ids=ids).logits, plain(input_ids=ids).logits
        assert torch.allclose(expected, got, atol=1e-5, rtol=0), (expected - got).abs().max()
        plain.eval()
        assert torch.allclose(expected, plain(input_ids=ids).logits, atol=5e-2, rtol=0)


def test_missing_bitsandbytes_is_a_user_error_before_loading(tmp_path, monkeypatch, capsys):
    import peftkit.training.setup

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails
    monkeypatch.setattr(peftkit.training.setup, "load_model", lambda *a, **k: pytest.fail("loaded"))
    rc = main(["train", QLORA, "model.tiny=true", "data.train=peftkit:data/sort_reverse/train.jsonl",
               f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "bitsandbytes is not installed" in err and "peftkit[qlora]" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / QLORA).exists()


def test_device_bitsandbytes_cannot_serve_is_a_user_error(monkeypatch):
    monkeypatch.setattr(bnb, "supported_torch_devices", {"cuda"})
    with pytest.raises(UserError, match="cannot run on cpu"):
        quantize.require_bitsandbytes(tiny_model("nf4"), registry.resolve(QLORA).recipe.adapter,
                                      "cpu")


def test_quantization_settings_are_validated_together():
    recipe = registry.resolve(QLORA).recipe
    bad = replace(recipe, model=replace(recipe.model, quantize="int8", double_quant=False,
                                        quant_storage="bfloat16"),
                  adapter=replace(recipe.adapter, init="pissa"))
    problems = problems_of(bad)
    for text in ("model.double_quant=False: only applies to 4-bit",
                 "model.quant_storage='bfloat16': only applies to 4-bit",
                 "model.compute_dtype='bfloat16': only applies to 4-bit",
                 "adapter.init='pissa'"):
        assert any(text in p for p in problems), (text, problems)
    assert problems_of(recipe) == []
    with pytest.raises(UserError, match="use_dora=true with model.quantize=int8"):
        quantize.require_bitsandbytes(replace(recipe.model, quantize="int8"),
                                      replace(recipe.adapter, use_dora=True), "cpu")


def test_compute_dtype_auto_is_float32_on_cpu_and_bf16_on_a_bf16_gpu():
    model = replace(tiny_model("nf4"), dtype="auto")
    launch = registry.resolve(QLORA).recipe.launch
    cpu = resolve_precision(model, launch, "cpu")
    gpu = resolve_precision(model, launch, "cuda", bf16_ok=True)
    assert cpu.compute_dtype == torch.float32 and gpu.compute_dtype == torch.bfloat16
    assert any("compute in float32 (model.compute_dtype=auto on cpu)" in n for n in cpu.notes)
    assert resolve_precision(replace(model, quantize=None), launch, "cpu").compute_dtype is None
