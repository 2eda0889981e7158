"""Wan2.2-T2V-A14B Sparse-distill: DMD2 distillation of a TWO-EXPERT teacher into one 3-step VSA student (ρ = 0.9).

The method is recipes/wan21_1_3b_sparse_distill.py's (read that one first; the functions marked "Copied from" are
checked copies of it). What differs is the teacher. Wan2.2-A14B is two 14B transformers of one architecture: the
high-noise expert (transformer/) denoises t >= boundary = boundary_ratio · 1000 (0.875 → 875), the low-noise expert
(transformer_2/) the rest, each with its own CFG scale (diffusers' pipelines/wan/pipeline_wan.py).
Design (chosen on a toy two-expert teacher, scripts/make_toy_experts.py; docs/DESIGN.md "Two-expert teachers"):
  - the real score (teacher) is the expert of the SCORE timestep: a batch is split by t >= boundary and each expert
    runs on its own rows only, CFG-guided with dmd.guidance (high) or dmd.guidance_2 (low). On the toy, scoring every
    t with the high-noise expert alone diverged (Fréchet 232x teacher-50): the switch is required;
  - the student and the critic are ONE transformer each, initialised from one expert (`model.student_init`,
    `model.critic_init`; "low" by default: of the student's [1000, 757, 522] steps only the first is above the
    boundary, and an expert trained on one side of it is poor on the other. Toy, 900 steps, one seed: from the
    low-noise expert Fréchet 0.87x teacher-50 and 95.0 % accuracy (passes the gates), from the high-noise one 0.58x
    but 88.8 % (fails accuracy)). The student runs every step with the same weights; nothing in it switches;
  - LoRA (lora.rank > 0): the student_init expert is the shared frozen base (student = base + adapter, critic = base
    + adapter, teacher on that expert's t-range = base with adapters off), the other expert is a second frozen base
    (FSDP-sharded, bf16), so critic_init must equal student_init.
Export: the one student transformer plus links to the base folder's other parts (its model_index.json still names
boundary_ratio: tools/sample.py runs a one-transformer student of a two-expert family in student mode); with LoRA also
the student adapter (export_lora), whose recorded digest names the expert it was trained on.
Hyperparameters: no reference recipe distils Wan2.2-A14B; the DMD values are the Wan2.1-14B recipe's (FastVideo
`distill_dmd_VSA_t2v_14B.slurm`, docs/METHOD.md §1.15), the CFG scales, boundary and shape Wan2.2-T2V-A14B's
(81×480×832; guidance 4.0 high / 3.0 low in standard CFG, 3.0 / 2.0 in the DMD2 form).
    torchrun --nproc_per_node 8 recipes/wan22_a14b_t2v_sparse_distill.py parallel.dp_replicate=1 lora.rank=32
    python tools/make_tiny_data.py --out outputs/tiny_data                            # CPU, tiny random experts:
    python recipes/wan22_a14b_t2v_sparse_distill.py --toml tests/assets/tiny.toml --toml tests/assets/tiny_data.toml
A base folder without transformer_2/ or boundary_ratio (a one-expert folder) is refused before any model is built.
Relaunching a `run.name` resumes. To start an experiment, copy this file and its TOML under a new name.
"""

# Past STYLE's 350 lines: the 1.3B method plus two experts' checks, real score and health reference (rest: packages).

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from attention.vsa import vsa_meta
from components.config import (
    ConfigError,
    as_config_error,
    data_folders,
    dump_toml,
    exit_on_config_error,
    load_config,
    require_paths,
)
from components.health import HealthConfig, HealthGuard, reference_key
from components.metrics import MetricsLogger, reduce_for_log, step_scalars
from components.optim import NonfiniteGuard, ShardedAdamW, apply_update, init_ema, update_ema
from components.recipe_config import AttnConfig, LoraConfig, OptimConfig, ParallelConfig, VideoConfig
from components.run_dir import save_samples, write_run_files
from components.schedule import build_lr_scheduler, sparsity_at
from data.dataset import LatentDataset, check_first_row, load_contexts, load_negative_context
from data.encode import compute_latent_shape, latent_stats_from_config, load_vae, normalize_latents
from data.loader import make_loader
from losses.dmd import critic_loss, dmd_loss, expert_real_score, student_rollout_data
from losses.flow import add_noise, expert_teacher_sample, few_step_sample, sample_score_timesteps, x0_from_velocity
from models.lora import check_lora
from models.wan import WAN_CONFIGS, WanConfig, WanModel
from models.wan_weights import expert_config, expert_dirs, export_random_experts
from parallel.checkpoint import Checkpointer, ModelState
from parallel.mesh import build_mesh, check_parallel_sizes, init_distributed
from parallel.wan import build_expert_roles, export_pipelines


