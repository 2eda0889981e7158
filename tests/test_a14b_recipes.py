"""The Wan2.2-A14B T2V Sparse-distill recipe on CPU: tiny random experts (tests/assets/tiny.toml), world of 1.

A tiny two-expert pipeline folder (diffusers layout: tokenizer, UMT5, VAE, scheduler, transformer/ and transformer_2/
with different random weights, model_index.json boundary_ratio 0.875) is the base. Checks: full and LoRA (rank 4)
runs train, a run killed after its step-2 checkpoint and relaunched logs the same step-3/4 losses as an uninterrupted
run, the export is one transformer that VideoPipeline loads in student mode (and the LoRA adapter on the two-expert
folder finds its expert by digest); the teachers the recipe builds are the folder's experts; `real_score` scores each
row with the expert of its timestep, compared with each expert called directly; a one-expert folder, a boundary that
disagrees with the folder and LoRA with two different init experts fail before any model is built; the GPU check
script's a14b_lora part runs in its --smoke form.
The I2V recipe (tiny I2V folders: 12 = 2·4 + 4 input channels): Wan2.2-I2V-A14B (two experts, full and LoRA) and
Wan2.1-I2V-14B (one expert with CLIP tokens, through its overlay TOML) train, resume to the same losses and export;
every network call sees [x, mask, image latent] (+ CLIP); `real_score` against each expert called directly; the
one-expert / two-expert / T2V-model mix-ups fail before any model is built.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.config import ConfigError, load_config
from models.wan import WAN_CONFIGS
from models.wan_weights import export_random_init, load_pretrained
from tests.recipe_shims import load_recipe as load_path
from tests.test_recipes import kill_and_relaunch, logged, losses
from tests.tiny_pipeline import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "assets" / "tiny.toml"
NAME = "wan22_a14b_t2v_sparse_distill"


def load_recipe():
    return load_path(ROOT / "recipes" / f"{NAME}.py")


@pytest.fixture(scope="module")
def two_experts(tmp_path_factory) -> Path:
    """A tiny Wan2.2-A14B-layout pipeline folder: the experts differ (seeds 1 and 2)."""
    root = build_tiny_pipeline(tmp_path_factory.mktemp("a14b") / "pipe")
    export_random_init(WAN_CONFIGS["tiny"], root / "transformer", seed=1)
    export_random_init(WAN_CONFIGS["tiny"], root / "transformer_2", seed=2)
    index = json.loads((root / "model_index.json").read_text())
    wan = ["diffusers", "WanTransformer3DModel"]
    (root / "model_index.json").write_text(json.dumps({**index, "transformer": wan, "transformer_2": wan,
                                                       "boundary_ratio": 0.875}))
    return root


def argv(data: Path, base: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["--toml", str(TINY), "model.preset=none", f"model.base={base}", f"data.path={data / 'latents'}",
            f"data.negative_prompt={data / 'negative_prompt.safetensors'}", f"data.val_prompts={data / 'prompts'}",
            f"run.out_dir={out}", f"run.name={name}", *extra]


def run(module, args: list[str]) -> Path:
    return module.main(load_config(module.RecipeConfig, args, default_toml=ROOT / "recipes" / f"{NAME}.toml"))


def cfg_x0(model, x, t, context, negative, w):
    """One expert's DMD2-form CFG x0 of a batch, computed here from the model alone."""
    from losses.flow import x0_from_velocity

    cond = x0_from_velocity(x, model(x, t, context), t)
    uncond = x0_from_velocity(x, model(x, t, negative.expand_as(context)), t)
    return cond + w * (cond - uncond)


def test_real_score_uses_the_expert_of_each_timestep(two_experts):
    module = load_recipe()
    high, low = load_pretrained(two_experts / "transformer"), load_pretrained(two_experts / "transformer_2")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((4, 4, 5, 8, 16), generator=gen)
    t = torch.tensor([950.0, 300.0, 875.0, 874.0])  # boundary 875: high, low, high (>=), low
    context, negative = torch.randn((4, 7, 32), generator=gen), torch.randn((1, 7, 32), generator=gen)
    w = {"high": 3.0, "low": 2.0}
    with torch.no_grad():
        real = module.real_score({"high": high, "low": low}, 875.0, w, x, t, context, negative)
        for i, expert in enumerate(["high", "low", "high", "low"]):
            rows = slice(i, i + 1)
            net, other = (high, low) if expert == "high" else (low, high)
            expected = cfg_x0(net, x[rows], t[rows], context[rows], negative, w[expert])
            torch.testing.assert_close(real[rows], expected, rtol=1e-5, atol=1e-5)
            wrong = cfg_x0(other, x[rows], t[rows], context[rows], negative, w[expert])
            assert (real[rows] - wrong).abs().max() > 1e-2  # the experts differ: the check above can tell them apart
        # A batch with no low-noise row runs the low expert not at all.
        calls = []
        spy = lambda *a: calls.append(1) or low(*a)  # noqa: E731
        module.real_score({"high": high, "low": spy}, 875.0, w, x[:1], t[:1], context[:1], negative)
        assert calls == []


