"""The two-expert toy teacher (Wan2.2-A14B's layout on the toy): the high-noise expert answers for t >= boundary, the
low-noise one below, per sample and in the 50-step CFG sampler (against each expert called directly by
inference/samplers.expert's rule); toy_teacher's t_range restricts its training timesteps; toy_sparse_distill trains
with `model.teacher_2` set and refuses half-set expert keys."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.config import ConfigError, load_config
from inference.samplers import TwoExperts, expert
from losses.flow import shift_timestep, teacher_sample

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
EXPERTS = ROOT / "tests/assets/toy_experts"
sys.path.insert(0, str(RECIPES))
import toy_sparse_distill  # noqa: E402
import toy_teacher  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
BOUNDARY = 875.0  # boundary_ratio 0.875 on the 0..1000 scale


def random_expert(seed: int):
    cfg = load_config(toy_teacher.RecipeConfig, [], default_toml=RECIPES / "toy_teacher.toml")
    torch.manual_seed(seed)
    model = toy_teacher.build_wan(cfg.model).eval()
    with torch.no_grad():  # the zero-initialised output head would make every expert predict zeros
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def pair():
    return random_expert(1), random_expert(2)


def inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 2, 32, 32, generator=g), torch.randn(n, 8, 32, generator=g)


@torch.no_grad()
def test_each_sample_goes_to_the_expert_of_its_timestep(pair):
    high, low = pair
    teacher = TwoExperts(high, low, BOUNDARY)
    x, ctx = inputs(5)
    t = torch.tensor([999.0, 875.0, 874.9, 20.0, 500.0])  # the boundary itself belongs to the high-noise expert
    out = teacher(x, t, ctx)
    for i, name in enumerate(["high", "high", "low", "low", "low"]):
        direct = (high if name == "high" else low)(x[i:i + 1], t[i:i + 1], ctx[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], direct, rtol=1e-5, atol=1e-6, msg=lambda m: f"sample {i}: {m}")
    assert not torch.allclose(high(x, t, ctx), low(x, t, ctx), atol=1e-3)  # the experts differ: the test can tell
    torch.testing.assert_close(teacher(x[:2], t[:2], ctx[:2]), high(x[:2], t[:2], ctx[:2]))  # one-expert batches
    torch.testing.assert_close(teacher(x[2:], t[2:], ctx[2:]), low(x[2:], t[2:], ctx[2:]))


@torch.no_grad()
def test_fifty_step_cfg_sampler_switches_expert_at_the_boundary(pair):
    """The recipe's teacher sampler on the pair == the Euler+CFG loop calling, at each step, the expert that
    inference/samplers.expert picks for that step's timestep; both experts take part."""
    high, low = pair
    x, ctx = inputs(2, seed=1)
    shape, shift, w, seed = tuple(x.shape), 3.0, 0.5, 7
    got = toy_sparse_distill.sample_teacher(TwoExperts(high, low, BOUNDARY), ctx, shape, 50, shift,
                                            w, seed)
    seen = []

    def direct(context):
        def fn(x, t):
            net, low_noise = expert(high, low, BOUNDARY, float(t[0]))
            seen.append(low_noise)
            return net(x, t, context)
        return fn

    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    want = teacher_sample(direct(ctx), direct(torch.zeros_like(ctx)), noise, 50, shift, w + 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert 0 < seen.count(False) < len(seen)  # some steps above the boundary, the rest below
    only_high = toy_sparse_distill.sample_teacher(high, ctx, shape, 50, shift, w, seed)
    assert not torch.allclose(got, only_high, atol=1e-3)


def test_t_range_draws_training_timesteps_inside_it():
    t = torch.linspace(0, 1000, 11)
    torch.testing.assert_close(toy_teacher.unshift_timestep(shift_timestep(t, 3.0), 3.0), t, rtol=1e-5, atol=1e-3)
    seen = []
    flow = toy_teacher.FlowConfig(shift=3.0, caption_dropout=0.0, guidance=1.0, sample_steps=2, t_range=(0.875, 1.0))

    class Spy(torch.nn.Module):  # records the timesteps train_step feeds it
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, context):
            seen.append(t.clone())
            return x * self.w

    spy = Spy()
    x0, ctx = inputs(256)
    toy_teacher.train_step(spy, torch.optim.SGD(spy.parameters(), lr=0.0), x0, ctx, flow, 1.0, 1,
                           torch.Generator().manual_seed(0))
    assert seen[0].min() >= 875 and seen[0].max() < 1000 and seen[0].std() > 10
    with pytest.raises(ValueError, match="t_range"):
        toy_teacher.check_t_range((0.9, 0.5))


@pytest.mark.parametrize("override,match", [
    (["model.teacher_2=tests/assets/toy_experts/transformer_2"], "model.boundary"),
    (["model.boundary=0.875"], "model.teacher_2"),
    (["model.init=low"], "model.teacher_2"),
    (["model.teacher_2=x", "model.boundary=875"], r"in \(0, 1\)"),
    # LoRA's one frozen base is the one teacher: no other start, no second expert (data/toy_eval.py check_model)
    (["lora.rank=8", "model.student=tests/assets/toy_teacher"], "leave model.student unset"),
    (["lora.rank=8", "model.teacher_2=x", "model.boundary=0.875"], "needs lora.rank=0"),
])
def test_bad_model_keys_fail_before_any_work(override, match):
    cfg = load_config(toy_sparse_distill.RecipeConfig, ["model.teacher=tests/assets/toy_teacher", *override],
                      default_toml=RECIPES / "toy_sparse_distill.toml")
    with pytest.raises(ConfigError, match=match):
        toy_sparse_distill.main(cfg)


def test_distill_trains_two_steps_with_a_two_expert_teacher(tmp_path):
    """The stored pair, data-free, one student update per step (so the real score is used), from the low expert."""
    meta = json.loads((EXPERTS / "experts.json").read_text())
    distill = [sys.executable, str(RECIPES / "toy_sparse_distill.py"), f"model.teacher={EXPERTS / 'transformer'}",
               f"model.teacher_2={EXPERTS / 'transformer_2'}", f"model.boundary={meta['boundary_ratio']}",
               "model.init=low", "dmd.rollout=simulate", "dmd.student_every=1", "data.num_train=8",
               "data.num_heldout=24", "optim.steps=2", "optim.batch_size=4", "run.num_eval=2", "run.threads=1",
               "run.log_every=1", "health.teacher_steps=4", "run.name=d"]
    proc = subprocess.run(distill, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "outputs/toy_sparse_distill/d"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/dmd" in r] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss/dmd"])) for r in rows if "loss/dmd" in r)
    assert (run_dir / "student" / "config.json").is_file()
    assert 'teacher_2 = "' in (run_dir / "config.toml").read_text()
