"""Rectified-flow pieces shared by pre-training, DMD2 distillation and sampling (docs/METHOD.md §0, §1.2, §5.2).

Conventions: `t` is a float tensor `(B,)` on the 0..1000 scale, `sigma = t / 1000`,
`x_sigma = (1 - sigma) * x0 + sigma * noise`, and a model predicts the velocity `v = noise - x0`.
A `model_fn(x_t, t) -> v` is any callable with that signature (conditioning already bound in).
"""

from collections.abc import Callable, Sequence

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NUM_TRAIN_TIMESTEPS = 1000
DMD_STEPS = (1000, 757, 522)


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    """Noise level of timestep `t` (0..1000): exactly t / 1000.

    FastVideo's add_noise / x0 conversion instead snap t to the nearest point of the shifted 1000-point grid
    t_i = 1000·σ_i, σ_i = shift(i / 1000) (`FlowMatchEulerDiscreteScheduler(shift=flow_shift)`) and use that σ_i.
    Measured against diffusers' grid (2026-12-02): for arbitrary t in [20, 980] the difference is up to half the grid
    spacing, 3.8e-3 at shift 8 (t ≈ 27), 2.4e-3 at shift 5, 1.5e-3 at shift 3. What the recipes feed it: a score
    timestep clamp(shift(U{0..999}), 20, 980) with the grid's shift *is* a grid point (|Δσ| ≤ 1.2e-7), except at
    the clamps: t = 20 (0.3 % / 0.5 % / 0.7 % of draws at shift 8 / 5 / 3) snaps to σ 0.0235 / 0.0197 / 0.0207,
    |Δσ| 3.5e-3 / 3.2e-4 / 7.1e-4, and t = 980 (14 % / 9 % / 6 %) |Δσ| ≤ 1.1e-4; the student's steps 757 and 522
    |Δσ| ≤ 4.4e-4 (t = 1000 is exact). The mean |Δσ| over score draws is ≤ 1.9e-5. The one large case changes
    x_t = (1 − σ)·x0 + σ·ε by 3.5e-3·|ε − x0|, the size of bf16's rounding of x_t itself, on 0.3 % of the
    score timesteps, so we keep the exact σ rather than copy the snapping.
    """
    return t / NUM_TRAIN_TIMESTEPS


def shift_timestep(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Flow shift `1000 · s·u / (1 + (s − 1)·u)` with `u = t / 1000`; the identity for s = 1."""
    u = t / NUM_TRAIN_TIMESTEPS
    return NUM_TRAIN_TIMESTEPS * shift * u / (1 + (shift - 1) * u)


def sample_score_timesteps(n: int, shift: float, t_min: float = 20, t_max: float = 980,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Timesteps for the DMD gradient and the critic loss: clamp(shift(U{0..999}), t_min, t_max) -> (n,) float32."""
    device = generator.device if generator is not None else None
    t_raw = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), generator=generator, device=device).float()
    return shift_timestep(t_raw, shift).clamp(t_min, t_max)


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))  # (B,) -> (B, 1, ..., 1)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 − σ)·x0 + σ·noise, σ = t / 1000 per sample."""
    sigma = _expand(sigma_of(t), x0).to(x0.dtype)
    return (1 - sigma) * x0 + sigma * noise


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean-sample estimate x0 = x_t − σ·v, computed in float64 (as FastVideo does) and cast back."""
    sigma = _expand(sigma_of(t.double()), x_t)
    return (x_t.double() - sigma * v.double()).to(x_t.dtype)


def flow_matching_loss(v_pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Unweighted MSE between the predicted and the true velocity `noise − x0`, in fp32."""
    return torch.mean((v_pred.float() - (noise.float() - x0.float())) ** 2)


def few_step_sample(model_fn: ModelFn, noise: torch.Tensor, steps: Sequence[float] = DMD_STEPS,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The DMD sampler (docs/METHOD.md §5.2): at each step predict x0, then re-noise it to the next step with fresh noise;
    return the last x0. `noise` is the starting point at steps[0] (σ = 1 for t = 1000)."""
    x = noise
    for i, step in enumerate(steps):
        t = torch.full((x.shape[0],), float(step), device=x.device)
        x0 = x0_from_velocity(x, model_fn(x, t), t)
        if i + 1 < len(steps):
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = add_noise(x0, fresh, torch.full_like(t, float(steps[i + 1])))
    return x0


def teacher_sample(model_fn_cond: ModelFn, model_fn_uncond: ModelFn, noise: torch.Tensor, num_steps: int,
                   shift: float, guidance: float) -> torch.Tensor:
    """Many-step Euler flow sampling on diffusers' shifted σ grid with standard classifier-free guidance
    `v = v_uncond + guidance · (v_cond − v_uncond)` (guidance = 1 is the plain conditional model)."""
    # Imported here: inference/ imports this module, also on GPU hosts without diffusers.
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise
    for step in scheduler.timesteps:
        t = step.expand(x.shape[0]).to(torch.float32)
        v = model_fn_cond(x, t)
        if guidance != 1:
            v_uncond = model_fn_uncond(x, t)
            v = v_uncond + guidance * (v - v_uncond)
        x = scheduler.step(v, step, x).prev_sample
    return x


EXPERTS = ("high", "low")  # Wan2.2-A14B: transformer/ for t >= boundary, transformer_2/ below


def expert_teacher_sample(velocity: Callable[[str, torch.Tensor, torch.Tensor, bool], torch.Tensor],
                          boundary: float, guidance: dict[str, float], noise: torch.Tensor, num_steps: int,
                          shift: float) -> torch.Tensor:
    """`teacher_sample` for a two-expert teacher: each step's expert and CFG scale by its t (one t per step), as
    diffusers' Wan pipelines switch. `velocity(expert, x, t, negative)` is that expert's velocity with the caption
    (negative False) or the negative prompt; `guidance` in the DMD2 form (standard CFG w + 1) per expert."""

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        expert = "high" if float(t[0]) >= boundary else "low"  # one t per step
        cond, uncond = velocity(expert, x, t, False), velocity(expert, x, t, True)
        return uncond + (guidance[expert] + 1) * (cond - uncond)

    return teacher_sample(guided, guided, noise, num_steps, shift, 1.0)  # guidance 1: `guided` is already guided
