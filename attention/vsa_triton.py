"""Triton kernels of VSA (docs/METHOD.md §2.3, §2.5, §2.7) on tile-ordered, unpadded tokens.

Layout: q, k, v, o are (B, L, H, D) with a unit last stride, read through their strides (no transposes). Tile i
holds rows [tile_offsets[i], tile_offsets[i + 1]) of the sequence, at most BLOCK of them; a kernel reads a tile as a
box of rows from the tile's offset (row indices clamped to L - 1, so loads are unmasked) and masks the rows past the
tile's size in the scores and stores, so partial edge tiles need no padding buffer. The tile a program owns is read
as a BLOCK-row box; the tiles it loops over (the selected kv tiles; in dK/dV the q tiles that selected it) as the
smallest of `BOXES` that holds them, grouped by box so that each group is one loop with a fixed box size. They reach
the kernels as (start << 7 | size) words (`pack_tiles`, `sort_by_box`). In those loops a tile's rows come through a
Hopper TMA descriptor of the (B·L, H·D) matrix where `tma_available` (sm90+, contiguous operands: one box × D block
from the tile's start row, no per-element address math; 12 % faster forward, docs/VSA_NOTES.md), else through
pointers.

Kernels:
- `_tile_means_kernel`: fp32 means of q, k, v per (batch, tile, head), one program per (tile, batch·head).
- `_select_kernel`: the top-k kv tiles of one row of coarse scores, written grouped by box (`select_by_box`).
- `_fine_fwd_kernel`: FlashAttention-2-style block-sparse forward, one program per (q tile, batch·head), looping over
  the `topk` selected kv tiles; online softmax in base 2; saves the base-2 log-sum-exp per row.
- `_fine_bwd_dq_kernel`: computes delta = rowsum(O ⊙ dO) for its q tile (stored for the dK/dV kernel) and dQ over the
  selected kv tiles.
- `_fine_bwd_dkdv_kernel`: one program per (kv tile, batch·head), looping over the q tiles that selected it
  (the inverted selection in CSR form); optionally adds the tile-mean gradients to its tile's rows of dq, dk, dv.
- `_quantize_qkv_kernel`, `_fine_fwd_fp8_kernel`: the inference forward on e4m3 q, k, v (`fine_forward_fp8`).

The fine kernels take the launch configuration from `FWD_CONFIG` / `BWD_CONFIG` (tuned per head dim on an H100, see
docs/VSA_NOTES.md); launchers accept overrides so the benchmark can sweep them.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.3); without them the kernels gather rows through pointers
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

BLOCK = 64  # rows per tile slot: a 4×4×4 tile holds at most 64 tokens
TMA_ENV = "SPARSE_DISTILL_VSA_TMA"  # "0": pointer gathers instead of TMA loads (A/B benchmarks, fallback)
LOG2E = 1.4426950408889634
RESCALE_SLACK: tl.constexpr = tl.constexpr(8.0)  # log2 growth of a row max the forward absorbs before rescaling

# Launch configs, head dim -> (num_warps, num_stages): the forward's; the backward's as (dQ kernel, dK/dV kernel).
Config = tuple[int, int]
FWD_CONFIG: dict[int, Config] = {64: (4, 3), 128: (4, 3)}
BWD_CONFIG: dict[int, tuple[Config, Config]] = {64: ((4, 2), (4, 2)), 128: ((4, 2), (4, 2))}

# Rows a tile is read with, by its size: the largest box first (a full tile), then the boxes partial tiles fit in.
# A 16-token edge tile read as a 64-row box moves 4× its bytes and MMA work; the loops over the selected tiles are
# L2-bandwidth-bound (docs/VSA_NOTES.md), so each tile is read with the smallest box that holds it. 16 is the
# smallest: tl.dot needs K >= 16 for the P·V product.
Boxes = tuple[int, int, int]
BOXES: Boxes = (64, 32, 16)


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
    src = b.to(tl.int64) * stride_b + h * stride_h + (start + rows)[:, None] * stride_l + dims[None, :]
    dst = b * stride_mb + tile * stride_mn + h * stride_mh + dims
    inv = 1.0 / size.to(tl.float32)
    q = tl.load(Q + src, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(QM + dst, tl.sum(q, 0) * inv)
    k = tl.load(K + src, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(KM + dst, tl.sum(k, 0) * inv)
    v = tl.load(V + src, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(VM + dst, tl.sum(v, 0) * inv)


@triton.jit
def _tile_box(X, XD, packed, b, h, base, L, stride_l, HEAD_DIM: tl.constexpr, BN: tl.constexpr, TMA: tl.constexpr):
    """`BN` rows from the start of the tile packed as (start << 7 | size) in a (B, L, H, D) tensor: (x, rows, ok).

    TMA: one BN × D box of the (B·L, H·D) matrix from the tile's start row, no per-element address math; rows past a
    partial tile run into the next tile (or batch) and are masked by the caller through `ok`, rows past B·L read as
    zeros. Pointers: row indices clamped in-bounds, so loads need no mask. `rows` are the clamped in-sequence row
    indices (for per-row statistics), `ok` marks the tile's real tokens.
    """
    r = tl.arange(0, BN)
    start = packed >> 7
    rows = tl.minimum(start + r, L - 1)
    if TMA:
        x = XD.load([b * L + start, h * HEAD_DIM])
    else:
        x = tl.load(X + base + rows[:, None] * stride_l + tl.arange(0, HEAD_DIM)[None, :])
    return x, rows, r < (packed & 127)


@triton.jit
def _fwd_loop(acc, m_i, l_i, q, K, V, KD, VD, sel, lo, hi, b, h, base, L, stride_l, qk_scale,
              HEAD_DIM: tl.constexpr, BN: tl.constexpr, TMA: tl.constexpr):
    """Online-softmax steps over selection slots [lo, hi), every tile read as a BN-row box."""
    for s in range(lo, hi):
        packed = tl.load(sel + s)
        k, _, kv_ok = _tile_box(K, KD, packed, b, h, base, L, stride_l, HEAD_DIM, BN, TMA)
        v, _, _ = _tile_box(V, VD, packed, b, h, base, L, stride_l, HEAD_DIM, BN, TMA)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, q, k, v, kv_ok, qk_scale, False)
    return acc, m_i, l_i


@triton.jit
def online_softmax_step(acc, m_i, l_i, q, k, v, kv_ok, qk_scale, LAZY: tl.constexpr):
    """One FlashAttention step: the running (acc, reference row max, row sum) after the kv rows of k, v where kv_ok.

    qk_scale: a scalar or a (BLOCK, 1) column. LAZY (the FP8 forward): the reference max moves, and acc and l_i are
    rescaled, only when some row's max grew by more than RESCALE_SLACK; meanwhile p = 2^(logit - reference) stays
    below 2^RESCALE_SLACK = 256 (e4m3-safe), and most steps skip the (BLOCK, D) rescale of acc. The loop is bound by
    its non-MMA work once FP8 halves the kv bytes: 3.47 -> 2.89 ms there (1.3B-480p, ρ=0.8), but 13 % slower in the
    bf16 kernel, whose pipelining the branch disturbs (H100, docs/VSA_NOTES.md).
    """
    qk = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK q, BN kv), base-2 logits
    qk = tl.where(kv_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if LAZY:
        if tl.max(m_new - m_i, 0) > RESCALE_SLACK:
            alpha = tl.math.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        p = tl.math.exp2(qk - m_i[:, None])
        l_i += tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc)
        return acc, m_i, l_i
    else:
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i


@triton.jit
def _selection(Q2K, ENDS, row, TOPK):
    """Row `row`'s selection words and where its first two box groups end (`sort_by_box`: full-size boxes, then
    BOX1-row, then BOX2-row ones)."""
    return Q2K + row * TOPK, tl.load(ENDS + 2 * row), tl.load(ENDS + 2 * row + 1)


@triton.jit
def softmax_init(BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(acc, row max, row sum) before the first online-softmax step."""
    return (tl.zeros([BLOCK, HEAD_DIM], tl.float32), tl.full([BLOCK], float("-inf"), tl.float32),
            tl.zeros([BLOCK], tl.float32))


