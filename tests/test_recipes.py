"""The three Sparse-distill recipes on CPU with tiny random models (tests/assets/tiny.toml), in-process, world of 1.

Checks: a short run makes a student step and critic steps and a complete run directory (config, recipe copy, env,
metrics.jsonl, TensorBoard scalars and a validation frame strip, mp4 samples, checkpoint, a diffusers-loadable export);
two identical runs log identical losses; a run killed after its step-2 checkpoint and relaunched under the same
run.name logs the same step-3/4 losses as an uninterrupted run; a skipped non-finite critic update leaves the critic
untouched (the next student loss equals a run whose critic never moves); config errors name the key or file before
any model is built.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from components.config import ConfigError, load_config
from tests.recipe_shims import load_recipe as load_path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "assets" / "tiny.toml"
RECIPES = ["wan21_1_3b_sparse_distill", "wan21_14b_sparse_distill", "wan22_ti2v_5b_sparse_distill"]
LOSSES = ("loss/critic", "loss/dmd", "grad_norm/critic", "grad_norm/student", "dmd/denom")


def load_recipe(name: str):
    return load_path(ROOT / "recipes" / f"{name}.py")


@pytest.fixture(autouse=True)
def no_process_group():
    yield
    if dist.is_initialized():  # a run that raised mid-way leaves its group behind
        dist.destroy_process_group()


def tiny_argv(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["--toml", str(TINY), f"model.base={data / 'pipeline'}", f"data.path={data / 'latents'}",
            f"data.negative_prompt={data / 'negative_prompt.safetensors'}", f"data.val_prompts={data / 'prompts'}",
            f"run.out_dir={out}", f"run.name={name}", *extra]


def config(module, argv: list[str]):
    return load_config(module.RecipeConfig, argv, default_toml=ROOT / "recipes" / f"{Path(module.__file__).stem}.toml")


def run(module, argv: list[str]) -> Path:
    return module.main(config(module, argv))


def logged(run_dir: Path) -> dict[int, dict]:
    """step -> its metrics.jsonl rows merged, later rows winning (a relaunch appends rows for the steps it redoes;
    validation and the health statistics log rows of their own)."""
    merged: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        merged.setdefault(row["step"], {}).update(row)
    return merged


def losses(row: dict) -> dict:
    return {k: row[k] for k in LOSSES if k in row}


def kill_and_relaunch(monkeypatch, module, launch: Callable[[], Path]) -> Path:
    """`launch()` killed during step 3, after the step-2 checkpoint (the recipe's critic_step raises on its third
    call), then launched again as it is; returns the relaunch's run directory."""
    critic_step, calls = module.critic_step, []

    def crash_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return critic_step(*args, **kwargs)

    monkeypatch.setattr(module, "critic_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        launch()
    dist.destroy_process_group()  # the killed launch's; the relaunch starts its own
    monkeypatch.setattr(module, "critic_step", critic_step)
    return launch()


@pytest.mark.parametrize("name", RECIPES)
def test_run_dir_and_resume_equals_uninterrupted(name, tiny_data, tmp_path, monkeypatch):
    module = load_recipe(name)
    steps4 = ("run.max_steps=4", "run.val_every=4")
    full = run(module, tiny_argv(tiny_data, tmp_path, "full", *steps4))

    # Run directory (STYLE "Run directory").
    assert (full / "config.toml").is_file() and (full / f"{name}.py").read_text() == Path(module.__file__).read_text()
    assert "torch" in (full / "env.txt").read_text()
    resolved = config(module, tiny_argv(tiny_data, tmp_path, "full", *steps4))
    assert config(module, ["--toml", str(full / "config.toml")]) == resolved  # config.toml reproduces the run
    rows = logged(full)
    assert sorted(rows) == [0, 1, 2, 3, 4]  # step 0: the health reference and the untrained student's statistics
    assert "loss/dmd" not in rows[1] and "loss/dmd" in rows[2] and "loss/dmd" in rows[4]  # student every 2nd step
    assert all(torch.isfinite(torch.tensor(list(losses(r).values()))).all() for r in rows.values())
    assert sorted(p.name for p in (full / "samples" / "step-000004").glob("*.mp4")) == ["prompt00.mp4", "prompt01.mp4"]
    assert (full / "ckpt" / "step-000004").is_dir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(full / "tb"))
    events.Reload()
    scalars = {"loss/critic", "loss/dmd", "lr/student", "time/step_s", "perf/tokens_per_s", "mem/max_reserved_gib"}
    assert scalars <= set(events.Tags()["scalars"])
    assert "val/prompt00" in events.Tags()["images"]
    from diffusers import WanTransformer3DModel

    exported = WanTransformer3DModel.from_pretrained(full / "export" / "transformer")
    assert exported.config.num_layers == 2 and exported.config.in_channels == 4

    # Same config, killed during step 3 (after the step-2 checkpoint), relaunched: steps 3-4 equal the full run.
    argv = tiny_argv(tiny_data, tmp_path, "killed", *steps4)
    resumed_dir = kill_and_relaunch(monkeypatch, module, lambda: run(module, argv))
    lines = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    launches = [row["step"] for row in lines if "loss/critic" in row]  # training rows (validation logs its own)
    assert launches == [1, 2, 3, 4]  # the relaunch started at step 3, not from scratch
    resumed = logged(resumed_dir)
    for step in (1, 2, 3, 4):  # 1-2: two launches of one config agree; 3-4: resume == uninterrupted
        assert losses(resumed[step]) == pytest.approx(losses(rows[step]), rel=1e-6, abs=1e-9), step


