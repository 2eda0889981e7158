"""`torch.compile` per transformer block (torchtitan's granularity: one graph reused by every block)."""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module) -> None:
    """Compile every `model.blocks[i]` in place (module names and state-dict keys are unchanged).

    fullgraph=False: the Ulysses all-to-alls (autograd Functions around c10d collectives) break the graph.
    """
    for block in model.blocks:
        block.compile(fullgraph=False)
