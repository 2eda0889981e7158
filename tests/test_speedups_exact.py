"""Issue 9, acceptance 3: the training-speed switches change no number. The 1.3B recipe's own DMD step functions on the
tiny config, fp32 on CPU: plain eager vs activation checkpointing (full, selective) vs per-block torch.compile with
selective AC (the tuned GPU setting) give the same critic and DMD losses step after step."""

import dataclasses
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from attention.sdpa import sdpa_attention
from attention.vsa import vsa_attention, vsa_meta
from models.wan import WAN_CONFIGS, WanModel
from parallel.wan import parallelize_wan

ROOT = Path(__file__).resolve().parents[1]


def load_recipe():
    spec = importlib.util.spec_from_file_location("recipe_1_3b_speedups", ROOT / "recipes/wan21_1_3b_sparse_distill.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def losses(ac: str, compile: bool, steps: int = 4) -> list[float]:
    recipe = load_recipe()
    cfg = WAN_CONFIGS["tiny"]
    torch.manual_seed(0)
    student = WanModel(dataclasses.replace(cfg, vsa_gate=True), attn_fn=vsa_attention)
    teacher, critic = WanModel(cfg, attn_fn=sdpa_attention), WanModel(cfg, attn_fn=sdpa_attention)
    with torch.no_grad():
        for block in student.blocks:  # a live gate, so the coarse branch is part of the comparison
            block.attn1.to_gate_compress.weight.normal_(0, 0.05)
    dims = types.SimpleNamespace(sp=1)  # one device: parallelize_wan applies only AC and compile here
    for net in (student, critic):
        parallelize_wan(net, dims, ac_mode=ac, compile=compile, fsdp=False)
    teacher.requires_grad_(False)
    opts = {n: torch.optim.AdamW(m.parameters(), 1e-3) for n, m in (("student", student), ("critic", critic))}
    g = torch.Generator().manual_seed(1)
    batch = {"latents": torch.randn(1, cfg.in_channels, 5, 8, 16, generator=g),
             "context": torch.randn(1, 7, cfg.text_dim, generator=g)}
    negative = torch.zeros(1, 7, cfg.text_dim)
    meta = vsa_meta(student.token_grid(batch["latents"].shape), 0.5, "cpu")
    dmd = recipe.DMDConfig(steps=[1000, 757, 522], student_every=2, guidance=3.5, flow_shift=8.0, t_min=20, t_max=980)
    gen, out = torch.Generator(), []
    for step in range(1, steps + 1):
        gen.manual_seed(100 + step)
        if step % dmd.student_every == 0:
            loss, _ = recipe.student_step(student, teacher, critic, [batch], negative, meta, None, dmd, gen)  # None: dense critic
            recipe.apply_update(student, opts["student"], loss, 1.0)
            out.append(loss.item())
        loss = recipe.critic_step(student, critic, [batch], meta, None, dmd, gen)
        recipe.apply_update(critic, opts["critic"], loss, 1.0)
        out.append(loss.item())
    return out


@pytest.fixture(scope="module")
def plain() -> list[float]:
    return losses("none", False)


@pytest.mark.parametrize("ac, compile", [("full", False), ("selective", False), ("attention", False),
                                         pytest.param("selective", True, marks=pytest.mark.slow)])
def test_speed_switches_leave_losses_unchanged(plain, ac, compile):
    got = losses(ac, compile)
    assert len(got) == len(plain) == 6  # 4 critic + 2 DMD losses, in step order
    torch.testing.assert_close(torch.tensor(got), torch.tensor(plain), rtol=2e-5, atol=1e-6)


def test_compile_of_a_trainable_model_turns_off_mix_order_reduction(monkeypatch):
    """Inductor's mix-order reduction gave wrong modulation gradients on CUDA (parallel/compile.py): compiling a
    trainable model switches it off; a frozen one (no backward) leaves the setting alone."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.triton, "mix_order_reduction", True)
    parallelize_wan(WanModel(WAN_CONFIGS["tiny"], attn_fn=sdpa_attention), types.SimpleNamespace(sp=1), compile=True,
                    fsdp=False, frozen=True)
    assert inductor_config.triton.mix_order_reduction is True
    model = WanModel(WAN_CONFIGS["tiny"], attn_fn=sdpa_attention)
    parallelize_wan(model, types.SimpleNamespace(sp=1), compile=True, fsdp=False)
    assert inductor_config.triton.mix_order_reduction is False
    assert all(b._compiled_call_impl is not None for b in model.blocks)


def test_check_speedups_gpu_tool_runs_on_cpu():
    """scripts/check_speedups_gpu.py (the GPU form of this check) on the tiny model, CPU: the fp32 reference row, then
    bf16 eager and compiled under FSDP2 at the same distance from fp32 (compiled training is right on CPU), and the
    three grad norms of each row agreeing."""
    import subprocess

    # a fresh one-process group: not the torchrun variables an in-process recipe test may have left behind
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/check_speedups_gpu.py"), "--preset", "tiny", "--latent", "2,4,8",
         "--only", "eager+none,compile+none"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    rows = {line[:30].strip(): [float(v) for v in line[30:].split()[:5]] for line in out.splitlines()
            if "+ AC" in line}
    assert "FAILED" not in out, out
    assert list(rows) == ["eager fp32 + AC none", "eager + AC none", "compile + AC none"]
    for name, (loss, norm_torch, norm_ours, norm_fp64, rel) in rows.items():
        assert norm_torch == pytest.approx(norm_fp64, rel=1e-4) and norm_ours == pytest.approx(norm_fp64, rel=1e-4), name
    eager, compiled = rows["eager + AC none"][4], rows["compile + AC none"][4]
    assert rows["eager fp32 + AC none"][4] == 0 and 0 < eager < 2e-2 and compiled < 2 * eager
