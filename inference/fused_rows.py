"""Fused per-token row kernels for Wan DiT inference: one Triton program per token row, reading it once.

Why: torch.compile's inductor kernels for the DiT blocks' row operations run at ~1-1.5 TB/s on an H100, well below
its memory bandwidth. Measured per block, Wan2.1-1.3B at 480p (L = 32760 tokens, dim 1536, 12 heads of 128), each
block compiled:
  - norm1 / norm3, `F.layer_norm(x.float()) * (1 + scale) + shift`, and norm2 (affine, no modulation): 0.16-0.18 ms
    each in bf16 (ideal ~0.07); with fp8 linears inductor fuses `Float8Linear`'s row amax + e4m3 quantization into
    them: 0.16-0.25 ms each;
  - q/k RMSNorm (across heads) + RoPE + cast: 0.40 ms for q and k together (ideal ~0.14);
  - the row quantization of the attention outputs before self- and cross-attention `to_out` (fp8): ~0.1 ms each.

What is fused (each a `torch.library` custom op: the Triton kernel on CUDA, the same math in torch elsewhere):
  `layer_norm_modulate`: LayerNorm in fp32 (+ affine) (+ modulation), rounded to x's dtype as the block rounds it,
      and, for fp8 linears, the e4m3 row quantization of those rows: one quantization shared by the linears the
      norm feeds (self-attention q/k/v/gate, cross-attention q, FFN fc1), passed as `QuantizedRows`;
  `qk_norm_rope`: nn.RMSNorm of q and of k over the whole dim, then RoPE on interleaved pairs;
  `quantize_rows_op`: row amax + e4m3 quantization of the attention outputs for fp8 `to_out`s.
The FFN's GELU + fc2 quantization is `inference.fp8.gelu_quant_rows`.

Applied from outside: `enable_fused_rows(model)` replaces each `WanBlock` by a `FusedWanBlock` that shares its
parameters and submodules (no copies, the same state-dict keys) and adds the fused forward; models/wan.py knows nothing
of it. Use (inference only; the ops have no backward), or let `inference.prepare_for_inference` do all of it:
    model = WanModel(cfg).to(device, torch.bfloat16).eval().requires_grad_(False)  # weights loaded
    quantize_linears_fp8(model)  # optional (inference/fp8.py); before or after enable_fused_rows
    enable_fused_rows(model)
    apply_compile(model)  # optional (parallel/compile.py), last
The kernels serve one sample with one timestep (x (1, L, D), tmod (1, 6, D)), the few-step student's case; other
batches (B > 1, per-token timesteps) take the plain `WanBlock.forward`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from inference.fp8 import E4M3_MAX, Float8Linear, QuantizedRows, quantize_rows, row_scales
from models.wan import CrossAttention, SelfAttention, WanBlock, apply_rope


def _num_warps(block: int, per_thread: int) -> int:
    """Warps for one row of `block` elements, `per_thread` of them per thread (at most 16 warps). H100 sweep at dim
    1536 (M = 32760, 1-16 warps): LayerNorm 16 per thread (4 warps, 74 us), LayerNorm + quantize 8 (8 warps, 132 us),
    row quantization 16 (73 us), q/k RMSNorm + RoPE 32 (2 warps, 155 us); 16 warps cost up to 1.7x."""
    return min(16, max(1, block // (32 * per_thread)))


@triton.jit
def _quantize_row(y, YQ, SCALE, row, cols, ok, D, E4M3_MAX: tl.constexpr):
    """Store row y (fp32, 0 past D) as e4m3 with scale max(amax, 1e-12) / 448, as inference/fp8.py quantizes.
    Round-to-nearest divisions: torch's `/` is, and the scales then equal `row_scales` exactly."""
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(y), 0), 1e-12), E4M3_MAX)
    q = tl.div_rn(y, tl.broadcast_to(scale, y.shape))
    q = tl.minimum(tl.maximum(q, -E4M3_MAX), E4M3_MAX)
    tl.store(YQ + row * D + cols, q.to(YQ.dtype.element_ty), mask=ok)
    tl.store(SCALE + row, scale)


