"""Toy teacher: flow-matching pre-training of a tiny Wan DiT on synthetic moving-blob latent videos (CPU, minutes).

The teacher for `recipes/toy_sparse_distill.py`. Data: `data/synthetic.py` (one Gaussian blob per clip moving in a
random direction; colour, brightness and size come from a text-like caption embedding). Dense attention, caption
dropout so that classifier-free guidance works, an EMA of the weights is what gets exported (diffusers layout,
`models/wan_weights.export_pretrained`).

Launch:
    python recipes/toy_teacher.py                                  # the demo teacher (run.name = "demo")
    python recipes/toy_teacher.py optim.steps=200 run.name=quick   # an override
    torchrun --nproc_per_node 2 recipes/toy_teacher.py             # 2 ranks on CPU (gloo), gradients all-reduced
    python recipes/toy_teacher.py model.init=tests/assets/toy_teacher flow.t_range=[0.875,1.0] optim.steps=300
                                                                   # fine-tune a high-noise expert (make_toy_experts.py)

Measured (2-core CPU, 2026-11-27): 3000 steps in 366 s; 50-step CFG samples reach Fréchet 8.5 to held-out data (fresh
data: 0.3) with 93 % of captions rendered right (colour, brightness and size); only ~40 % of samples move the blob as
far as the data does (scripts/eval_toy.py), which is the chance level of unrelated frames: the same samples with their
second frames shuffled between clips score the same (41.7 % vs 42.7 %, 96 captions, 2026-12-02; `motion_chance`).
Hyperparameters are ours, tuned for the toy; nothing here comes from FastVideo. Copy this file and its TOML to start an
experiment.
"""

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from components.config import (
    ConfigError,
    as_config_error,
    dump_toml,
    exit_on_config_error,
    load_config,
    require_paths,
)
from components.metrics import MetricsLogger, write_video
from components.run_dir import write_run_files
from data.synthetic import ToySpec, clip_grid, evaluate_samples, make_split
from losses.flow import add_noise, flow_matching_loss, shift_timestep, teacher_sample
from models.wan import WAN_CONFIGS, WanModel, config_with
from models.wan_weights import export_pretrained, load_pretrained
from parallel.replicate import destroy_replicas, init_replicas, step_replicated


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    dim: int  # hidden size (tiny preset: 64)
    ffn_dim: int  # FFN inner size
    num_heads: int  # attention heads (head_dim = dim / num_heads)
    num_layers: int  # transformer blocks
    # Fine-tune this export instead of training from scratch (its architecture must match the four sizes above): how
    # the two experts of tests/assets/toy_experts/ start from the stored toy teacher.
    init: Path | None = None


@dataclass
class DataConfig:
    frames: int  # latent frames T
    height: int  # latent H (tokens: H / 2)
    width: int  # latent W
    num_train: int  # training clips (balanced over the 24 captions)
    num_heldout: int  # held-out clips for evaluation
    seed: int  # data seed (the distillation recipe must use the same one)


@dataclass
class FlowConfig:
    shift: float  # flow shift of the training-timestep distribution and of the sampler grid
    caption_dropout: float  # probability of training on the negative (zero) caption, enables CFG
    guidance: float  # standard CFG scale of validation samples (1 = conditional only)
    sample_steps: int  # Euler steps of validation samples
    # Training timesteps restricted to [lo, hi) · 1000 (after the shift), as fractions: a two-expert teacher's
    # high-noise expert trains on [0.875, 1] and its low-noise one on [0, 0.875] (Wan2.2-A14B T2V's boundary_ratio).
    t_range: tuple[float, float] = (0.0, 1.0)


@dataclass
class OptimConfig:
    lr: float
    weight_decay: float
    batch_size: int  # clips per rank per step
    steps: int
    grad_clip: float  # max global grad norm
    ema_decay: float  # EMA of the weights; the EMA is what is exported


@dataclass
class RunConfig:
    name: str  # outputs/toy_teacher/<name>/
    seed: int
    threads: int = 2  # torch CPU threads per rank
    # "cuda": one GPU per rank (NCCL across ranks), for the larger toy teachers (scripts/demo.py --large); random
    # draws come from a generator on that device, so a CUDA run is not bitwise a CPU run
    device: Literal["cpu", "cuda"] = "cpu"
    log_every: int = 50
    num_eval: int = 96  # held-out clips sampled for the final evaluation


@dataclass
class RecipeConfig:
    model: ModelConfig
    data: DataConfig
    flow: FlowConfig
    optim: OptimConfig
    run: RunConfig


# --------------------------------------------------------------------------------------------- recipe-local choices
def toy_spec(data: DataConfig) -> ToySpec:
    return ToySpec(frames=data.frames, height=data.height, width=data.width)


def build_wan(model: ModelConfig) -> WanModel:
    cfg = config_with(
        WAN_CONFIGS["tiny"],
        dim=model.dim,
        ffn_dim=model.ffn_dim,
        num_heads=model.num_heads,
        num_layers=model.num_layers,
    )
    return WanModel(cfg)


