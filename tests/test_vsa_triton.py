"""VSA Triton kernels under the Triton interpreter (CPU, fp32) against the pure-torch reference.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels, i.e. before attention.vsa_triton is first
imported. Other test modules import attention.vsa in the main pytest process, so the kernel checks run in a child
pytest process with the variable set: in the main process this module holds one test that launches the child and
fails with the child's report; in the child (TRITON_INTERPRET=1) it holds the kernel checks themselves.
fp32 throughout: the interpreter computes bf16 `tl.dot` wrongly.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from tests.interpreter import run_under_interpreter

if os.environ.get("TRITON_INTERPRET") != "1":

    # Two halves of similar length (~75 s each on one core, 2026-12-03), so the two xdist workers share them.
    @pytest.mark.slow
    @pytest.mark.parametrize("select", ["kernel_path or fine_kernels", "not kernel_path and not fine_kernels"])
    def test_kernels_under_triton_interpreter(select):
        run_under_interpreter(__file__, select=select)

else:
    from attention import vsa_triton
    from attention.vsa import (coarse_attention, select_tiles, tile_means, vsa_attention_kernels, vsa_meta,
                               vsa_reference)

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

    @pytest.mark.parametrize("tma, boxes", [(True, (64, 32, 16)), (False, (64, 32, 16)), (True, (64, 64, 64)),
                                            (False, (64, 64, 16))])
    def test_fine_kernels_with_arbitrary_selection(tma, boxes):
        """Fine forward/backward with a random (unsorted, non-top-k) selection vs dense masked attention, with kv /
        q tiles read through TMA descriptors (rows past a partial tile: the next tile's or batch's, or zeros past the
        end) and through pointer gathers, as boxes of 64/32/16 rows by tile size or all as full 64-row boxes."""
        grid, B, H, D, topk = (5, 6, 7), 2, 2, 64, 5  # tiles of 64, 48, 32, 24, 16, 12, 8, 6 tokens
        meta = vsa_meta(grid, 0.5, "cpu")
        N, L = meta.num_tiles, math.prod(grid)
        gen = torch.Generator().manual_seed(5)
        q2k = torch.stack([torch.randperm(N, generator=gen)[:topk] for _ in range(B * H * N)])
        q2k = q2k.view(B, H, N, topk).to(torch.int32)
        q, k, v = random_inputs(B, L, H, D, 3, seed=6)
        grad_out = torch.randn_like(q)
        config = (4, 2)
        sel = vsa_triton.sort_by_box(q2k, meta.tile_offsets, boxes)
        out, _, lse = vsa_triton.fine_forward(q.detach(), k.detach(), v.detach(), *sel, meta.tile_offsets, config,
                                              tma=tma, boxes=boxes)
        dq, dk, dv, _, _ = vsa_triton.fine_backward(grad_out, q.detach(), k.detach(), v.detach(), out, lse, *sel,
                                                    meta.tile_offsets, (config, config), tma=tma, boxes=boxes)
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

    def test_sort_by_box_groups_tiles_by_box_then_start():
        meta = vsa_meta((5, 6, 7), 0.5, "cpu")  # 8 tiles: sizes 64, 48, 32, 24, 16, 12, 8, 6 (some twice)
        sizes = meta.tile_sizes.long()
        q2k = torch.randperm(meta.num_tiles, generator=torch.Generator().manual_seed(3))[:6].view(1, 1, 1, 6).int()
        packed, ends = vsa_triton.sort_by_box(q2k, meta.tile_offsets, (64, 32, 16))
        starts, got_sizes = packed.long() >> 7, packed.long() & 127
        chosen = q2k.flatten().long()
        assert sorted(zip(starts.flatten().tolist(), got_sizes.flatten().tolist())) == sorted(
            zip(meta.tile_offsets.long()[chosen].tolist(), sizes[chosen].tolist()))
        box = [64 if s > 32 else 32 if s > 16 else 16 for s in got_sizes.flatten().tolist()]
        e0, e1 = ends.flatten().tolist()
        assert box == [64] * e0 + [32] * (e1 - e0) + [16] * (6 - e1)
        for lo, hi in ((0, e0), (e0, e1), (e1, 6)):  # memory order inside a box group
            assert starts.flatten()[lo:hi].tolist() == sorted(starts.flatten()[lo:hi].tolist())
        slot_words, slot_ends = vsa_triton.sort_by_box(q2k, meta.tile_offsets, (64, 32, 16), slots=True)
        tiles = torch.searchsorted(meta.tile_offsets.long(), starts, right=True) - 1  # same order, 64 · tile words
        assert torch.equal(slot_words.long(), (tiles * 64) << 7 | got_sizes) and torch.equal(slot_ends, ends)

    def test_selection_matches_float64_topk():
        """Selected tiles == top-k of float64 tile-mean scores computed from raster coordinates."""
        grid, B, H, D = (5, 6, 7), 2, 3, 64
        meta = vsa_meta(grid, 0.7, "cpu")
        q, k, v = (x.detach() for x in random_inputs(B, math.prod(grid), H, D, 3, seed=7))
        qm, km, vm = torch.ops.sparse_distill.vsa_tile_means(q, k, v, meta.tile_offsets)
        _, scores = coarse_attention(qm, km, vm)
        chosen = select_tiles(scores, meta.topk)
        packed, ends = torch.ops.sparse_distill.vsa_select(scores, meta.topk, meta.tile_offsets)  # the kernel path
        fused = torch.searchsorted(meta.tile_offsets, packed >> 7, right=True) - 1

        T, Hh, W = grid
        t, h, w = torch.meshgrid(torch.arange(T), torch.arange(Hh), torch.arange(W), indexing="ij")
        tile_of = ((t // 4) * 2 * 2 + (h // 4) * 2 + w // 4).flatten()  # raster token -> tile (2×2×2 tiles)
        raster_q, raster_k = q[:, meta.token_restore].double(), k[:, meta.token_restore].double()
        qbar = torch.stack([raster_q[:, tile_of == n].mean(1) for n in range(8)], 1)  # (B, N, H, D)
        kbar = torch.stack([raster_k[:, tile_of == n].mean(1) for n in range(8)], 1)
        ref_scores = torch.einsum("bnhd,bmhd->bhnm", qbar, kbar) / math.sqrt(D)
        expected = ref_scores.topk(meta.topk, dim=-1).indices.sort(-1).values
        assert torch.equal(chosen.long().sort(-1).values, expected)
        assert torch.equal(fused.long().sort(-1).values, expected)
        assert torch.equal(packed.long() & 127, meta.tile_sizes.long()[fused])
        for a, b in zip(vsa_triton.sort_by_box(fused, meta.tile_offsets), (packed, ends)):
            assert torch.equal(a, b)
        assert torch.allclose(scores.double(), ref_scores, atol=1e-5)

    @pytest.mark.parametrize("B, H, N, topk", [(2, 3, 8, 3), (1, 1, 300, 30), (1, 2, 40, 40), (1, 2, 40, 1)])
    def test_fused_selection_equals_topk_with_ties(B, H, N, topk):
        """The fused select kernel: the same set as torch.topk, ties (repeated and ±0 / negative scores) broken
        towards low tile ids with exactly `topk` taken, grouped by box and in memory order inside a group."""
        gen = torch.Generator().manual_seed(N + topk)
        scores = torch.randint(-6, 6, (B, H, N, N), generator=gen).float() / 4  # many exact ties, negatives, zeros
        sizes = torch.randint(1, 65, (N,), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).int()
        packed, ends = vsa_triton.select_by_box(scores, topk, offsets)
        ids = (torch.searchsorted(offsets, packed >> 7, right=True) - 1).long()
        got = scores.gather(-1, ids)
        kth = scores.topk(topk, dim=-1).values[..., -1:]
        assert (got >= kth).all()  # a top-k set: nothing below the k-th value
        assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct tiles
        assert torch.equal(got.sort(-1).values, scores.topk(topk, dim=-1).values.sort(-1).values)
        ties_taken = (got == kth).sum(-1)
        rows = [(b, h, n) for b in range(B) for h in range(H) for n in range(0, N, max(1, N // 7))]
        ties_lowest = [(scores[r] == kth[r]).nonzero().flatten()[:ties_taken[r]] for r in rows]
        picked = [ids[r][got[r] == kth[r]].sort().values for r in rows]
        assert all(torch.equal(a, p) for a, p in zip(ties_lowest, picked))
        for a, b in zip(vsa_triton.sort_by_box(ids.int(), offsets), (packed, ends)):  # grouped by box, memory order
            assert torch.equal(a, b)

    def test_invert_selection():
        gen = torch.Generator().manual_seed(8)
        B, H, N, topk = 2, 3, 7, 3
        q2k = torch.stack([torch.randperm(N, generator=gen)[:topk] for _ in range(B * H * N)])
        q2k = q2k.view(B, H, N, topk).to(torch.int32)
        rank = torch.tensor([0, 2, 1, 0, 2, 2, 1])
        k2q, offsets = vsa_triton.invert_selection(q2k)
        k2q_r, offsets_r = vsa_triton.invert_selection(q2k, rank)
        for b in range(B):
            for h in range(H):
                for j in range(N):
                    g = (b * H + h) * N + j
                    chose_j = [i for i in range(N) if j in q2k[b, h, i].tolist()]
                    assert k2q[offsets[g]:offsets[g + 1]].tolist() == chose_j
                    for r in range(3):  # with ranks: runs per (kv tile, rank), ascending q inside
                        got = k2q_r[offsets_r[3 * g + r]:offsets_r[3 * g + r + 1]].tolist()
                        assert got == [i for i in chose_j if rank[i] == r]

    def e4m3_exact(B, L, H, D, amax_dim, seed):
        """Random values e4m3 represents exactly, the max |x| of each slice over amax_dim (rows: 3; channels: 1; heads:
        (1, 3)) 448 times its own power of two: the kernels' scales are then powers of two and quantizing is lossless."""
        gen = torch.Generator().manual_seed(seed)
        x = (torch.randn(B, L, H, D, generator=gen).clamp(-3.4, 3.4) * 128).to(torch.float8_e4m3fn).float()
        dims = amax_dim if isinstance(amax_dim, tuple) else (amax_dim,)
        peak = x.new_zeros(x.shape, dtype=torch.bool)
        peak[tuple(0 if d in dims else slice(None) for d in range(4))] = True
        x = torch.where(peak, 448.0, x)  # the max of every (amax_dim)-slice
        power = torch.randint(-9, -4, tuple(1 if d in dims else n for d, n in enumerate(x.shape)), generator=gen)
        return x * 2.0 ** power.float()

    @pytest.mark.parametrize("grid, D", [((5, 6, 7), 64), ((3, 5, 9), 128)])
    def test_fp8_forward_matches_reference_up_to_p_rounding(grid, D):
        """FP8 fine kernel (inference) on inputs e4m3 holds exactly: the quantized slots dequantize to the inputs
        exactly (zeros past each tile's size), so only P's e4m3 rounding separates the output from the reference
        (the interpreter truncates that cast: ~2 % here; 3 mantissa bits)."""
        B, H = 2, 2
        meta = vsa_meta(grid, 0.5, "cpu")
        L, N = math.prod(grid), meta.num_tiles
        q = e4m3_exact(B, L, H, D, 3, seed=1)
        k = e4m3_exact(B, L, H, D, (1, 3), seed=2)  # k: one scale per tile, exact if every tile reaches the head's max
        k[:, meta.tile_offsets[:-1].long()] = k.abs().amax(dim=(1, 3), keepdim=True)  # (tile row 0 holds it)
        v = e4m3_exact(B, L, H, D, 1, seed=3)
        gate = torch.randn(B, L, H, D)
        q8, qs, k8, ks, vt8, vs = vsa_triton.quantize_qkv_fp8(q, k, v, meta.tile_offsets)
        slots = [(q8.float() * qs[..., None]).unflatten(2, (N, 64)),
                 k8.float().unflatten(2, (N, 64)) * ks[..., None, None]]
        slots.append((vt8.float() * vs[..., None]).transpose(2, 3).unflatten(2, (N, 64)))  # (B, H, N, 64, D)
        for tile in range(N):
            lo, hi = meta.tile_offsets[tile].item(), meta.tile_offsets[tile + 1].item()
            for x, slot in zip((q, k, v), slots):
                assert torch.equal(slot[:, :, tile, :hi - lo].transpose(1, 2), x[:, lo:hi])
                assert not slot[:, :, tile, hi - lo:].any()
        # k's per-tile scales where tile maxima differ: tile max / 448 (the values' rounding: tests/test_vsa_gpu.py,
        # as the interpreter's e4m3 cast does not round to nearest)
        k_rand = torch.randn(B, L, H, D) * torch.rand(1, L, 1, 1) * 4
        ks_rand = vsa_triton.quantize_qkv_fp8(q, k_rand, v, meta.tile_offsets)[3]
        for tile in range(N):
            lo, hi = meta.tile_offsets[tile].item(), meta.tile_offsets[tile + 1].item()
            assert torch.allclose(ks_rand[:, :, tile], k_rand[:, lo:hi].abs().amax(dim=(1, 3)) / 448, rtol=1e-6, atol=0)
        qm, km, vm = vsa_triton.tile_means(q, k, v, meta.tile_offsets)
        coarse, scores = coarse_attention(qm, km, vm)
        sel, ends = vsa_triton.select_by_box(scores, meta.topk, meta.tile_offsets, vsa_triton.FP8_BOXES, slots=True)
        ids = vsa_triton.select_by_box(scores, meta.topk, meta.tile_offsets, vsa_triton.FP8_BOXES)[0]
        assert torch.equal(sel >> 7, (torch.searchsorted(meta.tile_offsets, ids >> 7, right=True) - 1) * 64)
        out = vsa_triton.fine_forward_fp8(q, k, v, sel, ends, meta.tile_offsets, gate=gate, coarse=coarse)
        ref = vsa_reference(q, k, v, meta, gate)
        assert 1e-4 < rel_err(out, ref) <= 0.04
        assert torch.equal(torch.ops.sparse_distill.vsa_fp8(q, k, v, gate, meta.tile_offsets, meta.topk), out)
        with pytest.raises(ValueError, match="at least 32 rows"):
            vsa_triton.fine_forward_fp8(q, k, v, sel, ends, meta.tile_offsets, boxes=(64, 32, 16))

    def test_tile_means_op_backward_equals_torch_tile_means():
        # The gated critic's coarse branch on CUDA (dense_gated_attention) differentiates through this op.
        meta = vsa_meta((3, 5, 9), 0.0, "cpu")  # tiles of 48, 12 and 3 tokens
        leaves = random_inputs(2, 135, 2, 64, 3, seed=11)
        twins = [x.detach().clone().requires_grad_() for x in leaves]
        w = [torch.randn(2, meta.num_tiles, 2, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        means = torch.ops.sparse_distill.vsa_tile_means(*leaves, meta.tile_offsets)
        sum((m * wi).sum() for m, wi in zip(means, w)).backward()
        ref = tile_means(*twins, meta)  # CPU tensors: the torch form (index_add), differentiated by autograd
        sum((m * wi).sum() for m, wi in zip(ref, w)).backward()
        for name, a, b, x, y in zip("qkv", means, ref, leaves, twins):
            assert rel_err(a, b) < 1e-6 and rel_err(x.grad, y.grad) < 1e-6, name

    def test_custom_ops_pass_opcheck():
        meta = vsa_meta((3, 5, 9), 0.5, "cpu")
        q, k, v = (x.detach().requires_grad_() for x in random_inputs(1, 135, 1, 64, 3, seed=9))
        scores = torch.randn(1, 1, meta.num_tiles, meta.num_tiles)
        torch.library.opcheck(torch.ops.sparse_distill.vsa_select.default, (scores, meta.topk, meta.tile_offsets))
        sel, ends = torch.ops.sparse_distill.vsa_select(scores, meta.topk, meta.tile_offsets)
        torch.library.opcheck(torch.ops.sparse_distill.vsa_fine.default, (q, k, v, sel, ends, meta.tile_offsets))
        gate = torch.randn_like(q, requires_grad=True)
        torch.library.opcheck(torch.ops.sparse_distill.vsa_gated.default, (q, k, v, gate, meta.tile_offsets, meta.topk))
        torch.library.opcheck(torch.ops.sparse_distill.vsa_tile_means.default, (q, k, v, meta.tile_offsets))
        torch.library.opcheck(torch.ops.sparse_distill.vsa_fp8.default,  # inference op: no autograd
                              (q.detach(), k.detach(), v.detach(), gate.detach(), meta.tile_offsets, meta.topk))
