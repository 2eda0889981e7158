"""Per-step schedules of a training run: the learning-rate multiplier (docs/METHOD.md §1.7) and the VSA sparsity ramp
(§2.9).

    scheduler = build_lr_scheduler(optimizer, "cosine_with_min_lr", warmup=100, total=4000, min_ratio=0.1)
    rho = sparsity_at(step, target=0.8, ramp=[0.5, 0.1, 100])   # [] = constant
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

LR_KINDS = ("constant", "cosine_with_min_lr")


def lr_lambda(kind: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier at scheduler step k: `constant` is 1 (and ignores warmup); `cosine_with_min_lr` rises linearly
    k / warmup, then follows a half cosine from 1 at k = warmup to 0 at k = total, floored at min_ratio."""
    if kind not in LR_KINDS:
        raise ValueError(f"LR schedule {kind!r}; choose one of {list(LR_KINDS)}")
    if kind == "constant":
        return lambda k: 1.0
    cosine = lambda p: max(min_ratio, 0.5 + 0.5 * math.cos(math.pi * p))  # noqa: E731  # p: progress after warmup
    return lambda k: k / warmup if k < warmup else cosine((k - warmup) / max(1, total - warmup))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int,
                       min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_lambda`; step it once per training step. Its state_dict round-trips through DCP."""
    # The schedule runs over training steps while the DMD student's optimizer steps only every dmd.student_every-th
    # one, so the first scheduler step can precede its first optimizer step: intended, not the misuse torch warns of
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup, total, min_ratio))


def sparsity_at(step: int, target: float, ramp: list[float]) -> float:
    """VSA ρ at a step: `target` when `ramp` is empty, else [start, increment, interval]: ρ rises by `increment`
    every `interval` steps from `start`, capped at `target`."""
    if not ramp:
        return target
    if len(ramp) != 3:
        raise ValueError(f"sparsity ramp must be [] or [start, increment, interval], got {ramp}")
    start, inc, interval = ramp
    return min(start + inc * (step // int(interval)), target)
