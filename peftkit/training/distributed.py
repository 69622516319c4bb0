"""Distribution strategy: DDP (default), FSDP2 or DeepSpeed ZeRO, all through accelerate.

Everything the training loop does differently per strategy is here: which plugin accelerate
gets, how a backward pass ends, which state is sharded, and how the adapter's full weights
are gathered for saving. DDP needs nothing special: every process holds all of it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings

import torch

from peftkit.adapters.registry import adapter_method
from peftkit.model.memory import human
from peftkit.model.sharded import local, numel
from peftkit.recipe.schema import Recipe
from peftkit.training.fsdp_cpu import switch_to_fsdp2
from peftkit.errors import UserError


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def strategy(recipe: Recipe) -> str:
    """ddp, fsdp or deepspeed: the recipe's choice, or the one an accelerate config made
    (`accelerate launch --config_file ...` exports ACCELERATE_USE_FSDP / _DEEPSPEED)."""
    fsdp = recipe.launch.strategy == "fsdp" or _env_flag("ACCELERATE_USE_FSDP")
    deepspeed = recipe.launch.strategy == "deepspeed" or _env_flag("ACCELERATE_USE_DEEPSPEED")
    if fsdp and deepspeed:
        raise UserError("both FSDP and DeepSpeed were asked for (launch.strategy and the "
                        "accelerate config disagree); pick one")
    return "fsdp" if fsdp else "deepspeed" if deepspeed else "ddp"


def check(recipe: Recipe) -> str:
    """The strategy, after refusing (before any weights load) combinations that cannot work."""
    chosen = strategy(recipe)
    if chosen == "ddp":
        return chosen
    if recipe.train.compile:
        raise UserError(f"train.compile=true with launch.strategy={chosen} is not supported "
                        "yet; set train.compile=false")
    packed_4bit = recipe.model.quantize and recipe.model.quant_storage in ("auto", "uint8")
    if chosen == "fsdp" and packed_4bit:
        raise UserError("FSDP with a quantized base needs model.quant_storage equal to the "
                        "compute dtype (e.g. bfloat16 on GPU, float32 on CPU) so shards can "
                        "be flattened together")
    if chosen == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:  # (importing it takes seconds)
            raise UserError("launch.strategy=deepspeed needs DeepSpeed: pip install "
                            "'peftkit[deepspeed]'")
        if recipe.model.quantize and _zero_stage(recipe) == 3:
            raise UserError("DeepSpeed ZeRO-3 cannot shard a bitsandbytes-quantized base; use "
                            "launch.zero_stage=2, or launch.strategy=fsdp with "
                            "model.quant_storage set")
    return chosen


def _zero_stage(recipe: Recipe) -> int:
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and "ACCELERATE_DEEPSPEED_ZERO_STAGE" in os.environ:
        return int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    return recipe.launch.zero_stage


def accelerator_args(recipe: Recipe, device_type: str) -> dict:
    """Keyword arguments for `Accelerator(...)` that select the strategy's plugin."""
    chosen = check(recipe)
    if chosen == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        return {"fsdp_plugin": FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            state_dict_type="FULL_STATE_DICT", reshard_after_forward=True,
            cpu_ram_efficient_loading=_main_can_load_alone(recipe))}
    if chosen == "deepspeed":
        return _deepspeed_args(recipe, device_type)
    return {}


def _main_can_load_alone(recipe: Recipe) -> bool:
    """Whether, under FSDP2, the recipe lets only the main process read the base weights.
    Not where every process needs the real weights before sharding: a bitsandbytes base
    (quantized as it loads), an adapter start computed from the base (PiSSA, LoftQ, DoRA),
    or DPO's reference log-probs (computed before `prepare`)."""
    return (recipe.launch.efficient_loading and not recipe.model.quantize
            and recipe.train.objective != "dpo"
            and not adapter_method(recipe.adapter).reads_base_at_start(recipe.adapter))


