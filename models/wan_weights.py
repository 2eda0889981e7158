"""Load and export Wan transformers in diffusers' format (config.json + safetensors, single file or sharded).

Our parameter names are diffusers' `WanTransformer3DModel` names except for the renames in `RENAMES`.
Loading builds the model on the meta device and fills it tensor by tensor from the safetensors shards, so peak
host memory stays about one copy of the weights (14B: ~57 GB in fp32, ~28 GB in bf16).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.wan import WanConfig, WanModel

# diffusers name fragment -> ours. Everything else is identical.
RENAMES: dict[str, str] = {
    ".attn1.to_out.0.": ".attn1.to_out.",
    ".attn2.to_out.0.": ".attn2.to_out.",
    ".ffn.net.0.proj.": ".ffn.fc1.",
    ".ffn.net.2.": ".ffn.fc2.",
    ".image_embedder.ff.net.0.proj.": ".image_embedder.fc1.",  # Wan2.1-I2V's CLIP-token embedder
    ".image_embedder.ff.net.2.": ".image_embedder.fc2.",
}
# Parameters that sparse-distill adds to Wan; a checkpoint without them gets zeros (docs/METHOD.md §2.1).
GATE_KEY = re.compile(r"^blocks\.\d+\.attn1\.to_gate_compress\.(weight|bias)$")
# Keys diffusers itself drops when loading Wan checkpoints.
IGNORED_KEYS = re.compile(r"norm_added_q")

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
MAX_LISTED = 10


def to_ours(key: str) -> str:
    for theirs, ours in RENAMES.items():
        key = key.replace(theirs, ours)
    return key


def to_diffusers(key: str) -> str:
    for theirs, ours in RENAMES.items():
        key = key.replace(ours, theirs)
    return key


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f" ... (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def resolve_transformer_dir(path: str | os.PathLike) -> Path:
    """A diffusers transformer folder, or a pipeline root with transformer/ (the *-Diffusers hub layout)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(
            f"model folder {str(root)!r} does not exist (expected a diffusers transformer folder with config.json, "
            "or a pipeline root with transformer/; download hub models with tools/download_hf.py)"
        )
    for candidate in (root, root / "transformer"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{str(root)!r} has neither config.json nor transformer/config.json: not a diffusers Wan transformer "
        "folder or pipeline root"
    )


def resolve_expert_dirs(path: str | os.PathLike) -> tuple[Path, Path, float]:
    """A Wan2.2-A14B pipeline root -> (transformer/ high-noise, transformer_2/ low-noise, boundary t = boundary_ratio
    * 1000), checked from the config files alone, so a one-expert folder fails before any weights load."""
    root = Path(path)
    high = resolve_transformer_dir(root)
    index = root / "model_index.json"
    ratio = json.loads(index.read_text()).get("boundary_ratio") if index.is_file() else None
    lacking = []
    if high != root / "transformer":
        lacking.append("transformer/ (this is a transformer folder, not a pipeline root)")
    if not (root / "transformer_2" / "config.json").is_file():
        lacking.append("transformer_2/config.json (the low-noise expert)")
    if ratio is None:
        lacking.append("boundary_ratio in model_index.json")
    if lacking:
        raise FileNotFoundError(
            f"{str(root)!r} is not a two-expert Wan2.2-A14B pipeline: it lacks {' and '.join(lacking)}. A two-expert "
            "teacher needs the full *-A14B-Diffusers folder (transformer/ high-noise, transformer_2/ low-noise)"
        )
    return high, root / "transformer_2", float(ratio) * 1000


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map every checkpoint key (diffusers names) to the safetensors file holding it."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = {name: folder / name for name in set(weight_map.values())}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard file(s) that do not exist: {_listing(missing)}")
        return {key: files[name] for key, name in weight_map.items()}
    single = folder / WEIGHTS_NAME
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME} and no {INDEX_NAME}")
    with safe_open(single, framework="pt") as f:
        return {key: single for key in f.keys()}