# ---- config: one dataclass per TOML table (attn, video, optim, parallel, lora: components/recipe_config.py); the
# TOML holds the values and their provenance ----
@dataclass
class ModelConfig:
    base: Path  # diffusers Wan2.2-A14B pipeline root: transformer/ (high noise), transformer_2/ (low noise), vae/
    student_init: Literal["high", "low"]  # the expert the student starts from (LoRA: the shared frozen base)
    critic_init: Literal["high", "low"]  # the expert the critic starts from (LoRA: must equal student_init)
    # expert switch t = boundary_ratio · 1000; must equal model.base's model_index.json (a check, not an override);
    # with model.preset it is where the two random experts switch
    boundary_ratio: float
    preset: str | None = None  # a WAN_CONFIGS name: two seeded random experts of that size instead of base's


@dataclass
class DMDConfig:
    steps: list[int]  # the student's few-step schedule (timesteps on 0..1000)
    student_every: int  # one student update every N steps; the critic updates every step
    guidance: float  # high-noise expert's CFG in the DMD2 form: real = cond + w·(cond − uncond) (standard CFG w + 1)
    guidance_2: float  # low-noise expert's CFG, same form (t < boundary)
    flow_shift: float  # score-timestep sampler: t = clamp(shift(U{0..999}), t_min, t_max)
    t_min: float
    t_max: float


# Copied from recipes/wan21_1_3b_sparse_distill.py:DataConfig
@dataclass
class DataConfig:
    path: str  # latent parquet folder(s): "dirA:2,dirB" repeats dirA twice
    negative_prompt: Path  # the teacher's unconditional caption embedding (.safetensors or .parquet)
    val_prompts: Path  # text-only parquet; its first run.val_count rows are the validation prompts
    batch_size: int  # per SP group and micro-batch
    num_workers: int = 4


@dataclass
class RunConfig:
    name: str
    seed: int  # data order, noise and timesteps are pure functions of (seed, dp rank, step)
    max_steps: int
    ema_decay: float  # EMA of the student (exported next to it); 0 = off
    log_every: int = 10
    ckpt_every: int = 500  # and after the last step; 0 = no training-state checkpoints
    keep_ckpts: int = 3
    val_every: int = 200
    val_count: int = 4  # validation prompts (their noise is drawn from run.seed)
    max_nonfinite_in_row: int = 3  # abort after this many consecutive steps with a skipped (non-finite) update
    out_dir: Path = Path("outputs")
    export: bool = True  # false: no export after the last step (memory/speed checks; a 14B merged export is 57 GB)


# Copied from recipes/wan21_1_3b_sparse_distill.py:RecipeConfig
@dataclass
class RecipeConfig:
    model: ModelConfig
    attn: AttnConfig
    video: VideoConfig
    dmd: DMDConfig
    optim: OptimConfig
    data: DataConfig
    parallel: ParallelConfig
    run: RunConfig
    health: HealthConfig  # training health: statistics against the teacher's samples, a guard (components/health.py)
    lora: LoraConfig


