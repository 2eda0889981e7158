"""LoRA adapters on a shared Wan base: one frozen network serves as teacher, student and critic (single-device code).

    apply_lora(base, rank=32, alpha=32, targets=["self_attn", "cross_attn", "ffn"])   # on meta, before parallelize
    ... parallelize_wan(base, ...); load_sharded(base, weights, device)  # (or load_pretrained, then apply_lora)
    student = AdapterView(base, "student", vsa_attention)           # base + student adapter, VSA + its gate
    critic = AdapterView(base, "critic", dense_gated_attention)     # base + critic adapter, dense + its gate
    teacher = AdapterView(base, None, sdpa_attention)               # the base itself: adapters off, dense
    opt = AdamW(student.parameters())                               # the student adapter only

`LoRALinear` is an `nn.Linear` that keeps the base `weight`/`bias` under their own names (so `load_sharded`, DCP and
the diffusers key map of the base are unchanged) and adds, per adapter name, `lora_A[name]` (rank, in) and
`lora_B[name]` (out, rank): output = x W^T + b + (alpha / rank) · (x A^T) B^T for the active adapter, the base alone
when none is active. A starts Kaiming-uniform, B at zero, so a fresh adapter is the base bit for bit. State-dict keys:
`blocks.3.attn1.to_q.lora_A.student`.

Targets (`TARGETS`): "self_attn" = attn1 to_q/to_k/to_v/to_out, "cross_attn" = attn2 to_q/to_k/to_v/to_out,
"ffn" = ffn fc1/fc2.

The VSA gate `attn1.to_gate_compress` (zero-initialised Linear(dim, dim), docs/METHOD.md §2.1) is trained per adapter:
student and critic each need their own in a shared base. `gate="lora"` swaps it for a LoRALinear of the same rank
(its base stays the checkpoint's gate, zeros for a checkpoint without one); `gate="full"` swaps it for a
`FullDeltaLinear`, a full (dim, dim) weight and (dim,) bias delta per adapter (`delta_W`, `delta_b`), which is what
full fine-tuning trains. The default is "lora", chosen on memory: at the 14B (dim 5120, 40 blocks) a full gate is
1.05 B parameters per adapter, i.e. 16.8 GB of fp32 weight + gradient + AdamW moments per adapter (33.6 GB for the
two, more than the adapters of all other linears together), against 13 M parameters (0.2 GB) for rank 32. A toy
quality comparison of the two modes has not been run yet (recipes/toy_sparse_distill.toml's [lora] comment).
Either way the gate belongs to the adapter: `lora_state_dict` returns it, `merge_lora` folds it.

Choosing the adapter per forward without a global context: `AdapterView` is a small module holding the shared base
(not as a submodule) and (adapter name, attention function); its forward sets both on the base's LoRA linears and
self-attentions, runs the base, and puts the previous setting back. Its *parameters* are its adapter's parameters
only (registered again under the base's names, `view.adapter.blocks.3.attn1.to_q.lora_A.student`), so an optimizer,
grad clipping, an EMA or a DCP checkpoint built on the view sees exactly the trainable state. Build views after the
base's parameters exist for good (after `load_sharded` / FSDP), like an optimizer. Activation checkpointing recomputes
a block after the view's forward has returned: parallel/ac.py captures the block's setting with `capture_mode` at the
forward and replays it with `replay_mode` for the recompute.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.wan import SelfAttention

ADAPTERS = ("student", "critic")
TARGETS: dict[str, tuple[str, ...]] = {
    "self_attn": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out"),
    "cross_attn": ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out"),
    "ffn": ("ffn.fc1", "ffn.fc2"),
}
GATE = "attn1.to_gate_compress"
GATE_MODES = ("lora", "full")
# Parameter-name fragments of every adapter parameter: `<module>.<fragment>.<adapter>`.
ADAPTER_PARAMS = ("lora_A", "lora_B", "delta_W", "delta_b")


def check_lora(rank: int, targets: list[str] | tuple[str, ...], gate: str = "lora") -> None:
    """Raise ValueError naming the bad value: rank < 0, an unknown target group or gate mode."""
    if rank < 0:
        raise ValueError(f"LoRA rank must be >= 0 (0 = no adapters, full fine-tune); got {rank}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; valid: {sorted(TARGETS)}")
    if rank > 0 and not targets:
        raise ValueError(f"LoRA rank {rank} needs at least one target; valid: {sorted(TARGETS)}")
    if gate not in GATE_MODES:
        raise ValueError(f"unknown LoRA gate mode {gate!r}; valid: {list(GATE_MODES)}")


def initial_value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The fresh value of adapter parameter `name` (fp32, CPU): A uniform(±1/sqrt(in)) (Kaiming-uniform with a = √5,
    as nn.Linear's weight), B and the full deltas zero. Seeded by the name, so it does not depend on the order of
    initialisation nor on how the parameter is sharded."""
    if name.split(".")[-2] != "lora_A":
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


