"""Training-state checkpoints with torch.distributed.checkpoint (DCP), and the student export (docs/METHOD.md §1.14).

    ckpt = Checkpointer(run_dir / "ckpt", keep_last=3, async_save=True)
    state = {"student": ModelState(student, student_opt, student_sched),
             "critic": ModelState(critic, critic_opt, critic_sched), "data": loader_state}
    step = ckpt.load(state) or 0          # restores in place; None when there is no checkpoint yet
    ...
    ckpt.save(step, state)                # root/step-NNNNNN/, atomically
    ckpt.wait()                           # before exit: finish a pending async save

Layout: `root/step-NNNNNN/` holds DCP's sharded files and `.metadata`, plus `rng-rank<r>.pt` (this rank's CPU/CUDA
RNG). Every rank writes into `step-NNNNNN.tmp/`; rank 0 renames it once DCP's coordinator has written `.metadata`,
which DCP does only after all ranks finished writing, so a crash mid-save leaves the previous checkpoint as the
latest. DCP reshards on load: a checkpoint saved on N ranks resumes on M. The RNG is restored only for ranks that
existed when saving (a different world size redraws its noise streams anyway).
The teacher is never saved (it is the frozen pretrained model).
"""

from __future__ import annotations

import os
import re
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from models.lora import AdapterView, lora_scale, merged_state_dict
from models.wan_weights import export_state_dict

STEP_DIR = re.compile(r"^step-(\d{6,})$")


class ModelState(Stateful):
    """One network for DCP: its (sharded) parameters, optionally its optimizer and LR scheduler."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": get_model_state_dict(self.model)}
        if self.optimizer is not None:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        if self.scheduler is not None:
            state["sched"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state["model"])
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["sched"])


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Save/resume `root/step-NNNNNN/` checkpoints; keeps the newest `keep_last`. Every rank constructs it and
    calls every method.

    All ranks must see `root` (a shared filesystem on multi-node jobs).
    """

    def __init__(self, root: str | os.PathLike, keep_last: int = 3, async_save: bool = False) -> None:
        if keep_last < 1:
            raise ValueError(f"checkpoint keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: tuple[Future | None, Path, Path] | None = None
        # The background writer's collectives get their own gloo group so they never interleave with the
        # training step's collectives on the default group (a collective mismatch otherwise). Collective call.
        self._async_group = dist.new_group(backend="gloo") if async_save else None

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def latest(self) -> tuple[int, Path] | None:
        """(step, folder) of the newest complete checkpoint; unfinished `.tmp` folders are ignored."""
        found = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                match = STEP_DIR.match(entry.name)
                if match and (entry / ".metadata").is_file():
                    found.append((int(match.group(1)), entry))
        return max(found) if found else None

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Write `state` (ModelState objects and plain picklable values) as the checkpoint of `step`."""
        self.wait()
        rank = dist.get_rank()
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save of this step
            tmp.mkdir(parents=True)
        dist.barrier()
        torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
        if self.async_save:
            # Stages a CPU copy before returning; the files are written in a background thread.
            self._pending = (dcp.async_save(state, checkpoint_id=tmp, process_group=self._async_group), tmp, final)
        else:
            dcp.save(state, checkpoint_id=tmp)
            self._pending = (None, tmp, final)
            self.wait()
            dist.barrier()  # the renamed folder is visible to every rank when save() returns

    def wait(self) -> None:
        """Finish the pending save: rank 0 renames the folder into place and prunes old checkpoints."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        if future is not None:
            future.result()  # on rank 0 this returns after .metadata, i.e. after every rank finished writing
        if dist.get_rank() == 0:
            if final.exists():  # re-saving a step (e.g. after resuming from it): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()

    def _prune(self) -> None:
        complete = sorted(
            (int(m.group(1)), e) for e in self.root.iterdir() if (m := STEP_DIR.match(e.name)) and e.is_dir()
        )
        for _, old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, state: dict[str, Any], path: str | os.PathLike | None = None) -> int | None:
        """Restore `state` in place from `path` (default: the latest checkpoint); returns its step, None if none."""
        self.wait()
        dist.barrier()  # a pending save is renamed into place before any rank looks for the latest
        if path is None:
            found = self.latest()
            if found is None:
                return None
            step, folder = found
        else:
            folder = Path(path)
            match = STEP_DIR.match(folder.name)
            if match is None or not (folder / ".metadata").is_file():
                raise FileNotFoundError(f"{folder} is not a complete checkpoint folder step-NNNNNN/ with .metadata")
            step = int(match.group(1))
        dcp.load(state, checkpoint_id=folder)
        rng_file = folder / f"rng-rank{dist.get_rank()}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        return step


def export_student(model: nn.Module, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Gather the full student on rank 0 (in host memory) and write it in diffusers' format; a collective.
    An AdapterView (LoRA) is written merged: its base with its adapter folded in, in fp32; the base is not changed."""
    net = model.base if isinstance(model, AdapterView) else model
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(net, options=options)  # full tensors on rank 0, {} elsewhere
    if dist.get_rank() == 0:
        if isinstance(model, AdapterView):
            state = merged_state_dict(state, model.adapter_name, lora_scale(net))
        export_state_dict(state, model.cfg, out_dir, dtype=dtype)
    dist.barrier()
