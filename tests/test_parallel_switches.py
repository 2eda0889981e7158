"""Parallel switches on gloo ranks against the plain run: FSDP2 CPU offload == no offload (trainable and frozen),
`load_sharded` onto a 2-D HSDP mesh == the full model, per-block torch.compile under Ulysses SP 2 == eager."""

from __future__ import annotations

import pytest
import torch

from models.wan import WAN_CONFIGS, WanModel, config_with
from models.wan_weights import export_pretrained
from parallel.mesh import build_mesh
from parallel.wan import load_sharded, parallelize_wan
from tests.multiproc import run_multiproc
from tests.test_parallel_fsdp import GLOBAL_BATCH, _batches, _full_params, _tiny, _train

pytestmark = pytest.mark.multiproc


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


def _offload_rank(rank: int, world: int, path: str) -> dict:
    dims = build_mesh(world, 1, 1, "cpu")
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    latents, t, context, _ = _batches(GLOBAL_BATCH)[0]
    out = {}
    for offload in (False, True):
        student = _build(dims, path, frozen=False, cpu_offload=offload)
        losses, norms = _train(student, _batches(GLOBAL_BATCH), rows)
        teacher = _build(dims, path, frozen=True, cpu_offload=offload)
        with torch.no_grad():
            teacher_out = teacher(latents[rows], t[rows], context[rows])
        out[offload] = {"losses": losses, "norms": norms, "params": _full_params(student), "teacher": teacher_out}
    return out


def test_fsdp_cpu_offload_equals_no_offload(tmp_path):
    _checkpoint(tmp_path / "ckpt")
    for rank, result in enumerate(run_multiproc(_offload_rank, 2, str(tmp_path / "ckpt"))):
        plain, offloaded = result[False], result[True]
        assert offloaded["losses"] == pytest.approx(plain["losses"], rel=1e-6), rank
        assert offloaded["norms"] == pytest.approx(plain["norms"], rel=1e-6), rank
        torch.testing.assert_close(offloaded["teacher"], plain["teacher"], rtol=1e-6, atol=1e-7)
        for name, value in plain["params"].items():
            torch.testing.assert_close(offloaded["params"][name], value, rtol=1e-6, atol=1e-7, msg=name)


def _hsdp_load_rank(rank: int, world: int, path: str) -> dict:
    dims = build_mesh(world, 2, 1, "cpu")  # 4 ranks: 2 replicas × 2 shards
    model = _build(dims, path, frozen=False, cpu_offload=False)
    local_rows = {k: v.to_local().shape[0] for k, v in model.state_dict().items()}
    latents, t, context, _ = _batches(1)[0]
    with torch.no_grad():
        out = model(latents, t, context)
    return {"params": _full_params(model), "out": out, "local_rows": local_rows, "placements": str(
        model.state_dict()["blocks.0.ffn.fc1.weight"].placements)}


def test_load_sharded_onto_a_2d_hsdp_mesh_equals_the_full_model(tmp_path):
    source = _checkpoint(tmp_path / "ckpt")
    latents, t, context, _ = _batches(1)[0]
    with torch.no_grad():
        expected_out = source(latents, t, context)
    ranks = run_multiproc(_hsdp_load_rank, 4, str(tmp_path / "ckpt"), timeout=180)
    for rank, result in enumerate(ranks):
        assert result["placements"] == "(Replicate(), Shard(dim=0))"
        for name, value in source.state_dict().items():
            torch.testing.assert_close(result["params"][name], value, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(result["out"], expected_out, rtol=1e-5, atol=1e-5)
    # the two ranks of a replica hold the two halves of every sharded tensor; replicas hold the same halves
    fc1 = "blocks.0.ffn.fc1.weight"
    assert [r["local_rows"][fc1] for r in ranks] == [WAN_CONFIGS["tiny"].ffn_dim // 2] * 4


def _compile_sp_rank(rank: int, world: int) -> dict:
    dims = build_mesh(world, 1, 2, "cpu", num_heads=WAN_CONFIGS["tiny"].num_heads)  # one SP group of 2
    out = {}
    for compile in (False, True):
        model = _tiny()
        parallelize_wan(model, dims, compile=compile, param_dtype=torch.float32, reduce_dtype=torch.float32)
        losses, norms = _train(model, _batches(GLOBAL_BATCH), slice(None))  # the SP group holds the whole batch
        out[compile] = {"losses": losses, "norms": norms, "params": _full_params(model)}
    return out


@pytest.mark.timeout(900)  # inductor compiles each graph piece on both ranks (C++ on a 2-core CPU)
def test_compile_with_ulysses_equals_eager():
    """Per-block torch.compile (the Ulysses all-to-alls break each block's graph) + FSDP over the SP group: two
    AdamW steps equal eager's, which equals one process (tests/test_parallel_fsdp.py checks that too)."""
    ranks = run_multiproc(_compile_sp_rank, 2, timeout=800)
    expected_losses, expected_norms = _train(_tiny(), _batches(GLOBAL_BATCH), slice(None))
    for rank, result in enumerate(ranks):
        eager, compiled = result[False], result[True]
        assert eager["losses"] == pytest.approx(expected_losses, rel=1e-5), rank
        assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5), rank
        assert compiled["norms"] == pytest.approx(eager["norms"], rel=1e-5), rank
        for name, value in eager["params"].items():
            torch.testing.assert_close(compiled["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
