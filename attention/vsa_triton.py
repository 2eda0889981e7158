"""Triton kernels of VSA (SPEC §2.3, §2.5, §2.7) on tile-ordered, unpadded tokens.

Layout: q, k, v, o are (B, L, H, D) with a unit last stride, read through their strides (no transposes). Tile i
holds rows [tile_offsets[i], tile_offsets[i + 1]) of the sequence, at most BLOCK of them; every kernel loads BLOCK
rows from a tile's offset and masks the rows past its size, so partial edge tiles need no padding buffer.

Kernels:
- `_tile_means_kernel`: fp32 means of q, k, v per (batch, tile, head), one program per (tile, batch·head).
- `_fine_fwd_kernel`: FlashAttention-2-style block-sparse forward, one program per (q tile, batch·head), looping over
  the `topk` selected kv tiles; online softmax in base 2; saves the base-2 log-sum-exp per row.
- `_fine_bwd_dq_kernel`: computes delta = rowsum(O ⊙ dO) for its q tile (stored for the dK/dV kernel) and dQ over the
  selected kv tiles.
- `_fine_bwd_dkdv_kernel`: one program per (kv tile, batch·head), looping over the q tiles that selected it
  (the inverted selection in CSR form).

All kernels take the launch configuration from `FWD_CONFIG` / `BWD_CONFIG` (tuned per head dim on an H100, see
docs/VSA_NOTES.md); launchers accept overrides so the benchmark can sweep them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 64  # rows per tile slot: a 4×4×4 tile holds at most 64 tokens
LOG2E = 1.4426950408889634

# head dim -> (num_warps, num_stages) of the forward; of the backward (dQ kernel, dK/dV kernel)
FWD_CONFIG = {64: (4, 3), 128: (4, 3)}
BWD_CONFIG = {64: ((4, 2), (4, 2)), 128: ((8, 2), (8, 2))}


@triton.jit
def _tile_means_kernel(
    Q, K, V, QM, KM, VM, OFFS,
    stride_b, stride_l, stride_h,
    stride_mb, stride_mn, stride_mh,
    H,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start = tl.load(OFFS + tile)
    size = tl.load(OFFS + tile + 1) - start
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = (rows < size)[:, None]
    src = b * stride_b + h * stride_h + (start + rows)[:, None] * stride_l + dims[None, :]
    dst = b * stride_mb + tile * stride_mn + h * stride_mh + dims
    inv = 1.0 / size.to(tl.float32)
    q = tl.load(Q + src, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(QM + dst, tl.sum(q, 0) * inv)
    k = tl.load(K + src, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(KM + dst, tl.sum(k, 0) * inv)
    v = tl.load(V + src, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(VM + dst, tl.sum(v, 0) * inv)


@triton.jit
def _fine_fwd_kernel(
    Q, K, V, O, LSE, Q2K, OFFS,
    stride_b, stride_l, stride_h,
    H, L, N, TOPK, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    base = b * stride_b + h * stride_h
    q_start = tl.load(OFFS + q_tile)
    q_size = tl.load(OFFS + q_tile + 1) - q_start
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    q_ok = rows < q_size
    q = tl.load(Q + base + (q_start + rows)[:, None] * stride_l + dims[None, :], mask=q_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    sel = Q2K + (bh * N + q_tile) * TOPK
    for s in range(TOPK):
        kv_tile = tl.load(sel + s)
        kv_start = tl.load(OFFS + kv_tile)
        kv_size = tl.load(OFFS + kv_tile + 1) - kv_start
        kv_ok = rows < kv_size
        kv_ptr = base + (kv_start + rows)[:, None] * stride_l + dims[None, :]
        k = tl.load(K + kv_ptr, mask=kv_ok[:, None], other=0.0)
        v = tl.load(V + kv_ptr, mask=kv_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK q, BLOCK kv), base-2 logits
        qk = tl.where(kv_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + base + (q_start + rows)[:, None] * stride_l + dims[None, :], acc.to(O.dtype.element_ty),
             mask=q_ok[:, None])
    tl.store(LSE + bh * L + q_start + rows, m_i + tl.math.log2(l_i), mask=q_ok)


@triton.jit
def _fine_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, Q2K, OFFS,
    stride_b, stride_l, stride_h,
    H, L, N, TOPK, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    base = b * stride_b + h * stride_h
    q_start = tl.load(OFFS + q_tile)
    q_size = tl.load(OFFS + q_tile + 1) - q_start
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    q_ok = rows < q_size
    q_ptr = base + (q_start + rows)[:, None] * stride_l + dims[None, :]
    q = tl.load(Q + q_ptr, mask=q_ok[:, None], other=0.0)
    do = tl.load(DO + q_ptr, mask=q_ok[:, None], other=0.0)
    o = tl.load(O + q_ptr, mask=q_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * L + q_start + rows, delta, mask=q_ok)
    lse = tl.load(LSE + bh * L + q_start + rows, mask=q_ok, other=0.0)

    dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    sel = Q2K + (bh * N + q_tile) * TOPK
    for s in range(TOPK):
        kv_tile = tl.load(sel + s)
        kv_start = tl.load(OFFS + kv_tile)
        kv_size = tl.load(OFFS + kv_tile + 1) - kv_start
        kv_ok = rows < kv_size
        kv_ptr = base + (kv_start + rows)[:, None] * stride_l + dims[None, :]
        k = tl.load(K + kv_ptr, mask=kv_ok[:, None], other=0.0)
        v = tl.load(V + kv_ptr, mask=kv_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(kv_ok[None, :], tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + q_ptr, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])


@triton.jit
def _fine_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, K2Q, K2Q_OFFS, OFFS,
    stride_b, stride_l, stride_h,
    H, L, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    kv_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    base = b * stride_b + h * stride_h
    kv_start = tl.load(OFFS + kv_tile)
    kv_size = tl.load(OFFS + kv_tile + 1) - kv_start
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    kv_ok = rows < kv_size
    kv_ptr = base + (kv_start + rows)[:, None] * stride_l + dims[None, :]
    k = tl.load(K + kv_ptr, mask=kv_ok[:, None], other=0.0)
    v = tl.load(V + kv_ptr, mask=kv_ok[:, None], other=0.0)

    dk = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    first = tl.load(K2Q_OFFS + bh * N + kv_tile)
    last = tl.load(K2Q_OFFS + bh * N + kv_tile + 1)
    for s in range(first, last):
        q_tile = tl.load(K2Q + s)
        q_start = tl.load(OFFS + q_tile)
        q_size = tl.load(OFFS + q_tile + 1) - q_start
        q_ok = rows < q_size
        q_ptr = base + (q_start + rows)[:, None] * stride_l + dims[None, :]
        q = tl.load(Q + q_ptr, mask=q_ok[:, None], other=0.0)
        do = tl.load(DO + q_ptr, mask=q_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * L + q_start + rows, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + bh * L + q_start + rows, mask=q_ok, other=0.0)
        qk_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK kv, BLOCK q)
        p_t = tl.math.exp2(qk_t - lse[None, :])
        p_t = tl.where(kv_ok[:, None] & q_ok[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    tl.store(DK + kv_ptr, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok[:, None])
    tl.store(DV + kv_ptr, dv.to(DV.dtype.element_ty), mask=kv_ok[:, None])


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _same_strides(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels take one set of (B, L, H) strides for all operands; make them agree."""
    xs = tuple(_unit_last_stride(x) for x in xs)
    if all(x.stride() == xs[0].stride() for x in xs):
        return xs
    return tuple(x.contiguous() for x in xs)


