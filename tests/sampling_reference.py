"""Hand-written sampling references for tests/test_pipeline.py and tests/test_sample.py (tests only).

They share no code with inference/: diffusers' own `WanTransformer3DModel` loaded from the tiny pipeline folder, the
text encoded by transformers directly, the DMD / UniPC loops written out here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny_pipeline import TINY_TEXT_DIM, TINY_Z_DIM, build_tiny_pipeline

TINY_DIT = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 32, "in_channels": TINY_Z_DIM,
    "out_channels": TINY_Z_DIM, "text_dim": TINY_TEXT_DIM, "freq_dim": 32, "ffn_dim": 128, "num_layers": 2,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}
# 5 frames of 64x128 -> latents (1, 4, 2, 8, 16) -> token grid (2, 4, 8): two 4x4x4 VSA tiles, short in time.
SIZE = {"num_frames": 5, "height": 64, "width": 128}
LATENT_SHAPE = (1, TINY_Z_DIM, 2, 8, 16)
# Teacher, TI2V and most CLI runs only need a few tokens: 5 frames of 32x64 -> latents (1, 4, 2, 4, 8).
SMALL = {"num_frames": 5, "height": 32, "width": 64}
SMALL_SHAPE = (1, TINY_Z_DIM, 2, 4, 8)
DMD = [1000.0, 757.0, 522.0]
PROMPT = "a red car drives on the street"
NEGATIVE = "blurry static ugly"


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    """A tiny Wan2.1-layout T2V pipeline written by diffusers' and transformers' save_pretrained."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipe"), transformer_config=TINY_DIT)


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory) -> Path:
    """The same with `expand_timesteps` in model_index.json, as Wan2.2-TI2V-5B's."""
    path = build_tiny_pipeline(tmp_path_factory.mktemp("ti2v"), transformer_config=TINY_DIT, seed=1)
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    return path


def cli_args(size: dict[str, int]) -> list[str]:
    """{"num_frames": 5, ...} -> ["--num-frames", "5", ...]"""
    return [arg for name, value in size.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


def reference_context(pipe: Path, prompt: str) -> torch.Tensor:
    """UMT5 states of the real tokens, zero-padded to 512 rows (Wan's text conditioning), straight from transformers."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(pipe / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(pipe / "text_encoder").eval()
    ids = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**ids).last_hidden_state[0]  # (n, D)
    context = torch.zeros(1, 512, hidden.shape[-1])
    context[0, : hidden.shape[0]] = hidden
    return context


def diffusers_dit(pipe: Path, dtype: torch.dtype = torch.float32):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(pipe / "transformer", torch_dtype=dtype).eval()


def frame0_timesteps(t: float, shape: tuple[int, ...]) -> torch.Tensor:
    """(1, L) timesteps: 0 for the tokens of latent frame 0, t elsewhere (patch 1x2x2)."""
    _, _, nt, h, w = shape
    per_frame = (h // 2) * (w // 2)
    return torch.tensor([[0.0] * per_frame + [t] * (nt - 1) * per_frame])


@torch.no_grad()
def reference_dmd(dit, context, steps, seed, shape, image_latent=None, dtype=torch.float32) -> torch.Tensor:
    """x0 = x - sigma v with sigma = t / 1000; re-noise with fresh noise from the same seeded generator. The model
    runs in `dtype` (inputs cast to it), the loop in fp32."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    for i, t in enumerate(steps):
        timestep = torch.tensor([t])
        if image_latent is not None:
            x[:, :, :1] = image_latent
            timestep = frame0_timesteps(t, shape)
        v = dit(x.to(dtype), timestep, context.to(dtype), return_dict=False)[0].float()
        x0 = x - (t / 1000) * v
        if image_latent is not None:
            x0[:, :, :1] = image_latent
        if i + 1 < len(steps):
            s = steps[i + 1] / 1000
            x = (1 - s) * x0 + s * torch.randn(shape, generator=generator)
    return x0


@torch.no_grad()
def reference_teacher(dit, context, negative, num_steps, guidance, shift, seed, shape) -> torch.Tensor:
    """diffusers' UniPC in flow mode with CFG `uncond + g (cond - uncond)`."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    scheduler.set_timesteps(num_steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        cond = dit(x, t.expand(1), context, return_dict=False)[0]
        uncond = dit(x, t.expand(1), negative, return_dict=False)[0]
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
