"""Ulysses sequence parallelism (docs/METHOD.md §6, §2.8), applied to a plain WanModel from outside.

Every rank of an SP group holds the same sample. After the embeddings the model's `token_shard` seam pads the
(tile-ordered) sequence to a multiple of `sp` and keeps this rank's contiguous chunk; blocks run on the chunk.
Around each self-attention, one all-to-all trades sequence for heads — (B, L/sp, H, Dh) → (B, L, H/sp, Dh) — the
SP padding is dropped, the unmodified attention function (dense or VSA, whose metadata describes the full
sequence) runs on H/sp heads, and the inverse all-to-all trades back. `token_gather` all-gathers the sequence
before the output head, so every rank computes the same full output and the same loss.

Gradient convention. The job's objective is the average of every rank's loss, and FSDP averages gradients over
`dp_shard × sp` (parallel/mesh.py). For that average to equal the single-device gradient of the group's sample:
- `token_gather`'s backward is a reduce-scatter (sum) of the output gradient: the exact derivative of the sum of the
  SP ranks' (identical) losses, i.e. sp × this rank's slice;
- so a rank's block parameters get sp × the gradient of its own tokens, and the SP average sums the chunks;
- `token_shard`'s backward all-gathers the chunk gradients and divides by sp, which gives every rank the exact
  gradient of the full embedding output (the embeddings then get the true gradient on every rank).
Parameters used on the chunks outside the shard seam (the text embedder, a (B, 6, D) time modulation) get
sp × their per-chunk share on each rank, which the SP average also turns into the true gradient. Tests check the
averaged gradients against a one-rank run.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

AttnFn = Callable[..., torch.Tensor]


class SequenceLayout:
    """The SP group and the unpadded length of the sequence being processed, shared by the seam and attention.

    `seq_len` is set by `SequenceShard` on every forward; with activation checkpointing the recomputed attention
    reads it again, so a model's backward must follow its own forward (true in every recipe step).
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.seq_len: int | None = None

    def padded(self, length: int) -> int:
        return -(-length // self.size) * self.size


def sp_seed(seed: int, dp_rank: int) -> int:
    """Seed for noise/timesteps: identical on the ranks of one SP group, distinct across groups (docs/METHOD.md §1.11)."""
    return seed + dp_rank


# ---- collectives with their autograd inverses ----
def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Chunk j of dim 0 goes to rank j; chunk j of the result came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
    """(N, L/sp, H, Dh) sequence chunk, all heads → (N, L_pad, H/sp, Dh) full sequence, this rank's heads."""
    sp = layout.size
    n, chunk, heads, dh = x.shape
    # (N, L/sp, H, Dh) -> (sp, N, L/sp, H/sp, Dh): head group j goes to rank j
    x = x.reshape(n, chunk, sp, heads // sp, dh).permute(2, 0, 1, 3, 4)
    x = _all_to_all(x, layout.group)  # (sp, N, L/sp, H/sp, Dh): sequence chunk j from rank j
    return x.permute(1, 0, 2, 3, 4).reshape(n, sp * chunk, heads // sp, dh)


def heads_to_seq(x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
    """(N, L_pad, H/sp, Dh) → (N, L_pad/sp, H, Dh); the inverse of `seq_to_heads`."""
    sp = layout.size
    n, length, heads_local, dh = x.shape
    # (N, L_pad, H/sp, Dh) -> (sp, N, L/sp, H/sp, Dh): sequence chunk j goes to rank j
    x = x.reshape(n, sp, length // sp, heads_local, dh).permute(1, 0, 2, 3, 4)
    x = _all_to_all(x, layout.group)  # (sp, N, L/sp, H/sp, Dh): head group j from rank j
    return x.permute(1, 2, 0, 3, 4).reshape(n, length // sp, sp * heads_local, dh)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        ctx.layout = layout
        return seq_to_heads(x, layout)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return heads_to_seq(grad, ctx.layout), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        ctx.layout = layout
        return heads_to_seq(x, layout)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return seq_to_heads(grad, ctx.layout), None


def _pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 of x (B, L, ...) to `length`."""
    pad = [0, 0] * (x.ndim - 2) + [0, length - x.shape[1]]
    return F.pad(x, pad)


def _chunk_of(x: torch.Tensor, layout: SequenceLayout, dim: int) -> torch.Tensor:
    """This rank's contiguous chunk of the padded sequence along `dim` (a copy, so the full tensor can be freed)."""
    padded = layout.padded(x.shape[dim])
    x = F.pad(x, [0, 0] * (x.ndim - dim - 1) + [0, padded - x.shape[dim]])
    size = padded // layout.size
    return x.narrow(dim, layout.rank * size, size).clone()


def _gather_seq(x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
    """(B, L_pad/sp, ...) chunks of all SP ranks → (B, L_pad, ...)."""
    x = x.movedim(1, 0).contiguous()  # (L/sp, B, ...): all_gather_into_tensor concatenates dim 0
    out = x.new_empty((layout.size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=layout.group)
    return out.movedim(0, 1)


def _reduce_scatter_seq(x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
    """(B, L_pad, ...) summed over the SP ranks → this rank's (B, L_pad/sp, ...) chunk."""
    x = x.movedim(1, 0).contiguous()  # (L_pad, B, ...)
    out = x.new_empty((x.shape[0] // layout.size, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x, group=layout.group)
    return out.movedim(0, 1)


class _ShardSeq(torch.autograd.Function):
    """Forward: this rank's chunk of a replicated (B, L, ...); backward: the full gradient, averaged over SP."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        ctx.layout, ctx.length = layout, x.shape[1]
        return _chunk_of(x, layout, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        full = _gather_seq(grad, ctx.layout)[:, : ctx.length]  # (B, L, ...)
        return full / ctx.layout.size, None


class _GatherSeq(torch.autograd.Function):
    """Forward: all-gather the chunks and drop the padding; backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        ctx.layout = layout
        return _gather_seq(x, layout)[:, : layout.seq_len].contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        layout = ctx.layout
        return _reduce_scatter_seq(_pad_seq(grad, layout.padded(grad.shape[1])), layout), None


# ---- the model seam ----
class SequenceShard(nn.Module):
    """`x, cos, sin, tmod = token_shard(x, cos, sin, tmod)`: keep this rank's chunk of the token sequence."""

    def __init__(self, layout: SequenceLayout) -> None:
        super().__init__()
        self.layout = layout

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tmod: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        length = x.shape[1]
        self.layout.seq_len = length
        x = _ShardSeq.apply(x, self.layout)  # (B, L_pad/sp, D)
        cos, sin = _chunk_of(cos, self.layout, dim=0), _chunk_of(sin, self.layout, dim=0)  # (L_pad/sp, Dh/2) buffers
        if tmod.ndim == 4:  # per-token modulation (B, L, 6, D) follows its tokens
            tmod = _ShardSeq.apply(tmod, self.layout)
        return x, cos, sin, tmod


class SequenceGather(nn.Module):
    """`x = token_gather(x)`: (B, L_pad/sp, D) chunks → the full (B, L, D) on every rank."""

    def __init__(self, layout: SequenceLayout) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherSeq.apply(x, self.layout)


def ulysses_attention(attn_fn: AttnFn, layout: SequenceLayout) -> AttnFn:
    """Wrap `attn_fn` so that it takes sequence chunks (B, L_pad/sp, H, Dh) and returns the same layout."""

    def attn(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Any = None, gate: torch.Tensor | None = None
    ) -> torch.Tensor:
        heads, length = q.shape[2], layout.seq_len
        if heads % layout.size:
            raise ValueError(f"Ulysses: {heads} attention heads are not divisible by the SP size {layout.size}")
        if length is None or layout.padded(length) != q.shape[1] * layout.size:
            raise ValueError(
                f"Ulysses: local sequence chunk of {q.shape[1]} tokens does not match the sharded length {length} "
                f"over sp={layout.size}; the model's token_shard must run before attention"
            )
        parts = [q, k, v] + ([gate] if gate is not None else [])
        # One all-to-all for q, k, v (and the VSA gate), stacked along the batch: (n·B, L_pad/sp, H, Dh).
        full = _SeqToHeads.apply(torch.cat(parts, dim=0), layout)[:, :length]  # (n·B, L, H/sp, Dh)
        q, k, v, *rest = full.chunk(len(parts), dim=0)
        out = attn_fn(q, k, v, meta=meta, gate=rest[0] if rest else None)  # (B, L, H/sp, Dh)
        return _HeadsToSeq.apply(_pad_seq(out, layout.padded(length)), layout)  # (B, L_pad/sp, H, Dh)

    attn.__name__ = f"ulysses_{getattr(attn_fn, '__name__', 'attention')}"
    return attn


def attention_for(model: nn.Module, attn_fn: AttnFn) -> AttnFn:
    """`attn_fn` as `model`'s self-attentions must run it: Ulysses-wrapped when the model is sequence parallel
    (for attention set from outside, e.g. models/lora.py AdapterView over a shared base)."""
    shard = model.token_shard
    return ulysses_attention(attn_fn, shard.layout) if isinstance(shard, SequenceShard) else attn_fn


def apply_ulysses(model: nn.Module, sp_group: dist.ProcessGroup) -> SequenceLayout:
    """Install the SP seam on a WanModel and wrap every self-attention's `attn_fn`; returns the shared layout."""
    layout = SequenceLayout(sp_group)
    heads = model.cfg.num_heads
    if heads % layout.size:
        raise ValueError(f"parallel.sp={layout.size} does not divide the model's num_heads={heads}")
    model.token_shard = SequenceShard(layout)
    model.token_gather = SequenceGather(layout)
    for block in model.blocks:
        block.attn1.attn_fn = ulysses_attention(block.attn1.attn_fn, layout)
    return layout
