"""Time the Wan2.1-1.3B sparse-distill step: recipes/wan21_1_3b_sparse_distill.py itself, run as a subprocess on
real-size random weights and synthetic latents, its per-step times read back from the run's metrics.jsonl.

    python benchmarks/bench_train.py                               # one GPU, 77x448x832 latents (29,120 tokens)
    python benchmarks/bench_train.py --ac attention --compile      # the recipe's switches (parallel/compile.py)
    python benchmarks/bench_train.py --nproc 2 --dp-replicate 2    # HSDP over 2 GPUs (scaling)
    python benchmarks/bench_train.py --nproc 2 --sp 2              # Ulysses SP = 2
    python benchmarks/bench_train.py --preset wan21_14b --layers 4 --nproc 4 --sp 4 --latent 21,60,104 --sparsity 0.9
    python benchmarks/bench_train.py --smoke                       # CPU, tiny model: the whole path in seconds

What runs: tools/make_tiny_data.py writes synthetic latents of the requested shape (and the tiny VAE the recipe's
validation decodes with); the transformer is a seeded random init of the preset (speed does not depend on weight values;
`--layers` overrides the depth), exported once in diffusers' layout under --work; the recipe then runs with a TOML
overlay: batch 1 per SP group, student VSA at --sparsity, critic every step and student every `dmd.student_every`-th
(5) step, one warm-up cycle (compilation, autotuning, allocator growth) and --cycles timed cycles. Reported: the average
step over whole timed cycles (the recipe's `time/step_s`, which includes its data loading), critic-only and student
steps apart, the recipe's peak reserved memory and model-FLOPs utilisation with FLOPs counted as executed (sparse
attention at its sparse count, activation-checkpoint recompute included) against an H100's bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

from attention.vsa import vsa_meta
from models.wan import WAN_CONFIGS, WanConfig, config_with
from models.wan_weights import export_random_init

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "wan21_1_3b_sparse_distill.py"
MAKE_DATA = ROOT / "tools" / "make_tiny_data.py"
# attention's share of a dense 1.3B forward at this length (benchmarks/bench_model.py: 341 of 718 ms): the part of the
# forward that AC mode "attention" does not recompute (FLOPs are counted as executed)
ATTN_SHARE_OF_FORWARD = 0.475
H100_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H100 SXM (datasheet), the MFU denominator
VAE_STRIDE = (4, 8, 8)  # Wan2.1 VAE: latent T = (frames - 1) / 4 + 1, H = height / 8, W = width / 8
SMOKE = ["--preset", "tiny", "--latent", "5,8,16", "--cycles", "1", "--ac", "none", "--precision", "fp32",
         "--workers", "0"]


def forward_flops(cfg: WanConfig, tokens: int, text_len: int, attn_fraction: float) -> float:
    """FLOPs of one forward: 2·MACs of every matmul; self-attention at `attn_fraction` of dense (VSA's sparse count)."""
    d, f = cfg.dim, cfg.ffn_dim
    linear = tokens * (4 * d * d + 2 * d * d + 2 * d * f) + text_len * 2 * d * d  # self qkvo, cross q/o, ffn; text k/v
    self_attn = 4 * tokens * tokens * d * attn_fraction
    cross_attn = 4 * tokens * text_len * d
    return cfg.num_layers * 2 * linear + cfg.num_layers * (self_attn + cross_attn)


def cycle_flops(cfg: WanConfig, tokens: int, attn_fraction: float, ac: str, student_every: int) -> float:
    """FLOPs of one cycle of `student_every` steps: a student rollout (no grad) and a critic forward + backward every
    step, one student forward + backward, one critic forward and the teacher's conditional + negative forwards."""
    dense = forward_flops(cfg, tokens, 512, 1.0)
    sparse = forward_flops(cfg, tokens, 512, attn_fraction)
    recompute = {"full": 1, "attention": 1 - ATTN_SHARE_OF_FORWARD}.get(ac, 0)
    return student_every * (sparse + dense * (3 + recompute)) + sparse * (3 + recompute) + dense + 2 * dense


def write_pipeline(work: Path, cfg: WanConfig, tag: str, vae: Path) -> Path:
    """A pipeline folder: the random transformer (written once per preset and depth) next to the tiny VAE."""
    pipe = work / f"pipeline_{tag}"
    export_random_init(cfg, pipe / "transformer", seed=0)
    if not (pipe / "vae").is_dir():
        shutil.copytree(vae, pipe / "vae")
    return pipe


def overlay(args: argparse.Namespace, pipe: Path, data: Path, latent: tuple[int, int, int], name: str) -> str:
    t, h, w = latent
    frames, height, width = (t - 1) * VAE_STRIDE[0] + 1, h * VAE_STRIDE[1], w * VAE_STRIDE[2]
    return f"""# written by benchmarks/bench_train.py
[model]
base = "{pipe}"
[attn]
student = "vsa"
sparsity = {args.sparsity}
sparsity_ramp = []
[video]
num_frames = {frames}
height = {height}
width = {width}
vae_stride = {list(VAE_STRIDE)}
[data]
path = "{data / 'latents'}"
negative_prompt = "{data / 'negative_prompt.safetensors'}"
val_prompts = "{data / 'prompts'}"
batch_size = 1
num_workers = {args.workers}
[optim]
grad_accum = 1
[parallel]
dp_replicate = {args.dp_replicate}
sp = {args.sp}
mixed_precision = "{args.precision}"
activation_checkpointing = "{args.ac}"
compile = {str(args.compile).lower()}
[run]
name = "{name}"
out_dir = "{args.work / 'runs'}"
max_steps = {5 * (args.cycles + 1)}
log_every = 1
ckpt_every = 0
val_every = 1000000
val_count = 1
ema_decay = 0.0
"""


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan21_1.3b", choices=list(WAN_CONFIGS))
    p.add_argument("--latent", default="20,56,104", help="latent T,H,W (77x448x832 -> 20,56,104)")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--ac", default="full", choices=["none", "full", "selective", "attention"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--cycles", type=int, default=2, help="timed cycles of 5 steps (after one warm-up cycle)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs); > 1 runs the recipe under torchrun")
    p.add_argument("--dp-replicate", type=int, default=1)
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--layers", type=int, default=0, help="override num_layers (reduced-depth runs)")
    p.add_argument("--workers", type=int, default=4, help="data loader workers per rank")
    p.add_argument("--work", type=Path, default=Path("outputs/bench_train"), help="data, weights and runs go here")
    p.add_argument("--smoke", action="store_true", help=f"CPU smoke run: {' '.join(SMOKE)}")
    args = p.parse_args(argv)
    if args.smoke:
        args = p.parse_args([*SMOKE, *(argv if argv is not None else sys.argv[1:])])

    cfg = WAN_CONFIGS[args.preset]
    if args.layers:
        cfg = config_with(cfg, num_layers=args.layers)
    latent = tuple(int(s) for s in args.latent.split(","))
    if len(latent) != 3:
        raise SystemExit(f"--latent must be T,H,W; got {args.latent!r}")
    shape = f"{cfg.in_channels},{','.join(map(str, latent))}"
    data = args.work / f"data_{shape.replace(',', 'x')}_text{cfg.text_dim}"
    if not (data / "pipeline" / "vae" / "config.json").is_file():
        subprocess.run([sys.executable, str(MAKE_DATA), "--out", str(data), "--shape", shape, "--text-dim",
                        str(cfg.text_dim), "--rows", "16"], check=True)
    pipe = write_pipeline(args.work, cfg, f"{args.preset}_L{cfg.num_layers}", data / "pipeline" / "vae")
    name = (f"{args.preset}_L{cfg.num_layers}_{args.ac}_{'compiled' if args.compile else 'eager'}_"
            f"n{args.nproc}_dp{args.dp_replicate}_sp{args.sp}")
    run_dir = args.work / "runs" / RECIPE.stem / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume of an earlier one
    toml = args.work / f"{name}.toml"
    toml.write_text(overlay(args, pipe, data, latent, name))
    launcher = [sys.executable] if args.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    subprocess.run([*launcher, str(RECIPE), "--toml", str(toml)], check=True)

    resolved = tomllib.loads((run_dir / "config.toml").read_text())
    student_every = resolved["dmd"]["student_every"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "time/step_s" in r and r["step"] > student_every]  # after the warm-up cycle
    if len(timed) != student_every * args.cycles:
        raise SystemExit(f"{run_dir}/metrics.jsonl: {len(timed)} timed steps, expected {student_every * args.cycles}")
    step_s = [r["time/step_s"] for r in timed]
    student = [r["time/step_s"] for r in timed if r["step"] % student_every == 0]
    critic = [r["time/step_s"] for r in timed if r["step"] % student_every != 0]
    avg = statistics.mean(step_s)

    grid = (latent[0] // cfg.patch_size[0], latent[1] // cfg.patch_size[1], latent[2] // cfg.patch_size[2])
    tokens = math.prod(grid)
    meta = vsa_meta(grid, args.sparsity, "cpu")
    flops = cycle_flops(cfg, tokens, meta.topk / meta.num_tiles, args.ac, student_every) / args.sp  # per SP rank
    on_gpu = torch.cuda.is_available()
    mfu = flops / (student_every * avg) / H100_BF16_PEAK if on_gpu else math.nan
    result = {"avg_step_s": avg, "median_step_s": statistics.median(step_s), "critic_step_s": statistics.mean(critic),
              "student_step_s": statistics.mean(student), "data_s": statistics.mean(r["time/data_s"] for r in timed),
              "peak_reserved_gib": max(r["mem/max_reserved_gib"] for r in timed), "mfu": mfu}

    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    depth = f" ({cfg.num_layers} layers)" if args.layers else ""
    print(f"\n{device} | torch {torch.__version__} | {args.preset}{depth} | {args.nproc} processes (dp_replicate "
          f"{args.dp_replicate}, sp {args.sp}) | latent {'x'.join(map(str, latent))} = {tokens} tokens | VSA rho "
          f"{args.sparsity} (topk {meta.topk}/{meta.num_tiles}) | ac {args.ac} | compile {args.compile} | "
          f"{args.precision}")
    print(f"timed steps: {len(timed)} (steps {timed[0]['step']}-{timed[-1]['step']})")
    print(f"step times (s): {' '.join(f'{s:.2f}' for s in step_s)}")
    print("RESULT " + " ".join(f"{k}={v:.3f}" if k != "mfu" else f"mfu={100 * v:.1f}%" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
