"""parallel/memory.py (the model behind tools/plan_memory.py): its activation terms against autograd's saved tensors,
its sizes against the model and the recipes' token counts; the CLI end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention.sdpa import sdpa_attention
from models.wan import WAN_CONFIGS, WanBlock
from models.wan_weights import parameter_count
from parallel import memory as plan_memory

ROOT = Path(__file__).resolve().parents[1]


def _saved_bytes(block: WanBlock, length: int) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves in one block forward (bf16 autocast, CPU)."""
    dim = block.attn1.to_q.in_features
    x = torch.randn(1, length, dim, dtype=torch.bfloat16, requires_grad=True)
    context = torch.randn(1, plan_memory.TEXT_LEN, dim, dtype=torch.bfloat16)
    tmod = torch.randn(1, 6, dim, requires_grad=True)
    half = block.attn1.to_q.in_features // block.attn1.num_heads // 2
    cos, sin = torch.randn(length, half), torch.randn(length, half)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        block(x, context, tmod, cos, sin)
    return sum(storages.values())


def test_block_activation_term_matches_saved_tensors():
    # Real 1.3B widths (D = 1536, F = 8960); the per-token slope removes everything that does not scale with L.
    cfg = WAN_CONFIGS["wan21_1.3b"]
    torch.manual_seed(0)
    block = WanBlock(cfg, sdpa_attention).to(torch.bfloat16)  # bf16 weights, as FSDP's param_dtype gives
    measured = (_saved_bytes(block, 256) - _saved_bytes(block, 128)) / 128
    planned = plan_memory.block_saved_per_token(cfg, rms_norm="composite")  # CPU runs the composite RMSNorm
    assert planned == pytest.approx(measured, rel=0.02)


def test_sizes_match_spec_and_model():
    recipes = plan_memory.RECIPES
    # 77×448×832 → latent 20×56×104 → 20×28×52 = 29 120 tokens; TI2V-5B 121×704×1280 → 31×22×40 = 27 280.
    assert plan_memory.tokens(recipes["wan21_1.3b"], WAN_CONFIGS["wan21_1.3b"]) == 29120
    assert plan_memory.tokens(recipes["wan22_ti2v_5b"], WAN_CONFIGS["wan22_ti2v_5b"]) == 27280
    for name in ("wan21_1.3b", "wan21_14b"):
        total, block = plan_memory.count_params(WAN_CONFIGS[name])
        assert total == parameter_count(WAN_CONFIGS[name])
        assert 0 < total - WAN_CONFIGS[name].num_layers * block < 0.05 * total  # the root is small


def test_sharding_divides_the_static_terms():
    r = plan_memory.RECIPES["wan21_14b"]
    one_group = plan_memory.plan(plan_memory.Recipe(r.model, r.vae_stride, r.frames, r.height, r.width, 8, 1, 8, "vsa"))
    sharded = plan_memory.plan(r)  # 64 GPUs, dp_replicate 8, sp 4 → FSDP over 8 ranks
    assert sharded["shard"] == 8 and one_group["shard"] == 1
    for key, value in one_group["static"].items():
        assert sharded["static"][key] == pytest.approx(value / 8)
    assert sharded["local_tokens"] == 29120 // 4


def test_bad_mesh_is_rejected():
    r = plan_memory.RECIPES["wan21_1.3b"]
    bad = plan_memory.Recipe(r.model, r.vae_stride, r.frames, r.height, r.width, 8, 8, 1, "vsa")  # sp 8, 12 heads
    with pytest.raises(ValueError, match="parallel.sp=8 does not divide the model's num_heads=12"):
        plan_memory.plan(bad)


def test_cli_prints_the_plan_and_the_summary():
    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, str(ROOT / "tools/plan_memory.py"), *args], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    out = run("--recipe", "wan21_14b", "--gpus", "64", "--sp", "4", "--dp-replicate", "8")
    peak = plan_memory.plan(plan_memory.RECIPES["wan21_14b"])["peaks"]["student step"] / plan_memory.GIB
    assert any(line.startswith("PEAK student step") and line.split()[-1] == f"{peak:.2f}" for line in out.splitlines())
    rows = [line for line in run("--summary").splitlines() if line.startswith("| wan")]
    assert len(rows) == 5 and rows[0].startswith("| wan21_1.3b 77×448×832 | 1 | 1 × 1 × 1 | 29120 |")
