"""Multi-GPU sampling: one video spread over N ranks (Ulysses sequence parallel), applied to an inference DiT from
outside, and the teacher's two CFG branches on two rank groups.

    torchrun --nproc_per_node 4 tools/sample.py --model ... --prompt "..."                  # sp = 4
    torchrun --nproc_per_node 4 tools/sample.py --model ... --prompt "..." --teacher --cfg-parallel   # 2 × sp 2

    groups = sampling_groups(sp=4, cfg_parallel=False, num_heads=model.cfg.num_heads, device=device)
    apply_sequence_parallel(model, groups)          # before prepare_for_inference (FP8, fused rows, compile)
    check_token_grid(model.token_grid(latent_shape), groups.sp)
    check_same_request({"prompts": prompts, "seed": seed, ...})
    context = broadcast_from_first(encode(...) if groups.writer else None, groups, device)
    cond, uncond = cfg_branches(model, x, t, context, negative, groups)   # teacher CFG, one branch per group

Layout. The job's `world = cfg × sp` ranks form a (cfg, sp) mesh, row-major like parallel/mesh.py: ranks
[b·sp, (b + 1)·sp) run CFG branch b (0 conditional, 1 unconditional; one branch when cfg = 1) as one Ulysses group.
Every rank runs the same sampler on the same prompts with the same seed, so every rank draws the same noise and,
because Ulysses' `token_gather` gives every SP rank the full velocity, keeps the same latents at every step: there
is no scatter of the latents and no broadcast of the result. With CFG-parallel the two branches swap their
velocities (one all-gather between rank i and rank i + sp) and both compute `uncond + g (cond - uncond)`.

What runs once. Text encoding runs on rank 0 and is broadcast: UMT5-XXL is 23 GB in fp32, which N ranks loading
it side by side would read N times into host memory (8 × 23 GB), for an output of 8 MB per prompt that one
broadcast moves in milliseconds; the other ranks load the DiT meanwhile. The VAE decode runs on rank 0 (the
`writer`), which alone writes files: the Wan VAE decodes frame by frame with a causal feature cache, so splitting it
over ranks means spatial tiles with overlaps — worth it only where decode, not the DiT, dominates. With sp = 1 and
cfg = 1 nothing here adds a collective or a module: the one-GPU path is the plain one.

Ulysses itself is parallel/ulysses.py (the training code): sequence chunks through the blocks, one all-to-all per
self-attention to trade sequence for heads, the attention function (dense, VSA, FP8 VSA) on H/sp heads over the
whole tile-ordered sequence — VSA tiles stay whole — and one all-gather before the output head. It wraps each
block's `attn1.attn_fn`, so every path that calls the block's self-attention function (the plain block, the fused
row kernels, FP8 linears, a per-block `torch.compile`) runs it sharded.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from parallel.ulysses import SequenceLayout, apply_ulysses


@dataclass(frozen=True)
class SamplingGroups:
    """The ranks of one sampling job and how they split it; `sp_group`/`cfg_group` are None on one rank."""

    rank: int
    world: int
    sp: int  # ranks per DiT forward (Ulysses)
    cfg: int  # 2: the teacher's conditional and unconditional forwards on two rank groups; else 1
    sp_group: dist.ProcessGroup | None
    cfg_group: dist.ProcessGroup | None  # ranks (i, i + sp): the same token chunk of the two branches

    @property
    def branch(self) -> int:
        """0: this rank runs the conditional forward; 1: the unconditional one (CFG-parallel only)."""
        return self.rank // self.sp

    @property
    def writer(self) -> bool:
        """The one rank that encodes the text, decodes the video and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = SamplingGroups(rank=0, world=1, sp=1, cfg=1, sp_group=None, cfg_group=None)


def valid_sp_sizes(num_heads: int) -> list[int]:
    return [d for d in range(1, num_heads + 1) if num_heads % d == 0]


def check_sampling_sizes(sp: int, cfg_parallel: bool, num_heads: int, world: int) -> None:
    """The job's sizes against the process group (`world` ranks) and the model; the error names the fix."""
    if not isinstance(sp, int) or isinstance(sp, bool) or sp < 1:
        raise ValueError(f"sp must be a positive int, got {sp!r}")
    ranks = sp * (2 if cfg_parallel else 1)
    if ranks != world:
        branches = " × 2 CFG branches" if cfg_parallel else ""
        raise ValueError(
            f"sp={sp}{branches} = {ranks} ranks, but the process group has {world}: launch with `torchrun "
            f"--nproc_per_node {ranks}` (every rank of the job samples the same video), or pass sp="
            f"{world // (2 if cfg_parallel else 1) or 1}"
        )
    if num_heads % sp:
        raise ValueError(
            f"sp={sp} does not divide the model's {num_heads} attention heads (Ulysses gives each rank heads/sp of "
            f"them); valid sp: {valid_sp_sizes(num_heads)}{' (× 2 ranks with CFG-parallel)' if cfg_parallel else ''}"
        )


