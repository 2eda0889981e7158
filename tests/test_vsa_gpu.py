"""VSA on a CUDA GPU: bf16 kernels vs the fp32 reference at a real shape, torch.compile tracing, CUDA input checks."""

import math

import pytest
import torch

from attention import vsa_triton
from attention.vsa import vsa_attention, vsa_fp8_attention, vsa_meta, vsa_reference

pytestmark = pytest.mark.gpu


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(B, L, H, D, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, L, H, D, device="cuda", dtype=dtype, generator=gen).requires_grad_() for _ in range(4)]


@pytest.mark.parametrize("tma", ["1", "0"])  # TMA descriptor loads (default on sm90+) and pointer gathers
@pytest.mark.parametrize("grid, H, D, sparsity, dtype", [
    ((21, 30, 52), 2, 128, 0.9, torch.bfloat16),  # Wan2.1 480p token grid (624 tiles, ragged edges)
    ((31, 22, 40), 2, 64, 0.8, torch.bfloat16),   # Wan2.2-5B 720p token grid
    ((9, 14, 18), 3, 128, 0.5, torch.float16),
])
def test_kernels_match_reference(grid, H, D, sparsity, dtype, tma, monkeypatch):
    monkeypatch.setenv(vsa_triton.TMA_ENV, tma)
    meta = vsa_meta(grid, sparsity, "cuda")
    q, k, v, gate = make_inputs(1, math.prod(grid), H, D, dtype, seed=sum(grid))
    grad_out = torch.randn_like(q)
    out = vsa_attention(q, k, v, meta, gate)
    grads = torch.autograd.grad(out, (q, k, v, gate), grad_out)
    ref_inputs = [x.detach().float().requires_grad_() for x in (q, k, v, gate)]
    ref = vsa_reference(*ref_inputs[:3], meta, ref_inputs[3])
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.float())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert rel_err(out, ref) <= 1e-2
    for name, g, rg in zip("qkvg", grads, ref_grads):
        assert rel_err(g, rg) <= 1e-2, name


