"""Two-expert (Wan2.2-A14B) and image-to-video (Wan2.1-I2V, Wan2.2-I2V-A14B) sampling on tiny pipeline folders that
diffusers' own `WanPipeline` / `WanImageToVideoPipeline.save_pretrained` wrote (CPU, fp32).

The references are written out here from diffusers' transformer objects and the published formulas (expert switch at
boundary_ratio * 1000, per-expert CFG scale, the I2V mask built per pixel frame then grouped by 4, the image VAE
posterior mode, CLIP's penultimate hidden states): they call nothing of inference/ or models/. One check also runs
diffusers' pipeline end to end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inference import VideoPipeline
from inference.pipeline import InputError, inspect_pipeline
from tests.sampling_reference import (
    NEGATIVE,
    PROMPT,
    SMALL,
    SMALL_SHAPE,
    TINY_DIT,
    cli_args,
    reference_context,
)
from tests.tiny_pipeline import TINY_TEXT_DIM, TINY_Z_DIM, WORDS, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
I2V_DIT = {**TINY_DIT, "in_channels": 2 * TINY_Z_DIM + 4, "out_channels": TINY_Z_DIM}
CLIP_DIM = 16
BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B's
TEACHER = dict(teacher=True, teacher_steps=4, guidance=3.0, shift=3.0)
SEED = 5


def components(seed: int) -> dict:
    """Tokenizer, UMT5, VAE and UniPC as tests/tiny_pipeline.py builds them, as objects for a diffusers pipeline."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=len(WORDS) + 3, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=TINY_Z_DIM, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.1 * (i - TINY_Z_DIM / 2) for i in range(TINY_Z_DIM)],
                           latents_std=[0.5 + 0.25 * i for i in range(TINY_Z_DIM)])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return {"text_encoder": UMT5EncoderModel(cfg).eval(), "vae": vae.eval(), "scheduler": scheduler,
            "tokenizer_cls": AutoTokenizer}


def perturbed(config: dict, seed: int):
    """A diffusers WanTransformer3DModel with every weight moved off its init (zero-init layers would hide bugs)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    dit = WanTransformer3DModel(**config).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dit


def write_pipeline(out: Path, *, experts: int, i2v: bool, clip: bool, seed: int = 0) -> Path:
    """A diffusers pipeline object saved with `save_pretrained` (model_index.json with boundary_ratio written by
    diffusers itself)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    parts = components(seed)
    build_tokenizer(out.parent / f"{out.name}-tokenizer")
    tokenizer = parts.pop("tokenizer_cls").from_pretrained(out.parent / f"{out.name}-tokenizer")
    config = dict(I2V_DIT if i2v else TINY_DIT)
    if clip:
        config.update(image_dim=CLIP_DIM, added_kv_proj_dim=TINY_DIT["num_attention_heads"] *
                      TINY_DIT["attention_head_dim"])
    kwargs = {"tokenizer": tokenizer, **parts, "transformer": perturbed(config, seed + 1)}
    if experts == 2:
        kwargs.update(transformer_2=perturbed(config, seed + 2), boundary_ratio=BOUNDARY_RATIO)
    if clip:
        vision = CLIPVisionConfig(hidden_size=CLIP_DIM, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=32, patch_size=8)
        kwargs.update(image_encoder=CLIPVisionModel(vision).eval(),
                      image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32))
    pipeline = (WanImageToVideoPipeline if i2v else WanPipeline)(**kwargs)
    pipeline.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def t2v_a14b(tmp_path_factory) -> Path:
    return write_pipeline(tmp_path_factory.mktemp("a14b") / "pipe", experts=2, i2v=False, clip=False)


@pytest.fixture(scope="module")
def i2v_a14b(tmp_path_factory) -> Path:
    return write_pipeline(tmp_path_factory.mktemp("i2v_a14b") / "pipe", experts=2, i2v=True, clip=False, seed=3)


