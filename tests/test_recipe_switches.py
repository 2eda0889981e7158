"""Recipe switches a user turns, each run through a real recipe (the 1.3B one: the 14B and 5B recipes carry checked
copies of the same code below their imports) with the tiny overlay, against something independent:

- `optim.grad_accum = 2` with batch 1 == batch 2 with no accumulation (losses, grad norms, weights);
- `run.ema_decay > 0`: the exported EMA == the recurrence ema ← d·ema + (1 − d)·w over the student after each update;
- `attn.sparsity_ramp`: the ρ the student runs at and logs each step == the ramp's formula;
- `parallel.mixed_precision = "bf16"` (the tiny overlay forces fp32): runs, and its losses stay near fp32's;
- HSDP through the recipe under torchrun (2 gloo ranks, dp_replicate = 2) == one process on the same global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.tensor import DTensor

from models.wan_weights import load_pretrained
from parallel.mesh import free_port
from tests.recipe_shims import install_layout_free_random
from tests.test_recipes import RECIPES, ROOT, load_recipe, logged, run, tiny_argv

# Three steps (critic, student + critic, critic) at a learning rate that moves the weights, so step 3 sees both
# networks' updates; a one-step rollout schedule (tests/recipe_shims.py says why).
THREE_STEPS = ("run.max_steps=3", "dmd.student_every=2", "dmd.steps=[757]", "optim.lr=1e-3", "optim.critic_lr=1e-3",
               "run.ckpt_every=0", "run.val_every=100", "run.val_count=1")
COMPARED = ("loss/critic", "grad_norm/critic", "loss/dmd", "grad_norm/student", "dmd/denom")


def load_recipe_without_decoding(monkeypatch):
    """The 1.3B recipe, its validation samples not decoded: the tiny VAE's decode is most of a tiny run's CPU time,
    and test_recipes.py checks the samples."""
    module = load_recipe(RECIPES[0])
    monkeypatch.setattr(module, "save_samples", lambda *args: None)
    return module


def compared(row: dict) -> dict:
    return {k: row[k] for k in COMPARED if k in row}


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for k, p in model.named_parameters()}


def exported(folder) -> dict[str, torch.Tensor]:
    return params(load_pretrained(folder, vsa_gate=True))


def assert_same_run(got: dict[int, dict], expected: dict[int, dict], rtol: float) -> None:
    # Step 0 holds the health check's start-of-run statistics (its own test covers them); compare the training steps.
    got, expected = ({k: v for k, v in rows.items() if k > 0} for rows in (got, expected))
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step in expected:
        assert compared(got[step]).keys() == compared(expected[step]).keys(), step
        assert compared(got[step]) == pytest.approx(compared(expected[step]), rel=rtol, abs=1e-9), step


def assert_weights_close(got: dict, expected: dict, init: dict, rtol: float, atol: float) -> None:
    """Weights equal within (rtol, atol). An Adam step moves a weight by about lr whatever its gradient, so fp32
    noise in a near-zero gradient can move it by a noticeable fraction of lr (1e-3 here). Measured worst case: 2.5e-5
    (one element of 4096, grad_accum, 1 thread per xdist worker); callers' atol leaves a margin over it."""
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    moved = max((expected[k] - init[k]).abs().max().item() for k in expected)
    assert moved > 10 * atol  # the weights moved far more than the tolerance: the comparison can fail


def test_grad_accum_two_micro_batches_equal_a_batch_of_two(tiny_data, tmp_path, monkeypatch):
    """Same samples and noise (tests/recipe_shims.py), the recipe's own DMD normaliser (per sample): accumulating two
    micro-batches of 1 must give the update of one batch of 2; fp32 differences only (batched vs single GEMMs)."""
    module = load_recipe_without_decoding(monkeypatch)
    runs = {}
    for name, accum, batch in (("accum", 2, 1), ("batch", 1, 2)):
        install_layout_free_random(module, monkeypatch.setattr)  # fresh streams for each run
        overrides = (f"optim.grad_accum={accum}", f"data.batch_size={batch}")
        runs[name] = run(module, tiny_argv(tiny_data, tmp_path, name, *THREE_STEPS, *overrides))
    assert_same_run(logged(runs["accum"]), logged(runs["batch"]), rtol=1e-5)
    init = exported(runs["batch"] / "random_init")
    assert_weights_close(exported(runs["accum"] / "export"), exported(runs["batch"] / "export"), init, 1e-4, 4e-5)


