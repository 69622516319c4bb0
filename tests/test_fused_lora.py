"""peftkit/fused_lora.py: the LoRA update added inside its matmul gives peft's outputs and
gradients, and every case it does not cover still goes through peft's own forward."""

import copy

import pytest
import torch

from peftkit.model import fused_lora
from peftkit.recipe import Model
from peftkit.model.loading import base_path


def tiny_base(**kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        base_path(Model("peftkit/fused-test", arch="llama", tiny=True, tiny_size="xs")),
        **kwargs)


def pair(config, base=None):
    """(peft's model, the same model with the fused forward), LoRA B made non-zero."""
    from peft import get_peft_model

    plain = get_peft_model(base if base is not None else tiny_base(), config)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    fused = copy.deepcopy(plain)
    return plain, fused, fused_lora.enable(fused)


def outputs_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.logits.detach(), grads


IDS = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("alpha", [16, 24])  # scaling 2 (exact in floats) and 3
def test_fused_forward_equals_peft(alpha):
    from peft import LoraConfig

    plain, fused, count = pair(LoraConfig(r=8, lora_alpha=alpha, target_modules="all-linear"))
    assert count == 14  # 7 linear layers x 2 decoder layers
    a, ga = outputs_and_grads(plain, IDS)
    b, gb = outputs_and_grads(fused, IDS)
    assert torch.allclose(a, b, atol=1e-5)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-6, rtol=1e-4), name


def test_fused_forward_on_a_4bit_base():
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32)
    plain, fused, count = pair(LoraConfig(r=8, lora_alpha=24, target_modules="all-linear"),
                               tiny_base(quantization_config=quant, device_map={"": "cpu"}))
    assert count == 14
    a, ga = outputs_and_grads(plain, IDS)
    b, gb = outputs_and_grads(fused, IDS)
    assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.allclose(ga[n], gb[n], atol=1e-6, rtol=1e-4) for n in ga)


def test_cases_it_does_not_cover_go_to_peft(monkeypatch):
    from peft import LoraConfig

    calls = []  # the fused path ends in addmm_ (plain linear) or addmm (bitsandbytes)
    real, real_ = torch.addmm, torch.Tensor.addmm_
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(torch.Tensor, "addmm_",
                        lambda *a, **k: calls.append(1) or real_(*a, **k))
    # DoRA is a LoRA variant: peft's forward handles it.
    plain, fused, _ = pair(LoraConfig(r=8, lora_alpha=24, target_modules="all-linear",
                                      use_dora=True))
    assert torch.allclose(plain(input_ids=IDS).logits, fused(input_ids=IDS).logits, atol=1e-5)
    assert not calls
    # Adapters disabled, then merged into the base: peft's forward too.
    plain, fused, _ = pair(LoraConfig(r=8, lora_alpha=24, target_modules="all-linear"))
    with torch.no_grad(), fused.disable_adapter(), plain.disable_adapter():
        assert torch.equal(fused(input_ids=IDS).logits, plain(input_ids=IDS).logits)
    assert not calls
    with torch.no_grad():
        expected = plain(input_ids=IDS).logits
        fused.merge_adapter()
        got = fused(input_ids=IDS).logits
    assert not calls and torch.allclose(expected, got, atol=1e-5)
    fused.unmerge_adapter()
    with torch.no_grad():
        fused(input_ids=IDS)
    assert len(calls) == 14  # back on the fused path


def saved_bytes(model, ids) -> int:
    """Bytes autograd saves for backward in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad()
    return sum(seen.values())


def test_fused_forward_on_a_bf16_base_keeps_its_dtype_and_saves_no_more():
    """float32 adapters on a bf16 base: without autocast the output stays bf16 (as peft's);
    under autocast A reads the bf16 input as it is (no cast to float32 and back) and the
    forward saves no more for backward than peft's."""
    from peft import LoraConfig

    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    plain, fused, _ = pair(config, tiny_base(dtype=torch.bfloat16))
    layer = fused.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # peft's adapter dtype
    x = torch.randn(4, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = plain.base_model.model.model.layers[0].self_attn.q_proj(x)
        got = layer(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected.float(), atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, ga = outputs_and_grads(plain, IDS)
        b, gb = outputs_and_grads(fused, IDS)
    assert torch.allclose(a.float(), b.float(), atol=5e-2)
    assert all(torch.allclose(ga[n], gb[n], atol=1e-2, rtol=5e-2) for n in ga)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_saves = saved_bytes(plain, IDS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert saved_bytes(fused, IDS) <= peft_saves
