"""Ulysses sequence parallelism on 2 gloo ranks == the same computation on one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from attention.sdpa import sdpa_attention
from attention.vsa import vsa_attention, vsa_meta
from models.wan import WAN_CONFIGS, WanModel, config_with
from parallel.ulysses import SequenceLayout, _chunk_of, apply_ulysses, sp_seed, ulysses_attention
from tests.multiproc import run_multiproc

pytestmark = pytest.mark.multiproc

# (name, grid, sparsity): L = 60 is even, 3·3·5 = 45 is odd (SP padding), VSA with ragged edge tiles.
ATTN_CASES = [("sdpa", (3, 4, 5), None), ("sdpa", (3, 3, 5), None), ("vsa", (3, 3, 5), 0.5), ("vsa", (5, 6, 6), 0.75)]


def _attention_inputs(grid: tuple[int, int, int], gate: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    length = grid[0] * grid[1] * grid[2]
    return [torch.randn(2, length, 4, 8, generator=g) for _ in range(4 + gate)]  # q, k, v, w[, gate]: (B, L, H, Dh)


def _reference_attention(name: str, grid, sparsity) -> dict[str, torch.Tensor]:
    q, k, v, w, *gate = [x.requires_grad_() for x in _attention_inputs(grid, name == "vsa")]
    meta = vsa_meta(grid, sparsity, "cpu") if name == "vsa" else None
    fn = vsa_attention if name == "vsa" else sdpa_attention
    out = fn(q, k, v, meta=meta, gate=gate[0] if gate else None)
    (out * w).sum().backward()
    grads = {f"grad_{n}": x.grad for n, x in zip("qkv", (q, k, v))}
    if gate:
        grads["grad_gate"] = gate[0].grad
    return {"out": out.detach(), **grads}


def _ulysses_attention_rank(rank: int, world: int, name: str, grid, sparsity) -> dict[str, torch.Tensor]:
    layout = SequenceLayout(dist.group.WORLD)
    full = _attention_inputs(grid, name == "vsa")
    layout.seq_len = full[0].shape[1]
    q, k, v, w, *gate = [_chunk_of(x, layout, dim=1).requires_grad_() for x in full]  # (B, L_pad/2, H, Dh)
    meta = vsa_meta(grid, sparsity, "cpu") if name == "vsa" else None
    attn = ulysses_attention(vsa_attention if name == "vsa" else sdpa_attention, layout)
    out = attn(q, k, v, meta=meta, gate=gate[0] if gate else None)
    (out * w).sum().backward()  # w's padding rows are zero, so padded outputs add nothing
    grads = {f"grad_{n}": x.grad for n, x in zip("qkv", (q, k, v))}
    if gate:
        grads["grad_gate"] = gate[0].grad
    return {"out": out.detach(), **grads}


def _ulysses_cases_rank(rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    return [_ulysses_attention_rank(rank, world, *case) for case in ATTN_CASES]  # one spawn for all cases


def test_ulysses_attention_equals_local():
    ranks = run_multiproc(_ulysses_cases_rank, 2)
    for i, (name, grid, sparsity) in enumerate(ATTN_CASES):
        expected = _reference_attention(name, grid, sparsity)
        length = expected["out"].shape[1]
        for key, value in expected.items():
            got = torch.cat([r[i][key] for r in ranks], dim=1)  # rank chunks in sequence order, (B, L_pad, H, Dh)
            assert torch.all(got[:, length:] == 0), f"{key}: SP padding rows must stay zero"
            msg = lambda m: f"{name} {grid} {key}: {m}"  # noqa: E731
            torch.testing.assert_close(got[:, :length], value, rtol=1e-5, atol=1e-6, msg=msg)


# ---- a whole tiny WanModel ----
def _model_inputs(per_token: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    cfg = WAN_CONFIGS["tiny"]
    latents = torch.randn(1, cfg.in_channels, 3, 6, 10, generator=g)  # grid (3, 3, 5): L = 45, odd
    t = torch.rand(1, 45, generator=g) * 1000 if per_token else torch.rand(1, generator=g) * 1000
    context = torch.randn(1, 7, cfg.text_dim, generator=g)
    target = torch.randn(latents.shape, generator=g)
    return latents, t, context, target


def _tiny_model(vsa: bool) -> WanModel:
    torch.manual_seed(0)
    cfg = config_with(WAN_CONFIGS["tiny"], vsa_gate=vsa)
    model = WanModel(cfg, attn_fn=vsa_attention if vsa else sdpa_attention)
    with torch.no_grad():  # a non-zero gate so the coarse branch is exercised
        for block in model.blocks:
            if block.attn1.to_gate_compress is not None:
                block.attn1.to_gate_compress.weight.normal_(0, 0.1)
    return model


def _model_step(model: WanModel, vsa: bool, per_token: bool) -> dict[str, torch.Tensor]:
    latents, t, context, target = _model_inputs(per_token)
    latents.requires_grad_()
    meta = vsa_meta(model.token_grid(latents.shape), 0.5, "cpu") if vsa else None
    out = model(latents, t, context, attn_meta=meta)
    loss = ((out - target) ** 2).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return {"out": out.detach(), "latents_grad": latents.grad, "grads": grads}


# (vsa, per-token t): dense with a (B, 6, D) modulation, VSA with the gate, per-token (B, L, 6, D) modulation.
MODEL_CASES = [(False, False), (True, False), (False, True)]


def _model_rank(rank: int, world: int) -> list[dict]:
    results = []
    for vsa, per_token in MODEL_CASES:
        model = _tiny_model(vsa)
        apply_ulysses(model, dist.group.WORLD)
        result = _model_step(model, vsa, per_token)
        for g in result["grads"].values():  # the SP average FSDP performs over dp_shard × sp
            dist.all_reduce(g, op=dist.ReduceOp.AVG)
        results.append(result)
    return results


def test_wan_sp2_equals_sp1():
    ranks = run_multiproc(_model_rank, 2)
    for i, (vsa, per_token) in enumerate(MODEL_CASES):
        expected = _model_step(_tiny_model(vsa), vsa, per_token)
        for rank in ranks:
            got, case = rank[i], f"vsa={vsa} per_token={per_token}"
            torch.testing.assert_close(got["out"], expected["out"], rtol=1e-5, atol=1e-5, msg=lambda m: f"{case}: {m}")
            msg = lambda m: f"{case}: {m}"  # noqa: E731
            torch.testing.assert_close(got["latents_grad"], expected["latents_grad"], rtol=1e-4, atol=1e-7, msg=msg)
            assert got["grads"].keys() == expected["grads"].keys()
            for name, grad in expected["grads"].items():
                msg = lambda m: f"{case} {name}: {m}"  # noqa: E731
                torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=msg)


def test_sp_seed_shared_within_group_distinct_across():
    # ranks 0..7 with sp=4: groups {0..3} and {4..7} (dp_rank = rank // sp)
    seeds = [sp_seed(1000, rank // 4) for rank in range(8)]
    assert seeds[:4] == [1000] * 4 and seeds[4:] == [1001] * 4
