"""The memory estimate (peftkit/model/memory.py): its parts against what the model really holds, and
its total against a run's measured peak."""

import json
from dataclasses import replace

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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
                                                             bf16_ok=bf16_ok), device)


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
    # 6.98e9 params in quantized linears at ~0.52 B (nf4 + double quant) ...
    quantized, other, _ = memory.base_bytes(llama_8b, recipe_with(), torch.bfloat16)
    # ... and the 1.05e9 of embeddings, norms and head stay bf16, or are upcast on request.
    unquantized = 8_030_261_248 - 6_979_321_856
    assert 3.5e9 < quantized < 3.7e9 and other == unquantized * 2
    upcast = recipe_with("model.upcast_unquantized=true")
    assert memory.base_bytes(llama_8b, upcast, torch.bfloat16)[1] == unquantized * 4


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


# ---------------------------------------------------------------------------------------------
# A bf16 GPU's memory plan, checked on CPU: what k-bit preparation keeps in which dtype, what
# a 16-bit step saves, the peak of live tensors in a step, and activation offloading.

def bf16_gpu(recipe):
    """The precision a bf16-capable GPU trains `recipe` with (bf16 weights and autocast)."""
    return resolve_precision(recipe.model, recipe.launch, "cuda", bf16_ok=True)


@pytest.mark.parametrize("upcast", [False, True])
def test_kbit_preparation_keeps_unquantized_weights_in_the_base_dtype(upcast):
    bnb = pytest.importorskip("bitsandbytes")
    recipe = recipe_with("model.tiny=true", "model.tiny_size=xs",
                         f"model.upcast_unquantized={upcast}")
    precision = bf16_gpu(recipe)
    base = load_model(base_path(recipe.model), recipe.model, precision.dtype,
                      precision.compute_dtype, "cpu")
    base = prepare_for_training(base, recipe.model, True)
    quantized, other = live_base_bytes(base)
    model = attach_adapter(base, recipe.adapter)
    kept = torch.float32 if upcast else torch.bfloat16
    seen = {"4-bit": 0, "lora": 0, "kept": 0}
    for name, p in model.named_parameters():
        if isinstance(p, bnb.nn.Params4bit):
            assert p.dtype == torch.uint8 and not p.requires_grad, name
            seen["4-bit"] += 1
        elif "lora_" in name:  # peft keeps adapter weights in float32 (autocast_adapter_dtype)
            assert p.dtype == torch.float32 and p.requires_grad, name
            seen["lora"] += 1
        else:  # embeddings, norms, LM head
            assert p.dtype == kept and not p.requires_grad, name
            seen["kept"] += 1
    # 7 linears x 2 layers; A and B of each; embeddings, head, 2 norms x 2 layers + final norm
    assert seen == {"4-bit": 14, "lora": 28, "kept": 7}
    assert {m.compute_dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)} \
        == {torch.bfloat16}
    est = memory.estimate(recipe, base_config(recipe)[0], precision, "cuda")
    assert est.parts["base: other weights"] == other
    assert est.parts["base: quantized linears"] == pytest.approx(quantized, rel=0.01)


def test_upcast_applies_to_quantized_bases_only():
    from peftkit.errors import ConfigError
    from peftkit.recipe.validate import validate

    with pytest.raises(ConfigError, match="model.upcast_unquantized=True: only applies to a "
                                          "quantized base"):
        validate(recipe_with("model.quantize=none", "model.compute_dtype=auto",
                             "model.upcast_unquantized=true"))