def load_pretrained(
    path: str | os.PathLike,
    *,
    attn_fn: Callable[..., torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    vsa_gate: bool | None = None,
) -> WanModel:
    """Build a WanModel from a diffusers checkpoint; strict except for the VSA gate.

    vsa_gate: None keeps the gate iff the checkpoint has one; True adds a zero gate when it lacks one.
    """
    folder = resolve_transformer_dir(path)
    config = json.loads((folder / "config.json").read_text())
    key_files = {k: f for k, f in checkpoint_files(folder).items() if not IGNORED_KEYS.search(k)}
    ours_to_file = {to_ours(k): (k, f) for k, f in key_files.items()}
    has_gate = any(GATE_KEY.match(k) for k in ours_to_file)
    cfg = WanConfig.from_diffusers(config, vsa_gate=has_gate if vsa_gate is None else vsa_gate)

    with torch.device("meta"):
        model = WanModel(cfg, attn_fn=attn_fn)
    expected = {k: tuple(p.shape) for k, p in model.state_dict().items()}

    # Validate names and shapes from the safetensors headers before reading any weights.
    unexpected = set(ours_to_file) - set(expected)
    if not cfg.vsa_gate:
        unexpected = {k for k in unexpected if not GATE_KEY.match(k)}  # gate dropped on request
    missing = {k for k in set(expected) - set(ours_to_file) if not GATE_KEY.match(k)}
    if unexpected or missing:
        lines = [f"checkpoint {folder} does not match WanModel({_describe(cfg)}) built from its config.json:"]
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(to_diffusers(k) for k in unexpected)}")
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_listing(to_diffusers(k) for k in missing)}")
        lines.append("  Is config.json from the same model as the weights?")
        raise ValueError("\n".join(lines))
    mismatched = []
    by_file: dict[Path, list[str]] = {}
    for ours, (theirs, file) in ours_to_file.items():
        if ours in expected:
            by_file.setdefault(file, []).append(ours)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            for ours in keys:
                shape = tuple(f.get_slice(ours_to_file[ours][0]).get_shape())
                if shape != expected[ours]:
                    mismatched.append(f"{ours_to_file[ours][0]} {shape} (model expects {expected[ours]})")
    if mismatched:
        raise ValueError(f"checkpoint {folder}: shape mismatch for {len(mismatched)} tensor(s): {_listing(mismatched)}")

    if dtype is not None:
        model = model.to(dtype=dtype)
    model = model.to_empty(device=device or "cpu")
    model.init_buffers(device or "cpu")
    params = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for file, keys in by_file.items():
            with safe_open(file, framework="pt") as f:
                for ours in keys:
                    params[ours].copy_(f.get_tensor(ours_to_file[ours][0]))
        for name, param in params.items():
            if GATE_KEY.match(name) and name not in ours_to_file:
                param.zero_()
    return model


def _describe(cfg: WanConfig) -> str:
    return (f"dim={cfg.dim}, heads={cfg.num_heads}, layers={cfg.num_layers}, in={cfg.in_channels}, "
            f"image_dim={cfg.image_dim}, vsa_gate={cfg.vsa_gate}")


def export_pretrained(
    model: WanModel, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None
) -> Path:
    """Write `model` so that `diffusers.WanTransformer3DModel.from_pretrained(out_dir)` loads it."""
    return export_state_dict(model.state_dict(), model.cfg, out_dir, max_shard_bytes=max_shard_bytes, dtype=dtype)


def export_random_init(cfg: WanConfig, out_dir: str | os.PathLike, seed: int) -> Path:
    """Seeded random weights of `cfg` in diffusers' layout, written once: an existing `out_dir` is kept as it is (a
    resumed run reuses its initial weights). The global RNG is left untouched."""
    out = Path(out_dir)
    if not out.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            export_pretrained(WanModel(cfg), out)
    return out


