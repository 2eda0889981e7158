"""DMD2 loss gradient vs the analytic formula, the CFG form, the critic loss, and both student rollouts checked
against a hand-written replay of docs/METHOD.md §1.4 with the same random stream."""

import pytest
import torch

from losses.dmd import critic_loss, dmd_loss, student_rollout_data, student_rollout_simulate
from losses.flow import add_noise


def make_x0s(seed=0, shape=(2, 4, 3, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("w", [0.0, 3.5, -1.0])
def test_dmd_gradient_matches_analytic(w, per_sample):
    x0, fake, cond, uncond = make_x0s()
    x0.requires_grad_(True)
    loss, stats = dmd_loss(x0, fake, cond, uncond, guidance=w, per_sample=per_sample)
    loss.backward()
    real = cond + w * (cond - uncond)
    # the normaliser: one per clip (the default, DMD2's), or one scalar over the whole batch (FastVideo's code)
    err = (x0.detach() - real).abs()
    denom = torch.stack([e.mean() for e in err]).reshape(-1, 1, 1, 1, 1) if per_sample else err.mean()
    expected = (fake - real) / denom / x0.numel()
    torch.testing.assert_close(x0.grad, expected.to(x0.grad.dtype), rtol=1e-5, atol=1e-9)
    # value is ½·mean(g²)
    torch.testing.assert_close(loss.double(), 0.5 * (((fake - real) / denom) ** 2).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats["dmd/denom"].double(), denom.mean(), rtol=1e-6, atol=0)
    assert loss.dtype == torch.float32


def test_per_sample_normaliser_makes_a_batch_the_mean_of_its_clips():
    """A batch of two == each clip's loss alone, averaged (what two ranks of one clip all-reduce); the batch-wide
    normaliser couples them: there a clip's gradient depends on the other clip."""
    x0, fake, cond, uncond = make_x0s(2)
    cond = cond.clone()
    cond[1] += 10  # the teacher far from the second clip (as at high noise): its |x0 − real| is ~10x the first's
    x0.requires_grad_(True)
    loss, _ = dmd_loss(x0, fake, cond, uncond, guidance=0.0)
    (grad,) = torch.autograd.grad(loss, x0)
    alone = []
    for i in range(2):
        xi = x0.detach()[i : i + 1].requires_grad_(True)
        li, _ = dmd_loss(xi, fake[i : i + 1], cond[i : i + 1], uncond[i : i + 1], guidance=0.0)
        alone.append(torch.autograd.grad(li / 2, xi)[0])
    torch.testing.assert_close(grad, torch.cat(alone), rtol=1e-6, atol=0)
    batch_loss, _ = dmd_loss(x0, fake, cond, uncond, guidance=0.0, per_sample=False)
    (batch_grad,) = torch.autograd.grad(batch_loss, x0)
    assert batch_grad[0].abs().mean() < 0.5 * grad[0].abs().mean()  # the far clip shrinks the other's update


def test_cfg_form_endpoints():
    x0, fake, cond, uncond = make_x0s(1)
    # w = 0 is the conditional prediction, w = −1 the unconditional one: compare with dmd_loss(real = that tensor)
    for w, target in [(0.0, cond), (-1.0, uncond)]:
        a, _ = dmd_loss(x0, fake, cond, uncond, guidance=w)
        b, _ = dmd_loss(x0, fake, target, target, guidance=0.0)
        torch.testing.assert_close(a, b)


def test_dmd_zero_gradient_when_critic_matches_teacher():
    x0, _, cond, uncond = make_x0s(2)
    x0.requires_grad_(True)
    real = cond + 2.0 * (cond - uncond)
    loss, _ = dmd_loss(x0, real, cond, uncond, guidance=2.0)
    loss.backward()
    assert loss.item() < 1e-10
    assert x0.grad.abs().max().item() < 1e-8  # fp32 rounding of real = cond + w(cond − uncond)


def test_critic_loss_is_velocity_mse():
    x0, noise, v, _ = make_x0s(3)
    torch.testing.assert_close(critic_loss(v, noise, x0).double(), ((v - (noise - x0)) ** 2).mean(),
                               rtol=1e-5, atol=0)
    assert critic_loss(noise - x0, noise, x0).item() < 1e-12


def linear_student(scale):
    """A differentiable stand-in student: v = scale · x_t · (1 + t / 1000)."""
    return lambda x, t: scale * x * (1 + t.reshape(-1, 1, 1) / 1000)


def test_rollout_data_replays_spec():
    steps = [1000, 757, 522]
    scale = torch.tensor(0.3, requires_grad=True)
    x_data = torch.randn(2, 3, 4)
    x0, t = student_rollout_data(linear_student(scale), x_data, steps, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    j = int(torch.randint(3, (1,), generator=g))
    noise = torch.randn(x_data.shape, generator=g)
    tt = torch.full((2,), float(steps[j]))
    x_t = add_noise(x_data, noise, tt)
    assert t == steps[j]
    torch.testing.assert_close(x0, x_t - steps[j] / 1000 * linear_student(0.3)(x_t, tt))
    x0.sum().backward()
    assert scale.grad is not None and scale.grad.abs() > 0


def test_rollout_simulate_replays_spec_and_grads_only_last_call():
    steps = [1000, 757, 522]
    calls = []
    scale = torch.tensor(0.3, requires_grad=True)

    def student(x, t):
        calls.append(torch.is_grad_enabled())
        return linear_student(scale)(x, t)

    for seed in range(6):  # covers every j
        calls.clear()
        x0, t = student_rollout_simulate(student, (2, 3, 4), steps, torch.Generator().manual_seed(seed))
        assert calls == [False, False, True]
        g = torch.Generator().manual_seed(seed)
        j = int(torch.randint(3, (1,), generator=g))
        x = torch.randn(2, 3, 4, generator=g)
        states = [x]
        for i in range(2):
            ti = torch.full((2,), float(steps[i]))
            xi0 = x - steps[i] / 1000 * linear_student(0.3)(x, ti)
            x = add_noise(xi0, torch.randn(2, 3, 4, generator=g), torch.full((2,), float(steps[i + 1])))
            states.append(x)
        tj = torch.full((2,), float(steps[j]))
        assert t == steps[j]
        torch.testing.assert_close(x0, states[j] - steps[j] / 1000 * linear_student(0.3)(states[j], tj))
        assert x0.requires_grad