@pytest.mark.parametrize("lora", [0, 4])
def test_train_resume_export(lora, tiny_data, two_experts, tmp_path, monkeypatch):
    from diffusers import WanTransformer3DModel

    from inference.pipeline import VideoPipeline

    module = load_recipe()
    monkeypatch.setattr(module, "save_samples", lambda *args: None)  # decoding costs most of a tiny run's time
    extra = ("run.max_steps=4", "run.val_every=4", f"lora.rank={lora}", "health.action=off")
    # The teachers the recipe built are the folder's experts, checked at its first real-score call.
    real_score, seen = module.real_score, []

    def checked_real_score(teachers, boundary, *args):
        if not seen:
            probe = torch.randn((1, 4, 5, 8, 16), generator=torch.Generator().manual_seed(1))
            t, ctx = torch.tensor([500.0]), torch.randn((1, 5, 32), generator=torch.Generator().manual_seed(2))
            for expert, sub in (("high", "transformer"), ("low", "transformer_2")):
                direct = load_pretrained(two_experts / sub)(probe, t, ctx)
                torch.testing.assert_close(teachers[expert](probe, t, ctx), direct, rtol=1e-5, atol=1e-5)
            seen.append(boundary)
        return real_score(teachers, boundary, *args)

    monkeypatch.setattr(module, "real_score", checked_real_score)
    full = run(module, argv(tiny_data, two_experts, tmp_path, "full", *extra))
    assert seen == [875.0]
    monkeypatch.setattr(module, "real_score", real_score)
    rows = logged(full)
    assert "loss/dmd" in rows[2] and "loss/dmd" in rows[4]
    assert all(torch.isfinite(torch.tensor(list(losses(r).values()))).all() for r in rows.values())

    # Killed during step 3 (after the step-2 checkpoint), relaunched: steps 3-4 equal the uninterrupted run.
    args = argv(tiny_data, two_experts, tmp_path, "killed", *extra)
    resumed_dir = kill_and_relaunch(monkeypatch, module, lambda: run(module, args))
    lines = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines if "loss/critic" in row] == [1, 2, 3, 4]
    resumed = logged(resumed_dir)
    for step in (1, 2, 3, 4):
        assert losses(resumed[step]) == pytest.approx(losses(rows[step]), rel=1e-6, abs=1e-9), step

    # Export: one transformer, the base's other parts linked; a student-mode pipeline of the A14B family.
    export = full / "export"
    assert not (export / "transformer_2").exists()
    assert WanTransformer3DModel.from_pretrained(export / "transformer").config.num_layers == 2
    pipe = VideoPipeline.from_pretrained(export, device="cpu", dtype=torch.float32, text_encoder=False)
    assert pipe.dit_2 is None and pipe.spec.boundary == 875.0
    exported = load_pretrained(export / "transformer").state_dict()
    assert all(torch.equal(v.float(), exported[k].float()) for k, v in pipe.dit.state_dict().items() if k in exported)
    if lora:  # the adapter on the two-expert folder: merged into the student_init expert's folder, found by digest
        adapted = VideoPipeline.from_pretrained(two_experts, device="cpu", dtype=torch.float32, text_encoder=False,
                                                lora=full / "export_lora")
        assert adapted.dit_2 is None
        merged = adapted.dit.state_dict()
        for key, value in exported.items():
            if key in merged:
                torch.testing.assert_close(merged[key].float(), value.float(), rtol=1e-5, atol=1e-5)


def one_expert_folder(root: Path) -> Path:
    build_tiny_pipeline(root)
    export_random_init(WAN_CONFIGS["tiny"], root / "transformer", seed=1)
    return root


@pytest.mark.parametrize("case, message", [
    ("one_expert", "a one-expert folder given to a two-expert recipe"),
    ("boundary", r"model\.boundary_ratio=0\.9 but .* sets boundary_ratio 0\.875"),
    ("lora_inits", r"model\.critic_init='high' != model\.student_init='low'"),
])
def test_errors_before_any_model(case, message, tiny_data, two_experts, tmp_path, monkeypatch):
    module = load_recipe()
    for builder in ("build_expert_roles", "export_random_experts"):
        monkeypatch.setattr(module, builder, lambda *a, **k: pytest.fail("a model was built"))
    base, extra = two_experts, []
    if case == "one_expert":
        base = one_expert_folder(tmp_path / "one")
    elif case == "boundary":
        extra = ["model.boundary_ratio=0.9"]
    else:
        extra = ["lora.rank=4", "model.critic_init=high"]
    with pytest.raises(ConfigError, match=message):
        run(module, argv(tiny_data, base, tmp_path, "bad", *extra))