class LoRALinear(nn.Linear):
    """nn.Linear + one low-rank (A, B) pair per adapter; `active` picks the adapter (None: the base alone)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, adapters: tuple[str, ...] = ADAPTERS) -> None:
        device = base.weight.device
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: names and values unchanged
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_A = nn.ParameterDict(
            {a: nn.Parameter(torch.empty(rank, self.in_features, device=device)) for a in adapters}
        )
        self.lora_B = nn.ParameterDict(
            {a: nn.Parameter(torch.empty(self.out_features, rank, device=device)) for a in adapters}
        )
        self.active: str | None = None  # uninitialised adapters: apply_lora / load_sharded initialise them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.active is None:
            return out
        a, b = self.lora_A[self.active], self.lora_B[self.active]
        return out + self.scale * F.linear(F.linear(x, a), b)  # (..., rank) -> (..., out)

    def weight_delta(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ΔW, Δb) that `merge_lora` adds to the base: scale · B A, no bias change."""
        return self.scale * (self.lora_B[adapter].float() @ self.lora_A[adapter].float()), None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, adapters={list(self.lora_A)}"


class FullDeltaLinear(nn.Linear):
    """nn.Linear + a full weight and bias delta per adapter (the VSA gate with `gate="full"`); both start at zero."""

    def __init__(self, base: nn.Linear, adapters: tuple[str, ...] = ADAPTERS) -> None:
        device = base.weight.device
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.delta_W = nn.ParameterDict({a: nn.Parameter(torch.empty_like(base.weight, device=device)) for a in adapters})
        self.delta_b = nn.ParameterDict(
            {a: nn.Parameter(torch.empty(self.out_features, device=device)) for a in adapters}
        )
        self.active: str | None = None  # uninitialised adapters: apply_lora / load_sharded initialise them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.active is None:
            return out
        return out + F.linear(x, self.delta_W[self.active], self.delta_b[self.active])

    def weight_delta(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.delta_W[adapter].float(), self.delta_b[adapter].float()


AdaptedLinear = (LoRALinear, FullDeltaLinear)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: list[str] | tuple[str, ...],
    adapters: tuple[str, ...] = ADAPTERS,
    gate: str = "lora",
) -> list[str]:
    """Swap the targeted nn.Linears of `model.blocks` (and the VSA gate, if the model has one) in place; returns the
    swapped module names. Works on the meta device (then `reset_lora_parameters` / parallel/wan.py `load_sharded`
    initialise the adapters). rank 0 swaps nothing (full fine-tune)."""
    check_lora(rank, targets, gate)
    if rank == 0:
        return []
    suffixes = [s for t in targets for s in TARGETS[t]]
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not name.startswith("blocks."):
            continue
        if name.endswith("." + GATE):
            new = LoRALinear(module, rank, alpha, adapters) if gate == "lora" else FullDeltaLinear(module, adapters)
        elif any(name.endswith("." + s) for s in suffixes):
            new = LoRALinear(module, rank, alpha, adapters)
        else:
            continue
        _swap(model, name, new)
        swapped.append(name)
    if next(model.parameters()).device.type != "meta":
        reset_lora_parameters(model)
    return swapped


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, AdaptedLinear) for m in model.modules())


def is_adapter_param(name: str, adapter: str | None = None) -> bool:
    """Whether parameter `name` belongs to an adapter (to `adapter`, when given)."""
    parts = name.split(".")
    if len(parts) < 2 or parts[-2] not in ADAPTER_PARAMS:
        return False
    return adapter is None or parts[-1] == adapter


@torch.no_grad()
def reset_lora_parameters(model: nn.Module) -> None:
    """Fresh adapters (`initial_value`) for every adapter parameter of `model`; single-device tensors only
    (sharded ones: parallel/wan.py `load_sharded` initialises them shard by shard)."""
    for name, param in model.named_parameters():
        if is_adapter_param(name):
            param.copy_(initial_value(name, tuple(param.shape)))


def freeze_base(model: nn.Module) -> None:
    """Only adapter parameters train."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_param(name))


def lora_state_dict(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """One adapter's parameters (A/B and the gate's), keyed by the module path: `blocks.3.attn1.to_q.lora_A.student`."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_param(k, adapter)}


@torch.no_grad()
def merge_lora(model: nn.Module, adapter: str) -> None:
    """Fold `adapter` into the base weights in place (W += ΔW, in fp32, then the weight's dtype) and zero it, so the
    model computes the same function with or without it active. Single-device tensors."""
    for module in model.modules():
        if isinstance(module, AdaptedLinear):
            dw, db = module.weight_delta(adapter)
            module.weight.copy_(module.weight.float() + dw)
            if db is not None:
                module.bias.copy_(module.bias.float() + db)
            for name, param in module.named_parameters():
                if is_adapter_param(name, adapter):
                    param.zero_()


