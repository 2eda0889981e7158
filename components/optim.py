"""What happens at an update: clip, step only when the loss and grad norm are finite on every rank, count skipped
updates (abort after too many in a row), and keep an EMA of the weights.

    norm, ok = apply_update(model, optimizer, loss, max_norm=1.0)
    guard.record(step, skipped=not ok)      # NonfiniteGuard: raises after max_in_row steps in a row with a skip
    if ok: update_ema(ema, model, decay)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def apply_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                 max_norm: float) -> tuple[torch.Tensor, bool]:
    """Clip and step, unless the loss or the grad norm is non-finite on any rank: then drop the gradients."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
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
