"""FSDP2 (`fully_shard`) per transformer block, then the root (docs/METHOD.md §6, §1.8).

A 1-D mesh shards parameters, gradients and optimizer state over its ranks; a 2-D mesh
`(dp_replicate, dp_shard_sp)` is HSDP: sharded inside a group, replicated (gradients all-reduced) across groups.
Trainable models keep fp32 master weights and optimizer state, compute with `param_dtype` and reduce gradients in
`reduce_dtype`. Inputs are not cast (cast_forward_inputs=False, as FastVideo): the timesteps and the RoPE tables
must stay fp32, so run bf16 forwards under `torch.autocast(device_type, torch.bfloat16)`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> None:
    """Shard `model.blocks[i]` one by one (one all-gather per block in flight), then the remaining root params."""
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    # Pinned host memory speeds up the copies to a GPU; without one it cannot be allocated (CPU-only tests).
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for block in model.blocks:
        fully_shard(
            block, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard_after_forward
        )
    fully_shard(
        model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard_after_forward
    )


def apply_fsdp_frozen(
    model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype = torch.bfloat16, cpu_offload: bool = False
) -> None:
    """The frozen teacher: parameters stored in `param_dtype` (half the memory of fp32), no gradients, sharded.

    With `cpu_offload` the shards live in pinned host memory and each block is copied in for its forward.
    """
    model.requires_grad_(False)
    with torch.no_grad():
        for param in model.parameters():  # parameters only: the RoPE buffers stay fp32
            param.data = param.data.to(param_dtype)
    apply_fsdp(model, mesh, param_dtype=param_dtype, reduce_dtype=param_dtype, cpu_offload=cpu_offload)
