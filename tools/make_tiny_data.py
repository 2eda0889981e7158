"""Write a small synthetic dataset that the recipes' tiny (CPU) and random-weight (GPU) overlays train on.

    python tools/make_tiny_data.py --out outputs/tiny_data                         # tests/assets/tiny*.toml
    python tools/make_tiny_data.py --out outputs/gpu_data --shape 16,20,56,104 --text-dim 4096 --rows 16
                                                                                   # tests/assets/gpu_1_3b_random.toml
    python tools/make_tiny_data.py --out outputs/tiny_i2v --i2v --clip 5,16       # I2V rows (+ CLIP tokens 5 x 16)
Output (the layouts the recipes read):
    <out>/latents/   latent parquet, `--rows` rows of un-normalised latents (C, T, H, W) = --shape + caption embeddings;
                     --i2v: the I2V schema, + first_frame_latent (C, T, H, W) (the clip's frame 0, then one fixed
                     "black frames" latent, as a VAE encodes [image, zeros...]); --clip L,D: + clip_feature (L, D)
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
    p.add_argument("--i2v", action="store_true", help="I2V rows: + first_frame_latent (the recipes' I2V conditioning)")
    p.add_argument("--clip", default=None, help="with --i2v: L,D of a clip_feature per row (Wan2.1-I2V CLIP tokens)")
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
    if args.clip is not None and not args.i2v:
        raise SystemExit("--clip needs --i2v (CLIP tokens are an I2V column)")
    clip = tuple(int(s) for s in args.clip.split(",")) if args.clip else None
    if clip is not None and (len(clip) != 2 or min(clip) < 1):
        raise SystemExit(f"--clip must be two positive ints L,D; got {args.clip!r}")
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

    latents = LatentParquetWriter(out / "latents", rows_per_file=4, i2v=args.i2v)
    scale, shift = torch.tensor(std).view(-1, 1, 1, 1), torch.tensor(mean).view(-1, 1, 1, 1)  # (C, 1, 1, 1)
    # the zero frames' latent, shared by all rows (drawn only for I2V: the T2V files stay as they were)
    black = torch.randn((channels, 1, *shape[2:]), generator=gen) * scale + shift if args.i2v else None
    for i in range(args.rows):
        text, emb = caption(i)
        z = torch.randn(shape, generator=gen) * scale + shift
        i2v = {}
        if args.i2v:
            first = torch.cat([z[:, :1], black.expand(-1, shape[1] - 1, -1, -1)], dim=1)  # (C, T, H, W)
            i2v["first_frame_latent"] = first
            i2v["clip_feature"] = torch.randn(clip, generator=gen) if clip else None
        latents.write(f"clip{i:04d}", text, emb, z, height=shape[2] * 8, width=shape[3] * 8, fps=16.0, **i2v)
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
    kind = " (I2V" + (f", CLIP {clip}" if clip else "") + ")" if args.i2v else ""
    print(f"wrote {out}: latents {shape}{kind} x {args.rows}, prompts x {args.rows}, negative prompt, pipeline/vae")
    return out


if __name__ == "__main__":
    main()
