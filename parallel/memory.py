"""Per-GPU memory plan of a DMD2 distillation step: every term explicit, in bytes, so it can be checked and adjusted.
The CLI is tools/plan_memory.py; tests/test_parallel_memory.py checks the activation terms against autograd.

What is counted (parallel/ as built: FSDP2 shards over S = dp_shard · sp ranks, replicates over dp_replicate):
- student and critic: fp32 master weights (4 B/param) and AdamW moments (8 B/param), sharded over S;
  gradients (fp32, 4 B/param, sharded) exist only for the network being stepped (zero_grad frees them);
- teacher: bf16 weights (2 B/param) sharded over S, no gradients, no optimizer (0 with `teacher_offload`); a
  two-expert teacher (Wan2.2-A14B) holds both experts, one running at a time;
- with `ema`: the recipes' fp32 EMA of the student's shards (kept on the GPU);
- FSDP buffers: bf16 unsharded weights of two blocks (current + prefetched) and of the root (embeddings and head,
  unsharded for the whole forward/backward), one block's unsharded bf16 gradient plus its fp32 reduce-scatter copy;
- activations with full AC: every block's bf16 input is saved; in backward one block is recomputed, so one block's
  saved tensors (BLOCK_SAVED below, per local token) plus a backward working set live at once;
- the head (after the SP gather, on the full sequence) and the Ulysses all-to-all buffers;
- the foreach AdamW step's temporary (one fp32 copy of the stepped network's sharded params).
With LoRA (`lora_rank` > 0, models/lora.py): one bf16 base (with the VSA gate) sharded over S instead of three
networks; student and critic adapters (every linear of a block, the gate low-rank) with fp32 weights, AdamW moments
and gradients; the FSDP buffers gather base + both adapters per block, the reduce-scatter moves adapter gradients
only; activations as above plus each LoRA linear's (tokens, rank) intermediate in the recomputed block.
Peak of a step = static + the largest of: backward start (all saved inputs), backward end (all gradients), optimizer
step. The student step is the larger one (VSA gate, larger network); both are printed.
Not counted: the CUDA context (~0.5 GiB, outside torch's allocator), allocator fragmentation (reserved − allocated,
usually 3–10 %), the VAE/text encoder (recipes precompute latents and text embeddings). The prediction is for
`torch.cuda.max_memory_allocated()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.wan import WAN_CONFIGS, WanBlock, WanConfig, WanModel, config_with
from parallel.mesh import check_parallel_sizes

GIB = 2**30
TEXT_LEN = 512  # UMT5 rows, zero-padded (DESIGN.md)

# Tensors autograd saves in one WanBlock forward under bf16 autocast, in bytes per local token, as
# (bytes per hidden channel D, bytes per FFN channel F). Read off models/wan.py WanBlock.forward; the per-token
# total is checked against saved-tensor hooks in tests/test_parallel_memory.py.
BLOCK_SAVED: dict[str, tuple[float, float]] = {
    "self-attn: LayerNorm input x.float() (fp32)": (4, 0),
    "self-attn: LayerNorm output, saved by (1 + scale) (fp32)": (4, 0),
    "self-attn: u, input of to_q/to_k/to_v (bf16)": (2, 0),
    "self-attn: q, k RMSNorm saved tensors": (0, 0),  # filled from RMS_NORM_SAVED × 2
    "self-attn: q, k, v for attention backward (bf16)": (6, 0),
    "self-attn: attention output, input of to_out (bf16)": (2, 0),
    "self-attn: to_out output, saved by gate1 (bf16)": (2, 0),
    "cross-attn: norm2 input x.float() (fp32)": (4, 0),
    "cross-attn: norm2 output, input of to_q (bf16)": (2, 0),
    "cross-attn: q RMSNorm saved tensors": (0, 0),  # RMS_NORM_SAVED × 1
    "cross-attn: q and attention output (bf16)": (4, 0),
    "ffn: LayerNorm input x.float() (fp32)": (4, 0),
    "ffn: LayerNorm output, saved by (1 + scale2) (fp32)": (4, 0),
    "ffn: u3, input of fc1 (bf16)": (2, 0),
    "ffn: fc1 output (GELU input) and GELU output (fc2 input) (bf16)": (0, 4),
    "ffn: fc2 output .float(), saved by gate2 (fp32)": (4, 0),
}
# RMSNorm over D under autocast: CUDA's fused kernel saves its bf16 input (+ a per-token rstd); the composite path
# (CPU, or mismatched dtypes) saves the fp32 upcast input and the fp32 normalised tensor.
RMS_NORM_SAVED = {"fused": 2, "composite": 8}
VSA_SAVED_D = 4  # VSA student: gate (bf16) and the per-token coarse output (bf16), both saved by gate * coarse
# Wan2.1-I2V's image cross-attention (257 CLIP tokens): its attention output and query as saved for backward, per
# channel, plus an fp32 LSE per head (measured with saved-tensor hooks, tests/test_i2v_memory.py).
I2V_CLIP_SAVED_D = 4
CLIP_TOKENS = 257  # CLIP ViT-H/14 at 224 px: 256 patches + CLS
# Backward working set of the recomputed block (estimate): the two FFN-hidden gradients (bf16) and a few
# D-wide gradients of the residual stream (fp32 and bf16 copies).
BACKWARD_WORKSET = (12, 4)
HEAD_SAVED_D = 10  # head on the full sequence: LayerNorm fp32 input (4) and output (4), proj_out bf16 input (2)
FORWARD_WORKSET = (24, 4)  # no-grad forward: live tensors of one block per token (fp32 norms, FFN hidden)


@dataclass(frozen=True)
class Recipe:
    model: str
    vae_stride: tuple[int, int, int]  # latent T, H, W compression of the recipe's VAE
    frames: int
    height: int
    width: int
    gpus: int
    sp: int
    dp_replicate: int
    student_attn: str  # "vsa" or "dense"
    teacher_experts: int = 1  # 2: Wan2.2-A14B's high- and low-noise teachers, both resident


# The meshes of FastVideo's slurm launchers (examples/distill/Wan2.1-T2V/Wan-Syn-Data-480P/*.slurm and the Wan2.2 ones);
# shapes are the training shapes.
RECIPES = {
    "wan21_1.3b": Recipe("wan21_1.3b", (4, 8, 8), 77, 448, 832, gpus=64, sp=1, dp_replicate=64, student_attn="vsa"),
    "wan21_14b": Recipe("wan21_14b", (4, 8, 8), 77, 448, 832, gpus=64, sp=4, dp_replicate=8, student_attn="vsa"),
    "wan22_ti2v_5b": Recipe("wan22_ti2v_5b", (4, 16, 16), 121, 704, 1280, gpus=64, sp=1, dp_replicate=64,
                            student_attn="dense"),
    # Not in FastVideo: the 14B mesh and training shape, the I2V models' inputs (36 channels, CLIP tokens for
    # Wan2.1-I2V) and, for Wan2.2-A14B, a two-expert teacher; one student and one critic, as in every recipe.
    "wan21_i2v_14b": Recipe("wan21_i2v_14b", (4, 8, 8), 77, 448, 832, gpus=64, sp=4, dp_replicate=8,
                            student_attn="vsa"),
    "wan22_t2v_a14b": Recipe("wan22_t2v_a14b", (4, 8, 8), 77, 448, 832, gpus=64, sp=4, dp_replicate=8,
                             student_attn="vsa", teacher_experts=2),
    "wan22_i2v_a14b": Recipe("wan22_i2v_a14b", (4, 8, 8), 77, 448, 832, gpus=64, sp=4, dp_replicate=8,
                             student_attn="vsa", teacher_experts=2),
}


def count_params(cfg: WanConfig) -> tuple[int, int]:
    """(whole model, one block) parameter counts, on the meta device."""
    with torch.device("meta"):
        model = WanModel(cfg)
        block = WanBlock(cfg, attn_fn=None)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in block.parameters())


def block_saved_per_token(cfg: WanConfig, rms_norm: str = "fused", vsa: bool = False) -> float:
    """Bytes autograd saves per local token in one block's forward (see BLOCK_SAVED)."""
    per_d = sum(d for d, _ in BLOCK_SAVED.values()) + 3 * RMS_NORM_SAVED[rms_norm] + (VSA_SAVED_D if vsa else 0)
    per_f = sum(f for _, f in BLOCK_SAVED.values())
    small = 2 * 4 * cfg.head_dim // 2 + 2 * 4 * cfg.num_heads  # RoPE cos/sin rows (fp32), attention LSE (fp32)
    if cfg.image_dim is not None:
        per_d += I2V_CLIP_SAVED_D
        small += 4 * cfg.num_heads  # the image attention's LSE
    return per_d * cfg.dim + per_f * cfg.ffn_dim + small


