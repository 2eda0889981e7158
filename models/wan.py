"""The Wan2.1 / Wan2.2 video diffusion transformer, single-device PyTorch.

One model serves Wan2.1-T2V-1.3B/14B, Wan2.1-I2V-14B, Wan2.2-TI2V-5B and each expert of Wan2.2-T2V/I2V-A14B; the
architecture is fixed by `WanConfig`. Parameter names equal diffusers' `WanTransformer3DModel` keys except for the
readable renames kept in `models/wan_weights.py`, and the parity test against diffusers is the judge of every line here.

Image-to-video (I2V-14B, Wan2.2-I2V-A14B): the conditioning (4-channel first-frame mask + VAE latent of the image) is
concatenated to the noise by the sampler, so the model only sees in_channels=36. Wan2.1-I2V adds CLIP image tokens
(`image_context`, 257 x 1280): embedded once, then attended by every cross-attention through its own k/v projections
(`add_k_proj`, `add_v_proj`), the result added to the text attention's. Without `image_dim` none of that exists.

Shapes: latents (B, C, T, H, W); tokens x (B, L, D) with L = T' * H' * W' after the (1, 2, 2) patch; context
(B, L_txt, D_txt); t (B,) or per-token (B, L) on the 0..1000 scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

AttnFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class WanConfig:
    dim: int  # hidden size = num_heads * head_dim
    ffn_dim: int  # FFN inner size
    num_heads: int
    num_layers: int
    in_channels: int  # latent channels in (16 for the Wan2.1 VAE, 48 for the Wan2.2 VAE)
    out_channels: int
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096  # UMT5-XXL hidden size
    freq_dim: int = 256  # sinusoidal timestep embedding width
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_max_seq_len: int = 1024  # longest token axis the RoPE tables cover
    vsa_gate: bool = False  # per-block `to_gate_compress` for VSA's coarse branch
    image_dim: int | None = None  # CLIP image-token width (1280, Wan2.1-I2V); None: no image cross-attention

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"WanConfig: dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"WanConfig: head_dim={self.head_dim} must be even for RoPE")

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], vsa_gate: bool = False) -> "WanConfig":
        """Build from a diffusers `WanTransformer3DModel` config.json dict."""
        if config.get("pos_embed_seq_len") is not None:
            raise ValueError(
                f"config.json: pos_embed_seq_len={config['pos_embed_seq_len']!r} (Wan2.1-FLF2V, first+last frame) is "
                "not supported; sparse-distill covers T2V, TI2V and I2V transformers (pos_embed_seq_len must be null)"
            )
        image_dim, added_kv = config.get("image_dim"), config.get("added_kv_proj_dim")
        inner = int(config.get("num_attention_heads", 0)) * int(config.get("attention_head_dim", 0))
        # diffusers feeds add_k_proj/add_v_proj the image embedder's output (width dim): the only layout published.
        if (image_dim is None) != (added_kv is None) or (added_kv is not None and int(added_kv) != inner):
            raise ValueError(
                f"config.json: image_dim={image_dim!r} with added_kv_proj_dim={added_kv!r}; Wan2.1-I2V has both "
                f"(added_kv_proj_dim = num_attention_heads * attention_head_dim = {inner}), T2V/TI2V neither"
            )
        qk_norm = config.get("qk_norm", "rms_norm_across_heads")
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"config.json: qk_norm={qk_norm!r}; only 'rms_norm_across_heads' is supported")
        try:
            heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
            in_channels = int(config["in_channels"])
            return cls(
                dim=heads * head_dim,
                ffn_dim=int(config["ffn_dim"]),
                num_heads=heads,
                num_layers=int(config["num_layers"]),
                in_channels=in_channels,
                out_channels=int(config.get("out_channels") or in_channels),
                patch_size=tuple(int(p) for p in config.get("patch_size", (1, 2, 2))),
                text_dim=int(config.get("text_dim", 4096)),
                freq_dim=int(config.get("freq_dim", 256)),
                eps=float(config.get("eps", 1e-6)),
                cross_attn_norm=bool(config.get("cross_attn_norm", True)),
                rope_max_seq_len=int(config.get("rope_max_seq_len", 1024)),
                vsa_gate=vsa_gate,
                image_dim=None if image_dim is None else int(image_dim),
            )
        except KeyError as e:
            raise ValueError(f"config.json is missing required key {e.args[0]!r} of WanTransformer3DModel") from None

    def to_diffusers(self) -> dict[str, Any]:
        """The config.json dict diffusers' `WanTransformer3DModel` is built from."""
        return {
            "_class_name": "WanTransformer3DModel",
            "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads",
            "eps": self.eps,
            "image_dim": self.image_dim,
            "added_kv_proj_dim": None if self.image_dim is None else self.dim,
            "rope_max_seq_len": self.rope_max_seq_len,
            "pos_embed_seq_len": None,
        }


