"""LoRA adapters out of training and into sampling: diffusers' LoRA format plus a sidecar for the VSA gate.

    export_lora(student, run_dir / "export_lora", adapter="student", base_model=cfg.model.path)  # a collective
    pipe = WanPipeline.from_pretrained(BASE); pipe.load_lora_weights(run_dir / "export_lora")    # diffusers
    load_lora(model, run_dir / "export_lora", scale=1.0)   # ours: checks everything, then merges into the weights

An adapter folder holds:
- `pytorch_lora_weights.safetensors`: peft-style keys `transformer.<diffusers module>.lora_A.weight` (rank, in) and
  `.lora_B.weight` (out, rank), what diffusers' `WanLoraLoaderMixin.load_lora_weights` reads. Such a file carries no
  alpha, and diffusers then uses lora_alpha = rank (scale 1), so our alpha / rank is folded into lora_B here: diffusers'
  default scale reproduces our merged model.
- `vsa_gate.safetensors` (only when the adapter has a VSA gate): the adapter's `to_gate_compress` update per block,
  our key names, low-rank (`.lora_A`, `.lora_B`, scale folded) or full (`.delta_W`, `.delta_b`), as models/lora.py
  trains it. diffusers' Wan has no gate, so its pipelines run the adapter without it (VSA's coarse branch off).
- `lora_config.json`: rank, alpha, targets, the gate's form and the base's fingerprint (its architecture, the model id
  it was trained on, and a digest of its small parameters), so a mismatched base fails before anything is merged.

`load_lora` merges W += scale * B A (inference wants merged weights: no extra matmuls, and FP8 / fused rows / compile
see plain `nn.Linear`s); call it before `prepare_for_inference`. scale multiplies every update, the gate's included
(0: the base, 1: the adapter as trained).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from models.lora import AdapterView, FullDeltaLinear, LoRALinear, is_adapter_param
from models.wan import WanConfig, WanModel
from models.wan_weights import (
    _replace_dir,
    checkpoint_files,
    resolve_transformer_dir,
    to_diffusers,
    to_ours,
)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default weight_name for LoRA folders
GATE_WEIGHTS_NAME = "vsa_gate.safetensors"
CONFIG_NAME = "lora_config.json"
FORMAT = "sparse-distill-lora/1"
PREFIX = "transformer."  # diffusers routes keys with this prefix to the pipeline's transformer
GATE_MODULE = re.compile(r"^blocks\.\d+\.attn1\.to_gate_compress$")
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
GATE_PARTS = ("lora_A", "lora_B", "delta_W", "delta_b")
# Wrappers that parallel/ (activation checkpointing) or torch.compile put into module names.
WRAPPER_NAMES = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")
MAX_LISTED = 6


class LoraError(ValueError):
    """A LoRA folder that is malformed or does not fit the model; raised before any weight changes."""


def _clean(name: str) -> str:
    return WRAPPER_NAMES.sub("", name)


def _listing(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = "; ".join(items[:MAX_LISTED])
    return shown + (f" ... (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded DTensor) parameter, detached, on the CPU; a collective for a
    DTensor, so every rank calls it in the same order."""
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return full.detach().cpu()


# ---------------------------------------------------------------- the base's fingerprint

