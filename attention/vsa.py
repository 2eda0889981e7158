"""VSA: video sparse attention (docs/METHOD.md §2) — metadata, coarse stage, top-k, reference, autograd ops.

Design (beyond the reference implementation): the model permutes its tokens into tile order once per forward
(`meta.token_order`, DESIGN.md), so attention receives (B, L, H, D) tokens already grouped by 4×4×4 tile and
*unpadded*. Tiles at the grid edges are ragged: tile i holds rows [tile_offsets[i], tile_offsets[i + 1]). The kernels
index tiles by offset and mask rows past each tile's size, so nothing is padded, gathered or scattered per layer.

    out = fine + gate * coarse          (no sigmoid; gate None -> fine only)

- coarse: per-tile means q̄, k̄, v̄ (true tile sizes), scores A = q̄ k̄ᵀ/√d over tiles, softmax(A) v̄ per tile, added
  to the tile's tokens through the gate. Differentiable: the gated op's backward runs the coarse backward on the
  (B, N, H, D) means and adds their gradients to every tile row inside the dK/dV kernel.
- selection: the `topk` largest A per (batch, head, query tile); not differentiable.
- fine: softmax attention of each query over the tokens of its selected kv tiles only.

On CPU tensors `vsa_attention` runs `vsa_reference` (plain torch with masks); on CUDA the Triton kernels of
`attention/vsa_triton.py`, wrapped as `torch.library` custom ops (namespace `sparse_distill`) with fake
implementations so `torch.compile` traces attention without graph breaks. `vsa_fp8_attention` is the same contract
for inference on Hopper GPUs: the fine stage on e4m3 q, k, v (`sample.py --fp8`), no backward.
`dense_gated_attention` is VSA at ρ = 0 run at dense speed (SDPA for the fine stage, these tile means and coarse
attention for the gated branch): the critic of the released FastWan runs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import lru_cache

import torch

from attention.sdpa import sdpa_attention

KERNEL_HEAD_DIMS = (64, 128)


@dataclass(frozen=True, eq=False)
class VSAMeta:
    grid: tuple[int, int, int]  # token grid (T', H', W') after patchify
    tile: tuple[int, int, int]
    sparsity: float
    topk: int  # kv tiles kept per query tile
    num_tiles: int
    token_order: torch.Tensor  # (L,) int64: raster index of the i-th token in tile order
    token_restore: torch.Tensor  # (L,) int64: inverse of token_order
    tile_sizes: torch.Tensor  # (N,) int32 tokens per tile
    tile_offsets: torch.Tensor  # (N + 1,) int32 start of each tile in the tile-ordered sequence
    token_tile: torch.Tensor  # (L,) int64 tile of each tile-ordered token


def vsa_meta(grid: tuple[int, int, int], sparsity: float, device: torch.device | str,
             tile: tuple[int, int, int] = (4, 4, 4)) -> VSAMeta:
    """Tiling metadata for a token grid; built once per batch shape and shared by all layers (cached)."""
    grid = _check_triple("VSA grid", grid)
    tile = _check_triple("VSA tile", tile)
    ok = isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool) and 0.0 <= sparsity < 1.0
    if not ok:
        raise ValueError(f"VSA sparsity must be a number in [0, 1), got {sparsity!r}")
    return _build_meta(grid, float(sparsity), torch.device(device), tile)


def _check_triple(name: str, value) -> tuple[int, int, int]:
    ok = isinstance(value, (tuple, list, torch.Size)) and len(value) == 3 and all(
        isinstance(x, numbers.Integral) and not isinstance(x, bool) and x > 0 for x in value)
    if not ok:
        raise ValueError(f"{name} must be three positive ints (T', H', W'), got {value!r}")
    return tuple(int(x) for x in value)


@lru_cache(maxsize=64)
def _build_meta(grid: tuple[int, int, int], sparsity: float, device: torch.device,
                tile: tuple[int, int, int]) -> VSAMeta:
    T, H, W = grid
    tt, th, tw = tile
    nt, nh, nw = -(-T // tt), -(-H // th), -(-W // tw)
    num_tiles = nt * nh * nw
    t = torch.arange(T).view(T, 1, 1)
    h = torch.arange(H).view(1, H, 1)
    w = torch.arange(W).view(1, 1, W)
    # Size of each token's tile along h and w (the last tile along an axis may be short).
    size_h = torch.clamp(H - (h // th) * th, max=th)
    size_w = torch.clamp(W - (w // tw) * tw, max=tw)
    tile_id = (t // tt) * (nh * nw) + (h // th) * nw + (w // tw)  # (T, H, W)
    inside = (t % tt) * (size_h * size_w) + (h % th) * size_w + (w % tw)  # raster position inside the tile
    key = (tile_id * (tt * th * tw) + inside).flatten()  # (L,) unique, sorts tokens into tile order
    token_order = torch.argsort(key)
    token_restore = torch.argsort(token_order)
    tile_sizes = torch.bincount(tile_id.flatten(), minlength=num_tiles)
    tile_offsets = torch.cat([torch.zeros(1, dtype=torch.long), tile_sizes.cumsum(0)])
    token_tile = torch.repeat_interleave(torch.arange(num_tiles), tile_sizes)
    topk = min(max(math.ceil((1.0 - sparsity) * num_tiles), 1), num_tiles)
    return VSAMeta(
        grid=grid, tile=tile, sparsity=sparsity, topk=topk, num_tiles=num_tiles,
        token_order=token_order.to(device), token_restore=token_restore.to(device),
        tile_sizes=tile_sizes.to(torch.int32).to(device), tile_offsets=tile_offsets.to(torch.int32).to(device),
        token_tile=token_tile.to(device),
    )


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VSAMeta,
                  gate: torch.Tensor | None) -> None:
    if not isinstance(meta, VSAMeta):
        raise TypeError(f"vsa_attention needs meta from vsa_meta(...), got {type(meta).__name__}")
    if q.dim() != 4:
        raise ValueError(f"vsa_attention expects q of shape (B, L, H, D), got {tuple(q.shape)}")
    L = math.prod(meta.grid)
    if q.shape[1] != L:
        raise ValueError(f"vsa_attention: sequence length {q.shape[1]} != prod(grid {meta.grid}) = {L}")
    for name, x in (("k", k), ("v", v), ("gate", gate)):
        if x is None:
            continue
        if x.shape != q.shape:
            raise ValueError(f"vsa_attention: {name} shape {tuple(x.shape)} != q shape {tuple(q.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"vsa_attention: {name} dtype {x.dtype} != q dtype {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"vsa_attention: {name} on {x.device}, q on {q.device}")


def vsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VSAMeta,
                  gate: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v, gate: (B, L, H, D) tile-ordered tokens -> (B, L, H, D). CPU: reference; CUDA: Triton kernels."""
    _check_inputs(q, k, v, meta, gate)
    if q.device.type == "cpu":
        return vsa_reference(q, k, v, meta, gate)
    return vsa_attention_kernels(q, k, v, meta, gate)


