"""The run directory's files besides metrics and checkpoints (STYLE "Run directory"): `config.toml`, a copy of the
recipe, `env.txt`, the validation samples `samples/step-NNNNNN/promptNN.mp4` (with frame strips in TensorBoard), and
the frozen parts of the exported pipeline (`export/` = the student's `transformer/` + links to the base's VAE, text
encoder, tokenizer and scheduler, so `tools/sample.py --model <run>/export` samples from it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from components.metrics import MetricsLogger, write_video
from data.encode import vae_decode

# all but the transformer(s); image_encoder/ and image_processor/ exist only in Wan2.1-I2V folders (CLIP)
PIPELINE_PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "vae", "image_encoder", "image_processor")


def write_run_files(run_dir: Path, config_toml: str, recipe: Path) -> None:
    """config.toml (the resolved config as TOML text), a copy of the recipe, env.txt (git SHA, versions, GPUs,
    world size, command)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(config_toml)
    shutil.copy(recipe, run_dir / recipe.name)
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=recipe.parent, capture_output=True, text=True).stdout
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    env = {"git": git.strip(), "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus,
           "world_size": dist.get_world_size() if dist.is_initialized() else 1, "command": " ".join(sys.argv)}
    (run_dir / "env.txt").write_text("".join(f"{k}: {v}\n" for k, v in env.items()))


def save_samples(vae: torch.nn.Module, latents: torch.Tensor, out: Path, metrics: MetricsLogger, step: int,
                 fps: int, tag: str = "val") -> torch.Tensor:
    """Decode normalised latents (N, C, T, H, W) with the VAE; one mp4 per prompt, and its frame strip in TensorBoard
    as `<tag>/promptNN`. Returns the decoded video (N, 3, F, H, W), unclamped (the health statistics read it)."""
    video = vae_decode(vae, latents)  # (N, 3, F, H, W) in [-1, 1]
    frames = ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()  # (N, F, H, W, 3)
    for i, clip in enumerate(frames):
        write_video(out / f"prompt{i:02d}.mp4", clip, fps)
        metrics.video(f"{tag}/prompt{i:02d}", step, clip, fps)
    return video


def link_pipeline_parts(base: Path, export: Path) -> None:
    """Complete `export` (which holds the student's transformer/) into a diffusers pipeline folder: a symlink to each
    of the base pipeline's other parts that exists (links, not copies: the UMT5-XXL encoder alone is ~11 GB)."""
    export.mkdir(parents=True, exist_ok=True)
    for part in PIPELINE_PARTS:
        source, link = Path(base).resolve() / part, export / part
        if source.exists() and not link.exists():
            link.unlink(missing_ok=True)  # a dangling link from an earlier base
            link.symlink_to(source, target_is_directory=source.is_dir())
