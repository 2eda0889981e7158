"""GPU check of Wan2.2-A14B sampling at real size, random weights: the two-expert CFG teacher and a one-transformer
3-step VSA student on one GPU, peak memory and denoise times (the teacher's measured per step, extrapolated).

    PYTHONPATH=$PWD python scripts/check_a14b_sampling_gpu.py --model wan22_t2v_a14b          # 81x480x832, H200
    PYTHONPATH=$PWD python scripts/check_a14b_sampling_gpu.py --model wan22_i2v_a14b          # + I2V condition
    PYTHONPATH=$PWD python scripts/check_a14b_sampling_gpu.py --smoke                         # tiny, CPU

Three DiTs are resident (high- and low-noise teacher experts, the student), bf16: ~86 GB of weights at 14B. The
teacher runs `--teacher-steps` UniPC steps (the boundary falls inside them, so both experts run) after a one-step
warm-up; its per-step time is extrapolated to `--teacher-total` steps (40, the published A14B sampling). The student
runs `--student-steps` DMD steps with VSA at `--sparsity` after a warm-up run. No VAE, no text encoder: random
context; the I2V models get a random (1, 20, T, h, w) condition (mask + image latent), which costs the same.
Prints one line per measurement and a final `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from inference.pipeline import student_attention
from inference.prepare import prepare_for_inference
from inference.samplers import denoise_student, denoise_teacher
from models.wan import WAN_CONFIGS, WanConfig, WanModel, config_with

BOUNDARY = {"wan22_t2v_a14b": 875.0, "wan22_i2v_a14b": 900.0}  # boundary_ratio * 1000 of the published pipelines
GIB = 2**30


def build(cfg: WanConfig, attn: str, device: torch.device, dtype: torch.dtype, seed: int) -> WanModel:
    """Random weights straight in `dtype` on `device` (no fp32 copy: three 14B models must fit at once)."""
    with torch.device("meta"):
        model = WanModel(cfg, attn_fn=student_attention(attn)).to(dtype)
    model = model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model.eval().requires_grad_(False)


def timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(BOUNDARY), default="wan22_t2v_a14b")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--teacher-steps", type=int, default=4, help="timed teacher steps (after a 1-step warm-up)")
    p.add_argument("--teacher-total", type=int, default=40, help="the teacher step count to extrapolate to")
    p.add_argument("--student-steps", default="1000,757,522")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--shift", type=float, default=12.0, help="teacher flow shift (12: Wan2.2-T2V-A14B)")
    p.add_argument("--smoke", action="store_true", help="tiny experts and sizes on the CPU")
    args = p.parse_args(argv)

    cfg = WAN_CONFIGS[args.model]
    device, dtype = torch.device("cuda"), torch.bfloat16
    if args.smoke:
        tiny = WAN_CONFIGS["tiny"]  # 4 latent channels; I2V: + 4 mask + 4 image-latent channels
        cfg = config_with(tiny, in_channels=12) if cfg.in_channels != cfg.out_channels else tiny
        args.frames, args.height, args.width, args.teacher_total = 9, 64, 64, 6
        device, dtype = torch.device("cpu"), torch.float32
    i2v = cfg.in_channels != cfg.out_channels
    latent_shape = (1, cfg.out_channels, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    steps = [float(s) for s in args.student_steps.split(",")]

    high = build(cfg, "sdpa", device, dtype, seed=0)
    low = build(cfg, "sdpa", device, dtype, seed=1)
    student = build(config_with(cfg, vsa_gate=True), "vsa", device, dtype, seed=2)
    nets = [prepare_for_inference(m, fp8=False, compile=False, fused_rows=True) for m in (high, low, student)]
    high, low, student = nets
    g = torch.Generator(device).manual_seed(0)
    context = torch.randn(1, 512, cfg.text_dim, generator=g, device=device)
    negative = torch.randn(1, 512, cfg.text_dim, generator=g, device=device)
    condition = None
    if i2v:
        condition = torch.randn(1, cfg.in_channels - cfg.out_channels, *latent_shape[2:], generator=g, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    weights_gib = sum(p.numel() * p.element_size() for m in nets for p in m.parameters()) / GIB
    print(f"{args.model}: latents {latent_shape}, {'I2V, ' if i2v else ''}weights resident {weights_gib:.1f} GiB")

    def teacher(n: int) -> torch.Tensor:
        return denoise_teacher(high, context, negative, latent_shape, torch.Generator(device).manual_seed(1),
                               num_steps=n, guidance=4.0, guidance_2=3.0, shift=args.shift, condition=condition,
                               model_2=low, boundary=BOUNDARY[args.model], progress=False)

    def distilled() -> torch.Tensor:
        from attention.vsa import vsa_meta

        meta = vsa_meta(student.token_grid((1, cfg.in_channels, *latent_shape[2:])), args.sparsity, device)
        return denoise_student(student, context, latent_shape, steps, torch.Generator(device).manual_seed(1),
                               attn_meta=meta, condition=condition, progress=False)

    timed(lambda: teacher(1), device)  # warm-up (kernels, allocator)
    out, teacher_s = timed(lambda: teacher(args.teacher_steps), device)
    assert torch.isfinite(out).all()
    per_step = teacher_s / args.teacher_steps
    print(f"teacher (2 experts, CFG): {args.teacher_steps} steps {teacher_s:.2f} s = {per_step:.3f} s/step -> "
          f"{args.teacher_total} steps {per_step * args.teacher_total:.1f} s (extrapolated)")
    timed(distilled, device)  # warm-up
    out, student_s = timed(distilled, device)
    assert torch.isfinite(out).all()
    print(f"student ({len(steps)} steps, VSA sparsity {args.sparsity}): {student_s:.2f} s")
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0
    result = {
        "model": args.model, "latent_shape": list(latent_shape), "weights_gib": round(weights_gib, 2),
        "peak_allocated_gib": round(peak, 2), "teacher_s_per_step": round(per_step, 4),
        "teacher_total_s": round(per_step * args.teacher_total, 2), "teacher_total_steps": args.teacher_total,
        "student_s": round(student_s, 3), "speedup": round(per_step * args.teacher_total / student_s, 1),
    }
    print(f"peak allocated {peak:.1f} GiB; speedup {result['speedup']}x")
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