def test_skipped_nonfinite_update_leaves_critic_untouched_and_aborts(tiny_data, tmp_path, monkeypatch):
    module = load_recipe(RECIPES[0])
    # Reference: a critic that never moves (lr 0, so AdamW's decoupled weight decay is 0 too).
    frozen = logged(run(module, tiny_argv(tiny_data, tmp_path, "frozen_critic", "optim.critic_lr=0.0")))
    critic_loss = module.critic_loss
    monkeypatch.setattr(module, "critic_loss", lambda *a: critic_loss(*a) * float("nan"))
    # health.patience=3: the health guard's non-finite check (2 log steps in a row by default) would stop it first.
    argv = tiny_argv(tiny_data, tmp_path, "nonfinite", "run.max_nonfinite_in_row=3", "health.patience=3")
    skipped = logged(run(module, argv))
    assert skipped[1]["train/nonfinite"] == 1 and skipped[2]["train/nonfinite"] == 2
    assert skipped[2]["loss/critic"] is None  # NaN is written as null
    # Step 2's student update runs against the step-1 critic: untouched, so the DMD loss equals the frozen run's.
    assert skipped[2]["loss/dmd"] == pytest.approx(frozen[2]["loss/dmd"], rel=1e-6)
    with pytest.raises(RuntimeError, match=r"2 steps in a row had a non-finite"):
        run(module, tiny_argv(tiny_data, tmp_path, "abort", "run.max_nonfinite_in_row=2"))


