"""GPU check that the training-speed switches change no gradient (issue 9, acceptance 3, on the real model).

    python scripts/check_speedups_gpu.py                  # 1.3B, 77x448x832 latents, one GPU
    python scripts/check_speedups_gpu.py --preset tiny --latent 4,8,16     # CPU smoke run

One FSDP2-wrapped dense network (the critic's setup: bf16 compute, fp32 master weights and gradients) takes one
flow-matching forward + backward on the same inputs under each switch: fp32 eager (the reference), bf16 eager without
AC, with full and selective AC, per-block compile (the block inside the AC wrapper, parallel/compile.py) without AC,
with full and selective AC, and the AC wrapper itself compiled (torchtitan's order); then, to locate an error of the
compiled runs, eager and compiled without FSDP2, compiled with flash instead of cuDNN attention, compiled under FSDP2
without resharding after forward (no re-all-gather for backward), and compiled with the self-attention call kept out
of the graph (torch.compiler.disable), compiled without cuDNN attention anywhere, compiled in fp32, and compiled
with inductor's mix-order reduction on (torch's default, off in parallel/compile.py). For each it
prints the loss, the global gradient norm from torch.nn.utils.clip_grad_norm_ (DTensor), from our local-shard
components.optim.clip_grad_norm and in float64 from the full gradients, and the relative L2 distance of all gradients
to an fp32 eager run; the bf16 floor is the plain bf16 eager run's distance, and a switch must stay near it.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch._inductor.config
from torch.nn.attention import sdpa_kernel

import attention.sdpa as sdpa_module
from attention.sdpa import sdpa_attention
from attention.vsa import vsa_attention, vsa_meta, vsa_reference
from components.optim import clip_grad_norm
from models.wan import WAN_CONFIGS, WanModel, config_with
from parallel.fsdp import apply_fsdp
from parallel.mesh import build_mesh, init_distributed
from parallel.wan import parallelize_wan

SWITCHES = [("eager fp32", "none"), ("eager", "none"), ("eager", "full"), ("eager", "selective"),
            ("eager", "attention"),
            ("compile", "none"),
            ("compile", "full"), ("compile", "selective"), ("compile outer", "full"), ("compile outer", "selective"),
            # where a compiled error comes from: without FSDP2 (fp32 params, autocast), and without cuDNN attention
            ("eager nofsdp", "none"), ("compile nofsdp", "none"), ("compile flash", "none"),
            # FSDP2 keeps the unsharded params from forward to backward (no re-all-gather on its own CUDA stream)
            ("compile noreshard", "none"),
            # a candidate fix: attention left out of the compiled graph (eager autograd around cuDNN / the VSA ops)
            ("compile attn-eager", "none"), ("compile attn-eager", "full"),
            # no cuDNN attention anywhere (also the cross-attention's plain F.scaled_dot_product_attention), and the
            # compiled fp32 model under FSDP2 (no autocast: separates a bf16/autocast error from a compile error)
            ("compile nocudnn", "none"), ("compile fp32", "none"),
            # with inductor's mix-order reduction left on (torch's default; the bug in parallel/compile.py)
            ("compile mixorder", "none"), ("compile", "attention")]


CUDNN_FIRST = list(sdpa_module._CUDA_PRIORITY)
FLASH_FIRST = [b for b in CUDNN_FIRST if b.name != "CUDNN_ATTENTION"]  # cuDNN out of the compiled graph's choices


def backends(no_cudnn: bool):
    """Every SDPA call of the model (self- and cross-attention) without cuDNN, or no restriction."""
    return sdpa_kernel(FLASH_FIRST) if no_cudnn and torch.cuda.is_available() else contextlib.nullcontext()


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        out[name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")] = g.detach().double().cpu()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan21_1.3b", choices=list(WAN_CONFIGS))
    p.add_argument("--latent", default="12,28,52", help="latent T,H,W (eager without AC must fit: not 77x448x832)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "vsa"], help="vsa: the student's attention, rho 0.8")
    p.add_argument("--layers", type=int, default=0, help="override num_layers (faster; the error is per block)")
    p.add_argument("--only", default="", help="comma-separated MODE+AC switches, e.g. 'eager+none,compile flash+none'")
    args = p.parse_args()
    rank, world, device = init_distributed()
    cfg = WAN_CONFIGS[args.preset]
    if args.layers:
        cfg = config_with(cfg, num_layers=args.layers)
    dims = build_mesh(world, 1, 1, device.type, cfg.num_heads)
    shape = tuple(int(s) for s in args.latent.split(","))
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, cfg.in_channels, *shape, device=device, generator=g)
    target = torch.randn(1, cfg.out_channels, *shape, device=device, generator=g)
    context = torch.randn(1, 512, cfg.text_dim, device=device, generator=g)
    t = torch.tensor([600.0], device=device)
    ref = None
    only = args.only.split(",") if args.only else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{args.preset} {args.attn} | latent {shape} | {name} | torch {torch.__version__}")
    say(f"{'switch':30s} {'loss':>10s} {'norm torch':>12s} {'norm ours':>12s} {'norm fp64':>12s} {'grad rel':>10s}"
        "  worst parameters (rel. error)", flush=True)
    for mode, ac in SWITCHES:
        if only and mode != "eager fp32" and f"{mode}+{ac}" not in only:  # fp32 always: it is the reference
            continue
        try:  # one failing switch (a compile error) must not hide the others' rows
            loss, grads, ours, theirs = run_switch(args, cfg, dims, device, mode, ac, (x, t, context, target))
        except Exception as e:  # noqa: BLE001 - reported as the switch's row
            say(f"{mode + ' + AC ' + ac:30s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        if mode == "eager fp32":  # the reference: every bf16 switch is compared with fp32
            ref = grads
        exact = sum(v.square().sum() for v in grads.values()).sqrt().item()
        num = sum((grads[k] - ref[k]).square().sum() for k in ref).sqrt()
        den = sum(v.square().sum() for v in ref.values()).sqrt()
        # where the error sits (last block only: its input gradient; every block: the blocks; embedders: tmod/context)
        err = {k: (grads[k] - ref[k]).norm().item() for k in ref}  # ranked by absolute error, shown relative
        worst = ", ".join(f"{k} {err[k] / max(ref[k].norm().item(), 1e-30):.1e}"
                          for k in sorted(err, key=lambda k: -err[k])[:3])
        rel = (num / den).item()
        say(f"{mode + ' + AC ' + ac:30s} {loss:10.5f} {theirs:12.5g} {ours:12.5g} {exact:12.5g} {rel:10.2e}"
            f"  {worst}", flush=True)
        del grads
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_switch(args: argparse.Namespace, cfg, dims, device: torch.device, mode: str, ac: str,
               batch: tuple) -> tuple[float, dict[str, torch.Tensor], float, float]:
    """Build the model under one switch, run two fwd+bwd passes, return the loss, full gradients and both norms."""
    x, t, context, target = batch
    # Every switch compiles afresh: the compiled block graphs are cached on WanBlock.forward's code object, and
    # the SDPA backend choice (made while tracing) is not among their guards.
    torch._dynamo.reset()
    no_cudnn = mode in ("compile flash", "compile nocudnn")
    sdpa_module._CUDA_PRIORITY[:] = FLASH_FIRST if no_cudnn else CUDNN_FIRST
    fp32 = mode in ("eager fp32", "compile fp32")
    vsa = args.attn == "vsa"
    attn_fn = (vsa_reference if mode == "eager fp32" else vsa_attention) if vsa else sdpa_attention
    if mode == "compile attn-eager":
        attn_fn = torch.compiler.disable(attn_fn)
    with torch.device("meta"):
        model = WanModel(config_with(cfg, vsa_gate=vsa), attn_fn=attn_fn)
    param_dtype = torch.float32 if fp32 else torch.bfloat16
    parallelize_wan(model, dims, ac_mode=ac, compile=mode.startswith("compile") and mode != "compile outer",
                    fsdp="nofsdp" not in mode and "noreshard" not in mode, param_dtype=param_dtype)
    if "noreshard" in mode:
        apply_fsdp(model, dims.fsdp_mesh, param_dtype=param_dtype, reshard_after_forward=False)
    if mode == "compile outer":  # torchtitan's order: the checkpoint wrapper itself compiled (AC inside the graph)
        for block in model.blocks:
            block.compile(fullgraph=False)
    # read when the graphs compile (at the first call): parallel/compile.py turns it off, this switch back on
    torch._inductor.config.triton.mix_order_reduction = mode == "compile mixorder"
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    meta = vsa_meta(model.token_grid(x.shape), 0.8, device) if vsa else None
    if vsa:  # a live gate, so the coarse branch counts too
        with torch.no_grad():
            for block in model.blocks:
                w = getattr(block, "_checkpoint_wrapped_module", block).attn1.to_gate_compress.weight
                w.normal_(0, 0.02)  # after the seeded init: the same values in every switch
    for _ in range(2):  # the second pass is measured: compilation and lazy init are done in the first
        model.zero_grad(set_to_none=True)
        with backends(mode == "compile nocudnn"):
            with torch.autocast(device.type, torch.bfloat16, enabled=not fp32):
                loss = ((model(x, t, context, meta).float() - target) ** 2).mean()
            loss.backward()
    grads = full_grads(model)
    ours = clip_grad_norm(list(model.parameters()), float("inf")).item()
    theirs = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    theirs = (theirs.full_tensor() if hasattr(theirs, "full_tensor") else theirs).item()
    return loss.item(), grads, ours, theirs

if __name__ == "__main__":
    main()
