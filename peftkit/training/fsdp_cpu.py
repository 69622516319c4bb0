"""FSDP2 on CPU processes: accelerate's FSDP path, switched on where accelerate won't.

accelerate (1.15) routes FSDP only for accelerator devices; with N CPU processes over gloo it
silently runs DDP. torch's FSDP2 (`fully_shard`) does shard over gloo, so peftkit sets
accelerate's state to FSDP there, exactly as `AcceleratorState.__init__` does for the devices
it routes. There is no public setter for this: the state is a shared singleton whose fields
accelerate fills in once. It lives here alone so that it is easy to drop when accelerate
routes FSDP on CPU itself; tests/test_upstream.py fails loudly if the fields it writes go.
"""

from __future__ import annotations


def switch_to_fsdp2(accelerator, fsdp_plugin) -> None:
    """Make this multi-CPU accelerator run FSDP2 with `fsdp_plugin`."""
    from accelerate.state import PartialState  # slow import: lazy
    from accelerate.utils import DistributedType

    state = accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = fsdp_plugin
    # Both shared states: a later AcceleratorState() copies PartialState's over its own.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