@triton.jit
def _fine_fwd_kernel(
    Q, K, V, O, LSE, Q2K, ENDS, OFFS, GATE, COARSE, O_FINE, KD0, VD0, KD1, VD1, KD2, VD2,
    stride_b, stride_l, stride_h,
    H, L, N, TOPK, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BOX1: tl.constexpr, BOX2: tl.constexpr,
    HAS_GATE: tl.constexpr, TMA: tl.constexpr,
):
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    # int64 (B·L·H·D can pass 2^31), added to the pointers first so per-element offsets stay int32
    base = b.to(tl.int64) * stride_b + h * stride_h
    q_start = tl.load(OFFS + q_tile)
    q_size = tl.load(OFFS + q_tile + 1) - q_start
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    q_ok = rows < q_size
    q_rows = tl.minimum(q_start + rows, L - 1)
    q = tl.load(Q + base + q_rows[:, None] * stride_l + dims[None, :])

    acc, m_i, l_i = softmax_init(BLOCK, HEAD_DIM)
    sel, end0, end1 = _selection(Q2K, ENDS, bh * N + q_tile, TOPK)
    acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, K, V, KD0, VD0, sel, 0, end0, b, h, base, L, stride_l, qk_scale,
                              HEAD_DIM, BLOCK, TMA)
    acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, K, V, KD1, VD1, sel, end0, end1, b, h, base, L, stride_l, qk_scale,
                              HEAD_DIM, BOX1, TMA)
    acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, K, V, KD2, VD2, sel, end1, TOPK, b, h, base, L, stride_l, qk_scale,
                              HEAD_DIM, BOX2, TMA)

    out = acc / l_i[:, None]
    q_off = q_rows[:, None] * stride_l + dims[None, :]
    if HAS_GATE:  # out = fine + gate * coarse, coarse (B, H, N, D) fp32 constant over the tile
        tl.store(O_FINE + base + q_off, out.to(O_FINE.dtype.element_ty), mask=q_ok[:, None])
        coarse = tl.load(COARSE + (bh * N + q_tile) * HEAD_DIM + dims)
        out += tl.load(GATE + base + q_off).to(tl.float32) * coarse[None, :]
    tl.store(O + base + q_off, out.to(O.dtype.element_ty), mask=q_ok[:, None])
    tl.store(LSE + bh * L + q_rows, m_i + tl.math.log2(l_i), mask=q_ok)


