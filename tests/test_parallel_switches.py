"""Parallel switches on gloo ranks against the plain run: `load_sharded` onto a 2-D HSDP mesh == the full model, FSDP2
CPU offload == no offload (trainable and frozen, on that mesh), per-block torch.compile under Ulysses SP 2 == eager."""

from __future__ import annotations

import pytest
import torch

from models.wan import WAN_CONFIGS, WanModel
from models.wan_weights import export_pretrained
from parallel.mesh import build_mesh
from parallel.wan import load_sharded, parallelize_wan
from tests.multiproc import run_multiproc
from tests.test_parallel_fsdp import GLOBAL_BATCH, _batches, _full_params, _tiny, _train

pytestmark = pytest.mark.multiproc
HSDP_BATCH = 4  # one sample per rank


def _checkpoint(folder) -> WanModel:
    """A tiny model moved off its init (so a tensor left unloaded shows), exported in diffusers' format."""
    source = _tiny()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    export_pretrained(source, folder)
    return source


def _build(dims, path: str, frozen: bool, cpu_offload: bool) -> WanModel:
    with torch.device("meta"):
        model = WanModel(WAN_CONFIGS["tiny"])
    parallelize_wan(model, dims, frozen=frozen, param_dtype=torch.float32, reduce_dtype=torch.float32,
                    cpu_offload=cpu_offload)
    load_sharded(model, path, "cpu", cpu_offload=cpu_offload)
    return model


def _hsdp_rank(rank: int, world: int, path: str) -> dict:
    """On a 2 × 2 HSDP mesh (2 replicas of 2 shards): the loaded weights and a forward, then AdamW steps and a frozen
    teacher's forward with and without CPU offload."""
    dims = build_mesh(world, 2, 1, "cpu")
    per_rank = HSDP_BATCH // dims.dp_size
    rows = slice(dims.dp_rank * per_rank, (dims.dp_rank + 1) * per_rank)
    latents, t, context, _ = _batches(HSDP_BATCH)[0]
    out = {}
    for offload in (False, True):
        student = _build(dims, path, frozen=False, cpu_offload=offload)
        if not offload:
            fc1 = student.state_dict()["blocks.0.ffn.fc1.weight"]
            out["placements"], out["fc1_rows"] = str(fc1.placements), fc1.to_local().shape[0]
            out["loaded"] = _full_params(student)
            with torch.no_grad():
                out["forward"] = student(latents, t, context)
        losses, norms = _train(student, _batches(HSDP_BATCH), rows)
        teacher = _build(dims, path, frozen=True, cpu_offload=offload)
        with torch.no_grad():
            teacher_out = teacher(latents[rows], t[rows], context[rows])
        out[offload] = {"losses": losses, "norms": norms, "params": _full_params(student), "teacher": teacher_out}
    return out


def test_hsdp_load_and_cpu_offload(tmp_path):
    """load_sharded onto the 2-D mesh == the full model (each rank holds its shard's half of a tensor, the replicas
    the same halves); FSDP2 CPU offload == no offload, trainable (2 AdamW steps) and frozen."""
    source = _checkpoint(tmp_path / "ckpt")
    latents, t, context, _ = _batches(HSDP_BATCH)[0]
    with torch.no_grad():
        expected_out = source(latents, t, context)
    ranks = run_multiproc(_hsdp_rank, 4, str(tmp_path / "ckpt"), timeout=240)
    for rank, result in enumerate(ranks):
        assert result["placements"] == "(Replicate(), Shard(dim=0))"
        assert result["fc1_rows"] == WAN_CONFIGS["tiny"].ffn_dim // 2
        for name, value in source.state_dict().items():
            torch.testing.assert_close(result["loaded"][name], value, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(result["forward"], expected_out, rtol=1e-5, atol=1e-5)
        plain, offloaded = result[False], result[True]
        assert offloaded["losses"] == pytest.approx(plain["losses"], rel=1e-6), rank
        assert offloaded["norms"] == pytest.approx(plain["norms"], rel=1e-6), rank
        torch.testing.assert_close(offloaded["teacher"], plain["teacher"], rtol=1e-6, atol=1e-7)
        for name, value in plain["params"].items():
            torch.testing.assert_close(offloaded["params"][name], value, rtol=1e-6, atol=1e-7, msg=name)
            assert not torch.equal(value, source.state_dict()[name]) or "gate" in name, name  # the steps moved it


def _compile_sp_rank(rank: int, world: int) -> dict:
    dims = build_mesh(world, 1, 2, "cpu", num_heads=WAN_CONFIGS["tiny"].num_heads)  # one SP group of 2
    # aot_eager: dynamo's graphs and breaks around the all-to-alls, AOT autograd's joint graphs and FSDP's hooks around
    # them, as with inductor, without inductor's C++ builds (cold: ~5 min here on 2 loaded cores). Inductor's own
    # numerics are checked in one process by test_speedups_exact.py. This worker process's Module.compile only.
    compile_module = torch.nn.Module.compile
    torch.nn.Module.compile = lambda self, **kwargs: compile_module(self, backend="aot_eager", **kwargs)
    out = {}
    for compile in (False, True):
        model = _tiny()
        parallelize_wan(model, dims, compile=compile, param_dtype=torch.float32, reduce_dtype=torch.float32)
        out[f"compiled_{compile}"] = all(b._compiled_call_impl is not None for b in model.blocks)
        losses, norms = _train(model, _batches(GLOBAL_BATCH), slice(None))  # the SP group holds the whole batch
        out[compile] = {"losses": losses, "norms": norms, "params": _full_params(model)}
    out["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # dynamo captured, not all-eager
    return out


def test_compile_with_ulysses_equals_eager():
    """Per-block torch.compile (the Ulysses all-to-alls break each block's graph; aot_eager backend, see the worker) +
    FSDP over the SP group: two AdamW steps equal eager's, which equals one process."""
    ranks = run_multiproc(_compile_sp_rank, 2, timeout=300)
    expected_losses, expected_norms = _train(_tiny(), _batches(GLOBAL_BATCH), slice(None))
    for rank, result in enumerate(ranks):
        eager, compiled = result[False], result[True]
        assert result["compiled_True"] and not result["compiled_False"] and result["graphs"] > 0
        assert eager["losses"] == pytest.approx(expected_losses, rel=1e-5), rank
        assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5), rank
        assert compiled["norms"] == pytest.approx(eager["norms"], rel=1e-5), rank
        for name, value in eager["params"].items():
            torch.testing.assert_close(compiled["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