@pytest.mark.parametrize("upcast", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_16bit_activation_estimate_matches_what_autograd_saves(upcast, dropout):
    """A QLoRA step under bf16 autocast, as on a bf16 GPU: bf16 activations, or with upcast
    embeddings and norms a float32 residual stream and bf16 matmul outputs."""
    pytest.importorskip("bitsandbytes")
    from peftkit.model import fused_lora

    recipe = recipe_with("model.tiny=true", "model.tiny_size=s", "data.max_len=128",
                         "train.gradient_checkpointing=false", "train.batch_size=2",
                         f"adapter.dropout={dropout}", f"model.upcast_unquantized={upcast}")
    precision = bf16_gpu(recipe)
    base = load_model(base_path(recipe.model), recipe.model, precision.dtype,
                      precision.compute_dtype, "cpu")
    model = attach_adapter(prepare_for_training(base, recipe.model, False), recipe.adapter)
    fused_lora.enable(model)
    model.train()
    ids = torch.randint(3, 4000, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved = saved_for_backward(model, ids)
    est = memory.estimate(recipe, base_config(recipe)[0], precision, "cuda")
    assert est.parts["activations"] == pytest.approx(saved, rel=0.15)
    assert est.precision.endswith("float32 residual stream, 16-bit matmul outputs" if upcast
                                  else "16-bit activations")


class LiveBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while active: on CPU, what
    `torch.cuda.max_memory_allocated` measures on a GPU (without the allocator's rounding).
    Storages are seen when an op makes them and dropped once nothing holds them."""

    def __init__(self, tensors=()):
        super().__init__()
        self.live: dict[int, tuple] = {}
        self.current = 0
        for t in tensors:
            self._add(t)
        self.peak = self.current

    def _add(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.live and storage.nbytes():
            self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.current)
        return out


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> str:
    """A Llama whose decoder layers, not its vocabulary, dominate a step's memory (as in an
    8B model at 2 x 2048 tokens): hidden 512, MLP 2048, grouped KV heads, vocab 512."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("wide")
    config = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                         vocab_size=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def wide_step(path, overrides, offload=False, steps=2):
    """(LiveBytes of `steps` training steps on one packed micro-batch as the training loop
    runs it on a bf16 GPU, the recipe, its precision, the loss module)."""
    from peftkit.data import packing
    from peftkit.model import fused_lora
    from peftkit.training.loss import TokenLoss

    recipe = recipe_with(f"model.name={path}", "model.arch=llama", "train.batch_size=2",
                         "data.max_len=256", *overrides)
    precision = bf16_gpu(recipe)
    base = load_model(path, recipe.model, precision.dtype, precision.compute_dtype, "cpu")
    packing.enable(base, True)
    base = prepare_for_training(base, recipe.model, recipe.train.gradient_checkpointing)
    model = attach_adapter(base, recipe.adapter)
    fused_lora.enable(model)
    model.train()
    loss_module = TokenLoss(model, offload)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    n = recipe.data.max_len
    ids = torch.randint(3, 500, (1, 2 * n), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, n, 2 * n], dtype=torch.int32)
    batch = dict(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids),
                 position_ids=torch.arange(n).repeat(2)[None], cu_seq_lens_q=cu,
                 cu_seq_lens_k=cu, max_length_q=n, max_length_k=n)
    quant_states = [m.weight.quant_state.absmax for m in model.modules()
                    if hasattr(getattr(m, "weight", None), "quant_state")]
    live = LiveBytes([p for p in model.parameters()] + quant_states)
    with live:
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = loss_module(**batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return live, recipe, precision, loss_module


@pytest.mark.parametrize("overrides", [(), ("model.upcast_unquantized=true",),
                                       ("model.quantize=none", "model.compute_dtype=auto")],
                         ids=["qlora", "qlora-upcast", "lora-bf16"])
def test_peak_of_live_tensors_in_a_bf16_step_is_within_20pct_below_the_estimate(
        wide_model, overrides):
    """The whole estimate against the peak of every tensor alive during two training steps
    (weights, adapter and AdamW states, activations, the backward's working set)."""
    pytest.importorskip("bitsandbytes")
    live, recipe, precision, _ = wide_step(wide_model, overrides)
    est = memory.estimate(recipe, base_config(recipe)[0], precision, "cuda")
    assert 0.8 <= live.peak / est.total <= 1.0, (live.peak, est.parts)


def test_offloading_moves_what_a_checkpointed_forward_keeps_and_changes_no_gradient(
        wide_model):
    pytest.importorskip("bitsandbytes")
    overrides = ("model.quantize=none", "model.compute_dtype=auto",
                 "train.offload_activations=true")
    updated = []
    for offload in (False, True):
        torch.manual_seed(0)
        _, recipe, precision, loss_module = wide_step(wide_model, overrides, offload, steps=1)
        updated.append([p.detach().clone() for p in loss_module.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*updated))  # the same values, only moved
    # One packed row of 2 x 256 tokens: each layer's input (hidden 512, bf16) and the final
    # norm's float32 copy of its input, the logits' softmax saved by cross-entropy, ...
    est = memory.estimate(recipe, base_config(recipe)[0], precision, "cuda")
    assert est.offloaded == 512 * (2 * 512 + 2 * 512) * 2
    assert est.parts["activations"] == 512 * 512 * 2  # one layer's input on the GPU
    assert 0.8 <= loss_module.offloaded_bytes / est.offloaded <= 2.0, loss_module.offloaded_bytes
    # ... and on a CPU nothing moves, nothing is estimated to move.
    assert memory.estimate(recipe, base_config(recipe)[0], precision, "cpu").offloaded == 0


def test_offloading_leaves_parameters_and_small_tensors_where_they_are():
    from peftkit.model.offload import OffloadActivations

    layer = torch.nn.Linear(256, 256, bias=False)
    layer.weight.requires_grad_(False)
    x = torch.randn(1024, 256, requires_grad=True)

    def offloaded(layer, x, **kwargs) -> int:
        hooks = OffloadActivations(layer, "cpu", **kwargs)
        with hooks:
            out = layer(x)
            out = out * out  # saves the linear's output (twice: moved once), no parameter
        out.sum().backward()
        return hooks.offloaded_bytes

    # A frozen linear saves only its weight (kept), the square its input (the output: moved).
    assert offloaded(layer, x, min_bytes=0) == 1024 * 256 * 4
    layer.weight.requires_grad_(True)  # now the linear saves its input too
    assert offloaded(layer, x, min_bytes=0) == 2 * 1024 * 256 * 4
    assert offloaded(layer, x[:100]) == 0  # under 128 KiB: stays


def test_llama_8b_qlora_plan_at_2x2048_on_a_bf16_gpu():
    """The parts of `peftkit show llama3-8b-qlora train.batch_size=2 data.max_len=2048`'s
    bf16 GPU column, from their formulas."""
    micro = ("train.batch_size=2", "data.max_len=2048", "train.grad_accum=1")
    est = {name: estimate_for(recipe_with(*micro, *extra), "cuda", True) for name, extra in {
        "kept": (), "offload": ("train.offload_activations=true",),
        "upcast": ("model.upcast_unquantized=true",)}.items()}
    unquantized, tokens, h, layers = 8_030_261_248 - 6_979_321_856, 4096, 4096, 32
    kept, offload, upcast = est["kept"], est["offload"], est["upcast"]
    assert kept.parts["base: other weights"] == unquantized * 2
    assert upcast.parts["base: other weights"] == unquantized * 4
    # the layer inputs and the final norm's input and output, bf16 (float32 when upcast)
    assert kept.parts["activations"] == tokens * (layers + 2) * h * 2
    assert upcast.parts["activations"] == 2 * kept.parts["activations"]
    # offloaded: one layer input on the GPU, the rest in CPU memory
    assert offload.offloaded == kept.parts["activations"]
    assert offload.parts["activations"] == tokens * h * 2
    gib = 1024 ** 3
    assert 8.4 < kept.total / gib < 8.6 and 7.4 < offload.total / gib < 7.6
    assert upcast.total - kept.total > 3 * gib  # what peft's upcast costs here
    assert estimate_for(recipe_with(*micro, "train.offload_activations=true")).offloaded == 0


def test_show_prints_the_gpu_plan_and_what_is_offloaded(capsys):
    from peftkit.cli.app import main

    assert main(["show", QLORA, "train.offload_activations=true"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "embeddings, norms, LM head in bfloat16" in out
    assert "train.offload_activations: 1.06 GiB of activations wait in pinned CPU memory" in out
    assert "bf16 GPU: bfloat16 weights, 16-bit activations" in out
