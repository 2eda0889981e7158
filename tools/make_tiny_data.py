"""Write a small synthetic dataset that the recipes' tiny (CPU) and random-weight (GPU) overlays train on.

    python tools/make_tiny_data.py --out outputs/tiny_data                         # tests/assets/tiny*.toml
    python tools/make_tiny_data.py --out outputs/gpu_data --shape 16,20,56,104 --text-dim 4096 --rows 16
                                                                                   # tests/assets/gpu_1_3b_random.toml
Output (the layouts the recipes read):
    <out>/latents/   latent parquet, `--rows` rows of un-normalised latents (C, T, H, W) = --shape + caption embeddings
    <out>/prompts/   text-only parquet (data-free mode and validation prompts), `--rows` rows
    <out>/negative_prompt.safetensors   the unconditional caption embedding for the teacher's CFG
    <out>/pipeline/vae/   a tiny random `diffusers.AutoencoderKLWan` with z_dim = C (4x temporal, 8x spatial), so the
                          recipes' `model.base = <out>/pipeline` finds a VAE to normalise and decode with
Everything is random and seeded; the same arguments write the same files.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from data.writer import LatentParquetWriter

WORDS = "red blue green cat dog bird car tree walks runs flies slow fast day night".split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shape", default="4,5,8,16", help="latent C,T,H,W (default fits WAN_CONFIGS['tiny'])")
    p.add_argument("--text-dim", type=int, default=32, help="caption embedding width (tiny: 32, Wan UMT5: 4096)")
    p.add_argument("--rows", type=int, default=8, help="rows in the latent and in the text-only parquet")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def write_vae(out: Path, z_dim: int, latents_mean: list[float], latents_std: list[float]) -> None:
    """A tiny random Wan VAE with the Wan2.1 compression (4x temporal, 8x spatial)."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=latents_mean, latents_std=latents_std)
    vae.save_pretrained(out)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    out = Path(args.out)
    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) != 4 or min(shape) < 1:
        raise SystemExit(f"--shape must be four positive ints C,T,H,W; got {args.shape!r}")
    gen = torch.Generator().manual_seed(args.seed)
    channels = shape[0]
    for sub in ("latents", "prompts", "pipeline"):  # the parquet writer appends; start clean so reruns are identical
        shutil.rmtree(out / sub, ignore_errors=True)
    # Non-trivial per-channel statistics, so the recipes' normalisation is exercised.
    mean = [round(0.1 * (c - channels / 2), 4) for c in range(channels)]
    std = [round(0.5 + 0.25 * (c % 4), 4) for c in range(channels)]

    def caption(i: int) -> tuple[str, torch.Tensor]:
        words = [WORDS[int(w)] for w in torch.randint(len(WORDS), (3,), generator=gen)]
        length = int(torch.randint(3, 12, (1,), generator=gen))
        return f"{i}: {' '.join(words)}", torch.randn(length, args.text_dim, generator=gen)

    latents = LatentParquetWriter(out / "latents", rows_per_file=4)
    for i in range(args.rows):
        text, emb = caption(i)
        scale, shift = torch.tensor(std).view(-1, 1, 1, 1), torch.tensor(mean).view(-1, 1, 1, 1)  # (C, 1, 1, 1)
        z = torch.randn(shape, generator=gen) * scale + shift
        latents.write(f"clip{i:04d}", text, emb, z, height=shape[2] * 8, width=shape[3] * 8, fps=16.0)
    latents.close()
    prompts = LatentParquetWriter(out / "prompts", rows_per_file=4, text_only=True)
    for i in range(args.rows):
        text, emb = caption(i)
        prompts.write(f"prompt{i:04d}", text, emb)
    prompts.close()
    negative = torch.randn(int(torch.randint(3, 12, (1,), generator=gen)), args.text_dim, generator=gen)
    save_file({"text_embedding": negative.contiguous()}, str(out / "negative_prompt.safetensors"))
    torch.manual_seed(args.seed)  # the VAE's own init
    write_vae(out / "pipeline" / "vae", channels, mean, std)
    print(f"wrote {out}: latents {shape} x {args.rows}, prompts x {args.rows}, negative prompt, pipeline/vae")
    return out


if __name__ == "__main__":
    main()
