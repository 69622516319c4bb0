"""The three places where peftkit reaches into a library's internals (each one small module
that says why) fail here, loudly, when the library changes what they rely on."""

from __future__ import annotations

import torch


def test_transformers_zero3_switch_still_exists_and_is_restored():
    from transformers.integrations import deepspeed as hf_deepspeed

    from peftkit.model.sharded import plain_construction

    assert hasattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref"), \
        "transformers renamed its ZeRO-3 switch: update peftkit/model/sharded.py"
    marker = object()
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = marker
    try:
        with plain_construction():
            assert hf_deepspeed._hf_deepspeed_config_weak_ref is None
            assert not hf_deepspeed.is_deepspeed_zero3_enabled()
        assert hf_deepspeed._hf_deepspeed_config_weak_ref is marker
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def test_accelerate_state_fields_written_for_fsdp_on_cpu_exist():
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    assert isinstance(PartialState._shared_state, dict), \
        "accelerate's shared state changed: update peftkit/training/fsdp_cpu.py"
    assert isinstance(AcceleratorState._shared_state, dict)
    assert DistributedType.FSDP.value == "FSDP" and DistributedType.MULTI_CPU.value == "MULTI_CPU"
    assert "fsdp_plugin" in AcceleratorState.__init__.__code__.co_names


def test_peft_lora_layer_still_has_what_the_fused_forward_reads():
    from peft import LoraConfig, get_peft_model

    from peftkit.model import fused_lora

    base = torch.nn.Sequential(torch.nn.Linear(8, 8))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], lora_dropout=0.0))
    layer = model.base_model.model[0]
    for name in ("lora_A", "lora_B", "lora_dropout", "scaling", "lora_variant",
                 "active_adapters", "disable_adapters", "merged", "_cast_input_dtype",
                 "get_base_layer", "base_layer"):
        assert hasattr(layer, name), f"peft's LoRA Linear lost {name!r}: update fused_lora.py"
    assert type(layer) is fused_lora._PLAIN
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 8)
    expected = model(x)
    assert fused_lora.enable(model) == 1
    assert torch.allclose(model(x), expected, atol=1e-6)