# ---- LayerNorm + modulation (+ e4m3 quantization) ----

@triton.jit
def _layer_norm_modulate_kernel(X, Y, Y_SCALE, SCALE, SHIFT, W, B, D, stride_x, eps, BLOCK: tl.constexpr,
                                AFFINE: tl.constexpr, MODULATE: tl.constexpr, QUANTIZE: tl.constexpr,
                                E4M3_MAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    # Exact divisions for mean and (biased) variance: a constant row then normalizes to exactly 0, as in torch.
    xc = tl.where(ok, x - tl.div_rn(tl.sum(x, 0), D.to(tl.float32)), 0.0)
    y = xc * tl.math.rsqrt(tl.div_rn(tl.sum(xc * xc, 0), D.to(tl.float32)) + eps)
    if AFFINE:
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        y = y * w + tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    if MODULATE:
        y = y * (1.0 + tl.load(SCALE + cols, mask=ok, other=0.0)) + tl.load(SHIFT + cols, mask=ok, other=0.0)
    y = y.to(X.dtype.element_ty)  # the rows the linears see: the block's `.type_as(x)`
    if QUANTIZE:  # of the rounded rows: fp8 then equals the plain block followed by Float8Linear's quantization
        _quantize_row(y.to(tl.float32), Y, Y_SCALE, row, cols, ok, D, E4M3_MAX)
    else:
        tl.store(Y + row * D + cols, y, mask=ok)


def layer_norm_modulate_triton(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                               weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                               quantize: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The kernel on x's device (CUDA, or CPU tensors under TRITON_INTERPRET=1 in tests); see layer_norm_modulate."""
    D = x.shape[-1]
    rows = x.reshape(-1, D)  # (..., D) -> (M, D)
    M, block = rows.shape[0], triton.next_power_of_2(D)
    unused = rows  # the pointer arguments of disabled branches, never read
    y = torch.empty(M, D, device=x.device, dtype=torch.float8_e4m3fn if quantize else x.dtype)
    y_scale = torch.empty(M, 1, device=x.device, dtype=torch.float32) if quantize else unused
    _layer_norm_modulate_kernel[(M,)](
        rows, y, y_scale, unused if scale is None else scale.contiguous(),
        unused if shift is None else shift.contiguous(), unused if weight is None else weight.contiguous(),
        unused if bias is None else bias.contiguous(), D, rows.stride(0), eps, BLOCK=block,
        AFFINE=weight is not None, MODULATE=scale is not None, QUANTIZE=quantize, E4M3_MAX=E4M3_MAX,
        num_warps=_num_warps(block, 8 if quantize else 16))
    if quantize:
        return y.view(x.shape), y_scale.view(*x.shape[:-1], 1)
    return y.view(x.shape)


def layer_norm_modulate_torch(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                              weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """WanBlock's norm1/norm3 (`F.layer_norm(x.float()) * (1 + scale) + shift`) or norm2 (affine), in x's dtype."""
    y = F.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if scale is not None:
        y = y * (1 + scale) + shift
    return y.type_as(x)


@torch.library.custom_op("sparse_distill::layer_norm_modulate", mutates_args=())
def _layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                         weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    if x.is_cuda:
        return layer_norm_modulate_triton(x, scale, shift, weight, bias, eps, quantize=False)
    return layer_norm_modulate_torch(x, scale, shift, weight, bias, eps)


@_layer_norm_modulate.register_fake
def _(x, scale, shift, weight, bias, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("sparse_distill::layer_norm_modulate_quant", mutates_args=())
def _layer_norm_modulate_quant(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                               weight: torch.Tensor | None, bias: torch.Tensor | None,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda:
        return layer_norm_modulate_triton(x, scale, shift, weight, bias, eps, quantize=True)
    return quantize_rows_torch(layer_norm_modulate_torch(x, scale, shift, weight, bias, eps))


@_layer_norm_modulate_quant.register_fake
def _(x, scale, shift, weight, bias, eps):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                        weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                        quantize: bool) -> torch.Tensor | QuantizedRows:
    """x (..., D) -> LayerNorm(x in fp32) [* weight + bias] [* (1 + scale) + shift] in x's dtype, (..., D).

    scale, shift: fp32 (D,) or None (norm2); weight, bias: (D,) or None (norm1, norm3). quantize: return those rows
    quantized row-wise to e4m3 for fp8 linears, as `QuantizedRows` (data (..., D), scale (..., 1)).
    """
    if quantize:
        return QuantizedRows(*_layer_norm_modulate_quant(x, scale, shift, weight, bias, eps), x.dtype)
    return _layer_norm_modulate(x, scale, shift, weight, bias, eps)


# ---- q/k RMSNorm + RoPE ----

@triton.jit
def _rms_norm_rope_row(X, Y, W, COS, SIN, row, tok, D, stride_x, eps, BLOCK: tl.constexpr, HALF_DH: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    # nn.RMSNorm in fp32, weight included, rounded once to x's dtype (which apply_rope then upcasts).
    n = x * tl.math.rsqrt(tl.div_rn(tl.sum(x * x, 0), D.to(tl.float32)) + eps) * w
    n = n.to(Y.dtype.element_ty).to(tl.float32)
    x1, x2 = tl.split(tl.reshape(n, (BLOCK // 2, 2)))  # channels 2j, 2j+1 of the row's pairs
    pairs = tl.arange(0, BLOCK // 2)
    angle = tok * HALF_DH + pairs % HALF_DH  # (L, Dh/2) table entry of each pair: same pair index in every head
    cos = tl.load(COS + angle, mask=pairs < D // 2, other=0.0)
    sin = tl.load(SIN + angle, mask=pairs < D // 2, other=0.0)
    out = tl.reshape(tl.join(x1 * cos - x2 * sin, x1 * sin + x2 * cos), (BLOCK,))
    tl.store(Y + row * D + cols, out.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _qk_norm_rope_kernel(Q, K, QO, KO, WQ, WK, COS, SIN, L, D, stride_q, stride_k, eps, BLOCK: tl.constexpr,
                         HALF_DH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # grid (M, 2): q rows, then k rows
    if tl.program_id(1) == 0:
        _rms_norm_rope_row(Q, QO, WQ, COS, SIN, row, row % L, D, stride_q, eps, BLOCK, HALF_DH)
    else:
        _rms_norm_rope_row(K, KO, WK, COS, SIN, row, row % L, D, stride_k, eps, BLOCK, HALF_DH)


def qk_norm_rope_triton(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
                        eps: float, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on q's device (CUDA, or CPU tensors under TRITON_INTERPRET=1 in tests); see qk_norm_rope."""
    D = q.shape[-1]
    q_rows, k_rows = q.reshape(-1, D), k.reshape(-1, D)  # (B, L, D) -> (M, D)
    q_out, k_out = torch.empty_like(q_rows), torch.empty_like(k_rows)
    block = triton.next_power_of_2(D)
    _qk_norm_rope_kernel[(q_rows.shape[0], 2)](
        q_rows, k_rows, q_out, k_out, weight_q.contiguous(), weight_k.contiguous(), cos.contiguous(),
        sin.contiguous(), cos.shape[0], D, q_rows.stride(0), k_rows.stride(0), eps, BLOCK=block,
        HALF_DH=cos.shape[1], num_warps=_num_warps(block, 32))
    return q_out.view(q.shape), k_out.view(k.shape)


def qk_norm_rope_torch(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
                       eps: float, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SelfAttention's `apply_rope(norm_q(q), cos, sin)` and the same for k, in q's dtype."""
    head_dim, out = 2 * cos.shape[1], []
    for x, weight in ((q, weight_q), (k, weight_k)):
        x = F.rms_norm(x, (x.shape[-1],), weight, eps).unflatten(-1, (-1, head_dim))  # (B, L, H, Dh)
        out.append(apply_rope(x, cos, sin).flatten(-2))  # (B, L, D)
    return out[0], out[1]


@torch.library.custom_op("sparse_distill::qk_norm_rope", mutates_args=())
def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor, eps: float,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, L, D) (to_q / to_k outputs) -> RMSNorm over D with weight_q / weight_k (D,), then RoPE of each
    head's interleaved channel pairs with cos, sin (L, Dh/2) fp32; in q's dtype."""
    if q.is_cuda:
        return qk_norm_rope_triton(q, k, weight_q, weight_k, eps, cos, sin)
    return qk_norm_rope_torch(q, k, weight_q, weight_k, eps, cos, sin)


@qk_norm_rope.register_fake
def _(q, k, weight_q, weight_k, eps, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape)


# ---- row quantization ----

@triton.jit
def _quantize_rows_kernel(X, XQ, SCALE, D, stride_x, BLOCK: tl.constexpr, E4M3_MAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    _quantize_row(x, XQ, SCALE, row, cols, ok, D, E4M3_MAX)


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on x's device (CUDA, or CPU tensors under TRITON_INTERPRET=1 in tests); see quantize_rows_op."""
    D = x.shape[-1]
    rows = x.reshape(-1, D)  # (..., D) -> (M, D)
    xq = torch.empty(rows.shape, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows.shape[0], 1, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(D)
    _quantize_rows_kernel[(rows.shape[0],)](rows, xq, scale, D, rows.stride(0), BLOCK=block, E4M3_MAX=E4M3_MAX,
                                            num_warps=_num_warps(block, 16))
    return xq.view(x.shape), scale.view(*x.shape[:-1], 1)


def quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float8Linear's activation quantization (inference/fp8.py), keeping x's leading dims."""
    rows = x.reshape(-1, x.shape[-1]).float()  # (..., D) -> (M, D)
    scale = row_scales(rows)
    return quantize_rows(rows, scale).view(x.shape), scale.view(*x.shape[:-1], 1)


@torch.library.custom_op("sparse_distill::quantize_rows", mutates_args=())
def quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> e4m3 (..., D) and fp32 row scales (..., 1), as Float8Linear quantizes its input."""
    if x.is_cuda:
        return quantize_rows_triton(x)
    return quantize_rows_torch(x)


@quantize_rows_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)


# ---- the blocks' fast path ----

def rows_for(linear: nn.Module, x: torch.Tensor) -> torch.Tensor | QuantizedRows:
    """x as `linear` takes it: quantized by one kernel for an fp8 linear, else unchanged."""
    if isinstance(linear, Float8Linear):
        return QuantizedRows(*quantize_rows_op(x), x.dtype)
    return x


def self_attention_fused(attn: SelfAttention, u: torch.Tensor | QuantizedRows, cos: torch.Tensor, sin: torch.Tensor,
                         attn_meta: Any) -> torch.Tensor:
    """`SelfAttention.forward` through the q/k RMSNorm + RoPE kernel: u (B, L, D), or quantized once for fp8 linears."""
    q, k = qk_norm_rope(attn.to_q(u), attn.to_k(u), attn.norm_q.weight, attn.norm_k.weight, attn.norm_q.eps, cos, sin)
    q, k, v = (y.unflatten(-1, (attn.num_heads, -1)) for y in (q, k, attn.to_v(u)))  # (B, L, H, Dh)
    gate = None
    if attn.to_gate_compress is not None and attn_meta is not None:
        gate = attn.to_gate_compress(u).unflatten(-1, (attn.num_heads, -1))  # (B, L, H, Dh)
    out = attn.attn_fn(q, k, v, meta=attn_meta, gate=gate).flatten(2)  # (B, L, H, Dh) -> (B, L, D)
    return attn.to_out(rows_for(attn.to_out, out))


def cross_attention_fused(attn: CrossAttention, u: torch.Tensor | QuantizedRows, context: torch.Tensor) -> torch.Tensor:
    """`CrossAttention.forward` taking u quantized for an fp8 to_q; an fp8 to_out's input is quantized in one kernel."""
    q = attn.norm_q(attn.to_q(u)).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # (B, H, L, Dh)
    k = attn.norm_k(attn.to_k(context)).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # (B, H, L_txt, Dh)
    v = attn.to_v(context).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, H, L, Dh) -> (B, L, D)
    return attn.to_out(rows_for(attn.to_out, out))


class FusedWanBlock(WanBlock):
    """A `WanBlock` whose one-sample, one-timestep forward runs the fused row kernels; built from a plain block whose
    parameters and submodules it shares (no copies: same objects, same state-dict keys).

    Each LayerNorm's rows go to their linears quantized once when those are fp8 (`quantize_linears_fp8`, before or
    after this swap: the linears are looked at on each call). Batches, per-token timesteps (TI2V) and image tokens
    (Wan2.1-I2V) take `WanBlock.forward`: the row kernels take one (D,) shift/scale and text-only cross-attention.
    """

    def __init__(self, block: WanBlock) -> None:
        nn.Module.__init__(self)  # not WanBlock.__init__: it would allocate new parameters
        self.eps = block.eps
        self.attn1, self.norm2, self.attn2, self.ffn = block.attn1, block.norm2, block.attn2, block.ffn
        self.scale_shift_table = block.scale_shift_table

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D)
        context: torch.Tensor,  # (B, L_txt, D)
        tmod: torch.Tensor,  # (B, 6, D) or per-token (B, L, 6, D)
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_meta: Any = None,
        image_context: torch.Tensor | None = None,  # Wan2.1-I2V's image tokens: the plain block's cross-attention
    ) -> torch.Tensor:
        if x.shape[0] != 1 or tmod.ndim != 3 or image_context is not None:
            return super().forward(x, context, tmod, cos, sin, attn_meta, image_context)
        mod = (self.scale_shift_table + tmod.float())[0]  # (1, 6, D) -> (6, D), fp32 as in WanBlock.forward
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(0)  # six (D,)

        u = layer_norm_modulate(x, scale1, shift1, None, None, self.eps, isinstance(self.attn1.to_q, Float8Linear))
        x = (x.float() + self_attention_fused(self.attn1, u, cos, sin, attn_meta) * gate1).type_as(x)

        if self.norm2 is not None:
            u = layer_norm_modulate(x, None, None, self.norm2.weight, self.norm2.bias, self.eps,
                                    isinstance(self.attn2.to_q, Float8Linear))
        else:
            u = rows_for(self.attn2.to_q, x)
        x = x + cross_attention_fused(self.attn2, u, context)

        u = layer_norm_modulate(x, scale2, shift2, None, None, self.eps, isinstance(self.ffn.fc1, Float8Linear))
        return (x.float() + self.ffn(u).float() * gate2).type_as(x)


def enable_fused_rows(model: nn.Module) -> int:
    """Replace every `model.blocks[i]` (a `models.wan.WanModel`'s `WanBlock`) by its `FusedWanBlock`, in place;
    returns how many blocks were swapped (0 when already done).

    Inference only: raises if a parameter requires grad. Works with or without `quantize_linears_fp8`, applied
    before or after; compile afterwards (a compiled block swapped out would lose its compilation). On CPU the ops run
    their torch math, the same as the plain blocks.
    """
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise RuntimeError(
            f"enable_fused_rows is for inference: its kernels have no backward, but {len(trainable)} parameters "
            f"require grad (e.g. {trainable[0]!r}); call model.requires_grad_(False) first")
    swapped = 0
    for i, block in enumerate(model.blocks):
        if not isinstance(block, FusedWanBlock):
            model.blocks[i] = FusedWanBlock(block)
            swapped += 1
    return swapped