# Values checked against the public diffusers configs (docs/METHOD.md §3.1).
WAN_CONFIGS: dict[str, WanConfig] = {
    "wan21_1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_channels=16, out_channels=16),
    "wan21_14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_channels=16, out_channels=16),
    "wan22_ti2v_5b": WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_channels=48, out_channels=48),
    # I2V: 16 noise + 4 mask + 16 image-latent channels in, 16 out. The 480P and 720P checkpoints share this config.
    "wan21_i2v_14b": WanConfig(
        dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_channels=36, out_channels=16, image_dim=1280
    ),
    # Wan2.2-A14B: two experts of this shape each (transformer/ high-noise, transformer_2/ low-noise).
    "wan22_t2v_a14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_channels=16, out_channels=16),
    "wan22_i2v_a14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_channels=36, out_channels=16),
    # CPU tests and the toy recipes; head_dim 32 keeps every RoPE axis non-trivial (12/10/10 channels).
    "tiny": WanConfig(
        dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_channels=4, out_channels=4, text_dim=32, freq_dim=32
    ),
}


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of the (t, h, w) RoPE axes: 44/42/42 for head_dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2j, 2j+1) of x (B, L, H, Dh) by angles with cos/sin (L, Dh/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, L, H, Dh/2, 2)
    x1, x2 = pairs.unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, L, 1, Dh/2)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, L, H, Dh/2, 2)
    return out.flatten(-2).type_as(x)


def timestep_sinusoid(t: torch.Tensor, width: int) -> torch.Tensor:
    """[cos(t w_j), sin(t w_j)] with w_j = 10000^(-j / (width/2)); t is used raw (0..1000), not divided."""
    half = width // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[..., None] * freqs  # (..., half)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


class MLP2(nn.Module):
    """linear_1 -> activation -> linear_2 (diffusers' time and text embedders share this shape)."""

    def __init__(self, dim_in: int, dim_out: int, act: nn.Module) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.act = act
        self.linear_2 = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Timestep -> (temb, 6-way modulation); text (UMT5 states) -> model width."""

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.time_embedder = MLP2(cfg.freq_dim, cfg.dim, nn.SiLU())
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)
        self.text_embedder = MLP2(cfg.text_dim, cfg.dim, nn.GELU(approximate="tanh"))
        self.image_embedder = ImageEmbedder(cfg.image_dim, cfg.dim) if cfg.image_dim is not None else None

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,) -> temb (B, D), tmod (B, 6, D); per-token t (B, L) -> (B, L, D), (B, L, 6, D)."""
        # The sinusoid is fp32; match the embedder's dtype when the model runs in bf16 without autocast.
        temb = self.time_embedder(timestep_sinusoid(t, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype))
        tmod = self.time_proj(F.silu(temb))
        return temb, tmod.unflatten(-1, (6, -1))

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        return self.text_embedder(context)

    def embed_image(self, image_context: torch.Tensor) -> torch.Tensor:
        """CLIP image tokens (B, L_img, image_dim) -> (B, L_img, D); only with cfg.image_dim."""
        return self.image_embedder(image_context)


