"""Wan2.1-T2V-14B Sparse-distill: DMD2 distillation into a 3-step student with video sparse attention (VSA, ρ = 0.9).

The method and the code are those of recipes/wan21_1_3b_sparse_distill.py (read that one first; all code below the
imports is a checked copy): a VSA *student* with a zero-initialised gate, a frozen dense *teacher* (classifier-free-
guided "real score") and a dense trainable *critic* ("fake score"); the critic learns every step, the student every
`dmd.student_every`-th step along (critic − teacher) / mean|x0 − teacher| (SPEC §1.3–§1.7, §8), from Wan-Syn
77×448×832 latents noised to a random step of its [1000, 757, 522] schedule. What differs is the TOML: ρ = 0.9, flow
shift 3, and the layout for a 14B model: Ulysses sequence parallel 4 and HSDP with one node (8 GPUs) per FSDP shard
group, so 64 GPUs see 16 samples per step.

Launch (hardware: 8 nodes × 8 H100/H200; a single node runs it with parallel.dp_replicate=1):
    sbatch recipes/slurm/wan21_14b_sparse_distill.sbatch                              # 8 nodes
    torchrun --nproc_per_node 8 recipes/wan21_14b_sparse_distill.py parallel.dp_replicate=1   # one node
    torchrun --nproc_per_node 8 recipes/wan21_14b_sparse_distill.py parallel.dp_replicate=1 optim.grad_accum=4
    python tools/make_tiny_data.py --out outputs/tiny_data                            # CPU, tiny random models:
    python recipes/wan21_14b_sparse_distill.py --toml tests/assets/tiny.toml
Relaunching the same `run.name` resumes from its latest checkpoint. Outputs: outputs/<recipe>/<run.name>/ (config.toml,
recipe copy, env.txt, tb/, metrics.jsonl, ckpt/step-NNNNNN/, samples/step-NNNNNN/*.mp4, export/ in diffusers format).
Hyperparameters: FastVideo `examples/distill/Wan2.1-T2V/Wan-Syn-Data-480P/distill_dmd_VSA_t2v_14B.slurm` at HEAD
(SPEC §1.15); where FastVideo's docs disagree with the script the TOML follows the script and says so (SPEC §1.16).
To start an experiment, copy this file and its TOML under a new name.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from attention.sdpa import sdpa_attention
from attention.vsa import vsa_attention, vsa_meta
from components.config import ConfigError, dump_toml, load_config
from components.metrics import MetricsLogger
from components.optim import NonfiniteGuard, apply_update, init_ema, load_ema, update_ema
from components.run_dir import save_samples, write_run_files
from components.schedule import build_lr_scheduler, sparsity_at
from data.encode import load_vae
from data.latents import LatentDataset, load_negative_context, make_loader
from losses.dmd import critic_loss, dmd_loss, student_rollout_data
from losses.flow import add_noise, few_step_sample, sample_score_timesteps, x0_from_velocity
from models.wan import WAN_CONFIGS, WanConfig, WanModel
from models.wan_weights import export_random_init, read_config
from parallel.checkpoint import Checkpointer, ModelState, export_student
from parallel.mesh import ParallelDims, build_mesh, check_parallel_sizes, init_distributed
from parallel.wan import load_sharded, parallelize_wan


# ---- config: one dataclass per TOML table; the TOML documents the values and their provenance ----
# Copied from recipes/wan21_1_3b_sparse_distill.py:ModelConfig..main
@dataclass
class ModelConfig:
    base: Path  # diffusers pipeline root: transformer/ (all three networks start from it) and vae/
    preset: str | None = None  # a WAN_CONFIGS name: random weights of that size instead of base/transformer


@dataclass
class AttnConfig:
    student: Literal["vsa", "sdpa"]  # student self-attention; teacher and critic are always dense
    sparsity: float  # VSA ρ: the fraction of kv tiles each query tile skips
    sparsity_ramp: list[float]  # [] = constant ρ; [start, step, interval]: ρ_k = min(start + step·⌊k/interval⌋, ρ)


@dataclass
class VideoConfig:
    num_frames: int  # pixel frames of a clip (training latents and validation samples)
    height: int
    width: int
    vae_stride: list[int]  # VAE compression (T, H, W): latent T = (frames − 1)/stride_t + 1, H = height/stride_h
    fps: int  # of the validation mp4s


@dataclass
class DMDConfig:
    steps: list[int]  # the student's few-step schedule (timesteps on 0..1000)
    student_every: int  # one student update every N steps; the critic updates every step
    guidance: float  # teacher CFG in the DMD2 form: real = cond + w·(cond − uncond)
    flow_shift: float  # shift of the score-timestep sampler: t = clamp(shift(U{0..999}), t_min, t_max)
    t_min: float
    t_max: float


@dataclass
class OptimConfig:
    lr: float  # student AdamW
    critic_lr: float
    betas: list[float]
    weight_decay: float
    grad_clip: float  # max global grad norm, per network
    scheduler: Literal["constant", "cosine_with_min_lr"]  # student LR schedule, stepped every step (critic steps)
    critic_scheduler: Literal["constant", "cosine_with_min_lr"]
    warmup_steps: int  # cosine_with_min_lr only
    min_lr_ratio: float  # cosine floor
    grad_accum: int  # micro-batches per update


@dataclass
class DataConfig:
    path: str  # latent parquet folder(s): "dirA:2,dirB" repeats dirA twice
    negative_prompt: Path  # the unconditional caption embedding of the teacher's CFG (.safetensors or .parquet)
    val_prompts: Path  # text-only parquet; its first run.val_count rows are the fixed validation prompts
    batch_size: int  # per SP group and micro-batch
    num_workers: int = 4


@dataclass
class ParallelConfig:
    dp_replicate: int  # HSDP replicas; each shards over world / (dp_replicate · sp) ranks (= 1: pure replication)
    sp: int  # Ulysses sequence parallel size (divides the head count)
    mixed_precision: Literal["bf16", "fp32"]  # compute dtype; master weights and optimizer state stay fp32
    activation_checkpointing: Literal["none", "full", "selective"] = "full"
    compile: bool = False


@dataclass
class RunConfig:
    name: str
    seed: int  # data order, initial noise and timesteps are pure functions of (seed, dp rank, step)
    max_steps: int
    ema_decay: float  # EMA of the student (exported next to it); 0 = off
    log_every: int = 10
    ckpt_every: int = 500  # and after the last step; 0 = no training-state checkpoints
    keep_ckpts: int = 3
    val_every: int = 200
    val_count: int = 4  # validation prompts (their noise is drawn from run.seed)
    max_nonfinite_in_row: int = 3  # abort after this many consecutive steps with a skipped (non-finite) update
    out_dir: Path = Path("outputs")


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


ATTN = {"sdpa": sdpa_attention, "vsa": vsa_attention}


def check_config(cfg: RecipeConfig, world_size: int) -> tuple[WanConfig, tuple[int, ...]]:
    """Everything checkable without building a model; returns (model config, latent shape (C, T, H, W))."""
    for key, path in (("model.base", cfg.model.base / "vae"), ("data.negative_prompt", cfg.data.negative_prompt),
                      ("data.val_prompts", cfg.data.val_prompts)):
        if not path.exists():
            raise ConfigError(f"{key}: {path} does not exist")
    if cfg.model.preset is not None and cfg.model.preset not in WAN_CONFIGS:
        raise ConfigError(f"model.preset={cfg.model.preset!r}; choose one of {sorted(WAN_CONFIGS)}")
    wan = WAN_CONFIGS[cfg.model.preset] if cfg.model.preset else WanConfig.from_diffusers(read_config(cfg.model.base))
    try:
        check_parallel_sizes(world_size, cfg.parallel.dp_replicate, cfg.parallel.sp, wan.num_heads)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    (st, sh, sw), v = cfg.video.vae_stride, cfg.video
    if (v.num_frames - 1) % st or v.height % sh or v.width % sw:
        raise ConfigError(f"video: {v.num_frames}×{v.height}×{v.width} does not fit video.vae_stride={v.vae_stride}")
    if not (0 <= cfg.attn.sparsity < 1 and cfg.dmd.student_every >= 1 and cfg.optim.grad_accum >= 1):
        raise ConfigError("need 0 <= attn.sparsity < 1, dmd.student_every >= 1 and optim.grad_accum >= 1")
    return wan, (wan.in_channels, (v.num_frames - 1) // st + 1, v.height // sh, v.width // sw)


def build_wan(wan: WanConfig, attn: str, weights: Path, dims: ParallelDims, device: torch.device,
              par: ParallelConfig, frozen: bool) -> WanModel:
    """One network: built on the meta device, parallelised, then filled shard by shard from `weights`."""
    with torch.device("meta"):
        model = WanModel(replace(wan, vsa_gate=attn == "vsa"), attn_fn=ATTN[attn])  # the student's gate starts at 0
    parallelize_wan(model, dims, ac_mode=par.activation_checkpointing, compile=par.compile, frozen=frozen,
                    param_dtype=torch.bfloat16 if par.mixed_precision == "bf16" else torch.float32)
    load_sharded(model, weights, device)
    return model


# ---- data ----
def load_data(path: str, latent_shape: tuple[int, ...], text_dim: int) -> LatentDataset:
    """Wan-Syn-style latent parquet; its first row is read now, so a shape mismatch fails before any model is built."""
    dataset = LatentDataset(path, num_latent_t=latent_shape[1], expect_latent_shape=latent_shape,
                            rank=int(os.environ.get("RANK", 0)))
    try:
        width = dataset[0]["context"].shape[-1]
    except ValueError as e:
        raise ConfigError(f"data.path: {e} (the expected shape follows [video] and the model's channels)") from None
    if width != text_dim:
        raise ConfigError(f"data.path: caption embeddings have width {width}, the model expects {text_dim}")
    return dataset


def prepare_batch(batch: dict, latent_shape: tuple[int, ...], mean: torch.Tensor, std: torch.Tensor,
                  device: torch.device) -> dict:
    """Latents normalised per channel with the VAE's statistics (SPEC §0) and caption embeddings, on the device."""
    return {"latents": (batch["latents"].to(device) - mean) / std, "context": batch["context"].to(device)}


