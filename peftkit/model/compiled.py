"""`train.compile`: each decoder layer compiled with torch.compile (inductor), after peft has
put its LoRA layers in.

Why per layer: every layer runs the same code, so one compiled graph serves all of them, and
the compile stays small. Why it pays: after the matmuls, the time of a LoRA step goes to
memory-bound elementwise work (norms, rotary embeddings, activations, residual adds, the
adapter's scale-and-add), which inductor fuses into a few loops. `dynamic=True`: packed rows
change length every step, so shapes are symbolic from the first compile instead of
recompiling per length. Attention per packed sample reads its boundaries as Python numbers,
a graph break: it runs eagerly between the compiled halves of each layer. The first step
pays the compile (tens of seconds; inductor caches it on disk for the next run).

Only training steps run compiled: evaluation and generation (eval mode, or no gradients) run
the same layers eagerly, which spares them compiles of their own (KV caches, growing lengths)
that would cost more than they save in a few eval batches.
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model (the classes it names as not splittable)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def _eager_unless_training(module, args, kwargs=None):
    if not (module.training and torch.is_grad_enabled()):
        torch.compiler.set_stance("force_eager")


def _restore(module, args, output):
    torch.compiler.set_stance("default")


def compile_layers(model: nn.Module) -> int:
    """Compile every decoder layer of `model` in place, for training steps; returns how many.

    The switch to eager sits on the layers' parent, the decoder: hooks on a compiled module
    itself would be traced into its graph."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    decoder.register_forward_pre_hook(_eager_unless_training)
    decoder.register_forward_hook(_restore, always_call=True)
    return len(layers)
