"""Parameters as ZeRO-3 and FSDP2 leave them, building models whole under ZeRO-3, and
keeping DeepSpeed and transformers quiet where peftkit loads and saves models.

Model-level facts that loading, the memory estimate and the tiny builders need, kept here so
that none of them has to import the training package (which imports them).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch itself loads lazily: `peftkit ls` never needs it
    import torch


def numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, also when ZeRO-3 partitioned it away."""
    return getattr(param, "ds_numel", param.numel())


def local(param: torch.Tensor) -> torch.Tensor:
    """The part of `param` this process holds (an FSDP DTensor's shard, a ZeRO-3 partition)."""
    if hasattr(param, "to_local"):
        return param.to_local()
    return getattr(param, "ds_tensor", param)


def give_trainable_storage(model: torch.nn.Module) -> None:
    """Give the trainable parameters of a model built on the meta device real (zero) storage,
    leaving the frozen base empty. accelerate's FSDP2 `prepare` maps each optimizer parameter
    to its shard by storage address, and every meta tensor has the same one (0); the values
    are replaced by the main process's when `prepare` broadcasts them. Trainable parameters
    are the adapter's: small."""
    import torch  # slow import: lazy

    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad and param.is_meta:
                setattr(module, name, torch.nn.Parameter(torch.zeros_like(param, device="cpu")))


@contextmanager
def plain_construction():
    """Build models whole inside this block even under ZeRO-3, where transformers would
    partition every new model on construction (peftkit's memory estimate builds one on the
    meta device, which cannot be partitioned).

    Why a private attribute: transformers decides "partition on construction" from the
    module-level weak reference `_hf_deepspeed_config_weak_ref` and offers no public way to
    suspend it for one construction (`unset_hf_deepspeed_config` drops it for good and the
    HfDeepSpeedConfig object it points at is not reachable publicly to set it back).
    tests/test_upstream.py fails loudly if transformers renames it; it can go once
    transformers offers a context manager for "no zero.Init here" (not as of 5.23).
    """
    from transformers.integrations import deepspeed as hf_deepspeed  # slow import: lazy

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


@contextmanager
def quiet_progress():
    """transformers' own progress bars ("Loading weights", "Writing model shards") off inside
    the block: for work that takes a moment and would only clutter the output."""
    from transformers.utils import logging  # slow import: lazy

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def name_cpu_for_deepspeed() -> None:
    """Tell DeepSpeed up front that this machine has no accelerator, where that is so.

    accelerate imports DeepSpeed wherever it is installed (transformers' save_pretrained
    unwraps models through it, e.g. in `peftkit merge`), and DeepSpeed's import guesses the
    accelerator, logging "[WARNING] ... Setting accelerator to CPU" when it finds none.
    DS_ACCELERATOR is DeepSpeed's own setting for that choice; one already set is kept.
    Called where models load and where tiny ones are built and saved."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch  # slow import: lazy

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    found = accelerator.is_available() if accelerator else torch.cuda.is_available()
    if not found:
        os.environ["DS_ACCELERATOR"] = "cpu"