def export_random_experts(cfg: WanConfig, root: str | os.PathLike, boundary_ratio: float, seed: int,
                          pipeline_class: str, experts: int = 2) -> Path:
    """A pipeline root of `experts` seeded random transformers (transformer/ from `seed`, transformer_2/ from `seed`
    + 1) and, with two, their boundary_ratio in model_index.json, as `expert_dirs` reads it: the two-expert recipes'
    model.preset. Existing expert folders are kept (a resumed run reuses its initial weights)."""
    root = Path(root)
    for i, sub in enumerate(("transformer", "transformer_2")[:experts]):
        export_random_init(cfg, root / sub, seed + i)
    index = {"_class_name": pipeline_class, **({"boundary_ratio": boundary_ratio} if experts == 2 else {})}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def expert_dirs(root: str | os.PathLike, experts: int = 2) -> tuple[dict[str, Path], float]:
    """({"high": transformer/, "low": transformer_2/}, boundary t) of a two-expert pipeline root
    (`resolve_expert_dirs`); one expert (Wan2.1-I2V-14B): its one folder for both, boundary 0 (every t is "high")."""
    if experts == 1:
        folder = resolve_transformer_dir(root)
        return {"high": folder, "low": folder}, 0.0
    high, low, boundary = resolve_expert_dirs(root)
    return {"high": high, "low": low}, boundary


def expert_config(base: str | os.PathLike, boundary_ratio: float, experts: int = 2, one_expert_hint: str = ""
                  ) -> WanConfig:
    """The architecture of an expert recipe's model.base, checked from its config files alone (before any weights
    load): two experts (Wan2.2-A14B) share one architecture and model_index.json's boundary_ratio equals the recipe's
    `boundary_ratio`; one expert (Wan2.1-I2V-14B) is not a two-expert folder. ValueError names what to fix
    (`one_expert_hint`: the recipe's way to run a one-expert folder, added to that error)."""
    base = Path(base)
    if experts == 1:
        if (base / "transformer_2").exists():
            raise ValueError(f"{base} has transformer_2/ (a two-expert Wan2.2-A14B folder) but model.experts=1; set "
                             "model.experts=2 and model.boundary_ratio")
        try:
            return WanConfig.from_diffusers(read_config(resolve_transformer_dir(base)))
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
    try:
        high, low, boundary = resolve_expert_dirs(base)
    except FileNotFoundError as e:
        raise ValueError(f"a one-expert folder given to a two-expert recipe{one_expert_hint}: {e}") from None
    if boundary != boundary_ratio * 1000:
        raise ValueError(f"model.boundary_ratio={boundary_ratio} but {base}/model_index.json sets boundary_ratio "
                         f"{boundary / 1000:g}; set model.boundary_ratio={boundary / 1000:g}")
    wan, wan_2 = (WanConfig.from_diffusers(read_config(d)) for d in (high, low))
    if wan != wan_2:
        raise ValueError(f"transformer/ and transformer_2/ differ ({wan} vs {wan_2}); the two experts of a "
                         "Wan2.2-A14B folder share one architecture")
    return wan


def export_state_dict(
    state_dict: dict[str, torch.Tensor],
    cfg: WanConfig,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a full (unsharded) state dict in diffusers' layout, atomically: a temp folder renamed into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in state_dict.items():
        value = value.detach().to("cpu")
        tensors[to_diffusers(key)] = (value.to(dtype) if dtype is not None else value).contiguous()

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if len(shards) == 1:
            save_file(shards[0], tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update({key: name for key in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        (tmp / "config.json").write_text(json.dumps({**cfg.to_diffusers(), "_diffusers_version": "0.35.0"}, indent=2))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing target is swapped out first so a crash never leaves a half folder."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def parameter_count(cfg: WanConfig) -> int:
    """Number of parameters of WanModel(cfg), counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = WanModel(cfg)
    return sum(math.prod(p.shape) for p in model.parameters())


def diffusers_key_map(cfg: WanConfig) -> dict[str, str]:
    """ours -> diffusers name for every parameter of WanModel(cfg) (used by sharded loaders in parallel/)."""
    with torch.device("meta"):
        model = WanModel(cfg)
    return {k: to_diffusers(k) for k in model.state_dict()}


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((resolve_transformer_dir(path) / "config.json").read_text())
