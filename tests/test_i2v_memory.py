"""parallel/memory.py for the I2V and two-expert models: the image cross-attention's saved tensors against autograd,
the two-expert teacher's weights, and the CLI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention.sdpa import sdpa_attention
from models.wan import WAN_CONFIGS, WanBlock, config_with
from models.wan_weights import parameter_count
from parallel import memory as plan_memory

ROOT = Path(__file__).resolve().parents[1]


def saved_bytes(block: WanBlock, length: int, image_tokens: int | None) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves in one block forward (bf16 autocast, CPU)."""
    dim = block.attn1.to_q.in_features
    x = torch.randn(1, length, dim, dtype=torch.bfloat16, requires_grad=True)
    context = torch.randn(1, plan_memory.TEXT_LEN, dim, dtype=torch.bfloat16)
    image = None if image_tokens is None else torch.randn(1, image_tokens, dim, dtype=torch.bfloat16)
    tmod = torch.randn(1, 6, dim, requires_grad=True)
    half = dim // block.attn1.num_heads // 2
    cos, sin = torch.randn(length, half), torch.randn(length, half)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        block(x, context, tmod, cos, sin, None, image)
    return sum(storages.values())


def test_i2v_block_activation_term_matches_saved_tensors():
    # The 1.3B widths with Wan2.1-I2V's image cross-attention (cheaper than 14B widths, the same per-channel terms).
    cfg = config_with(WAN_CONFIGS["wan21_1.3b"], image_dim=1280)
    torch.manual_seed(0)
    block = WanBlock(cfg, sdpa_attention).to(torch.bfloat16)
    measured = (saved_bytes(block, 256, plan_memory.CLIP_TOKENS) - saved_bytes(block, 128, plan_memory.CLIP_TOKENS))
    planned = plan_memory.block_saved_per_token(cfg, rms_norm="composite")
    assert planned == pytest.approx(measured / 128, rel=0.02)
    assert planned > plan_memory.block_saved_per_token(WAN_CONFIGS["wan21_1.3b"], rms_norm="composite")


def test_two_expert_teacher_doubles_the_teacher_weights_only():
    a14b = plan_memory.RECIPES["wan22_t2v_a14b"]
    one = plan_memory.plan(dataclasses.replace(a14b, teacher_experts=1))
    two = plan_memory.plan(a14b)
    teacher = "teacher bf16 weights (× experts)"
    expert_bytes = 2 * parameter_count(WAN_CONFIGS["wan22_t2v_a14b"]) / two["shard"]  # bf16
    assert two["static"][teacher] == 2 * one["static"][teacher] == 2 * expert_bytes
    assert two["peaks"]["student step"] - one["peaks"]["student step"] == pytest.approx(one["static"][teacher])
    assert two["params"]["teacher/critic"] == parameter_count(WAN_CONFIGS["wan22_t2v_a14b"])
    i2v = plan_memory.plan(plan_memory.RECIPES["wan21_i2v_14b"])
    assert i2v["params"]["teacher/critic"] == parameter_count(WAN_CONFIGS["wan21_i2v_14b"])
    assert i2v["tokens"] == two["tokens"] == 29120


def test_cli_knows_the_new_models():
    for name in ("wan21_i2v_14b", "wan22_t2v_a14b", "wan22_i2v_a14b"):
        run = subprocess.run([sys.executable, str(ROOT / "tools/plan_memory.py"), "--recipe", name, "--gpus", "8",
                              "--sp", "8"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        peak = plan_memory.plan(dataclasses.replace(plan_memory.RECIPES[name], gpus=8, sp=8, dp_replicate=1))
        expected = f"{peak['peaks']['student step'] / plan_memory.GIB:.2f}"
        assert any(line.startswith("PEAK student step") and line.split()[-1] == expected
                   for line in run.stdout.splitlines())
        assert ("teacher: 2 experts" in run.stdout) == ("a14b" in name)
