"""Benchmark VSA against cuDNN dense SDPA at Wan shapes on one GPU.

    python tools/bench_attention.py            # all shapes, ρ ∈ {0.8, 0.9}
    python tools/bench_attention.py --sweep    # first sweep the kernel launch configs at 1.3B-480p ρ=0.9
    python tools/bench_attention.py --shapes 1.3B-480p --sparsity 0.9

For each shape and sparsity: ms of the forward and forward+backward of (a) cuDNN SDPA dense on the same q/k/v,
(b) the whole VSA op (tile means, coarse attention, top-k, fine kernels, gate), (c) the fine kernels alone (the
backward includes inverting the selection). Sparse TF/s counts only the selected work:
FLOPs_fwd = 4·B·H·D·Σ_q-tiles(q tokens × selected kv tokens), backward 2.5× that. Medians of triton.testing.do_bench.
The ratio table is printed last.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention import vsa_triton
from attention.vsa import coarse_attention, select_tiles, vsa_attention, vsa_meta

SHAPES = {  # name -> (token grid, heads); head dim 128
    "1.3B-480p": ((21, 30, 52), 12),
    "14B-720p": ((21, 45, 80), 40),
    "5B-720p": ((31, 22, 40), 24),
}
HEAD_DIM = 128


def bench(fn, grads=()) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=200, grad_to_none=list(grads), return_mode="median")


def sparse_flops(q2k: torch.Tensor, meta) -> float:
    """4·B·H·D·Σ_q-tiles(q tokens × selected kv tokens)."""
    sizes = meta.tile_sizes.double()
    kv_tokens = sizes[q2k.long()].sum(-1)  # (B, H, N)
    return 4.0 * HEAD_DIM * float((kv_tokens * sizes).sum())


def make_qkv(grid, heads, seed=0):
    L = math.prod(grid)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, L, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(4)]


def selection(q, k, v, meta):
    qm, km, vm = vsa_triton.tile_means(q, k, v, meta.tile_offsets)
    _, scores = coarse_attention(qm, km, vm, meta.token_tile, q.dtype)
    return select_tiles(scores, meta.topk)


def time_fine(q, k, v, q2k, meta, fwd_config=None, bwd_config=None) -> tuple[float, float]:
    offs = meta.tile_offsets
    do = torch.randn_like(q)
    fwd = bench(lambda: vsa_triton.fine_forward(q, k, v, q2k, offs, fwd_config))

    def fwd_bwd():
        o, lse = vsa_triton.fine_forward(q, k, v, q2k, offs, fwd_config)
        vsa_triton.fine_backward(do, q, k, v, o, lse, q2k, offs, bwd_config)

    return fwd, bench(fwd_bwd)


def sweep(name: str, sparsity: float) -> None:
    grid, heads = SHAPES[name]
    meta = vsa_meta(grid, sparsity, "cuda")
    q, k, v, _ = make_qkv(grid, heads)
    q2k = selection(q, k, v, meta)
    flops = sparse_flops(q2k, meta)
    offs = meta.tile_offsets
    print(f"sweep {name} ρ={sparsity}: forward (num_warps, num_stages) -> ms, sparse TF/s")
    best_fwd = None
    for cfg in [(4, 2), (4, 3), (4, 4), (4, 5), (8, 2), (8, 3), (8, 4)]:
        ms = bench(lambda: vsa_triton.fine_forward(q, k, v, q2k, offs, cfg))
        print(f"  fwd {cfg}: {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s")
        best_fwd = min(best_fwd or (ms, cfg), (ms, cfg))
    o, lse = vsa_triton.fine_forward(q, k, v, q2k, offs)
    do = torch.randn_like(q)
    base_dkdv = vsa_triton.BWD_CONFIG[HEAD_DIM][1]
    results = {}
    for cfg in [(4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3)]:
        results[cfg] = bench(lambda: vsa_triton.fine_backward(do, q, k, v, o, lse, q2k, offs, (cfg, base_dkdv)))
        print(f"  bwd dq {cfg} + dkdv {base_dkdv}: {results[cfg]:.3f} ms")
    best_dq = min(results, key=results.get)
    for cfg in [(4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3)]:
        ms = bench(lambda: vsa_triton.fine_backward(do, q, k, v, o, lse, q2k, offs, (best_dq, cfg)))
        print(f"  bwd dq {best_dq} + dkdv {cfg}: {ms:.3f} ms {2.5 * flops / ms / 1e9:.0f} TF/s")
    print(f"best fwd {best_fwd}")


def run_shape(name: str, sparsities: list[float]) -> list[dict]:
    grid, heads = SHAPES[name]
    q, k, v, gate = make_qkv(grid, heads)
    gate.mul_(0.1)
    L = q.shape[1]
    rows = []
    # cuDNN dense SDPA on the same q/k/v, (B, H, L, D) views.
    qd, kd, vd = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    do_dense = torch.randn_like(qd)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense_fwd = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd))
        dense_fb = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd).backward(do_dense), (qd, kd, vd))
    dense_flops = 4.0 * heads * HEAD_DIM * L * L
    print(f"{name}: L={L} heads={heads} cuDNN dense fwd {dense_fwd:.2f} ms ({dense_flops / dense_fwd / 1e9:.0f} TF/s)"
          f" fwd+bwd {dense_fb:.2f} ms ({3.5 * dense_flops / dense_fb / 1e9:.0f} TF/s)")
    for sparsity in sparsities:
        meta = vsa_meta(grid, sparsity, "cuda")
        q2k = selection(q, k, v, meta)
        flops = sparse_flops(q2k, meta)
        fine_fwd, fine_fb = time_fine(q, k, v, q2k, meta)
        qg, kg, vg, gg = (x.detach().requires_grad_() for x in (q, k, v, gate))
        do = torch.randn_like(q)
        op_fwd = bench(lambda: vsa_attention(q, k, v, meta, gate))
        op_fb = bench(lambda: vsa_attention(qg, kg, vg, meta, gg).backward(do), (qg, kg, vg, gg))
        row = dict(shape=name, sparsity=sparsity, topk=meta.topk, tiles=meta.num_tiles, dense_fwd=dense_fwd,
                   dense_fb=dense_fb, op_fwd=op_fwd, op_fb=op_fb, fine_fwd=fine_fwd, fine_fb=fine_fb,
                   tfs_fwd=flops / fine_fwd / 1e9, tfs_fb=3.5 * flops / fine_fb / 1e9)
        print(f"  ρ={sparsity} topk={meta.topk}/{meta.num_tiles}: VSA op fwd {op_fwd:.3f} ms, fwd+bwd {op_fb:.3f} ms;"
              f" fine fwd {fine_fwd:.3f} ms ({row['tfs_fwd']:.0f} TF/s), fwd+bwd {fine_fb:.3f} ms"
              f" ({row['tfs_fb']:.0f} TF/s)")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.8, 0.9])
    parser.add_argument("--sweep", action="store_true", help="sweep launch configs at 1.3B-480p ρ=0.9 first")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if args.sweep:
        sweep("1.3B-480p", 0.9)
    rows = [row for name in args.shapes for row in run_shape(name, args.sparsity)]
    print("\nshape       ρ    dense fwd/f+b ms   VSA op fwd/f+b ms   speedup fwd/f+b   fine fwd/f+b ms   "
          "fine sparse TF/s fwd/f+b")
    for r in rows:
        print(f"{r['shape']:<10} {r['sparsity']:.1f}  {r['dense_fwd']:7.2f} /{r['dense_fb']:7.2f}   "
              f"{r['op_fwd']:7.3f} /{r['op_fb']:7.3f}    {r['dense_fwd'] / r['op_fwd']:5.2f}x /{r['dense_fb'] / r['op_fb']:5.2f}x"
              f"   {r['fine_fwd']:6.3f} /{r['fine_fb']:6.3f}    {r['tfs_fwd']:4.0f} / {r['tfs_fb']:4.0f}")


if __name__ == "__main__":
    main()