@triton.jit
def _dq_loop(dq, q, do, lse, delta, K, V, KD, VD, sel, lo, hi, b, h, base, L, stride_l, qk_scale,
             HEAD_DIM: tl.constexpr, BN: tl.constexpr, TMA: tl.constexpr):
    for s in range(lo, hi):
        packed = tl.load(sel + s)
        k, _, kv_ok = _tile_box(K, KD, packed, b, h, base, L, stride_l, HEAD_DIM, BN, TMA)
        v, _, _ = _tile_box(V, VD, packed, b, h, base, L, stride_l, HEAD_DIM, BN, TMA)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(kv_ok[None, :], tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _fine_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, Q2K, ENDS, OFFS, GATE, COARSE, DGATE, DCOARSE, KD0, VD0, KD1, VD1, KD2, VD2,
    stride_b, stride_l, stride_h,
    H, L, N, TOPK, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BOX1: tl.constexpr, BOX2: tl.constexpr,
    HAS_GATE: tl.constexpr, TMA: tl.constexpr,
):
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    # int64 (B·L·H·D can pass 2^31), added to the pointers first so per-element offsets stay int32
    base = b.to(tl.int64) * stride_b + h * stride_h
    q_start = tl.load(OFFS + q_tile)
    q_size = tl.load(OFFS + q_tile + 1) - q_start
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    q_ok = rows < q_size
    q_rows = tl.minimum(q_start + rows, L - 1)
    q_off = q_rows[:, None] * stride_l + dims[None, :]
    q = tl.load(Q + base + q_off)
    do = tl.load(DO + base + q_off)
    o = tl.load(O + base + q_off)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * L + q_rows, delta, mask=q_ok)
    lse = tl.load(LSE + bh * L + q_rows)
    if HAS_GATE:  # d gate = dO * coarse; d coarse = Σ_tile rows dO * gate
        c_ptr = (bh * N + q_tile) * HEAD_DIM + dims
        coarse = tl.load(COARSE + c_ptr)
        dgate = do.to(tl.float32) * coarse[None, :]
        tl.store(DGATE + base + q_off, dgate.to(DGATE.dtype.element_ty), mask=q_ok[:, None])
        gate = tl.load(GATE + base + q_off).to(tl.float32)
        tl.store(DCOARSE + c_ptr, tl.sum(tl.where(q_ok[:, None], do.to(tl.float32) * gate, 0.0), 0))

    dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    sel, end0, end1 = _selection(Q2K, ENDS, bh * N + q_tile, TOPK)
    dq = _dq_loop(dq, q, do, lse, delta, K, V, KD0, VD0, sel, 0, end0, b, h, base, L, stride_l, qk_scale,
                  HEAD_DIM, BLOCK, TMA)
    dq = _dq_loop(dq, q, do, lse, delta, K, V, KD1, VD1, sel, end0, end1, b, h, base, L, stride_l, qk_scale,
                  HEAD_DIM, BOX1, TMA)
    dq = _dq_loop(dq, q, do, lse, delta, K, V, KD2, VD2, sel, end1, TOPK, b, h, base, L, stride_l, qk_scale,
                  HEAD_DIM, BOX2, TMA)
    tl.store(DQ + base + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])


