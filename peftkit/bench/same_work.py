"""What every side of `peftkit bench` computes the same way, so that `equal_work` can compare
them: a digest of each sample's tokens, and the loss and adapter gradients on an identical
batch."""

from __future__ import annotations

import hashlib
from array import array

import torch


def fingerprint(input_ids: list[int]) -> str:
    """A short, process-independent digest of a sample's tokens."""
    return hashlib.blake2b(array("q", input_ids).tobytes(), digest_size=8).hexdigest()


def identical_batch(model, loss) -> dict:
    """What a side computes on the identical batch, for `bench.equal_work` to compare across
    sides: `loss()` is the side's own loss code on it (a scalar tensor).

    Training order does not enter: the sides' trained adapters differ by the order they saw
    the samples in, so this runs after training (and after memory was measured) on states
    both sides reproduce exactly. `adapter_loss` and `adapter_grad_norms` (per adapter
    tensor): every adapter tensor set to seeded values from its name (overwriting the trained
    adapter), in training mode (so gradient checkpointing applies as in a step) with dropout
    off (so it is deterministic). `reference_loss`: the adapter off, i.e. the base model.
    """
    params = {name.replace("._orig_mod", ""): p for name, p in model.named_parameters()
              if p.requires_grad}  # compiled layers add `_orig_mod` to the names
    with torch.no_grad():
        for name, p in params.items():
            seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=7).digest(), "big")
            values = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
            # Small, so the adapter's update stays a perturbation of the base, as in training.
            p.copy_(values * 0.1 / max(p.shape[-1], 1) ** 0.5)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    model.zero_grad(set_to_none=True)
    adapter = loss()
    adapter.backward()
    norms = {name: p.grad.float().norm().item() if p.grad is not None else 0.0
             for name, p in sorted(params.items())}
    model.zero_grad(set_to_none=True)
    # Last: the Trainer side's bitsandbytes repacks 4-bit weights on CPU for inference the
    # first time a layer runs in eval mode without gradients, and backward through them then
    # loses gradient (quantize.keep_cpu_layout_trainable; peftkit's side has it off).
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        reference = loss().item()
    return {"reference_loss": reference, "adapter_loss": adapter.item(),
            "adapter_grad_norms": norms}
