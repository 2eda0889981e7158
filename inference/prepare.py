"""One setup for every inference caller (VideoPipeline, tools/sample.py, benchmarks): frozen, FP8, fused, compiled."""

from __future__ import annotations

from torch import nn

from inference.fp8 import quantize_linears_fp8
from inference.fused_rows import enable_fused_rows
from parallel.compile import apply_compile


def prepare_for_inference(model: nn.Module, *, fp8: bool = False, compile: bool = False,
                          fused_rows: bool = True) -> nn.Module:
    """Ready a loaded, placed `WanModel` for sampling, in place; returns it.

    In this order: eval + requires_grad_(False) (the kernels below have no backward); FP8 block linears
    (`quantize_linears_fp8`: after the weights are on their device and dtype); the fused row kernels for one-sample
    blocks (`enable_fused_rows`: swaps blocks, so before compile); per-block `torch.compile` last (one graph per shape
    and attention serves every block: seconds to compile, not minutes for the 14B).
    """
    model.eval().requires_grad_(False)
    if fp8:
        quantize_linears_fp8(model)
    if fused_rows:
        enable_fused_rows(model)
    if compile:
        apply_compile(model)
    return model
