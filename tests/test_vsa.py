"""VSA metadata, reference math and input checks on CPU (the Triton kernels: tests/test_vsa_triton.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from attention.vsa import vsa_attention, vsa_attention_kernels, vsa_masked, vsa_meta, vsa_reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def raster_tiles(grid, tile=(4, 4, 4)) -> torch.Tensor:
    """Tile id of every raster-order token, from its coordinates (independent of vsa_meta)."""
    T, H, W = grid
    nh, nw = -(-H // tile[1]), -(-W // tile[2])
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    return ((t // tile[0]) * nh * nw + (h // tile[1]) * nw + w // tile[2]).flatten()


def bruteforce_vsa(q, k, v, gate, grid, topk):
    """float64 VSA on raster-order tokens: every query attends the tokens of its `topk` best tiles."""
    q, k, v, gate = (x.double() for x in (q, k, v, gate))
    B, L, H, D = q.shape
    tile_of = raster_tiles(grid)
    N = int(tile_of.max()) + 1
    means = [torch.stack([x[:, tile_of == n].mean(1) for n in range(N)], 1) for x in (q, k, v)]  # (B, N, H, D)
    scores = torch.einsum("bnhd,bmhd->bhnm", means[0], means[1]) / math.sqrt(D)
    coarse = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), means[2])[:, tile_of]  # (B, L, H, D)
    chosen = scores.topk(topk, dim=-1).indices  # (B, H, N, topk)
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                keys = torch.isin(tile_of, chosen[b, h, tile_of[i]])
                p = (q[b, i, h] @ k[b, keys, h].T / math.sqrt(D)).softmax(-1)
                out[b, i, h] = p @ v[b, keys, h]
    return out + gate * coarse


@pytest.mark.parametrize("grid", [(5, 6, 7), (3, 5, 9), (8, 4, 12), (1, 1, 1)])
def test_meta_tiles_are_cubes_in_raster_order(grid):
    meta = vsa_meta(grid, 0.5, "cpu")
    L = math.prod(grid)
    order = meta.token_order
    assert sorted(order.tolist()) == list(range(L))
    assert torch.equal(order[meta.token_restore], torch.arange(L))
    tile_of = raster_tiles(grid)
    # Tokens in tile order: tile ids ascending, raster index ascending inside each tile.
    assert torch.equal(tile_of[order], meta.token_tile)
    assert torch.all(tile_of[order].diff() >= 0)
    same_tile = meta.token_tile.diff() == 0
    assert torch.all(order.diff()[same_tile] > 0)
    assert torch.equal(meta.tile_sizes.long(), torch.bincount(tile_of, minlength=meta.num_tiles))
    assert torch.equal(meta.tile_offsets.long(), F.pad(torch.cumsum(meta.tile_sizes.long(), 0), (1, 0)))
    assert meta.num_tiles == math.prod(-(-n // 4) for n in grid)


@pytest.mark.parametrize("grid, tiles, topk8, topk9", [  # docs/METHOD.md §2.12 worked sizes (HEAD topk)
    ((21, 30, 52), 624, 125, 63), ((21, 45, 80), 1440, 288, 144), ((31, 22, 40), 480, 96, 48),
    ((20, 28, 52), 455, 91, 46)])
def test_meta_topk_matches_spec_table(grid, tiles, topk8, topk9):
    assert vsa_meta(grid, 0.8, "cpu").num_tiles == tiles
    assert vsa_meta(grid, 0.8, "cpu").topk == topk8
    assert vsa_meta(grid, 0.9, "cpu").topk == topk9
    assert vsa_meta(grid, 0.0, "cpu").topk == tiles
    assert vsa_meta(grid, 0.9999999, "cpu").topk == 1


def test_meta_is_cached():
    assert vsa_meta((5, 6, 7), 0.5, "cpu") is vsa_meta([5, 6, 7], 0.5, torch.device("cpu"))
    assert vsa_meta((5, 6, 7), 0.5, "cpu") is not vsa_meta((5, 6, 7), 0.6, "cpu")


def test_dense_when_sparsity_zero_and_gate_zero():
    torch.manual_seed(0)
    B, H, D, grid = 2, 3, 32, (5, 6, 7)
    L = math.prod(grid)
    q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
    out = vsa_attention(q, k, v, vsa_meta(grid, 0.0, "cpu"), torch.zeros_like(q))
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert rel_err(out, dense) <= 1e-5


@pytest.mark.parametrize("grid, sparsity", [((5, 6, 7), 0.6), ((3, 5, 9), 0.5)])
def test_reference_matches_raster_bruteforce(grid, sparsity):
    torch.manual_seed(1)
    B, H, D = 2, 2, 16
    meta = vsa_meta(grid, sparsity, "cpu")
    L = math.prod(grid)
    q, k, v, gate = (torch.randn(B, L, H, D) for _ in range(4))
    expected = bruteforce_vsa(q, k, v, gate, grid, meta.topk)  # raster order
    tiled = [x[:, meta.token_order] for x in (q, k, v, gate)]
    out = vsa_reference(*tiled[:3], meta, tiled[3])[:, meta.token_restore]
    assert 0 < meta.topk < meta.num_tiles
    assert rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("gated", [True, False])
def test_masked_matches_raster_bruteforce_with_gradients(gated):
    """vsa_masked (the toy's GPU path: SDPA with a tile mask) against the raster brute force, values and gradients."""
    torch.manual_seed(3)
    B, H, D, grid = 2, 2, 16, (5, 6, 7)
    meta = vsa_meta(grid, 0.6, "cpu")
    L = math.prod(grid)
    q, k, v, gate = (torch.randn(B, L, H, D, requires_grad=True) for _ in range(4))
    grad_out = torch.randn(B, L, H, D)
    expected = bruteforce_vsa(q, k, v, gate if gated else torch.zeros_like(gate), grid, meta.topk)
    want = torch.autograd.grad(expected, (q, k, v), grad_out)
    tiled = [x[:, meta.token_order] for x in (q, k, v, gate)]
    out = vsa_masked(*tiled[:3], meta, tiled[3] if gated else None)[:, meta.token_restore]
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    assert 0 < meta.topk < meta.num_tiles
    assert rel_err(out, expected) <= 1e-5
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-4


def test_gate_gradient_is_coarse_output():
    torch.manual_seed(2)
    B, H, D, grid = 1, 2, 16, (5, 6, 7)
    meta = vsa_meta(grid, 0.5, "cpu")
    L = math.prod(grid)
    q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
    gate = torch.zeros(B, L, H, D, requires_grad=True)
    grad_out = torch.randn(B, L, H, D)
    vsa_reference(q, k, v, meta, gate).backward(grad_out)
    # d out / d gate = coarse = out(gate=1) - out(gate=0)
    coarse = vsa_reference(q, k, v, meta, torch.ones_like(q)) - vsa_reference(q, k, v, meta, None)
    assert rel_err(gate.grad, grad_out * coarse) <= 1e-5
    # Coarse is the per-tile softmax over tile means: constant inside each tile.
    for n in range(meta.num_tiles):
        rows = coarse[:, meta.token_tile == n]
        assert torch.allclose(rows, rows[:, :1].expand_as(rows), atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    meta = vsa_meta((5, 6, 7), 0.5, "cpu")
    q = torch.randn(1, 210, 2, 64)
    with pytest.raises(ValueError, match="sequence length 209"):
        vsa_attention(q[:, :209], q[:, :209], q[:, :209], meta)
    with pytest.raises(ValueError, match="head dim 64 or 128, got 96"):
        x = torch.randn(1, 210, 2, 96)
        vsa_attention_kernels(x, x, x, meta)
    with pytest.raises(TypeError, match="k dtype"):
        vsa_attention(q, q.double(), q, meta)
    with pytest.raises(ValueError, match="gate shape"):
        vsa_attention(q, q, q, meta, q[..., :32])
    for bad in (1.0, -0.1, 1.5, "0.5", None, True):
        with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
            vsa_meta((5, 6, 7), bad, "cpu")
    for bad in ((5, 6), (5, 0, 7), (5, 6.0, 7), (5, -1, 7), "567"):
        with pytest.raises(ValueError, match="VSA grid must be three positive ints"):
            vsa_meta(bad, 0.5, "cpu")
    with pytest.raises(TypeError, match="meta from vsa_meta"):
        vsa_attention(q, q, q, {"grid": (5, 6, 7)})
