"""Helpers shared by tests: a diffusers WanTransformer3DModel with perturbed weights and the same weights in ours."""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from models.wan import WanConfig, WanModel
from models.wan_weights import to_ours


def diffusers_config(cfg: WanConfig) -> dict:
    return {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}


def perturbed_diffusers(cfg: WanConfig, seed: int = 0) -> WanTransformer3DModel:
    """diffusers' model with every parameter moved off its init (norm weights off 1, biases off 0)."""
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**diffusers_config(cfg)).float().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def ours_from(ref: WanTransformer3DModel, cfg: WanConfig, attn_fn=None) -> WanModel:
    model = WanModel(cfg, attn_fn=attn_fn).float().eval()
    state = {to_ours(k): v for k, v in ref.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("to_gate_compress" in k for k in missing), missing
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
