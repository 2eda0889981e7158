"""components/schedule.py and components/optim.py against their formulas and a hand-written update.

LR multiplier: linear warmup k / warmup, then 0.5 + 0.5·cos(π·progress) floored at min_ratio, constant = 1 (docs/METHOD.md §1.7);
sparsity ramp min(start + inc·⌊k / interval⌋, target) (docs/METHOD.md §2.9); apply_update == clip + AdamW step when finite, and a
non-finite loss or grad norm leaves the parameters and optimizer state untouched; the non-finite guard counts and
aborts; the EMA follows ema ← d·ema + (1 − d)·p.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from components.optim import NonfiniteGuard, ShardedAdamW, apply_update, init_ema, load_ema, update_ema
from components.schedule import build_lr_scheduler, lr_lambda, sparsity_at


def cosine_with_min_lr(k: int, warmup: int, total: int, min_ratio: float) -> float:
    if k < warmup:
        return k / warmup
    return max(min_ratio, 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))))


@pytest.mark.parametrize("k", [0, 1, 5, 9, 10, 11, 30, 55, 80, 99, 100, 150])
def test_cosine_with_min_lr_matches_formula(k):
    assert lr_lambda("cosine_with_min_lr", 10, 100, 0.1)(k) == pytest.approx(cosine_with_min_lr(k, 10, 100, 0.1))


def test_cosine_landmarks():
    f = lr_lambda("cosine_with_min_lr", 10, 110, 0.1)
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5)  # warmup starts at 0 and is linear
    assert f(10) == pytest.approx(1.0)  # the peak, right after warmup
    assert f(60) == pytest.approx(0.5)  # half-way through the cosine
    assert f(100) == pytest.approx(0.1) and f(110) == pytest.approx(0.1)  # the floor, up to the last step
    assert lr_lambda("cosine_with_min_lr", 0, 100, 0.0)(0) == pytest.approx(1.0)  # no warmup: the peak at step 0


def test_constant_ignores_warmup_and_unknown_kind_is_named():
    f = lr_lambda("constant", 10, 100, 0.1)
    assert [f(k) for k in (0, 5, 10, 1000)] == [1.0] * 4
    with pytest.raises(ValueError, match="'linear'"):
        lr_lambda("linear", 10, 100, 0.1)


def test_build_lr_scheduler_drives_the_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = build_lr_scheduler(opt, "cosine_with_min_lr", 4, 20, 0.2)
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * cosine_with_min_lr(k, 4, 20, 0.2) for k in range(25)])


def test_sparsity_ramp():
    assert sparsity_at(0, 0.8, []) == 0.8 and sparsity_at(10**6, 0.8, []) == 0.8
    ramp = [0.5, 0.1, 100]
    assert [sparsity_at(k, 0.8, ramp) for k in (0, 99, 100, 250, 299, 300, 10_000)] == pytest.approx(
        [0.5, 0.5, 0.6, 0.7, 0.7, 0.8, 0.8])
    with pytest.raises(ValueError, match=r"\[start, increment, interval\]"):
        sparsity_at(0, 0.8, [0.5, 0.1])


def model_and_loss(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return model, model(torch.randn(5, 4)).pow(2).mean()


def test_apply_update_equals_clip_then_step():
    model, loss = model_and_loss()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    loss.backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    expected_norm = torch.cat([q.grad.flatten() for q in ref.parameters()]).norm()
    scale = min(1.0, 0.01 / float(expected_norm))  # max_norm 0.01 clips
    for q in ref.parameters():
        q.grad *= scale
    ref_opt.step()
    norm, ok = apply_update(model, opt, loss.detach(), max_norm=0.01)
    assert ok and float(norm) == pytest.approx(float(expected_norm), rel=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
        assert p.grad is None  # gradients dropped after the step


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_apply_update_skips_a_nonfinite_step(poison):
    model, loss = model_and_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    loss.backward()
    if poison == "grad":
        model.weight.grad[0, 0] = float("inf")
    else:
        loss = loss.detach() * float("nan")
    before = copy.deepcopy(model.state_dict())
    norm, ok = apply_update(model, opt, loss.detach(), max_norm=1.0)
    assert not ok
    assert (poison == "loss") == bool(torch.isfinite(norm))  # the grad norm is reported as it was
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters()) and not opt.state  # no AdamW moments were created


def test_nonfinite_guard_counts_resets_and_aborts(tmp_path, capsys):
    guard = NonfiniteGuard(max_in_row=2, ckpt_dir=tmp_path / "ckpt")
    guard.record(1, skipped=2)
    guard.record(2, skipped=0)  # a clean step resets the run of bad steps
    guard.record(3, skipped=1)
    assert (guard.total, guard.in_row) == (3, 1)
    assert "step 3: non-finite loss or grad norm, update skipped (3 so far)" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match=r"2 steps in a row had a non-finite .*last: step 4.*ckpt"):
        guard.record(4, skipped=1)
    capsys.readouterr()
    quiet = NonfiniteGuard(max_in_row=5, ckpt_dir=tmp_path, verbose=False)
    quiet.record(1, skipped=1)
    assert capsys.readouterr().out == ""


def test_ema_follows_its_formula_and_loads():
    model, _ = model_and_loss()
    ema = init_ema(model)
    start = {k: v.clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update_ema(ema, model, decay=0.9)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema[name], 0.9 * start[name] + 0.1 * p.detach())
        assert ema[name].data_ptr() != p.data_ptr()  # a copy, not a view of the live weights
    load_ema(model, ema)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ema[name])


# ---- ShardedAdamW + clip_grad_norm: torch's own AdamW and clip_grad_norm_ are the reference ----
def _tiny_wan():
    from models.wan import WAN_CONFIGS, WanModel
    torch.manual_seed(0)
    return WanModel(WAN_CONFIGS["tiny"])


def _tiny_batches(steps: int = 3) -> list[tuple[torch.Tensor, ...]]:
    from models.wan import WAN_CONFIGS
    cfg, g = WAN_CONFIGS["tiny"], torch.Generator().manual_seed(3)
    return [(torch.randn(2, cfg.in_channels, 2, 4, 6, generator=g), torch.rand(2, generator=g) * 1000,
             torch.randn(2, 5, cfg.text_dim, generator=g)) for _ in range(steps)]


def _train_reference(steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    """torch.optim.AdamW (single-tensor path) + torch.nn.utils.clip_grad_norm_ on an unsharded model."""
    model = _tiny_wan()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-4, weight_decay=0.1, foreach=False)
    norms = []
    for latents, t, context in _tiny_batches(steps):
        model(latents, t, context).pow(2).mean().backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
        opt.step()
        opt.zero_grad()
    return norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_sharded(rank: int, world: int, dp_replicate: int, steps: int = 3):
    from torch.distributed.tensor import DTensor

    from parallel.mesh import build_mesh
    from parallel.wan import parallelize_wan
    model = _tiny_wan()
    if world > 1:
        dims = build_mesh(world, dp_replicate, 1, "cpu")
        parallelize_wan(model, dims, param_dtype=torch.float32, reduce_dtype=torch.float32)
    opt = ShardedAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-4, weight_decay=0.1)
    norms = []
    for latents, t, context in _tiny_batches(steps):  # every rank the whole batch: the mean over ranks is the same
        loss = model(latents, t, context).pow(2).mean()
        loss.backward()
        norm, ok = apply_update(model, opt, loss.detach(), max_norm=0.05)
        assert ok
        norms.append(float(norm))
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
             for k, v in model.state_dict().items()}
    moments = {type(s["exp_avg"]).__name__ for s in opt.state.values()}
    return norms, state, moments


def test_sharded_adamw_equals_torch_adamw_single_process():
    expected_norms, expected = _train_reference()
    norms, state, moments = _train_sharded(0, 1, 1)
    assert norms == pytest.approx(expected_norms, rel=1e-5) and expected_norms[0] > 0.05  # the clip is active
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert moments == {"Tensor"}


@pytest.mark.multiproc
@pytest.mark.parametrize("dp_replicate", [1, 2])  # FSDP shard 2; HSDP replicate 2 × shard 1
def test_sharded_adamw_on_fsdp_shards_equals_torch_adamw(dp_replicate):
    from tests.multiproc import run_multiproc
    expected_norms, expected = _train_reference()
    for rank, (norms, state, moments) in enumerate(run_multiproc(_train_sharded, 2, dp_replicate)):
        assert norms == pytest.approx(expected_norms, rel=1e-5), f"rank {rank}"
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {name}: {m}")
        assert moments == {"DTensor"}  # state sharded like the parameters, so DCP saves and reshards it
