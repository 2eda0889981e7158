"""LoRA Sparse-distill (models/lora.py): adapters on one shared frozen base.

Checks: a fresh adapter (B = 0) leaves every view bit-identical to the base; a merged adapter computes what the
unmerged one does (fp32, 1e-6); activation checkpointing recomputes a block with the adapter and attention its
forward used, although other views ran in between; 2 gloo ranks (FSDP2, and Ulysses SP 2; sharded loading and
adapter init) train the adapter like one process; the tiny recipe in LoRA mode gives gradients to adapter parameters
only, leaves the base bit for bit, checkpoints only adapters, writes the merged and the adapter exports and resumes
to identical losses; bad [lora] values fail before any model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from attention.sdpa import sdpa_attention
from attention.vsa import dense_gated_attention, vsa_attention, vsa_meta
from components.config import ConfigError
from models.lora import (
    TARGETS,
    AdapterView,
    apply_lora,
    freeze_base,
    is_adapter_param,
    lora_scale,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
)
from models.wan import WAN_CONFIGS, WanModel, config_with
from models.wan_weights import export_pretrained
from parallel.ac import apply_ac
from tests.multiproc import run_multiproc
from tests.test_recipes import kill_and_relaunch, load_recipe, logged, losses, run, tiny_argv

CFG = config_with(WAN_CONFIGS["tiny"], vsa_gate=True)
ALL = list(TARGETS)


def _base(seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    return WanModel(CFG)


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, CFG.in_channels, 2, 8, 8, generator=g)  # grid (2, 4, 4): 32 tokens, 2 VSA tiles
    t = torch.rand(batch, generator=g) * 1000
    context = torch.randn(batch, 5, CFG.text_dim, generator=g)
    return latents, t, context


def _perturb_adapters(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_param(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _plain(attn_fn) -> WanModel:
    model = _base()
    for block in model.blocks:
        block.attn1.attn_fn = attn_fn
    return model


@pytest.mark.parametrize("gate", ["lora", "full"])
def test_fresh_adapters_are_the_base_bit_for_bit(gate):
    latents, t, context = _inputs()
    meta = vsa_meta(_base().token_grid(latents.shape), 0.5, "cpu")
    model = _base()
    swapped = apply_lora(model, 4, 8.0, ALL, gate=gate)
    assert len(swapped) == CFG.num_layers * 11  # 4 + 4 + 2 linears and the gate per block
    for adapter, attn, m in (("student", vsa_attention, meta), ("critic", dense_gated_attention, vsa_meta(
            (2, 4, 4), 0.0, "cpu")), (None, sdpa_attention, None)):
        expected = _plain(attn)(latents, t, context, m)
        assert torch.equal(AdapterView(model, adapter, attn)(latents, t, context, m), expected), adapter
    # the base keeps its state-dict names; each adapter adds its own
    assert {k for k in model.state_dict() if not is_adapter_param(k)} == set(_base().state_dict())
    assert "blocks.1.attn1.to_q.lora_A.student" in lora_state_dict(model, "student")


@pytest.mark.parametrize("gate", ["lora", "full"])
def test_merged_adapter_equals_unmerged(gate):
    latents, t, context = _inputs()
    meta = vsa_meta((2, 4, 4), 0.5, "cpu")
    model = _base()
    apply_lora(model, 4, 8.0, ALL, gate=gate)
    _perturb_adapters(model)
    student = AdapterView(model, "student", vsa_attention)
    unmerged = student(latents, t, context, meta).detach()
    atol = 1e-6 * float(unmerged.abs().max())
    assert not torch.allclose(unmerged, _plain(vsa_attention)(latents, t, context, meta))  # the adapter does act

    plain = _plain(vsa_attention)  # the export path: a plain WanModel from the merged state dict
    plain.load_state_dict(merged_state_dict(model.state_dict(), "student", lora_scale(model)))
    torch.testing.assert_close(plain(latents, t, context, meta).detach(), unmerged, rtol=1e-6, atol=atol)
    merged = copy.deepcopy(model)  # in place: the base absorbs the adapter, the adapter becomes zero
    merge_lora(merged, "student")
    out = AdapterView(merged, "student", vsa_attention)(latents, t, context, meta).detach()
    torch.testing.assert_close(out, unmerged, rtol=1e-6, atol=atol)


def test_fp8_refuses_unmerged_adapters():
    """FP8 swaps a block's linears for its own: an unmerged LoRALinear would lose its adapter without a word."""
    from inference.fp8 import quantize_linears_fp8

    model = _base()
    apply_lora(model, 4, 8.0, ALL)
    with pytest.raises(ValueError, match=r"not plain nn.Linear, e.g. LoRALinear \(0\.attn1\.\w+\).*merged"):
        quantize_linears_fp8(model)
    assert quantize_linears_fp8(_plain(vsa_attention)) > 0  # a plain model (the merged export) quantizes


