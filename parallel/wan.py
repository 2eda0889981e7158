"""Parallelize a plain WanModel (torchtitan's order) and load diffusers weights straight into its shards.

    with torch.device("meta"):
        model = WanModel(cfg, attn_fn=vsa_attention)
    parallelize_wan(model, dims, ac_mode="full", compile=True)
    load_sharded(model, "weights/Wan2.1-T2V-1.3B-Diffusers", device)   # to_empty + buffers + streamed weights

or, as every Wan recipe builds its networks, `build_wan` (one network) and `build_lora` (one LoRA base, its roles);
`export_pipelines` writes a finished run's student as diffusers pipelines.

Forward passes with bf16 compute run under `torch.autocast(device_type, torch.bfloat16)` (parallel/fsdp.py).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from attention.sdpa import sdpa_attention
from attention.vsa import dense_gated_attention, vsa_attention
from components.optim import load_ema
from components.recipe_config import LoraConfig, ParallelConfig
from components.run_dir import link_pipeline_parts
from inference.lora import export_lora
from models.lora import AdapterView, apply_lora, has_lora, initial_value, is_adapter_param
from models.wan import WanConfig, WanModel
from models.wan_weights import GATE_KEY, IGNORED_KEYS, checkpoint_files, diffusers_key_map, resolve_transformer_dir
from parallel.ac import apply_ac
from parallel.checkpoint import export_student
from parallel.compile import apply_compile
from parallel.fsdp import apply_fsdp, apply_fsdp_frozen
from parallel.mesh import ParallelDims
from parallel.ulysses import apply_ulysses, attention_for

MAX_LISTED = 10


def parallelize_wan(
    model: nn.Module,
    dims: ParallelDims,
    *,
    ac_mode: str = "none",
    compile: bool = False,
    fsdp: bool = True,
    frozen: bool = False,
    param_dtype: torch.dtype = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
) -> nn.Module:
    """Sequence parallel → activation checkpointing → per-block compile → FSDP per block → root; in place.

    frozen: the teacher (parameters in `param_dtype`, no gradients; `cpu_offload` keeps its shards in host memory).
    A model with LoRA adapters (models/lora.py `apply_lora`, before this call) trains only them: its base is frozen
    and stored in `param_dtype` (one bf16 copy shared by teacher, student and critic), the adapters stay fp32 masters.
    Without FSDP and with sp > 1 the caller must average gradients over the SP group itself (parallel/ulysses.py).
    """
    if cpu_offload and not fsdp:
        raise ValueError("cpu_offload needs fsdp=True (the offload is FSDP2's CPUOffloadPolicy)")
    if has_lora(model) and not frozen:
        freeze_lora_base(model, param_dtype)
    if dims.sp > 1:
        apply_ulysses(model, dims.sp_group)
    if not frozen:  # no backward through the teacher: nothing to checkpoint
        apply_ac(model, ac_mode)
    if compile:
        apply_compile(model, trainable=not frozen)
    if fsdp and frozen:
        apply_fsdp_frozen(model, dims.fsdp_mesh, param_dtype=param_dtype, cpu_offload=cpu_offload)
    elif fsdp:
        apply_fsdp(model, dims.fsdp_mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype, cpu_offload=cpu_offload)
    return model


@torch.no_grad()
def freeze_lora_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Everything but the adapter parameters: no gradients, stored in `dtype` (works on the meta device)."""
    for name, param in model.named_parameters():
        trainable = is_adapter_param(name)
        param.requires_grad_(trainable)
        if not trainable:
            param.data = param.data.to(dtype)


