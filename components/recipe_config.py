"""The TOML tables every Wan sparse-distill recipe shares unchanged (`recipes/wan*_sparse_distill.py`): attention,
video shape, optimiser, parallelism and LoRA. Each recipe keeps the tables it varies (model, dmd, data, run) and its
`RecipeConfig`; `components/config.py` resolves them all from the recipe's TOML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class AttnConfig:
    student: Literal["vsa", "sdpa"]  # student self-attention; the teacher is always dense
    # critic self-attention: "dense_gated" = dense + VSA's coarse branch through a trainable zero-initialised gate
    # (VSA at ρ = 0, as the released FastWan runs trained it), "dense" = plain SDPA
    critic: Literal["dense_gated", "dense"]
    sparsity: float  # VSA ρ: the fraction of kv tiles each query tile skips
    sparsity_ramp: list[float]  # [] = constant ρ; [start, step, interval]: ρ_k = min(start + step·⌊k/interval⌋, ρ)


@dataclass
class VideoConfig:
    num_frames: int  # pixel frames of a clip (training latents and validation samples)
    height: int
    width: int
    vae_stride: list[int]  # (T, H, W): latent T = (frames − 1)/stride_t + 1, H = height/stride_h, W likewise
    fps: int  # of the validation mp4s


@dataclass
class OptimConfig:
    lr: float  # student AdamW
    critic_lr: float
    betas: list[float]
    weight_decay: float
    grad_clip: float  # max global grad norm, per network
    scheduler: Literal["constant", "cosine_with_min_lr"]  # student LR schedule, stepped every (critic) step
    critic_scheduler: Literal["constant", "cosine_with_min_lr"]
    warmup_steps: int  # cosine_with_min_lr only
    min_lr_ratio: float  # cosine floor
    grad_accum: int  # micro-batches per update


@dataclass
class ParallelConfig:
    dp_replicate: int  # HSDP replicas; each shards over world / (dp_replicate · sp) ranks (= 1: pure replication)
    sp: int  # Ulysses sequence parallel size (divides the head count)
    mixed_precision: Literal["bf16", "fp32"]  # compute dtype; master weights and optimizer state stay fp32
    activation_checkpointing: Literal["none", "full", "selective", "attention"] = "full"
    compile: bool = False


@dataclass
class LoraConfig:
    rank: int  # 0 = full fine-tune (three networks); > 0: one frozen bf16 base shared by all three, and
    # student and critic adapters of this rank (models/lora.py); only the adapters train and are checkpointed
    alpha: float  # adapter scale alpha / rank
    targets: list[str]  # linears with adapters: "self_attn" (attn1 q/k/v/out), "cross_attn" (attn2), "ffn" (fc1/fc2)
    gate: Literal["lora", "full"]  # the VSA gate per adapter: low-rank (this rank) or a full (dim, dim) delta
