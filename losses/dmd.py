"""DMD2 losses and student rollouts (docs/METHOD.md §1.4–§1.6, §8).

Networks enter as callables `fn(x_t, t) -> velocity` with the conditioning already bound, so the same code serves
any model, attention backend or parallel layout. The caller chooses grad / no-grad around each call.
"""

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from losses.flow import EXPERTS, ModelFn, add_noise, x0_from_velocity


def dmd_loss(x0: torch.Tensor, fake_x0: torch.Tensor, real_cond_x0: torch.Tensor, real_uncond_x0: torch.Tensor,
             guidance: float, per_sample: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DMD2 student loss. `x0` is the student sample (with grad); the other three are the critic's and the teacher's
    conditional / unconditional x0 predictions at the same noised point (no grad). Teacher CFG is the DMD2 form
    `real = cond + w·(cond − uncond)` (w = 0: conditional, w = −1: unconditional; standard CFG scale = w + 1).
    The loss value is ½·mean(g²) and its gradient w.r.t. x0 is g / x0.numel(), g = (fake − real) / mean|x0 − real|.
    The normaliser mean|x0 − real| is taken per clip (DMD2's reference), so a batch of B clips updates the student as
    B ranks of one clip do — FastVideo's whole-tensor scalar, which its recipes take over one clip per rank.
    `per_sample=False` takes it over the whole batch (FastVideo's code at batch > 1): the high-noise clips of a batch,
    whose `fake − real` is large, then scale down the update of its low-noise clips, the only ones that see fine detail
    (the toy measures it: recipes/toy_sparse_distill.toml [dmd] normaliser)."""
    x0_32 = x0.float()
    with torch.no_grad():
        real = real_cond_x0.float() + guidance * (real_cond_x0.float() - real_uncond_x0.float())
        dims = tuple(range(1, x0.ndim)) if per_sample else tuple(range(x0.ndim))
        denom = torch.mean(torch.abs(x0_32 - real), dim=dims, keepdim=True)
        grad = torch.nan_to_num((fake_x0.float() - real) / denom)
    loss = 0.5 * torch.mean((x0_32 - (x0_32 - grad).detach()) ** 2)
    stats = {"dmd/denom": denom.mean(), "dmd/grad_abs_mean": grad.abs().mean()}
    return loss, stats


@torch.no_grad()
def expert_real_score(velocity: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                      boundary: float, guidance: dict[str, float], x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A two-expert teacher's CFG x0 (DMD2 form, real = cond + w·(cond − uncond), w per expert) of each row by the
    expert of its score timestep: "high" for t >= boundary, "low" below. `velocity(expert, idx, x, t)` runs that
    expert on rows `idx` as one batch of 2n (x and t are those rows twice: with the caption, then with the negative
    prompt) and returns its velocity. Returns fp32, x_t's shape.

    Every rank calls an expert that any rank needs (FSDP's all-gathers are collectives); a rank with no rows for it
    runs it on row 0 and drops the result."""
    rows = {"high": t >= boundary, "low": t < boundary}  # (B,) each
    need = torch.stack([rows[e].any() for e in EXPERTS]).int()
    if dist.is_initialized():
        dist.all_reduce(need, op=dist.ReduceOp.MAX)
    real = torch.zeros(x_t.shape, dtype=torch.float32, device=x_t.device)
    for expert, needed in zip(EXPERTS, need.tolist()):
        if not needed:
            continue
        idx = rows[expert].nonzero()[:, 0]  # (n,)
        keep = len(idx) > 0
        idx = idx if keep else torch.zeros(1, dtype=torch.long, device=t.device)
        x, tt = torch.cat([x_t[idx]] * 2), torch.cat([t[idx]] * 2)  # (2n, ...)
        cond, uncond = x0_from_velocity(x, velocity(expert, idx, x, tt), tt).float().chunk(2)
        if keep:
            real[idx] = cond + guidance[expert] * (cond - uncond)
    return real


def critic_loss(critic_v: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Critic (fake score) flow-matching loss on student samples: MSE to the velocity `noise − x0`, in fp32."""
    return torch.mean((critic_v.float() - (noise.float() - x0.float())) ** 2)


def _step_t(step: float, batch: int, device: torch.device) -> torch.Tensor:
    return torch.full((batch,), float(step), device=device)


def student_rollout_data(student_fn: ModelFn, x_data: torch.Tensor, steps: Sequence[float],
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """Data mode (docs/METHOD.md §1.4a): pick step j ~ U{0..|S|−1}, forward-noise the data to S_j and predict x0 in one
    student call (with grad if grad is enabled). Returns (x0, S_j)."""
    j = int(torch.randint(len(steps), (1,), generator=generator, device=_gen_device(generator)))
    t = _step_t(steps[j], x_data.shape[0], x_data.device)
    noise = torch.randn(x_data.shape, generator=generator, device=x_data.device, dtype=x_data.dtype)
    x_t = add_noise(x_data, noise, t)
    return x0_from_velocity(x_t, student_fn(x_t, t), t), float(steps[j])


def student_rollout_simulate(student_fn: ModelFn, shape: Sequence[int], steps: Sequence[float],
                             generator: torch.Generator | None = None,
                             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """Data-free mode (docs/METHOD.md §1.4b): from pure noise run the student's whole chain without grad (predict x0, re-noise
    to the next step), keep the state at a random step j, then make the trained prediction at S_j (with grad if grad is
    enabled). The chain always runs all |S| − 1 steps, so the RNG stream does not depend on j. Returns (x0, S_j)."""
    device = _gen_device(generator)
    j = int(torch.randint(len(steps), (1,), generator=generator, device=device))
    x = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    states = [x]
    with torch.no_grad():
        for i in range(len(steps) - 1):
            t = _step_t(steps[i], x.shape[0], device)
            x0 = x0_from_velocity(x, student_fn(x, t), t)
            fresh = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
            x = add_noise(x0, fresh, _step_t(steps[i + 1], x.shape[0], device))
            states.append(x)
    x_in = states[j]
    t = _step_t(steps[j], x_in.shape[0], device)
    return x0_from_velocity(x_in, student_fn(x_in, t), t), float(steps[j])


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")