@pytest.fixture(scope="module")
def i2v_21(tmp_path_factory) -> Path:
    return write_pipeline(tmp_path_factory.mktemp("i2v_21") / "pipe", experts=1, i2v=True, clip=True, seed=6)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("image") / "first.png"
    pixels = np.random.default_rng(0).integers(0, 256, size=(SMALL["height"], SMALL["width"], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# ---------------------------------------------------------------- the references, written out

def load_transformers(folder: Path) -> tuple:
    from diffusers import WanTransformer3DModel

    high = WanTransformer3DModel.from_pretrained(folder / "transformer").eval()
    low = WanTransformer3DModel.from_pretrained(folder / "transformer_2").eval() if (
        folder / "transformer_2").is_dir() else None
    return high, low


@torch.no_grad()
def reference_i2v_condition(folder: Path, image: Path, num_frames: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """diffusers' recipe: pixels in [-1, 1]; VAE posterior mode of [image, zeros...], normalised; mask per pixel
    frame (1 for frame 0), frame 0 repeated 4x, viewed as (B, T_lat, 4, h, w) and transposed; CLIP hidden_states[-2]."""
    from diffusers import AutoencoderKLWan
    from PIL import Image

    vae = AutoencoderKLWan.from_pretrained(folder / "vae").eval()
    pixels = torch.from_numpy(np.asarray(Image.open(image).convert("RGB")).copy()).float() / 127.5 - 1  # (H, W, 3)
    first = pixels.permute(2, 0, 1)[None, :, None]  # (1, 3, 1, H, W)
    video = torch.cat([first, torch.zeros(1, 3, num_frames - 1, *first.shape[-2:])], dim=2)
    z = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    z = (z - mean) / std
    h, w = z.shape[-2:]
    mask = torch.ones(1, 1, num_frames, h, w)
    mask[:, :, 1:] = 0
    mask = torch.cat([mask[:, :, :1].repeat_interleave(4, dim=2), mask[:, :, 1:]], dim=2)
    mask = mask.view(1, -1, 4, h, w).transpose(1, 2)  # (1, 4, T_lat, h, w)
    tokens = None
    if (folder / "image_encoder").is_dir():
        from transformers import CLIPImageProcessor, CLIPVisionModel

        processor = CLIPImageProcessor.from_pretrained(folder / "image_processor")
        clip = CLIPVisionModel.from_pretrained(folder / "image_encoder").eval()
        inputs = processor(images=Image.open(image).convert("RGB"), return_tensors="pt")
        tokens = clip(**inputs, output_hidden_states=True).hidden_states[-2]
    return torch.cat([mask, z], dim=1), tokens


@torch.no_grad()
def reference_two_expert_teacher(high, low, boundary_ratio, context, negative, shape, *, num_steps, guidance,
                                 guidance_2, shift, seed, condition=None, image_tokens=None) -> torch.Tensor:
    """UniPC (flow) with CFG; `high` for t >= boundary_ratio * 1000 at `guidance`, `low` below at `guidance_2`; the I2V
    condition concatenated on channels before each forward."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    scheduler.set_timesteps(num_steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    used = []
    for t in scheduler.timesteps:
        is_high = low is None or t >= boundary_ratio * 1000
        dit, g = (high, guidance) if is_high else (low, guidance_2)
        used.append("high" if is_high else "low")
        inp = x if condition is None else torch.cat([x, condition], dim=1)
        cond = dit(inp, t.expand(1), context, encoder_hidden_states_image=image_tokens, return_dict=False)[0]
        uncond = dit(inp, t.expand(1), negative, encoder_hidden_states_image=image_tokens, return_dict=False)[0]
        x = scheduler.step(uncond + g * (cond - uncond), t, x).prev_sample
    return x, used


@torch.no_grad()
def reference_two_expert_student(high, low, boundary_ratio, context, steps, shape, seed, condition=None):
    """DMD: x0 = x - sigma v, re-noised with fresh noise; `high` for t >= boundary, `low` below."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    for i, t in enumerate(steps):
        dit = high if low is None or t >= boundary_ratio * 1000 else low
        inp = x if condition is None else torch.cat([x, condition], dim=1)
        x0 = x - (t / 1000) * dit(inp, torch.tensor([t]), context, return_dict=False)[0]
        if i + 1 < len(steps):
            s = steps[i + 1] / 1000
            x = (1 - s) * x0 + s * torch.randn(shape, generator=generator)
    return x0


def contexts(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return reference_context(folder, PROMPT), reference_context(folder, NEGATIVE)


# ---------------------------------------------------------------- tests

def test_two_expert_teacher_matches_the_reference_loop(t2v_a14b):
    assert json.loads((t2v_a14b / "model_index.json").read_text())["boundary_ratio"] == BOUNDARY_RATIO
    files = inspect_pipeline(t2v_a14b)
    assert files.spec.experts == 2 and files.spec.boundary == 875.0
    pipe = VideoPipeline.from_pretrained(t2v_a14b, device="cpu", dtype=torch.float32, attn="sdpa")
    assert pipe.dit_2 is not None
    context = pipe.encode_prompts([PROMPT, NEGATIVE])
    got = pipe.denoise(context[:1], negative_context=context[1:], **SMALL, **TEACHER, guidance_2=1.5, seed=SEED,
                       progress=False)
    high, low = load_transformers(t2v_a14b)
    expected, used = reference_two_expert_teacher(high, low, BOUNDARY_RATIO, *contexts(t2v_a14b), SMALL_SHAPE,
                                                  num_steps=4, guidance=3.0, guidance_2=1.5, shift=3.0, seed=SEED)
    assert used == ["high", "high", "low", "low"]  # both experts ran: the test sees the switch
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    # The switch matters: one expert for every step gives another sample.
    one, _ = reference_two_expert_teacher(high, None, BOUNDARY_RATIO, *contexts(t2v_a14b), SMALL_SHAPE, num_steps=4,
                                          guidance=3.0, guidance_2=1.5, shift=3.0, seed=SEED)
    assert (one - expected).abs().max() > 1e-2


def test_two_expert_teacher_equals_diffusers_pipeline(t2v_a14b):
    """diffusers' WanPipeline end to end (its own prompt encoding, scheduler from the folder, expert switch)."""
    from diffusers import WanPipeline

    ref = WanPipeline.from_pretrained(t2v_a14b)
    expected = ref(PROMPT, negative_prompt=NEGATIVE, **SMALL, num_inference_steps=4, guidance_scale=3.0,
                   guidance_scale_2=1.5, generator=torch.Generator().manual_seed(SEED), output_type="latent").frames
    pipe = VideoPipeline.from_pretrained(t2v_a14b, device="cpu", dtype=torch.float32, attn="sdpa")
    context = pipe.encode_prompts([PROMPT, NEGATIVE])
    got = pipe.denoise(context[:1], negative_context=context[1:], **SMALL, **TEACHER, guidance_2=1.5, seed=SEED,
                       progress=False)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_two_expert_student_switches_at_the_boundary(t2v_a14b):
    pipe = VideoPipeline.from_pretrained(t2v_a14b, device="cpu", dtype=torch.float32, attn="vsa")
    steps = [1000.0, 757.0, 522.0]
    got = pipe.denoise(pipe.encode_prompts([PROMPT]), **SMALL, steps=steps, sparsity=0.0, seed=SEED, progress=False)
    high, low = load_transformers(t2v_a14b)
    expected = reference_two_expert_student(high, low, BOUNDARY_RATIO, reference_context(t2v_a14b, PROMPT), steps,
                                            SMALL_SHAPE, SEED)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_one_transformer_student_of_a_two_expert_family(t2v_a14b, tmp_path):
    """A distilled student folder: transformer/ only (boundary_ratio may stay in model_index.json). Student mode runs
    it for every step; teacher mode needs both experts and says so before any weights load."""
    student = tmp_path / "student"
    shutil.copytree(t2v_a14b, student, ignore=shutil.ignore_patterns("transformer_2"))
    files = inspect_pipeline(student)
    assert files.spec.experts == 1 and files.spec.boundary == 875.0
    with pytest.raises(InputError, match="boundary_ratio 0.875 .* no transformer_2/"):
        files.spec.check_sampling([1000.0], 0.8, True, 4, None)
    pipe = VideoPipeline.from_pretrained(student, device="cpu", dtype=torch.float32, attn="sdpa")
    assert pipe.dit_2 is None
    steps = [1000.0, 757.0, 522.0]
    got = pipe.denoise(pipe.encode_prompts([PROMPT]), **SMALL, steps=steps, seed=SEED, progress=False)
    high, _ = load_transformers(t2v_a14b)
    expected = reference_two_expert_student(high, None, BOUNDARY_RATIO, reference_context(t2v_a14b, PROMPT), steps,
                                            SMALL_SHAPE, SEED)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    with pytest.raises(InputError, match="no transformer_2/"):
        pipe.denoise(pipe.encode_prompts([PROMPT, NEGATIVE])[:1], negative_context=torch.zeros(1, 512, 32), **SMALL,
                     **TEACHER, progress=False)


def test_i2v_a14b_teacher_matches_the_reference_loop(i2v_a14b, image_path):
    """Wan2.2-I2V-A14B layout: two experts, 36 -> here 12 input channels, no CLIP."""
    files = inspect_pipeline(i2v_a14b)
    assert files.spec.i2v and not files.spec.clip and files.spec.experts == 2
    pipe = VideoPipeline.from_pretrained(i2v_a14b, device="cpu", dtype=torch.float32, attn="sdpa")
    context = pipe.encode_prompts([PROMPT, NEGATIVE])
    got = pipe.denoise(context[:1], negative_context=context[1:], **SMALL, **TEACHER, image=image_path, seed=SEED,
                       progress=False)
    condition, tokens = reference_i2v_condition(i2v_a14b, image_path, SMALL["num_frames"])
    assert tokens is None and condition.shape == (1, 4 + TINY_Z_DIM, *SMALL_SHAPE[2:])
    high, low = load_transformers(i2v_a14b)
    expected, used = reference_two_expert_teacher(high, low, BOUNDARY_RATIO, *contexts(i2v_a14b), SMALL_SHAPE,
                                                  num_steps=4, guidance=3.0, guidance_2=3.0, shift=3.0, seed=SEED,
                                                  condition=condition)
    assert "low" in used and "high" in used
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    video = pipe(PROMPT, negative_prompt=NEGATIVE, **SMALL, **TEACHER, image=image_path, seed=SEED, progress=False)
    assert torch.equal(video, pipe.decode(got))


def test_i2v_21_with_clip_teacher_and_student_match_the_reference(i2v_21, image_path):
    """Wan2.1-I2V layout: one transformer with image cross-attention, CLIP image_encoder/ + image_processor/."""
    files = inspect_pipeline(i2v_21)
    assert files.spec.i2v and files.spec.clip and files.spec.experts == 1
    pipe = VideoPipeline.from_pretrained(i2v_21, device="cpu", dtype=torch.float32, attn="vsa")
    context = pipe.encode_prompts([PROMPT, NEGATIVE])
    got = pipe.denoise(context[:1], negative_context=context[1:], **SMALL, **TEACHER, image=image_path, seed=SEED,
                       progress=False)
    condition, tokens = reference_i2v_condition(i2v_21, image_path, SMALL["num_frames"])
    assert tokens.shape == (1, 17, CLIP_DIM)  # (32 / 8)^2 patches + CLS
    high, _ = load_transformers(i2v_21)
    expected, _ = reference_two_expert_teacher(high, None, None, *contexts(i2v_21), SMALL_SHAPE, num_steps=4,
                                               guidance=3.0, guidance_2=3.0, shift=3.0, seed=SEED,
                                               condition=condition, image_tokens=tokens)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    # The CLIP tokens reach the model: zeroing them changes the sample.
    no_clip, _ = reference_two_expert_teacher(high, None, None, *contexts(i2v_21), SMALL_SHAPE, num_steps=4,
                                              guidance=3.0, guidance_2=3.0, shift=3.0, seed=SEED,
                                              condition=condition, image_tokens=torch.zeros_like(tokens))
    assert (no_clip - expected).abs().max() > 1e-3

    steps = [1000.0, 757.0, 522.0]
    student = pipe.denoise(context[:1], **SMALL, steps=steps, sparsity=0.0, image=image_path, seed=SEED,
                           progress=False)
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(SMALL_SHAPE, generator=generator)
    with torch.no_grad():
        for i, t in enumerate(steps):
            v = high(torch.cat([x, condition], dim=1), torch.tensor([t]), reference_context(i2v_21, PROMPT),
                     encoder_hidden_states_image=tokens, return_dict=False)[0]
            x0 = x - t / 1000 * v
            if i + 1 < len(steps):
                x = (1 - steps[i + 1] / 1000) * x0 + steps[i + 1] / 1000 * torch.randn(SMALL_SHAPE, generator=generator)
    torch.testing.assert_close(student, x0, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------- bad input, before weights load

def test_i2v_without_image_is_refused(i2v_a14b):
    spec = inspect_pipeline(i2v_a14b).spec
    with pytest.raises(InputError, match="image-to-video checkpoint .* pass the first frame with --image"):
        spec.check_sampling([1000.0], 0.8, True, 4, None)


def test_image_of_another_aspect_is_refused(i2v_a14b, tmp_path):
    from PIL import Image

    spec = inspect_pipeline(i2v_a14b).spec
    size = spec.size(SMALL["height"], SMALL["width"], SMALL["num_frames"])
    square = tmp_path / "square.png"
    Image.new("RGB", (48, 48)).save(square)
    with pytest.raises(InputError, match=r"image is 48x48 .* the video is 64x32 .* crop the image"):
        spec.check_sampling([1000.0], 0.8, True, 4, square, size)
    same_aspect = tmp_path / "big.png"
    Image.new("RGB", (256, 128)).save(same_aspect)
    spec.check_sampling([1000.0], 0.8, True, 4, same_aspect, size)  # resized, no error


def test_folder_inconsistencies_are_refused(t2v_a14b, tmp_path):
    no_boundary = tmp_path / "no_boundary"
    shutil.copytree(t2v_a14b, no_boundary)
    index = json.loads((no_boundary / "model_index.json").read_text())
    (no_boundary / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": None}))
    with pytest.raises(InputError, match="has transformer_2/ but model_index.json sets no boundary_ratio"):
        inspect_pipeline(no_boundary)
    config = json.loads((t2v_a14b / "transformer_2" / "config.json").read_text())
    (no_boundary / "transformer_2" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    (no_boundary / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"configs differ in \['num_layers'\]"):
        inspect_pipeline(no_boundary)


def sample(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "sample.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_sample_cli_i2v_errors_and_run(i2v_a14b, t2v_a14b, image_path, tmp_path):
    """tools/sample.py: the errors above come out as one line before any weights load; a real I2V run writes the
    video whose latents equal the Python API's."""
    from PIL import Image

    base = ["--prompt", PROMPT, *cli_args(SMALL), "--device", "cpu", "--dtype", "fp32", "--out", str(tmp_path)]
    run = sample("--model", str(i2v_a14b), *base, "--teacher")
    assert run.returncode != 0 and "pass the first frame with --image" in run.stderr, run.stderr
    square = tmp_path / "square.png"
    Image.new("RGB", (48, 48)).save(square)
    run = sample("--model", str(i2v_a14b), *base, "--teacher", "--image", str(square))
    assert run.returncode != 0 and "image is 48x48" in run.stderr, run.stderr
    student = tmp_path / "student"
    shutil.copytree(t2v_a14b, student, ignore=shutil.ignore_patterns("transformer_2"))
    run = sample("--model", str(student), *base, "--teacher")
    assert run.returncode != 0 and "no transformer_2/" in run.stderr, run.stderr
    run = sample("--model", str(student), *base, "--guidance-2", "2")
    assert run.returncode != 0 and "--guidance-2 is the low-noise expert's" in run.stderr, run.stderr
    run = sample("--model", str(i2v_a14b), *base, "--teacher", "--teacher-steps", "4", "--guidance", "3",
                 "--shift", "3", "--image", str(image_path), "--seed", str(SEED), "--save-latents")
    assert run.returncode == 0, run.stderr
    assert "two experts (switch at t = 875)" in run.stdout
    latents = torch.load(next(tmp_path.glob("*_teacher.latents.pt")))
    pipe = VideoPipeline.from_pretrained(i2v_a14b, device="cpu", dtype=torch.float32, attn="sdpa")
    context = pipe.encode_prompts([PROMPT, pipe_negative()])
    expected = pipe.denoise(context[:1], negative_context=context[1:], **SMALL, **TEACHER, image=image_path,
                            seed=SEED, progress=False)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)


def pipe_negative() -> str:
    from inference.pipeline import NEGATIVE_PROMPT

    return NEGATIVE_PROMPT


def test_resolve_expert_dirs_for_two_expert_recipes(t2v_a14b, tmp_path):
    """What a two-expert recipe calls on its teacher path: both experts and the boundary, or one clear error."""
    from models.wan_weights import resolve_expert_dirs

    high, low, boundary = resolve_expert_dirs(t2v_a14b)
    assert (high, low, boundary) == (t2v_a14b / "transformer", t2v_a14b / "transformer_2", 875.0)
    one = tmp_path / "one"
    shutil.copytree(t2v_a14b, one, ignore=shutil.ignore_patterns("transformer_2"))
    with pytest.raises(FileNotFoundError, match="not a two-expert Wan2.2-A14B pipeline: it lacks transformer_2/"):
        resolve_expert_dirs(one)
    with pytest.raises(FileNotFoundError, match="this is a transformer folder"):
        resolve_expert_dirs(t2v_a14b / "transformer")
