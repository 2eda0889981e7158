"""Toy sparse-distill: DMD2 distillation of the toy teacher into a 3-step student with VSA attention (CPU, minutes).

The same method as the Wan sparse-distill recipes (docs/METHOD.md §1, §8), on `recipes/toy_teacher.py`'s tiny Wan DiT
and the synthetic moving-blob latents of `data/synthetic.py`. Three networks, all initialised from the teacher export:
student (trainable, VSA at `attn.sparsity` over 16 tiles of the (2, 16, 16) token grid, zero-initialised gate),
teacher (frozen, dense, CFG against the zero "negative" caption in the DMD2 form cond + w·(cond − uncond)) and critic
(trainable, dense attention + VSA's zero-initialised coarse gate with `attn.critic = "dense_gated"`, as FastVideo's
critic). The critic is updated every step, the student every `dmd.student_every`-th step. Rollouts:
`dmd.rollout = "data"` (noised data at a random step of the list) or `"simulate"` (data-free backward simulation).
Data mode's "data" are clips the teacher generates for the training captions at start-up (`data.source`), as
FastVideo's Wan recipes distill on teacher-generated latents: the toy teacher's samples differ visibly from the clips it
learned from (its blobs rarely move coherently), and noising the original clips instead gave a student 7x further from
the data than the teacher (Fréchet 58.7 vs 8.5, 600 steps, 2026-11-27).

Launch (after the teacher):
    python recipes/toy_sparse_distill.py                                     # data mode, run.name = "demo"
    python recipes/toy_sparse_distill.py dmd.rollout=simulate run.name=demo_datafree
    torchrun --nproc_per_node 2 recipes/toy_sparse_distill.py                # 2 ranks on CPU (gloo)
    python recipes/toy_sparse_distill.py model.teacher=tests/assets/toy_experts/transformer \
        model.teacher_2=tests/assets/toy_experts/transformer_2 model.boundary=0.875   # a two-expert teacher (A14B-like)

Measured (`make demo`, all 240 held-out captions; Fréchet distance of clip features, lower is better / conditioning
accuracy): 2-core CPU, 2026-12-03, 39.8 min: teacher-50 9.22 / 92.9 %, data mode 5.10 / 94.6 % (900 steps), data-free
7.65 / 90.0 % (600 steps); one H200 (`--large`, its teacher that learns motion), 2026-12-04: teacher-50 0.687 / 100 %,
data 1.51 / 99.6 %, data-free 1.28 / 100 % (README "Performance"). Two-expert teacher (model.teacher_2): docs/DESIGN.md
"Two-expert teachers" (the low-noise expert's init passes the gates; ignoring the switch, model.real_score = "high",
diverges). Training health (`[health]`, components/health.py): every evaluation compares the student's samples with
the teacher's 50-step ones, exports the student to ckpt/step-NNNNNN/ and stops an unhealthy run (exit 1).
Hyperparameters are ours, tuned for the toy; the structure (step list 1000/757/522, score window 20..980,
update ratio 5, grad clip 1) follows FastVideo's recipes. Copy this file and its TOML to start an experiment.
"""

# Past STYLE's 350 lines: it keeps the switches its README / DESIGN tables were measured with (experts, LoRA, EMA).

