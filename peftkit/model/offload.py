"""Activations saved for backward, kept in CPU memory until backward needs them.

With gradient checkpointing a decoder keeps one tensor per layer for backward: the layer's
input (torch's non-reentrant checkpoint saves it through `save_for_backward`, so saved-tensor
hooks see it). For Llama-3.1-8B at 2 x 2048 tokens that is 32 x 4096 x 4096 x 2 bytes = 1 GiB
of GPU memory held from the forward to the backward of each layer. `OffloadActivations` moves
every such tensor to pinned CPU memory when it is saved and back when backward unpacks it, so
the GPU holds one layer's input at a time. Inside a checkpointed layer torch's own hooks take
over (the recompute happens in backward, on the GPU), so only what outlives the layers moves.

torch's `save_on_cpu` does the same but moves every saved tensor, the frozen weights included
(a plain `F.linear` saves its weight for the input gradient): without checkpointing that would
copy the whole base model over PCIe each step. Here parameters (and views of them) stay where
they are, and so do tensors under `min_bytes`.

The copies are asynchronous on the current stream: the stream's order makes the GPU finish the
copy before the source memory is reused, and the copy back before backward reads it.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

MIN_BYTES = 128 << 10  # smaller tensors (positions, norms' statistics) stay put


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses (DTensor) without one
        return None


def _is_parameter(t: torch.Tensor, parameters: set[int]) -> bool:
    base = t._base if t._base is not None else t
    if isinstance(t, nn.Parameter) or isinstance(base, nn.Parameter):
        return True
    storage = _storage(t)
    return storage is None or storage in parameters


class _Moved:
    """A saved tensor's CPU copy and the device it goes back to."""

    __slots__ = ("device", "copy", "__weakref__")

    def __init__(self, device: torch.device, copy: torch.Tensor):
        self.device, self.copy = device, copy


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of `model`'s forward on `device_type` go to CPU memory until backward.

    `offloaded_bytes` counts what was moved (the tests and the GPU check read it). On CPU the
    tensors are "moved" to a CPU copy, which only exercises the mechanism."""

    def __init__(self, model: nn.Module, device_type: str = "cuda", min_bytes: int = MIN_BYTES):
        self.offloaded_bytes = 0
        parameters = {_storage(p) for p in model.parameters()} - {None}
        pin = device_type == "cuda" and torch.cuda.is_available()
        # A tensor saved twice (x * x saves x twice) is copied once. Weak references only:
        # each copy lives as long as autograd holds it, no longer.
        moved: dict[int, tuple[weakref.ref, weakref.ref]] = {}

        def pack(t: torch.Tensor):
            size = t.numel() * t.element_size()
            if (t.device.type != device_type or size < min_bytes or t.layout != torch.strided
                    or _is_parameter(t, parameters)):
                return t
            source, earlier = moved.get(id(t), (None, None))
            if source is not None and source() is t and earlier() is not None:
                return earlier()
            copy = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t, non_blocking=pin)
            self.offloaded_bytes += size
            packed = _Moved(t.device, copy)
            moved[id(t)] = (weakref.ref(t), weakref.ref(packed))
            return packed

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            return packed.copy.to(packed.device, non_blocking=pin)

        super().__init__(pack, unpack)