def check_config(cfg: RecipeConfig, world_size: int) -> tuple[WanConfig, tuple[int, ...]]:
    """Everything checkable without building a model; returns (model config, latent shape (C, T, H, W))."""
    require_paths(
        {
            "model.base": [cfg.model.base, cfg.model.base / "vae"],
            "data.path": data_folders(cfg.data.path),
            "data.negative_prompt": cfg.data.negative_prompt,
            "data.val_prompts": cfg.data.val_prompts,
        }
    )
    m = cfg.model
    if not 0 < m.boundary_ratio < 1:
        raise ConfigError(f"model.boundary_ratio={m.boundary_ratio} must be in (0, 1) (Wan2.2-T2V-A14B: 0.875)")
    if m.preset is not None and m.preset not in WAN_CONFIGS:
        raise ConfigError(f"model.preset={m.preset!r}; choose one of {sorted(WAN_CONFIGS)}")
    with as_config_error("model.base"):  # both experts' configs and the boundary, from the files alone
        wan = WAN_CONFIGS[m.preset] if m.preset else expert_config(m.base, m.boundary_ratio)
    if cfg.lora.rank and m.critic_init != m.student_init:
        raise ConfigError(f"model.critic_init={m.critic_init!r} != model.student_init={m.student_init!r}: with LoRA "
                          "student and critic are adapters on one frozen base expert; set them equal")
    if not (0 <= cfg.attn.sparsity < 1 and cfg.dmd.student_every >= 1 and cfg.optim.grad_accum >= 1):
        raise ConfigError("need 0 <= attn.sparsity < 1, dmd.student_every >= 1 and optim.grad_accum >= 1")
    with as_config_error():
        check_parallel_sizes(world_size, cfg.parallel.dp_replicate, cfg.parallel.sp, wan.num_heads)
    with as_config_error("lora"):
        check_lora(cfg.lora.rank, cfg.lora.targets, cfg.lora.gate)
    with as_config_error("video"):
        v = cfg.video
        return wan, compute_latent_shape(wan.in_channels, v.num_frames, v.height, v.width, v.vae_stride)


# ---- data ----
# Copied from recipes/wan21_1_3b_sparse_distill.py:load_data..rollout
def load_data(path: str, latent_shape: tuple[int, ...], text_dim: int) -> LatentDataset:
    """Wan-Syn-style latent parquet; its first row is read now, so a shape mismatch fails before any model is built."""
    with as_config_error("data.path"):  # a file without latent columns, or bad rows: one clean message
        rank = int(os.environ.get("RANK", 0))
        dataset = LatentDataset(path, num_latent_t=latent_shape[1], expect_latent_shape=latent_shape, rank=rank)
        check_first_row(dataset, text_dim)
    return dataset


