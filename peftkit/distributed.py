"""Distribution strategy decisions: DDP (default) or FSDP2, and gathering sharded state."""

from __future__ import annotations

import os

from peftkit.config import Recipe
from peftkit.errors import UserError


def uses_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def fsdp_asked(recipe: Recipe) -> bool:
    return recipe.launch.strategy == "fsdp" or \
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_plugin(recipe: Recipe):
    """FSDP2 with one shard unit per decoder layer, or None for DDP. Refuses, before any
    weights load, the combinations that cannot work."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise UserError("DeepSpeed (from your accelerate config) is not supported by peftkit "
                        "yet; use launch.strategy=fsdp or ddp")
    if not fsdp_asked(recipe):
        return None
    if recipe.model.quantize and recipe.model.quant_storage in ("auto", "uint8"):
        raise UserError("FSDP with a quantized base needs model.quant_storage equal to the "
                        "compute dtype (e.g. bfloat16 on GPU, float32 on CPU) so shards can "
                        "be flattened together")
    if recipe.train.compile:
        raise UserError("train.compile=true with launch.strategy=fsdp is not supported yet; "
                        "set train.compile=false")
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        state_dict_type="FULL_STATE_DICT", reshard_after_forward=True,
        cpu_ram_efficient_loading=False)


def activate(accelerator, plugin) -> None:
    """Make sure FSDP runs when it was asked for, or stop: never pretend to shard.

    accelerate only routes FSDP for accelerator devices; with N CPU processes (gloo) it
    silently runs DDP. torch's FSDP2 (`fully_shard`) does shard over gloo, so peftkit switches
    accelerate's state to its own FSDP2 path there: the same wrapping, state-dict gathering
    and sharded checkpoints as on GPUs, which is also how the tests exercise that path.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if plugin is None or uses_fsdp(accelerator):
        return
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        # What AcceleratorState.__init__ does for the device types it routes (both shared
        # states: a later AcceleratorState() copies PartialState's over its own).
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        return
    raise UserError(f"launch.strategy=fsdp needs a distributed launch, but this is "
                    f"{accelerator.num_processes} process ({state.distributed_type.value}); "
                    "run `peftkit train NAME --nproc N` (or accelerate launch), or use "
                    "launch.strategy=ddp")


def sharding_note(accelerator, module) -> str:
    """' (FSDP2: this process holds X of Y of weights)' from the parameters themselves, or ''."""
    if not uses_fsdp(accelerator):
        return ""
    from peftkit.memory import human

    params = list(module.parameters())
    held = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in params)
    whole = sum(p.numel() * p.element_size() for p in params)
    return f" (FSDP2: this process holds {human(held)} of {human(whole)} of weights)"


def full_state_dict(accelerator, loss_module) -> dict | None:
    """The adapter's full weights gathered from FSDP shards onto the main process's CPU (all
    processes must call this; the others get {}), keyed like `peft_model.state_dict()`; None
    under DDP, where every process holds all of it and peft reads it directly.

    Only trainable parameters are gathered: the frozen base never leaves its shards.
    """
    if not uses_fsdp(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(loss_module, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    return {k.removeprefix("model."): v for k, v in state.items()}
