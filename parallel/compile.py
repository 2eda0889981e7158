"""`torch.compile` per transformer block (torchtitan's granularity: one graph reused by every block)."""

from __future__ import annotations

import torch
import torch._inductor.config
from torch import nn

# Inductor's "mix-order reduction" (on by default since torch 2.10, CUDA only) computes wrong gradients for Wan's
# modulation: the (B, 1, D) shift/scale/gate slices of `scale_shift_table + tmod` broadcast over the tokens, whose
# backward sums over all tokens (pytorch/pytorch#193061, "chained modulated LayerNorms with a shared scale/shift
# parameter"; the grad buffer region can even be left unwritten). Measured with scripts/check_speedups_gpu.py on an H100
# (torch 2.11.0+cu130, 2026-11-27, 1.3B at 4 layers, FSDP2 + bf16): eager grad rel. error 4.3e-3 (the bf16 floor),
# compiled 1.1e3 with the largest errors in condition_embedder.time_proj (the tmod gradient) and an inf
# scale_shift_table gradient in fp32; the forward was right. Trainable models are compiled with it off.
MIX_ORDER_REDUCTION_BUG = "pytorch/pytorch#193061"

# Graphs of one block's forward a sparse-distill run needs: {student VSA, critic and teacher dense} × {grad, no grad}
# × {batch B, 2B (teacher cond + uncond)} × {AC forward, AC recompute}, plus validation. Past the limit dynamo falls
# back to eager for that call, and a selective-AC recompute in eager of a compiled forward fails ("addmm encountered
# during backward, but not found in storage", seen at torch 2.11's default of 8 on the 1.3B recipe).
RECOMPILE_LIMIT = 64


def apply_compile(model: nn.Module, trainable: bool = False) -> None:
    """Compile every `model.blocks[i]` in place (module names and state-dict keys are unchanged).

    trainable: the model will be trained: inductor's mix-order reduction is switched off (process-wide, read when a
    graph compiles), see MIX_ORDER_REDUCTION_BUG above.

    A block wrapped for activation checkpointing has its *inner* module compiled, so the checkpoint stays eager
    around a compiled forward: compiling the wrapper itself (torch.utils.checkpoint traced into the graph) gave
    wrong gradients with inductor on CPU under torch 2.13 (17 % relative error on the tiny model; aot_eager and
    the inner-module order agree with eager to 1e-6). fullgraph=False: the Ulysses all-to-alls (autograd
    Functions around c10d collectives) break the graph.
    """
    if trainable:
        torch._inductor.config.triton.mix_order_reduction = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in model.blocks:
        getattr(block, "_checkpoint_wrapped_module", block).compile(fullgraph=False)
