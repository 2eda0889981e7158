"""tools/sample.py end to end on a tiny diffusers pipeline folder (CPU, fp32).

The references are hand-written loops over diffusers' own `WanTransformer3DModel` loaded from the same folder, with
the text encoded by transformers directly: they share no code with the tool's DiT, attention, sampler or encoder glue.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from components.metrics import read_video_info

sys.path.insert(0, str(Path(__file__).parent))
from tiny_pipeline import TINY_TEXT_DIM, TINY_Z_DIM, build_tiny_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tools" / "sample.py"
TINY_DIT = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 32, "in_channels": TINY_Z_DIM,
    "out_channels": TINY_Z_DIM, "text_dim": TINY_TEXT_DIM, "freq_dim": 32, "ffn_dim": 128, "num_layers": 2,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}
# 5 frames of 64x128 -> latents (1, 4, 2, 8, 16) -> token grid (2, 4, 8): two 4x4x4 VSA tiles, short in time.
SIZE = ["--num-frames", "5", "--height", "64", "--width", "128"]
LATENT_SHAPE = (1, TINY_Z_DIM, 2, 8, 16)
# Teacher and TI2V runs only need a few tokens: 5 frames of 32x64 -> latents (1, 4, 2, 4, 8).
SMALL = ["--num-frames", "5", "--height", "32", "--width", "64"]
SMALL_SHAPE = (1, TINY_Z_DIM, 2, 4, 8)
CPU = ["--device", "cpu", "--dtype", "fp32"]
PROMPT = "a red car drives on the street"


def load_sample_module():
    spec = importlib.util.spec_from_file_location("sample_tool", SAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


sample = load_sample_module()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipe"), transformer_config=TINY_DIT)


@pytest.fixture(scope="module")
def ti2v_pipe(tmp_path_factory) -> Path:
    path = build_tiny_pipeline(tmp_path_factory.mktemp("ti2v"), transformer_config=TINY_DIT, seed=1)
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))  # as Wan2.2-TI2V-5B
    return path


# ---------------------------------------------------------------- independent references

def reference_context(pipe: Path, prompt: str) -> torch.Tensor:
    """UMT5 states of the real tokens, zero-padded to 512 rows (SPEC §3.3b), straight from transformers."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(pipe / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(pipe / "text_encoder").eval()
    ids = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**ids).last_hidden_state[0]  # (n, D)
    context = torch.zeros(1, 512, hidden.shape[-1])
    context[0, : hidden.shape[0]] = hidden
    return context


def diffusers_dit(pipe: Path):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(pipe / "transformer").eval()