@triton.jit
def _dkdv_loop(dk, dv, k, v, kv_ok, Q, DO, QD, DOD, LSE, DELTA, sel, lo, hi, b, h, bh, base, L, stride_l, qk_scale,
               HEAD_DIM: tl.constexpr, BN: tl.constexpr, TMA: tl.constexpr):
    for s in range(lo, hi):
        packed = tl.load(sel + s)
        q, q_rows, q_ok = _tile_box(Q, QD, packed, b, h, base, L, stride_l, HEAD_DIM, BN, TMA)
        do, _, _ = _tile_box(DO, DOD, packed, b, h, base, L, stride_l, HEAD_DIM, BN, TMA)
        lse = tl.load(LSE + bh * L + q_rows)
        delta = tl.load(DELTA + bh * L + q_rows)
        qk_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK kv, BN q)
        p_t = tl.math.exp2(qk_t - lse[None, :])
        p_t = tl.where(kv_ok[:, None] & q_ok[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _fine_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, K2Q, K2Q_OFFS, OFFS, QD0, DOD0, QD1, DOD1, QD2, DOD2, DQ, MQ, MK, MV,
    stride_b, stride_l, stride_h,
    H, L, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BOX1: tl.constexpr, BOX2: tl.constexpr, TMA: tl.constexpr,
    HAS_MEANS: tl.constexpr,
):
    kv_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    # int64 (B·L·H·D can pass 2^31), added to the pointers first so per-element offsets stay int32
    base = b.to(tl.int64) * stride_b + h * stride_h
    kv_start = tl.load(OFFS + kv_tile)
    kv_size = tl.load(OFFS + kv_tile + 1) - kv_start
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    kv_ok = rows < kv_size
    kv_rows = tl.minimum(kv_start + rows, L - 1)
    kv_off = kv_rows[:, None] * stride_l + dims[None, :]
    k = tl.load(K + base + kv_off)
    v = tl.load(V + base + kv_off)

    dk = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    # The q tiles that selected this kv tile, grouped by box size: K2Q_OFFS holds 3 group starts per kv tile.
    group = (bh * N + kv_tile) * 3
    s0 = tl.load(K2Q_OFFS + group)
    s1 = tl.load(K2Q_OFFS + group + 1)
    s2 = tl.load(K2Q_OFFS + group + 2)
    s3 = tl.load(K2Q_OFFS + group + 3)
    dk, dv = _dkdv_loop(dk, dv, k, v, kv_ok, Q, DO, QD0, DOD0, LSE, DELTA, K2Q, s0, s1, b, h, bh, base, L, stride_l,
                        qk_scale, HEAD_DIM, BLOCK, TMA)
    dk, dv = _dkdv_loop(dk, dv, k, v, kv_ok, Q, DO, QD1, DOD1, LSE, DELTA, K2Q, s1, s2, b, h, bh, base, L, stride_l,
                        qk_scale, HEAD_DIM, BOX1, TMA)
    dk, dv = _dkdv_loop(dk, dv, k, v, kv_ok, Q, DO, QD2, DOD2, LSE, DELTA, K2Q, s2, s3, b, h, bh, base, L, stride_l,
                        qk_scale, HEAD_DIM, BOX2, TMA)
    dk = dk * sm_scale
    if HAS_MEANS:  # + the tile-mean gradients, (B, N, H, D) fp32 per tile (already / tile size), to every tile row
        m_off = ((b * N + kv_tile) * H + h) * HEAD_DIM + dims
        dk += tl.load(MK + m_off)[None, :]
        dv += tl.load(MV + m_off)[None, :]
        # dQ of this tile's rows is final (dQ kernel) and nobody else touches them: add q's mean gradient in place.
        dq = tl.load(DQ + base + kv_off).to(tl.float32) + tl.load(MQ + m_off)[None, :]
        tl.store(DQ + base + kv_off, dq.to(DQ.dtype.element_ty), mask=kv_ok[:, None])
    tl.store(DK + base + kv_off, dk.to(DK.dtype.element_ty), mask=kv_ok[:, None])
    tl.store(DV + base + kv_off, dv.to(DV.dtype.element_ty), mask=kv_ok[:, None])


@triton.jit
def _select_kernel(SCORES, RANK, OFFS, PACKED, ENDS, N, TOPK, NP2: tl.constexpr, SLOT: tl.constexpr):
    """Top-`TOPK` of one row of tile scores, written as (start << 7 | size) words grouped by box rank (0, 1, 2) and
    ascending tile id (memory order) inside a group, plus the two group ends. The k-th largest score is found exactly
    by a radix search on the order-preserving integer image of the floats; ties at it go to the lowest tile ids.
    SLOT > 0: (tile · SLOT << 7 | size) words instead, for slot layouts (the FP8 forward)."""
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, NP2)
    valid = idx < N
    x = tl.load(SCORES + row * N + idx, mask=valid, other=float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    # Floats -> int64 in [0, 2^32) with the same order: flip the magnitude bits of negatives, then shift by 2^31.
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648
    key = tl.where(valid, key, -1)
    kth = tl.zeros([], tl.int64)
    for bit in tl.static_range(31, -1, -1):  # the largest t with count(key >= t) >= TOPK
        cand = kth | (1 << bit)
        kth = tl.where(tl.sum((key >= cand).to(tl.int32), 0) >= TOPK, cand, kth)
    above = key > kth
    tie = key == kth
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= TOPK - tl.sum(above.to(tl.int32), 0)))
    rank = tl.load(RANK + idx, mask=valid, other=0)
    start = tl.load(OFFS + idx, mask=valid, other=0)
    size = tl.load(OFFS + idx + 1, mask=valid, other=0) - start
    pos = tl.zeros([NP2], tl.int32)
    end = tl.zeros([], tl.int32)
    for r in tl.static_range(3):
        in_r = take & (rank == r)
        pos = tl.where(in_r, end + tl.cumsum(in_r.to(tl.int32), 0) - 1, pos)
        end += tl.sum(in_r.to(tl.int32), 0)
        if r < 2:
            tl.store(ENDS + row * 2 + r, end)
    if SLOT > 0:
        start = idx * SLOT
    tl.store(PACKED + row * TOPK + pos, (start << 7) | size, mask=take)


# ---- FP8 inference forward ------------------------------------------------------------------------------------
# The forward's loop is bound by moving kv tiles from L2 (docs/VSA_NOTES.md); e4m3 k and v halve those bytes and
# run both products on FP8 tensor cores. Inference only (no backward). Scales: q one per row (token), k one per
# tile, so both fold into one per-row factor of each step's logits; v one per (batch, head, channel), applied once
# to the output. Layout: every tile gets a BLOCK-row slot, zeros past its size (NaN-free padding: P·V multiplies it
# by 0), per (batch, head): q8, k8 (B, H, N·BLOCK, D), q's scales (B, H, N·BLOCK); v transposed, vt8 (B, H, D, N·BLOCK),
# because an FP8 product's second operand must be K-major (kv rows contiguous). Slots make every TMA coordinate a
# multiple of BLOCK (16-byte aligned columns of vt8) and let the selection address k and v by slot, with no
# per-step lookup from a token row to its tile.


@triton.jit
def _to_e4m3(x, scale, E4M3_MAX: tl.constexpr):
    return tl.minimum(tl.maximum(x / scale, -E4M3_MAX), E4M3_MAX)


