"""Inference speed at real size with random bf16 weights (speed does not depend on weight values), one GPU, one run.

    python benchmarks/bench_inference.py                    # cases a, b, c (~5 min on an H100, no compile)
    python benchmarks/bench_inference.py --cases a --compile --profile
    python benchmarks/bench_inference.py --cases b --diffusers    # also time diffusers' dense teacher
    python benchmarks/bench_inference.py --cases a,b --fp8        # also time the students in FP8 (sample.py --fp8)
    python benchmarks/bench_inference.py --cases a --compile --fp8 --pipeline   # + the same through VideoPipeline
    python benchmarks/bench_inference.py --smoke            # every code path at toy size, CPU is fine (tests use it)
    python benchmarks/bench_inference.py --sp 1 --compile --fp8        # one GPU: the N = 1 SP path vs the sampler
    torchrun --nproc_per_node 8 benchmarks/bench_inference.py --sp 1,2,4,8 --compile --fp8   # Ulysses, N GPUs

Cases (text embeddings are random and cached; denoising uses inference/samplers.py, the loops tools/sample.py runs):
  a  Wan2.1-1.3B, 81x480x832: 3-step VSA (sparsity 0.8) denoise; VAE decode (plain / channels-last / compiled);
     end to end = denoise + VAE decode -> frames/s.
  b  Wan2.1-14B at 81x480x832 and 81x720x1280: the 50-step dense CFG teacher (2 steps of cond + uncond timed,
     x50 / 2) vs the 3-step VSA (sparsity 0.9) student -> denoising-loop speedup. The teacher is our dense model
     (cuDNN SDPA); --diffusers also times diffusers' WanTransformer3DModel as the teacher.
  c  Wan2.2-TI2V-5B, 121x704x1280: 3-step student, dense and VSA (sparsity 0.8).
--compile compiles each DiT per block (parallel/compile.py: one graph per shape and attention, reused by all blocks).
--fp8 (cases a, b): the student again as `tools/sample.py --fp8` runs it: FP8 (e4m3, row-wise scaled) block linears
(inference/fp8.py) and VSA on e4m3 q, k, v (vsa_fp8_attention), on a second model built after the bf16 one is freed;
extra rows, the bf16 rows stay.
--pipeline (case a): the same 3-step denoise through `inference.VideoPipeline` (built from a random DiT with the
run's --fp8 / --compile, cached text context), timed right after case a's matching row, and its ratio to that row
(the pipeline adds only Python around the same sampler: ~1.00).
--sp N,... (instead of the cases): the 3-step student denoise of the 1.3B (81x480x832, VSA 0.8) and the 14B
(81x480x832 and 81x720x1280, VSA 0.9) with Ulysses sequence parallel over N = 1, 2, 4, 8 GPUs (inference/parallel.py),
each N that the launch has GPUs for: one model per size on every rank, timed on ranks [0, N) (the others wait), N = 1
first, so the speedups divide times of one run; each N > 1 also reports how far its latents are from N = 1's. On one
process the N = 1 row runs twice: the sampler on the prepared DiT, as case a times it, and
`VideoPipeline(sp=1).denoise`, the code path `tools/sample.py` takes, with their ratio.
--json PATH writes the result rows as JSON (tests read it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from attention.vsa import vsa_meta
from inference import VideoPipeline, prepare_for_inference
from inference.fp8 import fp8_device_problem
from inference.parallel import SamplingGroups, apply_sequence_parallel, check_token_grid
from inference.pipeline import ATTN, VAE_TEMPORAL_RATIO, channels_last
from inference.samplers import denoise_student
from models.wan import WAN_CONFIGS, WanModel, config_with
from parallel.mesh import init_distributed

DMD_STEPS = [1000.0, 757.0, 522.0]
FP8_ATTN, FP8_LABEL = "vsa_fp8", "fp8 linears + fp8 attention"  # the student as `sample.py --fp8` runs it
TEACHER_STEPS = 50
TEACHER_TIMED_STEPS = 2
# Wan2.1 VAE (z_dim 16, 8x spatial, 4x temporal), as in the released config.
WAN21_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
             "temperal_downsample": [False, True, True]}
SHAPES = {  # latent (T, H, W)
    "480p": (21, 60, 104),  # 81 x 480 x 832 through the Wan2.1 VAE
    "720p": (21, 90, 160),  # 81 x 720 x 1280
    "5b_720p": (31, 44, 80),  # 121 x 704 x 1280 through the Wan2.2 VAE (16x spatial)
}
SMOKE_SHAPE = (2, 4, 8)
SMOKE_VAE = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
             "temperal_downsample": [False, True, True]}


class Bench:
    """Timing on one device plus the result table."""

    def __init__(self, device: torch.device, smoke: bool, compile_dit: bool, rank: int = 0) -> None:
        self.device, self.smoke, self.compile_dit = device, smoke, compile_dit
        self.rank = rank  # under torchrun (--sp): rank 0 alone records rows
        self.dtype = torch.bfloat16
        self.rows: list[tuple[str, str, float, str]] = []  # (case, what, value, unit)

    def time_s(self, fn: Callable[[], object], warmup: int = 1, reps: int = 3) -> float:
        """Median seconds of fn(); CUDA events on GPU."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def row(self, case: str, what: str, value: float, unit: str) -> None:
        self.rows.append((case, what, value, unit))
        print(f"[{case}] {what}: {value:.3f} {unit}", flush=True)

    def preset(self, name: str) -> str:
        return "tiny" if self.smoke else name

    def latent(self, shape: str, channels: int) -> tuple[int, int, int, int, int]:
        return (1, channels, *(SMOKE_SHAPE if self.smoke else SHAPES[shape]))

    def random_model(self, preset: str) -> WanModel:
        """Meta -> bf16 -> to_empty -> random init: peak memory is one bf16 copy (14B: 28 GB). With the VSA gate, as
        the distilled checkpoints have it; dense runs (attn_meta None) skip the gate."""
        cfg = config_with(WAN_CONFIGS[self.preset(preset)], vsa_gate=True)
        if self.smoke:  # head dim 64, the VSA kernels' smallest: --smoke also runs on a GPU
            cfg = config_with(cfg, dim=128, ffn_dim=256, num_heads=2)
        with torch.device("meta"):
            model = WanModel(cfg)
        model = model.to(self.dtype).to_empty(device=self.device)
        model.init_weights()
        return model

    def build(self, preset: str, fp8: bool = False) -> WanModel:
        """A random model readied as tools/sample.py readies it (`prepare_for_inference`): fp8 block linears
        (quantized layer by layer: the peak stays about one bf16 copy), fused row kernels, per-block compile (one graph
        per (shape, attention) serves all blocks)."""
        return prepare_for_inference(self.random_model(preset), fp8=fp8, compile=self.compile_dit)

    @staticmethod
    def set_attention(model: WanModel, attn: str) -> None:
        """Swap the attention of every block (one model serves as dense teacher and VSA student here)."""
        for block in model.blocks:
            block.attn1.attn_fn = ATTN[attn]

    def context(self, model: WanModel) -> torch.Tensor:
        g = torch.Generator(self.device).manual_seed(0)
        return torch.randn(1, 512, model.cfg.text_dim, generator=g, device=self.device)

    def student_s(self, model: WanModel, shape: tuple[int, ...], sparsity: float | None, attn: str = "vsa") -> float:
        """Seconds of the 3-step DMD loop (3 forwards + re-noising), VSA metadata built once per shape; attn: the
        sparse attention ("vsa" or "vsa_fp8")."""
        self.set_attention(model, "sdpa" if sparsity is None else attn)
        context = self.context(model)
        meta = None if sparsity is None else vsa_meta(model.token_grid(shape), sparsity, self.device)

        def run() -> torch.Tensor:
            with torch.no_grad():
                g = torch.Generator(self.device).manual_seed(0)
                return denoise_student(model, context, shape, DMD_STEPS, g, attn_meta=meta, progress=False)

        return self.time_s(run, warmup=2 if self.compile_dit else 1)

    def teacher_step_s(self, forward: Callable, shape: tuple[int, ...], text_dim: int) -> float:
        """Seconds of one CFG step: a conditional and an unconditional dense forward, combined."""
        g = torch.Generator(self.device).manual_seed(0)
        x = torch.randn(shape, generator=g, device=self.device)
        cond, uncond = (torch.randn(1, 512, text_dim, generator=g, device=self.device, dtype=self.dtype)
                        for _ in range(2))
        t = torch.full((1,), 757.0, device=self.device)

        def step() -> torch.Tensor:
            with torch.no_grad():  # plain bf16 like the sampler: inputs cast to the weights' dtype
                x_in = x.to(self.dtype)
                v_cond, v_uncond = forward(x_in, t, cond).float(), forward(x_in, t, uncond).float()
                return v_uncond + 5.0 * (v_cond - v_uncond)

        return self.time_s(step, warmup=1, reps=TEACHER_TIMED_STEPS)

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def diffusers_forward(bench: Bench, preset: str) -> tuple[Callable, torch.nn.Module]:
    """diffusers' WanTransformer3DModel with the same config, random bf16 weights."""
    from diffusers import WanTransformer3DModel

    cfg = WAN_CONFIGS[bench.preset(preset)]
    with torch.device("meta"):
        ref = WanTransformer3DModel(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")})
    ref = ref.to(bench.dtype).to_empty(device=bench.device).eval().requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.02)
    for name, module in ref.named_modules():  # as from_pretrained(torch_dtype=bf16) leaves them
        if any(keep in name.split(".") for keep in ref._keep_in_fp32_modules or []):
            module.float()
    return (lambda x, t, c: ref(x, t, c, return_dict=False)[0]), ref


