"""VSA Triton kernels under the Triton interpreter (CPU, fp32) against the pure-torch reference.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels, i.e. before attention.vsa_triton is first
imported. Other test modules import attention.vsa in the main pytest process, so the kernel checks run in a child
pytest process with the variable set: in the main process this module holds one test that launches the child and
fails with the child's report; in the child (TRITON_INTERPRET=1) it holds the kernel checks themselves.
fp32 throughout: the interpreter computes bf16 `tl.dot` wrongly.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":

    def test_kernels_under_triton_interpreter():
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        assert " passed" in result.stdout and "failed" not in result.stdout

else:
    from attention import vsa_triton
    from attention.vsa import (coarse_attention, select_tiles, vsa_attention_kernels, vsa_meta, vsa_reference)

    def rel_err(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    def random_inputs(B, L, H, D, n, seed):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(B, L, H, D, generator=gen, requires_grad=True) for _ in range(n)]

    @pytest.mark.parametrize("grid, B, H, D, sparsity, use_gate", [
        ((5, 6, 7), 2, 2, 64, 0.6, True),   # tiles of 64, 48, 32, 24, 16, 12, 8, 6 tokens
        ((3, 5, 9), 2, 2, 128, 0.5, True),  # tiles of 48, 12, 3 tokens
        ((3, 5, 9), 2, 2, 64, 0.5, False),
        ((8, 4, 8), 1, 2, 64, 0.5, True),   # full tiles only
    ])
    def test_kernel_path_matches_reference(grid, B, H, D, sparsity, use_gate):
        meta = vsa_meta(grid, sparsity, "cpu")
        assert 1 < meta.topk < meta.num_tiles
        q, k, v, gate = random_inputs(B, math.prod(grid), H, D, 4, seed=sum(grid) + D)
        inputs = (q, k, v, gate) if use_gate else (q, k, v)
        grad_out = torch.randn_like(q)
        out = vsa_attention_kernels(q, k, v, meta, gate if use_gate else None)
        grads = torch.autograd.grad(out, inputs, grad_out)
        ref = vsa_reference(q, k, v, meta, gate if use_gate else None)
        ref_grads = torch.autograd.grad(ref, inputs, grad_out)
        assert rel_err(out, ref) <= 1e-5
        for name, g, rg in zip("qkvg", grads, ref_grads):
            assert rel_err(g, rg) <= 1e-5, name

    @pytest.mark.parametrize("grid, D", [((5, 6, 7), 64), ((3, 5, 9), 128)])
    def test_kernel_path_dense_at_sparsity_zero(grid, D):
        B, H = 2, 2
        q, k, v = random_inputs(B, math.prod(grid), H, D, 3, seed=D)
        out = vsa_attention_kernels(q, k, v, vsa_meta(grid, 0.0, "cpu"), torch.zeros_like(q))
        dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
        assert rel_err(out, dense) <= 1e-5

    @pytest.mark.parametrize("tiles_per_step, tma", [(1, True), (1, False), (2, False)])
    def test_fine_kernels_with_arbitrary_selection(tiles_per_step, tma):
        """Fine forward/backward with a random (unsorted, non-top-k) selection vs dense masked attention, with kv /
        q tiles read through TMA descriptors (rows past a partial tile: the next tile's or batch's, or zeros past the
        end) and through pointer gathers."""
        grid, B, H, D, topk = (3, 5, 9), 2, 2, 64, 3  # odd topk: the last two-tile step has an empty slot
        meta = vsa_meta(grid, 0.5, "cpu")
        N, L = meta.num_tiles, math.prod(grid)
        gen = torch.Generator().manual_seed(5)
        q2k = torch.stack([torch.randperm(N, generator=gen)[:topk] for _ in range(B * H * N)])
        q2k = q2k.view(B, H, N, topk).to(torch.int32)
        q, k, v = random_inputs(B, L, H, D, 3, seed=6)
        grad_out = torch.randn_like(q)
        config = (4, 2, tiles_per_step)
        out, _, lse = vsa_triton.fine_forward(q.detach(), k.detach(), v.detach(), q2k, meta.tile_offsets, config,
                                              tma=tma)
        dq, dk, dv, _, _ = vsa_triton.fine_backward(grad_out, q.detach(), k.detach(), v.detach(), out, lse, q2k,
                                                    meta.tile_offsets, (config, config), tma=tma)
        keep = torch.zeros(B, H, N, N, dtype=torch.bool).scatter_(-1, q2k.long(), True)
        keep = keep[:, :, meta.token_tile][:, :, :, meta.token_tile]  # (B, H, L, L)
        logits = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(D)
        ref = torch.einsum("bhlm,bmhd->blhd", logits.masked_fill(~keep, float("-inf")).softmax(-1), v)
        ref_lse = torch.logsumexp(logits.masked_fill(~keep, float("-inf")), -1) / math.log(2)  # base 2
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
        assert rel_err(out, ref) <= 1e-5
        assert rel_err(lse, ref_lse) <= 1e-5
        for name, g, rg in zip("qkv", (dq, dk, dv), ref_grads):
            assert rel_err(g, rg) <= 1e-5, name

    def test_selection_matches_float64_topk():
        """Selected tiles == top-k of float64 tile-mean scores computed from raster coordinates."""
        grid, B, H, D = (5, 6, 7), 2, 3, 64
        meta = vsa_meta(grid, 0.7, "cpu")
        q, k, v = (x.detach() for x in random_inputs(B, math.prod(grid), H, D, 3, seed=7))
        qm, km, vm = torch.ops.sparse_distill.vsa_tile_means(q, k, v, meta.tile_offsets, meta.token_tile)
        _, scores = coarse_attention(qm, km, vm)
        chosen = select_tiles(scores, meta.topk)

        T, Hh, W = grid
        t, h, w = torch.meshgrid(torch.arange(T), torch.arange(Hh), torch.arange(W), indexing="ij")
        tile_of = ((t // 4) * 2 * 2 + (h // 4) * 2 + w // 4).flatten()  # raster token -> tile (2×2×2 tiles)
        raster_q, raster_k = q[:, meta.token_restore].double(), k[:, meta.token_restore].double()
        qbar = torch.stack([raster_q[:, tile_of == n].mean(1) for n in range(8)], 1)  # (B, N, H, D)
        kbar = torch.stack([raster_k[:, tile_of == n].mean(1) for n in range(8)], 1)
        ref_scores = torch.einsum("bnhd,bmhd->bhnm", qbar, kbar) / math.sqrt(D)
        expected = ref_scores.topk(meta.topk, dim=-1).indices.sort(-1).values
        assert torch.equal(chosen.long().sort(-1).values, expected)
        assert torch.allclose(scores.double(), ref_scores, atol=1e-5)

    def test_invert_selection():
        gen = torch.Generator().manual_seed(8)
        B, H, N, topk = 2, 3, 7, 3
        q2k = torch.stack([torch.randperm(N, generator=gen)[:topk] for _ in range(B * H * N)])
        q2k = q2k.view(B, H, N, topk).to(torch.int32)
        k2q, offsets = vsa_triton.invert_selection(q2k)
        for b in range(B):
            for h in range(H):
                for j in range(N):
                    g = (b * H + h) * N + j
                    got = k2q[offsets[g]:offsets[g + 1]].tolist()
                    assert got == [i for i in range(N) if j in q2k[b, h, i].tolist()]

    def test_custom_ops_pass_opcheck():
        meta = vsa_meta((3, 5, 9), 0.5, "cpu")
        q, k, v = (x.detach().requires_grad_() for x in random_inputs(1, 135, 1, 64, 3, seed=9))
        q2k = select_tiles(torch.randn(1, 1, meta.num_tiles, meta.num_tiles), meta.topk)
        torch.library.opcheck(torch.ops.sparse_distill.vsa_fine.default, (q, k, v, q2k, meta.tile_offsets))
        gate = torch.randn_like(q, requires_grad=True)
        coarse = torch.randn(1, 1, meta.num_tiles, 64, requires_grad=True)
        torch.library.opcheck(torch.ops.sparse_distill.vsa_fine_gated.default,
                              (q, k, v, gate, coarse, q2k, meta.tile_offsets))
        torch.library.opcheck(torch.ops.sparse_distill.vsa_tile_means.default,
                              (q, k, v, meta.tile_offsets, meta.token_tile))
