r"""Sample videos from a Wan checkpoint: few-step DMD with VSA (the distilled student), or the many-step CFG teacher.

    # FastWan 1.3B, 3 steps, VSA at 80% sparsity, 81x480x832 -> outputs/samples/00_a_cat_....mp4
    python tools/sample.py --model FastVideo/FastWan2.1-T2V-1.3B-Diffusers --prompt "a cat walks on the grass" --compile
    # the same prompt through the dense 50-step CFG teacher, for a side-by-side comparison
    python tools/sample.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt "a cat walks on the grass" --teacher \
        --guidance 3 --shift 3
    # Wan2.2 TI2V-5B: text-to-video, or image-to-video with --image (dense attention by default for the 5B)
    python tools/sample.py --model FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers --prompts prompts.txt \
        --image cat.png
    # FP8 (e4m3) linear layers in the DiT blocks and, on Hopper, FP8 sparse attention: faster, slightly different
    # numerics
    python tools/sample.py --model FastVideo/FastWan2.1-T2V-1.3B-Diffusers --prompt "a cat walks on the grass" --fp8 \
        --compile
    # tiny CPU run (tests/test_sample.py)
    python tools/sample.py --model PIPE_DIR --prompt "a red car" --num-frames 9 --height 32 --width 32 \
        --device cpu --dtype fp32

--model is a diffusers pipeline folder (transformer/, vae/, text_encoder/, tokenizer/) or a hub id; hub ids download
only those subfolders (configs first, so bad input fails before any weights move). Student sampling (SPEC §5.2): one
conditional bf16 forward per step, no CFG; x0 = x - sigma v; re-noise x0 to the next step with fresh seeded noise.
Teacher sampling (SPEC §3.5): diffusers' UniPC in flow mode, `uncond + g (cond - uncond)`, dense attention.
TI2V image conditioning (SPEC §3.6): latent frame 0 is the encoded image, its tokens get t = 0, re-clamped every step.
Prints a timing table at the end (CUDA events on GPU; the denoise loop has no host syncs).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from attention.sdpa import sdpa_attention
from attention.vsa import vsa_attention, vsa_fp8_attention, vsa_meta
from components.metrics import write_video
from data.encode import encode_prompts, latent_stats, load_text_encoder, load_vae, normalize_latents, vae_decode, \
    vae_encode
from losses.flow import add_noise, x0_from_velocity
from models.fp8 import fp8_device_problem, quantize_linears_fp8
from models.fused_rows import enable_fused_rows
from models.wan import WanModel
from models.wan_weights import load_pretrained
from parallel.compile import apply_compile

# Defaults per VAE latent width (z_dim 16: Wan2.1; 48: Wan2.2 TI2V-5B, whose FastWan release is full attention).
DEFAULTS: dict[int, dict[str, Any]] = {
    16: {"height": 480, "width": 832, "num_frames": 81, "fps": 16, "vae_ratio": 8, "attn": "vsa"},
    48: {"height": 704, "width": 1280, "num_frames": 121, "fps": 24, "vae_ratio": 16, "attn": "sdpa"},
}
# Wan's English default negative prompt (the unconditional branch of teacher CFG).
NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards"
)
ATTN = {"sdpa": sdpa_attention, "vsa": vsa_attention, "vsa_fp8": vsa_fp8_attention}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Fetched first to validate the request (configs and tokenizer, no weights), then the rest.
HUB_CONFIGS = ["model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
               "tokenizer/*"]
HUB_FILES = ["model_index.json", "transformer/*", "vae/*", "text_encoder/*", "tokenizer/*"]
VAE_TEMPORAL_RATIO = 4


class InputError(ValueError):
    """Bad command-line input, reported before any weights load."""


@dataclass(frozen=True)
class Plan:
    """Everything `validate` resolved from the arguments and the model's config files."""

    model_dir: Path | None  # None until a hub id has been downloaded in full
    hub_id: str | None
    prompts: list[str]
    steps: list[float]
    height: int
    width: int
    num_frames: int
    fps: int
    attn: str
    latent_shape: tuple[int, int, int, int, int]  # (1, C, T, H, W)
    ti2v: bool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers Wan pipeline folder or hub id (owner/name)")
    p.add_argument("--prompt", help="one prompt")
    p.add_argument("--prompts", metavar="FILE", help="prompts, one per line (blank lines skipped)")
    p.add_argument("--negative-prompt", default=NEGATIVE_PROMPT, help="teacher CFG's unconditional prompt")
    p.add_argument("--height", type=int, help="pixels; multiple of VAE ratio x patch (16 Wan2.1, 32 TI2V-5B)")
    p.add_argument("--width", type=int, help="pixels; multiple of VAE ratio x patch (16 Wan2.1, 32 TI2V-5B)")
    p.add_argument("--num-frames", type=int, help="video frames, = 1 mod 4 (81, 121)")
    p.add_argument("--fps", type=int, help="mp4 frame rate (default: 16 Wan2.1, 24 TI2V-5B)")
    p.add_argument("--seed", type=int, default=1024, help="noise seed (the same for every prompt)")
    p.add_argument("--steps", default="1000,757,522", help="student DMD timesteps, decreasing, in (0, 1000]")
    p.add_argument("--attn", choices=sorted(ATTN), help="student attention (default: vsa; sdpa for TI2V-5B)")
    p.add_argument("--sparsity", type=float, default=0.8, help="VSA sparsity in [0, 1) (0.9 for the 14B)")
    p.add_argument("--teacher", action="store_true", help="many-step CFG flow sampling with dense attention instead")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0, help="teacher CFG scale")
    p.add_argument("--shift", type=float, default=5.0, help="teacher flow shift")
    p.add_argument("--image", metavar="PATH", help="TI2V-5B image-to-video: the first frame")
    p.add_argument("--out", default="outputs/samples", help="output folder")
    p.add_argument("--save-latents", action="store_true", help="also write the final normalised latents (.pt)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="DiT and VAE-decode precision")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    p.add_argument("--fp8", action="store_true", help="FP8 (e4m3, row-wise scaled) linear layers in the DiT blocks "
                   "(models/fp8.py; GPU with FP8 tensor cores, sm89+) and, on sm90+, the student's VSA on e4m3 q, k, v "
                   "(vsa_fp8_attention); changes numerics slightly")
    p.add_argument("--vae-compile", action="store_true", help="torch.compile the VAE decoder")
    p.add_argument("--vae-channels-last", action="store_true", help="channels-last conv weights for the VAE decode")
    return p.parse_args(argv)