@triton.jit
def _quantize_qkv_kernel(
    Q, K, V, Q8, K8, VT8, QS, KS, VS, OFFS,
    stride_b, stride_l, stride_h,
    H, N,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, E4M3_MAX: tl.constexpr,
):
    """One (tile, batch·head): its q, k, v rows into their e4m3 slots (layout above), q with one scale per row and k
    with one per tile (amax / 448; zeros stay zero), v with VS (B, H, D), the per-channel scales computed beforehand."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start = tl.load(OFFS + tile)
    r = tl.arange(0, BLOCK)
    ok = (r < tl.load(OFFS + tile + 1) - start)[:, None]
    dims = tl.arange(0, HEAD_DIM)
    src = b.to(tl.int64) * stride_b + h * stride_h + (start + r)[:, None] * stride_l + dims[None, :]
    slot = bh.to(tl.int64) * N * BLOCK + tile * BLOCK + r  # (BLOCK,) slot rows
    dst = slot[:, None] * HEAD_DIM + dims[None, :]
    q = tl.load(Q + src, mask=ok, other=0.0).to(tl.float32)
    q_scale = tl.maximum(tl.max(tl.abs(q), 1), 1e-12) / E4M3_MAX
    tl.store(Q8 + dst, _to_e4m3(q, q_scale[:, None], E4M3_MAX).to(Q8.dtype.element_ty))
    tl.store(QS + slot, q_scale)
    k = tl.load(K + src, mask=ok, other=0.0).to(tl.float32)
    k_scale = tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), 1e-12) / E4M3_MAX
    tl.store(K8 + dst, _to_e4m3(k, k_scale, E4M3_MAX).to(K8.dtype.element_ty))
    tl.store(KS + bh * N + tile, k_scale)
    v = tl.load(V + src, mask=ok, other=0.0).to(tl.float32)
    v8 = _to_e4m3(v, tl.load(VS + bh * HEAD_DIM + dims)[None, :], E4M3_MAX)
    vt_dst = (bh.to(tl.int64) * HEAD_DIM + dims[:, None]) * (N * BLOCK) + tile * BLOCK + r[None, :]  # (D, BLOCK)
    tl.store(VT8 + vt_dst, tl.trans(v8).to(VT8.dtype.element_ty))


@triton.jit
def _fp8_loop(acc, m_i, l_i, q8, row_scale, KD, VTD, KS, sel, lo, hi, bh, N, HEAD_DIM: tl.constexpr,
              BLOCK: tl.constexpr, BN: tl.constexpr):
    """`_fwd_loop` on e4m3 slots, selection words (slot << 7 | size): k as a BN × D TMA box, v as a D × BN box."""
    r = tl.arange(0, BN)
    for s in range(lo, hi):
        packed = tl.load(sel + s)
        slot = packed >> 7
        k8 = KD.load([bh * N * BLOCK + slot, 0])  # (BN, D)
        vt8 = VTD.load([bh * HEAD_DIM, slot])  # (D, BN)
        k_scale = tl.load(KS + bh * N + slot // BLOCK)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, q8, k8, tl.trans(vt8), r < (packed & 127),
                                            row_scale * k_scale, True)
    return acc, m_i, l_i


@triton.jit
def _fine_fwd_fp8_kernel(
    Q8, QS, KS, VS, O, Q2K, ENDS, OFFS, GATE, COARSE, KD0, VTD0, KD1, VTD1, KD2, VTD2,
    H, L, N, TOPK, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BOX1: tl.constexpr, BOX2: tl.constexpr, HAS_GATE: tl.constexpr,
):
    """`_fine_fwd_kernel` on the e4m3 slots; O and GATE (B, L, H, D) contiguous; writes only the output."""
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    q_slot = bh.to(tl.int64) * N * BLOCK + q_tile * BLOCK + rows
    q8 = tl.load(Q8 + q_slot[:, None] * HEAD_DIM + dims[None, :])
    row_scale = (tl.load(QS + q_slot) * qk_scale)[:, None]  # logits = q8·k8 × this × the kv tile's k scale

    acc, m_i, l_i = softmax_init(BLOCK, HEAD_DIM)
    sel, end0, end1 = _selection(Q2K, ENDS, bh * N + q_tile, TOPK)
    acc, m_i, l_i = _fp8_loop(acc, m_i, l_i, q8, row_scale, KD0, VTD0, KS, sel, 0, end0, bh, N, HEAD_DIM, BLOCK, BLOCK)
    acc, m_i, l_i = _fp8_loop(acc, m_i, l_i, q8, row_scale, KD1, VTD1, KS, sel, end0, end1, bh, N, HEAD_DIM, BLOCK, BOX1)
    acc, m_i, l_i = _fp8_loop(acc, m_i, l_i, q8, row_scale, KD2, VTD2, KS, sel, end1, TOPK, bh, N, HEAD_DIM, BLOCK, BOX2)

    out = acc / l_i[:, None] * tl.load(VS + bh * HEAD_DIM + dims)[None, :]
    q_start = tl.load(OFFS + q_tile)
    q_ok = rows < tl.load(OFFS + q_tile + 1) - q_start
    q_rows = tl.minimum(q_start + rows, L - 1)
    o_off = (b.to(tl.int64) * L + q_rows[:, None]) * (H * HEAD_DIM) + h * HEAD_DIM + dims[None, :]
    if HAS_GATE:
        coarse = tl.load(COARSE + (bh * N + q_tile) * HEAD_DIM + dims)
        out += tl.load(GATE + o_off).to(tl.float32) * coarse[None, :]
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=q_ok[:, None])


def box_rank(sizes: torch.Tensor, boxes: Boxes) -> torch.Tensor:
    """Index of the smallest box of `boxes` (descending row counts) that holds a tile of each size."""
    rank = torch.zeros_like(sizes, dtype=torch.long)
    for box in boxes[1:]:
        rank += (sizes <= box).long()
    return rank


def sort_by_box(q2k: torch.Tensor, tile_offsets: torch.Tensor, boxes: Boxes = BOXES,
                slots: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected tile ids -> (packed, ends) for the forward and dQ kernels.

    packed (..., topk) int32: (start << 7 | size) words, grouped by box (largest first), ascending start row inside
    a group (kv tiles in memory order); ends (..., 2) int32: where the first and second box groups end. slots: the
    words hold 64 · tile instead of the start row (the FP8 forward's slot layout), same order.
    """
    ids = q2k.long()
    start = tile_offsets.long()[ids]
    size = tile_offsets.long()[ids + 1] - start
    if slots:
        start = ids * BLOCK
    key = (box_rank(size, boxes) << 40) | (start << 7) | size  # start < 2^24 rows, so words fit in 31 bits
    key = key.sort(-1).values
    ends = torch.stack([(key < (r << 40)).sum(-1) for r in (1, 2)], -1).to(torch.int32)
    return (key & ((1 << 40) - 1)).to(torch.int32), ends