class ImageEmbedder(nn.Module):
    """CLIP tokens -> model width: LayerNorm -> Linear -> GELU (exact) -> Linear -> LayerNorm, the norms in fp32
    with torch's default eps 1e-5 (diffusers' `WanImageEmbedding`)."""

    def __init__(self, image_dim: int, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(image_dim)
        self.fc1 = nn.Linear(image_dim, image_dim)
        self.fc2 = nn.Linear(image_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fp32_layer_norm(self.norm1, x)
        return fp32_layer_norm(self.norm2, self.fc2(F.gelu(self.fc1(x))))


def fp32_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """An affine LayerNorm computed in fp32, returned in x's dtype."""
    out = F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    return out.type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: WanConfig, attn_fn: AttnFn) -> None:
        super().__init__()
        dim, self.num_heads = cfg.dim, cfg.num_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        # q/k RMSNorm across all heads (one weight of size dim), as Wan does.
        self.norm_q = nn.RMSNorm(dim, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(dim, eps=cfg.eps)
        self.to_gate_compress = nn.Linear(dim, dim) if cfg.vsa_gate else None
        self.attn_fn = attn_fn

    def forward(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        q = self.norm_q(self.to_q(u)).unflatten(-1, (self.num_heads, -1))  # (B, L, H, Dh)
        k = self.norm_k(self.to_k(u)).unflatten(-1, (self.num_heads, -1))
        v = self.to_v(u).unflatten(-1, (self.num_heads, -1))
        # Under autocast RMSNorm returns fp32 while v is bf16; attention kernels take one dtype.
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        gate = None
        if self.to_gate_compress is not None and attn_meta is not None:
            gate = self.to_gate_compress(u).unflatten(-1, (self.num_heads, -1))  # (B, L, H, Dh)
        out = self.attn_fn(q, k, v, meta=attn_meta, gate=gate)  # (B, L, H, Dh)
        return self.to_out(out.flatten(2))


class CrossAttention(nn.Module):
    """Queries from video tokens, keys/values from the text; always dense (the text is short). With image tokens
    (Wan2.1-I2V) the same queries also attend to them through `add_k_proj`/`add_v_proj`, and the two results add."""

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        dim, self.num_heads = cfg.dim, cfg.num_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=cfg.eps)
        self.norm_k = nn.RMSNorm(dim, eps=cfg.eps)
        self.add_k_proj = self.add_v_proj = self.norm_added_k = None
        if cfg.image_dim is not None:
            self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=cfg.eps)

    def forward(
        self, u: torch.Tensor, context: torch.Tensor, image_context: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = self.norm_q(self.to_q(u)).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, H, L, Dh)
        k = self.norm_k(self.to_k(context)).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, H, L_txt, Dh)
        v = self.to_v(context).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, Dh)
        if image_context is not None:
            k_img = self.norm_added_k(self.add_k_proj(image_context))
            k_img = k_img.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, H, L_img, Dh)
            v_img = self.add_v_proj(image_context).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
            out = out + F.scaled_dot_product_attention(q, k_img, v_img).type_as(out)
        return self.to_out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig, attn_fn: AttnFn) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.attn1 = SelfAttention(cfg, attn_fn)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.attn2 = CrossAttention(cfg)
        self.ffn = FeedForward(cfg)
        # shift/scale/gate for self-attention and FFN, added to the timestep modulation.
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D)
        context: torch.Tensor,  # (B, L_txt, D)
        tmod: torch.Tensor,  # (B, 6, D) or per-token (B, L, 6, D)
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_meta: Any = None,
        image_context: torch.Tensor | None = None,  # (B, L_img, D), Wan2.1-I2V's embedded CLIP tokens
    ) -> torch.Tensor:
        # Modulation in fp32 (as Wan does): (B, 1 or L, 6, D) -> six (B, 1 or L, D).
        mod = tmod.float() if tmod.ndim == 4 else tmod.float().unsqueeze(1)
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table.unsqueeze(0) + mod).unbind(2)
        dim = x.shape[-1]

        u = (F.layer_norm(x.float(), (dim,), eps=self.eps) * (1 + scale1) + shift1).type_as(x)
        x = (x.float() + self.attn1(u, cos, sin, attn_meta) * gate1).type_as(x)

        u = x
        if self.norm2 is not None:
            u = F.layer_norm(x.float(), (dim,), self.norm2.weight.float(), self.norm2.bias.float(), self.eps)
        x = x + self.attn2(u.type_as(x), context, image_context)

        u = (F.layer_norm(x.float(), (dim,), eps=self.eps) * (1 + scale2) + shift2).type_as(x)
        return (x.float() + self.ffn(u).float() * gate2).type_as(x)


class TokenShard(nn.Module):
    """Sequence-parallel seam after the embeddings; identity on one device (parallel/ulysses.py replaces it)."""

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tmod: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return x, cos, sin, tmod