@pytest.mark.parametrize("grid, H, sparsity", [((21, 45, 80), 4, 0.9), ((21, 30, 52), 12, 0.8)])
def test_fused_selection_equals_topk(grid, H, sparsity):
    """The fused select kernel at real tile counts (14B-720p: 1440 tiles) == torch.topk's set of kv tiles."""
    meta = vsa_meta(grid, sparsity, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    scores = torch.randn(1, H, meta.num_tiles, meta.num_tiles, device="cuda", generator=gen)
    packed, ends = vsa_triton.select_by_box(scores, meta.topk, meta.tile_offsets)
    ids = torch.searchsorted(meta.tile_offsets, packed >> 7, right=True) - 1
    expected = scores.topk(meta.topk, dim=-1).indices.sort(-1).values
    assert torch.equal(ids.long().sort(-1).values, expected)
    for got, want in zip((packed, ends), vsa_triton.sort_by_box(ids, meta.tile_offsets)):
        assert torch.equal(got, want)


def test_dense_at_sparsity_zero():
    grid, H, D = (9, 14, 18), 4, 128
    q, k, v, _ = make_inputs(2, math.prod(grid), H, D, torch.bfloat16, seed=1)
    out = vsa_attention(q, k, v, vsa_meta(grid, 0.0, "cuda"), torch.zeros_like(q))
    dense = torch.nn.functional.scaled_dot_product_attention(
        *(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert rel_err(out, dense) <= 1e-2


def test_compiles_without_graph_breaks():
    grid, H, D = (9, 14, 18), 2, 64
    meta = vsa_meta(grid, 0.7, "cuda")
    q, k, v, gate = make_inputs(1, math.prod(grid), H, D, torch.bfloat16, seed=2)
    explanation = torch._dynamo.explain(vsa_attention)(q, k, v, meta, gate)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(vsa_attention, fullgraph=True)
    out = compiled(q, k, v, meta, gate)
    grads = torch.autograd.grad(out, (q, k, v, gate), torch.ones_like(out))
    eager = vsa_attention(q, k, v, meta, gate)
    eager_grads = torch.autograd.grad(eager, (q, k, v, gate), torch.ones_like(out))
    assert rel_err(out, eager) <= 5e-3
    for g, eg in zip(grads, eager_grads):
        assert rel_err(g, eg) <= 5e-3


def test_cuda_input_errors():
    meta = vsa_meta((5, 6, 7), 0.5, "cuda")
    x = torch.randn(1, 210, 2, 64, device="cuda")
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        vsa_attention(x, x, x, meta)
    y = torch.randn(1, 210, 2, 80, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dim 64 or 128, got 80"):
        vsa_attention(y, y, y, meta)


def test_two_block_vsa_model_compiles_without_graph_breaks():
    """Acceptance 3: torch.compile traces a 2-block VSA WanModel with no graph break; same output as eager."""
    from models.wan import WAN_CONFIGS, WanModel, config_with

    torch.manual_seed(3)
    cfg = config_with(WAN_CONFIGS["tiny"], dim=128, ffn_dim=256, num_heads=2, num_layers=2, vsa_gate=True)  # Dh 64
    model = WanModel(cfg, attn_fn=vsa_attention).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for block in model.blocks:  # switch the coarse branch on (the gate is zero-initialised)
            block.attn1.to_gate_compress.weight.normal_(0.0, 0.05)
    latents = torch.randn(1, cfg.in_channels, 9, 20, 22, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([500.0], device="cuda")
    context = torch.randn(1, 16, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    meta = vsa_meta(model.token_grid(latents.shape), 0.75, "cuda")  # grid 9×10×11: ragged tiles
    explanation = torch._dynamo.explain(model)(latents, t, context, meta)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = model(latents, t, context, meta)
    compiled = torch.compile(model, fullgraph=True)(latents, t, context, meta)
    assert rel_err(compiled, eager) <= 2e-2


@pytest.mark.parametrize("grid, H, D, sparsity", [((21, 30, 52), 2, 128, 0.8), ((31, 22, 40), 2, 64, 0.9)])
def test_fp8_inference_matches_bf16(grid, H, D, sparsity):
    """The FP8 inference op at real grids == the bf16 op up to e4m3 rounding (3 mantissa bits); compiles whole;
    refuses to run where gradients are wanted."""
    meta = vsa_meta(grid, sparsity, "cuda")
    q, k, v, gate = (x.detach() for x in make_inputs(1, math.prod(grid), H, D, torch.bfloat16, seed=5))
    gate = gate * 0.3
    with torch.no_grad():
        out = vsa_fp8_attention(q, k, v, meta, gate)
        bf16 = vsa_attention(q, k, v, meta, gate)
        ref = vsa_reference(q.float(), k.float(), v.float(), meta, gate.float())
        compiled = torch.compile(vsa_fp8_attention, fullgraph=True)(q, k, v, meta, gate)
    assert out.dtype == torch.bfloat16
    # ~5 % on random q, k: flat attention puts P in [0.1, 1], where e4m3 rounds every weight by up to 2^-4
    assert rel_err(out, ref) <= 0.06 and rel_err(bf16, ref) <= 1e-2
    assert torch.equal(compiled, out)
    with pytest.raises(RuntimeError, match="inference-only"):
        vsa_fp8_attention(q.requires_grad_(), k, v, meta, gate)


def test_fp8_quantization_rounds_to_nearest():
    """quantize_qkv_fp8 on the GPU: every q, k, v value within half an e4m3 step (2^-4 relative; 2^-10 of the scale
    among the subnormals) of its dequantized slot, at a ragged real grid."""
    meta = vsa_meta((21, 30, 52), 0.8, "cuda")
    L, N = math.prod(meta.grid), meta.num_tiles
    q, k, v, _ = (x.detach() * torch.rand(1, L, 1, 1, device="cuda") * 4
                  for x in make_inputs(1, L, 2, 128, torch.bfloat16, seed=7))
    q8, qs, k8, ks, vt8, vs = vsa_triton.quantize_qkv_fp8(q, k, v, meta.tile_offsets)
    slot_of = meta.token_tile * 64 + torch.arange(L, device="cuda") - meta.tile_offsets.long()[meta.token_tile]
    for x, deq, scale in (
        (q, q8.float()[:, :, slot_of] * qs[:, :, slot_of, None], qs[:, :, slot_of, None]),
        (k, k8.float()[:, :, slot_of] * ks[:, :, meta.token_tile, None], ks[:, :, meta.token_tile, None]),
        (v, (vt8.float() * vs[..., None])[..., slot_of].transpose(2, 3), vs[:, :, None, :]),
    ):
        x = x.float().transpose(1, 2)  # (B, H, L, D)
        assert ((deq - x).abs() <= 2 ** -4 * x.abs() + 2 ** -10 * scale + 1e-12).all()