@torch.no_grad()
def merged_state_dict(state: dict[str, torch.Tensor], adapter: str | None, scale: float) -> dict[str, torch.Tensor]:
    """The base's state dict (full tensors, e.g. gathered for export) with `adapter` folded in and every adapter
    key dropped: the plain WanModel state dict a diffusers export takes. Merged weights are fp32 (a low-rank update
    is below bf16's resolution of the base weight); `scale` = alpha / rank of the LoRALinears."""
    out = {k: v for k, v in state.items() if not is_adapter_param(k)}
    for key, value in state.items():
        if adapter is None or not is_adapter_param(key, adapter):
            continue
        module, kind, _ = key.rsplit(".", 2)
        if kind == "lora_A":
            b = state[f"{module}.lora_B.{adapter}"].float()
            out[f"{module}.weight"] = out[f"{module}.weight"].float() + scale * (b @ value.float())
        elif kind == "delta_W":
            out[f"{module}.weight"] = out[f"{module}.weight"].float() + value.float()
        elif kind == "delta_b":
            out[f"{module}.bias"] = out[f"{module}.bias"].float() + value.float()
    return out


def lora_scale(model: nn.Module) -> float:
    """alpha / rank shared by the model's LoRALinears (apply_lora uses one rank and alpha)."""
    scales = {m.scale for m in model.modules() if isinstance(m, LoRALinear)}
    if len(scales) > 1:
        raise ValueError(f"LoRALinears with different scales {sorted(scales)}; merge them one by one")
    return scales.pop() if scales else 1.0


# ---- choosing the adapter per forward ----
Mode = list[tuple[nn.Module, str, Any]]


def capture_mode(module: nn.Module) -> Mode:
    """The adapter and attention setting of every LoRA linear and self-attention under `module`, as set now."""
    mode: Mode = []
    for m in module.modules():
        if isinstance(m, AdaptedLinear):
            mode.append((m, "active", m.active))
        elif isinstance(m, SelfAttention):
            mode.append((m, "attn_fn", m.attn_fn))
    return mode


@contextmanager
def replay_mode(mode: Mode) -> Iterator[None]:
    """Apply a captured setting for the duration of the block, then put back the one before."""
    before = [(m, attr, getattr(m, attr)) for m, attr, _ in mode]
    for m, attr, value in mode:
        setattr(m, attr, value)
    try:
        yield
    finally:
        for m, attr, value in before:
            setattr(m, attr, value)


class AdapterView(nn.Module):
    """The shared base run with one adapter (None: the base alone) and one self-attention function: a drop-in for a
    WanModel in the recipes. Its parameters are the adapter's only (see the module docstring)."""

    def __init__(self, base: nn.Module, adapter: str | None, attn_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "base", base)  # shared, not a submodule: the view owns only its adapter
        self.adapter_name, self.attn_fn = adapter, attn_fn
        self.adapter = nn.Module()  # the adapter's parameters under the base's module paths
        for name, param in base.named_parameters():
            if adapter is not None and is_adapter_param(name, adapter):
                # the base's state-dict name: without the activation-checkpoint wrapper's level (parallel/ac.py)
                *path, leaf = name.replace("_checkpoint_wrapped_module.", "").split(".")
                node = self.adapter
                for part in path:
                    if not hasattr(node, part):
                        node.add_module(part, nn.Module())
                    node = getattr(node, part)
                node.register_parameter(leaf, param)
        if adapter is not None and not any(True for _ in self.adapter.parameters()):
            raise ValueError(f"the base has no adapter {adapter!r} (apply_lora(..., adapters=...) names them)")
        self._mode: Mode = [
            (m, "active", adapter) for m in base.modules() if isinstance(m, AdaptedLinear)
        ] + [(m, "attn_fn", attn_fn) for m in base.modules() if isinstance(m, SelfAttention)]

    @property
    def cfg(self):
        return self.base.cfg

    def token_grid(self, latent_shape) -> tuple[int, int, int]:
        return self.base.token_grid(latent_shape)

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The base's state dict with this view's adapter folded in, no adapter keys (single-device tensors)."""
        return merged_state_dict(self.base.state_dict(), self.adapter_name, lora_scale(self.base))

    def forward(
        self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor, attn_meta: Any = None,
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extra = {} if image_context is None else {"image_context": image_context}  # Wan2.1-I2V's CLIP tokens
        with replay_mode(self._mode):
            return self.base(latents, t, context, attn_meta, **extra)


def export_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a diffusers export of `model` holds: a WanModel's state dict, or a view's base with its adapter merged."""
    return model.merged_state_dict() if isinstance(model, AdapterView) else model.state_dict()