# ---------------------------------------------------------------- validation (config files only, no weights)

def validate(args: argparse.Namespace) -> Plan:
    """Check every input against the model's config files; raise InputError naming the first bad one."""
    prompts = read_prompts(args.prompt, args.prompts)
    steps = parse_steps(args.steps)
    if not 0.0 <= args.sparsity < 1.0:
        raise InputError(f"--sparsity {args.sparsity} must be in [0, 1) (fraction of key tiles skipped)")
    if args.teacher and args.teacher_steps < 1:
        raise InputError(f"--teacher-steps {args.teacher_steps} must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: no CUDA GPU is visible; use --device cpu")
    if args.fp8 and args.device.startswith("cuda"):  # CPU runs it too (slowly): the tests use that
        problem = fp8_device_problem(args.device)
        if problem:
            raise InputError(problem)
        if args.dtype != "bf16":
            # Row-wise _scaled_mm writes fp32 only on sm90 with cuBLAS 12.9+; bf16 is what FP8 is for anyway.
            raise InputError(f"--fp8 on a GPU needs --dtype bf16 (got --dtype {args.dtype})")
    if args.image is not None and not Path(args.image).is_file():
        raise InputError(f"--image {args.image!r} is not a file")

    model_dir, hub_id = locate_model(args.model)
    configs = read_configs(model_dir if model_dir is not None else fetch(hub_id, HUB_CONFIGS), args.model)
    dit, vae, text, index = configs["transformer"], configs["vae"], configs["text_encoder"], configs["model_index"]
    z_dim = int(vae.get("z_dim", 16))
    defaults = DEFAULTS.get(z_dim, {})
    if dit.get("in_channels") != z_dim:
        raise InputError(f"{args.model}: transformer in_channels={dit.get('in_channels')} != vae z_dim={z_dim}")
    if dit.get("text_dim", 4096) != text.get("d_model"):
        raise InputError(f"{args.model}: transformer text_dim={dit.get('text_dim')} != text encoder "
                         f"d_model={text.get('d_model')}")
    ti2v = bool(index.get("expand_timesteps", z_dim == 48))
    if args.image is not None and not ti2v:
        raise InputError(f"--image needs a TI2V model (Wan2.2 TI2V-5B: VAE z_dim 48 / expand_timesteps); {args.model} "
                         f"is text-to-video only (VAE z_dim {z_dim})")

    sizes = {}
    for name in ("height", "width", "num_frames"):
        sizes[name] = getattr(args, name) if getattr(args, name) is not None else defaults.get(name)
        if sizes[name] is None:
            raise InputError(f"no default --{name.replace('_', '-')} for a VAE with z_dim {z_dim}; pass it")
    vae_ratio = int(vae.get("scale_factor_spatial") or defaults.get("vae_ratio") or 0)
    if vae_ratio <= 0:
        raise InputError(f"{args.model}: vae config has no scale_factor_spatial and z_dim {z_dim} is unknown")
    _, patch_h, patch_w = dit.get("patch_size", (1, 2, 2))
    for name, patch in (("height", patch_h), ("width", patch_w)):
        multiple = vae_ratio * patch
        if sizes[name] <= 0 or sizes[name] % multiple:
            raise InputError(f"--{name} {sizes[name]} must be a positive multiple of {multiple} for this model "
                             f"(VAE spatial ratio {vae_ratio} x patch {patch})")
    frames = sizes["num_frames"]
    if frames < 1 or (frames - 1) % VAE_TEMPORAL_RATIO:
        raise InputError(f"--num-frames {frames} must be = 1 mod {VAE_TEMPORAL_RATIO} (e.g. 81 or 121): the Wan VAE "
                         "keeps the first frame and compresses the rest 4x in time")

    latent_shape = (1, z_dim, (frames - 1) // VAE_TEMPORAL_RATIO + 1, sizes["height"] // vae_ratio,
                    sizes["width"] // vae_ratio)
    return Plan(model_dir=model_dir, hub_id=hub_id, prompts=prompts, steps=steps, height=sizes["height"],
                width=sizes["width"], num_frames=frames, fps=args.fps or defaults.get("fps", 16),
                attn=args.attn or defaults.get("attn", "vsa"), latent_shape=latent_shape, ti2v=ti2v)


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    if prompt is not None and prompts_file is not None:
        raise InputError("give --prompt or --prompts FILE, not both")
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise InputError(f"--prompts {prompts_file!r} is not a file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise InputError(f"--prompts {prompts_file!r} has no prompts (one per line expected)")
        return prompts
    if prompt is None or not prompt.strip():
        raise InputError("empty prompt: pass --prompt TEXT or --prompts FILE")
    return [prompt.strip()]


def parse_steps(text: str) -> list[float]:
    try:
        steps = [float(s) for s in text.split(",")]
    except ValueError:
        raise InputError(f"--steps {text!r} must be comma-separated numbers, e.g. 1000,757,522") from None
    if not all(0 < s <= 1000 for s in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
        raise InputError(f"--steps {text!r} must be strictly decreasing timesteps in (0, 1000]")
    return steps


def locate_model(model: str) -> tuple[Path | None, str | None]:
    """(local folder, None) or (None, hub id); a path that exists wins over a hub id of the same spelling."""
    path = Path(model)
    if path.exists():
        return path, None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith("."):
        return None, model
    raise InputError(f"--model {model!r}: folder does not exist (and it is not a hub id of the form owner/name)")


def fetch(hub_id: str, patterns: list[str]) -> Path:
    """Download (or reuse from the HF cache) the files matching `patterns` of a hub repo, with progress bars."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise InputError(f"--model {hub_id!r}: no such hub repository (nor local folder); check the id, or log in "
                         "(`hf auth login`) if it is private or gated") from None
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:
        raise InputError(f"--model {hub_id!r}: no local folder of that name, and the hub repo could not be fetched "
                         f"(nor found in the cache): {str(e).splitlines()[0]}") from None


def read_configs(folder: Path, name: str) -> dict[str, dict[str, Any]]:
    """model_index.json (optional) and the transformer, vae and text_encoder config.json of a pipeline folder."""
    configs: dict[str, dict[str, Any]] = {"model_index": {}}
    index = folder / "model_index.json"
    if index.is_file():
        configs["model_index"] = json.loads(index.read_text())
    missing = [f"{sub}/config.json" for sub in ("transformer", "vae", "text_encoder")
               if not (folder / sub / "config.json").is_file()]
    missing += [] if (folder / "tokenizer").is_dir() else ["tokenizer/"]
    if missing:
        raise InputError(f"--model {name!r} is not a diffusers Wan pipeline: missing {', '.join(missing)}")
    for sub in ("transformer", "vae", "text_encoder"):
        configs[sub] = json.loads((folder / sub / "config.json").read_text())
    return configs


# ---------------------------------------------------------------- timing

class StageTimer:
    """Seconds per named stage: CUDA events on GPU (read once at the end, so no host syncs), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, tuple[Any, Any]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
        if self.cuda:
            start.record()
        yield
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self.marks[name] = (start, end)

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {name: s.elapsed_time(e) / 1000 for name, (s, e) in self.marks.items()}
        return {name: e - s for name, (s, e) in self.marks.items()}


def print_timings(seconds: dict[str, float], num_frames: int, title: str) -> None:
    steps = [s for name, s in seconds.items() if name.startswith("denoise")]
    denoise, decode = sum(steps), seconds.get("VAE decode", 0.0)
    rows = list(seconds.items())
    if len(steps) > 8:  # the teacher's 50 steps: one summary row
        rows = [r for r in rows if not r[0].startswith("denoise")]
        rows.insert(1 if "text encode" in seconds else 0, (f"denoise steps ({len(steps)}), mean", denoise / len(steps)))
    rows += [("denoise total", denoise), ("denoise + decode", denoise + decode)]
    print(f"\n{title}")
    print(f"{'stage':34s} {'seconds':>9s}")
    for name, s in rows:
        print(f"{name:34s} {s:9.3f}")
    print(f"{'frames/s (frames / (denoise+decode))':34s} {num_frames / max(denoise + decode, 1e-9):9.2f}")


# ---------------------------------------------------------------- pipeline stages

def encode(model_dir: Path, prompts: list[str], device: torch.device, timer: StageTimer) -> torch.Tensor:
    """UMT5 (fp32, SPEC §3.3b) -> context (N, 512, D) float32 on `device`; the encoder is freed before returning."""
    tokenizer, encoder = load_text_encoder(model_dir, device, torch.float32)
    with timer.stage("text encode"):
        context, _, _ = encode_prompts(tokenizer, encoder, prompts)
    del tokenizer, encoder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return context


def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """An image resized to cover (height, width) and centre-cropped -> (1, 3, 1, H, W) in [-1, 1]."""
    import numpy as np
    from PIL import Image

    image = Image.open(path).convert("RGB")
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image).copy()).float() / 127.5 - 1  # (H, W, 3)
    return pixels.permute(2, 0, 1)[None, :, None]  # (1, 3, 1, H, W)


def token_timesteps(t: torch.Tensor, grid: tuple[int, int, int], batch: int) -> torch.Tensor:
    """Per-token timesteps (B, L) for image conditioning from t (1,) or (): t everywhere except the tokens of latent
    frame 0 (t = 0)."""
    nt, nh, nw = grid
    keep = torch.ones(nt * nh * nw, device=t.device)
    keep[: nh * nw] = 0  # raster order (t, h, w): frame 0 comes first
    return (t * keep).expand(batch, -1)


def model_dtype(model: WanModel) -> torch.dtype:
    """The DiT runs in plain bf16 (or fp32) without autocast: its inputs are cast to its weights' dtype."""
    return model.patch_embedding.weight.dtype


def denoise(
    model: WanModel,
    context: torch.Tensor,  # (B, L_txt, D_txt)
    latent_shape: tuple[int, ...],  # (B, C, T, H, W)
    steps: list[float],
    generator: torch.Generator,
    *,
    attn_meta: Any = None,
    image_latent: torch.Tensor | None = None,  # (B, C, 1, H, W) normalised; TI2V image conditioning
    timer: StageTimer | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Few-step DMD sampling (SPEC §5.2) -> normalised x0 latents (B, C, T, H, W) float32.

    Draws from `generator`, in this order: the starting noise, then one fresh noise per re-noise step.
    One conditional forward per step in the model's dtype, no CFG; the sampler's arithmetic stays in fp32/fp64.
    Nothing in the loop waits for the GPU.
    """
    device, batch, dtype = context.device, latent_shape[0], model_dtype(model)
    context = context.to(dtype)
    timer = timer or StageTimer(device)
    grid = model.token_grid(latent_shape)
    x = torch.randn(latent_shape, generator=generator, device=device)
    for i in tqdm(range(len(steps)), desc="denoise", disable=not progress):
        with timer.stage(f"denoise step {i + 1} (t={steps[i]:g})"):
            t = torch.full((batch,), steps[i], device=device)  # a fill kernel: no host->device copy, no sync
            t_model = t
            if image_latent is not None:
                x = torch.cat([image_latent, x[:, :, 1:]], dim=2)  # frame 0 := the image
                t_model = token_timesteps(t[:1], grid, batch)
            v = model(x.to(dtype), t_model, context, attn_meta=attn_meta)
            x0 = x0_from_velocity(x, v.float(), t)
            if image_latent is not None:
                x0 = torch.cat([image_latent, x0[:, :, 1:]], dim=2)
            if i + 1 < len(steps):
                fresh = torch.randn(latent_shape, generator=generator, device=device)
                x = add_noise(x0, fresh, torch.full((batch,), steps[i + 1], device=device))
    return x0


def denoise_teacher(
    model: WanModel,
    context: torch.Tensor,  # (B, L_txt, D_txt)
    negative: torch.Tensor,  # (B, L_txt, D_txt)
    latent_shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    num_steps: int,
    guidance: float,
    shift: float,
    image_latent: torch.Tensor | None = None,
    timer: StageTimer | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Many-step flow sampling with CFG `uncond + g (cond - uncond)` and diffusers' UniPC (Wan's teacher sampler)."""
    from diffusers import UniPCMultistepScheduler

    device, batch, dtype = context.device, latent_shape[0], model_dtype(model)
    context, negative = context.to(dtype), negative.to(dtype)
    timer = timer or StageTimer(device)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                        num_train_timesteps=1000)
    scheduler.set_timesteps(num_steps, device=device)
    grid = model.token_grid(latent_shape)
    x = torch.randn(latent_shape, generator=generator, device=device)
    for i, step in enumerate(tqdm(scheduler.timesteps, desc="teacher", disable=not progress)):
        with timer.stage(f"denoise step {i + 1}"):
            t = step.float().expand(batch)
            if image_latent is not None:
                x = torch.cat([image_latent, x[:, :, 1:]], dim=2)
                t = token_timesteps(step.float(), grid, batch)
            cond = model(x.to(dtype), t, context).float()
            uncond = model(x.to(dtype), t, negative).float()
            x = scheduler.step(uncond + guidance * (cond - uncond), step, x).prev_sample
    if image_latent is not None:
        x = torch.cat([image_latent, x[:, :, 1:]], dim=2)
    return x


def channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Channels-last weights for every conv (3D and 2D convs need different formats, so Module.to can't do it)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
        elif isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return module


def decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (1, C, T, H, W) -> uint8 frames (F, H, W, 3) on the CPU."""
    video = vae_decode(vae, latents)[0]  # (3, F, H, W) in [-1, 1]
    frames = ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu()  # (F, H, W, 3)


def slug(text: str, max_len: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:max_len] or "prompt"


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    try:
        plan = validate(args)
        model_dir = plan.model_dir if plan.model_dir is not None else fetch(plan.hub_id, HUB_FILES)
    except InputError as e:
        sys.exit(f"sample.py: error: {e}")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    out_dir = Path(args.out)
    load = {}

    # Text first, then free the encoder: UMT5-XXL in fp32 is ~23 GB, more than the 1.3B DiT.
    t0 = time.perf_counter()
    timer_text = StageTimer(device)
    prompts = plan.prompts + ([args.negative_prompt] if args.teacher else [])
    context = encode(model_dir, prompts, device, timer_text)
    load["text encoder load + encode + free"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    vae = load_vae(model_dir, device, torch.float32)  # fp32 for the image encode (SPEC §3.3b)
    image_latent = None
    if args.image is not None:
        pixels = load_image(args.image, plan.height, plan.width)
        image_latent = normalize_latents(vae_encode(vae, pixels), *latent_stats(vae)).to(device)  # (1, C, 1, h, w)
    if dtype != torch.float32:
        vae = vae.to(dtype)  # decode in bf16 (SPEC §3.3b)
    if args.vae_channels_last:
        channels_last(vae)
    if args.vae_compile:
        vae.decoder.compile()
    attn = "sdpa" if args.teacher else plan.attn
    if attn == "vsa" and args.fp8 and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9):
        attn = "vsa_fp8"  # Hopper+: TMA and FP8 tensor cores; CPU runs the same reference as "vsa"
    model = load_pretrained(model_dir, attn_fn=ATTN[attn], dtype=dtype, device=device)
    model.eval().requires_grad_(False)
    fp8_layers = quantize_linears_fp8(model) if args.fp8 else 0  # after the weights are placed, before compile
    enable_fused_rows(model)  # one-sample blocks through the fused row kernels (models/fused_rows.py)
    load["DiT + VAE load"] = time.perf_counter() - t0
    attn_meta = None
    if attn in ("vsa", "vsa_fp8"):
        attn_meta = vsa_meta(model.token_grid(plan.latent_shape), args.sparsity, device)  # once per shape
    if args.compile:  # per block: one graph serves every block (seconds to compile, not minutes for the 14B)
        apply_compile(model)
    print(f"model {args.model}: {attn} attention{f' (sparsity {args.sparsity})' if attn != 'sdpa' else ''}, "
          f"{plan.num_frames}x{plan.height}x{plan.width} -> latents {plan.latent_shape}, {args.dtype}"
          f"{f', fp8 linears ({fp8_layers} layers)' if args.fp8 else ''}, {device}")
    for name, s in load.items():
        print(f"{name}: {s:.1f} s")

    written = []
    for i, prompt in enumerate(plan.prompts):
        timer = StageTimer(device)
        generator = torch.Generator(device).manual_seed(args.seed)
        cond = context[i : i + 1]
        with torch.no_grad():
            if args.teacher:
                latents = denoise_teacher(model, cond, context[-1:], plan.latent_shape, generator,
                                          num_steps=args.teacher_steps, guidance=args.guidance, shift=args.shift,
                                          image_latent=image_latent, timer=timer)
            else:
                latents = denoise(model, cond, plan.latent_shape, plan.steps, generator, attn_meta=attn_meta,
                                  image_latent=image_latent, timer=timer)
            with timer.stage("VAE decode"):
                frames = decode(vae, latents)
        path = out_dir / f"{i:02d}_{slug(prompt)}{'_teacher' if args.teacher else ''}.mp4"
        write_video(path, frames.numpy(), plan.fps)
        if args.save_latents:
            torch.save(latents.cpu(), path.with_suffix(".latents.pt"))
        written.append(path)
        seconds = timer.seconds()
        if i == 0:
            seconds = {**timer_text.seconds(), **seconds}
        note = " (includes torch.compile warm-up)" if i == 0 and (args.compile or args.vae_compile) else ""
        print_timings(seconds, plan.num_frames, f"{path}{note}")
    return written


if __name__ == "__main__":
    main()