def main_loads_alone(accelerator) -> bool:
    """Whether only the main process reads the base weights: under FSDP2 with accelerate's
    `cpu_ram_efficient_loading`, the other processes build the base with empty (meta)
    parameters, and `prepare` broadcasts the main process's weights, adapter included,
    one tensor at a time, each process keeping only its shard. A process's peak then falls
    with the number of processes instead of every one holding the whole base first."""
    return uses_fsdp(accelerator) and bool(accelerator.state.fsdp_plugin.cpu_ram_efficient_loading)


def _deepspeed_args(recipe: Recipe, device_type: str) -> dict:
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    t = recipe.train
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file != "none":  # the user's own DeepSpeed config, through their accelerate one
        try:
            config = json.loads(open(config_file).read())
        except (OSError, ValueError) as exc:
            raise UserError(f"DeepSpeed config {config_file}: cannot read it ({exc})") from None
    else:
        config = {"zero_optimization": {"stage": _zero_stage(recipe)}}
    # peftkit accumulates micro-batches itself (one engine step per optimizer step) and
    # normalises the loss over the global batch's labelled tokens: DeepSpeed must neither
    # accumulate nor rescale on its own.
    ours = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": 1,
            "train_batch_size": "auto", "gradient_clipping": t.max_grad_norm or 0.0}
    replaced = [f"{k}={config[k]!r}" for k, v in ours.items()
                if config.get(k, "auto") not in ("auto", v)]
    if replaced and os.environ.get("RANK", "0") == "0":
        print(f"note: {config_file}: {', '.join(replaced)} replaced by the recipe's "
              "train.batch_size, train.grad_accum (peftkit accumulates itself) and "
              "train.max_grad_norm", file=sys.stderr)
    config.update(ours, steps_per_print=2 ** 62)
    plugin = DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False)
    # On CPU, accelerate picks no process-group backend (DeepSpeed would start gloo on its
    # own, with accelerate seeing one process): ask for gloo explicitly.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if device_type == "cpu" else []
    return {"deepspeed_plugin": plugin, "kwargs_handlers": handlers}


def activate(accelerator, recipe: Recipe) -> None:
    """Make sure the strategy asked for is the one running, or stop: never pretend to shard.

    accelerate only routes FSDP for accelerator devices; with N CPU processes (gloo) it
    silently runs DDP. torch's FSDP2 (`fully_shard`) does shard over gloo, so peftkit switches
    accelerate's state to its own FSDP2 path there (fsdp_cpu.py): the same wrapping,
    state-dict gathering and sharded checkpoints as on GPUs, which is also how the tests
    exercise that path.
    """
    from accelerate.utils import DistributedType  # slow import: lazy

    wanted = strategy(recipe)
    state = accelerator.state
    if wanted == "deepspeed":  # DeepSpeed calls collectives torch has renamed, every step
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r"`torch\.distributed\.\w+` is deprecated")
    if wanted == "fsdp" and not uses_fsdp(accelerator):
        if state.distributed_type == DistributedType.MULTI_CPU:
            switch_to_fsdp2(accelerator, accelerator_args(recipe, "cpu")["fsdp_plugin"])
            return
    if wanted != "ddp" and strategy_of(accelerator) != wanted:
        raise UserError(f"launch.strategy={wanted} needs a distributed launch, but this is "
                        f"{accelerator.num_processes} process ({state.distributed_type.value}); "
                        "run `peftkit train NAME --nproc N` (or accelerate launch), or use "
                        "launch.strategy=ddp")


def strategy_of(accelerator) -> str:
    return "fsdp" if uses_fsdp(accelerator) else \
        "deepspeed" if uses_deepspeed(accelerator) else "ddp"


def uses_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    return accelerator.state.deepspeed_plugin.zero_stage if uses_deepspeed(accelerator) else 0


def shards_weights(accelerator) -> bool:
    """Whether each process holds only part of the weights (FSDP, ZeRO-3): then every
    process must take part in every forward, generation included."""
    return uses_fsdp(accelerator) or zero_stage(accelerator) == 3