def test_gpu_check_smoke(tmp_path):
    """scripts/check_lora_gpu.py's a14b_lora part (the lead's one-H200 check) runs tiny on the CPU and ends without
    an export; its plan for the real size fits one H200."""
    import subprocess
    import sys

    from tests.recipe_shims import load_recipe as load_script

    cmd = [sys.executable, str(ROOT / "scripts" / "check_lora_gpu.py"), "--smoke", "--part", "a14b_lora",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1].split()[:2] == ["a14b_lora", "3"]
    run_dir = tmp_path / NAME / "a14b_lora"
    assert (run_dir / "metrics.jsonl").is_file() and not (run_dir / "export").exists()
    script = load_script(ROOT / "scripts" / "check_lora_gpu.py")
    assert 60 < script.planned_gib("wan22_t2v_a14b", 32, False, (81, 480, 832)) < 139


# ---- the I2V recipe (Wan2.2-I2V-A14B; Wan2.1-I2V-14B through its overlay TOML) ----
I2V = "wan22_a14b_i2v_sparse_distill"
WAN21_OVERLAY = ROOT / "recipes" / f"{I2V}.wan21_i2v_14b.toml"


def tiny_i2v(clip: bool):
    from dataclasses import replace

    return replace(WAN_CONFIGS["tiny"], in_channels=2 * 4 + 4, image_dim=16 if clip else None)