def frame0_timesteps(t: float, shape: tuple[int, ...]) -> torch.Tensor:
    """(1, L) timesteps: 0 for the tokens of latent frame 0, t elsewhere (patch 1x2x2)."""
    _, _, nt, h, w = shape
    per_frame = (h // 2) * (w // 2)
    return torch.tensor([[0.0] * per_frame + [t] * (nt - 1) * per_frame])


@torch.no_grad()
def reference_dmd(dit, context, steps, seed, shape, image_latent=None) -> torch.Tensor:
    """x0 = x - sigma v with sigma = t / 1000; re-noise with fresh noise from the same seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    for i, t in enumerate(steps):
        timestep = torch.tensor([t])
        if image_latent is not None:
            x[:, :, :1] = image_latent
            timestep = frame0_timesteps(t, shape)
        v = dit(x, timestep, context, return_dict=False)[0]
        x0 = x - (t / 1000) * v
        if image_latent is not None:
            x0[:, :, :1] = image_latent
        if i + 1 < len(steps):
            s = steps[i + 1] / 1000
            x = (1 - s) * x0 + s * torch.randn(shape, generator=generator)
    return x0


@torch.no_grad()
def reference_teacher(dit, context, negative, num_steps, guidance, shift, seed) -> torch.Tensor:
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    scheduler.set_timesteps(num_steps)
    x = torch.randn(SMALL_SHAPE, generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        cond = dit(x, t.expand(1), context, return_dict=False)[0]
        uncond = dit(x, t.expand(1), negative, return_dict=False)[0]
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x


# ---------------------------------------------------------------- end to end

def test_cli_writes_mp4_and_matches_reference_loop(pipe, tmp_path):
    """Acceptance 1: the CLI writes a valid mp4 of the requested size; its 3-step latents equal the reference loop.
    VSA at sparsity 0 keeps every tile, so the student must equal diffusers' dense model through the tile reorder."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(SAMPLE), "--model", str(pipe), "--prompt", PROMPT, *SIZE, *CPU, "--attn", "vsa",
           "--sparsity", "0", "--seed", "7", "--out", str(out), "--save-latents"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (video,) = out.glob("*.mp4")
    assert read_video_info(video) == (5, 64, 128)
    assert "frames/s" in run.stdout and "VAE decode" in run.stdout

    latents = torch.load(video.with_suffix(".latents.pt"))
    expected = reference_dmd(diffusers_dit(pipe), reference_context(pipe, PROMPT), [1000, 757, 522], seed=7,
                             shape=LATENT_SHAPE)
    assert latents.shape == LATENT_SHAPE
    assert expected.abs().mean() > 0.1  # a live model, not a degenerate zero output
    torch.testing.assert_close(latents, expected, atol=2e-4, rtol=1e-4)


def test_denoise_sdpa_and_vsa_agree_at_sparsity_zero_and_differ_above(pipe):
    """`denoise` called directly: dense == VSA(0) on a two-tile grid; VSA(0.5) keeps one tile of two, so it differs."""
    from attention.sdpa import sdpa_attention
    from attention.vsa import vsa_attention, vsa_meta
    from models.wan_weights import load_pretrained

    context = reference_context(pipe, PROMPT)
    dense = load_pretrained(pipe, attn_fn=sdpa_attention).eval()
    sparse = load_pretrained(pipe, attn_fn=vsa_attention).eval()
    grid = dense.token_grid(LATENT_SHAPE)

    def run(model, meta):
        with torch.no_grad():
            return sample.denoise(model, context, LATENT_SHAPE, [1000, 757, 522], torch.Generator().manual_seed(3),
                                  attn_meta=meta, progress=False)

    x_dense = run(dense, None)
    torch.testing.assert_close(run(sparse, vsa_meta(grid, 0.0, "cpu")), x_dense, atol=1e-4, rtol=1e-4)
    assert (run(sparse, vsa_meta(grid, 0.5, "cpu")) - x_dense).abs().max() > 1e-2


def test_teacher_mode_matches_unipc_cfg_reference(pipe, tmp_path):
    out = tmp_path / "teacher"
    written = sample.main(["--model", str(pipe), "--prompt", PROMPT, *SMALL, *CPU, "--teacher", "--teacher-steps", "4",
                           "--guidance", "3.0", "--shift", "3.0", "--negative-prompt", "blurry static ugly",
                           "--seed", "5", "--out", str(out), "--save-latents"])
    (video,) = written
    assert video.name.endswith("_teacher.mp4") and read_video_info(video) == (5, 32, 64)
    dit = diffusers_dit(pipe)
    expected = reference_teacher(dit, reference_context(pipe, PROMPT), reference_context(pipe, "blurry static ugly"),
                                 num_steps=4, guidance=3.0, shift=3.0, seed=5)
    torch.testing.assert_close(torch.load(video.with_suffix(".latents.pt")), expected, atol=2e-4, rtol=1e-4)


def test_ti2v_image_conditioning(ti2v_pipe, tmp_path):
    """--image: latent frame 0 is the VAE-encoded image (normalised), its tokens see t = 0, and the whole sample
    equals diffusers' model run with per-token timesteps (B, L)."""
    from diffusers import AutoencoderKLWan
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(32, 64, 3), dtype=np.uint8)  # already the target size: no resize
    Image.fromarray(pixels).save(tmp_path / "first.png")
    out = tmp_path / "i2v"
    (video,) = sample.main(["--model", str(ti2v_pipe), "--prompt", PROMPT, *SMALL, *CPU, "--attn", "sdpa",
                            "--image", str(tmp_path / "first.png"), "--seed", "11", "--out", str(out),
                            "--save-latents"])
    assert read_video_info(video) == (5, 32, 64)
    latents = torch.load(video.with_suffix(".latents.pt"))

    vae = AutoencoderKLWan.from_pretrained(ti2v_pipe / "vae").eval()
    image = torch.from_numpy(pixels).float().permute(2, 0, 1)[None, :, None] / 127.5 - 1  # (1, 3, 1, H, W)
    with torch.no_grad():
        z = vae.encode(image).latent_dist.mean
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    image_latent = (z - mean) / std
    torch.testing.assert_close(latents[:, :, :1], image_latent, atol=1e-5, rtol=1e-5)

    expected = reference_dmd(diffusers_dit(ti2v_pipe), reference_context(ti2v_pipe, PROMPT), [1000, 757, 522],
                             seed=11, shape=SMALL_SHAPE, image_latent=image_latent)
    torch.testing.assert_close(latents, expected, atol=2e-4, rtol=1e-4)


