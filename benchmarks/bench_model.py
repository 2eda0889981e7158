"""Time one DiT forward at real size with random weights (speed does not depend on weight values).

    python benchmarks/bench_model.py                       # Wan2.1-1.3B, 81x480x832 (latent 21x60x104), bf16
    python benchmarks/bench_model.py --preset wan21_14b --latent 21,60,104 --diffusers
    python benchmarks/bench_model.py --smoke          # CPU, the tiny preset: every row, in seconds

Reports our forward (dense cuDNN SDPA), the attention share of it (the same forward with attention replaced by a
pass-through, subtracted), and optionally diffusers' WanTransformer3DModel on the same inputs. Times are medians of CUDA
events; off the GPU (--smoke) of wall-clock runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attention.sdpa import sdpa_attention
from models.wan import WAN_CONFIGS, WanModel


def time_ms(fn, warmup: int = 2, reps: int = 5) -> float:
    """Median time of fn() in ms: CUDA events on a GPU, the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if not torch.cuda.is_available():
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def no_attention(q, k, v, meta=None, gate=None):
    return v


def build(preset: str, attn_fn, device: str) -> WanModel:
    with torch.device("meta"):
        model = WanModel(WAN_CONFIGS[preset], attn_fn=attn_fn)
    model.to_empty(device=device)
    model.init_weights()
    return model.to(torch.bfloat16).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan21_1.3b", choices=list(WAN_CONFIGS))
    parser.add_argument("--latent", default="21,60,104", help="latent T,H,W (81x480x832 -> 21,60,104)")
    parser.add_argument("--diffusers", action="store_true", help="also time diffusers' WanTransformer3DModel")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset at latent 2,4,8 with --diffusers")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.latent, args.diffusers = "tiny", "2,4,8", True
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench_model.py needs a CUDA GPU (or --smoke)")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    cfg = WAN_CONFIGS[args.preset]
    t_lat, h_lat, w_lat = (int(s) for s in args.latent.split(","))
    g = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(1, cfg.in_channels, t_lat, h_lat, w_lat, device=device, dtype=torch.bfloat16, generator=g)
    context = torch.randn(1, 512, cfg.text_dim, device=device, dtype=torch.bfloat16, generator=g)
    t = torch.tensor([757.0], device=device)
    tokens = t_lat * (h_lat // 2) * (w_lat // 2)

    rows = []
    model = build(args.preset, sdpa_attention, device)
    with torch.no_grad():
        full = time_ms(lambda: model(latents, t, context))
        for block in model.blocks:
            block.attn1.attn_fn = no_attention
        without = time_ms(lambda: model(latents, t, context))
        for block in model.blocks:
            block.attn1.attn_fn = sdpa_attention
        rows.append(("ours (cuDNN SDPA)", full))
        if args.compile:
            compiled = torch.compile(model)
            rows.append(("ours, torch.compile", time_ms(lambda: compiled(latents, t, context), warmup=3)))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()

    if args.diffusers:
        from diffusers import WanTransformer3DModel

        with torch.device("meta"):
            ref = WanTransformer3DModel(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")})
        ref = ref.to_empty(device=device).to(torch.bfloat16).eval()
        with torch.no_grad():
            rows.append(("diffusers WanTransformer3DModel", time_ms(lambda: ref(latents, t, context, return_dict=False))))

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{name} | torch {torch.__version__} | {args.preset} | latent {t_lat}x{h_lat}x{w_lat} = {tokens} tokens"
          " | bf16, text 512")
    print(f"{'forward':36s} {'ms':>9s}")
    for name, ms in rows:
        print(f"{name:36s} {ms:9.1f}")
    print(f"{'attention share (ours)':36s} {100 * (full - without) / full:8.1f}%  ({full - without:.1f} ms of {full:.1f})")


if __name__ == "__main__":
    main()
