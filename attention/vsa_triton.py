"""Triton kernels of VSA (SPEC §2.3, §2.5, §2.7) on tile-ordered, unpadded tokens.

Layout: q, k, v, o are (B, L, H, D) with a unit last stride, read through their strides (no transposes). Tile i
holds rows [tile_offsets[i], tile_offsets[i + 1]) of the sequence, at most BLOCK of them; every kernel reads BLOCK
rows from a tile's offset (row indices clamped to L - 1, so loads are unmasked) and masks the rows past the tile's
size in the scores and stores, so partial edge tiles need no padding buffer. Selected tiles reach the kernels as
(start << 7 | size) words (`pack_tiles`). In the loops over selected tiles, a tile's rows come through a Hopper TMA
descriptor of the (B·L, H·D) matrix where `tma_available` (sm90+, contiguous operands: one BLOCK × D box from the
tile's start row, no per-element address math; 12 % faster forward, docs/VSA_NOTES.md), else through pointers.

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

import os

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

# Launch configs, head dim -> (num_warps, num_stages, tiles per loop step): the forward's; the backward's as
# (dQ kernel, dK/dV kernel). Two tiles per step = 64×128 score blocks (fewer, larger MMAs and softmax rescales).
Config = tuple[int, int, int]
FWD_CONFIG: dict[int, Config] = {64: (4, 3, 1), 128: (4, 3, 1)}
BWD_CONFIG: dict[int, tuple[Config, Config]] = {64: ((4, 2, 1), (4, 2, 1)), 128: ((4, 2, 1), (4, 2, 1))}


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
def _tile_rows(SEL, s, count, L, TILES: tl.constexpr, BLOCK: tl.constexpr):
    """Token rows of `TILES` consecutive tiles of a selection list, packed as (start << 7 | size).

    Returns (rows, ok): TILES·BLOCK row indices (clamped in-bounds, so loads need no mask) and which are real tokens.
    Slots at or past `count` are empty. Scalar loads per slot keep the rows of one tile an affine range.
    """
    r = tl.arange(0, TILES * BLOCK)
    local = r % BLOCK
    rows = tl.zeros([TILES * BLOCK], tl.int32)
    ok = r < 0
    for j in tl.static_range(TILES):
        packed = tl.load(SEL + s + j, mask=s + j < count, other=0)
        in_slot = (r // BLOCK) == j
        rows = tl.where(in_slot, (packed >> 7) + local, rows)
        ok = ok | (in_slot & (local < (packed & 127)))
    return tl.minimum(rows, L - 1), ok


@triton.jit
def _tile_pair(X, Y, XD, YD, SEL, s, count, b, h, base, L, stride_l,
               HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr, TMA: tl.constexpr):
    """Rows of loop step `s` of a selection list from two (B, L, H, D) tensors: (x, y, rows, ok).

    TMA (one tile per step): a BLOCK × D box of the (B·L, H·D) matrix from the tile's start row, no per-element
    address math; the rows past a partial tile run into the next tile (or batch) and are masked by the caller, rows
    past B·L read as zeros. Otherwise `TILES` tiles gathered through pointers (`_tile_rows`). `rows` are the clamped
    in-sequence row indices (for per-row statistics), `ok` marks real tokens.
    """
    if TMA:
        packed = tl.load(SEL + s)
        r = tl.arange(0, BLOCK)
        x = XD.load([b * L + (packed >> 7), h * HEAD_DIM])
        y = YD.load([b * L + (packed >> 7), h * HEAD_DIM])
        rows = tl.minimum((packed >> 7) + r, L - 1)
        ok = r < (packed & 127)
    else:
        rows, ok = _tile_rows(SEL, s, count, L, TILES, BLOCK)
        off = rows[:, None] * stride_l + tl.arange(0, HEAD_DIM)[None, :]
        x = tl.load(X + base + off)
        y = tl.load(Y + base + off)
    return x, y, rows, ok


@triton.jit
def _fine_fwd_kernel(
    Q, K, V, O, LSE, Q2K, OFFS, GATE, COARSE, O_FINE, KD, VD,
    stride_b, stride_l, stride_h,
    H, L, N, TOPK, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, KV_TILES: tl.constexpr, HAS_GATE: tl.constexpr, TMA: tl.constexpr,
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

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    sel = Q2K + (bh * N + q_tile) * TOPK
    for s in range(0, TOPK, KV_TILES):
        k, v, _, kv_ok = _tile_pair(K, V, KD, VD, sel, s, TOPK, b, h, base, L, stride_l, HEAD_DIM, BLOCK, KV_TILES, TMA)
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK q, KV_TILES·BLOCK kv), base-2 logits
        qk = tl.where(kv_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]
    q_off = q_rows[:, None] * stride_l + dims[None, :]
    if HAS_GATE:  # out = fine + gate * coarse, coarse (B, H, N, D) fp32 constant over the tile
        tl.store(O_FINE + base + q_off, out.to(O_FINE.dtype.element_ty), mask=q_ok[:, None])
        coarse = tl.load(COARSE + (bh * N + q_tile) * HEAD_DIM + dims)
        out += tl.load(GATE + base + q_off).to(tl.float32) * coarse[None, :]
    tl.store(O + base + q_off, out.to(O.dtype.element_ty), mask=q_ok[:, None])
    tl.store(LSE + bh * L + q_rows, m_i + tl.math.log2(l_i), mask=q_ok)


@triton.jit
def _fine_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, Q2K, OFFS, GATE, COARSE, DGATE, DCOARSE, KD, VD,
    stride_b, stride_l, stride_h,
    H, L, N, TOPK, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, KV_TILES: tl.constexpr, HAS_GATE: tl.constexpr, TMA: tl.constexpr,
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
    sel = Q2K + (bh * N + q_tile) * TOPK
    for s in range(0, TOPK, KV_TILES):
        k, v, _, kv_ok = _tile_pair(K, V, KD, VD, sel, s, TOPK, b, h, base, L, stride_l, HEAD_DIM, BLOCK, KV_TILES, TMA)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(kv_ok[None, :], tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + base + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])


@triton.jit
def _fine_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, K2Q, K2Q_OFFS, OFFS, QD, DOD,
    stride_b, stride_l, stride_h,
    H, L, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, Q_TILES: tl.constexpr, TMA: tl.constexpr,
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
    first = tl.load(K2Q_OFFS + bh * N + kv_tile)
    last = tl.load(K2Q_OFFS + bh * N + kv_tile + 1)
    for s in range(first, last, Q_TILES):
        q, do, q_rows, q_ok = _tile_pair(Q, DO, QD, DOD, K2Q, s, last, b, h, base, L, stride_l, HEAD_DIM, BLOCK,
                                         Q_TILES, TMA)
        lse = tl.load(LSE + bh * L + q_rows)
        delta = tl.load(DELTA + bh * L + q_rows)
        qk_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK kv, Q_TILES·BLOCK q)
        p_t = tl.math.exp2(qk_t - lse[None, :])
        p_t = tl.where(kv_ok[:, None] & q_ok[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    tl.store(DK + base + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok[:, None])
    tl.store(DV + base + kv_off, dv.to(DV.dtype.element_ty), mask=kv_ok[:, None])


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


def _descriptor(x: torch.Tensor) -> "TensorDescriptor":
    """(B, L, H, D) contiguous -> TMA descriptor of the (B·L, H·D) matrix, BLOCK × D boxes (one head's tile)."""
    B, L, H, D = x.shape
    return TensorDescriptor(x.view(B * L, H * D), shape=[B * L, H * D], strides=[H * D, 1], block_shape=[BLOCK, D])


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
                 config: Config | None = None, gate: torch.Tensor | None = None,
                 coarse: torch.Tensor | None = None, tma: bool | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-sparse attention over the selected kv tiles, optionally plus `gate * coarse`.

    q, k, v, gate: (B, L, H, D); q2k: (B, H, N, topk) int32 selected kv tiles per q tile; coarse: (B, H, N, D) fp32
    coarse output per tile. Returns out (B, L, H, D), the fine part alone (`out` itself without a gate) and the
    base-2 log-sum-exp of the scaled logits (B, H, L) fp32. tma: read kv tiles through TMA descriptors (default:
    where `tma_available`; one tile per loop step).
    """
    has_gate = gate is not None
    q, k, v, gate = _same_strides(q, k, v, gate if has_gate else q)
    B, L, H, D = q.shape
    N, topk = q2k.shape[2], q2k.shape[3]
    num_warps, num_stages, tiles = config or FWD_CONFIG[D]
    out = torch.empty_like(q)
    fine = torch.empty_like(q) if has_gate else out
    coarse = coarse.contiguous() if has_gate else out
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    tma = _use_tma(tma, tiles, k, v)
    kd, vd = (_descriptor(k), _descriptor(v)) if tma else (None, None)
    _fine_fwd_kernel[(N, B * H)](
        q, k, v, out, lse, pack_tiles(q2k, tile_offsets), tile_offsets, gate, coarse, fine, kd, vd,
        q.stride(0), q.stride(1), q.stride(2),
        H, L, N, topk, D ** -0.5 * LOG2E,
        HEAD_DIM=D, BLOCK=BLOCK, KV_TILES=tiles, HAS_GATE=has_gate, TMA=tma, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, fine, lse


def _use_tma(tma: bool | None, tiles: int, *xs: torch.Tensor) -> bool:
    if tma is None:
        return tiles == 1 and tma_available(*xs)
    if tma and (tiles != 1 or not tma_available(*xs)):
        raise ValueError(f"tma=True needs one tile per loop step (got {tiles}) and tensors tma_available() accepts")
    return tma


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


def fine_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fine: torch.Tensor,
                  lse: torch.Tensor, q2k: torch.Tensor, tile_offsets: torch.Tensor,
                  config: tuple[Config, Config] | None = None, gate: torch.Tensor | None = None,
                  coarse: torch.Tensor | None = None, tma: bool | None = None) -> tuple[torch.Tensor, ...]:
    """Gradients of `fine_forward` given dO: (dq, dk, dv, dgate, dcoarse), the last two None without a gate.

    `fine` is the fine part of the forward output (its second result).
    """
    has_gate = gate is not None
    q, k, v, fine, do, gate = _same_strides(q, k, v, fine, do, gate if has_gate else q)
    B, L, H, D = q.shape
    N, topk = q2k.shape[2], q2k.shape[3]
    (dq_warps, dq_stages, kv_tiles), (dkdv_warps, dkdv_stages, q_tiles) = config or BWD_CONFIG[D]
    k2q, k2q_offsets = invert_selection(q2k)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    coarse = coarse.contiguous() if has_gate else dq
    dgate = torch.empty_like(gate) if has_gate else None
    dcoarse = torch.empty_like(coarse) if has_gate else None
    delta = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    sm_scale = D ** -0.5
    strides = (q.stride(0), q.stride(1), q.stride(2))
    tma_dq = _use_tma(tma, kv_tiles, k, v)
    kd, vd = (_descriptor(k), _descriptor(v)) if tma_dq else (None, None)
    _fine_bwd_dq_kernel[(N, B * H)](
        q, k, v, fine, do, dq, lse, delta, pack_tiles(q2k, tile_offsets), tile_offsets,
        gate, coarse, dq if dgate is None else dgate, dq if dcoarse is None else dcoarse, kd, vd, *strides,
        H, L, N, topk, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=D, BLOCK=BLOCK, KV_TILES=kv_tiles, HAS_GATE=has_gate, TMA=tma_dq, num_warps=dq_warps,
        num_stages=dq_stages,
    )
    tma_dkdv = _use_tma(tma, q_tiles, q, do)
    qd, dod = (_descriptor(q), _descriptor(do)) if tma_dkdv else (None, None)
    _fine_bwd_dkdv_kernel[(N, B * H)](
        q, k, v, do, dk, dv, lse, delta, pack_tiles(k2q, tile_offsets), k2q_offsets, tile_offsets, qd, dod, *strides,
        H, L, N, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=D, BLOCK=BLOCK, Q_TILES=q_tiles, TMA=tma_dkdv, num_warps=dkdv_warps, num_stages=dkdv_stages,
    )
    return dq, dk, dv, dgate, dcoarse
