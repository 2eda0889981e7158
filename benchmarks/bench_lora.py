"""peft or our own LoRA (issue 19, item 4): the same Wan block with our `LoRALinear` (models/lora.py) and with peft's
LoRA layers (`inject_adapter_in_model` + `LoraConfig`), timed and put through what training and sampling do to it.

    python benchmarks/bench_lora.py                 # the 1.3B block (dim 1536), 32760 tokens on a GPU (81x480x832)
    python benchmarks/bench_lora.py --preset wan21_14b --tokens 32760
    python benchmarks/bench_lora.py --smoke         # tiny block, 64 tokens, CPU: seconds plus two small compiles

Both variants carry two adapters ("student", "critic": one shared base in LoRA Sparse-distill) of rank --rank on
self-attention, cross-attention and FFN (models/lora.py TARGETS), the base frozen, "student" active.

Part 1, time: forward + backward of one block (median of --iters after a warm-up), eager and compiled
(`block.compile()`, as parallel/compile.py does per block), against the base block without adapters.
Part 2, composition (one process; gloo on CPU, NCCL on a GPU), each a yes/no with what was seen:
- base state-dict keys unchanged (the checkpoint loader, DCP resume from a full fine-tune, diffusers' key map);
- torch.compile: graph breaks in the block's forward (torch._dynamo.explain);
- compile -> FSDP2 fully_shard (parallel/ order) -> forward + backward == eager, adapter gradients present;
- DCP save -> perturb -> load restores the adapters exactly;
- switching the active adapter leaves requires_grad alone (an optimizer per adapter over one base);
- our inference swaps (inference/fp8.py, fused_rows.py) keep an *unmerged* adapter (sampling merges first anyway;
  the FP8 swap refuses a block with our unmerged `LoRALinear` rather than drop its adapter).
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard

from attention.sdpa import sdpa_attention
from inference.fp8 import quantize_linears_fp8
from inference.fused_rows import enable_fused_rows
from models.lora import TARGETS, apply_lora, freeze_base
from models.wan import WAN_CONFIGS, WanBlock, WanConfig
from parallel.mesh import init_distributed

ADAPTERS = ("student", "critic")
SUFFIXES = [s for group in ("self_attn", "cross_attn", "ffn") for s in TARGETS[group]]
TEXT_TOKENS = 512


class Holder(nn.Module):
    """A one-block model: models/lora.py adapts `blocks.*`, the inference swaps walk `model.blocks`."""

    def __init__(self, block: WanBlock) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([block])

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](*args)


def build(kind: str, cfg: WanConfig, rank: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Holder:
    """The same base block (seeded) with no adapter ("base"), ours, or peft's; adapters' B set non-zero so a lost
    adapter shows in the output."""
    torch.manual_seed(seed)
    model = Holder(WanBlock(cfg, sdpa_attention))
    if kind == "ours":
        apply_lora(model, rank, rank, ["self_attn", "cross_attn", "ffn"], adapters=ADAPTERS)
        freeze_base(model)
        set_adapter(model, "ours", "student")
    elif kind == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        model.requires_grad_(False)
        for name in ADAPTERS:  # a second injection adds an adapter to the same layers (peft warns; intended here)
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=SUFFIXES), model,
                                    adapter_name=name)
        set_adapter(model, "peft", "student")
    else:
        model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / math.sqrt(rank))
    return model.to(device, dtype)  # adapters in the compute dtype too (FSDP2's bf16 mixed precision in training)


def set_adapter(model: nn.Module, kind: str, adapter: str) -> None:
    if kind == "ours":
        for m in model.modules():
            if hasattr(m, "lora_A"):
                m.active = adapter
    else:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.set_adapter(adapter)


def inputs(cfg: WanConfig, tokens: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(7)
    angles = torch.rand(tokens, cfg.head_dim // 2, generator=gen) * 6.28
    x = torch.randn(1, tokens, cfg.dim, generator=gen)  # (B, L, D)
    context = torch.randn(1, TEXT_TOKENS, cfg.dim, generator=gen)  # (B, L_txt, D), already text-embedded
    tmod = torch.randn(1, 6, cfg.dim, generator=gen) * 0.1  # (B, 6, D)
    out = [t.to(device, dtype) for t in (x, context, tmod)] + [angles.cos().to(device), angles.sin().to(device)]
    out[0].requires_grad_(True)  # the blocks before this one train too: backward reaches x
    return tuple(out)


def step(model: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    out = model(*args)
    out.float().square().mean().backward()
    return out.detach()


def timed(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Median seconds of fn() after one warm-up call (which also compiles)."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def adapter_params(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """This adapter's parameters by name: ours `...lora_A.student`, peft's `...lora_A.student.weight`."""
    return {n: p for n, p in model.named_parameters() if f".{adapter}" in n and "lora_" in n}


def composition(kind: str, cfg: WanConfig, rank: int, device: torch.device, dtype: torch.dtype, tokens: int,
                backend: str) -> dict[str, str]:
    """Part 2 for one variant: {check: "yes ..." / "no ..."}."""
    rows: dict[str, str] = {}
    base_keys = set(build("base", cfg, rank, device, dtype).state_dict())
    model = build(kind, cfg, rank, device, dtype)
    keys = set(model.state_dict())
    lost = sorted(base_keys - keys)
    rows["base keys unchanged"] = "yes" if not lost else f"no ({lost[0]} -> {min(keys - base_keys)})"

    args = inputs(cfg, tokens, device, dtype)
    explain = torch._dynamo.explain(model.blocks[0])(*args)
    torch._dynamo.reset()
    rows["compile: graph breaks"] = f"{'yes' if explain.graph_break_count == 0 else 'no'} " \
                                    f"({explain.graph_break_count} breaks, {explain.graph_count} graphs)"

    eager = step(model, args)
    eager_grads = {n: p.grad.clone() for n, p in adapter_params(model, "student").items()}
    sharded = build(kind, cfg, rank, device, dtype)
    sharded.blocks[0].compile(backend=backend)  # parallel/ order: compile per block, then FSDP per block, root
    fully_shard(sharded.blocks[0])
    fully_shard(sharded)
    args = inputs(cfg, tokens, device, dtype)
    out = step(sharded, args)
    grads = {n: p.grad for n, p in adapter_params(sharded, "student").items()}
    ok = all(g is not None for g in grads.values()) and len(grads) == len(eager_grads)
    err = max(rel(out, eager), *(rel(g.full_tensor(), eager_grads[n]) for n, g in grads.items() if g is not None))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    rows["compile + FSDP2 fwd/bwd == eager"] = f"{'yes' if ok and err < tol else 'no'} (max rel err {err:.1e})"

    state = get_model_state_dict(sharded)
    saved = {n: p.full_tensor().clone() for n, p in adapter_params(sharded, "student").items()}
    with tempfile.TemporaryDirectory() as folder:
        dcp.save({"model": state}, checkpoint_id=folder)
        with torch.no_grad():
            for p in adapter_params(sharded, "student").values():
                p.zero_()
        state = get_model_state_dict(sharded)
        dcp.load({"model": state}, checkpoint_id=folder)
        set_model_state_dict(sharded, state)
    same = all(torch.equal(p.full_tensor(), saved[n]) for n, p in adapter_params(sharded, "student").items())
    rows["DCP save/load round trip"] = "yes" if same else "no"

    set_adapter(model, kind, "critic")
    frozen = [n for n, p in adapter_params(model, "student").items() if not p.requires_grad]
    rows["adapter switch keeps requires_grad"] = "yes" if not frozen else f"no ({len(frozen)} student params frozen)"
    set_adapter(model, kind, "student")

    with torch.no_grad():
        args = tuple(a.detach() for a in inputs(cfg, tokens, device, dtype))
        adapted = model(*args)
        without = build("base", cfg, rank, device, dtype)(*args)
        for name, prepare in (("fp8", quantize_linears_fp8), ("fused rows", enable_fused_rows)):
            if name == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
                continue
            swapped = copy.deepcopy(model).requires_grad_(False)
            try:
                prepare(swapped)
            except ValueError as e:  # the swap refuses an unmerged adapter up front (sampling merges first)
                rows[f"{name} swap keeps unmerged adapter"] = f"no (refused up front: {type(e).__name__})"
                continue
            try:
                out = swapped(*args)
            except (RuntimeError, NotImplementedError, TypeError) as e:  # the swap left a module it cannot feed
                rows[f"{name} swap keeps unmerged adapter"] = f"no (forward raises {type(e).__name__}: " \
                                                              f"{str(e).splitlines()[0][:60]})"
                continue
            kept = rel(out, adapted) < rel(out, without)
            rows[f"{name} swap keeps unmerged adapter"] = (f"{'yes' if kept else 'no'} (rel err to adapted "
                                                          f"{rel(out, adapted):.1e}, to base {rel(out, without):.1e})")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan21_1.3b", choices=list(WAN_CONFIGS))
    p.add_argument("--tokens", type=int, help="video tokens (default: 32760 on a GPU = 81x480x832; 1024 on CPU)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny block, 64 tokens, 2 iterations, aot_eager compile")
    args = p.parse_args()
    _, _, device = init_distributed()  # FSDP2 needs a process group: one process here
    if args.smoke:
        args.preset, args.tokens, args.iters, args.rank = "tiny", 64, 2, 4
    cfg = WAN_CONFIGS[args.preset]
    tokens = args.tokens or (32760 if device.type == "cuda" else 1024)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "aot_eager" if args.smoke else "inductor"

    times: dict[str, list[float]] = {}
    x = inputs(cfg, tokens, device, dtype)
    for kind in ("base", "ours", "peft"):
        times[kind] = []
        for compiled in (False, True):
            model = build(kind, cfg, args.rank, device, dtype)
            if compiled:
                model.blocks[0].compile(backend=backend)
            times[kind].append(timed(functools.partial(step, model, x), args.iters, device))
            del model
            torch._dynamo.reset()

    import peft

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.preset} block (dim {cfg.dim}, ffn {cfg.ffn_dim}), {tokens} tokens + {TEXT_TOKENS} text, rank "
          f"{args.rank}, 2 adapters, {dtype} | {name} | torch {torch.__version__}, peft {peft.__version__}")
    print(f"{'fwd+bwd of one block':34s} {'eager ms':>10s} {'vs base':>8s} {'compiled ms':>12s} {'vs base':>8s}")
    for kind, label in (("base", "base (no adapter)"), ("ours", "ours: models/lora.py LoRALinear"),
                        ("peft", "peft: inject_adapter_in_model")):
        (e, c), (be, bc) = times[kind], times["base"]
        print(f"{label:34s} {1e3 * e:10.2f} {e / be:8.2f} {1e3 * c:12.2f} {c / bc:8.2f}")
    print(flush=True)  # part 1 stands on its own if part 2 fails
    checks = {kind: composition(kind, cfg, args.rank, device, dtype, min(tokens, 256), backend)
              for kind in ("ours", "peft")}
    width = max(len(v) for v in checks["ours"].values())
    print(f"{'composition':40s} {'ours':{width}s} peft")
    for check in checks["ours"]:
        print(f"{check:40s} {checks['ours'][check]:{width}s} {checks['peft'].get(check, '-')}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
