"""`torch.compile` per transformer block (torchtitan's granularity: one graph reused by every block)."""

from __future__ import annotations

import os

import torch
from torch import nn

# Per-block compile of a *trainable* model on CUDA gave wrong gradients on an H100 (torch 2.11.0+cu130, 2026-11-26):
# `tools/check_speedups_gpu.py`, Wan-1.3B dense under FSDP2 + bf16, 12x28x52 latents: fp32-eager grad norm 1.2617,
# bf16 eager 1.2613 (rel. error 6.9e-3, the bf16 floor), compiled 6414 without AC, 1.2877 (0.20) with full AC,
# 13861 with selective AC; the forward loss was right in every case. The compiled fp32 tiny model without FSDP was
# right on the same GPU (tools/check_parallel_gpu.py), as is every compiled case on CPU. Until a run of that tool
# shows otherwise on your stack, trainable models stay eager on CUDA; compiling no-grad models (teacher, sampling)
# is unaffected. Setting this variable to 1 lifts the block (the check tools set it to measure).
ALLOW_TRAIN_COMPILE_ENV = "SPARSE_DISTILL_ALLOW_TRAIN_COMPILE"

# Graphs of one block's forward a sparse-distill run needs: {student VSA, critic and teacher dense} × {grad, no grad}
# × {batch B, 2B (teacher cond + uncond)} × {AC forward, AC recompute}, plus validation. Past the limit dynamo falls
# back to eager for that call, and a selective-AC recompute in eager of a compiled forward fails ("addmm encountered
# during backward, but not found in storage", seen at torch 2.11's default of 8 on the 1.3B recipe).
RECOMPILE_LIMIT = 64


def apply_compile(model: nn.Module, trainable: bool = False) -> None:
    """Compile every `model.blocks[i]` in place (module names and state-dict keys are unchanged).

    trainable: the model will be trained; on CUDA that is refused (see ALLOW_TRAIN_COMPILE_ENV above).

    A block wrapped for activation checkpointing has its *inner* module compiled, so the checkpoint stays eager
    around a compiled forward: compiling the wrapper itself (torch.utils.checkpoint traced into the graph) gave
    wrong gradients with inductor on CPU under torch 2.13 (17 % relative error on the tiny model; aot_eager and
    the inner-module order agree with eager to 1e-6). fullgraph=False: the Ulysses all-to-alls (autograd
    Functions around c10d collectives) break the graph.
    """
    if trainable and torch.cuda.is_available() and os.environ.get(ALLOW_TRAIN_COMPILE_ENV) != "1":
        raise RuntimeError(
            "parallel.compile=true: per-block torch.compile of a trainable model gave wrong gradients on CUDA "
            "(H100, torch 2.11: grad norm 6414 vs 1.26 eager; see parallel/compile.py). Set parallel.compile=false "
            "(the teacher and tools/sample.py --compile are unaffected), or re-measure on your stack with "
            f"tools/check_speedups_gpu.py and set {ALLOW_TRAIN_COMPILE_ENV}=1 if it shows compiled == eager."
        )
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in model.blocks:
        getattr(block, "_checkpoint_wrapped_module", block).compile(fullgraph=False)