@pytest.mark.parametrize("override, message", [
    ("dmd.studnet_every=2", "unknown key 'dmd.studnet_every'"),
    ("optim.lr='fast'", "wrong type for 'optim.lr'"),
    ("data.negative_prompt=/nonexistent/neg.safetensors", "data.negative_prompt: /nonexistent/neg.safetensors"),
    ("model.base=/nonexistent/pipe", "model.base: /nonexistent/pipe"),
    ("data.path=/nonexistent/latents", "/nonexistent/latents"),
    ("video.height=128", "latent shape"),
    ("model.preset=huge", "model.preset='huge'"),
])
def test_config_errors_before_any_model(override, message, tiny_data, tmp_path, monkeypatch):
    module = load_recipe(RECIPES[0])
    monkeypatch.setattr(module, "build_wan", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises((ConfigError, FileNotFoundError), match=message.replace("(", r"\(").replace(".", r"\.")):
        run(module, tiny_argv(tiny_data, tmp_path, "bad", override))


def test_sp_must_divide_heads_and_missing_key(tiny_data, tmp_path, monkeypatch):
    module = load_recipe(RECIPES[0])
    monkeypatch.setattr(module, "build_wan", lambda *a, **k: pytest.fail("a model was built"))
    monkeypatch.setenv("WORLD_SIZE", "3")  # a world that sp=3 divides; the tiny model has 2 heads
    with pytest.raises(ConfigError, match=r"parallel\.sp=3 does not divide the model's num_heads=2"):
        run(module, tiny_argv(tiny_data, tmp_path, "bad", "parallel.sp=3"))
    toml = (ROOT / "recipes" / f"{RECIPES[0]}.toml").read_text()
    cut = tmp_path / "cut.toml"
    cut.write_text("\n".join(line for line in toml.splitlines() if not line.startswith("guidance")))
    with pytest.raises(ConfigError, match=r"missing key 'dmd\.guidance'"):
        load_config(module.RecipeConfig, [], default_toml=cut)


@pytest.mark.parametrize("name", [RECIPES[0], RECIPES[2]])
def test_golden_losses_match_an_independent_recomputation(name, tiny_data, tmp_path, monkeypatch):
    """Steps 1-4 of a recipe recomputed here on plain (unsharded) modules from the same seeds and data, with losses/
    and the optimizers written out by hand (torch's AdamW and clip_grad_norm_, the LR schedule's formula): critic
    steps 1-4, student (DMD, teacher CFG against the negative prompt) steps 2 and 4. Every logged loss, grad norm and
    DMD normaliser is compared. An LR of 1e-3 from step 1 (the 5B warmup would make it 0 there) and four steps make
    the later losses depend on earlier updates, and the second Adam step of each network depends on the gradient's
    scale. The 1.3B recipe noises data (its docstring: FastVideo's data mode); the 5B recipe simulates the student's
    chain from noise under a cosine LR schedule."""
    from attention.vsa import dense_gated_attention, vsa_attention, vsa_meta
    from data.dataset import LatentDataset, load_negative_context
    from data.encode import latent_stats, load_vae
    from data.loader import make_loader
    from losses.dmd import critic_loss, dmd_loss, student_rollout_data, student_rollout_simulate
    from losses.flow import add_noise, sample_score_timesteps, x0_from_velocity
    from models.wan_weights import load_pretrained

    module = load_recipe(name)
    monkeypatch.setattr(module, "save_samples", lambda *args: None)  # decoding is checked above; it costs most time
    overlay = ("run.max_steps=4", "run.val_every=4", "run.ckpt_every=0", "optim.lr=1e-3", "optim.critic_lr=1e-3",
               "optim.warmup_steps=0")
    cfg = config(module, tiny_argv(tiny_data, tmp_path, "golden", *overlay))
    rows = logged(module.main(cfg))
    init = tmp_path / name / "golden" / "random_init"
    student = load_pretrained(init, attn_fn=vsa_attention, vsa_gate=True)
    teacher = load_pretrained(init).requires_grad_(False)
    # The critic as the recipe builds it (attn.critic): dense attention plus the coarse branch through its own gate.
    gated = cfg.attn.critic == "dense_gated"
    critic = load_pretrained(init, attn_fn=dense_gated_attention, vsa_gate=True) if gated else load_pretrained(init)
    mean, std = (s.view(-1, 1, 1, 1) for s in latent_stats(load_vae(tiny_data / "pipeline")))
    data = LatentDataset(str(tiny_data / "latents"), num_latent_t=5)
    batches = iter(make_loader(data, 1, dp_rank=0, dp_size=1, seed=cfg.run.seed, num_workers=0))
    negative = load_negative_context(tiny_data / "negative_prompt.safetensors")[0][None]
    d, o = cfg.dmd, cfg.optim
    meta = vsa_meta(student.token_grid((1, 4, 5, 8, 16)), cfg.attn.sparsity, "cpu")
    critic_meta = vsa_meta(student.token_grid((1, 4, 5, 8, 16)), 0.0, "cpu") if gated else None
    opts = {net: torch.optim.AdamW(net.parameters(), lr=0.0, betas=tuple(o.betas), weight_decay=o.weight_decay)
            for net in (student, critic)}

    def lr_factor(kind: str, step: int) -> float:
        # Both schedules step once per training step; no warmup (overlay): cosine from 1 at step 1, floored.
        progress = (step - 1) / cfg.run.max_steps
        return 1.0 if kind == "constant" else max(o.min_lr_ratio, 0.5 + 0.5 * math.cos(math.pi * progress))

    def sample(x, ctx, gen):
        student_fn = lambda z, t: student(z, t, ctx, meta)  # noqa: E731
        if "ti2v" in name:
            return student_rollout_simulate(student_fn, (1, 4, 5, 8, 16), d.steps, gen)[0]
        return student_rollout_data(student_fn, x, d.steps, gen)[0]

    def update(net, loss, lr):
        opts[net].param_groups[0]["lr"] = lr
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip)
        opts[net].step()
        opts[net].zero_grad()
        return float(norm)

    assert o.warmup_steps == 0 and o.lr > 0 and o.critic_lr > 0
    expected = {}
    for step in (1, 2, 3, 4):
        batch = next(batches)
        x, ctx = (batch["latents"] - mean) / std, batch["context"]
        gen = torch.Generator().manual_seed(hash((cfg.run.seed, 0, step)))  # the recipe's documented seeding
        if step % d.student_every == 0:  # a student step
            x0 = sample(x, ctx, gen)
            with torch.no_grad():
                t = sample_score_timesteps(1, d.flow_shift, d.t_min, d.t_max, gen)
                x_t = add_noise(x0, torch.randn(x0.shape, generator=gen), t)
                fake = x0_from_velocity(x_t, critic(x_t, t, ctx, critic_meta), t)
                cond = x0_from_velocity(x_t, teacher(x_t, t, ctx), t)
                uncond = x0_from_velocity(x_t, teacher(x_t, t, negative), t)
            loss, stats = dmd_loss(x0, fake, cond, uncond, d.guidance)
            expected[step, "loss/dmd"], expected[step, "dmd/denom"] = loss.item(), stats["dmd/denom"].item()
            # the critic's rollout below uses the updated student
            expected[step, "grad_norm/student"] = update(student, loss, o.lr * lr_factor(o.scheduler, step))
        with torch.no_grad():
            x0 = sample(x, ctx, gen)
        t = sample_score_timesteps(1, d.flow_shift, d.t_min, d.t_max, gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = critic_loss(critic(add_noise(x0, noise, t), t, ctx, critic_meta), noise, x0)
        expected[step, "loss/critic"] = loss.item()
        expected[step, "grad_norm/critic"] = update(critic, loss, o.critic_lr * lr_factor(o.critic_scheduler, step))
    assert sorted(rows) == [0, 1, 2, 3, 4]  # step 0: the health check's start-of-run statistics
    rows = {step: row for step, row in rows.items() if step > 0}
    for step in (1, 2, 3, 4):  # the LR each update used, non-zero from step 1
        assert rows[step]["lr/student"] == pytest.approx(o.lr * lr_factor(o.scheduler, step), rel=1e-6)
        assert rows[step]["lr/critic"] == pytest.approx(o.critic_lr * lr_factor(o.critic_scheduler, step), rel=1e-6)
    assert {(s, k) for s, row in rows.items() for k in losses(row)} == set(expected)  # nothing logged goes unchecked
    for (step, key), value in expected.items():
        # The student's sparse attention and the DMD normaliser amplify rounding differences a little more.
        rel = 1e-4 if key in ("loss/dmd", "grad_norm/student", "dmd/denom") else 1e-5
        assert rows[step][key] == pytest.approx(value, rel=rel), (step, key)


@pytest.mark.multiproc
def test_sequence_parallel_two_ranks_equals_one(tiny_data, tmp_path):
    """torchrun with 2 CPU ranks, Ulysses SP 2 (both ranks see the same sample, FSDP shards over both): the same
    losses as the single-process run."""
    import os

    from parallel.mesh import free_port

    module = load_recipe(RECIPES[0])
    single = logged(run(module, tiny_argv(tiny_data, tmp_path, "sp1")))
    argv = tiny_argv(tiny_data, tmp_path, "sp2", "parallel.sp=2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "recipes" / f"{RECIPES[0]}.py"), *argv]
    # Without the variables the in-process runs left behind (RANK=0, WORLD_SIZE=1, ...): torchrun sets its own.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sp2 = logged(tmp_path / RECIPES[0] / "sp2")
    for step in (1, 2):
        assert losses(sp2[step]) == pytest.approx(losses(single[step]), rel=1e-4, abs=1e-9), step