import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from attention.sdpa import sdpa_attention
from attention.vsa import dense_gated_attention, vsa_attention, vsa_masked, vsa_meta
from components.config import as_config_error, dump_toml, exit_on_config_error, load_config, require_paths
from components.health import HealthConfig, HealthGuard, reference_key
from components.optim import init_ema, load_ema, update_ema
from components.metrics import MetricsLogger, write_video
from components.recipe_config import LoraConfig
from components.run_dir import write_run_files
from components.schedule import build_lr_scheduler
from data.synthetic import ToySpec, clip_grid, evaluate_samples, make_split, teacher_clips, toy_pixels
from data.toy_eval import check_model, load_teacher, sample_student, sample_teacher, save_student
from losses.dmd import critic_loss, dmd_loss, student_rollout_data, student_rollout_simulate
from losses.flow import add_noise, sample_score_timesteps, x0_from_velocity
from inference.lora import export_lora
from models.lora import AdapterView, apply_lora, check_lora, export_weights, freeze_base
from models.wan import WanModel
from models.wan_weights import export_state_dict, load_pretrained
from parallel.replicate import destroy_replicas, init_replicas, step_replicated


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    teacher: Path  # exported toy teacher (diffusers layout); student and critic start from it too
    student: Path | None = None  # or the student starts from this export (an earlier run's student/ or ckpt/step-N)
    # A two-expert teacher (as Wan2.2-A14B; tests/assets/toy_experts/): `teacher` is the high-noise expert, used for
    # timesteps t >= boundary · 1000, `teacher_2` the low-noise one below; unset = the one-network teacher above.
    teacher_2: Path | None = None
    boundary: float | None = None  # the experts' boundary_ratio (Wan2.2-A14B T2V: 0.875)
    init: Literal["high", "low"] = "high"  # the expert student and critic start from ("high" = model.teacher)
    # The DMD real score: "switch" = the expert of the score timestep; "high" / "low" = always that expert (a control
    # that ignores the switch; the teacher data and the validation's teacher rows still switch)
    real_score: Literal["switch", "high", "low"] = "switch"


@dataclass
class AttnConfig:
    student: Literal["vsa", "sdpa"]  # the teacher is always dense
    sparsity: float  # VSA: fraction of kv tiles each query tile skips
    # critic: "dense_gated" = dense + VSA's coarse branch through a trainable zero-initialised gate (VSA at ρ = 0, the
    # Wan recipes' default, as the released FastWan runs), "dense" = plain SDPA
    critic: Literal["dense_gated", "dense"]


@dataclass
class DataConfig:
    frames: int  # latent frames T (same as the teacher's data)
    height: int
    width: int
    num_train: int
    num_heldout: int
    seed: int  # the teacher's data seed: same clips, same held-out split
    # Data mode's latents: "teacher" = clips the teacher generates for the training captions at start-up, as FastVideo's
    # Wan recipes train on teacher-generated latents (docs/METHOD.md §1.4a); "clips" = the synthetic clips themselves.
    source: Literal["teacher", "clips"] = "teacher"
    num_teacher_clips: int = 480  # teacher samples generated for data mode (50-step Euler + CFG)


@dataclass
class DmdConfig:
    rollout: Literal["data", "simulate"]  # student input: noised data, or its own no-grad chain from noise
    steps: list[int]  # the student's timesteps, e.g. [1000, 757, 522]
    shift: float  # flow shift of the score-timestep sampler (and the teacher's sampler in validation)
    t_min: float  # score-timestep window
    t_max: float
    guidance: float  # teacher CFG, DMD2 form w (standard scale w + 1)
    student_every: int  # one student update per this many critic updates
    normaliser: Literal["batch", "sample"] = "batch"  # DMD gradient's mean|x0 − real|: over the batch, or per clip


@dataclass
class OptimConfig:
    student_lr: float
    critic_lr: float
    betas: tuple[float, float]
    weight_decay: float
    batch_size: int  # clips per rank per step
    steps: int  # critic steps
    grad_clip: float
    # LR schedules (components/schedule.py), stepped every (critic) step as in the Wan recipes; no warmup here
    scheduler: Literal["constant", "cosine_with_min_lr"] = "constant"  # student
    critic_scheduler: Literal["constant", "cosine_with_min_lr"] = "constant"
    min_lr_ratio: float = 0.1  # cosine floor


@dataclass
class RunConfig:
    name: str  # outputs/toy_sparse_distill/<name>/
    seed: int
    threads: int = 2
    # "cuda": one GPU per rank (NCCL across ranks), for the larger toy (scripts/demo.py --large); random draws come
    # from a generator on that device, so a CUDA run is not bitwise a CPU run
    device: Literal["cpu", "cuda"] = "cpu"
    log_every: int = 25
    eval_every: int = 0  # student-3-step evaluation every this many steps (0: only at the end)
    num_eval: int = 96  # held-out clips sampled per evaluation
    keep_ckpts: int = 3  # student exports kept in ckpt/step-NNNNNN/ (one per evaluation; ckpt/last_healthy stays)
    # EMA of the student's weights, updated after every student step from training step ema_start on, where it starts
    # from the live weights (FastVideo's --ema_decay / --ema_start_step); exported to <run>/student_ema; 0 = off
    ema_decay: float = 0.0
    ema_start: int = 0


