"""Plain data parallelism for the toy recipes (recipes/toy_teacher.py, recipes/toy_sparse_distill.py): every rank
holds whole networks and averages its gradients with one all-reduce per model. The Wan recipes shard instead
(parallel/fsdp.py, parallel/mesh.py)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from components.config import ConfigError


def init_replicas(device: str) -> tuple[int, int]:
    """(rank, world size); with more than one rank under torchrun, a process group (gloo on CPU; on CUDA, NCCL and
    this rank's GPU by LOCAL_RANK)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = \"cuda\" but torch sees no GPU: set run.device=cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def all_reduce_grads(model: torch.nn.Module, world: int) -> None:
    """Average gradients over ranks (DDP without the bucketing); a no-op on one rank."""
    if world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for the whole model
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def step_replicated(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, max_norm: float,
                    world: int) -> torch.Tensor:
    """One update of a replicated model: backward, average gradients over ranks, clip, step. Returns the gradient norm
    before clipping (detached)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    all_reduce_grads(model, world)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    return grad_norm.detach()


def destroy_replicas(world: int) -> None:
    """End of a run: wait for every rank (rank 0 may still be exporting), then drop the process group."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