def tokens(recipe: Recipe, cfg: WanConfig) -> int:
    latent_t = (recipe.frames - 1) // recipe.vae_stride[0] + 1
    latent_h, latent_w = recipe.height // recipe.vae_stride[1], recipe.width // recipe.vae_stride[2]
    pt, ph, pw = cfg.patch_size
    return (latent_t // pt) * (latent_h // ph) * (latent_w // pw)


def lora_params(cfg: WanConfig, rank: int) -> tuple[int, int]:
    """(whole model, one block) parameters of ONE adapter on every block linear and the VSA gate (models/lora.py
    defaults: targets self_attn, cross_attn, ffn; gate "lora")."""
    d, f = cfg.dim, cfg.ffn_dim
    per_block = rank * (8 * 2 * d + (d + f) * 2 + 2 * d)  # 8 attention (d, d) linears, fc1/fc2, the gate
    return cfg.num_layers * per_block, per_block


def plan(
    recipe: Recipe, batch: int = 1, rms_norm: str = "fused", teacher_offload: bool = False, ema: bool = False,
    lora_rank: int = 0,
) -> dict:
    """Every term in bytes per GPU, and the peaks of the student and the critic step (`lora_rank` > 0: LoRA mode)."""
    base = WAN_CONFIGS[recipe.model]
    dp_shard = check_parallel_sizes(recipe.gpus, recipe.dp_replicate, recipe.sp, base.num_heads)
    shard = dp_shard * recipe.sp  # FSDP shard group size (parallel/mesh.py)
    vsa = recipe.student_attn == "vsa"
    student_cfg = config_with(base, vsa_gate=vsa)
    n_student, blk_student = count_params(student_cfg)
    n_dense, blk_dense = count_params(base)  # teacher and critic: dense, no gate
    length = tokens(recipe, base)
    context_len = TEXT_LEN + (CLIP_TOKENS if base.image_dim is not None else 0)  # cross-attention K/V rows
    local = batch * math.ceil(length / recipe.sp)  # tokens per rank inside the blocks
    dim, ffn = base.dim, base.ffn_dim

    if lora_rank > 0:
        return _plan_lora(recipe, batch, rms_norm, ema, lora_rank, dp_shard, shard, n_student, blk_student, local,
                          length, context_len, n_dense)
    static = {
        "student fp32 weights": 4 * n_student / shard,
        "student AdamW moments (2 × fp32)": 8 * n_student / shard,
        "critic fp32 weights": 4 * n_dense / shard,
        "critic AdamW moments (2 × fp32)": 8 * n_dense / shard,
        "teacher bf16 weights (× experts)": 0 if teacher_offload else 2 * n_dense * recipe.teacher_experts / shard,
        "student EMA (fp32, on the GPU; --ema)": 4 * n_student / shard if ema else 0,
    }

    def step(n: int, blk: int, vsa_net: bool, critic_step: bool) -> dict:
        layers = base.num_layers
        d = {
            "gradients (fp32, sharded)": 4 * n / shard,
            "FSDP: 2 unsharded bf16 blocks + bf16 root": 2 * (2 * blk + (n - layers * blk)),
            "FSDP: one block's bf16 grad + fp32 reduce-scatter copy": 6 * blk,
            "AC: saved bf16 input of every block": layers * local * dim * 2,
            "AC: shared block inputs (text K/V source, modulation)": batch * context_len * dim * 2,
            "one recomputed block's saved tensors": local * block_saved_per_token(base, rms_norm, vsa_net),
            "one block: cross-attn K/V over the text": batch * context_len * dim * (2 + 2 + RMS_NORM_SAVED[rms_norm]),
            "backward working set of that block": local * (BACKWARD_WORKSET[0] * dim + BACKWARD_WORKSET[1] * ffn),
            "head on the full sequence": batch * length * HEAD_SAVED_D * dim,
            "Ulysses all-to-all buffers (q, k, v[, gate] in and out)": (
                2 * (4 if vsa_net else 3) * local * dim * 2 if recipe.sp > 1 else 0
            ),
            "AdamW foreach temporary (fp32 copy)": 4 * n / shard,
            # student step: the teacher runs the conditional and negative prompts as one batch of 2B (CFG);
            # critic step: the student's no-grad rollout (batch B), before the critic's forward
            "no-grad forward working set": (1 if critic_step else 2) * local * (FORWARD_WORKSET[0] * dim
                                                                              + FORWARD_WORKSET[1] * ffn),
        }
        saved = d["AC: saved bf16 input of every block"] + d["AC: shared block inputs (text K/V source, modulation)"]
        saved += d["head on the full sequence"]
        block = sum(d[k] for k in ("one recomputed block's saved tensors", "one block: cross-attn K/V over the text",
                                   "backward working set of that block", "FSDP: 2 unsharded bf16 blocks + bf16 root",
                                   "FSDP: one block's bf16 grad + fp32 reduce-scatter copy",
                                   "Ulysses all-to-all buffers (q, k, v[, gate] in and out)"))
        grads = d["gradients (fp32, sharded)"]
        moments = {
            "backward start (all saved inputs, no grads yet)": saved + block,
            "backward end (all grads, last block)": grads + block,
            "optimizer step": grads + d["AdamW foreach temporary (fp32 copy)"],
            "no-grad forward (student: teacher CFG; critic: rollout)": (0 if critic_step else saved)
            + d["no-grad forward working set"] + 2 * (2 * blk + (n - layers * blk)),
        }
        return {"terms": d, "moments": moments}

    student = step(n_student, blk_student, vsa, critic_step=False)
    critic = step(n_dense, blk_dense, False, critic_step=True)
    static_total = sum(static.values())
    peaks = {
        "student step": static_total + max(student["moments"].values()),
        "critic step": static_total + max(critic["moments"].values()),
    }
    return {
        "recipe": recipe, "dp_shard": dp_shard, "shard": shard, "tokens": length, "local_tokens": local,
        "params": {"student": n_student, "teacher/critic": n_dense, "block": blk_dense},
        "static": static, "student": student, "critic": critic, "peaks": peaks,
    }


def _plan_lora(recipe: Recipe, batch: int, rms_norm: str, ema: bool, rank: int, dp_shard: int, shard: int,
               n_base: int, blk_base: int, local: int, length: int, context_len: int, n_dense: int) -> dict:
    """`plan` in LoRA mode: one frozen bf16 base (with the gate) + two adapters; the same activation terms."""
    base = WAN_CONFIGS[recipe.model]
    n_ad, blk_ad = lora_params(base, rank)
    vsa = recipe.student_attn == "vsa"
    layers, dim, ffn = base.num_layers, base.dim, base.ffn_dim
    root = n_base - layers * blk_base
    static = {
        "base bf16 weights (teacher = student = critic base)": 2 * n_base / shard,
        # a two-expert teacher's other expert: a second frozen bf16 base, used by the teacher alone
        "second expert's bf16 weights (two-expert teacher)": 2 * n_dense * (recipe.teacher_experts - 1) / shard,
        "student + critic adapters fp32 weights": 2 * 4 * n_ad / shard,
        "student + critic adapters AdamW moments (2 × fp32)": 2 * 8 * n_ad / shard,
        "student adapter EMA (fp32; --ema)": 4 * n_ad / shard if ema else 0,
    }

    def step(vsa_net: bool, critic_step: bool) -> dict:
        gathered = 2 * (2 * (blk_base + 2 * blk_ad) + root)
        d = {
            "adapter gradients (fp32, sharded)": 4 * n_ad / shard,
            "FSDP: 2 unsharded bf16 blocks (base + adapters) + bf16 root": gathered,
            "FSDP: one block's adapter bf16 grad + fp32 reduce-scatter copy": 6 * blk_ad,
            "AC: saved bf16 input of every block": layers * local * dim * 2,
            "AC: shared block inputs (text K/V source, modulation)": batch * context_len * dim * 2,
            "one recomputed block's saved tensors": local * block_saved_per_token(base, rms_norm, vsa_net),
            "one block: LoRA (tokens, rank) intermediates (11 linears, bf16)": local * 11 * rank * 2,
            "one block: cross-attn K/V over the text": batch * context_len * dim * (2 + 2 + RMS_NORM_SAVED[rms_norm]),
            "backward working set of that block": local * (BACKWARD_WORKSET[0] * dim + BACKWARD_WORKSET[1] * ffn),
            "head on the full sequence": batch * length * HEAD_SAVED_D * dim,
            "Ulysses all-to-all buffers (q, k, v[, gate] in and out)": (
                2 * (4 if vsa_net else 3) * local * dim * 2 if recipe.sp > 1 else 0
            ),
            "AdamW foreach temporary (fp32 copy of one adapter)": 4 * n_ad / shard,
            "no-grad forward working set": (1 if critic_step else 2) * local * (FORWARD_WORKSET[0] * dim
                                                                              + FORWARD_WORKSET[1] * ffn),
        }
        saved = d["AC: saved bf16 input of every block"] + d["AC: shared block inputs (text K/V source, modulation)"]
        saved += d["head on the full sequence"]
        block = sum(d[k] for k in (
            "one recomputed block's saved tensors", "one block: LoRA (tokens, rank) intermediates (11 linears, bf16)",
            "one block: cross-attn K/V over the text", "backward working set of that block",
            "FSDP: 2 unsharded bf16 blocks (base + adapters) + bf16 root",
            "FSDP: one block's adapter bf16 grad + fp32 reduce-scatter copy",
            "Ulysses all-to-all buffers (q, k, v[, gate] in and out)"))
        grads = d["adapter gradients (fp32, sharded)"]
        moments = {
            "backward start (all saved inputs, no grads yet)": saved + block,
            "backward end (all grads, last block)": grads + block,
            "optimizer step": grads + d["AdamW foreach temporary (fp32 copy of one adapter)"],
            "no-grad forward (student: teacher CFG; critic: rollout)": (0 if critic_step else saved)
            + d["no-grad forward working set"] + gathered,
        }
        return {"terms": d, "moments": moments}

    student, critic = step(vsa, critic_step=False), step(True, critic_step=True)  # the critic runs its gate
    static_total = sum(static.values())
    peaks = {
        "student step": static_total + max(student["moments"].values()),
        "critic step": static_total + max(critic["moments"].values()),
    }
    return {
        "recipe": recipe, "dp_shard": dp_shard, "shard": shard, "tokens": length, "local_tokens": local,
        "params": {"student": n_base, "teacher/critic": n_base, "block": blk_base, "adapter": n_ad},
        "static": static, "student": student, "critic": critic, "peaks": peaks, "lora_rank": rank,
    }
