"""Flow-matching identities, the shifted timestep sampler against docs/METHOD.md §1.2's table, and both samplers on a
point-mass data distribution whose exact velocity field is known in closed form."""

import pytest
import torch

from losses.flow import (add_noise, expert_teacher_sample, few_step_sample, flow_matching_loss, sample_score_timesteps,
                         shift_timestep, sigma_of, teacher_sample, x0_from_velocity)


def test_add_noise_then_x0_from_true_velocity_round_trips():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 6, 6, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1000.0, 757.0, 20.0])
    x_t = add_noise(x0, noise, t)
    torch.testing.assert_close(x0_from_velocity(x_t, noise - x0, t), x0, rtol=0, atol=1e-5)
    # endpoints: t = 1000 is pure noise, t = 0 is data
    torch.testing.assert_close(add_noise(x0, noise, torch.full((3,), 1000.0)), noise)
    torch.testing.assert_close(add_noise(x0, noise, torch.zeros(3)), x0)
    assert flow_matching_loss(noise - x0, noise, x0).item() == 0.0


def test_x0_from_velocity_keeps_dtype_and_uses_float64():
    x_t = torch.randn(2, 8, dtype=torch.bfloat16)
    v = torch.randn(2, 8, dtype=torch.bfloat16)
    t = torch.tensor([757.0, 522.0])
    out = x0_from_velocity(x_t, v, t)
    assert out.dtype == torch.bfloat16
    ref = (x_t.double() - (t.double() / 1000)[:, None] * v.double()).to(torch.bfloat16)
    assert torch.equal(out, ref)


def test_shift_examples():
    # docs/METHOD.md §0: the shift is the identity for s = 1 and maps u = 1/2 to s / (s + 1)
    t = torch.linspace(0, 1000, 11)
    torch.testing.assert_close(shift_timestep(t, 1.0), t)
    assert shift_timestep(torch.tensor(500.0), 8.0).item() == pytest.approx(1000 * 8 / 9, rel=1e-6)
    assert sigma_of(torch.tensor(757.0)).item() == pytest.approx(0.757)


@pytest.mark.parametrize("shift, median, p_hi, p_lo", [(8, 888.9, 0.140, 0.003), (5, 833.3, 0.092, 0.005),
                                                        (3, 750.0, 0.057, 0.007)])
def test_score_timestep_distribution_matches_spec_table(shift, median, p_hi, p_lo):
    g = torch.Generator().manual_seed(1)
    t = sample_score_timesteps(400_000, shift, 20, 980, generator=g)
    assert t.shape == (400_000,) and t.dtype == torch.float32
    assert t.min().item() == 20 and t.max().item() == 980
    # median of U{0..999} sits between 499 and 500, i.e. within ~1 of SPEC's value (a wrong shift is off by > 40)
    assert t.median().item() == pytest.approx(median, abs=1.5)
    assert (t == 980).float().mean().item() == pytest.approx(p_hi, abs=0.003)
    assert (t == 20).float().mean().item() == pytest.approx(p_lo, abs=0.0007)


def point_mass_velocity(c: torch.Tensor):
    """Exact velocity of the flow whose data distribution is a point mass at c: v(x, t) = (x − c) / σ."""
    return lambda x, t: (x - c) / sigma_of(t).reshape(-1, *([1] * (x.ndim - 1)))


@pytest.mark.parametrize("num_steps, shift", [(3, 1.0), (50, 5.0)])
def test_teacher_sample_reaches_point_mass_and_applies_standard_cfg(num_steps, shift):
    g = torch.Generator().manual_seed(2)
    c_cond, c_uncond = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 4, 2, 4, 4, generator=g)
    noise = torch.randn(2, 4, 2, 4, 4, generator=g)
    cond, uncond = point_mass_velocity(c_cond), point_mass_velocity(c_uncond)
    out = teacher_sample(cond, uncond, noise, num_steps, shift, guidance=1.0)
    torch.testing.assert_close(out, c_cond.expand_as(out), atol=1e-4, rtol=0)
    # standard CFG of two point-mass flows is the point-mass flow at uncond + w (cond − uncond)
    out = teacher_sample(cond, uncond, noise, num_steps, shift, guidance=3.0)
    torch.testing.assert_close(out, (c_uncond + 3.0 * (c_cond - c_uncond)).expand_as(out), atol=1e-4, rtol=0)


def test_expert_teacher_sample_switches_by_each_steps_t():
    # Two experts, each a pair of point-mass flows (caption / negative prompt) with its own DMD2-form scale w: every
    # step calls the expert of its t (both prompts), and the chain ends at the last expert's standard-CFG point
    # uncond + (w + 1)(cond − uncond) (exact: Euler on a point-mass flow stays on its straight path).
    g = torch.Generator().manual_seed(4)
    points = {(e, neg): torch.randn(1, 4, 2, 4, 4, generator=g) for e in ("high", "low") for neg in (False, True)}
    noise, boundary, w, calls = torch.randn(2, 4, 2, 4, 4, generator=g), 875.0, {"high": 2.0, "low": 1.0}, []

    def velocity(expert, x, t, negative):
        calls.append((expert, float(t[0]), negative))
        return point_mass_velocity(points[expert, negative])(x, t)

    out = expert_teacher_sample(velocity, boundary, w, noise, 20, 5.0)
    assert {e for e, _, _ in calls} == {"high", "low"} and len(calls) == 40
    assert all(e == ("high" if t >= boundary else "low") for e, t, _ in calls)
    assert [neg for _, _, neg in calls] == [False, True] * 20
    low = points["low", True] + 2.0 * (points["low", False] - points["low", True])
    torch.testing.assert_close(out, low.expand_as(out), atol=1e-4, rtol=0)


def test_few_step_sample_renoises_between_steps():
    g = torch.Generator().manual_seed(3)
    c = torch.randn(1, 4, 2, 4, 4, generator=g)
    noise = torch.randn(2, 4, 2, 4, 4, generator=g)
    seen = []

    def model_fn(x, t):
        seen.append((x.clone(), t.clone()))
        return point_mass_velocity(c)(x, t)

    out = few_step_sample(model_fn, noise, steps=[1000, 757, 522], generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, c.expand_as(out), atol=1e-5, rtol=0)
    assert [s[1].tolist() for s in seen] == [[1000.0] * 2, [757.0] * 2, [522.0] * 2]
    assert torch.equal(seen[0][0], noise)
    # input of step 2 is the x0 prediction re-noised to σ = 0.757 with the generator's first fresh noise
    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(seen[1][0], 0.243 * c + 0.757 * fresh, atol=1e-5, rtol=0)