def prepare_batch(batch: dict, shape: tuple, mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> dict:
    """Latents normalised with the VAE's per-channel statistics (docs/METHOD.md §0) and caption embeddings, on the device."""
    return dict(latents=normalize_latents(batch["latents"], mean, std).to(device), context=batch["context"].to(device))


# ---- the method ----
def rollout(student: WanModel, batch: dict, meta, steps: list[int], gen: torch.Generator) -> torch.Tensor:
    """Student sample x0: one student step from data noised to a random step of its schedule (docs/METHOD.md §1.4a)."""
    return student_rollout_data(lambda x, t: student(x, t, batch["context"], meta), batch["latents"], steps, gen)[0]


@torch.no_grad()
def real_score(
    teachers: dict[str, torch.nn.Module],
    boundary: float,
    guidance: dict[str, float],
    x_t: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    negative: torch.Tensor,
) -> torch.Tensor:
    """The teacher's CFG x0 (DMD2 form, per expert scale) of each row by the expert of its score timestep: "high" for
    t >= boundary, "low" below (losses/dmd.py expert_real_score). Returns fp32 (B, C, T, H, W)."""

    def velocity(expert: str, idx: torch.Tensor, x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        ctx = context[idx]
        return teachers[expert](x, tt, torch.cat([ctx, negative.expand_as(ctx)]))

    return expert_real_score(velocity, boundary, guidance, x_t, t)


def student_step(
    student: WanModel,
    teachers: dict[str, torch.nn.Module],
    critic: WanModel,
    batches: list[dict],
    negative: torch.Tensor,
    meta,
    critic_meta,
    dmd: DMDConfig,
    boundary: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the DMD2 gradient over the micro-batches (docs/METHOD.md §1.5), the real score from the expert of
    each row's score timestep; returns detached (loss, normaliser)."""
    loss_sum, denom_sum = 0.0, 0.0
    guidance = {"high": dmd.guidance, "low": dmd.guidance_2}
    for batch in batches:
        x0 = rollout(student, batch, meta, dmd.steps, gen)  # with grad, sparse attention
        with torch.no_grad():
            t = sample_score_timesteps(x0.shape[0], dmd.flow_shift, dmd.t_min, dmd.t_max, gen).to(x0.device)
            x_t = add_noise(x0.detach(), torch.randn(x0.shape, generator=gen, device=x0.device), t)
            fake = x0_from_velocity(x_t, critic(x_t, t, batch["context"], critic_meta), t)
            real = real_score(teachers, boundary, guidance, x_t, t, batch["context"], negative)
        loss, stats = dmd_loss(x0, fake, real, real, 0.0)  # real is already guided per expert: w = 0 keeps it
        (loss / len(batches)).backward()
        loss_sum = loss_sum + loss.detach() / len(batches)
        denom_sum = denom_sum + stats["dmd/denom"] / len(batches)
    return loss_sum, denom_sum


# Copied from recipes/wan21_1_3b_sparse_distill.py:critic_step..validate
def critic_step(
    student: WanModel,
    critic: WanModel,
    batches: list[dict],
    meta,
    critic_meta,
    dmd: DMDConfig,
    gen: torch.Generator,
) -> torch.Tensor:
    """Accumulate the critic's flow-matching loss on fresh no-grad student samples (docs/METHOD.md §1.6); returns it detached."""
    loss_sum = 0.0
    for batch in batches:
        with torch.no_grad():
            x0 = rollout(student, batch, meta, dmd.steps, gen)
        t = sample_score_timesteps(x0.shape[0], dmd.flow_shift, dmd.t_min, dmd.t_max, gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        loss = critic_loss(critic(add_noise(x0, noise, t), t, batch["context"], critic_meta), noise, x0)
        (loss / len(batches)).backward()
        loss_sum = loss_sum + loss.detach() / len(batches)
    return loss_sum


@torch.no_grad()
def validate(
    student: WanModel, contexts: torch.Tensor, meta, steps: list[int], latent_shape: tuple[int, ...], seed: int
) -> torch.Tensor:
    """The DMD sampler (docs/METHOD.md §5.2) from fixed seeds on the fixed prompts: normalised latents (N, C, T, H, W)."""
    gen = torch.Generator(contexts.device).manual_seed(seed)
    noise = torch.randn((len(contexts), *latent_shape), generator=gen, device=contexts.device)
    return few_step_sample(lambda x, t: student(x, t, contexts, meta), noise, steps, gen)


@torch.no_grad()
def teacher_reference(
    teachers: dict[str, torch.nn.Module],
    boundary: float,
    contexts: torch.Tensor,
    negative: torch.Tensor,
    shape: tuple[int, ...],
    cfg: RecipeConfig,
) -> torch.Tensor:
    """The health reference: the two-expert teacher's many-step Euler samples with CFG (DMD2's w is CFG w + 1; the
    expert and its scale by the step's t, as diffusers' WanPipeline switches), validate's noise."""
    gen = torch.Generator(contexts.device).manual_seed(cfg.run.seed)
    noise = torch.randn((len(contexts), *shape), generator=gen, device=contexts.device)
    negatives = negative.expand_as(contexts)
    velocity = lambda e, x, t, neg: teachers[e](x, t, negatives if neg else contexts)  # noqa: E731
    guidance, h = {"high": cfg.dmd.guidance, "low": cfg.dmd.guidance_2}, cfg.health
    return expert_teacher_sample(velocity, boundary, guidance, noise, h.teacher_steps, h.teacher_shift)


def main(cfg: RecipeConfig) -> Path:
    # ---- setup: everything checkable is checked before any process group, model or GPU memory ----
    wan, latent_shape = check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    dataset = load_data(cfg.data.path, latent_shape, wan.text_dim)
    mean, std = latent_stats_from_config(cfg.model.base)  # (C,) each, to normalise the latents (docs/METHOD.md §0)
    rank, world, device = init_distributed()
    dims = build_mesh(world, cfg.parallel.dp_replicate, cfg.parallel.sp, device.type, wan.num_heads)
    run_dir = cfg.run.out_dir / Path(__file__).stem / cfg.run.name
    if rank == 0:
        write_run_files(run_dir, dump_toml(cfg), Path(__file__))
    metrics = MetricsLogger(run_dir, enabled=rank == 0, stdout_every=cfg.run.log_every)
    health = HealthGuard(cfg.health, run_dir, metrics, device, main_process=rank == 0)
    negative = load_negative_context(cfg.data.negative_prompt)[0][None].to(device)  # (1, 512, D)
    val_contexts = load_contexts(cfg.data.val_prompts, cfg.run.val_count).to(device)  # (N, 512, D), fixed noise each
    vae = load_vae(cfg.model.base, device) if rank == 0 else None  # decodes the validation samples
    # ---- models: student (VSA + gate) and critic (dense [+ gate]) from one expert each, two frozen dense teachers ----
    weights = run_dir / "random_init" if cfg.model.preset else cfg.model.base  # preset: two seeded random experts
    if cfg.model.preset and rank == 0:
        export_random_experts(wan, weights, cfg.model.boundary_ratio, cfg.run.seed, "WanPipeline")
    torch.distributed.barrier()  # the weights exist before any rank reads them
    experts, boundary = expert_dirs(weights)
    m = cfg.model
    critic_attn = "dense_gated" if cfg.attn.critic == "dense_gated" else "sdpa"
    student, teachers, critic = build_expert_roles(
        wan, experts, {"student": m.student_init, "critic": m.critic_init},
        {"student": cfg.attn.student, "critic": critic_attn}, dims, device, cfg.parallel, cfg.lora)
    grid = student.token_grid((1, *latent_shape))
    critic_meta = vsa_meta(grid, 0.0, device) if critic_attn == "dense_gated" else None  # its tiles, for the gate
    # ---- optimizers: AdamW each; both LR schedules step every step (critic steps), as the reference does ----
    o = cfg.optim
    opts = {
        m: ShardedAdamW(net.parameters(), lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        for m, net, lr in (("student", student, o.lr), ("critic", critic, o.critic_lr))
    }
    scheds = {
        m: build_lr_scheduler(opts[m], kind, o.warmup_steps, cfg.run.max_steps, o.min_lr_ratio)
        for m, kind in (("student", o.scheduler), ("critic", o.critic_scheduler))
    }
    ema = init_ema(student) if cfg.run.ema_decay > 0 else {}  # exported next to the student
    # ---- resume: relaunching a run.name continues from its latest checkpoint ----
    ckpt = Checkpointer(run_dir / "ckpt", keep_last=cfg.run.keep_ckpts)
    state = {
        "student": ModelState(student, opts["student"], scheds["student"]),
        "critic": ModelState(critic, opts["critic"], scheds["critic"]),
        "ema": ema,
    }
    start = ckpt.load(state) or 0
    loader = iter(make_loader(dataset, cfg.data.batch_size, dims.dp_rank, dims.dp_size, cfg.run.seed,
                              start_step=start * o.grad_accum, num_workers=cfg.data.num_workers))
    # ---- loop ----
    amp = torch.autocast(device.type, torch.bfloat16, enabled=cfg.parallel.mixed_precision == "bf16")
    gen = torch.Generator(device)
    tokens_per_step = math.prod(grid) * cfg.data.batch_size * o.grad_accum * dims.dp_size
    guard = NonfiniteGuard(cfg.run.max_nonfinite_in_row, run_dir / "ckpt", verbose=rank == 0)
    val_meta = vsa_meta(grid, cfg.attn.sparsity, device) if cfg.attn.student == "vsa" else None
    if health.enabled:  # the teacher's and the untrained student's validation samples, made once (<run>/health/)
        h = cfg.health
        settings = [cfg.run.seed, h.teacher_steps, h.teacher_shift, cfg.dmd.guidance, cfg.dmd.guidance_2, boundary,
                    m.student_init, cfg.dmd.steps, cfg.attn.sparsity]
        make = lambda: (  # noqa: E731
            teacher_reference(teachers, boundary, val_contexts, negative, latent_shape, cfg),
            validate(student, val_contexts, val_meta, cfg.dmd.steps, latent_shape, cfg.run.seed),
        )
        save = lambda x, tag: save_samples(vae, x, run_dir / "samples" / tag, metrics, 0, cfg.video.fps, tag)  # noqa: E731
        key = reference_key(weights, [val_contexts, negative], {"settings": [*settings, latent_shape]})
        health.prepare(key, make, save if rank == 0 else None, amp)
    for step in range(start + 1, cfg.run.max_steps + 1):
        t0 = time.perf_counter()
        batches = [prepare_batch(next(loader), latent_shape, mean, std, device) for _ in range(o.grad_accum)]
        data_s = time.perf_counter() - t0
        # Noise and timesteps: the same in an SP group, and a resumed run needs only the step (int hashes are fixed).
        gen.manual_seed(hash((cfg.run.seed, dims.dp_rank, step)))
        rho = sparsity_at(step, cfg.attn.sparsity, cfg.attn.sparsity_ramp)
        meta = vsa_meta(grid, rho, device) if cfg.attn.student == "vsa" else None
        logs = {f"lr/{m}": s.get_last_lr()[0] for m, s in scheds.items()}
        ok_student = True
        with amp:
            if step % cfg.dmd.student_every == 0:
                loss, denom = student_step(
                    student, teachers, critic, batches, negative, meta, critic_meta, cfg.dmd, boundary, gen
                )
                norm, ok_student = apply_update(student, opts["student"], loss, o.grad_clip)
                if ema and ok_student:
                    update_ema(ema, student, cfg.run.ema_decay)
                logs.update({"loss/dmd": loss, "dmd/denom": denom, "grad_norm/student": norm})
            loss = critic_step(student, critic, batches, meta, critic_meta, cfg.dmd, gen)
            norm, ok_critic = apply_update(critic, opts["critic"], loss, o.grad_clip)
            logs.update({"loss/critic": loss, "grad_norm/critic": norm})
        for s in scheds.values():
            s.step()
        guard.record(step, skipped=(not ok_student) + (not ok_critic))  # raises after too many bad steps in a row
        step_s, last = time.perf_counter() - t0, step == cfg.run.max_steps
        if step % cfg.run.log_every == 0 or last:
            logs = reduce_for_log(logs, ("loss/", "dmd/"))
            metrics.log(step, {**logs, "attn/vsa_sparsity": rho if meta else 0.0, "train/nonfinite": guard.total,
                               **step_scalars(step_s, data_s, tokens_per_step, device)})
            health.check_losses(step, logs)  # raises UnhealthyRun when losses or grad norms diverge
        if step % cfg.run.val_every == 0 or last:
            t0, video = time.perf_counter(), None
            with amp:
                samples = validate(student, val_contexts, val_meta, cfg.dmd.steps, latent_shape, cfg.run.seed)
            if rank == 0:
                out = run_dir / "samples" / f"step-{step:06d}"
                video = save_samples(vae, samples, out, metrics, step, cfg.video.fps)
                metrics.log(step, {"time/val_s": time.perf_counter() - t0})
            health.check_samples(step, samples, video)  # raises UnhealthyRun after health.patience bad ones in a row
        if cfg.run.ckpt_every and (step % cfg.run.ckpt_every == 0 or last):
            ckpt.save(step, state)
            health.checkpoint_saved(step, ckpt.path(step))  # <run>/ckpt/last_healthy once a validation vouches for it
    # ---- save: the one student transformer (and its EMA) as diffusers pipelines: tools/sample.py --model <run>/export
    ckpt.wait()
    if cfg.run.export:  # LoRA: merged into its base expert
        lora_base = experts[m.student_init] if cfg.lora.rank else None
        export_pipelines(student, run_dir, cfg.model.base, ema, lora_base, rank == 0)
    metrics.close()
    torch.distributed.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    with exit_on_config_error(Path(__file__), sys.argv[1:]):  # one line per bad key and its fix, no traceback
        main(load_config(RecipeConfig, sys.argv[1:], default_toml=Path(__file__).with_suffix(".toml")))
