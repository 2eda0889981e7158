"""What happens at an update: clip, step only when the loss and grad norm are finite on every rank, count skipped
updates (abort after too many in a row), and keep an EMA of the weights.

    optimizer = ShardedAdamW(model.parameters(), lr, betas=(0.9, 0.999), weight_decay=0.01)
    norm, ok = apply_update(model, optimizer, loss, max_norm=1.0)
    guard.record(step, skipped=not ok)      # NonfiniteGuard: raises after max_in_row steps in a row with a skip
    if ok: update_ema(ema, model, decay)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.optim.adam import adam as adam_functional


def _local(t: torch.Tensor) -> torch.Tensor:
    # `_local_tensor`, not `to_local()`: the latter is an autograd Function call per tensor, ~10 µs × 800 tensors × 4
    # lists per update on the host; the shard itself is the same tensor.
    return t._local_tensor if isinstance(t, DTensor) else t


class ShardedAdamW(torch.optim.AdamW):
    """torch's AdamW, stepped on the local shards of FSDP2's DTensor parameters in one fused kernel per group.

    Same hyperparameters, state layout (`step`, `exp_avg`, `exp_avg_sq`; DTensors sharded like their parameters, so
    DCP saves and reshards them) and update as `torch.optim.AdamW(fused=True)`. Why: the stock optimizer dispatches
    its fused/foreach ops through DTensor's sharding propagation, measured at 38 ms of host time per 1.3B update on
    an H100 host (benchmarks/bench_optimizer.py) for ~15 ms of device work. AdamW is elementwise, so the shards need no
    communication.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ShardedAdamW.step takes no closure")
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # as AdamW(fused=True) initialises it
                    state["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != _local(p).device:  # state loaded from a non-fused AdamW
                    state["step"] = state["step"].to(_local(p).device, torch.float32)
                params.append(_local(p))
                grads.append(_local(p.grad))
                exp_avgs.append(_local(state["exp_avg"]))
                exp_avg_sqs.append(_local(state["exp_avg_sq"]))
                steps.append(state["step"])
            if params:
                adam_functional(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True,
                                decoupled_weight_decay=True, amsgrad=False, beta1=group["betas"][0],
                                beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"],
                                eps=group["eps"], maximize=False)
        return None


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` on local shards: the global L2 norm (an fp32 scalar, the same on every rank)
    with one all-reduce per sharded mesh dimension, then grads scaled by min(1, max_norm / (norm + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    by_layout: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:  # FSDP2 gives every parameter of a model the same mesh and placements; plain tensors: one group
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else (None, ())
        by_layout.setdefault(key, []).append(_local(g))
    total = torch.zeros((), dtype=torch.float32, device=_local(grads[0]).device)
    for (mesh, placements), local in by_layout.items():
        sq = torch.stack(torch._foreach_norm(local, 2.0, dtype=torch.float32)).square().sum()
        for dim, placement in enumerate(placements):  # shards add up; replicas (HSDP) hold the same values
            if isinstance(placement, Shard):
                dist.all_reduce(sq, group=mesh.get_group(dim))
        total = total + sq
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for local in by_layout.values():
        torch._foreach_mul_(local, coef.to(local[0].dtype))
    return norm


def apply_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                 max_norm: float) -> tuple[torch.Tensor, bool]:
    """Clip and step, unless the loss or the grad norm is non-finite on any rank: then drop the gradients."""
    norm = clip_grad_norm(list(model.parameters()), max_norm)
    ok = (torch.isfinite(norm) & torch.isfinite(loss)).to(torch.int32)
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    finite = bool(ok)  # the one host sync per update: skipping a step needs the answer on the host
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach(), finite


class NonfiniteGuard:
    """Counts skipped (non-finite) updates; raises once `max_in_row` consecutive steps each skipped one."""

    def __init__(self, max_in_row: int, ckpt_dir: Path, verbose: bool = True):
        self.max_in_row, self.ckpt_dir, self.verbose = max_in_row, ckpt_dir, verbose
        self.total, self.in_row = 0, 0  # skipped updates this launch; consecutive steps with a skip

    def record(self, step: int, skipped: int) -> None:
        """`skipped`: the number of updates skipped at `step` (0 resets the run of bad steps)."""
        self.total, self.in_row = self.total + skipped, (self.in_row + 1 if skipped else 0)
        if skipped and self.verbose:
            print(f"step {step}: non-finite loss or grad norm, update skipped ({self.total} so far)", flush=True)
        if self.in_row >= self.max_in_row:
            raise RuntimeError(f"{self.in_row} steps in a row had a non-finite loss or grad norm (last: step {step}; "
                               f"run.max_nonfinite_in_row={self.max_in_row}). Lower the LR or resume from an earlier "
                               f"checkpoint in {self.ckpt_dir}")


def init_ema(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An EMA of the parameters, by name, starting at their current values (sharded like them under FSDP)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · params."""
    for name, p in model.named_parameters():
        ema[name].lerp_(p.detach(), 1 - decay)


@torch.no_grad()
def load_ema(model: torch.nn.Module, ema: dict[str, torch.Tensor]) -> None:
    """Overwrite the parameters with their EMA (for export; the live weights are lost)."""
    for name, p in model.named_parameters():
        p.copy_(ema[name])
