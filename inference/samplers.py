"""Sampling loops over a Wan DiT: the few-step DMD student, the many-step CFG teacher, TI2V image conditioning.

    x0 = denoise_student(model, context, (1, 16, 21, 60, 104), [1000, 757, 522], generator, attn_meta=meta)
    x0 = denoise_teacher(model, context, negative, shape, generator, num_steps=50, guidance=5.0, shift=5.0)

Student (DMD2, Yin et al. 2024; FastVideo's `DmdDenoisingStage` in fastvideo/pipelines/stages/denoising.py): one
conditional forward per step, no CFG; x0 = x_t - sigma v; re-noise x0 to the next step with fresh noise from the seeded
generator; return the last x0. Teacher (Wan's sampler, fastvideo/pipelines/basic/wan/wan_pipeline.py): diffusers' UniPC
in flow mode with `uncond + g (cond - uncond)`. TI2V image conditioning (FastVideo's generic `DenoisingStage`): latent
frame 0 is the encoded image and its tokens get t = 0; it is re-clamped every step. The flow arithmetic is
losses/flow.py's; latents are normalised (B, C, T, H, W) in fp32 outside the model, which runs in its own dtype.

I2V (Wan2.1-I2V-14B, Wan2.2-I2V-A14B; diffusers' pipelines/wan/pipeline_wan_i2v.py): a fixed `condition` (B, 4 + C,
T, H, W) = first-frame mask + VAE latent of [image, zero frames] is concatenated to x on the channel axis before every
forward; Wan2.1-I2V also passes CLIP `image_context`. Nothing is clamped: the model predicts every frame.

Two experts (Wan2.2-A14B; diffusers' pipelines/wan/pipeline_wan.py): `model` (high noise) runs the steps with
t >= `boundary` (= boundary_ratio * 1000), `model_2` (low noise) the rest; the teacher's CFG scale is `guidance` for
the first and `guidance_2` for the second. The student follows the same rule when it has two experts; a distilled
student is usually one transformer (`model_2=None`), which then runs every step.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
from tqdm import tqdm

from inference.parallel import SINGLE, SamplingGroups, cfg_branches
from inference.timer import StageTimer
from losses.flow import add_noise, x0_from_velocity
from models.wan import WanModel


def token_timesteps(t: torch.Tensor, grid: tuple[int, int, int], batch: int) -> torch.Tensor:
    """Per-token timesteps (B, L) for image conditioning from t (1,) or (): t everywhere except the tokens of latent
    frame 0 (t = 0)."""
    nt, nh, nw = grid
    keep = torch.ones(nt * nh * nw, device=t.device)
    keep[: nh * nw] = 0  # raster order (t, h, w): frame 0 comes first
    return (t * keep).expand(batch, -1)


def with_image(x: torch.Tensor, image_latent: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, T, H, W) with latent frame 0 replaced by image_latent (B, C, 1, H, W); x itself when None."""
    return x if image_latent is None else torch.cat([image_latent, x[:, :, 1:]], dim=2)


def i2v_input(x: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, T, H, W) with the I2V condition (B, 4 + C, T, H, W) appended on channels; x itself when None."""
    return x if condition is None else torch.cat([x, condition.to(x.dtype)], dim=1)


def model_input_shape(latent_shape: tuple[int, ...], condition: torch.Tensor | None) -> tuple[int, ...]:
    """The DiT's input shape: the latents' with the I2V condition's channels added."""
    extra = 0 if condition is None else condition.shape[1]
    return (latent_shape[0], latent_shape[1] + extra, *latent_shape[2:])


def expert(model: WanModel, model_2: WanModel | None, boundary: float | None, t: float) -> tuple[WanModel, bool]:
    """(the expert for timestep t, whether it is the low-noise one): `model` for t >= boundary or without a second."""
    if model_2 is None or boundary is None or t >= boundary:
        return model, False
    return model_2, True


class TwoExperts(torch.nn.Module):
    """A frozen two-expert teacher: `high(x, t, context)` for the samples whose timestep t >= `boundary` (0..1000
    scale), `low` for the rest (`expert`, applied per sample: one batch's DMD score timesteps differ)."""

    def __init__(self, high: torch.nn.Module, low: torch.nn.Module, boundary: float) -> None:
        super().__init__()
        self.high, self.low, self.boundary = high, low, boundary

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        above = t >= self.boundary  # (B,)
        if bool(above.all()) or not bool(above.any()):
            return (self.high if bool(above.all()) else self.low)(x, t, context)
        out = torch.empty_like(x)  # the toy's DiT predicts a velocity of x's shape
        out[above] = self.high(x[above], t[above], context[above])
        out[~above] = self.low(x[~above], t[~above], context[~above])
        return out


def model_dtype(model: WanModel) -> torch.dtype:
    """The DiT runs in plain bf16 (or fp32) without autocast: its inputs are cast to its weights' dtype."""
    return model.patch_embedding.weight.dtype