def vae_decode_times(bench: Bench, compile_vae: bool) -> dict[str, float]:
    """Seconds of `AutoencoderKLWan.decode` on 81x480x832-sized latents, per variant (bf16)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**(SMOKE_VAE if bench.smoke else WAN21_VAE)).to(bench.device, bench.dtype).eval()
    z = torch.randn(bench.latent("480p", vae.config.z_dim), device=bench.device, dtype=bench.dtype)
    z_cl = z.contiguous(memory_format=torch.channels_last_3d)
    times = {}
    with torch.no_grad():
        times["plain"] = bench.time_s(lambda: vae.decode(z).sample, warmup=1, reps=2)
        if bench.device.type == "cuda":
            # cuDNN autotuning: a one-shot CLI pays the search in its only decode, so report the first call too.
            torch.backends.cudnn.benchmark = True
            times["cudnn.benchmark, first call"] = bench.time_s(lambda: vae.decode(z).sample, warmup=0, reps=1)
            times["cudnn.benchmark"] = bench.time_s(lambda: vae.decode(z).sample, warmup=0, reps=2)
            torch.backends.cudnn.benchmark = False
        channels_last(vae)
        times["channels-last"] = bench.time_s(lambda: vae.decode(z_cl).sample, warmup=1, reps=2)
        if compile_vae:
            vae.decoder.compile()
            times["channels-last + compile"] = bench.time_s(lambda: vae.decode(z_cl).sample, warmup=2, reps=2)
    del vae
    bench.free()
    return times


def case_a(bench: Bench, args: argparse.Namespace) -> None:
    frames = 81
    model = bench.build("wan21_1.3b")
    shape = bench.latent("480p", model.cfg.in_channels)
    student = bench.student_s(model, shape, 0.8)
    bench.row("a", "1.3B 81x480x832 student 3-step VSA 0.8 denoise", student, "s")
    if args.profile:
        profile(bench, model, shape, "bf16")
    del model
    bench.free()
    if args.fp8:
        model = bench.build("wan21_1.3b", fp8=True)
        student_fp8 = bench.student_s(model, shape, 0.8, FP8_ATTN)
        bench.row("a", f"1.3B 81x480x832 student 3-step VSA 0.8 denoise, {FP8_LABEL}", student_fp8, "s")
        if args.profile:
            profile(bench, model, shape, FP8_LABEL, FP8_ATTN)
        bench.row("a", f"1.3B student denoise speedup, {FP8_LABEL} vs bf16", student / student_fp8, "x")
        del model
        bench.free()
    if args.pipeline:
        through_pipeline = pipeline_s(bench, args, shape)
        bench.free()
        reference, label = (student_fp8, FP8_LABEL) if args.fp8 else (student, "bf16")
        bench.row("a", f"1.3B 81x480x832 student 3-step VSA 0.8 denoise through VideoPipeline, {label}",
                  through_pipeline, "s")
        bench.row("a", f"VideoPipeline / sampler denoise time, {label}", through_pipeline / reference, "x")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("[a] VAE decode skipped: diffusers is not installed")
        return
    times = vae_decode_times(bench, compile_vae=args.compile)
    for name, s in times.items():
        bench.row("a", f"VAE decode 81x480x832 bf16, {name}", s, "s")
    best = min((k for k in times if "first call" not in k), key=times.get)
    total = student + times[best]
    bench.row("a", f"end to end: denoise + decode ({best})", total, "s")
    bench.row("a", "end to end frames/s (81 frames / end to end)", frames / total, "frames/s")
    if args.fp8:
        total_fp8 = student_fp8 + times[best]
        bench.row("a", f"end to end, {FP8_LABEL}: denoise + decode ({best})", total_fp8, "s")
        bench.row("a", f"end to end frames/s, {FP8_LABEL} (81 frames / end to end)", frames / total_fp8, "frames/s")


def pipeline_s(bench: Bench, args: argparse.Namespace, shape: tuple[int, ...]) -> float:
    """Seconds of case a's 3-step denoise through `VideoPipeline.denoise`: a pipeline built from a fresh random 1.3B
    DiT, readied by the pipeline itself (--fp8: FP8 linears and, on Hopper, FP8 VSA; --compile), text context cached."""
    pipe = VideoPipeline(bench.random_model("wan21_1.3b"), attn="vsa", fp8=args.fp8, compile=bench.compile_dit)
    context = bench.context(pipe.dit)
    _, _, t, h, w = shape  # latent sizes -> the video's
    frames, height, width = (t - 1) * VAE_TEMPORAL_RATIO + 1, h * pipe.spec.vae_ratio, w * pipe.spec.vae_ratio

    def run() -> torch.Tensor:
        return pipe.denoise(context, height=height, width=width, num_frames=frames, seed=0, steps=DMD_STEPS,
                            sparsity=0.8, progress=False)

    return bench.time_s(run, warmup=2 if bench.compile_dit else 1)  # the pipeline is freed on return


def case_b(bench: Bench, args: argparse.Namespace) -> None:
    labels = {"480p": "14B 81x480x832", "720p": "14B 81x720x1280"}
    model = bench.build("wan21_14b")
    cfg, shapes, teacher_step, student = model.cfg, {}, {}, {}
    for res in labels:
        shapes[res] = bench.latent(res, cfg.in_channels)
        if not args.skip_ours_teacher:
            bench.set_attention(model, "sdpa")
            teacher_step[res] = bench.teacher_step_s(model, shapes[res], cfg.text_dim)
        student[res] = bench.student_s(model, shapes[res], 0.9)
    del model
    bench.free()
    student_fp8 = {}
    if args.fp8:  # a second model after the bf16 one is freed: 14B fp8 (~14 GB) never sits next to 14B bf16
        model = bench.build("wan21_14b", fp8=True)
        for res in labels:
            student_fp8[res] = bench.student_s(model, shapes[res], 0.9, FP8_ATTN)
        del model
        bench.free()
    for res, label in labels.items():
        bench.row("b", f"{label} student 3-step VSA 0.9", student[res], "s")
        if res in student_fp8:
            bench.row("b", f"{label} student 3-step VSA 0.9, {FP8_LABEL}", student_fp8[res], "s")
            bench.row("b", f"{label} student speedup, {FP8_LABEL} vs bf16", student[res] / student_fp8[res], "x")
        if res in teacher_step:
            speedups(bench, label, "ours dense", teacher_step[res], student[res], student_fp8.get(res))
    if args.diffusers:  # after ours is freed: two 14B models at once would not leave room for 720p activations
        forward, ref = diffusers_forward(bench, "wan21_14b")
        for res, label in labels.items():
            step = bench.teacher_step_s(forward, shapes[res], cfg.text_dim)
            speedups(bench, label, "diffusers", step, student[res], student_fp8.get(res))
        del forward, ref
        bench.free()


def speedups(bench: Bench, label: str, teacher_name: str, step: float, student: float,
             student_fp8: float | None) -> None:
    """Rows of one teacher: its CFG step, its 50-step loop, and the denoising-loop speedups of the students."""
    teacher = step * TEACHER_STEPS
    bench.row("b", f"{label} teacher CFG step (cond + uncond), {teacher_name}", step, "s")
    bench.row("b", f"{label} teacher 50-step CFG, {teacher_name}", teacher, "s")
    bench.row("b", f"{label} denoising-loop speedup vs {teacher_name}", teacher / student, "x")
    if student_fp8 is not None:
        bench.row("b", f"{label} denoising-loop speedup vs {teacher_name}, {FP8_LABEL} student", teacher / student_fp8,
                  "x")


def case_c(bench: Bench, args: argparse.Namespace) -> None:
    model = bench.build("wan22_ti2v_5b")
    shape = bench.latent("5b_720p", model.cfg.in_channels)
    for sparsity in (None, 0.8):
        s = bench.student_s(model, shape, sparsity)
        name = "dense" if sparsity is None else f"VSA {sparsity}"
        bench.row("c", f"5B 121x704x1280 student 3-step {name}", s, "s")
    del model
    bench.free()


KERNEL_KINDS = (  # (kind, substrings of CUDA kernel names), first match wins
    # inductor's generated kernels are named after the ops they fuse ("..._scaled_mm_...", "..._attention_...")
    ("fused elementwise (inductor)", ("triton_",)),
    ("GEMM", ("gemm", "nvjet", "xmma", "cutlass")),
    ("VSA fine kernel (bf16 or fp8)", ("fine_fwd",)),
    ("VSA tile means + selection", ("tile_means", "select_kernel", "topk", "sort")),
    # the per-channel max |v| (torch.linalg.vector_norm, ord inf) is a reduce kernel named after its AbsMaxOps
    ("VSA fp8 quantization of q, k, v", ("quantize_qkv", "absmaxops")),
    ("cross-attention (cuDNN SDPA)", ("sdpa", "flash", "fmha", "attention")),
)


def profile(bench: Bench, model: WanModel, shape: tuple[int, ...], label: str, attn: str = "vsa") -> None:
    """Where one 3-step student denoise's GPU time goes: kernel totals by kind, then the top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        bench.student_s(model, shape, 0.8, attn)
    kinds: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        # GPU kernels only: CPU-side ops (custom ops, aten::addmm) also report the device time of what they launch
        us = event.self_device_time_total
        if event.device_type != DeviceType.CUDA or us <= 0:
            continue
        name = event.key.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(s in name for s in keys)), "elementwise / other")
        kinds[kind] = kinds.get(kind, 0.0) + us
        kernels[event.key[:100]] = kernels.get(event.key[:100], 0.0) + us
    runs = (2 if bench.compile_dit else 1) + 3  # student_s: warm-up denoises + 3 timed ones, each 3 forwards
    total = sum(kinds.values())
    if total == 0:
        print(f"[a] profile, {label}: no GPU kernels recorded (CPU run)")
        return
    print(f"[a] profile, {label}: GPU kernel time per forward by kind ({total / runs / 3 / 1e3:.1f} ms in all)")
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"    {kind:32s} {us / runs / 3 / 1e3:8.1f} ms  {100 * us / total:5.1f} %")
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:10]:
        print(f"      {us / runs / 3 / 1e3:8.2f} ms  {name}")


