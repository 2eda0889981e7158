"""FSDP2 / HSDP / SP training steps on 2 gloo ranks == one process on the same global batch; sharded loading;
activation checkpointing; mesh size errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.tensor import DTensor

from models.wan import WAN_CONFIGS, WanModel, config_with
from models.wan_weights import export_pretrained
from parallel.ac import apply_ac
from parallel.mesh import build_mesh, check_parallel_sizes
from parallel.wan import load_sharded, parallelize_wan
from tests.multiproc import run_multiproc

GLOBAL_BATCH = 2
STEPS = 2


def _tiny(vsa_gate: bool = False) -> WanModel:
    torch.manual_seed(0)
    return WanModel(config_with(WAN_CONFIGS["tiny"], vsa_gate=vsa_gate))


def _batches(global_batch: int) -> list[tuple[torch.Tensor, ...]]:
    """STEPS batches of (latents, t, context, target); grid (2, 2, 3) → L = 12 tokens."""
    g = torch.Generator().manual_seed(2)
    cfg = WAN_CONFIGS["tiny"]
    return [
        (
            torch.randn(global_batch, cfg.in_channels, 2, 4, 6, generator=g),
            torch.rand(global_batch, generator=g) * 1000,
            torch.randn(global_batch, 5, cfg.text_dim, generator=g),
            torch.randn(global_batch, cfg.out_channels, 2, 4, 6, generator=g),
        )
        for _ in range(STEPS)
    ]


def _train(model: torch.nn.Module, batches, rows: slice) -> tuple[list[float], list[float]]:
    """AdamW steps with gradient clipping (DTensor-aware under FSDP) on `rows` of each global batch.

    Returns the losses and the pre-clip gradient norms (Adam and clipping hide a gradient scale error; the norm
    shows it)."""
    # eps well above the rounding noise of near-zero gradients, where Adam's g / sqrt(v) is ill-conditioned
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4, weight_decay=0.1)
    losses, norms = [], []
    for latents, t, context, target in batches:
        out = model(latents[rows], t[rows], context[rows])
        loss = ((out - target[rows]) ** 2).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)  # small enough to clip
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).item())
    return losses, norms


def _full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state.items()}


# (dp_replicate, sp, ac_mode): FSDP shard 2; HSDP replicate 2 × shard 1; SP 2 (one SP group holds the whole
# global batch) with FSDP over the SP ranks.
LAYOUTS = [(1, 1, "full"), (2, 1, "none"), (1, 2, "selective")]


def _layouts_rank(rank: int, world: int) -> list[tuple[list[float], list[float], dict[str, torch.Tensor]]]:
    results = []
    for dp_replicate, sp, ac_mode in LAYOUTS:
        dims = build_mesh(world, dp_replicate, sp, "cpu", num_heads=WAN_CONFIGS["tiny"].num_heads)
        model = _tiny()
        parallelize_wan(model, dims, ac_mode=ac_mode, param_dtype=torch.float32, reduce_dtype=torch.float32)
        # Each SP group (dp rank) takes its own samples of the global batch.
        per_rank = GLOBAL_BATCH // dims.dp_size
        rows = slice(dims.dp_rank * per_rank, (dims.dp_rank + 1) * per_rank)
        losses, norms = _train(model, _batches(GLOBAL_BATCH), rows)
        results.append((losses, norms, _full_params(model)))
    return results


@pytest.mark.multiproc
def test_fsdp_hsdp_sp_steps_equal_one_process():
    ranks = run_multiproc(_layouts_rank, 2)
    reference = _tiny()
    expected_losses, expected_norms = _train(reference, _batches(GLOBAL_BATCH), slice(None))
    expected = _full_params(reference)
    for i, (dp_replicate, sp, ac_mode) in enumerate(LAYOUTS):
        # A rank's loss is the mean over its SP group's rows; the mean over ranks is the global loss.
        global_losses = [sum(r[i][0][step] for r in ranks) / len(ranks) for step in range(STEPS)]
        torch.testing.assert_close(global_losses, expected_losses, rtol=1e-5, atol=0)
        for rank, (_, norms, params) in enumerate(r[i] for r in ranks):
            layout = f"dp_replicate={dp_replicate} sp={sp} ac={ac_mode} rank {rank}"
            torch.testing.assert_close(norms, expected_norms, rtol=1e-5, atol=0, msg=lambda m: f"{layout} norm: {m}")
            for name, value in expected.items():
                msg = lambda m: f"{layout} {name}: {m}"  # noqa: E731
                torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6, msg=msg)


# ---- loading diffusers weights into shards ----
LOAD_CASES = [(1, False), (2, True)]  # (sp, frozen): trainable FSDP shard 2; frozen bf16-style teacher under SP 2


def _load_cases_rank(rank: int, world: int, path: str) -> list[dict]:
    return [_load_rank(path, sp, frozen) for sp, frozen in LOAD_CASES]


def _load_rank(path: str, sp: int, frozen: bool) -> dict:
    dims = build_mesh(2, 1, sp, "cpu")
    with torch.device("meta"):
        model = WanModel(config_with(WAN_CONFIGS["tiny"], vsa_gate=True))
    parallelize_wan(model, dims, frozen=frozen, param_dtype=torch.float32, ac_mode="full")
    load_sharded(model, path, "cpu")
    local_rows = {k: v.to_local().shape[0] for k, v in model.state_dict().items()}
    latents, t, context, _ = _batches(1)[0]
    with torch.no_grad():
        out = model(latents, t, context)
    return {"params": _full_params(model), "out": out, "local_rows": local_rows}


@pytest.mark.multiproc
def test_load_sharded_equals_full_model(tmp_path):
    source = _tiny()  # no VSA gate in the checkpoint: the loader must zero it
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from init, so a skipped tensor shows
    export_pretrained(source, tmp_path / "ckpt")
    latents, t, context, _ = _batches(1)[0]
    with torch.no_grad():
        expected_out = source(latents, t, context)
    cases = run_multiproc(_load_cases_rank, 2, str(tmp_path / "ckpt"))
    for i in range(len(LOAD_CASES)):
        ranks = [c[i] for c in cases]
        for rank, result in enumerate(ranks):
            for name, value in source.state_dict().items():
                torch.testing.assert_close(result["params"][name], value, rtol=0, atol=0, msg=name)
            gate = {k: v for k, v in result["params"].items() if "to_gate_compress" in k}
            assert gate and all(torch.all(v == 0) for v in gate.values())
            torch.testing.assert_close(result["out"], expected_out, rtol=1e-5, atol=1e-5)
        # each rank holds about half of every sharded tensor, not a full copy
        fc1 = "blocks.0.ffn.fc1.weight"
        assert [r["local_rows"][fc1] for r in ranks] == [WAN_CONFIGS["tiny"].ffn_dim // 2] * 2


def test_load_sharded_rejects_mismatched_checkpoint(tmp_path):
    export_pretrained(_tiny(), tmp_path / "ckpt")
    with torch.device("meta"):
        model = WanModel(config_with(WAN_CONFIGS["tiny"], num_layers=3))
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): blocks\.2\."):
        load_sharded(model, tmp_path / "ckpt", "cpu")


# ---- activation checkpointing (single process) ----
@pytest.mark.parametrize("mode", ["full", "selective", "attention"])
def test_ac_keeps_gradients_and_state_dict_keys(mode):
    latents, t, context, target = _batches(1)[0]
    plain, wrapped = _tiny(), _tiny()
    apply_ac(wrapped, mode)
    assert type(wrapped.blocks[0]).__name__ == "CheckpointWrapper"
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    for model in (plain, wrapped):
        ((model(latents, t, context) - target) ** 2).mean().backward()
    grads = dict(plain.named_parameters())
    for name, p in wrapped.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode, runs_per_block", [("full", 2), ("selective", 1), ("attention", 1)])
def test_ac_recomputes_attention_only_in_full_mode(mode, runs_per_block):
    """The point of "selective" and "attention": backward reuses the saved attention outputs instead of running the
    attention forward again (counted below SAC, at the aten level)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from parallel.ac import _ATTENTION_OPS

    class CountAttention(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountAttention.calls += func in _ATTENTION_OPS
            return func(*args, **(kwargs or {}))

    latents, t, context, target = _batches(1)[0]
    model = _tiny()
    apply_ac(model, mode)
    with CountAttention():
        ((model(latents, t, context) - target) ** 2).mean().backward()
    # two attentions per block (self and cross), run once in the forward and again in a full-AC recompute
    assert CountAttention.calls == 2 * len(model.blocks) * runs_per_block


def test_ac_rejects_unknown_mode():
    with pytest.raises(ValueError, match="'partial' is not one of"):
        apply_ac(_tiny(), "partial")


# ---- mesh sizes ----
def test_parallel_sizes():
    assert check_parallel_sizes(64, 8, 4, num_heads=40) == 2  # 14B recipe: HSDP 8 × (shard 2 · sp 4)
    assert check_parallel_sizes(64, 64, 1, num_heads=12) == 1  # 1.3B recipe: replication only
    with pytest.raises(ValueError, match=r"dp_replicate=3 × parallel.sp=2 = 6 does not divide the world size 8"):
        check_parallel_sizes(8, 3, 2)
    with pytest.raises(ValueError, match=r"parallel.sp=8 does not divide the model's num_heads=12.*\[1, 2, 3, 4, 6"):
        check_parallel_sizes(8, 1, 8, num_heads=12)
    with pytest.raises(ValueError, match="parallel.sp must be a positive int"):
        check_parallel_sizes(8, 1, 0)


def test_init_distributed_without_torchrun():
    # `python recipe.py` (no torchrun environment) gets a one-process gloo group and a 1×1×1 mesh.
    code = (
        "from parallel.mesh import init_distributed, build_mesh\n"
        "rank, world, device = init_distributed()\n"
        "dims = build_mesh(world, 1, 1, device.type)\n"
        "print(rank, world, device.type, dims.dp_rank, dims.dp_size, dims.sp_rank)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1", "cpu", "0", "1", "0"]