def _listing(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:MAX_LISTED]) + (f" ... (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def _local_rows(param: torch.Tensor) -> tuple[int, int]:
    """Rows [start, stop) of the full tensor held by this rank (FSDP2 shards dim 0 like torch.chunk)."""
    start, stop = 0, param.shape[0]
    if isinstance(param, DTensor):
        for mesh_dim, placement in enumerate(param.placements):
            if isinstance(placement, Shard):
                if placement.dim != 0:
                    raise ValueError(f"load_sharded expects FSDP's Shard(0) placements, got {param.placements}")
                n, i = param.device_mesh.size(mesh_dim), param.device_mesh.get_local_rank(mesh_dim)
                size = -(-(stop - start) // n)
                start, stop = min(start + i * size, stop), min(start + (i + 1) * size, stop)
    return start, stop


@torch.no_grad()
def load_sharded(
    model: nn.Module, path: str | os.PathLike, device: torch.device | str, cpu_offload: bool = False
) -> None:
    """Materialise a meta-device (parallelized) WanModel and fill it from a diffusers checkpoint.

    cpu_offload: the model was parallelized with `cpu_offload=True`; its shards live in host memory (FSDP2 pins
    them), only the RoPE buffers go to `device`.

    Every rank reads only the rows of each tensor its shard holds (safetensors slices), so no rank ever holds more
    than its shard plus one tensor's rows. Strict except for the VSA gate (zeros when the checkpoint lacks it).
    LoRA adapter parameters (models/lora.py) start fresh: `initial_value`, whatever the sharding.
    """
    folder = resolve_transformer_dir(path)
    files = {k: f for k, f in checkpoint_files(folder).items() if not IGNORED_KEYS.search(k)}
    theirs_of = diffusers_key_map(model.cfg)  # ours -> diffusers
    missing = [k for k, theirs in theirs_of.items() if theirs not in files and not GATE_KEY.match(k)]
    unexpected = set(files) - set(theirs_of.values())
    if not model.cfg.vsa_gate:
        unexpected = {k for k in unexpected if not GATE_KEY.match(k)}  # a gate dropped on request
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not match WanModel({model.cfg}): missing keys ({len(missing)}): "
            f"{_listing(theirs_of[k] for k in missing)}; unexpected keys ({len(unexpected)}): {_listing(unexpected)}"
        )

    model.to_empty(device="cpu" if cpu_offload else device)
    model.init_buffers(device)
    params = model.state_dict()  # FSDP2: the sharded DTensor parameters themselves, under the plain names
    by_file: dict[Path, list[str]] = {}
    for ours, param in params.items():
        if is_adapter_param(ours):
            local = param.to_local() if isinstance(param, DTensor) else param
            start, stop = _local_rows(param)
            local.copy_(initial_value(ours, tuple(param.shape))[start:stop])
        elif theirs_of[ours] in files:
            by_file.setdefault(files[theirs_of[ours]], []).append(ours)
        else:  # the VSA gate of a checkpoint without one
            param.zero_()
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            for ours in keys:
                param, theirs = params[ours], theirs_of[ours]
                shape = tuple(f.get_slice(theirs).get_shape())
                if shape != tuple(param.shape):
                    raise ValueError(
                        f"checkpoint {file}: {theirs} has shape {shape}, the model expects {tuple(param.shape)}"
                    )
                local = param.to_local() if isinstance(param, DTensor) else param
                start, stop = _local_rows(param)
                if local.shape[0] != stop - start:
                    raise RuntimeError(f"{ours}: local shard has {local.shape[0]} rows, expected [{start}, {stop})")
                if stop > start:
                    local.copy_(f.get_slice(theirs)[start:stop])


# ---- the recipes' networks (one copy for the five Wan recipes; a copied recipe that builds its networks another way
# defines its own build_wan) ----
# The recipes' attention names (attn.student, attn.critic; the teacher is "sdpa").
ATTN = {"sdpa": sdpa_attention, "vsa": vsa_attention, "dense_gated": dense_gated_attention}


def build_wan(
    wan: WanConfig,
    attn: str,
    weights: Path,
    dims: ParallelDims,
    device: torch.device,
    par: ParallelConfig,
    frozen: bool,
) -> WanModel:
    """One network: built on the meta device, parallelised, then filled shard by shard from `weights`."""
    with torch.device("meta"):
        # The VSA gate (student, gated critic) starts at 0 unless `weights` has one.
        model = WanModel(replace(wan, vsa_gate=attn in ("vsa", "dense_gated")), attn_fn=ATTN[attn])
    parallelize_wan(
        model,
        dims,
        ac_mode=par.activation_checkpointing,
        compile=par.compile,
        frozen=frozen,
        param_dtype=torch.bfloat16 if par.mixed_precision == "bf16" else torch.float32,
    )
    load_sharded(model, weights, device)
    return model


def build_lora(
    wan: WanConfig,
    attns: dict[str, tuple[str, str]],
    weights: Path,
    dims: ParallelDims,
    device: torch.device,
    par: ParallelConfig,
    lora: LoraConfig,
) -> dict[str, AdapterView]:
    """LoRA mode: ONE network built, parallelised and loaded once, with a frozen base and fresh student and critic
    adapters; each role (name -> (adapter, attention) in `attns`) is a view of it (models/lora.py)."""
    with torch.device("meta"):
        base = WanModel(replace(wan, vsa_gate=any(a in ("vsa", "dense_gated") for _, a in attns.values())))
    apply_lora(base, lora.rank, lora.alpha, lora.targets, gate=lora.gate)
    dtype = torch.bfloat16 if par.mixed_precision == "bf16" else torch.float32
    parallelize_wan(base, dims, ac_mode=par.activation_checkpointing, compile=par.compile, param_dtype=dtype)
    load_sharded(base, weights, device)
    return {
        role: AdapterView(base, adapter, attention_for(base, ATTN[attn])) for role, (adapter, attn) in attns.items()
    }


def build_expert_roles(wan: WanConfig, experts: dict[str, Path], init: dict[str, str], attn: dict[str, str],
                       dims: ParallelDims, device: torch.device, parallel: ParallelConfig, lora: LoraConfig
                       ) -> tuple[nn.Module, dict[str, nn.Module], nn.Module]:
    """(student, {"high": teacher, "low": teacher}, critic) of an expert family (`experts` from
    models/wan_weights.py expert_dirs; one expert: both keys name one folder and share one teacher). Student and
    critic start from the experts init["student"] / init["critic"] with attention attn["student"] / attn["critic"];
    the teachers are frozen dense ones. LoRA: init["student"]'s expert is the one frozen base of student, critic and
    that expert's teacher (adapters off); the other expert is a second frozen base."""
    first = init["student"]
    if lora.rank:  # each view's parameters (optimizer, EMA, checkpoint) are its adapter only
        roles = {"student": ("student", attn["student"]), "teacher": (None, "sdpa"),
                 "critic": ("critic", attn["critic"])}
        student, base, critic = build_lora(wan, roles, experts[first], dims, device, parallel, lora).values()
        teachers = {first: base}
    else:
        student = build_wan(wan, attn["student"], experts[first], dims, device, parallel, frozen=False)
        teachers = {}
    for name, folder in experts.items():  # "high", then "low"
        built = [teachers[k] for k in teachers if experts[k] == folder]
        teachers[name] = built[0] if built else build_wan(wan, "sdpa", folder, dims, device, parallel, frozen=True)
    if not lora.rank:
        critic = build_wan(wan, attn["critic"], experts[init["critic"]], dims, device, parallel, frozen=False)
    return student, {name: teachers[name] for name in experts}, critic


def export_pipelines(student: nn.Module, run_dir: Path, base: Path, ema: dict, lora_base: Path | None,
                     main_process: bool) -> None:
    """The end of a Wan run (a collective): <run>/export, the student as a diffusers pipeline (its transformer — LoRA:
    merged into the base — beside links to `base`'s frozen parts: tools/sample.py --model <run>/export); with
    `lora_base` also the student adapter alone in <run>/export_lora (diffusers' LoRA format + gate sidecar,
    inference/lora.py); with an EMA also <run>/export_ema. The EMA is loaded into the student last: its live weights
    are overwritten."""
    export_student(student, run_dir / "export" / "transformer")
    if lora_base is not None:
        export_lora(student, run_dir / "export_lora", base_model=str(lora_base))
    if ema:
        load_ema(student, ema)
        export_student(student, run_dir / "export_ema" / "transformer")
    if main_process:  # model_index.json (A14B: with boundary_ratio), VAE and text encoder link to the base pipeline's
        for export in ("export", "export_ema") if ema else ("export",):
            link_pipeline_parts(base, run_dir / export)