@dataclass
class RecipeConfig:
    model: ModelConfig
    attn: AttnConfig
    data: DataConfig
    dmd: DmdConfig
    optim: OptimConfig
    run: RunConfig
    health: HealthConfig  # training health (components/health.py)
    lora: LoraConfig


# --------------------------------------------------------------------------------------------- recipe-local choices
ATTN = {"vsa": vsa_attention, "sdpa": sdpa_attention, "dense_gated": dense_gated_attention}
# On a GPU the toy's fp32 tokens and head dims (16-48) are not the VSA kernels' (bf16, 64 / 128): the same VSA math
# as SDPA with a tile mask (attention/vsa.py vsa_masked).
ATTN_CUDA = {**ATTN, "vsa": vsa_masked}


def attn_fn(name: str, device: str):
    return (ATTN_CUDA if device == "cuda" else ATTN)[name]


def build_wan(path: Path, attn: str, device: str = "cpu") -> WanModel:
    """A role initialised from the teacher export; the VSA gate (student, gated critic) is new and starts at zero."""
    return load_pretrained(path, attn_fn=attn_fn(attn, device), vsa_gate=attn in ("vsa", "dense_gated")).to(device)


def build_lora_roles(path: Path, student_attn: str, critic_attn: str, lora: LoraConfig, device: str = "cpu"):
    """LoRA mode: one frozen base from the teacher export; (student, teacher, critic) are views of it."""
    base = load_pretrained(path, vsa_gate="vsa" in (student_attn, critic_attn) or critic_attn == "dense_gated")
    apply_lora(base, lora.rank, lora.alpha, lora.targets, gate=lora.gate)
    freeze_base(base)
    base.to(device)
    views = [AdapterView(base, a, attn_fn(attn, device)) for a, attn in (("student", student_attn), (None, "sdpa"),
                                                                         ("critic", critic_attn))]
    return tuple(views)


# ---------------------------------------------------------------------------------------------------------- method
def rollout(
    student: WanModel, meta, x_data: torch.Tensor, context: torch.Tensor, dmd: DmdConfig, generator: torch.Generator
) -> tuple[torch.Tensor, float]:
    """Student x0 at a random step of its list (docs/METHOD.md §1.4); grad follows the caller's grad mode."""
    student_fn = lambda x, t: student(x, t, context, attn_meta=meta)  # noqa: E731
    if dmd.rollout == "data":
        return student_rollout_data(student_fn, x_data, dmd.steps, generator)
    return student_rollout_simulate(student_fn, x_data.shape, dmd.steps, generator)