SP_RUNS = (  # (preset, latent shape, VSA sparsity, label)
    ("wan21_1.3b", "480p", 0.8, "1.3B 81x480x832"),
    ("wan21_14b", "480p", 0.9, "14B 81x480x832"),
    ("wan21_14b", "720p", 0.9, "14B 81x720x1280"),
)


@contextmanager
def sequence_parallel(model: WanModel, groups: SamplingGroups) -> Iterator[None]:
    """Ulysses over `groups.sp_group` while inside; the plain model again after (one model serves every N)."""
    seams, attns = (model.token_shard, model.token_gather), [block.attn1.attn_fn for block in model.blocks]
    apply_sequence_parallel(model, groups)
    try:
        yield
    finally:
        model.token_shard, model.token_gather = seams
        for block, attn in zip(model.blocks, attns):
            block.attn1.attn_fn = attn


def sp_sweep(bench: Bench, args: argparse.Namespace, sizes: list[int]) -> None:
    """--sp: the 3-step student denoise over N ranks for each N in `sizes` that the launch has ranks for."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    skipped = [n for n in sizes if n > world]
    if skipped and not bench.rank:
        print(f"[sp] N = {skipped} skipped: this launch has {world} rank(s) (torchrun --nproc_per_node N)")
    sizes = [n for n in sizes if n <= world]
    subgroups = {n: dist.new_group(list(range(n))) for n in sizes if n > 1}  # every rank creates every group
    for preset, res, sparsity, label in SP_RUNS:
        sp_times(bench, args, preset, res, sparsity, label, subgroups, time_single=1 in sizes)
        bench.free()


def sp_times(bench: Bench, args: argparse.Namespace, preset: str, res: str, sparsity: float, label: str,
             subgroups: dict[int, dist.ProcessGroup], time_single: bool) -> None:
    """One model size: N = 1 on rank 0 (and, on one process, through `VideoPipeline(sp=1)`), then each N in
    `subgroups` on ranks [0, N) while the others wait."""
    torch.manual_seed(0)  # the same random weights on every rank
    model = bench.random_model(preset)
    label = f"{label} student 3-step VSA {sparsity}{f', {FP8_LABEL}' if args.fp8 else ''}"
    pipe = None
    if not dist.is_initialized():  # readied by the pipeline, as tools/sample.py gets it
        pipe = VideoPipeline(model, attn="vsa", fp8=args.fp8, compile=bench.compile_dit)
        model = pipe.dit
    else:
        bench.set_attention(model, FP8_ATTN if args.fp8 else "vsa")
        prepare_for_inference(model, fp8=args.fp8, compile=bench.compile_dit)
    shape = bench.latent(res, model.cfg.in_channels)
    context = bench.context(model)
    meta = vsa_meta(model.token_grid(shape), sparsity, bench.device)
    warmup = 2 if bench.compile_dit else 1

    def sampler() -> torch.Tensor:
        with torch.no_grad():
            g = torch.Generator(bench.device).manual_seed(0)
            return denoise_student(model, context, shape, DMD_STEPS, g, attn_meta=meta, progress=False)

    single = reference = None
    if bench.rank == 0 and time_single:
        single = bench.time_s(sampler, warmup=warmup, reps=5)
        bench.row("sp", f"{label}, N=1 (sampler)", single, "s")
        reference = sampler()
    if pipe is not None and time_single:
        _, _, t, h, w = shape
        frames, height, width = (t - 1) * VAE_TEMPORAL_RATIO + 1, h * pipe.spec.vae_ratio, w * pipe.spec.vae_ratio

        def through_pipeline() -> torch.Tensor:
            return pipe.denoise(context, height=height, width=width, num_frames=frames, seed=0, steps=DMD_STEPS,
                                sparsity=sparsity, progress=False)

        sp1 = bench.time_s(through_pipeline, warmup=warmup, reps=5)
        bench.row("sp", f"{label}, N=1 (VideoPipeline sp=1)", sp1, "s")
        bench.row("sp", f"{label}, N=1: VideoPipeline sp=1 / sampler", sp1 / single, "x")
    for n, group in subgroups.items():
        if model.cfg.num_heads % n:  # e.g. the 1.3B's 12 heads on 8 GPUs
            if bench.rank == 0:
                print(f"[sp] {label}, N={n} skipped: Ulysses needs N to divide the {model.cfg.num_heads} heads")
            continue
        if bench.rank < n:
            check_token_grid(model.token_grid(shape), n)
            groups = SamplingGroups(rank=bench.rank, world=n, sp=n, cfg=1, sp_group=group, cfg_group=None)
            with sequence_parallel(model, groups):
                seconds = bench.time_s(sampler, warmup=warmup, reps=5)
                latents = sampler()
            if bench.rank == 0:
                bench.row("sp", f"{label}, N={n}", seconds, "s")
                if single is not None:
                    bench.row("sp", f"{label}, N={n} speedup over N=1 (parallel efficiency "
                              f"{single / seconds / n:.0%})", single / seconds, "x")
                    # bf16 GEMMs over L/N rows round differently: a sanity check, not an exactness test
                    diff = ((latents - reference).abs().max() / reference.abs().max()).item()
                    bench.row("sp", f"{label}, N={n} latents vs N=1: max |diff| / max |N=1|", diff, "rel")
        dist.barrier()


CASES = {"a": case_a, "b": case_b, "c": case_c}


def main(argv: list[str] | None = None) -> list[tuple[str, str, float, str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="a,b,c", help="comma-separated subset of a, b, c")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiTs (and time a compiled VAE decoder)")
    p.add_argument("--diffusers", action="store_true", help="case b: also time diffusers' dense teacher")
    p.add_argument("--skip-ours-teacher", action="store_true",
                   help="case b: do not time our dense teacher (with --diffusers: diffusers' teacher only)")
    p.add_argument("--profile", action="store_true",
                   help="case a: GPU time per forward by kernel kind and the top kernels of the student denoise")
    p.add_argument("--fp8", action="store_true", help="cases a, b: also time the students as sample.py --fp8 runs "
                   "them: FP8 (e4m3, row-wise scaled) block linears and VSA on e4m3 q, k, v; Hopper GPU (sm90+)")
    p.add_argument("--pipeline", action="store_true", help="case a: also time the denoise through VideoPipeline "
                   "(with this run's --fp8 / --compile) and its ratio to the sampler's time")
    p.add_argument("--smoke", action="store_true", help="toy sizes (tiny DiT, tiny VAE) on any device")
    p.add_argument("--json", metavar="PATH", help="also write the result rows to PATH as JSON")
    p.add_argument("--sp", metavar="N,...", help="instead of the cases: the 1.3B and 14B 3-step student denoise with "
                   "sequence parallel over each N GPUs (launch with torchrun --nproc_per_node max(N)); N = 1 first")
    args = p.parse_args(argv)
    sp_sizes = []
    if args.sp:
        try:
            sp_sizes = sorted({int(n) for n in args.sp.split(",")})
        except ValueError:
            p.error(f"--sp {args.sp!r}: comma-separated GPU counts, e.g. 1,2,4,8")
        if sp_sizes[0] < 1:
            p.error(f"--sp {args.sp!r}: GPU counts must be >= 1")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or not cases:
        p.error(f"--cases {args.cases!r}: unknown case(s) {unknown}; choose from {sorted(CASES)}")
    if not args.smoke and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --smoke for toy sizes)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.fp8 and (problem := fp8_device_problem(device)):
        p.error(problem)

    rank = 0
    if sp_sizes and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
        rank, _, device = init_distributed()
    bench = Bench(device, args.smoke, args.compile, rank)
    started = time.perf_counter()
    if sp_sizes:
        sp_sweep(bench, args, sp_sizes)
    else:
        for case in cases:
            CASES[case](bench, args)
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank:  # the table is rank 0's
        return bench.rows
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    fp8 = f" (+ {FP8_LABEL} rows)" if args.fp8 else ""
    print(f"\n{gpu} | torch {torch.__version__} | bf16{fp8} | random weights | text cached | "
          f"compile={'on' if args.compile else 'off'}{' | SMOKE SIZES' if args.smoke else ''} | "
          f"{time.perf_counter() - started:.0f} s total")
    width = max(len(w) for _, w, _, _ in bench.rows)
    for case, what, value, unit in bench.rows:
        print(f"{case}  {what:{width}s}  {value:10.3f} {unit}")
    if args.json:
        rows = [{"case": case, "what": what, "value": value, "unit": unit} for case, what, value, unit in bench.rows]
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return bench.rows


if __name__ == "__main__":
    main()