def select_by_box(scores: torch.Tensor, topk: int, tile_offsets: torch.Tensor, boxes: Boxes = BOXES,
                  slots: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The `topk` best kv tiles per query tile, straight from the coarse scores (B, H, N, N), in `sort_by_box`'s
    (packed, ends) form: one fused kernel instead of top-k, gathers and a sort (docs/VSA_NOTES.md). slots: words
    hold the tile's slot row (64 · tile) instead of its start row (the FP8 forward's layout)."""
    B, H, N, _ = scores.shape
    scores = scores.detach().float().contiguous()
    rank = box_rank(tile_offsets[1:] - tile_offsets[:-1], _check_boxes(boxes)).to(torch.int32)
    packed = torch.empty(B, H, N, topk, device=scores.device, dtype=torch.int32)
    ends = torch.empty(B, H, N, 2, device=scores.device, dtype=torch.int32)
    _select_kernel[(B * H * N,)](scores, rank, tile_offsets, packed, ends, N, topk, NP2=triton.next_power_of_2(N),
                                 SLOT=BLOCK if slots else 0, num_warps=2)
    return packed, ends


def invert_selection(q2k: torch.Tensor, rank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For every (batch·head, kv tile): the q tiles that selected it, as CSR.

    q2k: (B, H, N, topk); rank: optional (N,) box rank of every tile (`box_rank`, values 0..2). Returns k2q
    (B·H·N·topk,) int32 q-tile ids grouped by (batch·head, kv tile), then by rank, ascending q inside; and offsets:
    without `rank`, (B·H·N + 1,) group starts; with it, (B·H·N·3 + 1,) starts of every (group, rank) run.
    """
    B, H, N, topk = q2k.shape
    groups = q2k.long() + N * torch.arange(B * H, device=q2k.device).view(B, H, 1, 1)  # global kv tile id
    q_ids = torch.arange(N, device=q2k.device).view(1, 1, N, 1)
    runs = 1 if rank is None else 3
    q_rank = 0 if rank is None else rank.to(q2k.device).long().view(1, 1, N, 1)
    key = ((groups * runs + q_rank) * N + q_ids).flatten().sort().values
    bounds = torch.arange(B * H * N * runs + 1, device=q2k.device) * N
    return (key % N).to(torch.int32), torch.searchsorted(key, bounds).to(torch.int32)


def pack_tiles(tile_ids: torch.Tensor, tile_offsets: torch.Tensor) -> torch.Tensor:
    """Tile ids -> (start << 7 | size) int32, so a kernel reads a tile's rows with one independent load."""
    ids = tile_ids.long()
    start = tile_offsets.long()[ids]
    size = tile_offsets.long()[ids + 1] - start
    return ((start << 7) | size).to(torch.int32)


def tma_available(*xs: torch.Tensor) -> bool:
    """Whether the kernels can read these (B, L, H, D) tensors through TMA descriptors: a Hopper-or-newer GPU (or the
    interpreter, for tests), row-major contiguous, 16-byte aligned; `SPARSE_DISTILL_VSA_TMA=0` turns it off."""
    if os.environ.get(TMA_ENV, "1") == "0" or TensorDescriptor is None:
        return False
    x = xs[0]
    if x.is_cuda:
        if torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in xs)


def descriptors(x: torch.Tensor, boxes: Boxes) -> list["TensorDescriptor"]:
    """(B, L, H, D) contiguous -> TMA descriptors of the (B·L, H·D) matrix, one per box: box × D (one head's tile)."""
    B, L, H, D = x.shape
    return [TensorDescriptor(x.view(B * L, H * D), shape=[B * L, H * D], strides=[H * D, 1], block_shape=[box, D])
            for box in boxes]


def _descriptor_pairs(x: torch.Tensor, y: torch.Tensor, boxes: Boxes, tma: bool) -> list:
    """The kernels' (x, y) descriptor arguments per box, interleaved (XD0, YD0, XD1, YD1, ...); Nones without TMA."""
    if not tma:
        return [None] * (2 * len(boxes))
    return [d for pair in zip(descriptors(x, boxes), descriptors(y, boxes)) for d in pair]