# ---- the method ----
def rollout(student: WanModel, batch: dict, meta, steps: list[int], gen: torch.Generator) -> torch.Tensor:
    """Student sample x0: one student step from data noised to a random step of its schedule (SPEC §1.4a)."""
    return student_rollout_data(lambda x, t: student(x, t, batch["context"], meta), batch["latents"], steps, gen)[0]


def student_step(student: WanModel, teacher: WanModel, critic: WanModel, batches: list[dict], negative: torch.Tensor,
                 meta, dmd: DMDConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the DMD2 gradient over the micro-batches (SPEC §1.5); returns detached (loss, normaliser)."""
    loss_sum, denom_sum = 0.0, 0.0
    for batch in batches:
        x0 = rollout(student, batch, meta, dmd.steps, gen)  # with grad, sparse attention
        context = batch["context"]
        with torch.no_grad():
            t = sample_score_timesteps(x0.shape[0], dmd.flow_shift, dmd.t_min, dmd.t_max, gen).to(x0.device)
            x_t = add_noise(x0.detach(), torch.randn(x0.shape, generator=gen, device=x0.device), t)
            fake = x0_from_velocity(x_t, critic(x_t, t, context), t)
            # Conditional and negative-prompt teacher passes as one batch of 2B.
            x_tt, tt = torch.cat([x_t, x_t]), torch.cat([t, t])
            v = teacher(x_tt, tt, torch.cat([context, negative.expand_as(context)]))
            cond, uncond = x0_from_velocity(x_tt, v, tt).chunk(2)
        loss, stats = dmd_loss(x0, fake, cond, uncond, dmd.guidance)
        (loss / len(batches)).backward()
        loss_sum = loss_sum + loss.detach() / len(batches)
        denom_sum = denom_sum + stats["dmd/denom"] / len(batches)
    return loss_sum, denom_sum


def critic_step(student: WanModel, critic: WanModel, batches: list[dict], meta, dmd: DMDConfig,
                gen: torch.Generator) -> torch.Tensor:
    """Accumulate the critic's flow-matching loss on fresh no-grad student samples (SPEC §1.6); returns it detached."""
    loss_sum = 0.0
    for batch in batches:
        with torch.no_grad():
            x0 = rollout(student, batch, meta, dmd.steps, gen)
        t = sample_score_timesteps(x0.shape[0], dmd.flow_shift, dmd.t_min, dmd.t_max, gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        loss = critic_loss(critic(add_noise(x0, noise, t), t, batch["context"]), noise, x0)
        (loss / len(batches)).backward()
        loss_sum = loss_sum + loss.detach() / len(batches)
    return loss_sum


@torch.no_grad()
def validate(student: WanModel, contexts: torch.Tensor, meta, steps: list[int], latent_shape: tuple[int, ...],
             seed: int) -> torch.Tensor:
    """The DMD sampler (SPEC §5.2) from fixed seeds on the fixed prompts: normalised latents (N, C, T, H, W)."""
    gen = torch.Generator(contexts.device).manual_seed(seed)
    noise = torch.randn((len(contexts), *latent_shape), generator=gen, device=contexts.device)
    return few_step_sample(lambda x, t: student(x, t, contexts, meta), noise, steps, gen)


def main(cfg: RecipeConfig) -> Path:
    # ---- setup: everything checkable is checked before any process group, model or GPU memory ----
    wan, latent_shape = check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    dataset = load_data(cfg.data.path, latent_shape, wan.text_dim)
    val_prompts = LatentDataset(str(cfg.data.val_prompts), text_only=True)
    rank, world, device = init_distributed()
    dims = build_mesh(world, cfg.parallel.dp_replicate, cfg.parallel.sp, device.type, wan.num_heads)
    run_dir = cfg.run.out_dir / Path(__file__).stem / cfg.run.name
    if rank == 0:
        write_run_files(run_dir, dump_toml(cfg), Path(__file__))
    metrics = MetricsLogger(run_dir, enabled=rank == 0, stdout_every=cfg.run.log_every)

    # ---- data: the VAE's latent statistics, negative prompt, validation prompts ----
    vae_json = json.loads((cfg.model.base / "vae" / "config.json").read_text())
    mean, std = (torch.tensor(vae_json[k], device=device).view(-1, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    negative = load_negative_context(cfg.data.negative_prompt)[0][None].to(device)  # (1, 512, D)
    val_contexts = torch.stack([val_prompts[i]["context"] for i in range(min(cfg.run.val_count, len(val_prompts)))])
    val_contexts = val_contexts.to(device)
    vae = load_vae(cfg.model.base, device) if rank == 0 else None

    # ---- models: student (VSA + gate), frozen dense teacher, dense critic; all start from the same weights ----
    weights = run_dir / "random_init" if cfg.model.preset else cfg.model.base  # preset: seeded random weights
    if cfg.model.preset and rank == 0:
        export_random_init(wan, weights, cfg.run.seed)
    dist.barrier()  # the weights exist before any rank reads them
    student = build_wan(wan, cfg.attn.student, weights, dims, device, cfg.parallel, frozen=False)
    teacher = build_wan(wan, "sdpa", weights, dims, device, cfg.parallel, frozen=True)
    critic = build_wan(wan, "sdpa", weights, dims, device, cfg.parallel, frozen=False)
    grid = student.token_grid((1, *latent_shape))

    # ---- optimizers: AdamW each; both LR schedules step every step (critic steps), as the reference does ----
    o = cfg.optim
    opts = {m: torch.optim.AdamW(net.parameters(), lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
            for m, net, lr in (("student", student, o.lr), ("critic", critic, o.critic_lr))}
    scheds = {m: build_lr_scheduler(opts[m], kind, o.warmup_steps, cfg.run.max_steps, o.min_lr_ratio)
              for m, kind in (("student", o.scheduler), ("critic", o.critic_scheduler))}
    ema = init_ema(student) if cfg.run.ema_decay > 0 else {}  # exported next to the student

    # ---- resume: relaunching a run.name continues from its latest checkpoint ----
    ckpt = Checkpointer(run_dir / "ckpt", keep_last=cfg.run.keep_ckpts)
    state = {"student": ModelState(student, opts["student"], scheds["student"]),
             "critic": ModelState(critic, opts["critic"], scheds["critic"]), "ema": ema}
    start = ckpt.load(state) or 0
    loader = iter(make_loader(dataset, cfg.data.batch_size, dims.dp_rank, dims.dp_size, cfg.run.seed,
                              start_step=start * o.grad_accum, num_workers=cfg.data.num_workers))

    # ---- loop ----
    amp = torch.autocast(device.type, torch.bfloat16, enabled=cfg.parallel.mixed_precision == "bf16")
    gen = torch.Generator(device)
    tokens_per_step = math.prod(grid) * cfg.data.batch_size * o.grad_accum * dims.dp_size
    guard = NonfiniteGuard(cfg.run.max_nonfinite_in_row, run_dir / "ckpt", verbose=rank == 0)
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
                loss, denom = student_step(student, teacher, critic, batches, negative, meta, cfg.dmd, gen)
                norm, ok_student = apply_update(student, opts["student"], loss, o.grad_clip)
                if ema and ok_student:
                    update_ema(ema, student, cfg.run.ema_decay)
                logs.update({"loss/dmd": loss, "dmd/denom": denom, "grad_norm/student": norm})
            loss = critic_step(student, critic, batches, meta, cfg.dmd, gen)
            norm, ok_critic = apply_update(critic, opts["critic"], loss, o.grad_clip)
            logs.update({"loss/critic": loss, "grad_norm/critic": norm})
        for s in scheds.values():
            s.step()
        guard.record(step, skipped=(not ok_student) + (not ok_critic))  # raises after too many bad steps in a row
        step_s = time.perf_counter() - t0
        if step % cfg.run.log_every == 0 or step == cfg.run.max_steps:
            keys = [k for k in logs if k.startswith(("loss/", "dmd/"))]
            avg = torch.stack([logs[k].float() for k in keys])
            dist.all_reduce(avg)  # one collective for all logged losses (gloo has no AVG)
            mem = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else 0.0
            metrics.log(step, {**logs, **dict(zip(keys, avg / world)), "attn/vsa_sparsity": rho if meta else 0.0,
                               "train/nonfinite": guard.total, "time/step_s": step_s, "time/data_s": data_s,
                               "perf/tokens_per_s": tokens_per_step / step_s, "mem/max_reserved_gib": mem})
        if step % cfg.run.val_every == 0 or step == cfg.run.max_steps:
            val_meta = vsa_meta(grid, cfg.attn.sparsity, device) if cfg.attn.student == "vsa" else None
            with amp:
                samples = validate(student, val_contexts, val_meta, cfg.dmd.steps, latent_shape, cfg.run.seed)
            if rank == 0:
                save_samples(vae, samples, run_dir / "samples" / f"step-{step:06d}", metrics, step, cfg.video.fps)
        if cfg.run.ckpt_every and (step % cfg.run.ckpt_every == 0 or step == cfg.run.max_steps):
            ckpt.save(step, state)

    # ---- save: the student (and its EMA) in diffusers format ----
    ckpt.wait()
    export_student(student, run_dir / "export")
    if ema:
        load_ema(student, ema)
        export_student(student, run_dir / "export_ema")
    metrics.close()
    dist.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    main(load_config(RecipeConfig, sys.argv[1:], default_toml=Path(__file__).with_suffix(".toml")))
