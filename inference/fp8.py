"""Opt-in FP8 (e4m3) linear layers for inference: `quantize_linears_fp8(model)` swaps the DiT blocks' `nn.Linear`s.

Why: H100 FP8 tensor cores run about twice the bf16 GEMM throughput, and the linear layers are about half of a 14B
forward. Only the blocks are quantized; the embedders, the patch embedding and `proj_out` stay in high precision
(tiny, and closest to the model's inputs and outputs).

Scaling, row-wise (one fp32 scale per row, `torch._scaled_mm`'s row-wise mode); 448 is e4m3's largest finite value:
  weight (out, in): quantized once, scale_n = amax(|w_n|) / 448 per output row (an all-zero row gets scale 1);
  x (M, in):        quantized every call, scale_m = amax(|x_m|) / 448 per token, so an outlier token cannot push
                    the other tokens down into e4m3's subnormals;
  y = (x_q * scale_a) @ (w_q * scale_b).T + bias, accumulated in fp32 and rounded once to x's dtype.
This changes numerics: outputs differ from the bf16 model by FP8 rounding (about 4 % relative error per layer on
Gaussian inputs), which is why it is opt-in (`prepare_for_inference(model, fp8=True)`, `--fp8` in tools/sample.py and
benchmarks/bench_inference.py).

A `Float8Linear` also takes rows that the kernel producing them already quantized (`QuantizedRows`): with
`inference.fused_rows.enable_fused_rows` each LayerNorm quantizes its output once for all the linears it feeds.
The model file knows nothing of this: `quantize_linears_fp8` swaps modules from outside, as torchtitan's float8
converter does (torchtitan/components/quantization/float8.py).

Inference only: the weights are buffers, and `_scaled_mm` has no backward. Every feature count must be a multiple
of 16 (`_scaled_mm`'s requirement); the token count is free.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import nn

from models.wan import FeedForward

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# Hopper FP8 MMAs accumulate in reduced precision; without fast accumulation cuBLAS promotes partial sums to fp32
# every few K blocks. Skipping that (as inference FP8 stacks do) is measured in README's Performance section.
FAST_ACCUM = True
GELU_C = math.sqrt(2.0 / math.pi)  # tanh-approximation GELU, as F.gelu(approximate="tanh")


def fp8_device_problem(device: str | torch.device) -> str | None:
    """Why FP8 linears cannot run on `device`, or None. A CUDA GPU needs FP8 tensor cores (compute capability 8.9+);
    the CPU runs the same row-wise `_scaled_mm` math (slowly: tests)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return (f"fp8 (--fp8) needs FP8 tensor cores (compute capability 8.9+: L4, L40, H100); "
                f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}")
    return None


