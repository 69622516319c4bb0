"""Distribution strategy decisions: DDP (default) or FSDP2, and gathering sharded state."""

from __future__ import annotations

import os

from peftkit.config import Recipe
from peftkit.errors import UserError


def uses_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def fsdp_plugin(recipe: Recipe, device_type: str):
    """FSDP2 with one shard unit per decoder layer, or None for DDP.

    accelerate silently runs DDP when asked for FSDP on CPU; peftkit refuses instead of
    pretending to shard.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise UserError("DeepSpeed (from your accelerate config) is not supported by peftkit "
                        "yet; use launch.strategy=fsdp on GPUs, or ddp")
    asked = recipe.launch.strategy == "fsdp" or \
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked:
        return None
    if device_type != "cuda":
        raise UserError("launch.strategy=fsdp (or an accelerate config with FSDP) needs CUDA "
                        "GPUs; on CPU accelerate would silently fall back to DDP. Use "
                        "launch.strategy=ddp")
    if recipe.model.quantize and getattr(recipe.model, "quant_storage", "auto") in ("auto", "uint8"):
        raise UserError("FSDP with a quantized base needs model.quant_storage equal to the "
                        "compute dtype (e.g. bfloat16) so shards can be flattened together")
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        state_dict_type="FULL_STATE_DICT", reshard_after_forward=True,
        cpu_ram_efficient_loading=False)


def full_state_dict(accelerator, loss_module) -> dict | None:
    """The PeftModel's full state dict gathered from FSDP shards (all processes must call
    this), keyed like `peft_model.state_dict()`; None under DDP, where every process already
    holds all of it and peft reads it directly."""
    if not uses_fsdp(accelerator):
        return None
    state = accelerator.get_state_dict(loss_module)
    return {k.removeprefix("model."): v for k, v in state.items()}