def _check_boxes(boxes: Boxes) -> Boxes:
    ok = (len(boxes) == 3 and boxes[0] == BLOCK and all(b in (16, 32, 64) for b in boxes)
          and list(boxes) == sorted(boxes, reverse=True))
    if not ok:
        raise ValueError(f"boxes must be three of 64/32/16 rows, descending, starting at {BLOCK}; got {boxes}")
    return boxes


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


def fine_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: torch.Tensor, ends: torch.Tensor,
                 tile_offsets: torch.Tensor, config: Config | None = None, gate: torch.Tensor | None = None,
                 coarse: torch.Tensor | None = None, tma: bool | None = None, boxes: Boxes = BOXES,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-sparse attention over the selected kv tiles, optionally plus `gate * coarse`.

    q, k, v, gate: (B, L, H, D); (packed, ends): the selected kv tiles per q tile grouped by box (`select_by_box`,
    or `sort_by_box` of any selection), made with the same `boxes`; coarse: (B, H, N, D) fp32 coarse output per
    tile. Returns out (B, L, H, D), the fine part alone (`out` itself without a gate) and the base-2 log-sum-exp of
    the scaled logits (B, H, L) fp32. tma: read kv tiles through TMA descriptors (default: where `tma_available`);
    boxes: the row counts tiles are read with (`BOXES`; (64, 64, 64) reads every tile as a full one, for A/B
    benchmarks).
    """
    has_gate = gate is not None
    q, k, v, gate = _same_strides(q, k, v, gate if has_gate else q)
    B, L, H, D = q.shape
    N, topk = packed.shape[2], packed.shape[3]
    num_warps, num_stages = config or FWD_CONFIG[D]
    boxes = _check_boxes(boxes)
    out = torch.empty_like(q)
    fine = torch.empty_like(q) if has_gate else out
    coarse = coarse.contiguous() if has_gate else out
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    tma = _use_tma(tma, k, v)
    _fine_fwd_kernel[(N, B * H)](
        q, k, v, out, lse, packed, ends, tile_offsets, gate, coarse, fine, *_descriptor_pairs(k, v, boxes, tma),
        q.stride(0), q.stride(1), q.stride(2),
        H, L, N, topk, D ** -0.5 * LOG2E,
        HEAD_DIM=D, BLOCK=BLOCK, BOX1=boxes[1], BOX2=boxes[2], HAS_GATE=has_gate, TMA=tma, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, fine, lse


def _use_tma(tma: bool | None, *xs: torch.Tensor) -> bool:
    if tma is None:
        return tma_available(*xs)
    if tma and not tma_available(*xs):
        raise ValueError("tma=True needs tensors tma_available() accepts (sm90+ or the interpreter, contiguous)")
    return tma


E4M3_MAX = 448.0  # largest finite float8_e4m3fn
# FP8 products take K >= 32: the P·V product's K is the kv box, so no 16-row boxes.
FP8_BOXES: Boxes = (64, 32, 32)
FP8_CONFIG: dict[int, Config] = {64: (4, 3), 128: (4, 3)}  # H100, 1.3B-480p ρ=0.8: (4, 3) 2.89 ms, (4, 2) 3.07-3.12


def quantize_qkv_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     tile_offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, L, H, D) q, k, v -> e4m3 slots (layout: "FP8 inference forward" above) and fp32 scales:
    (q8, qs, k8, ks, vt8, vs) with q8, k8 (B, H, N·64, D), qs (B, H, N·64), ks (B, H, N), vt8 (B, H, D, N·64),
    vs (B, H, D); row r of tile t dequantizes as q8[:, :, 64 t + r] * qs[:, :, 64 t + r, None],
    k8[:, :, 64 t + r] * ks[:, :, t, None] and vt8[..., 64 t + r] * vs."""
    q, k, v = _same_strides(q, k, v)
    B, L, H, D = q.shape
    N = tile_offsets.shape[0] - 1
    # max |v| over the tokens, per (batch, head, channel), in one pass (no |v| temporary)
    vs = torch.linalg.vector_norm(v, float("inf"), dim=1, dtype=torch.float32)  # (B, H, D)
    vs = (vs.clamp(min=1e-12) / E4M3_MAX).contiguous()
    q8 = torch.empty(B, H, N * BLOCK, D, device=q.device, dtype=torch.float8_e4m3fn)
    k8 = torch.empty_like(q8)
    vt8 = torch.empty(B, H, D, N * BLOCK, device=q.device, dtype=torch.float8_e4m3fn)
    qs = torch.empty(B, H, N * BLOCK, device=q.device, dtype=torch.float32)
    ks = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    _quantize_qkv_kernel[(N, B * H)](
        q, k, v, q8, k8, vt8, qs, ks, vs, tile_offsets, q.stride(0), q.stride(1), q.stride(2), H, N,
        HEAD_DIM=D, BLOCK=BLOCK, E4M3_MAX=E4M3_MAX,
    )
    return q8, qs, k8, ks, vt8, vs


