"""Frozen encoders borrowed from a diffusers Wan pipeline folder: UMT5 text encoder and `AutoencoderKLWan`.

Used by tools/preprocess.py (videos -> parquet) and tools/sample.py (prompts -> video). The folder layout is diffusers':
`<pipeline>/{tokenizer,text_encoder,vae}/`.

    tokenizer, encoder = load_text_encoder(pipe, "cuda", torch.float32)
    context, mask, lengths = encode_prompts(tokenizer, encoder, ["a cat"])      # (B, 512, D), (B, 512), (B,)
    vae = load_vae(pipe, "cuda", torch.float32)
    z = vae_encode(vae, video)                                                  # un-normalised posterior mean
    mean, std = latent_stats(vae); z_n = normalize_latents(z, mean, std)        # what the DiT trains on
    video = vae_decode(vae, z_n)                                                # (B, 3, F, H, W) in [-1, 1]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

TEXT_LEN = 512
# Wan's default negative prompts, the unconditional branch of teacher CFG: the reference encodes the English one for the
# Wan2.1 models and the Chinese original for Wan2.2-TI2V-5B (FastVideo `fastvideo/pipelines/basic/wan/presets.py`).
NEGATIVE_PROMPTS = {
    "en": (
        "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
        "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
        "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
        "background, three legs, many people in the background, walking backwards"
    ),
    "zh": (
        "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
        "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
        "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
    ),
}


def load_text_encoder(pipeline_dir: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> tuple[object, torch.nn.Module]:
    """(tokenizer, UMT5 encoder in eval mode) from `<pipeline_dir>/tokenizer` and `<pipeline_dir>/text_encoder`."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    pipeline_dir = Path(pipeline_dir)
    tokenizer = AutoTokenizer.from_pretrained(pipeline_dir / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(pipeline_dir / "text_encoder", dtype=dtype)
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(tokenizer: object, encoder: torch.nn.Module, prompts: Sequence[str],
                   max_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts -> (context (B, max_len, D) float32, mask (B, max_len) int64, lengths (B,)) as in docs/METHOD.md §3.3b.

    Tokens are truncated at max_len with special tokens added; each prompt keeps the hidden states of its `sum(mask)`
    real tokens, followed by zero rows. Padding to the longest prompt instead of max_len gives the same real-token states
    (padded keys are masked out) and is faster.
    """
    tokens = tokenizer(list(prompts), padding="longest", max_length=max_len, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    ids, attn = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    hidden = encoder(input_ids=ids, attention_mask=attn).last_hidden_state.float()  # (B, L_tok, D)
    lengths = attn.sum(dim=1)
    context = hidden.new_zeros(len(prompts), max_len, hidden.shape[-1])
    mask = torch.zeros(len(prompts), max_len, dtype=torch.int64, device=device)
    for i, n in enumerate(lengths.tolist()):
        context[i, :n] = hidden[i][attn[i].bool()]  # real tokens, whichever side the tokenizer padded
        mask[i, :n] = 1
    return context, mask, lengths


def trim_embedding(context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One prompt's padded context (L, D) and mask (L,) -> its valid rows (sum(mask), D), as stored in the parquet."""
    return context[: int(mask.sum())]


def load_vae(pipeline_dir: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """`diffusers.AutoencoderKLWan` from `<pipeline_dir>/vae`, eval mode, frozen."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(Path(pipeline_dir) / "vae", torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def latent_stats(vae: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean (C,), std (C,)) from the VAE config, float32 on CPU."""
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32)
    return mean, std


def latent_stats_from_config(pipeline_dir: str | Path, device: str | torch.device = "cpu"
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`latent_stats` read from `<pipeline_dir>/vae/config.json` without loading the VAE: (mean (C,), std (C,))."""
    config = json.loads((Path(pipeline_dir) / "vae" / "config.json").read_text())
    mean, std = (torch.tensor(config[k], dtype=torch.float32, device=device) for k in ("latents_mean", "latents_std"))
    return mean, std


def compute_latent_shape(channels: int, num_frames: int, height: int, width: int,
                         stride: Sequence[int]) -> tuple[int, ...]:
    """(C, T, H, W) of the VAE latents of a num_frames×height×width video; a ValueError if the sizes do not fit the
    VAE's (T, H, W) compression `stride`: frames − 1 must divide by stride_t (the first frame is kept alone)."""
    st, sh, sw = stride
    if (num_frames - 1) % st or height % sh or width % sw:
        raise ValueError(f"a {num_frames}×{height}×{width} video does not fit the VAE stride {list(stride)}: need "
                         f"(frames − 1) % {st} == 0, height % {sh} == 0 and width % {sw} == 0")
    return channels, (num_frames - 1) // st + 1, height // sh, width // sw


def normalize_latents(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(z - mean_c) / std_c over channel dim -4: works for (C, T, H, W) and (B, C, T, H, W)."""
    mean = mean.to(z.device, z.dtype).view(-1, 1, 1, 1)  # (C, 1, 1, 1)
    std = std.to(z.device, z.dtype).view(-1, 1, 1, 1)
    return (z - mean) / std


def denormalize_latents(z_n: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize_latents`."""
    mean = mean.to(z_n.device, z_n.dtype).view(-1, 1, 1, 1)  # (C, 1, 1, 1)
    std = std.to(z_n.device, z_n.dtype).view(-1, 1, 1, 1)
    return z_n * std + mean


@torch.no_grad()
def vae_encode(vae: torch.nn.Module, video: torch.Tensor) -> torch.Tensor:
    """video (B, 3, F, H, W) in [-1, 1] -> un-normalised posterior mean (B, C, T, H', W') float32."""
    param = next(vae.parameters())
    return vae.encode(video.to(param.device, param.dtype)).latent_dist.mean.float()


@torch.no_grad()
def vae_decode(vae: torch.nn.Module, latents_normalized: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, C, T, H', W') -> video (B, 3, F, H, W) float32 in [-1, 1]."""
    param = next(vae.parameters())
    mean, std = latent_stats(vae)
    z = denormalize_latents(latents_normalized.to(param.device, param.dtype), mean, std)
    return vae.decode(z).sample.float().clamp(-1, 1)