def denoise_student(
    model: WanModel,
    context: torch.Tensor,  # (B, L_txt, D_txt)
    latent_shape: tuple[int, ...],  # (B, C, T, H, W)
    steps: Sequence[float],
    generator: torch.Generator,
    *,
    attn_meta: Any = None,
    image_latent: torch.Tensor | None = None,  # (B, C, 1, H, W) normalised; TI2V image conditioning
    condition: torch.Tensor | None = None,  # (B, 4 + C, T, H, W) I2V mask + image latent
    image_context: torch.Tensor | None = None,  # (B, 257, 1280) CLIP tokens (Wan2.1-I2V)
    model_2: WanModel | None = None,  # low-noise expert (t < boundary), if the student has two
    boundary: float | None = None,  # expert switch on the 0..1000 scale
    timer: StageTimer | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Few-step DMD sampling -> normalised x0 latents (B, C, T, H, W) float32.

    Draws from `generator`, in this order: the starting noise, then one fresh noise per re-noise step.
    One conditional forward per step in the model's dtype; the sampler's arithmetic stays in fp32/fp64.
    Nothing in the loop waits for the GPU.
    """
    device, batch, dtype = context.device, latent_shape[0], model_dtype(model)
    context = context.to(dtype)
    image_context = None if image_context is None else image_context.to(dtype)
    timer = timer or StageTimer(device)
    grid = model.token_grid(model_input_shape(latent_shape, condition))
    x = torch.randn(latent_shape, generator=generator, device=device)
    for i in tqdm(range(len(steps)), desc="denoise", disable=not progress):
        with timer.stage(f"denoise step {i + 1} (t={steps[i]:g})"):
            t = torch.full((batch,), steps[i], device=device)  # a fill kernel: no host->device copy, no sync
            x = with_image(x, image_latent)
            t_model = t if image_latent is None else token_timesteps(t[:1], grid, batch)
            net, _ = expert(model, model_2, boundary, steps[i])
            extra = {} if image_context is None else {"image_context": image_context}  # T2V: the call as before
            v = net(i2v_input(x, condition).to(dtype), t_model, context, attn_meta=attn_meta, **extra)
            x0 = with_image(x0_from_velocity(x, v.float(), t), image_latent)
            if i + 1 < len(steps):
                fresh = torch.randn(latent_shape, generator=generator, device=device)
                x = add_noise(x0, fresh, torch.full((batch,), steps[i + 1], device=device))
    return x0


def denoise_teacher(
    model: WanModel,
    context: torch.Tensor,  # (B, L_txt, D_txt)
    negative: torch.Tensor,  # (B, L_txt, D_txt)
    latent_shape: tuple[int, ...],  # (B, C, T, H, W)
    generator: torch.Generator,
    *,
    num_steps: int,
    guidance: float,
    shift: float,
    image_latent: torch.Tensor | None = None,  # (B, C, 1, H, W) normalised; TI2V image conditioning
    condition: torch.Tensor | None = None,  # (B, 4 + C, T, H, W) I2V mask + image latent
    image_context: torch.Tensor | None = None,  # (B, 257, 1280) CLIP tokens (Wan2.1-I2V)
    model_2: WanModel | None = None,  # low-noise expert (t < boundary): Wan2.2-A14B
    boundary: float | None = None,  # expert switch on the 0..1000 scale
    guidance_2: float | None = None,  # the low-noise expert's CFG scale (default: guidance)
    timer: StageTimer | None = None,
    progress: bool = True,
    groups: SamplingGroups = SINGLE,
) -> torch.Tensor:
    """Many-step flow sampling with CFG `uncond + g (cond - uncond)` and diffusers' UniPC (Wan's teacher sampler)
    -> normalised latents (B, C, T, H, W) float32. Dense attention: the model gets no attention metadata.
    groups: with CFG-parallel (inference/parallel.py) this rank runs one branch and receives the other."""
    from diffusers import UniPCMultistepScheduler

    device, batch, dtype = context.device, latent_shape[0], model_dtype(model)
    context, negative = context.to(dtype), negative.to(dtype)
    timer = timer or StageTimer(device)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                        num_train_timesteps=1000)
    # The expert of each step from the CPU timesteps (reading the device ones in the loop would sync the GPU).
    scheduler.set_timesteps(num_steps, device="cpu")
    host_steps = scheduler.timesteps.tolist()
    scheduler.set_timesteps(num_steps, device=device)
    guidance_2 = guidance if guidance_2 is None else guidance_2
    image_context = None if image_context is None else image_context.to(dtype)
    grid = model.token_grid(model_input_shape(latent_shape, condition))
    x = torch.randn(latent_shape, generator=generator, device=device)
    for i, step in enumerate(tqdm(scheduler.timesteps, desc="teacher", disable=not progress)):
        net, low_noise = expert(model, model_2, boundary, host_steps[i])
        scale = guidance_2 if low_noise else guidance
        if image_context is not None:
            net = functools.partial(net, image_context=image_context)  # cfg_branches calls net(x, t, context)
        with timer.stage(f"denoise step {i + 1}"):
            x = with_image(x, image_latent)
            t = step.float().expand(batch) if image_latent is None else token_timesteps(step.float(), grid, batch)
            cond, uncond = cfg_branches(net, i2v_input(x, condition).to(dtype), t, context, negative, groups)
            x = scheduler.step(uncond + scale * (cond - uncond), step, x).prev_sample
    return with_image(x, image_latent)