def test_fp8_student_runs_on_cpu_close_to_the_reference(pipe, tmp_path, capsys):
    """--fp8 quantizes the block linears (20 in the tiny DiT: attention 4 + 4, FFN 2, per block) and stays close to
    the full-precision reference loop without equalling it (measured 0.5 % relative)."""
    (video,) = sample.main(["--model", str(pipe), "--prompt", PROMPT, *SMALL, *CPU, "--attn", "sdpa", "--fp8",
                            "--seed", "7", "--out", str(tmp_path / "fp8"), "--save-latents"])
    assert "fp8 linears (20 layers)" in capsys.readouterr().out
    latents = torch.load(video.with_suffix(".latents.pt"))
    expected = reference_dmd(diffusers_dit(pipe), reference_context(pipe, PROMPT), [1000, 757, 522], seed=7,
                             shape=SMALL_SHAPE)
    error = ((latents - expected).norm() / expected.norm()).item()
    assert 0 < error < 0.05, error


@pytest.mark.gpu
@pytest.mark.parametrize("image", [False, True])
def test_denoise_loop_has_no_host_syncs_on_gpu(image):
    """The bf16 VSA student loop (forwards, x0, re-noise, TI2V clamp) never waits for the GPU: CUDA's sync debug mode
    turns any host sync inside `denoise` into an error."""
    from attention.vsa import vsa_attention, vsa_meta
    from models.wan import WAN_CONFIGS, WanModel, config_with

    torch.manual_seed(0)
    cfg = config_with(WAN_CONFIGS["tiny"], dim=128, num_heads=2, ffn_dim=256, vsa_gate=True)  # head_dim 64: kernels
    model = WanModel(cfg, attn_fn=vsa_attention).to("cuda", torch.bfloat16).eval()
    shape = (1, cfg.in_channels, 3, 16, 16)  # token grid (3, 8, 8): four VSA tiles
    meta = vsa_meta(model.token_grid(shape), 0.5, "cuda")
    context = torch.randn(1, 512, cfg.text_dim, device="cuda")
    image_latent = torch.randn(1, cfg.in_channels, 1, 16, 16, device="cuda") if image else None

    def run() -> torch.Tensor:
        with torch.no_grad():
            return sample.denoise(model, context, shape, [1000, 757, 522], torch.Generator("cuda").manual_seed(0),
                                  attn_meta=meta, image_latent=image_latent, progress=False)

    run()  # warm-up: Triton compiles its kernels here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        latents = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert latents.shape == shape and torch.isfinite(latents).all()


# ---------------------------------------------------------------- bad input: one clear error, before any weights

