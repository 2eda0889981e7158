"""The gated critic (`attn.critic = "dense_gated"`): VSA at ρ = 0 run as dense attention + gate · coarse.

Checks: with a zero gate it is plain dense attention (the function and a whole tiny model, fp32); with a non-zero gate
it equals VSA's reference at sparsity 0 and a brute force written here, gradients included; metadata that drops tiles
is refused; under Ulysses SP (2 gloo ranks) it equals the local computation; in a Sparse-distill recipe (tiny CPU
config) its gate gets a non-zero gradient on the first critic step, and the training-state checkpoint holds the trained
gate (and its AdamW moments) and restores it; the toy recipe's critic step gives the gate a gradient too.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from attention.sdpa import sdpa_attention
from attention.vsa import dense_gated_attention, vsa_meta, vsa_reference
from components.config import load_config
from models.wan import WAN_CONFIGS, WanModel, config_with
from tests.multiproc import run_multiproc
from tests.recipe_shims import load_recipe

ROOT = Path(__file__).resolve().parents[1]
# Token grids: (3, 5, 9) has ragged tiles in every axis (48, 12 and 3 tokens), (4, 8, 8) only full 64-token tiles.
GRIDS = [(3, 5, 9), (4, 8, 8)]


def inputs(grid: tuple[int, int, int], n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    length = grid[0] * grid[1] * grid[2]
    return [torch.randn(2, length, 4, 16, generator=g) for _ in range(n)]  # (B, L, H, Dh) each


def brute_force(q, k, v, gate, meta) -> torch.Tensor:
    """Full softmax attention per token + gate · (attention between tile means, given to each tile's tokens), in
    float64, tile by tile from `tile_offsets`."""
    q, k, v, gate = (x.double() for x in (q, k, v, gate))
    scale = q.shape[-1] ** -0.5
    fine = torch.einsum("blhd,bmhd->bhlm", q, k).mul(scale).softmax(-1)  # (B, H, L, L)
    fine = torch.einsum("bhlm,bmhd->blhd", fine, v)
    bounds = meta.tile_offsets.tolist()
    means = [torch.stack([x[:, a:b].mean(1) for a, b in pairwise(bounds)], 1) for x in (q, k, v)]
    coarse = torch.einsum("bnhd,bmhd->bhnm", means[0], means[1]).mul(scale).softmax(-1)  # (B, H, N, N)
    coarse = torch.einsum("bhnm,bmhd->bnhd", coarse, means[2])  # (B, N, H, D)
    per_token = torch.cat([coarse[:, i : i + 1].expand(-1, b - a, -1, -1) for i, (a, b) in
                           enumerate(pairwise(bounds))], 1)  # (B, L, H, D)
    return fine + gate * per_token


@pytest.mark.parametrize("grid", GRIDS)
def test_zero_gate_is_dense_attention(grid):
    q, k, v = inputs(grid, 3)
    meta = vsa_meta(grid, 0.0, "cpu")
    dense = sdpa_attention(q, k, v)
    assert (dense_gated_attention(q, k, v, meta, torch.zeros_like(q)) - dense).abs().max() <= 1e-6
    assert torch.equal(dense_gated_attention(q, k, v, meta, None), dense)


@pytest.mark.parametrize("grid", GRIDS)
def test_gated_equals_vsa_at_sparsity_zero_and_brute_force(grid):
    meta = vsa_meta(grid, 0.0, "cpu")
    q, k, v, gate, w = inputs(grid, 5, seed=1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    out = dense_gated_attention(*leaves[:3], meta, leaves[3])
    (out * w).sum().backward()
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    ref = vsa_reference(*ref_leaves[:3], meta, ref_leaves[3])  # VSA's reference: masks, top-k of every tile
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), brute_force(q, k, v, gate, meta), rtol=1e-5, atol=1e-6)
    coarse_part = out - sdpa_attention(q, k, v)
    assert coarse_part.abs().mean() > 1e-2  # the coarse branch is really on
    for name, a, b in zip(("q", "k", "v", "gate"), leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


def test_sparse_metadata_is_refused():
    q, k, v = inputs((3, 5, 9), 3)
    with pytest.raises(ValueError, match=r"sparsity 0.*vsa_meta\(grid, 0.0"):
        dense_gated_attention(q, k, v, vsa_meta((3, 5, 9), 0.5, "cpu"), torch.zeros_like(q))


def test_zero_gate_model_is_the_dense_model():
    """A whole tiny WanModel: gated critic (tokens in tile order, zero gate) == the plain dense model, same weights."""
    cfg = WAN_CONFIGS["tiny"]
    torch.manual_seed(0)
    dense = WanModel(cfg)
    gated = WanModel(config_with(cfg, vsa_gate=True), attn_fn=dense_gated_attention)
    missing, unexpected = gated.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and missing and all("to_gate_compress" in key for key in missing)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, cfg.in_channels, 3, 10, 18, generator=g)  # grid (3, 5, 9): ragged tiles
    t, context = torch.tensor([20.0, 980.0]), torch.randn(2, 7, cfg.text_dim, generator=g)
    meta = vsa_meta(gated.token_grid(latents.shape), 0.0, "cpu")
    with torch.no_grad():
        assert (gated(latents, t, context, meta) - dense(latents, t, context)).abs().max() <= 1e-6
        gated.blocks[0].attn1.to_gate_compress.bias.fill_(0.5)
        assert (gated(latents, t, context, meta) - dense(latents, t, context)).abs().max() > 1e-3


# ---- Ulysses sequence parallel: the gate travels in the same all-to-all as q, k, v ----
def _ulysses_rank(rank: int, world: int, grid) -> dict[str, torch.Tensor]:
    from parallel.ulysses import SequenceLayout, _chunk_of, ulysses_attention

    layout = SequenceLayout(dist.group.WORLD)
    full = inputs(grid, 5, seed=2)
    layout.seq_len = full[0].shape[1]
    q, k, v, gate, w = [_chunk_of(x, layout, dim=1).requires_grad_() for x in full]  # (B, L_pad/2, H, Dh)
    out = ulysses_attention(dense_gated_attention, layout)(q, k, v, meta=vsa_meta(grid, 0.0, "cpu"), gate=gate)
    (out * w).sum().backward()  # w's padding rows are zero
    return {"out": out.detach(), **{f"grad_{n}": x.grad for n, x in zip(("q", "k", "v", "gate"), (q, k, v, gate))}}


@pytest.mark.multiproc
def test_ulysses_equals_local():
    grid = (3, 5, 9)  # 135 tokens: odd, so SP pads
    ranks = run_multiproc(_ulysses_rank, 2, grid, timeout=120)
    q, k, v, gate, w = [x.requires_grad_() for x in inputs(grid, 5, seed=2)]
    out = dense_gated_attention(q, k, v, vsa_meta(grid, 0.0, "cpu"), gate)
    (out * w).sum().backward()
    expected = {"out": out.detach(), "grad_q": q.grad, "grad_k": k.grad, "grad_v": v.grad, "grad_gate": gate.grad}
    for key, value in expected.items():
        got = torch.cat([r[key] for r in ranks], dim=1)[:, : value.shape[1]]  # rank chunks in sequence order
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


# ---- the recipes ----
@pytest.fixture(autouse=True)
def no_process_group():
    yield
    if dist.is_initialized():  # a run that raised mid-way leaves its group behind
        dist.destroy_process_group()


def run_tiny(module, data: Path, out: Path, name: str, *extra: str) -> Path:
    argv = ["--toml", str(ROOT / "tests" / "assets" / "tiny.toml"), f"model.base={data / 'pipeline'}",
            f"data.path={data / 'latents'}", f"data.negative_prompt={data / 'negative_prompt.safetensors'}",
            f"data.val_prompts={data / 'prompts'}", f"run.out_dir={out}", f"run.name={name}", *extra]
    stem = Path(module.__file__).stem
    return module.main(load_config(module.RecipeConfig, argv, default_toml=ROOT / "recipes" / f"{stem}.toml"))


def test_recipe_critic_gate_trains_and_is_checkpointed(tiny_data, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    module = load_recipe(ROOT / "recipes" / "wan21_1_3b_sparse_distill.py")
    apply_update, gate_grads = module.apply_update, []

    def record_first_critic_grads(model, optimizer, loss, max_norm):
        if not gate_grads:  # step 1 is critic-only (tiny.toml: student every 2nd step): this is the critic
            gate_grads.append({n: p.grad.full_tensor() for n, p in model.named_parameters() if "to_gate" in n})
        return apply_update(model, optimizer, loss, max_norm)

    monkeypatch.setattr(module, "apply_update", record_first_critic_grads)
    run_dir = run_tiny(module, tiny_data, tmp_path, "gated", "attn.critic=dense_gated", "run.max_steps=1",
                       "run.ckpt_every=1")
    grads = gate_grads[0]
    assert len(grads) == 2 * WAN_CONFIGS["tiny"].num_layers  # weight and bias of every block's gate
    assert all(g.abs().max() > 0 for g in grads.values()), {n: float(g.abs().max()) for n, g in grads.items()}

    # The checkpoint holds the trained critic gate and its AdamW moments; loading restores it.
    folder = run_dir / "ckpt" / "step-000001"
    keys = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    assert "critic.model.blocks.0.attn1.to_gate_compress.weight" in keys
    assert any(k.startswith("critic.optim.") and "to_gate_compress" in k and "exp_avg" in k for k in keys)
    critic = WanModel(config_with(WAN_CONFIGS["tiny"], vsa_gate=True), attn_fn=dense_gated_attention)
    state = {f"critic.model.{n}": p.detach().clone() for n, p in critic.named_parameters() if "to_gate" in n}
    assert all(x.abs().max() == 0 for x in state.values())  # a fresh gate is zero
    dcp.load(state, checkpoint_id=folder)  # no process group: a local load
    assert all(x.abs().max() > 0 for x in state.values())  # the critic update moved every gate tensor


def test_toy_recipe_critic_gate_gets_gradient():
    toy = load_recipe(ROOT / "recipes" / "toy_sparse_distill.py")
    teacher = ROOT / "tests" / "assets" / "toy_teacher"
    student, critic = toy.build_wan(teacher, "vsa"), toy.build_wan(teacher, "dense_gated")
    cfg = toy.load_config(toy.RecipeConfig, [f"model.teacher={teacher}"], default_toml=ROOT / "recipes" /
                          "toy_sparse_distill.toml")
    assert cfg.attn.critic == "dense_gated"  # the default, as in the Wan recipes
    g = torch.Generator().manual_seed(0)
    grid = (2, 16, 16)
    x_data = torch.randn(2, student.cfg.in_channels, 2, 32, 32, generator=g)
    context = torch.randn(2, 1, student.cfg.text_dim, generator=g)
    opt = torch.optim.AdamW(critic.parameters(), lr=0.0)  # lr 0: the gradients stay for inspection
    opt.step = lambda: None
    toy.critic_step(student, critic, opt, vsa_meta(grid, 0.5, "cpu"), vsa_meta(grid, 0.0, "cpu"), x_data, context,
                    cfg.dmd, 1.0, 1, g)
    grads = [p.grad for n, p in critic.named_parameters() if "to_gate_compress" in n]
    assert len(grads) == 2 * critic.cfg.num_layers and all(gr.abs().max() > 0 for gr in grads)