def unshift_timestep(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of losses/flow.shift_timestep: `1000 · σ / (s − (s − 1)·σ)` with `σ = t / 1000`."""
    sigma = t / 1000
    return 1000 * sigma / (shift - (shift - 1) * sigma)


def check_t_range(t_range: tuple[float, float]) -> None:
    lo, hi = t_range
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"flow.t_range {list(t_range)} needs 0 <= lo < hi <= 1 (fractions of the 1000 timesteps)")


def load_init(model: WanModel, path: Path) -> None:
    """Copy an export's weights into `model`; a size mismatch names the export and the model.* keys to set."""
    init = load_pretrained(path)
    if init.cfg != model.cfg:
        raise ConfigError(f"model.init {path}: its architecture {init.cfg} differs from the model.* sizes' "
                          f"{model.cfg}; set model.dim/ffn_dim/num_heads/num_layers to the export's")
    model.load_state_dict(init.state_dict())


# ---------------------------------------------------------------------------------------------------------- method
def train_step(
    model: WanModel,
    opt: torch.optim.Optimizer,
    x0: torch.Tensor,
    context: torch.Tensor,
    flow: FlowConfig,
    grad_clip: float,
    world: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One flow-matching step: noise the clips at shifted-uniform timesteps, regress the velocity noise − x0."""
    batch = x0.shape[0]
    # Shifted-uniform timesteps inside t_range: draw u uniformly between the unshifted ends, so that the density
    # inside the range is the full-range one's (the default (0, 1) draws u in [0, 1000) exactly as before).
    lo, hi = (unshift_timestep(torch.tensor(1000.0 * f), flow.shift) for f in flow.t_range)
    device = generator.device  # the batch's (run.device)
    u = lo + torch.rand(batch, generator=generator, device=device) * (hi - lo)
    t = shift_timestep(u, flow.shift)  # (B,) in [1000·lo, 1000·hi)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    drop = torch.rand(batch, generator=generator, device=device) < flow.caption_dropout
    context = torch.where(drop[:, None, None], torch.zeros_like(context), context)  # negative caption = zeros
    loss = flow_matching_loss(model(add_noise(x0, noise, t), t, context), noise, x0)
    grad_norm = step_replicated(model, opt, loss, grad_clip, world)  # backward, average over ranks, clip, step
    return {"loss/flow": loss.detach(), "grad_norm/teacher": grad_norm}


@torch.no_grad()
def update_ema(ema: WanModel, model: WanModel, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


@torch.no_grad()
def sample(
    model: WanModel,
    context: torch.Tensor,
    shape: tuple[int, ...],
    flow: FlowConfig,
    num_steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Many-step Euler samples with standard CFG against the negative (zero) caption."""
    negative = torch.zeros_like(context)
    noise = torch.randn(shape, generator=generator).to(context.device)  # CPU draws: the same noise on any device
    return teacher_sample(
        lambda x, t: model(x, t, context),
        lambda x, t: model(x, t, negative),
        noise,
        num_steps,
        flow.shift,
        flow.guidance,
    )


def validate(model: WanModel, heldout, cfg: RecipeConfig, run_dir: Path, metrics: MetricsLogger, step: int) -> None:
    """Sample held-out captions, log distance to data / conditioning accuracy, write a data | teacher mp4 grid."""
    n = min(cfg.run.num_eval, heldout.latents.shape[0])
    g = torch.Generator().manual_seed(cfg.run.seed + 7)
    context = heldout.context[:n].to(cfg.run.device)
    samples = sample(model, context, tuple(heldout.latents[:n].shape), cfg.flow, cfg.flow.sample_steps, g).cpu()
    scores = evaluate_samples(samples, heldout.factors[:n], heldout)
    metrics.log(step, {f"val/{key}": value for key, value in scores.items()})  # frechet, cond_acc, motion
    k = min(8, n)
    grid = clip_grid([heldout.latents[:k], samples[:k]])  # (T, 2·H', k·W', 3)
    write_video(run_dir / "samples" / f"step-{step:06d}" / "data_teacher.mp4", grid, fps=2)


# ------------------------------------------------------------------------------------------------------------ main
def main(cfg: RecipeConfig) -> Path:
    with as_config_error():
        check_t_range(cfg.flow.t_range)
    if cfg.model.init is not None:
        require_paths({"model.init": cfg.model.init})
    rank, world = init_replicas(cfg.run.device)
    torch.set_num_threads(cfg.run.threads)
    run_dir = Path("outputs") / "toy_teacher" / cfg.run.name
    metrics = MetricsLogger(run_dir, enabled=rank == 0, stdout_every=cfg.run.log_every)
    if rank == 0:
        write_run_files(run_dir, dump_toml(cfg), Path(__file__))

    spec = toy_spec(cfg.data)
    train, heldout = make_split(spec, cfg.data.num_train, cfg.data.num_heldout, cfg.data.seed)
    torch.manual_seed(cfg.run.seed)  # same init on every rank
    model = build_wan(cfg.model)
    if cfg.model.init is not None:
        load_init(model, cfg.model.init)
    device = torch.device(cfg.run.device)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    g = torch.Generator(device).manual_seed(cfg.run.seed + 1000 * rank)  # per-rank batches and noise
    latents, context = train.latents.to(device), train.context.to(device)

    start = time.perf_counter()
    for step in range(1, cfg.optim.steps + 1):
        idx = torch.randint(cfg.data.num_train, (cfg.optim.batch_size,), generator=g, device=device)
        scalars = train_step(model, opt, latents[idx], context[idx], cfg.flow, cfg.optim.grad_clip, world, g)
        update_ema(ema, model, cfg.optim.ema_decay)
        if step % cfg.run.log_every == 0 or step == cfg.optim.steps:
            scalars["time/elapsed_s"] = time.perf_counter() - start
            metrics.log(step, scalars)

    out = run_dir / "teacher"
    if rank == 0:
        export_pretrained(ema, out)
        validate(ema, heldout, cfg, run_dir, metrics, cfg.optim.steps)
    metrics.close()
    destroy_replicas(world)
    return out


if __name__ == "__main__":
    with exit_on_config_error(Path(__file__), sys.argv[1:]):  # one line per bad key and its fix, no traceback
        main(load_config(RecipeConfig, sys.argv[1:], default_toml=Path(__file__).with_suffix(".toml")))
