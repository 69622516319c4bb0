"""LoRA's update added inside the matmul that makes it: `addmm(base(x), A(x), Bᵀ, alpha=s)`.

peft computes `result + lora_B(lora_A(dropout(x))) * scaling`: after the base layer's output
it writes a scaled copy of the LoRA output and then the sum, two passes over a tensor as large
as the layer's output (and one more in backward for the scaling). Folding the scaling and the
sum into the B matmul (BLAS accumulates into its output when beta=1) removes them; the
gradients are the same products. Profiled on the small benchmark model (fp32 CPU), elementwise
mul and add were 17% of the step before this.

Why an instance attribute: peft has no public hook to substitute the forward of its LoRA layers
(its experimental custom-module mapping replaces whole layer classes, saving included), so
`enable` sets `forward` on each qualifying layer instance; the class and every other layer stay
peft's. tests/test_upstream.py fails loudly if the layer attributes read below change (checked
against peft 0.21); it can go if peft ever fuses the scaled add itself.

Only plain LoRA layers take the fused path (one active adapter, not merged, no DoRA or other
variant, no per-row adapter names, weights not partitioned by ZeRO-3); every other call goes to
peft's own forward. The adapter, its saving and loading stay entirely peft's.
"""

from __future__ import annotations

import types

import torch

ENABLED = True  # benchmarks/ablation.py switches it off to measure what it buys

from peft.tuners.lora.layer import Linear as _PLAIN  # noqa: E402  (peft's LoRA nn.Linear)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    if (args or kwargs or name is None or self.disable_adapters or self.merged
            or name not in self.lora_A or name in self.lora_variant):
        return type(self).forward(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    if hasattr(lora_b.weight, "ds_id"):  # ZeRO-3 gathers B only when its module runs
        return type(self).forward(self, x, *args, **kwargs)
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # rows: 2-D throughout, so nothing below is a view
    result = self.base_layer(x)
    autocast = torch.is_autocast_enabled(x.device.type)
    # Under autocast A's matmul runs in the autocast dtype whatever x is: casting a 16-bit x to
    # the (float32) adapter dtype first would only make A keep a second copy of x for its
    # backward (as peft's bitsandbytes layers, skip the cast under autocast).
    if not autocast:
        x = self._cast_input_dtype(x, lora_a.weight.dtype)
    h = lora_a(self.lora_dropout[name](x))
    weight = lora_b.weight
    if not result.dtype == h.dtype == weight.dtype:
        if not autocast:  # a float32 adapter on a 16-bit base: the output keeps the base dtype
            out = result + lora_b(h) * self.scaling[name]
            return out.to(result.dtype).view(*shape[:-1], -1)
        h, weight = h.to(result.dtype), weight.to(result.dtype)  # what autocast would do
    if type(self) is _PLAIN:
        # A plain linear's output is a fresh tensor its backward does not keep: add in place.
        result.addmm_(h, weight.t(), alpha=self.scaling[name])
    else:  # bitsandbytes layers: peft clones their output before adding; addmm copies too
        result = torch.addmm(result, h, weight.t(), alpha=self.scaling[name])
    return result.view(*shape[:-1], -1)


def enable(peft_model) -> int:
    """Give every LoRA linear layer of `peft_model` the fused forward; returns how many."""
    if not ENABLED:
        return 0
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_B") \
                and isinstance(module.get_base_layer(), torch.nn.Module) \
                and _is_linear(module):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def _is_linear(module) -> bool:
    """peft's LoRA wrappers of linear layers (plain, bitsandbytes 8-/4-bit), whose update is
    `lora_B(lora_A(dropout(x))) * scaling` added to the base output."""
    from peft.tuners.lora import layer

    kinds = [layer.Linear]
    try:
        from peft.tuners.lora import bnb

        kinds += [getattr(bnb, n) for n in ("Linear8bitLt", "Linear4bit") if hasattr(bnb, n)]
    except ImportError:
        pass
    return isinstance(module, tuple(kinds)) and all(
        isinstance(b, torch.nn.Linear) for b in module.lora_B.values())