def shards_optimizer(accelerator) -> bool:
    """Whether each process holds only its part of the optimizer state (FSDP, ZeRO)."""
    return uses_fsdp(accelerator) or uses_deepspeed(accelerator)


def backward(accelerator, loss: torch.Tensor, last: bool) -> None:
    """Backward pass of one micro-batch; `last` ends the optimizer step's window.

    Under DeepSpeed the engine reduces gradients, clips and steps the optimizer when the
    window ends (gradient_accumulation_steps=1 in its config: peftkit marks the boundary)."""
    if uses_deepspeed(accelerator):
        accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last)
    else:
        accelerator.backward(loss)


def checkpoint_classes(accelerator) -> list:
    """Non-tensor classes in a ZeRO optimizer shard's state dict (plain records: the loss
    scaler's settings, each parameter's fragment address, the stage) that
    `torch.load(weights_only=True)` may build; nothing else but tensors and containers."""
    if not uses_deepspeed(accelerator):
        return []
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, fragment_address, ZeroStageEnum]


def whole_optimizer_state(accelerator, loss_module, optimizer) -> dict | None:
    """The optimizer state to checkpoint as one file (all processes must call this): under
    FSDP gathered from the shards onto the main process's CPU (the others get {}), keyed by
    parameter name; under DDP torch's own; None under DeepSpeed, whose ZeRO partitions each
    process writes. An adapter's optimizer state is small, and one whole copy is what lets
    a run resume on another number of processes (FSDP reshards it on load)."""
    if uses_deepspeed(accelerator):
        return None
    if uses_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        return get_optimizer_state_dict(loss_module, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(accelerator, optimizer, state: dict, loss_module=None) -> None:
    """Load this process's optimizer state: its ZeRO partition; under FSDP the whole state of
    `whole_optimizer_state` (given `loss_module`: each process keeps its own shard of it, for
    any number of processes) or a shard of an older checkpoint (same number of processes)."""
    if uses_fsdp(accelerator) and loss_module is not None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)

        set_optimizer_state_dict(loss_module, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    elif uses_deepspeed(accelerator):
        # ZeRO optimizers take one state per data-parallel rank and read their own; the fp32
        # master partitions are restored exactly, not recomputed from 16-bit weights.
        shards = [None] * accelerator.num_processes
        shards[accelerator.process_index] = state
        optimizer.load_state_dict(shards, load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(state)


def sharding_note(accelerator, module) -> str:
    """' (FSDP2: this process holds X of Y of weights)' from the parameters themselves, or ''."""
    name = "FSDP2" if uses_fsdp(accelerator) else \
        f"DeepSpeed ZeRO-{zero_stage(accelerator)}" if uses_deepspeed(accelerator) else ""
    if not name:
        return ""
    if not shards_weights(accelerator):
        grads = " and gradients" if zero_stage(accelerator) > 1 else ""
        return f" ({name}: optimizer state{grads} sharded, weights replicated)"
    params = list(module.parameters())
    held = sum(local(p).numel() * p.element_size() for p in params)
    whole = sum(numel(p) * p.element_size() for p in params)
    return f" ({name}: this process holds {human(held)} of {human(whole)} of weights)"


def full_state_dict(accelerator, loss_module, peft_model) -> dict | None:
    """The adapter's full weights gathered onto the main process's CPU (all processes must
    call this; the others get {}), keyed like `peft_model.state_dict()`; None where every
    process holds all weights (DDP, ZeRO-1/2) and peft reads them directly.

    Only trainable parameters are gathered: the frozen base never leaves its shards.
    """
    if uses_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        state = get_model_state_dict(loss_module, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        return {k.removeprefix("model."): v for k, v in state.items()}
    if zero_stage(accelerator) == 3:
        import deepspeed

        named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            if accelerator.is_main_process:
                return {n: p.detach().cpu().clone() for n, p in named}
        return {}
    return None