def student_step(
    student: WanModel,
    teacher: WanModel,
    critic: WanModel,
    opt: torch.optim.Optimizer,
    meta,
    critic_meta,
    x_data: torch.Tensor,
    context: torch.Tensor,
    dmd: DmdConfig,
    grad_clip: float,
    world: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """DMD2 student update: move the student's x0 along (critic − teacher) x0 predictions at a noised point."""
    x0, t_student = rollout(student, meta, x_data, context, dmd, generator)
    # One score timestep per clip: our batch stands for FastVideo's per-rank batch of 1 (docs/METHOD.md §1.2).
    t = sample_score_timesteps(x0.shape[0], dmd.shift, dmd.t_min, dmd.t_max, generator)
    with torch.no_grad():
        x_t = add_noise(x0.detach(), torch.randn(x0.shape, generator=generator, device=x0.device), t)
        fake = x0_from_velocity(x_t, critic(x_t, t, context, attn_meta=critic_meta), t)
        real_cond = x0_from_velocity(x_t, teacher(x_t, t, context), t)
        real_uncond = x0_from_velocity(x_t, teacher(x_t, t, torch.zeros_like(context)), t)  # the zero negative caption
    loss, stats = dmd_loss(x0, fake, real_cond, real_uncond, dmd.guidance, per_sample=dmd.normaliser == "sample")
    grad_norm = step_replicated(student, opt, loss, grad_clip, world)  # backward, average over ranks, clip, step
    return {"loss/dmd": loss.detach(), "grad_norm/student": grad_norm, **stats,
            "dmd/student_t": torch.tensor(t_student)}


def critic_step(
    student: WanModel,
    critic: WanModel,
    opt: torch.optim.Optimizer,
    meta,
    critic_meta,
    x_data: torch.Tensor,
    context: torch.Tensor,
    dmd: DmdConfig,
    grad_clip: float,
    world: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Critic update: flow matching on fresh (no-grad) student samples, so it tracks the student's distribution."""
    with torch.no_grad():
        x0, _ = rollout(student, meta, x_data, context, dmd, generator)
    t = sample_score_timesteps(x0.shape[0], dmd.shift, dmd.t_min, dmd.t_max, generator)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    loss = critic_loss(critic(add_noise(x0, noise, t), t, context, attn_meta=critic_meta), noise, x0)
    grad_norm = step_replicated(critic, opt, loss, grad_clip, world)
    return {"loss/critic": loss.detach(), "grad_norm/critic": grad_norm}


# -------------------------------------------------------------------------------------------------------- validate
def validate(student, teacher, meta, heldout, cfg: RecipeConfig, run_dir: Path, step: int, grid: bool):
    """Student 3-step distance to held-out data and conditioning accuracy, and the samples; with `grid`, also the mp4
    data | teacher-50-step | teacher-3-step | student-3-step for 8 held-out captions."""
    t0 = time.perf_counter()
    n, seed = min(cfg.run.num_eval, heldout.latents.shape[0]), cfg.run.seed + 7
    ctx, shape = heldout.context[:n].to(cfg.run.device), heldout.latents[:n].shape
    student_x0 = sample_student(student, meta, ctx, shape, cfg.dmd.steps, seed)
    scores = evaluate_samples(student_x0, heldout.factors[:n], heldout)
    out = {f"val/student_{name}": value for name, value in scores.items()}  # frechet, temporal, cond_acc, motion, ...
    out["time/val_s"] = time.perf_counter() - t0
    if grid:
        k = min(8, n)
        shape_k = (k, *shape[1:])
        teacher_50 = sample_teacher(teacher, ctx[:k], shape_k, 50, cfg.dmd.shift, cfg.dmd.guidance, seed)
        teacher_3 = sample_teacher(teacher, ctx[:k], shape_k, 3, cfg.dmd.shift, cfg.dmd.guidance, seed)
        rows = [heldout.latents[:k], teacher_50, teacher_3, student_x0[:k]]
        write_video(run_dir / "samples" / f"step-{step:06d}" / "grid.mp4", clip_grid(rows), fps=2)
    return out, student_x0


def prepare_health(health: HealthGuard, student, teacher, meta, heldout, cfg: RecipeConfig, run_dir: Path, metrics):
    """The health reference (components/health.py): the teacher's many-step samples and the student's before training,
    on validate's captions and noise; made once per run (a relaunch reuses <run>/health/), their grids written once."""
    n, seed, h = min(cfg.run.num_eval, heldout.latents.shape[0]), cfg.run.seed + 7, cfg.health
    ctx, shape = heldout.context[:n].to(cfg.run.device), heldout.latents[:n].shape
    experts = [str(cfg.model.teacher_2), cfg.model.boundary] if cfg.model.teacher_2 is not None else []
    teacher_settings = [seed, h.teacher_steps, h.teacher_shift, cfg.dmd.guidance, *experts]
    settings = [*teacher_settings, str(cfg.model.student), cfg.dmd.steps, cfg.attn.student, cfg.attn.sparsity]

    def save(x0: torch.Tensor, tag: str) -> torch.Tensor:
        frames = clip_grid([x0[:8]])  # (T, H', 8·W', 3)
        write_video(run_dir / "samples" / tag / "grid.mp4", frames, fps=2)
        metrics.video(f"{tag}/grid", 0, frames, fps=2)
        return toy_pixels(x0)

    teacher_x0 = lambda: sample_teacher(teacher, ctx, shape, h.teacher_steps, h.teacher_shift, cfg.dmd.guidance, seed)  # noqa: E731
    make = lambda: (teacher_x0(), sample_student(student, meta, ctx, shape, cfg.dmd.steps, seed))  # noqa: E731
    health.prepare(reference_key(cfg.model.teacher, [ctx], {"settings": settings}), make, save)


# ------------------------------------------------------------------------------------------------------------ main
def main(cfg: RecipeConfig) -> Path:
    require_paths({"model.teacher": cfg.model.teacher})  # written by recipes/toy_teacher.py
    with as_config_error("lora"):
        check_lora(cfg.lora.rank, cfg.lora.targets, cfg.lora.gate)
    with as_config_error():
        check_model(asdict(cfg.model), cfg.lora.rank)  # the two-expert keys, and what LoRA's one base allows
    if cfg.model.teacher_2 is not None:
        require_paths({"model.teacher_2": cfg.model.teacher_2})
    rank, world = init_replicas(cfg.run.device)
    device = cfg.run.device
    torch.set_num_threads(cfg.run.threads)
    run_dir = Path("outputs") / "toy_sparse_distill" / cfg.run.name
    metrics = MetricsLogger(run_dir, enabled=rank == 0, stdout_every=cfg.run.log_every)
    health = HealthGuard(cfg.health, run_dir, metrics, main_process=rank == 0, resume=False)  # a relaunch starts over
    if rank == 0:
        shutil.rmtree(run_dir / "ckpt", ignore_errors=True)  # the previous launch's checkpoints and last_healthy
        write_run_files(run_dir, dump_toml(cfg), Path(__file__))

    spec = ToySpec(frames=cfg.data.frames, height=cfg.data.height, width=cfg.data.width)
    train, heldout = make_split(spec, cfg.data.num_train, cfg.data.num_heldout, cfg.data.seed)
    critic_attn = "dense_gated" if cfg.attn.critic == "dense_gated" else "sdpa"
    if cfg.lora.rank:  # one frozen base; the optimizers below see only the adapters (AdapterView.parameters)
        student, teacher, critic = build_lora_roles(cfg.model.teacher, cfg.attn.student, critic_attn, cfg.lora, device)
    else:
        init = cfg.model.teacher_2 if cfg.model.init == "low" else cfg.model.teacher
        student = build_wan(cfg.model.student or init, cfg.attn.student, device)
        teacher = load_teacher(asdict(cfg.model), device)  # one network, or two experts switching at boundary
        critic = build_wan(init, critic_attn, device)
    # the network behind the DMD real score: the teacher, or one expert for the "ignore the switch" control
    score_teacher = teacher if cfg.model.real_score == "switch" or cfg.model.teacher_2 is None else getattr(
        teacher, cfg.model.real_score)
    tokens = student.token_grid((1, spec.channels, spec.frames, spec.height, spec.width))  # (T', H', W')
    meta = vsa_meta(tokens, cfg.attn.sparsity, device) if cfg.attn.student == "vsa" else None
    critic_meta = vsa_meta(tokens, 0.0, device) if critic_attn == "dense_gated" else None  # its tiles, for the gate
    optim = cfg.optim
    student_opt, critic_opt = (torch.optim.AdamW(net.parameters(), lr, betas=optim.betas,
                                                 weight_decay=optim.weight_decay)
                               for net, lr in ((student, optim.student_lr), (critic, optim.critic_lr)))
    scheds = [build_lr_scheduler(opt, kind, 0, optim.steps, optim.min_lr_ratio)
              for opt, kind in ((student_opt, optim.scheduler), (critic_opt, optim.critic_scheduler))]
    g = torch.Generator(device).manual_seed(cfg.run.seed + 1000 * rank)  # per-rank batches, noise and timesteps

    pool, pool_context = train.latents.to(device), train.context.to(device)  # data-free: only shape and captions
    if cfg.dmd.rollout == "data" and cfg.data.source == "teacher":  # the same on every rank (fixed seeds)
        t0, pool_context = time.perf_counter(), pool_context[: cfg.data.num_teacher_clips]
        pool = teacher_clips(
            teacher, pool_context, train.latents.shape[1:], cfg.dmd.shift, cfg.dmd.guidance + 1, cfg.run.seed + 11
        )
        metrics.log(0, {"time/teacher_data_s": time.perf_counter() - t0})
    if health.enabled:  # the reference, and the student before training: its checkpoint is the first healthy one
        if rank == 0:
            prepare_health(health, student, teacher, meta, heldout, cfg, run_dir, metrics)
            save_student(student, run_dir / "ckpt", 0, cfg.run.keep_ckpts)
        health.checkpoint_saved(0, run_dir / "ckpt" / "step-000000")

    start, scalars, ema = time.perf_counter(), {}, {}
    for step in range(1, optim.steps + 1):
        idx = torch.randint(pool.shape[0], (optim.batch_size,), generator=g, device=device)
        x_data, context = pool[idx], pool_context[idx]
        if step % cfg.dmd.student_every == 0:
            scalars.update(student_step(student, score_teacher, critic, student_opt, meta, critic_meta, x_data,
                                        context, cfg.dmd, optim.grad_clip, world, g))
            if ema:
                update_ema(ema, student, cfg.run.ema_decay)
            elif cfg.run.ema_decay and step >= cfg.run.ema_start:
                ema = init_ema(student)
        scalars.update(critic_step(student, critic, critic_opt, meta, critic_meta, x_data, context, cfg.dmd,
                                   optim.grad_clip, world, g))
        for sched in scheds:
            sched.step()
        if step % cfg.run.log_every == 0 or step == optim.steps:
            scalars["time/elapsed_s"] = time.perf_counter() - start
            scalars["lr/student"], scalars["lr/critic"] = (sched.get_last_lr()[0] for sched in scheds)
            scalars["attn/vsa_sparsity"] = 1 - meta.topk / meta.num_tiles if meta is not None else 0.0
            metrics.log(step, scalars)
            health.check_losses(step, scalars)  # raises UnhealthyRun when they diverge (health.action = "stop")
            scalars = {}
        if step == optim.steps or (cfg.run.eval_every and step % cfg.run.eval_every == 0):  # and a checkpoint
            val, x0 = {}, None
            if rank == 0:
                val, x0 = validate(student, teacher, meta, heldout, cfg, run_dir, step, grid=step == optim.steps)
                save_student(student, run_dir / "ckpt", step, cfg.run.keep_ckpts)
            metrics.log(step, val)
            health.check_samples(step, x0, toy_pixels(x0) if rank == 0 else None)  # UnhealthyRun after `patience`
            health.checkpoint_saved(step, run_dir / "ckpt" / f"step-{step:06d}")

    out = run_dir / "student"
    if rank == 0:  # and the final critic, for scripts/probe_toy_noise.py (LoRA: adapters merged)
        export_state_dict(export_weights(student), student.cfg, out)
        export_state_dict(export_weights(critic), critic.cfg, run_dir / "critic")
    if cfg.lora.rank:  # the student adapter alone (diffusers' LoRA format + gate sidecar); a collective
        export_lora(student, run_dir / "export_lora", base_model=str(cfg.model.teacher))
    if ema and rank == 0:  # last: the live weights are overwritten
        load_ema(student, ema)
        export_state_dict(export_weights(student), student.cfg, run_dir / "student_ema")
    metrics.close()
    destroy_replicas(world)
    return out


if __name__ == "__main__":
    with exit_on_config_error(Path(__file__), sys.argv[1:]):  # one line per bad key and its fix, no traceback
        main(load_config(RecipeConfig, sys.argv[1:], default_toml=Path(__file__).with_suffix(".toml")))
