"""Benchmark VSA against cuDNN dense SDPA at Wan shapes on one GPU.

    python benchmarks/bench_attention.py            # all shapes, ρ ∈ {0.8, 0.9}
    python benchmarks/bench_attention.py --sweep    # first sweep the kernel launch configs at 1.3B-480p ρ=0.9
    python benchmarks/bench_attention.py --shapes 1.3B-480p --sparsity 0.9
    python benchmarks/bench_attention.py --fp8      # also the FP8 inference forward (vsa_fp8_attention)
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --smoke   # CPU: one tiny shape through every table

For each shape and sparsity: ms of the forward and forward+backward of (a) cuDNN SDPA dense on the same q/k/v,
(b) the whole VSA op (tile means, coarse attention, top-k, fine kernels, gate), (c) the fine kernels alone (the
backward includes inverting the selection). Sparse TF/s counts only the selected work:
FLOPs_fwd = 4·B·H·D·Σ_q-tiles(q tokens × selected kv tokens), backward 2.5× that; "tile TF/s" counts every selected
(q tile, kv tile) pair as 64×64 tokens, the work a padded layout does. The fine kernels are timed on a uniformly random
selection of `topk` tiles per row (as the public VSA benchmark does): on random q/k the top-k of tile means favours
the small edge tiles (a mean of fewer random vectors is longer), which would understate the sparse FLOPs. Kernel time
does not depend on which tiles are selected. Medians of triton.testing.do_bench. The ratio table is printed last.
Without a GPU (--smoke, under the Triton interpreter) the kernels run on fp32 CPU tensors, dense attention is PyTorch's
CPU SDPA, the VSA op is its CPU path (the reference) and times are wall-clock medians: a check that the script runs.
--fp8 adds the inference forward on e4m3 q, k, v: the whole op and the fine kernel with its quantization pass, the
same random selection grouped by FP8 boxes, against the bf16 forward and cuDNN of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention import vsa_triton
from attention.vsa import select_tiles, vsa_attention, vsa_fp8_attention, vsa_meta

SHAPES = {  # name -> (token grid, heads); head dim 128
    "1.3B-480p": ((21, 30, 52), 12),
    "14B-720p": ((21, 45, 80), 40),
    "5B-720p": ((31, 22, 40), 24),
    "smoke": ((4, 8, 6), 1),  # 1 × 2 × 2 tiles, the second column partial (2 tokens wide): --smoke
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # the interpreter computes bf16 tl.dot wrongly
HEAD_DIM = 128
FULL_BOXES = (64, 64, 64)  # every tile read as a full 64-row box (the kernels before box-size grouping)


def bench(fn, grads=()) -> float:
    """Median ms of fn(): triton.testing.do_bench on a GPU; on the CPU (--smoke, interpreted kernels) one wall-clock
    run, which only shows that the path runs."""
    if DEVICE == "cuda":
        return triton.testing.do_bench(fn, warmup=50, rep=200, grad_to_none=list(grads), return_mode="median")
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def bench_config(fn) -> float:
    """Like bench, but a launch config that does not fit the chip (shared memory) times as inf."""
    try:
        return bench(fn)
    except triton.runtime.errors.OutOfResources:
        return math.inf


def sparse_flops(q2k: torch.Tensor, meta) -> tuple[float, float]:
    """(4·B·H·D·Σ_q-tiles(q tokens × selected kv tokens), the same counting 64 tokens per tile)."""
    sizes = meta.tile_sizes.double()
    kv_tokens = sizes[q2k.long()].sum(-1)  # (B, H, N)
    return 4.0 * HEAD_DIM * float((kv_tokens * sizes).sum()), 4.0 * HEAD_DIM * 64 * 64 * q2k.numel()


def random_selection(heads: int, meta, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    scores = torch.rand(1, heads, meta.num_tiles, meta.num_tiles, device=DEVICE, generator=gen)
    return select_tiles(scores, meta.topk)


def grouped(q2k: torch.Tensor, meta, boxes=vsa_triton.BOXES, slots: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return vsa_triton.sort_by_box(q2k, meta.tile_offsets, boxes, slots)


def make_qkv(grid, heads, seed=0):
    L = math.prod(grid)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.randn(1, L, heads, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
            for _ in range(4)]


def time_fine(q, k, v, q2k, meta, boxes=vsa_triton.BOXES) -> tuple[float, float]:
    offs = meta.tile_offsets
    do = torch.randn_like(q)
    sel = grouped(q2k, meta, boxes)
    fwd = bench(lambda: vsa_triton.fine_forward(q, k, v, *sel, offs, boxes=boxes))

    def fwd_bwd():
        o, _, lse = vsa_triton.fine_forward(q, k, v, *sel, offs, boxes=boxes)
        vsa_triton.fine_backward(do, q, k, v, o, lse, *sel, offs, boxes=boxes)

    return fwd, bench(fwd_bwd)


def sweep(name: str, sparsity: float) -> None:
    grid, heads = SHAPES[name]
    meta = vsa_meta(grid, sparsity, DEVICE)
    q, k, v, _ = make_qkv(grid, heads)
    q2k = random_selection(heads, meta)
    flops, _ = sparse_flops(q2k, meta)
    offs = meta.tile_offsets
    print(f"sweep {name} ρ={sparsity}: (num_warps, num_stages, TMA, boxes) -> ms, sparse TF/s")
    variants = [(tma, boxes) for tma in (True, False) for boxes in (vsa_triton.BOXES, FULL_BOXES)]
    fwd = {}
    for tma, boxes in variants:
        sel = grouped(q2k, meta, boxes)
        for cfg in [(4, 2), (4, 3), (4, 4), (8, 3)]:
            key = (*cfg, tma, boxes)
            fwd[key] = bench_config(lambda: vsa_triton.fine_forward(q, k, v, *sel, offs, cfg, tma=tma, boxes=boxes))
            print(f"  fwd {key}: {fwd[key]:.3f} ms {flops / fwd[key] / 1e9:.0f} TF/s")
    o, _, lse = vsa_triton.fine_forward(q, k, v, *grouped(q2k, meta), offs)
    do = torch.randn_like(q)
    base_dkdv = vsa_triton.BWD_CONFIG[HEAD_DIM][1]
    dq = {}
    for tma, boxes in variants:  # the TMA switch and the boxes apply to both backward kernels
        sel = grouped(q2k, meta, boxes)
        for cfg in [(4, 1), (4, 2), (4, 3), (8, 2)]:
            key = (*cfg, tma, boxes)
            dq[key] = bench_config(lambda: vsa_triton.fine_backward(do, q, k, v, o, lse, *sel, offs, (cfg, base_dkdv),
                                                                    tma=tma, boxes=boxes))
            print(f"  bwd dq {key} + dkdv {base_dkdv}: {dq[key]:.3f} ms")
    best_dq = min(dq, key=dq.get)
    dkdv = {}
    sel = grouped(q2k, meta, best_dq[3])
    for cfg in [(4, 1), (4, 2), (4, 3), (8, 2)]:
        key = (*cfg, *best_dq[2:])
        dkdv[key] = bench_config(lambda: vsa_triton.fine_backward(do, q, k, v, o, lse, *sel, offs, (best_dq[:2], cfg),
                                                                  tma=best_dq[2], boxes=best_dq[3]))
        print(f"  bwd dq {best_dq} + dkdv {key}: {dkdv[key]:.3f} ms {2.5 * flops / dkdv[key] / 1e9:.0f} TF/s")
    print(f"best: fwd {min(fwd, key=fwd.get)}, bwd dq {best_dq}, dkdv {min(dkdv, key=dkdv.get)}")


@triton.jit
def _bound_probe_kernel(Q, K, KD, VD, SEL, OFFS, OUT, H, L, TOPK, qk_scale,
                        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, LOADS: tl.constexpr, COMPUTE: tl.constexpr):
    """The forward kernel's loop over the selected kv tiles (64-row TMA boxes) with only its loads (LOADS) or only its
    MMAs and softmax on one kv tile loaded before the loop (COMPUTE), or both (the real loop, for reference)."""
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.minimum(tl.load(OFFS + q_tile) + tl.arange(0, BLOCK), L - 1)
    dims = tl.arange(0, HEAD_DIM)
    base = b.to(tl.int64) * L * H * HEAD_DIM + h * HEAD_DIM
    q = tl.load(Q + base + rows[:, None] * H * HEAD_DIM + dims[None, :])
    k0 = tl.load(K + base + rows[:, None] * H * HEAD_DIM + dims[None, :])
    acc, m_i, l_i = vsa_triton.softmax_init(BLOCK, HEAD_DIM)
    sel = SEL + (bh * tl.num_programs(0) + q_tile) * TOPK
    all_rows = tl.arange(0, BLOCK) < BLOCK
    for s in range(0, TOPK):
        packed = tl.load(sel + s)
        if LOADS:
            k = KD.load([b * L + (packed >> 7), h * HEAD_DIM])
            v = VD.load([b * L + (packed >> 7), h * HEAD_DIM])
        else:  # a loaded scalar (1.0) keeps the MMAs inside the loop (not hoisted as loop-invariant)
            one = (packed & 0).to(tl.float32) + 1.0
            k = (k0 * one).to(k0.dtype)
            v = k
        if COMPUTE:
            acc, m_i, l_i = vsa_triton.online_softmax_step(acc, m_i, l_i, q, k, v, all_rows, qk_scale, False)
        else:
            acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(OUT + (bh * tl.num_programs(0) + q_tile) * HEAD_DIM + dims, tl.sum(acc, 0) + tl.sum(l_i, 0))


def bound_probe(name: str, sparsity: float) -> None:
    """Is the forward loop bound by moving kv tiles from L2 or by its MMAs + softmax? Times the loop with only its
    loads and with only its compute, against the real kernel at the same (64-row box) tile reads."""
    grid, heads = SHAPES[name]
    meta = vsa_meta(grid, sparsity, DEVICE)
    q, k, v, _ = make_qkv(grid, heads)
    q2k = random_selection(heads, meta)
    N, L = meta.num_tiles, q.shape[1]
    packed = vsa_triton.pack_tiles(q2k, meta.tile_offsets)
    out = torch.empty(heads, N, HEAD_DIM, device=DEVICE)
    (kd,), (vd,) = (vsa_triton.descriptors(x, (64,)) for x in (k, v))
    kv_bytes = 2 * 64 * HEAD_DIM * 2 * q2k.numel()
    _, tile_flops = sparse_flops(q2k, meta)
    fwd_cfg = vsa_triton.FWD_CONFIG[HEAD_DIM]
    real = bench(lambda: vsa_triton.fine_forward(q, k, v, *grouped(q2k, meta, FULL_BOXES), meta.tile_offsets,
                                                 boxes=FULL_BOXES))
    print(f"bound probe {name} ρ={sparsity} (64-row kv boxes, {kv_bytes / 1e9:.1f} GB of kv tile reads, "
          f"{tile_flops / 1e9:.0f} GFLOP of tile MMAs):")
    print(f"  fine forward kernel            {real:.3f} ms  ({kv_bytes / real / 1e9:.2f} TB/s, "
          f"{tile_flops / real / 1e9:.0f} tile TF/s)")
    for label, loads, compute in (("probe: loads + compute", True, True), ("probe: loads only", True, False),
                                  ("probe: compute only", False, True)):
        ms = bench(lambda: _bound_probe_kernel[(N, heads)](
            q, k, kd, vd, packed, meta.tile_offsets, out, heads, L, meta.topk, HEAD_DIM ** -0.5 * vsa_triton.LOG2E,
            HEAD_DIM=HEAD_DIM, BLOCK=64, LOADS=loads, COMPUTE=compute, num_warps=fwd_cfg[0], num_stages=fwd_cfg[1]))
        print(f"  {label:<30} {ms:.3f} ms  ({kv_bytes / ms / 1e9:.2f} TB/s, {tile_flops / ms / 1e9:.0f} tile TF/s)")


def profile_op(name: str, sparsity: float) -> None:
    """Where the whole op's fwd+bwd time goes (CUDA kernel totals)."""
    grid, heads = SHAPES[name]
    meta = vsa_meta(grid, sparsity, DEVICE)
    q, k, v, gate = (x.requires_grad_() for x in make_qkv(grid, heads))
    do = torch.randn_like(q)
    for _ in range(3):
        vsa_attention(q, k, v, meta, gate).backward(do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            vsa_attention(q, k, v, meta, gate).backward(do)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


def time_fp8(q, k, v, gate, q2k, meta) -> dict:
    """Inference forward on e4m3 q, k, v: whole op, fine kernel incl. its quantization pass, the quantization alone."""
    offs = meta.tile_offsets
    sel = grouped(q2k, meta, vsa_triton.FP8_BOXES, slots=True)
    with torch.no_grad():
        return dict(
            op=bench(lambda: vsa_fp8_attention(q, k, v, meta, gate)),
            fine=bench(lambda: vsa_triton.fine_forward_fp8(q, k, v, *sel, offs)),
            quant=bench(lambda: vsa_triton.quantize_qkv_fp8(q, k, v, offs)),
        )


def run_shape(name: str, sparsities: list[float], fp8: bool = False) -> list[dict]:
    grid, heads = SHAPES[name]
    q, k, v, gate = make_qkv(grid, heads)
    gate.mul_(0.1)
    L = q.shape[1]
    rows = []
    # cuDNN dense SDPA on the same q/k/v, (B, H, L, D) views.
    qd, kd, vd = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    do_dense = torch.randn_like(qd)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if DEVICE == "cuda" else contextlib.nullcontext():
        dense_fwd = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd))
        dense_fb = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd).backward(do_dense), (qd, kd, vd))
    dense_flops = 4.0 * heads * HEAD_DIM * L * L
    print(f"{name}: L={L} heads={heads} cuDNN dense fwd {dense_fwd:.2f} ms ({dense_flops / dense_fwd / 1e9:.0f} TF/s)"
          f" fwd+bwd {dense_fb:.2f} ms ({3.5 * dense_flops / dense_fb / 1e9:.0f} TF/s)")
    for sparsity in sparsities:
        meta = vsa_meta(grid, sparsity, DEVICE)
        q2k = random_selection(heads, meta)
        flops, tile_flops = sparse_flops(q2k, meta)
        fine_fwd, fine_fb = time_fine(q, k, v, q2k, meta)
        full_fwd, full_fb = time_fine(q, k, v, q2k, meta, FULL_BOXES)
        qg, kg, vg, gg = (x.detach().requires_grad_() for x in (q, k, v, gate))
        do = torch.randn_like(q)
        op_fwd = bench(lambda: vsa_attention(q, k, v, meta, gate))
        op_fb = bench(lambda: vsa_attention(qg, kg, vg, meta, gg).backward(do), (qg, kg, vg, gg))
        row = dict(shape=name, sparsity=sparsity, topk=meta.topk, tiles=meta.num_tiles, dense_fwd=dense_fwd,
                   dense_fb=dense_fb, op_fwd=op_fwd, op_fb=op_fb, fine_fwd=fine_fwd, fine_fb=fine_fb,
                   tfs_fwd=flops / fine_fwd / 1e9, tfs_fb=3.5 * flops / fine_fb / 1e9,
                   tile_fwd=tile_flops / fine_fwd / 1e9, tile_fb=3.5 * tile_flops / fine_fb / 1e9,
                   full_fwd=full_fwd, full_fb=full_fb)
        if fp8:
            row["fp8"] = time_fp8(q.detach(), k.detach(), v.detach(), gate.detach(), q2k, meta)
            row["fp8"]["tfs"] = flops / row["fp8"]["fine"] / 1e9
        print(f"  ρ={sparsity} topk={meta.topk}/{meta.num_tiles}: VSA op fwd {op_fwd:.3f} ms, fwd+bwd {op_fb:.3f} ms;"
              f" fine fwd {fine_fwd:.3f} ms ({row['tfs_fwd']:.0f} sparse, {row['tile_fwd']:.0f} tile TF/s),"
              f" fwd+bwd {fine_fb:.3f} ms ({row['tfs_fb']:.0f} sparse, {row['tile_fb']:.0f} tile TF/s);"
              f" fine with every tile a 64-row box: {full_fwd:.3f} / {full_fb:.3f} ms")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.8, 0.9])
    parser.add_argument("--sweep", action="store_true", help="sweep launch configs at 1.3B-480p ρ=0.9 first")
    parser.add_argument("--profile", action="store_true", help="profile the whole op at 1.3B-480p ρ=0.9 first")
    parser.add_argument("--bound", action="store_true", help="time the forward loop's loads and compute apart first")
    parser.add_argument("--fp8", action="store_true", help="also time the FP8 inference forward")
    parser.add_argument("--smoke", action="store_true", help="the tiny shape at ρ=0.5 only (CPU: TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.sparsity = ["smoke"], [0.5]
    if DEVICE == "cpu" and not (args.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        raise SystemExit("no CUDA GPU: only the smoke run works here, under the Triton interpreter: "
                         "TRITON_INTERPRET=1 python benchmarks/bench_attention.py --smoke")
    tma = "TMA" if vsa_triton.tma_available(torch.empty(1, 64, 1, 128, device=DEVICE)) else "pointer"
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)"
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}, VSA tile loads: "
          f"{tma} (set {vsa_triton.TMA_ENV}=0 for pointer gathers)")
    if args.sweep:
        sweep("1.3B-480p", 0.9)
    if args.profile:
        profile_op("1.3B-480p", 0.9)
    if args.bound:
        for name in args.shapes:
            bound_probe(name, 0.9)
    rows = [row for name in args.shapes for row in run_shape(name, args.sparsity, args.fp8)]
    print("\nshape       ρ    dense fwd/f+b ms   VSA op fwd/f+b ms   speedup fwd/f+b   fine fwd/f+b ms   "
          "fine sparse TF/s fwd/f+b  (tile TF/s)")
    for r in rows:
        print(f"{r['shape']:<10} {r['sparsity']:.1f}  {r['dense_fwd']:7.2f} /{r['dense_fb']:7.2f}   "
              f"{r['op_fwd']:7.3f} /{r['op_fb']:7.3f}    {r['dense_fwd'] / r['op_fwd']:5.2f}x /{r['dense_fb'] / r['op_fb']:5.2f}x"
              f"   {r['fine_fwd']:6.3f} /{r['fine_fb']:6.3f}    {r['tfs_fwd']:4.0f} / {r['tfs_fb']:4.0f}"
              f"  ({r['tile_fwd']:.0f} / {r['tile_fb']:.0f})")
    print("\nbox sizes by tile size vs every tile a 64-row box (fine kernels, same selection, same run):")
    for r in rows:
        print(f"{r['shape']:<10} {r['sparsity']:.1f}  fwd {r['full_fwd']:.3f} -> {r['fine_fwd']:.3f} ms "
              f"({r['full_fwd'] / r['fine_fwd']:.2f}x), fwd+bwd {r['full_fb']:.3f} -> {r['fine_fb']:.3f} ms "
              f"({r['full_fb'] / r['fine_fb']:.2f}x)")
    if args.fp8:
        print("\nFP8 inference forward (e4m3 q, k, v; fine includes its quantization pass) vs bf16, same run:")
        print("shape       ρ    op bf16 -> fp8 ms          fine bf16 -> fp8 ms (quant ms)   fine fp8 sparse TF/s   "
              "dense / fp8 op")
        for r in rows:
            f = r["fp8"]
            print(f"{r['shape']:<10} {r['sparsity']:.1f}  {r['op_fwd']:6.3f} -> {f['op']:6.3f} ({r['op_fwd'] / f['op']:.2f}x)"
                  f"   {r['fine_fwd']:6.3f} -> {f['fine']:6.3f} ({f['quant']:.3f})   {f['tfs']:5.0f}"
                  f"                  {r['dense_fwd'] / f['op']:5.2f}x")


if __name__ == "__main__":
    main()