@pytest.fixture
def no_weights(monkeypatch):
    """Any weight load fails the test: validation must reject bad input first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was validated")

    for name in ("load_pretrained", "load_text_encoder", "load_vae"):
        monkeypatch.setattr(sample, name, forbidden)


def error_of(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as excinfo:
        sample.main(argv)
    return str(excinfo.value.code)


def test_bad_inputs_fail_before_loading(pipe, tmp_path, no_weights, monkeypatch):
    base = ["--model", str(pipe), "--prompt", PROMPT, *SIZE, *CPU]
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "not_a_pipeline").mkdir()
    cases = {
        "does not exist": ["--model", str(tmp_path / "missing"), "--prompt", PROMPT, *CPU],
        "missing transformer/config.json": ["--model", str(tmp_path / "not_a_pipeline"), "--prompt", PROMPT, *CPU],
        "--height 72 must be a positive multiple of 16": base + ["--height", "72"],
        "--width 100 must be a positive multiple of 16": base + ["--width", "100"],
        "--num-frames 10 must be = 1 mod 4": base + ["--num-frames", "10"],
        "empty prompt": ["--model", str(pipe), "--prompt", "   ", *CPU],
        f"--prompts {str(tmp_path / 'empty.txt')!r} has no prompts": [
            "--model", str(pipe), "--prompts", str(tmp_path / "empty.txt"), *CPU],
        "--sparsity 1.0 must be in [0, 1)": base + ["--sparsity", "1.0"],
        "--image needs a TI2V model": base + ["--image", str(SAMPLE)],
        "--steps '1000,522,757' must be strictly decreasing": base + ["--steps", "1000,522,757"],
    }
    for fragment, argv in cases.items():
        message = error_of(argv)
        assert message.startswith("sample.py: error: ") and fragment in message, (fragment, message)


def test_fp8_needs_fp8_tensor_cores_and_bf16_on_gpu(pipe, no_weights, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    base = ["--model", str(pipe), "--prompt", PROMPT, *SIZE, "--device", "cuda", "--fp8"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "--fp8 needs FP8 tensor cores (compute capability 8.9+" in error_of(base)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert "--fp8 on a GPU needs --dtype bf16" in error_of(base + ["--dtype", "fp32"])


def test_unknown_hub_id_is_named(no_weights, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(repo_id, **kwargs):
        # The constructor's signature differs across huggingface_hub versions; the type is what the tool catches.
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(err, f"404 Client Error: Repository Not Found for url: .../{repo_id}")
        raise err

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    message = error_of(["--model", "nobody/no-such-model", "--prompt", PROMPT])
    assert "'nobody/no-such-model': no such hub repository" in message


def test_cli_error_is_one_line_without_traceback(tmp_path):
    run = subprocess.run([sys.executable, str(SAMPLE), "--model", str(tmp_path / "nope"), "--prompt", "x"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.strip() == f"sample.py: error: --model {str(tmp_path / 'nope')!r}: folder does not exist " \
                                 "(and it is not a hub id of the form owner/name)"


# ---------------------------------------------------------------- tools/bench_inference.py at toy size

def test_bench_inference_smoke_runs_every_case():
    """Every case and variant of the GPU benchmark (--fp8 included) runs at toy size on the CPU, and its derived numbers
    follow from its measured ones (speedup = 50 teacher CFG steps / student; frames/s = 81 / (denoise + fastest
    decode))."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_inference

    argv = ["--smoke", "--cases", "a,b,c", "--diffusers", "--fp8"]
    FP8 = "fp8 linears + fp8 attention"
    rows = {what: value for _, what, value, _ in bench_inference.main(argv)}
    for res in ("14B 81x480x832", "14B 81x720x1280"):
        student = rows[f"{res} student 3-step VSA 0.9"]
        for teacher in ("ours dense", "diffusers"):
            step = rows[f"{res} teacher CFG step (cond + uncond), {teacher}"]
            assert rows[f"{res} teacher 50-step CFG, {teacher}"] == pytest.approx(50 * step)
            assert rows[f"{res} denoising-loop speedup vs {teacher}"] == pytest.approx(50 * step / student)
        student_fp8 = rows[f"{res} student 3-step VSA 0.9, {FP8}"]
        assert rows[f"{res} student speedup, {FP8} vs bf16"] == pytest.approx(student / student_fp8)
        teacher = 50 * rows[f"{res} teacher CFG step (cond + uncond), ours dense"]
        assert rows[f"{res} denoising-loop speedup vs ours dense, {FP8} student"] == pytest.approx(teacher / student_fp8)
    decode = min(v for k, v in rows.items() if k.startswith("VAE decode") and "first call" not in k)
    denoise = rows["1.3B 81x480x832 student 3-step VSA 0.8 denoise"]
    assert rows["end to end frames/s (81 frames / end to end)"] == pytest.approx(81 / (denoise + decode))
    denoise_fp8 = rows[f"1.3B 81x480x832 student 3-step VSA 0.8 denoise, {FP8}"]
    assert rows[f"1.3B student denoise speedup, {FP8} vs bf16"] == pytest.approx(denoise / denoise_fp8)
    frames_s_fp8 = rows[f"end to end frames/s, {FP8} (81 frames / end to end)"]
    assert frames_s_fp8 == pytest.approx(81 / (denoise_fp8 + decode))
    assert {"5B 121x704x1280 student 3-step dense", "5B 121x704x1280 student 3-step VSA 0.8"} <= set(rows)

    # --skip-ours-teacher: only diffusers' teacher is timed, the speed-ups follow from it
    rows = {what: value for _, what, value, _ in bench_inference.main(
        ["--smoke", "--cases", "b", "--diffusers", "--skip-ours-teacher"])}
    assert not [what for what in rows if "ours dense" in what]
    step = rows["14B 81x480x832 teacher CFG step (cond + uncond), diffusers"]
    assert rows["14B 81x480x832 denoising-loop speedup vs diffusers"] == pytest.approx(
        50 * step / rows["14B 81x480x832 student 3-step VSA 0.9"])