def fingerprint_keys(named_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> list[str]:
    """The base parameters the digest covers: every one but the matrix / conv weights (biases, norm weights,
    modulation tables: a few MB even for 14B, yet any other checkpoint differs in them), the adapters and the gate."""
    keys = []
    for name, shape in named_shapes:
        if is_adapter_param(name) or GATE_MODULE.match(name.rsplit(".", 1)[0]):
            continue
        if name.endswith(".weight") and len(shape) >= 2:
            continue
        keys.append(name)
    return sorted(keys)


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' bf16 bytes in key order: bf16 so a base loaded in fp32 and the same base loaded in bf16
    (both round-to-nearest from the checkpoint) give the same digest."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """`weights_digest` of a model's base parameters (a collective under FSDP2: every rank calls it)."""
    params = {_clean(n): p for n, p in model.named_parameters()}
    keys = fingerprint_keys((n, tuple(p.shape)) for n, p in params.items())
    return weights_digest({k: _full(params[k]) for k in keys})


def checkpoint_digest(path: str | os.PathLike) -> str:
    """`weights_digest` of a diffusers transformer checkpoint, read from its safetensors files (a few MB), without
    building the model: so a pipeline can reject a mismatched base before its weights load. Remembered per process for
    unchanged files (tools/sample.py checks the base before `VideoPipeline.from_pretrained` checks it again)."""
    files = checkpoint_files(resolve_transformer_dir(path))
    stamp = tuple(sorted({(str(Path(f).resolve()), *_file_stamp(f)) for f in files.values()}))
    if stamp not in _DIGESTS:
        _DIGESTS[stamp] = _checkpoint_digest(files)
    return _DIGESTS[stamp]


_DIGESTS: dict[tuple, str] = {}  # checkpoint_digest's memory: (file, inode, mtime_ns, size) stamps -> digest


def _file_stamp(file: str | os.PathLike) -> tuple[int, int, int]:
    st = os.stat(file)  # an atomic rewrite (write + rename) changes the inode even within one mtime tick
    return st.st_ino, st.st_mtime_ns, st.st_size


def _checkpoint_digest(files: dict[str, str]) -> str:
    shapes = {}
    for key, file in files.items():
        with safe_open(file, framework="pt") as f:
            shapes[to_ours(key)] = (key, file, tuple(f.get_slice(key).get_shape()))
    keys = fingerprint_keys((k, v[2]) for k, v in shapes.items() if "norm_added_q" not in k)
    tensors = {}
    for key in keys:
        theirs, file, _ = shapes[key]
        with safe_open(file, framework="pt") as f:
            tensors[key] = f.get_tensor(theirs)
    return weights_digest(tensors)


def architecture(cfg: WanConfig) -> dict[str, Any]:
    """The config fields an adapter depends on (diffusers' config.json names); the VSA gate is not one of them."""
    return cfg.to_diffusers()


# ---------------------------------------------------------------- export

def export_lora(model: nn.Module, out_dir: str | os.PathLike, adapter: str | None = None, *,
                base_model: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write adapter `adapter` of a LoRA `WanModel` (plain or FSDP2-sharded; an `AdapterView` gives its base and, by
    default, its adapter) to `out_dir` (see the module docstring).

    A collective when torch.distributed is initialised: every rank gathers the adapter's full tensors (small: the
    base is not gathered), rank 0 writes the folder atomically (a temp folder renamed into place). base_model: the
    checkpoint the base was loaded from (recorded for error messages). dtype: the stored precision (default fp32)."""
    if isinstance(model, AdapterView):
        model, adapter = model.base, adapter or model.adapter_name
    adapter = adapter or "student"
    cfg: WanConfig = model.cfg
    lora: dict[str, torch.Tensor] = {}
    gate: dict[str, torch.Tensor] = {}
    gate_form = "none"
    ranks: Counter = Counter()
    alphas: dict[int, float] = {}
    targets: set[str] = set()
    for name, m in model.named_modules():  # the same order on every rank: _full is a collective
        name = _clean(name)
        if isinstance(m, FullDeltaLinear) and adapter in m.delta_W:
            if not GATE_MODULE.match(name):
                raise LoraError(f"export_lora: {name} has a full delta; only the VSA gate may (diffusers' LoRA format "
                                "holds low-rank updates)")
            gate[f"{name}.delta_W"], gate[f"{name}.delta_b"] = _full(m.delta_W[adapter]), _full(m.delta_b[adapter])
            gate_form = "full"
            continue
        if not (isinstance(m, LoRALinear) and adapter in m.lora_A):
            continue
        a = _full(m.lora_A[adapter]).float()  # (rank, in)
        b = _full(m.lora_B[adapter]).float() * m.scale  # (out, rank), alpha / rank folded in
        if GATE_MODULE.match(name):
            gate[f"{name}.lora_A"], gate[f"{name}.lora_B"] = a, b
            gate_form = "lora"
            continue
        ranks[m.rank] += 1
        alphas[m.rank] = m.alpha
        targets.add(re.sub(r"^blocks\.\d+\.", "", name))
        lora[PREFIX + to_diffusers(f"{name}.lora_A.weight")] = a
        lora[PREFIX + to_diffusers(f"{name}.lora_B.weight")] = b
    if not lora:
        raise LoraError(f"export_lora: the model has no LoRA adapter {adapter!r} on its linears (apply_lora(..., "
                        "adapters=...) names the adapters)")
    digest = model_digest(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()  # rank 0 writes; every rank returns once the folder is in place
        return Path(out_dir)

    rank, _ = ranks.most_common(1)[0]
    config = {
        "format": FORMAT,
        "adapter": adapter,
        "rank": rank,
        "alpha": alphas[rank],
        "targets": sorted(targets),
        "gate": gate_form,
        "base": {"model": base_model, "config": architecture(cfg), "weights_sha256": digest},
    }
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        cast = (lambda t: t.to(dtype).contiguous()) if dtype is not None else (lambda t: t.contiguous())
        save_file({k: cast(v) for k, v in lora.items()}, tmp / LORA_WEIGHTS_NAME, metadata={"format": "pt"})
        if gate:
            save_file({k: cast(v) for k, v in gate.items()}, tmp / GATE_WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist.is_initialized():
        dist.barrier()
    return out


# ---------------------------------------------------------------- reading and checking

@dataclass(frozen=True)
class LoraFiles:
    """An adapter folder read and checked for internal consistency; tensors not yet loaded."""

    folder: Path
    config: dict[str, Any]
    pairs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # our module name -> (A shape, B shape)
    gate: dict[str, tuple[int, ...]]  # our gate key -> shape (empty without a gate)

    @property
    def needs_gate(self) -> bool:
        return bool(self.gate)

    @property
    def base_model(self) -> str:
        return self.config["base"].get("model") or "(not recorded)"

    def describe(self) -> str:
        linears = sum(not GATE_MODULE.match(m) for m in self.pairs)
        return (f"LoRA rank {self.config['rank']} alpha {self.config['alpha']:g} on {linears} linears "
                f"({', '.join(self.config['targets'])}), gate {self.config['gate']}")


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError) as e:
        raise LoraError(f"{path}: not a readable safetensors file ({e}); re-export the adapter") from None


def read_lora(lora_dir: str | os.PathLike) -> LoraFiles:
    """Read an adapter folder's config and tensor headers (no weights) and check they agree with each other."""
    folder = Path(lora_dir)
    if not folder.is_dir():
        raise LoraError(f"LoRA folder {str(folder)!r} does not exist (expected a folder written by export_lora, "
                        f"with {LORA_WEIGHTS_NAME} and {CONFIG_NAME}, e.g. <run>/export_lora)")
    missing = [n for n in (LORA_WEIGHTS_NAME, CONFIG_NAME) if not (folder / n).is_file()]
    if missing:
        raise LoraError(f"LoRA folder {folder} lacks {', '.join(missing)}: not an export_lora folder (a plain "
                        "diffusers LoRA has no base fingerprint; load it with diffusers' load_lora_weights)")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise LoraError(f"{folder / CONFIG_NAME}: invalid JSON ({e}); re-export the adapter") from None
    if config.get("format") != FORMAT:
        raise LoraError(f"{folder / CONFIG_NAME}: format {config.get('format')!r}, expected {FORMAT!r}")

    weights = folder / LORA_WEIGHTS_NAME
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in _header_shapes(weights).items():
        match = LORA_KEY.match(key)
        if not key.startswith(PREFIX) or match is None or len(shape) != 2:
            raise LoraError(f"{weights}: key {key!r} {shape} is not a 2-D transformer.<module>.lora_A/lora_B.weight")
        module = to_ours(match["module"][len(PREFIX):] + ".")[:-1]
        pairs.setdefault(module, {})[match["part"]] = shape
    gate = _header_shapes(folder / GATE_WEIGHTS_NAME) if (folder / GATE_WEIGHTS_NAME).is_file() else {}
    if config.get("gate", "none") != "none" and not gate:
        raise LoraError(f"{folder / CONFIG_NAME} says gate {config['gate']!r} but {GATE_WEIGHTS_NAME} is missing")
    for key, shape in gate.items():
        module, part = key.rsplit(".", 1)
        if not GATE_MODULE.match(module) or part not in GATE_PARTS:
            raise LoraError(f"{folder / GATE_WEIGHTS_NAME}: key {key!r} is not a VSA gate tensor "
                            f"(blocks.N.attn1.to_gate_compress.{{{','.join(GATE_PARTS)}}})")
        if part.startswith("lora_"):
            pairs.setdefault(module, {})[part] = shape
    problems = []
    for module, parts in pairs.items():
        if set(parts) != {"lora_A", "lora_B"}:
            problems.append(f"{module}: has {sorted(parts)}, needs lora_A and lora_B")
        elif parts["lora_A"][0] != parts["lora_B"][1]:
            problems.append(f"{module}: rank mismatch, lora_A {parts['lora_A']} has rank {parts['lora_A'][0]} but "
                            f"lora_B {parts['lora_B']} has rank {parts['lora_B'][1]}")
    if problems:
        raise LoraError(f"{folder}: inconsistent adapter tensors: {_listing(problems)}; re-export the adapter")
    return LoraFiles(folder, config, {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}, gate)


def check_lora_fits(files: LoraFiles, cfg: WanConfig) -> None:
    """The adapter fits a `WanModel(cfg)`: same architecture as its base, every module exists with matching shapes,
    and the model has a VSA gate when the adapter brings one. Raises LoraError naming file, key and both shapes."""
    trained_on = files.config["base"]["config"]
    ours = architecture(cfg)
    differ = [f"{k}: adapter {trained_on.get(k)!r}, model {ours.get(k)!r}" for k in sorted(set(trained_on) | set(ours))
              if k != "_diffusers_version" and trained_on.get(k) != ours.get(k)]
    if differ:
        raise LoraError(f"LoRA {files.folder} was trained on a different base ({files.base_model}): "
                        f"{_listing(differ)}. "
                        "Load it onto the base it was trained on (lora_config.json: base.model)")
    if files.needs_gate and not cfg.vsa_gate:
        raise LoraError(f"LoRA {files.folder} brings a VSA gate ({GATE_WEIGHTS_NAME}) but the model has none: load the "
                        "base with load_pretrained(..., vsa_gate=True)")
    with torch.device("meta"):
        model = WanModel(cfg)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    problems = []
    for module, (a, b) in sorted(files.pairs.items()):
        file = GATE_WEIGHTS_NAME if GATE_MODULE.match(module) else LORA_WEIGHTS_NAME
        if module not in linears:
            problems.append(f"{file}: {module} is not a linear layer of this model")
            continue
        lin = linears[module]
        if a[1] != lin.in_features or b[0] != lin.out_features:
            problems.append(f"{file}: {module} lora_A {a} / lora_B {b} give a ({b[0]}, {a[1]}) update, the model's "
                            f"weight is ({lin.out_features}, {lin.in_features})")
    params = dict(model.named_parameters())
    for key, shape in files.gate.items():
        module, part = key.rsplit(".", 1)
        base = f"{module}.{'weight' if part == 'delta_W' else 'bias'}"
        if part.startswith("delta_") and base in params and tuple(params[base].shape) != shape:
            problems.append(f"{GATE_WEIGHTS_NAME}: {key} {shape}, model's {base} {tuple(params[base].shape)}")
    if problems:
        raise LoraError(f"LoRA {files.folder} does not fit this model: {_listing(problems)}. Use the base it was "
                        f"trained on ({files.base_model})")


def check_base_digest(files: LoraFiles, digest: str) -> None:
    expected = files.config["base"]["weights_sha256"]
    if digest != expected:
        raise LoraError(f"LoRA {files.folder} was trained on other base weights ({files.base_model}): "
                        f"lora_config.json base.weights_sha256 {expected[:16]}..., this base {digest[:16]}... (same "
                        "architecture, different checkpoint). Load it onto the checkpoint it was trained on")


# ---------------------------------------------------------------- load = check + merge

def check_scale(scale: float) -> float:
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise LoraError(f"LoRA scale {scale!r} is not a number (1.0 applies the adapter as trained)") from None
    if not math.isfinite(scale):
        raise LoraError(f"LoRA scale {scale} must be finite (1.0 applies the adapter as trained)")
    return scale


@torch.no_grad()
def load_lora(model: WanModel, lora: str | os.PathLike | LoraFiles, scale: float = 1.0) -> LoraFiles:
    """Check adapter folder `lora` against `model` (architecture, shapes, base digest), then merge it into the model's
    weights in place: W += scale * B A (in fp32, stored in W's dtype), a full gate delta W += scale * dW, b += scale *
    db. Call before `prepare_for_inference` (FP8 / fused rows / compile need plain linears)."""
    scale = check_scale(scale)
    files = lora if isinstance(lora, LoraFiles) else read_lora(lora)
    check_lora_fits(files, model.cfg)
    modules = dict(model.named_modules())
    not_plain = [m for m in files.pairs if type(modules[m]) is not nn.Linear]
    if not_plain:
        raise LoraError(f"load_lora merges into plain nn.Linear layers; {_listing(not_plain)} are "
                        f"{type(modules[not_plain[0]]).__name__}: load the adapter before prepare_for_inference")
    check_base_digest(files, model_digest(model))
    with safe_open(files.folder / LORA_WEIGHTS_NAME, framework="pt") as f:
        for module in files.pairs:
            if GATE_MODULE.match(module):
                continue
            a = f.get_tensor(PREFIX + to_diffusers(f"{module}.lora_A.weight"))
            b = f.get_tensor(PREFIX + to_diffusers(f"{module}.lora_B.weight"))
            _merge(modules[module].weight, a, b, scale)
    if files.gate:
        with safe_open(files.folder / GATE_WEIGHTS_NAME, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                module, part = key.rsplit(".", 1)
                if part == "lora_A":
                    _merge(modules[module].weight, f.get_tensor(key), f.get_tensor(f"{module}.lora_B"), scale)
                elif part.startswith("delta_"):
                    param = getattr(modules[module], "weight" if part == "delta_W" else "bias")
                    param.copy_(param.float() + scale * f.get_tensor(key).to(param.device, torch.float32))
    return files


def _merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    delta = b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)  # (out, rank) @ (rank, in)
    weight.copy_(weight.float() + scale * delta)
