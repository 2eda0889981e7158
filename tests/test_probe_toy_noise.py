"""scripts/probe_toy_noise.py: its fine-detail filter, projection and noise-dependence against analytic values, and
the whole probe on a run whose critic and student are the teacher (g = 0: no push; the student's steps are the
teacher's)."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

from components.config import dump_toml, load_config

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "tests/assets/toy_teacher"


def load_probe():
    spec = importlib.util.spec_from_file_location("script_probe_toy_noise", ROOT / "scripts/probe_toy_noise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe_toy_noise = load_probe()


def test_fine_detail_is_zero_on_flat_frames_and_keeps_164_256_of_white_noise():
    flat = torch.full((2, 4, 2, 16, 16), 3.0)
    assert probe_toy_noise.fine_detail(flat).abs().max() < 1e-6
    noise = 0.5 * torch.randn(4, 4, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    inner = probe_toy_noise.fine_detail(noise)[..., 1:-1, 1:-1]  # the replicated border filters differently
    # the high-pass x − blur has taps 1 − 4/16 (centre), −2/16 (4 edges), −1/16 (4 corners): energy 164/256
    assert inner.square().mean().item() == pytest.approx(164 / 256 * 0.25, rel=0.02)


def test_projection_share_of_a_scaled_sample_is_the_scale():
    x0 = torch.randn(3, 4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    share = probe_toy_noise.detail_projection(-0.3 * x0, x0).sum() / probe_toy_noise.fine_detail(x0).square().sum()
    assert share.item() == pytest.approx(-0.3, abs=1e-6)


def test_noise_dependent_detail_of_identical_and_of_passed_through_draws():
    base = torch.randn(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    assert probe_toy_noise.noise_dependent_detail(base.expand(4, *base.shape)) < 1e-6
    draws = base + torch.randn(4, *base.shape, generator=torch.Generator().manual_seed(3))
    spread = probe_toy_noise.fine_detail((draws - draws.mean(0)).flatten(0, 1)).square().mean().sqrt().item()
    assert probe_toy_noise.noise_dependent_detail(draws) == pytest.approx(spread)


def fake_run(tmp_path: Path, guidance: float) -> Path:
    """A run directory whose student and critic exports are the teacher's, all three dense (no training)."""
    sys.path.insert(0, str(ROOT / "recipes"))
    import toy_sparse_distill

    cfg = load_config(toy_sparse_distill.RecipeConfig, [
        f"model.teacher={TEACHER}", "attn.student=sdpa", "attn.critic=dense", f"dmd.guidance={guidance}",
        "data.num_train=8", "data.num_heldout=6"], default_toml=ROOT / "recipes/toy_sparse_distill.toml")
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(dump_toml(cfg))
    for export in ("student", "critic"):
        shutil.copytree(TEACHER, run / export)
    return run


def test_probe_of_teacher_copies_has_no_push_and_the_teacher_s_steps(tmp_path):
    """Critic = teacher and no CFG: g = critic − teacher is exactly 0 at every score timestep, so the push is 0; the
    student = teacher, so every step's student column is the teacher column (same inputs, same network). With CFG
    the push is not 0 (the probe compares the critic with the guided teacher)."""
    torch.set_num_threads(1)
    result = probe_toy_noise.probe(fake_run(tmp_path / "a", guidance=0.0), num=6, draws=2, device="cpu")
    assert all(v == 0.0 for values in result["push"].values() for v in values)
    assert [row["step"] for row in result["steps"]] == [1000, 757, 522]
    for row in result["steps"]:
        assert row["input"] > 0.1 and row["student"] == pytest.approx(row["teacher"], rel=1e-5)
        assert 0 < row["student"]["gain"] < 0.5  # the teacher's x0 prediction removes most of the input's noise
    guided = probe_toy_noise.probe(fake_run(tmp_path / "b", guidance=0.5), num=6, draws=2, device="cpu")
    assert guided["push"]["student-3"][-1] != 0.0


def test_probe_names_a_run_without_a_critic_export(tmp_path, capsys):
    run = fake_run(tmp_path, guidance=0.0)
    shutil.rmtree(run / "critic")
    with pytest.raises(SystemExit):
        probe_toy_noise.main([str(run)])
    err = capsys.readouterr().err
    assert "critic not found" in err and "rerun recipes/toy_sparse_distill.py" in err
