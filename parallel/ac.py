"""Activation checkpointing per transformer block (docs/METHOD.md §6): "full" recomputes the whole block in backward,
"selective" saves the outputs of matmuls and attention and recomputes the cheap elementwise ops around them,
"attention" saves only the attention outputs (the costliest recompute at video lengths; self + cross attention of
Wan-1.3B at 29k tokens: ~5.4 GB in bf16) and recomputes everything else."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from models.lora import capture_mode, has_lora, replay_mode

AC_MODES = ("none", "full", "selective", "attention")

_aten = torch.ops.aten
# Outputs worth keeping: the FLOP-heavy ops. Everything else (norms, modulation, RoPE, GELU) is recomputed.
_ATTENTION_OPS = {
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}
_MATMUL_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default}


def _is_attention(op) -> bool:
    # The VSA kernels are custom ops (torch.ops.sparse_distill.*) and count as attention.
    return op in _ATTENTION_OPS or getattr(op, "namespace", None) == "sparse_distill"


def _save_matmul_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _MATMUL_OPS or _is_attention(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _save_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if _is_attention(op) else CheckpointPolicy.PREFER_RECOMPUTE


def _replaying_contexts(block: nn.Module, policy) -> tuple:
    """A LoRA base shared by several views (models/lora.py AdapterView): the recompute runs in backward, after the
    view's forward has put the previous adapter and attention back, so it replays the ones the forward used."""
    replay = replay_mode(capture_mode(block))
    if policy is None:
        return contextlib.nullcontext(), replay
    forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(policy)
    stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def both():
        with stack:
            stack.enter_context(replay)
            stack.enter_context(recompute_ctx)
            yield

    return forward_ctx, both()


def apply_ac(model: nn.Module, mode: str) -> None:
    """Wrap every `model.blocks[i]` in place; mode is one of AC_MODES. Apply LoRA (models/lora.py) first."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {AC_MODES}")
    if mode == "none":
        return
    lora = has_lora(model)
    for i, block in enumerate(model.blocks):
        policy = None if mode == "full" else _save_matmul_and_attention if mode == "selective" else _save_attention
        if lora:
            context_fn = functools.partial(_replaying_contexts, block, policy)
        elif policy is not None:
            context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
        else:
            # RNG state is not preserved: the blocks draw no random numbers (no dropout).
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
            continue
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=context_fn)
