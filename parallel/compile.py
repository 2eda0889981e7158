"""`torch.compile` per transformer block (torchtitan's granularity: one graph reused by every block)."""

from __future__ import annotations

import torch
from torch import nn

# Graphs of one block's forward a sparse-distill run needs: {student VSA, critic and teacher dense} × {grad, no grad}
# × {batch B, 2B (teacher cond + uncond)} × {AC forward, AC recompute}, plus validation. Past the limit dynamo falls
# back to eager for that call, and a selective-AC recompute in eager of a compiled forward fails ("addmm encountered
# during backward, but not found in storage", seen at torch 2.11's default of 8 on the 1.3B recipe).
RECOMPILE_LIMIT = 64


def apply_compile(model: nn.Module) -> None:
    """Compile every `model.blocks[i]` in place (module names and state-dict keys are unchanged).

    A block wrapped for activation checkpointing has its *inner* module compiled, so the checkpoint stays eager
    around a compiled forward: compiling the wrapper itself (torch.utils.checkpoint traced into the graph) gave
    wrong gradients with inductor on CPU under torch 2.13 (17 % relative error on the tiny model; aot_eager and
    the inner-module order agree with eager to 1e-6). fullgraph=False: the Ulysses all-to-alls (autograd
    Functions around c10d collectives) break the graph.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in model.blocks:
        getattr(block, "_checkpoint_wrapped_module", block).compile(fullgraph=False)