def quantize_rows(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (R, C) / scale (R, 1) -> e4m3. Clamped: x/scale can land a rounding step past 448, and the cast to e4m3
    is not guaranteed to saturate on every backend (it does on CPU, torch 2.13)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """(M, C) -> (M, 1) fp32 e4m3 scales, amax / 448 per row (a zero row gets a tiny scale and stays 0)."""
    return x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX


@triton.jit
def _gelu_quant_rows_kernel(X, XQ, SCALE, C, stride_x, BLOCK: tl.constexpr, GELU_C: tl.constexpr,
                            E4M3_MAX: tl.constexpr):
    """One row: tanh-GELU, its amax, e4m3 quantization, all from one read of the row held in registers."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < C
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    # The kernel is bound by its arithmetic, not its bytes (H100: 0.54 ms per 1.3B layer at 480p with a sigmoid and a
    # division per element): one MUFU tanh (max rel. error ~2^-11, far below e4m3's 2^-4) and a multiply instead.
    z = GELU_C * (x + 0.044715 * x * x * x)
    tanh_z = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=tl.float32, is_pure=True,
                                       pack=1)
    y = 0.5 * x * (1.0 + tanh_z)
    amax = tl.maximum(tl.max(tl.abs(y), 0), 1e-12)
    scale = amax / E4M3_MAX
    q = tl.minimum(tl.maximum(y * (E4M3_MAX / amax), -E4M3_MAX), E4M3_MAX)
    tl.store(XQ + row * C + cols, q.to(XQ.dtype.element_ty), mask=ok)
    tl.store(SCALE + row, scale)


@torch.library.custom_op("sparse_distill::gelu_quant_rows", mutates_args=())
def gelu_quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) -> tanh-GELU(x) as e4m3 (M, C) and its (M, 1) fp32 row scales.

    On CUDA one Triton kernel per row: torch.compile's fusion of GELU + row amax + quantization reads the FFN's
    widest activation twice and computes GELU twice (1.09 ms per 1.3B layer at 480p on an H100, ~3x its memory
    time; README, Performance). Elsewhere the same math in torch.
    """
    if x.is_cuda:  # (not under TRITON_INTERPRET on CPU: the interpreter's e4m3 cast does not round to nearest)
        M, C = x.shape
        xq = torch.empty(M, C, device=x.device, dtype=torch.float8_e4m3fn)
        scale = torch.empty(M, 1, device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(C)
        _gelu_quant_rows_kernel[(M,)](x, xq, scale, C, x.stride(0), BLOCK=block, GELU_C=GELU_C, E4M3_MAX=E4M3_MAX,
                                      num_warps=min(16, max(4, block // 2048)))  # H100: 8 warps 336 us, 16: 378
        return xq, scale
    y = torch.nn.functional.gelu(x.float(), approximate="tanh")
    scale = row_scales(y)
    return quantize_rows(y, scale), scale


@gelu_quant_rows.register_fake
def _(x):
    return torch.empty_like(x, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[0], 1, dtype=torch.float32)


class QuantizedRows(NamedTuple):
    """Activations already quantized row-wise (`row_scales`, `quantize_rows`) by the kernel that produced them."""

    data: torch.Tensor  # (..., C) float8_e4m3fn
    scale: torch.Tensor  # (..., 1) fp32, amax / 448 per row
    dtype: torch.dtype  # of the rows before quantization, and of the linear's output


class Float8Linear(nn.Module):
    """`nn.Linear` with an e4m3 weight and dynamic per-token e4m3 activations; build with `from_linear`.

    Takes x (..., in) in high precision, quantized here, or `QuantizedRows` (..., in), used as they are.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # (out, in) row-major: `weight.t()` is then the column-major second operand _scaled_mm wants, with no copy.
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)  # (1, out) fp32, the layout of scale_b
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Float8Linear":
        """Quantize a (loaded, placed) `nn.Linear`; the bias keeps its dtype."""
        out_features, in_features = linear.weight.shape
        if in_features % 16 or out_features % 16:
            raise ValueError(
                f"Float8Linear: nn.Linear(in_features={in_features}, out_features={out_features}) has a feature count "
                "that is not a multiple of 16, which torch._scaled_mm requires; keep this layer in high precision"
            )
        w = linear.weight.float()
        amax = w.abs().amax(dim=1, keepdim=True)  # (out, 1)
        scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(quantize_rows(w, scale).contiguous(), scale.t().contiguous(), bias)

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        if isinstance(x, QuantizedRows):
            y = self.matmul_quantized(x.data.reshape(-1, self.in_features), x.scale.reshape(-1, 1), x.dtype)
            return y.reshape(*x.data.shape[:-1], self.out_features)
        # One fp32 copy feeds both the amax and the quantization (amax of the bf16 x inside the same fused kernel
        # hits an inductor C++ codegen error on CPU, torch 2.13).
        xf = x.reshape(-1, self.in_features).float()  # (..., in) -> (M, in)
        scale = row_scales(xf)
        y = self.matmul_quantized(quantize_rows(xf, scale), scale, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def matmul_quantized(self, xq: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """(M, in) e4m3 activations with their (M, 1) fp32 row scales -> (M, out) in out_dtype, + bias."""
        # CUDA's _scaled_mm takes no bias with an fp32 output; add it afterwards there (fp32 is the CPU test path).
        fused_bias = self.bias if out_dtype != torch.float32 else None
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=fused_bias,
                             out_dtype=out_dtype, use_fast_accum=FAST_ACCUM)  # (M, out)
        if self.bias is not None and fused_bias is None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Float8FeedForward(nn.Module):
    """A block's FFN with e4m3 fc1 and fc2; the GELU between them is fused with fc2's input quantization."""

    def __init__(self, fc1: Float8Linear, fc2: Float8Linear) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        h = self.fc1(x)  # (..., ffn_dim) in x's dtype
        y = self.fc2.matmul_quantized(*gelu_quant_rows(h.reshape(-1, self.fc1.out_features)), h.dtype)  # (M, dim)
        return y.reshape(*h.shape[:-1], self.fc2.out_features)


@torch.no_grad()
def quantize_linears_fp8(model: nn.Module) -> int:
    """Replace, in place, the `nn.Linear`s of every `model.blocks[i]` (a `models.wan.WanModel`) with `Float8Linear`.

    That is self-attention to_q/to_k/to_v/to_out/to_gate_compress, cross-attention to_q/to_k/to_v/to_out and FFN
    fc1/fc2. Call after the weights are loaded and the model is on its device and dtype, and before
    `torch.compile`. Layers whose feature counts are not multiples of 16 stay as they are. Returns how many were
    swapped.
    """
    # A Linear subclass carries more than its weight (models/lora.py LoRALinear: unmerged adapters); swapping it
    # would silently drop that, so refuse before touching anything.
    extended = sorted({f"{type(m).__name__} ({name})" for name, m in model.blocks.named_modules()
                       if isinstance(m, nn.Linear) and type(m) is not nn.Linear and not isinstance(m, Float8Linear)})
    if extended:
        raise ValueError(f"FP8 linears: {len(extended)} block linears are not plain nn.Linear, e.g. {extended[0]}: "
                         "quantize a plain WanModel with the adapter merged into its weights (models/lora.py "
                         "merged_state_dict, or inference/lora.py load_lora / VideoPipeline(lora=...))")
    swapped = 0
    for block in model.blocks:
        ffn = getattr(block, "ffn", None)
        if isinstance(ffn, FeedForward) and all(_fits(fc) for fc in (ffn.fc1, ffn.fc2)):
            block.ffn = Float8FeedForward(Float8Linear.from_linear(ffn.fc1), Float8Linear.from_linear(ffn.fc2))
            swapped += 2
        for name, module in list(block.named_modules()):
            if not isinstance(module, nn.Linear) or not _fits(module):
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name), child, Float8Linear.from_linear(module))
            swapped += 1
    return swapped


def _fits(linear: nn.Linear) -> bool:
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0