def tile_means(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               tile_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 per-tile means of q, k, v: (B, L, H, D) -> three (B, N, H, D)."""
    q, k, v = _same_strides(q, k, v)
    B, L, H, D = q.shape
    N = tile_offsets.shape[0] - 1
    qm, km, vm = (torch.empty(B, N, H, D, device=q.device, dtype=torch.float32) for _ in range(3))
    _tile_means_kernel[(N, B * H)](
        q, k, v, qm, km, vm, tile_offsets,
        q.stride(0), q.stride(1), q.stride(2),
        qm.stride(0), qm.stride(1), qm.stride(2),
        H, HEAD_DIM=D, BLOCK=BLOCK,
    )
    return qm, km, vm


def fine_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q2k: torch.Tensor, tile_offsets: torch.Tensor,
                 config: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention over the selected kv tiles.

    q, k, v: (B, L, H, D); q2k: (B, H, N, topk) int32 selected kv tiles per q tile.
    Returns o (B, L, H, D) and the base-2 log-sum-exp of the scaled logits (B, H, L) fp32.
    """
    q, k, v = _same_strides(q, k, v)
    B, L, H, D = q.shape
    N, topk = q2k.shape[2], q2k.shape[3]
    num_warps, num_stages = config or FWD_CONFIG[D]
    o = torch.empty_like(q)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    _fine_fwd_kernel[(N, B * H)](
        q, k, v, o, lse, q2k, tile_offsets,
        q.stride(0), q.stride(1), q.stride(2),
        H, L, N, topk, D ** -0.5 * LOG2E,
        HEAD_DIM=D, BLOCK=BLOCK, num_warps=num_warps, num_stages=num_stages,
    )
    return o, lse


def invert_selection(q2k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every (batch·head, kv tile): the q tiles that selected it, as CSR.

    q2k: (B, H, N, topk). Returns k2q (B·H·N·topk,) int32 q-tile ids grouped by (batch·head, kv tile), ascending q
    inside a group, and k2q_offsets (B·H·N + 1,) int32 group starts.
    """
    B, H, N, topk = q2k.shape
    key = q2k.long() + N * torch.arange(B * H, device=q2k.device).view(B, H, 1, 1)  # (B, H, N, topk) global kv id
    key = key.flatten()
    order = torch.argsort(key, stable=True)
    k2q = ((order // topk) % N).to(torch.int32)
    bounds = torch.arange(B * H * N + 1, device=q2k.device)
    k2q_offsets = torch.searchsorted(key[order], bounds).to(torch.int32)
    return k2q, k2q_offsets


def fine_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, q2k: torch.Tensor, tile_offsets: torch.Tensor,
                  config: tuple[tuple[int, int], tuple[int, int]] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `fine_forward` wrt q, k, v given dO; same layouts as the forward."""
    q, k, v, o, do = _same_strides(q, k, v, o, do)
    B, L, H, D = q.shape
    N, topk = q2k.shape[2], q2k.shape[3]
    (dq_warps, dq_stages), (dkdv_warps, dkdv_stages) = config or BWD_CONFIG[D]
    k2q, k2q_offsets = invert_selection(q2k)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    sm_scale = D ** -0.5
    strides = (q.stride(0), q.stride(1), q.stride(2))
    _fine_bwd_dq_kernel[(N, B * H)](
        q, k, v, o, do, dq, lse, delta, q2k, tile_offsets, *strides,
        H, L, N, topk, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=D, BLOCK=BLOCK, num_warps=dq_warps, num_stages=dq_stages,
    )
    _fine_bwd_dkdv_kernel[(N, B * H)](
        q, k, v, do, dk, dv, lse, delta, k2q, k2q_offsets, tile_offsets, *strides,
        H, L, N, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=D, BLOCK=BLOCK, num_warps=dkdv_warps, num_stages=dkdv_stages,
    )
    return dq, dk, dv