def test_ema_equals_the_recurrence_over_the_student_updates(tiny_data, tmp_path, monkeypatch):
    module = load_recipe_without_decoding(monkeypatch)
    decay = 0.6
    students, after_update = [], []
    student_step, apply_update = module.student_step, module.apply_update

    def recording_student_step(student, *args):
        students.append(student)
        return student_step(student, *args)

    def recording_apply_update(model, *args):
        out = apply_update(model, *args)
        if students and model is students[0]:
            after_update.append(params(model))
        return out

    monkeypatch.setattr(module, "student_step", recording_student_step)
    monkeypatch.setattr(module, "apply_update", recording_apply_update)
    argv = tiny_argv(tiny_data, tmp_path, "ema", *THREE_STEPS, "dmd.student_every=1", f"run.ema_decay={decay}")
    run_dir = run(module, argv)
    assert len(after_update) == 3  # a student update at every step
    init = exported(run_dir / "random_init")  # the EMA starts at the student's initial weights (gate: zeros)
    expected = dict(init)
    for weights in after_update:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    assert (run_dir / "export_ema" / "transformer" / "config.json").is_file()
    assert_weights_close(exported(run_dir / "export_ema"), expected, init, rtol=1e-5, atol=1e-7)
    # The live student is exported unchanged next to it, and the EMA is neither it nor the initial weights.
    assert_weights_close(exported(run_dir / "export"), after_update[-1], init, rtol=0, atol=0)
    ema, live = exported(run_dir / "export_ema"), after_update[-1]
    assert max((ema[k] - live[k]).abs().max().item() for k in live) > 1e-4


def test_sparsity_ramp_sets_the_students_rho_each_step(tiny_data, tmp_path, monkeypatch):
    module = load_recipe_without_decoding(monkeypatch)
    start, increment, interval, target = 0.0, 0.4, 2, 0.8
    built = []
    vsa_meta = module.vsa_meta

    def recording_vsa_meta(grid, rho, device):
        built.append(rho)
        return vsa_meta(grid, rho, device)

    monkeypatch.setattr(module, "vsa_meta", recording_vsa_meta)
    ramp = f"attn.sparsity_ramp=[{start}, {increment}, {interval}]"
    rows = logged(run(module, tiny_argv(tiny_data, tmp_path, "ramp", *THREE_STEPS, "run.max_steps=4", ramp,
                                        f"attn.sparsity={target}")))
    expected = [min(start + increment * (k // interval), target) for k in (1, 2, 3, 4)]  # ρ_k, the TOML's formula
    assert expected == pytest.approx([0.0, 0.4, 0.4, 0.8])
    assert [rows[k]["attn/vsa_sparsity"] for k in (1, 2, 3, 4)] == pytest.approx(expected)
    # One student metadata per training step, in order; the others are the gated critic's tiles at ρ = 0
    # (attn.critic = "dense_gated") and validation samples (health reference, validation steps) at the target ρ.
    starts = [i for i in range(len(built) - 3) if built[i : i + 4] == pytest.approx(expected)]
    assert starts, built
    others = built[: starts[0]] + built[starts[0] + 4 :]
    assert {round(rho, 6) for rho in others} <= {0.0, target}, built
    tiles = [vsa_meta((5, 4, 8), rho, "cpu").topk for rho in expected]  # the tiny overlay's token grid
    assert tiles[0] > tiles[-1]  # the ramp changes how many tiles the student attends to


def test_bf16_recipe_runs_close_to_fp32(tiny_data, tmp_path, monkeypatch):
    """bf16 compute (FSDP2 bf16 parameters + autocast) against the same run in fp32. Measured on the tiny model
    (torch 2.13 CPU): the largest relative difference of a logged loss or grad norm over the 3 steps is 7.4e-3 (the
    student's grad norm; critic losses ~1e-4); the bound is ~7x that."""
    module = load_recipe_without_decoding(monkeypatch)
    fp32 = logged(run(module, tiny_argv(tiny_data, tmp_path, "fp32", *THREE_STEPS)))
    bf16 = logged(run(module, tiny_argv(tiny_data, tmp_path, "bf16", *THREE_STEPS, "parallel.mixed_precision=bf16")))
    rel = {(step, k): abs(bf16[step][k] / fp32[step][k] - 1) for step in fp32 for k in compared(fp32[step])}
    assert all(torch.isfinite(torch.tensor(list(compared(r).values()))).all() for r in bf16.values())
    assert max(rel.values()) < 5e-2, rel
    assert max(rel.values()) > 0  # the bf16 path was taken


@pytest.mark.multiproc
def test_hsdp_two_ranks_under_torchrun_equal_one_process(tiny_data, tmp_path, monkeypatch):
    """torchrun, 2 gloo ranks, parallel.dp_replicate = 2 (pure replication: gradients all-reduced, no sharding), batch
    1 per rank == one process accumulating the same two samples (the DMD normaliser is per sample); the same
    per-sample noise in both (tests/recipe_shims.py)."""
    module = load_recipe_without_decoding(monkeypatch)
    install_layout_free_random(module, monkeypatch.setattr)
    single = run(module, tiny_argv(tiny_data, tmp_path, "one", *THREE_STEPS, "optim.grad_accum=2"))
    argv = tiny_argv(tiny_data, tmp_path, "hsdp", *THREE_STEPS, "parallel.dp_replicate=2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "recipe_shims.py"), str(ROOT / "recipes" / f"{RECIPES[0]}.py"), *argv]
    # torchrun sets the rank variables itself; the in-process run above left its own in os.environ.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hsdp = tmp_path / RECIPES[0] / "hsdp"
    assert "world_size: 2" in (hsdp / "env.txt").read_text()
    assert_same_run(logged(hsdp), logged(single), rtol=1e-5)
    init = exported(single / "random_init")
    assert_weights_close(exported(hsdp / "export"), exported(single / "export"), init, 1e-4, 1e-5)
