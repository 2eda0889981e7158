"""DCP checkpoints: save on 2 ranks → new processes load → the next step equals the uninterrupted run; load onto
1 rank; async save, atomic folders, keep-last pruning; the student export loads in diffusers' format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from components.optim import ShardedAdamW
from models.wan import WAN_CONFIGS, WanModel
from models.wan_weights import load_pretrained
from parallel.checkpoint import Checkpointer, ModelState, export_student
from parallel.mesh import build_mesh
from parallel.wan import parallelize_wan
from tests.multiproc import run_multiproc

GLOBAL_BATCH = 2


def _networks(world: int, init_seed: int) -> dict:
    """Student and critic (tiny WanModels, FSDP over all ranks), the recipes' ShardedAdamW + warm-up LR schedule."""
    dims = build_mesh(world, 1, 1, "cpu")
    out = {}
    for i, name in enumerate(("student", "critic")):
        torch.manual_seed(init_seed + i)
        model = WanModel(WAN_CONFIGS["tiny"])
        parallelize_wan(model, dims, param_dtype=torch.float32, reduce_dtype=torch.float32)
        opt = ShardedAdamW(model.parameters(), lr=1e-2, eps=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        out[name] = (model, opt, sched)
    # An EMA of the student as the recipes keep it: a dict of DTensor clones of the sharded parameters.
    out["ema"] = {k: p.detach().clone() for k, p in out["student"][0].named_parameters()}
    return out


def _state(nets: dict) -> dict:
    models = {name: ModelState(*nets[name]) for name in ("student", "critic")}
    return models | {"ema": nets["ema"], "data": {"epoch": 0, "cursor": 0}, "unused": {}}


def _step(nets: dict, step: int, rows: slice) -> float:
    """One update of each network; the noise comes from the global RNG (identical on every rank), so resuming
    must restore the RNG too."""
    g = torch.Generator().manual_seed(100 + step)  # the "data" of this step
    cfg = WAN_CONFIGS["tiny"]
    latents = torch.randn(GLOBAL_BATCH, cfg.in_channels, 2, 4, 4, generator=g)
    context = torch.randn(GLOBAL_BATCH, 5, cfg.text_dim, generator=g)
    t = torch.rand(GLOBAL_BATCH, generator=g) * 1000
    noise = torch.randn(latents.shape)  # global RNG
    total = 0.0
    for name in ("student", "critic"):
        model, opt, sched = nets[name]
        out = model(latents[rows], t[rows], context[rows])
        loss = ((out - noise[rows]) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        total += loss.item()
    with torch.no_grad():
        for k, p in nets["student"][0].named_parameters():
            nets["ema"][k].lerp_(p, 0.5)
    return total


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return _full_dict(model.state_dict())


def _full_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state.items()}


def _rows(rank: int, world: int) -> slice:
    per = GLOBAL_BATCH // world
    return slice(rank * per, (rank + 1) * per)


def _uninterrupted_rank(rank: int, world: int, root: str) -> dict:
    torch.manual_seed(1234)
    nets = _networks(world, init_seed=0)
    ckpt = Checkpointer(root, keep_last=1, async_save=True)
    no_checkpoint_yet = ckpt.load(_state(nets))
    for step in (1, 2):
        _step(nets, step, _rows(rank, world))
        ckpt.save(step, _state(nets))  # async: step 1 is finished (renamed, then pruned) by step 2's save
    ckpt.wait()
    export_student(nets["student"][0], Path(root).parent / "student_export")
    student_at_2 = _full(nets["student"][0])
    loss = _step(nets, 3, _rows(rank, world))
    final = {n: _full(nets[n][0]) for n in ("student", "critic")} | {"ema": _full_dict(nets["ema"])}
    lr = nets["critic"][2].get_last_lr()
    return {"no_checkpoint_yet": no_checkpoint_yet, "loss": loss, "student_at_2": student_at_2, "lr": lr, **final}


def _resumed_rank(rank: int, world: int, root: str) -> dict:
    torch.manual_seed(999)  # a different RNG and different weights: everything must come from the checkpoint
    nets = _networks(world, init_seed=50)
    state = _state(nets)
    step = Checkpointer(root).load(state)
    loss = _step(nets, step + 1, _rows(rank, world))
    return {"step": step, "loss": loss, **{n: _full(nets[n][0]) for n in ("student", "critic")},
            "ema": _full_dict(nets["ema"]),
            "lr": nets["critic"][2].get_last_lr(), "data": state["data"]}


@pytest.mark.multiproc
def test_resume_equals_uninterrupted(tmp_path):
    root = tmp_path / "ckpt"
    before = run_multiproc(_uninterrupted_rank, 2, str(root))
    assert [b["no_checkpoint_yet"] for b in before] == [None, None]
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]  # keep_last=1 pruned step 1
    # A save that crashed before its rename (even after DCP wrote .metadata) must not count as a checkpoint.
    (root / "step-000003.tmp").mkdir()
    (root / "step-000003.tmp" / ".metadata").write_bytes(b"")
    assert Checkpointer(root).latest() == (2, root / "step-000002")

    # New processes, same world size: bitwise the same next step.
    after = run_multiproc(_resumed_rank, 2, str(root))
    for b, a in zip(before, after):
        assert a["step"] == 2 and a["data"] == {"epoch": 0, "cursor": 0}
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"]
        for name in ("student", "critic", "ema"):
            for key, value in b[name].items():
                torch.testing.assert_close(a[name][key], value, rtol=0, atol=0, msg=lambda m: f"{name} {key}: {m}")

    # One process resuming a 2-rank checkpoint (DCP reshards) takes the same step on the whole global batch.
    (single,) = run_multiproc(_resumed_rank, 1, str(root))
    assert single["step"] == 2 and single["lr"] == before[0]["lr"]
    torch.testing.assert_close(single["loss"] / 2, sum(b["loss"] for b in before) / 4, rtol=1e-5, atol=0)
    for name in ("student", "critic", "ema"):
        for key, value in before[0][name].items():
            msg = lambda m: f"{name} {key}: {m}"  # noqa: E731
            torch.testing.assert_close(single[name][key], value, rtol=1e-5, atol=1e-6, msg=msg)

    # The export is a diffusers checkpoint of the student at step 2.
    exported = load_pretrained(tmp_path / "student_export")
    for key, value in exported.state_dict().items():
        torch.testing.assert_close(value, before[0]["student_at_2"][key], rtol=0, atol=0, msg=key)


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        Checkpointer(tmp_path, keep_last=0)