@pytest.mark.parametrize("rank, targets, message", [
    (-1, ALL, "rank must be >= 0"),
    (4, ["self_attn", "mlp"], r"unknown LoRA target\(s\) \['mlp'\]; valid: \['cross_attn', 'ffn', 'self_attn'\]"),
])
def test_apply_lora_rejects_bad_values(rank, targets, message):
    with pytest.raises(ValueError, match=message):
        apply_lora(_base(), rank, 8.0, targets)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_ac_recompute_replays_the_views_adapter(mode):
    """Student forward with grad, then critic and teacher forwards (other adapters, other attention), then backward:
    the recomputed blocks must run as the student did."""
    latents, t, context = _inputs()
    meta = vsa_meta((2, 4, 4), 0.5, "cpu")
    grads = []
    for ac in ("none", mode):
        model = _base()
        apply_lora(model, 4, 8.0, ALL)
        _perturb_adapters(model)
        freeze_base(model)
        apply_ac(model, ac)
        student, critic = AdapterView(model, "student", vsa_attention), AdapterView(model, "critic", sdpa_attention)
        teacher = AdapterView(model, None, sdpa_attention)
        loss = student(latents, t, context, meta).square().mean()
        with torch.no_grad():
            critic(latents, t, context), teacher(latents, t, context)
        loss.backward()
        assert all(p.grad is None for p in critic.parameters())
        grads.append({n: p.grad for n, p in student.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


# ---- FSDP2 on 2 gloo ranks == one process ----
STEPS = 2


def _train_student(student: AdapterView, rows: slice) -> list[dict[str, torch.Tensor]]:
    """AdamW steps of the student adapter; returns each step's full adapter gradients."""
    latents, t, context = _inputs(batch=2)
    meta = vsa_meta((2, 4, 4), 0.5, "cpu")
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.0)
    out = []
    for _ in range(STEPS):
        student(latents[rows], t[rows], context[rows], meta).square().mean().backward()
        out.append({n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                    for n, p in student.named_parameters()})
        opt.step()
        opt.zero_grad()
    return out


SP_LAYOUTS = [1, 2]  # FSDP shard 2 (a sample per rank); Ulysses SP 2 (both ranks hold the batch) + FSDP over them


def _fsdp_rank(rank: int, world: int, path: str) -> list[tuple[list[dict], bool]]:
    from parallel.mesh import build_mesh
    from parallel.ulysses import attention_for
    from parallel.wan import load_sharded, parallelize_wan

    out = []
    for sp in SP_LAYOUTS:
        dims = build_mesh(world, 1, sp, "cpu", num_heads=CFG.num_heads)
        with torch.device("meta"):
            model = WanModel(CFG)
        apply_lora(model, 4, 8.0, ALL)
        parallelize_wan(model, dims, ac_mode="full", param_dtype=torch.float32, reduce_dtype=torch.float32)
        load_sharded(model, path, "cpu")
        student = AdapterView(model, "student", attention_for(model, vsa_attention))
        grads = _train_student(student, slice(rank, rank + 1) if sp == 1 else slice(None))
        base_frozen = all(p.grad is None and not p.requires_grad for n, p in model.named_parameters()
                          if not is_adapter_param(n))
        out.append((grads, base_frozen))
    return out


@pytest.mark.multiproc
def test_fsdp_and_sp_two_ranks_adapter_gradients_equal_one_process(tmp_path):
    export_pretrained(_base(), tmp_path / "base")
    ranks = run_multiproc(_fsdp_rank, 2, str(tmp_path / "base"), timeout=300.0)  # a loaded 2-core CI machine
    model = _base()
    apply_lora(model, 4, 8.0, ALL)
    freeze_base(model)
    expected = _train_student(AdapterView(model, "student", vsa_attention), slice(None))
    assert any(g.abs().max() > 0 for n, g in expected[1].items() if "lora_A" in n)  # B moved after step 1
    for i, sp in enumerate(SP_LAYOUTS):
        for rank, (grads, base_frozen) in enumerate(r[i] for r in ranks):
            assert base_frozen, rank
            for step in range(STEPS):
                for name, g in expected[step].items():
                    # sp 1: each rank's loss is the mean over its half of the batch; FSDP averages over ranks
                    msg = f"sp {sp} rank {rank} step {step} {name}"
                    torch.testing.assert_close(grads[step][name], g, rtol=1e-5, atol=1e-7, msg=msg)


# ---- the tiny recipe in LoRA mode ----
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


RECIPE = "wan21_1_3b_sparse_distill"
LORA = ("lora.rank=4", "lora.alpha=8.0")


def test_recipe_trains_only_adapters_keeps_base_and_resumes(tiny_data, tmp_path, monkeypatch):
    module = load_recipe(RECIPE)
    seen: dict = {}
    build_lora, apply_update = module.build_lora, module.apply_update

    def recording_build(*args, **kwargs):
        views = build_lora(*args, **kwargs)
        base = views["student"].base
        seen["base"] = {n: p for n, p in base.named_parameters() if not is_adapter_param(n)}
        seen["before"] = {n: _local(p).clone() for n, p in seen["base"].items()}
        return views

    def recording_update(model, optimizer, loss, max_norm):
        with_grad = {n for n, p in model.base.named_parameters() if p.grad is not None}
        seen.setdefault("grads", []).append((model.adapter_name, with_grad))
        return apply_update(model, optimizer, loss, max_norm)

    monkeypatch.setattr(module, "build_lora", recording_build)
    monkeypatch.setattr(module, "apply_update", recording_update)
    steps4 = ("run.max_steps=4", "run.val_every=4", "health.action=off", *LORA)
    full = run(module, tiny_argv(tiny_data, tmp_path, "full", *steps4))
    rows = logged(full)
    assert "loss/dmd" in rows[2] and "loss/dmd" in rows[4]

    # Only the stepped adapter had gradients; the base did not move.
    for adapter, with_grad in seen["grads"]:
        assert with_grad and all(is_adapter_param(n, adapter) for n in with_grad), adapter
    assert {a for a, _ in seen["grads"]} == {"student", "critic"}
    for name, value in seen["before"].items():  # (the process group is gone: the local shards, i.e. all of it)
        assert torch.equal(_local(seen["base"][name]), value), name
    # Checkpoints hold the adapters (and their optimizer state), not the base.
    ckpt_keys = json.dumps(sorted(dcp.FileSystemReader(full / "ckpt" / "step-000004")
                                  .read_metadata().state_dict_metadata))
    assert "lora_A.student" in ckpt_keys and "lora_B.critic" in ckpt_keys and "ffn.fc1.weight" not in ckpt_keys
    assert (full / "export" / "transformer" / "config.json").is_file()
    assert (full / "export_lora" / "pytorch_lora_weights.safetensors").is_file()

    # Killed during step 3 (after the step-2 checkpoint) and relaunched: steps 3-4 equal the uninterrupted run.
    argv = tiny_argv(tiny_data, tmp_path, "killed", *steps4)
    resumed = logged(kill_and_relaunch(monkeypatch, module, lambda: run(module, argv)))
    for step in (1, 2, 3, 4):
        assert losses(resumed[step]) == losses(rows[step]), step  # bit-exact on the tiny CPU config


@pytest.mark.parametrize("override, message", [
    ("lora.rank=-1", "lora: LoRA rank must be >= 0"),
    ("lora.targets=['self_attn','mlp']", r"lora: unknown LoRA target\(s\) \['mlp'\]"),
    ("lora.gate='half'", "lora.gate"),
])
def test_bad_lora_config_fails_before_any_model(override, message, tiny_data, tmp_path, monkeypatch):
    module = load_recipe(RECIPE)
    monkeypatch.setattr(module, "build_wan", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setattr(module, "build_lora", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ConfigError, match=message):
        run(module, tiny_argv(tiny_data, tmp_path, "bad", override))
