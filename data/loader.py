"""Batches of a `LatentDataset` addressed by global step, sharded over data-parallel ranks.

    loader = make_loader(ds, batch_size=1, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed, start_step=step)
    for batch in loader: ...   # {"latents" (B,C,T,H,W), "context" (B,512,D), "context_mask" (B,512), "caption", "id"}

The sample order is a pure function of `(seed, epoch, dp_rank, dp_size)` and the position in it is the global step, so
resuming needs only the step. Ranks of one sequence-parallel group pass the same `dp_rank` and get the same rows.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.parquet import DataError


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples: {"latents" (B,C,T,H,W), "context" (B,L,D), "context_mask" (B,L), "caption", "id", "num_skipped"};
    I2V rows add "first_frame_latent" (B,C,T,H,W) and, where stored, "clip_feature" (B,L_img,D_img)."""
    batch: dict[str, Any] = {}
    for key in ("latents", "context", "context_mask", "first_frame_latent", "clip_feature"):
        if key not in samples[0]:
            continue
        shapes = {tuple(s[key].shape) for s in samples}
        if len(shapes) > 1:
            raise DataError(f"cannot batch {key} of different shapes {sorted(shapes)} (ids {[s['id'] for s in samples]})")
        batch[key] = torch.stack([s[key] for s in samples])
    batch["caption"] = [s["caption"] for s in samples]
    batch["id"] = [s["id"] for s in samples]
    batch["num_skipped"] = sum(s["num_skipped"] for s in samples)
    return batch


class StepSampler(Sampler[list[int]]):
    """Batches of indices addressed by global step, for one data-parallel rank.

    Epoch e uses `randperm(num_samples)` from `torch.Generator().manual_seed(seed + e)`, truncated to a multiple of
    `dp_size * batch_size`; global step s is batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`, and within it DP
    rank r takes the r-th block of `batch_size` indices. Ranks of one SP group pass the same dp_rank.
    """

    def __init__(self, num_samples: int, batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 start_step: int = 0, num_steps: int | None = None) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")
        self.steps_per_epoch = num_samples // (dp_size * batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{num_samples} samples < dp_size * batch_size = {dp_size * batch_size}: not one full step")
        self.num_samples, self.batch_size, self.dp_rank, self.dp_size = num_samples, batch_size, dp_rank, dp_size
        self.seed, self.start_step, self.num_steps = seed, start_step, num_steps
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def batches_for(self, step: int) -> list[int]:
        """Indices of this rank's batch at global step `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = (k * self.dp_size + self.dp_rank) * self.batch_size
        return self._perm[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            yield self.batches_for(step)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("StepSampler without num_steps is endless")
        return self.num_steps


def make_loader(dataset: Dataset, batch_size: int, dp_rank: int, dp_size: int, seed: int, start_step: int = 0,
                num_workers: int = 4, num_steps: int | None = None, prefetch_factor: int = 4) -> DataLoader:
    """Endless (or `num_steps`-long) loader of collated batches starting at global step `start_step`."""
    sampler = StepSampler(len(dataset), batch_size, dp_rank, dp_size, seed, start_step, num_steps)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        timeout=600 if num_workers > 0 else 0,  # a dead or stuck worker raises instead of hanging the step
    )