def sampling_groups(sp: int, cfg_parallel: bool, num_heads: int, device: torch.device | str) -> SamplingGroups:
    """Check the sizes against the process group and the model, then build the (cfg, sp) mesh.

    Without an initialised process group the job is one rank: only sp = 1 without CFG-parallel is valid.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_sampling_sizes(sp, cfg_parallel, num_heads, world)
    if world == 1:
        return SINGLE
    cfg = 2 if cfg_parallel else 1
    # Not parallel/mesh.py's build_mesh: its FSDP mesh and data-parallel ranks are training's; here the first mesh
    # dim is the CFG branch.
    mesh = init_device_mesh(torch.device(device).type, (cfg, sp), mesh_dim_names=("cfg", "sp"))
    return SamplingGroups(
        rank=dist.get_rank(),
        world=world,
        sp=sp,
        cfg=cfg,
        sp_group=mesh.get_group("sp") if sp > 1 else None,
        cfg_group=mesh.get_group("cfg") if cfg > 1 else None,
    )


def apply_sequence_parallel(model: nn.Module, groups: SamplingGroups) -> SequenceLayout | None:
    """Ulysses on a WanModel (parallel/ulysses.py) when sp > 1; on the plain model, before the inference
    conversions, so that the FP8 and fused-row modules and the compiled blocks call the wrapped attention."""
    if groups.sp == 1:
        return None
    return apply_ulysses(model, groups.sp_group)


def check_token_grid(grid: tuple[int, int, int], sp: int) -> None:
    """Every rank must hold at least one real token of the (padded) sequence, or it computes padding only."""
    length = math.prod(grid)
    chunk = -(-length // sp)
    if sp > 1 and (sp - 1) * chunk >= length:
        fits = max(s for s in range(1, sp) if (s - 1) * -(-length // s) < length)
        raise ValueError(
            f"token grid {tuple(grid)} = {length} tokens is too small for sp={sp}: in chunks of {chunk} tokens rank "
            f"{sp - 1} would hold only padding; at most {fits} ranks fit this grid: use fewer ranks or a larger video "
            "(frames, height, width)"
        )


def check_same_request(request: dict[str, Any]) -> None:
    """Every rank of the process group must sample the same thing (prompts, seed, sizes, steps...): one all-gather
    of per-field digests; the error, raised on every rank, names the first field that differs and the ranks that
    disagree with rank 0. Nothing to check without a process group (or with one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    digests = {
        key: hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()
        for key, value in request.items()
    }
    every: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(every, digests)
    for key in sorted(set().union(*every)):
        differ = [r for r, d in enumerate(every) if d.get(key) != every[0].get(key)]
        if differ:
            raise ValueError(
                f"ranks {differ} were given a different {key!r} than rank 0: every rank of a sequence-parallel job "
                "must get the same prompts and settings (read them from the same file / command line on every rank)"
            )


def broadcast_from_first(
    x: torch.Tensor | None, groups: SamplingGroups, device: torch.device | str
) -> torch.Tensor | None:
    """Rank 0's tensor (the other ranks pass None) on every rank, on `device`; None everywhere if rank 0 has none,
    so that a caller can raise the same error on every rank instead of leaving the others in a collective."""
    if not groups.distributed:
        return None if x is None else x.to(device)
    spec = [None if x is None else (tuple(x.shape), x.dtype)]
    dist.broadcast_object_list(spec, src=0)
    if spec[0] is None:
        return None
    shape, dtype = spec[0]
    out = x.to(device).contiguous() if groups.writer else torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(out, src=0)
    return out


def cfg_branches(
    model: nn.Module,
    x: torch.Tensor,  # (B, C, T, H, W) in the model's dtype
    t: torch.Tensor,  # (B,) or per-token (B, L)
    context: torch.Tensor,  # (B, L_txt, D_txt) conditional
    negative: torch.Tensor,  # (B, L_txt, D_txt) unconditional
    groups: SamplingGroups,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditional and unconditional velocities `model(x, t, context)`, `model(x, t, negative)` in fp32.

    With CFG-parallel each branch group computes its own and the pair (rank i, rank i + sp) all-gathers them, so
    every rank returns both (bitwise the values the owning branch computed).
    """
    if groups.cfg == 1:
        return model(x, t, context).float(), model(x, t, negative).float()
    mine = model(x, t, context if groups.branch == 0 else negative).float().contiguous()
    both = mine.new_empty((2 * mine.shape[0], *mine.shape[1:]))  # (2B, C, T, H, W): group rank order = branch
    dist.all_gather_into_tensor(both, mine, group=groups.cfg_group)
    return both[: mine.shape[0]], both[mine.shape[0] :]