def vsa_attention_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VSAMeta,
                          gate: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel path (custom ops). Runs on CPU tensors only under TRITON_INTERPRET=1 (tests)."""
    _check_inputs(q, k, v, meta, gate)
    _check_kernel_inputs(q, meta)
    if gate is None:  # the coarse output is unused: only the (non-differentiable) selection needs the tile means
        qm, km, vm = torch.ops.sparse_distill.vsa_tile_means(q.detach(), k.detach(), v.detach(), meta.tile_offsets)
        _, scores = coarse_attention(qm, km, vm)
        # The selection as the fine kernels read it: (start << 7 | size) words grouped by box size, and group ends.
        sel, ends = torch.ops.sparse_distill.vsa_select(scores, meta.topk, meta.tile_offsets)
        return torch.ops.sparse_distill.vsa_fine(q, k, v, sel, ends, meta.tile_offsets)[0]
    # One op for tile means, coarse attention, selection and fine kernels: its backward adds the tile-mean gradients
    # inside the dK/dV kernel, and the forward adds gate * coarse in the fine kernel's epilogue, so nothing of
    # (B, N, H, D) is ever broadcast to (B, L, H, D) in a separate pass.
    return torch.ops.sparse_distill.vsa_gated(q, k, v, gate, meta.tile_offsets, meta.topk)[0]


def kernel_inputs(q: torch.Tensor) -> bool:
    """Whether the Triton kernels take these q (and same-shaped k, v): CUDA, bf16 / fp16, head dim 64 / 128."""
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in KERNEL_HEAD_DIMS


def _check_kernel_inputs(q: torch.Tensor, meta: VSAMeta) -> None:
    """What the Triton kernels need beyond `_check_inputs`: head dim 64 / 128, tiles of at most 64 tokens (one
    BLOCK-row slot), bf16 / fp16 on CUDA."""
    D = q.shape[-1]
    if D not in KERNEL_HEAD_DIMS:
        raise ValueError(f"VSA kernels support head dim 64 or 128, got {D}")
    if math.prod(meta.tile) > 64:
        raise ValueError(f"VSA kernels support tiles of at most 64 tokens, got tile {meta.tile}")
    if q.is_cuda and q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"VSA kernels on CUDA take bfloat16 or float16, got {q.dtype}")


def vsa_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VSAMeta,
                      gate: torch.Tensor | None = None) -> torch.Tensor:
    """Inference VSA with the fine stage on e4m3 q, k, v (FP8 tensor cores, half the kv bytes): same contract as
    `vsa_attention`, no backward. Tile means, coarse attention and the selection stay in bf16/fp32. Output differs
    from `vsa_attention` by FP8 rounding (~5 % relative on random q, k). Hopper+ GPUs; on CPU it runs
    `vsa_reference` (no FP8)."""
    _check_inputs(q, k, v, meta, gate)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, gate)):
        raise RuntimeError("vsa_fp8_attention is inference-only (no backward): run it under torch.no_grad() or "
                           "torch.inference_mode(), or train with vsa_attention")
    if q.device.type == "cpu":
        return vsa_reference(q, k, v, meta, gate)
    _check_kernel_inputs(q, meta)
    if torch.cuda.get_device_capability(q.device)[0] < 9:
        raise ValueError(f"vsa_fp8_attention needs a Hopper GPU (sm90+, TMA and FP8); {q.device} is "
                         f"sm{''.join(map(str, torch.cuda.get_device_capability(q.device)))}: use vsa_attention")
    return torch.ops.sparse_distill.vsa_fp8(q, k, v, gate, meta.tile_offsets, meta.topk)


def dense_gated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VSAMeta,
                          gate: torch.Tensor | None = None) -> torch.Tensor:
    """VSA at ρ = 0 at dense speed: `sdpa_attention(q, k, v) + gate * coarse` (gate None -> dense only).

    At ρ = 0 every query tile keeps every kv tile, so VSA's fine stage is plain full attention and runs through SDPA
    (cuDNN on CUDA); the coarse branch is VSA's (tile means, `coarse_attention`, each tile's output on its tokens).
    This is the critic ("fake score") of the runs that produced the released FastWan checkpoints: FastVideo builds
    all three networks from the VSA block (`fastvideo/models/dits/wanvideo.py`, `WanTransformerBlock_VSA`) and runs
    the critic at `VSA_sparsity = 0` with its `to_gate_compress` zero-initialised and trainable
    (`fastvideo/training/distillation_pipeline.py`). q, k, v, gate: (B, L, H, D) tile-ordered tokens; `meta` from
    `vsa_meta(grid, 0.0, device)` (for its tiles; metadata that drops kv tiles is refused).
    """
    _check_inputs(q, k, v, meta, gate)
    if meta.topk != meta.num_tiles:
        raise ValueError(f"dense_gated_attention runs VSA at sparsity 0, but meta keeps {meta.topk} of "
                         f"{meta.num_tiles} kv tiles (sparsity {meta.sparsity}): build it with "
                         "vsa_meta(grid, 0.0, ...)")
    fine = sdpa_attention(q, k, v)  # (B, L, H, D)
    if gate is None:
        return fine
    qm, km, vm = tile_means(q, k, v, meta)  # (B, N, H, D) fp32
    coarse = coarse_attention(qm, km, vm)[0].transpose(1, 2)  # (B, H, N, D) -> (B, N, H, D)
    coarse = coarse.index_select(1, meta.token_tile)  # (B, L, H, D): each tile's output on its tokens
    return (fine.float() + gate.float() * coarse).to(q.dtype)  # fp32 sum, as the VSA kernels' epilogue


def tile_means(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: VSAMeta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable fp32 per-tile means of tile-ordered q, k, v: (B, L, H, D) -> three (B, N, H, D).

    CUDA bf16 / fp16 at head dim 64 / 128: the Triton kernel (the `vsa_tile_means` op; its backward spreads each
    tile's gradient / size over the tile's rows); otherwise (CPU, or fp32 / other head dims: the toy on a GPU) the same
    math in torch.
    """
    if kernel_inputs(q):
        return torch.ops.sparse_distill.vsa_tile_means(q, k, v, meta.tile_offsets)
    B, _, H, D = q.shape
    sizes = meta.tile_sizes.to(torch.float32).view(1, -1, 1, 1)
    return tuple(x.new_zeros(B, meta.num_tiles, H, D, dtype=torch.float32).index_add(1, meta.token_tile, x.float())
                 / sizes for x in (q, k, v))