def fine_forward_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: torch.Tensor, ends: torch.Tensor,
                     tile_offsets: torch.Tensor, gate: torch.Tensor | None = None, coarse: torch.Tensor | None = None,
                     config: Config | None = None, boxes: Boxes = FP8_BOXES) -> torch.Tensor:
    """`fine_forward` with e4m3 q, k, v (quantized here) and FP8 tensor-core products: inference only, TMA (Hopper+).

    (packed, ends): the selection as slot words, grouped by boxes of at least 32 rows
    (`select_by_box(..., boxes=FP8_BOXES, slots=True)`). Returns the output (B, L, H, D) in q's dtype
    (+ gate * coarse when given); it differs from the bf16 kernel's by e4m3 rounding (3 mantissa bits).
    """
    B, L, H, D = q.shape
    N, topk = packed.shape[2], packed.shape[3]
    boxes = _check_boxes(boxes)
    if min(boxes) < 32:
        raise ValueError(f"fine_forward_fp8 needs boxes of at least 32 rows (FP8 products take K >= 32), got {boxes}")
    if not tma_available(q):
        raise ValueError("fine_forward_fp8 needs TMA (a Hopper GPU, sm90+): use fine_forward (bf16) here")
    num_warps, num_stages = config or FP8_CONFIG[D]
    q8, qs, k8, ks, vt8, vs = quantize_qkv_fp8(q, k, v, tile_offsets)
    rows = B * H * N * BLOCK
    k_descs = [TensorDescriptor(k8.view(rows, D), shape=[rows, D], strides=[D, 1], block_shape=[box, D])
               for box in boxes]
    vt_descs = [TensorDescriptor(vt8.view(B * H * D, N * BLOCK), shape=[B * H * D, N * BLOCK], strides=[N * BLOCK, 1],
                                 block_shape=[D, box]) for box in boxes]
    out = torch.empty(B, L, H, D, device=q.device, dtype=q.dtype)
    has_gate = gate is not None
    gate = gate.contiguous() if has_gate else out
    coarse = coarse.contiguous() if has_gate else out
    _fine_fwd_fp8_kernel[(N, B * H)](
        q8, qs, ks, vs, out, packed, ends, tile_offsets, gate, coarse,
        *[d for pair in zip(k_descs, vt_descs) for d in pair],
        H, L, N, topk, D ** -0.5 * LOG2E,
        HEAD_DIM=D, BLOCK=BLOCK, BOX1=boxes[1], BOX2=boxes[2], HAS_GATE=has_gate, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def fine_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fine: torch.Tensor,
                  lse: torch.Tensor, packed: torch.Tensor, ends: torch.Tensor, tile_offsets: torch.Tensor,
                  config: tuple[Config, Config] | None = None, gate: torch.Tensor | None = None,
                  coarse: torch.Tensor | None = None, tma: bool | None = None, boxes: Boxes = BOXES,
                  mean_grads: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None,
                  ) -> tuple[torch.Tensor, ...]:
    """Gradients of `fine_forward` given dO: (dq, dk, dv, dgate, dcoarse), the last two None without a gate.

    `fine` is the fine part of the forward output (its second result); (packed, ends) and `boxes` as given to it.
    mean_grads (with a gate): maps d coarse to the gradients of the per-tile means of q, k, v ((B, N, H, D) fp32, each
    already divided by its tile's size), which the dK/dV kernel then adds to every row of dq, dk, dv — the whole
    VSA op's gradients without broadcasting them in separate passes.
    """
    has_gate = gate is not None
    q, k, v, fine, do, gate = _same_strides(q, k, v, fine, do, gate if has_gate else q)
    B, L, H, D = q.shape
    N, topk = packed.shape[2], packed.shape[3]
    (dq_warps, dq_stages), (dkdv_warps, dkdv_stages) = config or BWD_CONFIG[D]
    boxes = _check_boxes(boxes)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    coarse = coarse.contiguous() if has_gate else dq
    dgate = torch.empty_like(gate) if has_gate else None
    dcoarse = torch.empty_like(coarse) if has_gate else None
    delta = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    sm_scale = D ** -0.5
    strides = (q.stride(0), q.stride(1), q.stride(2))
    tma = _use_tma(tma, q, k, v, do)
    _fine_bwd_dq_kernel[(N, B * H)](
        q, k, v, fine, do, dq, lse, delta, packed, ends, tile_offsets,
        gate, coarse, dq if dgate is None else dgate, dq if dcoarse is None else dcoarse,
        *_descriptor_pairs(k, v, boxes, tma), *strides,
        H, L, N, topk, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=D, BLOCK=BLOCK, BOX1=boxes[1], BOX2=boxes[2], HAS_GATE=has_gate, TMA=tma, num_warps=dq_warps,
        num_stages=dq_stages,
    )
    sizes = tile_offsets[1:] - tile_offsets[:-1]
    q2k = torch.searchsorted(tile_offsets, packed >> 7, right=True) - 1  # kv tile ids from their start rows
    k2q, k2q_offsets = invert_selection(q2k, box_rank(sizes, boxes))
    means = [m.contiguous() for m in mean_grads(dcoarse)] if has_gate and mean_grads is not None else None
    _fine_bwd_dkdv_kernel[(N, B * H)](
        q, k, v, do, dk, dv, lse, delta, pack_tiles(k2q, tile_offsets), k2q_offsets, tile_offsets,
        *_descriptor_pairs(q, do, boxes, tma),
        dq, *(means or (dq, dq, dq)), *strides, H, L, N, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=D, BLOCK=BLOCK, BOX1=boxes[1], BOX2=boxes[2], TMA=tma, HAS_MEANS=means is not None,
        num_warps=dkdv_warps, num_stages=dkdv_stages,
    )
    return dq, dk, dv, dgate, dcoarse