def i2v_folder(root: Path, experts: int, clip: bool) -> Path:
    """A tiny I2V pipeline folder: 12 = 2·4 + 4 input channels; two experts (boundary 0.9) or one with CLIP."""
    build_tiny_pipeline(root)
    wan = ["diffusers", "WanTransformer3DModel"]
    index = {**json.loads((root / "model_index.json").read_text()), "transformer": wan}
    for i, sub in enumerate(("transformer", "transformer_2")[:experts]):
        export_random_init(tiny_i2v(clip), root / sub, seed=1 + i)
    if experts == 2:
        index.update(transformer_2=wan, boundary_ratio=0.9)
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def i2v_data(tmp_path_factory) -> Path:
    """tools/make_tiny_data.py --i2v --clip 5,16: I2V rows with CLIP tokens (the A14B models ignore them)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("tiny_i2v")
    tool = ROOT / "tools" / "make_tiny_data.py"
    subprocess.run([sys.executable, str(tool), "--out", str(out), "--i2v", "--clip", "5,16"], check=True, timeout=300)
    return out


def i2v_argv(data: Path, base: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["--toml", str(TINY), "model.preset=none", f"model.base={base}", f"data.path={data / 'latents'}",
            f"data.negative_prompt={data / 'negative_prompt.safetensors'}", f"data.val_data={data / 'latents'}",
            f"run.out_dir={out}", f"run.name={name}", *extra]


def run_i2v(module, args: list[str]) -> Path:
    return module.main(load_config(module.RecipeConfig, args, default_toml=ROOT / "recipes" / f"{I2V}.toml"))


def test_i2v_real_score_sees_the_condition_and_the_expert(tmp_path):
    from inference.pipeline import i2v_mask
    from losses.flow import x0_from_velocity

    module = load_path(ROOT / "recipes" / f"{I2V}.py")
    root = i2v_folder(tmp_path / "pipe", 2, clip=False)
    high, low = load_pretrained(root / "transformer"), load_pretrained(root / "transformer_2")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 5, 8, 16), generator=gen)
    condition = torch.cat([i2v_mask((2, 4, 5, 8, 16), "cpu"), torch.randn((2, 4, 5, 8, 16), generator=gen)], dim=1)
    batch = {"context": torch.randn((2, 7, 32), generator=gen), "condition": condition, "image_context": None}
    negative = torch.randn((1, 7, 32), generator=gen)
    t = torch.tensor([950.0, 300.0])  # boundary 900
    with torch.no_grad():
        real = module.real_score({"high": high, "low": low}, 900.0, {"high": 2.5, "low": 1.5}, x, t, batch, negative)
        for i, (net, w) in enumerate([(high, 2.5), (low, 1.5)]):
            inp = torch.cat([x[i : i + 1], condition[i : i + 1]], dim=1)  # (1, 12, T, H, W): [x, mask, image latent]
            cond = x0_from_velocity(x[i : i + 1], net(inp, t[i : i + 1], batch["context"][i : i + 1]), t[i : i + 1])
            uncond = x0_from_velocity(x[i : i + 1], net(inp, t[i : i + 1], negative), t[i : i + 1])
            torch.testing.assert_close(real[i : i + 1], cond + w * (cond - uncond), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["a14b", "a14b_lora", "wan21_clip", "wan21_clip_lora"])
def test_i2v_train_resume_export(variant, i2v_data, tmp_path, monkeypatch):
    from diffusers import WanTransformer3DModel

    module = load_path(ROOT / "recipes" / f"{I2V}.py")
    monkeypatch.setattr(module, "save_samples", lambda *args: None)
    experts, clip = (1, True) if variant.startswith("wan21_clip") else (2, False)
    base = i2v_folder(tmp_path / "pipe", experts, clip)
    extra = ["run.max_steps=4", "run.val_every=4", "health.teacher_steps=2"]
    extra += ["lora.rank=4"] if variant.endswith("_lora") else []
    overlay = ["--toml", str(WAN21_OVERLAY)] if variant.startswith("wan21_clip") else []
    # Every call of every network sees the I2V input (and, for Wan2.1-I2V, CLIP tokens of width 16).
    forward, shapes = module.forward, set()

    def recording_forward(net, x, t, batch, meta=None):
        shapes.add((x.shape[1] + batch["condition"].shape[1],
                    None if batch["image_context"] is None else batch["image_context"].shape[-1]))
        return forward(net, x, t, batch, meta)

    monkeypatch.setattr(module, "forward", recording_forward)
    full = run_i2v(module, [*overlay, *i2v_argv(i2v_data, base, tmp_path, "full", *extra)])
    assert shapes == {(12, 16 if clip else None)}
    rows = logged(full)
    assert "loss/dmd" in rows[2] and "loss/dmd" in rows[4]
    assert all(torch.isfinite(torch.tensor(list(losses(r).values()))).all() for r in rows.values())

    args = [*overlay, *i2v_argv(i2v_data, base, tmp_path, "killed", *extra)]
    resumed = logged(kill_and_relaunch(monkeypatch, module, lambda: run_i2v(module, args)))
    for step in (1, 2, 3, 4):
        assert losses(resumed[step]) == pytest.approx(losses(rows[step]), rel=1e-6, abs=1e-9), step
    exported = WanTransformer3DModel.from_pretrained(full / "export" / "transformer")
    assert exported.config.in_channels == 12 and exported.config.image_dim == (16 if clip else None)
    assert not (full / "export" / "transformer_2").exists()
    assert (full / "export_lora").is_dir() == variant.endswith("_lora")


@pytest.mark.parametrize("case, message", [
    ("one_expert", r"a one-expert folder given to a two-expert recipe \(Wan2\.1-I2V-14B: --toml \S+/recipes/"
                   r"wan22_a14b_i2v_sparse_distill\.wan21_i2v_14b\.toml\)"),
    ("two_as_one", r"has transformer_2/ .* but model\.experts=1"),
    ("t2v_model", r"in_channels=4 is not 2 · out_channels \+ 4 = 12"),
])
def test_i2v_errors_before_any_model(case, message, i2v_data, two_experts, tmp_path, monkeypatch):
    module = load_path(ROOT / "recipes" / f"{I2V}.py")
    for builder in ("build_expert_roles", "export_random_experts"):
        monkeypatch.setattr(module, builder, lambda *a, **k: pytest.fail("a model was built"))
    overlay, extra = [], []
    if case == "one_expert":
        base = i2v_folder(tmp_path / "one", 1, clip=True)
    elif case == "two_as_one":
        base, overlay = i2v_folder(tmp_path / "two", 2, clip=False), ["--toml", str(WAN21_OVERLAY)]
    else:
        base, extra = two_experts, ["model.boundary_ratio=0.875"]
    with pytest.raises(ConfigError, match=message):
        run_i2v(module, [*overlay, *i2v_argv(i2v_data, base, tmp_path, "bad", *extra)])


@pytest.mark.multiproc
def test_two_ranks_with_different_experts_do_not_hang(tiny_data, tmp_path):
    """torchrun, 2 CPU ranks (FSDP over both), a student step every step: with run.seed 1000 the ranks' score
    timesteps at step 2 are 667 and 921 (boundary 875), so each rank needs one expert the other does not and runs it
    on a dummy row (real_score's all-reduce); the run finishes, full fine-tune and LoRA alike."""
    import os
    import subprocess
    import sys

    from parallel.mesh import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    for lora in (0, 4):
        args = ["--toml", str(TINY), f"model.base={tiny_data / 'pipeline'}", f"data.path={tiny_data / 'latents'}",
                f"data.negative_prompt={tiny_data / 'negative_prompt.safetensors'}",
                f"data.val_prompts={tiny_data / 'prompts'}", f"run.out_dir={tmp_path}", f"run.name=lora{lora}",
                "run.seed=1000", "dmd.student_every=1", "run.max_steps=3", "run.val_every=100", "health.action=off",
                f"lora.rank={lora}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(ROOT / "recipes" / f"{NAME}.py"), *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "loss/dmd" in logged(tmp_path / NAME / f"lora{lora}")[3]