class TokenGather(nn.Module):
    """Sequence-parallel seam before the output head; identity on one device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class WanModel(nn.Module):
    def __init__(self, cfg: WanConfig, attn_fn: AttnFn | None = None) -> None:
        super().__init__()
        if attn_fn is None:
            from attention.sdpa import sdpa_attention

            attn_fn = sdpa_attention
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList(WanBlock(cfg, attn_fn) for _ in range(cfg.num_layers))
        self.proj_out = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)
        self.token_shard = TokenShard()
        self.token_gather = TokenGather()
        self.init_buffers(None)
        for block in self.blocks:
            if block.attn1.to_gate_compress is not None:
                # A zero gate keeps VSA's coarse branch off until training moves it (docs/METHOD.md §2.1).
                nn.init.zeros_(block.attn1.to_gate_compress.weight)
                nn.init.zeros_(block.attn1.to_gate_compress.bias)

    # ---- buffers and init (meta-device friendly) ----
    def init_buffers(self, device: torch.device | str | None) -> None:
        """(Re)build the RoPE angle tables; call after `to_empty()` from the meta device."""
        pos = torch.arange(self.cfg.rope_max_seq_len, dtype=torch.float64, device=device)
        tables = []
        for axis_dim in rope_axis_dims(self.cfg.head_dim):
            inv_freq = 10000.0 ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
            tables.append(torch.outer(pos, inv_freq))  # (max_len, axis_dim/2) angles, float64 for exact cos/sin
        angles = torch.cat(tables, dim=1)  # (max_len, Dh/2)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init for a model materialised with `to_empty()` (benchmarks, from-scratch training)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv3d, nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for table in [self.scale_shift_table] + [b.scale_shift_table for b in self.blocks]:
            table.normal_(0.0, self.cfg.dim**-0.5)
        for block in self.blocks:
            if block.attn1.to_gate_compress is not None:
                block.attn1.to_gate_compress.weight.zero_()
                block.attn1.to_gate_compress.bias.zero_()
        self.init_buffers(self.scale_shift_table.device)

    # ---- helpers ----
    def token_grid(self, latent_shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
        """(T', H', W') token grid of latents (B, C, T, H, W); raises if the patch does not divide T, H, W."""
        if len(latent_shape) != 5:
            raise ValueError(f"latents must be (B, C, T, H, W); got shape {tuple(latent_shape)}")
        _, c, *thw = latent_shape
        if c != self.cfg.in_channels:
            raise ValueError(f"latents have {c} channels; this model expects in_channels={self.cfg.in_channels}")
        grid = []
        for name, size, p in zip("THW", thw, self.cfg.patch_size):
            if size % p:
                raise ValueError(
                    f"latent {name}={size} is not divisible by the patch size {p} (patch {self.cfg.patch_size}); "
                    f"use a latent {name} that is a multiple of {p}"
                )
            grid.append(size // p)
        return tuple(grid)

    def rope_tables(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (L, Dh/2) for a raster-ordered (T', H', W') token grid."""
        if max(grid) > self.cfg.rope_max_seq_len:
            raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={self.cfg.rope_max_seq_len}")
        dt, dh, _ = (d // 2 for d in rope_axis_dims(self.cfg.head_dim))
        nt, nh, nw = grid
        out = []
        for table in (self.rope_cos, self.rope_sin):
            t_part = table[:nt, :dt][:, None, None].expand(nt, nh, nw, -1)
            h_part = table[:nh, dt : dt + dh][None, :, None].expand(nt, nh, nw, -1)
            w_part = table[:nw, dt + dh :][None, None, :].expand(nt, nh, nw, -1)
            out.append(torch.cat((t_part, h_part, w_part), dim=-1).reshape(nt * nh * nw, -1))  # (L, Dh/2)
        return out[0], out[1]

    # ---- forward ----
    def forward(
        self,
        latents: torch.Tensor,  # (B, C, T, H, W)
        t: torch.Tensor,  # (B,) or per-token (B, L)
        context: torch.Tensor,  # (B, L_txt, D_txt)
        attn_meta: Any = None,
        image_context: torch.Tensor | None = None,  # (B, L_img, image_dim) CLIP tokens; only with cfg.image_dim
    ) -> torch.Tensor:
        grid = self.token_grid(latents.shape)
        batch, num_tokens = latents.shape[0], math.prod(grid)
        if t.shape not in ((batch,), (batch, num_tokens)):
            raise ValueError(f"t must be ({batch},) or per-token ({batch}, {num_tokens}); got {tuple(t.shape)}")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.cfg.text_dim:
            raise ValueError(f"context must be ({batch}, L_txt, {self.cfg.text_dim}); got {tuple(context.shape)}")
        if self.cfg.image_dim is None and image_context is not None:
            raise ValueError("image_context given, but this model has no image cross-attention (cfg.image_dim=None); "
                             "only Wan2.1-I2V takes CLIP image tokens")
        if self.cfg.image_dim is not None and (
            image_context is None or image_context.ndim != 3 or image_context.shape[0] != batch
            or image_context.shape[2] != self.cfg.image_dim
        ):
            got = None if image_context is None else tuple(image_context.shape)
            raise ValueError(f"this Wan2.1-I2V model needs image_context ({batch}, L_img, {self.cfg.image_dim}) "
                             f"(CLIP ViT-H/14 penultimate hidden states, L_img=257); got {got}")

        x = self.patch_embedding(latents).flatten(2).transpose(1, 2)  # (B, D, T', H', W') -> (B, L, D)
        cos, sin = self.rope_tables(grid)  # (L, Dh/2)
        temb, tmod = self.condition_embedder.embed_time(t)  # (B[, L], D), (B[, L], 6, D)
        context = self.condition_embedder.embed_text(context)  # (B, L_txt, D)
        if self.cfg.image_dim is not None:
            image_context = self.condition_embedder.embed_image(image_context)  # (B, L_img, D)

        # Reorder tokens once per forward into the attention's order (VSA tiles), not in every layer.
        order = getattr(attn_meta, "token_order", None)
        if order is not None:
            if order.numel() != num_tokens:
                raise ValueError(
                    f"attn_meta was built for {order.numel()} tokens but the latents give grid {grid} = "
                    f"{num_tokens} tokens; build the metadata from model.token_grid(latents.shape)"
                )
            x, cos, sin = x[:, order], cos[order], sin[order]
            if t.ndim == 2:
                temb, tmod = temb[:, order], tmod[:, order]

        x, cos, sin, tmod = self.token_shard(x, cos, sin, tmod)
        # One row-major layout into the blocks: the plain, reordered and SP-sharded x arrive with different strides,
        # and every stride pattern is one more torch.compile graph of the block (recompile limit: parallel/compile.py).
        # Not `contiguous()`: it keeps the arbitrary stride of a size-1 batch dim, which dynamo also guards on.
        dense = tuple(math.prod(x.shape[i + 1:]) for i in range(x.ndim))
        if x.stride() != dense:
            x = x.clone(memory_format=torch.contiguous_format)
        for block in self.blocks:
            # T2V / TI2V blocks get the exact call they always got (compiled graphs and wrappers unchanged).
            if image_context is None:
                x = block(x, context, tmod, cos, sin, attn_meta)
            else:
                x = block(x, context, tmod, cos, sin, attn_meta, image_context)
        x = self.token_gather(x)

        # Output head: (B, 1 or L, 2, D) shift/scale, in fp32.
        head_mod = self.scale_shift_table.unsqueeze(0) + (temb.unsqueeze(-2) if t.ndim == 2 else temb[:, None, None])
        shift, scale = head_mod.float().unbind(2)
        x = (F.layer_norm(x.float(), (x.shape[-1],), eps=self.cfg.eps) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)  # (B, L, C_out * pt * ph * pw)
        if order is not None:
            x = x[:, attn_meta.token_restore]

        # Unpatchify: (B, L, C*pt*ph*pw) -> (B, T', H', W', pt, ph, pw, C) -> (B, C, T, H, W).
        (nt, nh, nw), (pt, ph, pw) = grid, self.cfg.patch_size
        x = x.reshape(batch, nt, nh, nw, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(batch, -1, nt * pt, nh * ph, nw * pw)


def config_with(cfg: WanConfig, **changes: Any) -> WanConfig:
    """A copy of a preset with some fields changed; names the bad field on a typo."""
    valid = {f.name for f in fields(WanConfig)}
    unknown = sorted(set(changes) - valid)
    if unknown:
        raise ValueError(f"unknown WanConfig field(s) {unknown}; valid: {sorted(valid)}")
    return replace(cfg, **changes)