def coarse_attention(qm: torch.Tensor, km: torch.Tensor, vm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention between tile means, in fp32 (it is tiny: N ≤ ~1500 tiles).

    qm, km, vm: (B, N, H, D) fp32. Returns the coarse output per tile (B, H, N, D) and the pre-softmax scores
    (B, H, N, N) that drive the selection, both fp32.
    """
    with torch.autocast(qm.device.type, enabled=False):
        scale = qm.shape[-1] ** -0.5
        qh, kh, vh = (x.transpose(1, 2) for x in (qm, km, vm))  # (B, H, N, D)
        scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, H, N, N)
        coarse = torch.matmul(scores.softmax(-1), vh)  # (B, H, N, D)
    return coarse, scores


def coarse_attention_backward(qm: torch.Tensor, km: torch.Tensor, vm: torch.Tensor,
                              dcoarse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `coarse_attention`'s coarse output w.r.t. qm, km, vm (all (B, N, H, D) fp32), recomputing the
    softmax (N × N per head: cheap); dcoarse (B, H, N, D)."""
    with torch.autocast(qm.device.type, enabled=False):  # fp32 like the forward, even if autocast is on here
        scale = qm.shape[-1] ** -0.5
        qh, kh, vh = (x.transpose(1, 2) for x in (qm, km, vm))  # (B, H, N, D)
        probs = (torch.matmul(qh, kh.transpose(-1, -2)) * scale).softmax(-1)  # (B, H, N, N)
        dv = torch.matmul(probs.transpose(-1, -2), dcoarse)
        dp = torch.matmul(dcoarse, vh.transpose(-1, -2))
        ds = probs * (dp - (dp * probs).sum(-1, keepdim=True)) * scale
        dq, dk = torch.matmul(ds, kh), torch.matmul(ds.transpose(-1, -2), qh)
    return tuple(x.transpose(1, 2) for x in (dq, dk, dv))


def select_tiles(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices of the `topk` largest scores per row, in no particular order: (B, H, N, N) -> (B, H, N, topk) int32.

    The torch form of the selection (tests, benchmarks); the kernel path selects with the fused `vsa_select` op.
    """
    return torch.topk(scores.detach(), topk, dim=-1, sorted=False).indices.to(torch.int32)


def vsa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VSAMeta,
                  gate: torch.Tensor | None = None) -> torch.Tensor:
    """Same math as the kernels, written plainly with dense masks in fp32 (one (L, L) mask per batch·head)."""
    _check_inputs(q, k, v, meta, gate)
    B, L, H, D = q.shape
    N = meta.num_tiles
    scale = D ** -0.5
    qf, kf, vf = q.float(), k.float(), v.float()
    member = torch.nn.functional.one_hot(meta.token_tile, N).to(torch.float32)  # (L, N)
    sizes = meta.tile_sizes.to(torch.float32).view(1, N, 1, 1)
    qm, km, vm = (torch.einsum("ln,blhd->bnhd", member, x) / sizes for x in (qf, kf, vf))  # (B, N, H, D)
    scores = torch.einsum("bnhd,bmhd->bhnm", qm, km) * scale  # (B, H, N, N)
    coarse_tiles = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), vm)  # (B, N, H, D)
    coarse = coarse_tiles[:, meta.token_tile]  # (B, L, H, D)
    chosen = torch.topk(scores.detach(), meta.topk, dim=-1).indices  # (B, H, N, topk)
    keep_tiles = torch.zeros(B, H, N, N, dtype=torch.bool, device=q.device).scatter_(-1, chosen, True)

    fine = torch.empty_like(qf)
    for b in range(B):
        for h in range(H):
            keep = keep_tiles[b, h][meta.token_tile][:, meta.token_tile]  # (L, L)
            logits = (qf[b, :, h] @ kf[b, :, h].T) * scale  # (L, L)
            probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)
            fine[b, :, h] = probs @ vf[b, :, h]
    out = fine if gate is None else fine + gate.float() * coarse
    return out.to(q.dtype)


def vsa_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VSAMeta,
               gate: torch.Tensor | None = None) -> torch.Tensor:
    """`vsa_reference`'s math batched for any device, dtype and head dim: the fine stage is SDPA with a boolean
    (B, H, L, L) mask of each query tile's selected kv tiles, the coarse stage fp32 torch. O(L²) memory per batch·head:
    for small token grids that the kernels do not take (the toy on a GPU: fp32, head dim 32), not for real videos."""
    _check_inputs(q, k, v, meta, gate)
    qm, km, vm = tile_means(q, k, v, meta)  # (B, N, H, D) fp32
    coarse, scores = coarse_attention(qm, km, vm)  # (B, H, N, D), (B, H, N, N)
    chosen = torch.topk(scores.detach(), meta.topk, dim=-1).indices  # (B, H, N, topk)
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=q.device).scatter_(-1, chosen, True)
    keep = keep[:, :, meta.token_tile][:, :, :, meta.token_tile]  # (B, H, L, L): token pairs in kept tile pairs
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
    fine = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep).transpose(1, 2)
    if gate is None:
        return fine
    coarse = coarse.transpose(1, 2).index_select(1, meta.token_tile)  # (B, L, H, D): each tile's output on its tokens
    return (fine.float() + gate.float() * coarse).to(q.dtype)


# ---- custom ops ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("sparse_distill::vsa_tile_means", mutates_args=())
def _tile_means_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   tile_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from attention import vsa_triton
    return vsa_triton.tile_means(q, k, v, tile_offsets)


@_tile_means_op.register_fake
def _(q, k, v, tile_offsets):
    B, L, H, D = q.shape
    N = tile_offsets.shape[0] - 1
    return tuple(q.new_empty(B, N, H, D, dtype=torch.float32) for _ in range(3))


def _tile_means_setup(ctx, inputs, output):
    q, k, v, tile_offsets = inputs
    ctx.save_for_backward(tile_offsets)
    ctx.length, ctx.dtypes = q.shape[1], (q.dtype, k.dtype, v.dtype)


def _tile_means_backward(ctx, dqm, dkm, dvm):
    # d mean_n / d x_l = 1 / size_n for the rows l of tile n: each tile's gradient / size, spread over its rows.
    (tile_offsets,) = ctx.saved_tensors
    sizes = tile_offsets[1:] - tile_offsets[:-1]  # (N,)
    token_tile = torch.repeat_interleave(torch.arange(sizes.shape[0], device=sizes.device), sizes,
                                         output_size=ctx.length)  # (L,)

    def spread(grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if grad is None:
            return None
        return (grad / sizes.view(1, -1, 1, 1)).index_select(1, token_tile).to(dtype)  # (B, N, ..) -> (B, L, ..)

    return (*(spread(g, dt) for g, dt in zip((dqm, dkm, dvm), ctx.dtypes)), None)


torch.library.register_autograd("sparse_distill::vsa_tile_means", _tile_means_backward,
                                setup_context=_tile_means_setup)


@torch.library.custom_op("sparse_distill::vsa_select", mutates_args=())
def _select_op(scores: torch.Tensor, topk: int, tile_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from attention import vsa_triton
    return vsa_triton.select_by_box(scores, topk, tile_offsets)


@_select_op.register_fake
def _(scores, topk, tile_offsets):
    B, H, N, _ = scores.shape
    return scores.new_empty(B, H, N, topk, dtype=torch.int32), scores.new_empty(B, H, N, 2, dtype=torch.int32)


@torch.library.custom_op("sparse_distill::vsa_fine", mutates_args=())
def _fine_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor, ends: torch.Tensor,
             tile_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from attention import vsa_triton
    out, _, lse = vsa_triton.fine_forward(q, k, v, sel, ends, tile_offsets)
    return out, lse


@_fine_op.register_fake
def _(q, k, v, sel, ends, tile_offsets):
    B, L, H, D = q.shape
    return torch.empty_like(q), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("sparse_distill::vsa_fine_bwd", mutates_args=())
def _fine_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, sel: torch.Tensor, ends: torch.Tensor,
                 tile_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from attention import vsa_triton
    return vsa_triton.fine_backward(do, q, k, v, o, lse, sel, ends, tile_offsets)[:3]


@_fine_bwd_op.register_fake
def _(do, q, k, v, o, lse, sel, ends, tile_offsets):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fine_setup(ctx, inputs, output):
    q, k, v, sel, ends, tile_offsets = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, sel, ends, tile_offsets)


def _fine_backward(ctx, do, dlse):
    q, k, v, o, lse, sel, ends, tile_offsets = ctx.saved_tensors
    dq, dk, dv = torch.ops.sparse_distill.vsa_fine_bwd(do, q, k, v, o, lse, sel, ends, tile_offsets)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("sparse_distill::vsa_fine", _fine_backward, setup_context=_fine_setup)


def _coarse_and_selection(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile_offsets: torch.Tensor, topk: int,
                          boxes: tuple[int, int, int], slots: bool) -> tuple[torch.Tensor, ...]:
    """The coarse stage of a whole-op forward on the kernel path: (qm, km, vm, coarse, sel, ends), the selection
    grouped by `boxes` (as `select_by_box`, slot words with `slots`)."""
    from attention import vsa_triton
    qm, km, vm = vsa_triton.tile_means(q, k, v, tile_offsets)
    coarse, scores = coarse_attention(qm, km, vm)
    sel, ends = vsa_triton.select_by_box(scores, topk, tile_offsets, boxes, slots)
    return qm, km, vm, coarse, sel, ends


@torch.library.custom_op("sparse_distill::vsa_gated", mutates_args=())
def _gated_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, tile_offsets: torch.Tensor,
              topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole gated VSA op: (out, fine, lse, qm, km, vm, coarse, sel, ends); all but `out` feed the backward."""
    from attention import vsa_triton
    qm, km, vm, coarse, sel, ends = _coarse_and_selection(q, k, v, tile_offsets, topk, vsa_triton.BOXES, False)
    out, fine, lse = vsa_triton.fine_forward(q, k, v, sel, ends, tile_offsets, gate=gate, coarse=coarse)
    return out, fine, lse, qm, km, vm, coarse, sel, ends


@_gated_op.register_fake
def _(q, k, v, gate, tile_offsets, topk):
    B, L, H, D = q.shape
    N = tile_offsets.shape[0] - 1
    means = [q.new_empty(B, N, H, D, dtype=torch.float32) for _ in range(3)]
    return (torch.empty_like(q), torch.empty_like(q), q.new_empty(B, H, L, dtype=torch.float32), *means,
            q.new_empty(B, H, N, D, dtype=torch.float32), q.new_empty(B, H, N, topk, dtype=torch.int32),
            q.new_empty(B, H, N, 2, dtype=torch.int32))


@torch.library.custom_op("sparse_distill::vsa_gated_bwd", mutates_args=())
def _gated_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor,
                  tile_offsets: torch.Tensor, fine: torch.Tensor, lse: torch.Tensor, qm: torch.Tensor,
                  km: torch.Tensor, vm: torch.Tensor, coarse: torch.Tensor, sel: torch.Tensor,
                  ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from attention import vsa_triton
    sizes = (tile_offsets[1:] - tile_offsets[:-1]).to(torch.float32).view(1, -1, 1, 1)

    def mean_grads(dcoarse: torch.Tensor) -> tuple[torch.Tensor, ...]:  # d mean / d x = 1 / size per tile row
        return tuple(g / sizes for g in coarse_attention_backward(qm, km, vm, dcoarse))

    dq, dk, dv, dgate, _ = vsa_triton.fine_backward(do, q, k, v, fine, lse, sel, ends, tile_offsets, gate=gate,
                                                    coarse=coarse, mean_grads=mean_grads)
    return dq, dk, dv, dgate


@_gated_bwd_op.register_fake
def _(do, q, k, v, gate, tile_offsets, fine, lse, qm, km, vm, coarse, sel, ends):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(gate)


def _gated_setup(ctx, inputs, output):
    q, k, v, gate, tile_offsets, _ = inputs
    _, fine, lse, qm, km, vm, coarse, sel, ends = output
    ctx.save_for_backward(q, k, v, gate, tile_offsets, fine, lse, qm, km, vm, coarse, sel, ends)


def _gated_backward(ctx, do, *unused):
    # Only `out` feeds the model; the other outputs are by-products for this backward.
    dq, dk, dv, dgate = torch.ops.sparse_distill.vsa_gated_bwd(do, *ctx.saved_tensors)
    return dq, dk, dv, dgate, None, None


torch.library.register_autograd("sparse_distill::vsa_gated", _gated_backward, setup_context=_gated_setup)


@torch.library.custom_op("sparse_distill::vsa_fp8", mutates_args=())
def _fp8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None, tile_offsets: torch.Tensor,
            topk: int) -> torch.Tensor:
    """Tile means, coarse attention, selection (boxes of >= 32 rows) and the e4m3 fine kernel; no autograd."""
    from attention import vsa_triton
    coarse, sel, ends = _coarse_and_selection(q, k, v, tile_offsets, topk, vsa_triton.FP8_BOXES, True)[3:]
    return vsa_triton.fine_forward_fp8(q, k, v, sel, ends, tile_offsets, gate=gate,
                                       coarse=coarse if gate is not None else None)


@_fp8_op.register_fake
def _(q, k, v, gate, tile_offsets, topk):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
