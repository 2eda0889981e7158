"""Time the real Wan2.1-1.3B sparse-distill step (the recipe's own step functions) on one GPU.

    python benchmarks/bench_train.py                                  # 77x448x832 latents (20x28x52 = 29,120 tokens)
    python benchmarks/bench_train.py --ac selective --compile         # switches (compiled training: see parallel/compile.py)
    torchrun --nproc_per_node 2 benchmarks/bench_train.py --dp-replicate 2      # HSDP over 2 GPUs (scaling)
    torchrun --nproc_per_node 2 benchmarks/bench_train.py --sp 2                # Ulysses SP = 2

Real-size random weights (speed does not depend on weight values), synthetic latents, batch 1 per SP group, student
VSA at rho, critic every step and student every 5th step, as recipes/wan21_1_3b_sparse_distill.py runs them. Reports
the average step over whole 5-step cycles, the time split per network (CUDA events around every forward; backward and
optimizer as the remainder of each phase), peak memory and model-FLOPs utilisation with FLOPs counted as executed
(sparse attention at its sparse count, activation-checkpoint recompute included).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attention.vsa import vsa_meta  # noqa: E402
from models.wan import WAN_CONFIGS, WanConfig, WanModel, config_with  # noqa: E402
from parallel.mesh import build_mesh, init_distributed  # noqa: E402
from parallel.wan import parallelize_wan  # noqa: E402

# attention's share of a dense 1.3B forward at this length (benchmarks/bench_model.py: 341 of 718 ms): the part of the
# forward that AC mode "attention" does not recompute (FLOPs are counted as executed)
ATTN_SHARE_OF_FORWARD = 0.475
H100_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H100 SXM (datasheet), the MFU denominator


def load_recipe():
    path = ROOT / "recipes" / "wan21_1_3b_sparse_distill.py"
    spec = importlib.util.spec_from_file_location("recipe_1_3b", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def forward_flops(cfg: WanConfig, tokens: int, text_len: int, attn_fraction: float) -> float:
    """FLOPs of one forward: 2·MACs of every matmul; self-attention at `attn_fraction` of dense (VSA's sparse count)."""
    d, f = cfg.dim, cfg.ffn_dim
    linear = tokens * (4 * d * d + 2 * d * d + 2 * d * f) + text_len * 2 * d * d  # self qkvo, cross q/o, ffn; text k/v
    self_attn = 4 * tokens * tokens * d * attn_fraction
    cross_attn = 4 * tokens * text_len * d
    return cfg.num_layers * 2 * linear + cfg.num_layers * (self_attn + cross_attn)


class NetTimer:
    """CUDA events around every forward of a network, bucketed by grad mode."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.totals: dict[str, float] = defaultdict(float)

    def attach(self, name: str, model: torch.nn.Module) -> None:
        def pre(module, args):
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            module._bench_start = start

        def post(module, args, out):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            key = f"{name} fwd" + ("" if torch.is_grad_enabled() else " (no grad)")
            self.pending.append((key, module._bench_start, end))

        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)

    def collect(self) -> None:
        torch.cuda.synchronize()
        for key, start, end in self.pending:
            self.totals[key] += start.elapsed_time(end) / 1e3
        self.pending.clear()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan21_1.3b", choices=[k for k in WAN_CONFIGS if k != "tiny"])
    p.add_argument("--latent", default="20,56,104", help="latent T,H,W (77x448x832 -> 20,56,104)")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--ac", default="full", choices=["none", "full", "selective", "attention"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cycles", type=int, default=2, help="timed 5-step cycles (after one warm-up cycle)")
    p.add_argument("--dp-replicate", type=int, default=1)
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--layers", type=int, default=0, help="override num_layers (reduced-depth runs)")
    p.add_argument("--profile", default="", help="write a torch.profiler table of one extra cycle to this file")
    args = p.parse_args()

    recipe = load_recipe()
    rank, world, device = init_distributed()
    cfg = WAN_CONFIGS[args.preset]
    if args.layers:
        cfg = config_with(cfg, num_layers=args.layers)
    dims = build_mesh(world, args.dp_replicate, args.sp, device.type, cfg.num_heads)

    def build(attn: str, frozen: bool) -> WanModel:
        with torch.device("meta"):
            model = WanModel(config_with(cfg, vsa_gate=attn == "vsa"), attn_fn=recipe.ATTN[attn])
        parallelize_wan(model, dims, ac_mode="none" if frozen else args.ac, compile=args.compile, frozen=frozen)
        model.to_empty(device=device)
        torch.manual_seed(0)
        model.init_weights()
        return model

    student, teacher, critic = build("vsa", False), build("sdpa", True), build("sdpa", False)
    teacher.requires_grad_(False)
    opts = {name: recipe.ShardedAdamW(net.parameters(), 2e-6, betas=(0.9, 0.999), weight_decay=0.01)
            for name, net in (("student", student), ("critic", critic))}
    timer = NetTimer()
    for name, net in (("student", student), ("teacher", teacher), ("critic", critic)):
        timer.attach(name, net)

    t_lat, h_lat, w_lat = (int(s) for s in args.latent.split(","))
    gen = torch.Generator(device).manual_seed(1234 + dims.dp_rank)
    batch = {"latents": torch.randn(1, cfg.in_channels, t_lat, h_lat, w_lat, device=device, generator=gen),
             "context": torch.randn(1, 512, cfg.text_dim, device=device, generator=gen)}
    negative = torch.zeros(1, 512, cfg.text_dim, device=device)
    grid = student.token_grid(batch["latents"].shape)
    meta = vsa_meta(grid, args.sparsity, device)
    dmd = recipe.DMDConfig(steps=[1000, 757, 522], student_every=5, guidance=3.5, flow_shift=8.0, t_min=20, t_max=980)
    amp = torch.autocast("cuda", torch.bfloat16)

    phases: dict[str, float] = defaultdict(float)

    def timed(phase: str, fn):
        """fn(), synchronised, its wall time added to `phase`."""
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        phases[phase] += time.perf_counter() - t0
        return out

    def step(k: int) -> None:
        with amp:
            if k % dmd.student_every == 0:
                loss, _ = timed("student phase (fwd+bwd)", lambda: recipe.student_step(
                    student, teacher, critic, [batch], negative, meta, dmd, gen))
                timed("optimizer", lambda: recipe.apply_update(student, opts["student"], loss, 1.0))
            loss = timed("critic phase (fwd+bwd)", lambda: recipe.critic_step(student, critic, [batch], meta, dmd, gen))
            timed("optimizer", lambda: recipe.apply_update(critic, opts["critic"], loss, 1.0))

    for k in range(1, 6):  # warm-up cycle: compilation, autotuning, allocator growth
        step(k)
    timer.collect()
    timer.totals.clear()
    phases.clear()
    torch.cuda.reset_peak_memory_stats()
    step_times = []
    for k in range(1, 5 * args.cycles + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(k)
        torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
    timer.collect()

    if args.profile and rank == 0:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for k in range(1, 6):
                step(k)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
        table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        with amp:  # one critic update alone: what the optimizer phase spends, host and device
            loss = recipe.critic_step(student, critic, [batch], meta, dmd, gen)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof_opt:
            recipe.apply_update(critic, opts["critic"], loss, 1.0)
            torch.cuda.synchronize()
        table_opt = prof_opt.key_averages().table(sort_by="cpu_time_total", row_limit=30)
        Path(args.profile).parent.mkdir(parents=True, exist_ok=True)
        Path(args.profile).write_text(table + "\n\n" + table_cpu + "\n\none critic update:\n" + table_opt)
        print("\n".join(table.splitlines()[:18]))

    n_steps = len(step_times)
    avg = sum(step_times) / n_steps
    tokens = math.prod(grid)
    dense = forward_flops(cfg, tokens, 512, 1.0)
    sparse_fraction = meta.topk / meta.num_tiles
    sparse = forward_flops(cfg, tokens, 512, sparse_fraction)
    recompute = {"full": 1, "attention": 1 - ATTN_SHARE_OF_FORWARD}.get(args.ac, 0)
    per_cycle = (5 * (sparse + dense * (3 + recompute))  # student rollout (no grad) + critic fwd/bwd, every step
                 + sparse * (3 + recompute) + dense + 2 * dense)  # student fwd/bwd, critic fwd, teacher cond+uncond
    per_cycle /= args.sp  # each SP rank computes 1/sp of every matmul and of the attention heads
    mfu = per_cycle / (5 * avg) / H100_BF16_PEAK

    if rank == 0:
        print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | {args.preset}"
              f"{f' ({cfg.num_layers} layers)' if args.layers else ''} | world {world} (dp_replicate "
              f"{args.dp_replicate}, sp {args.sp}) | latent {t_lat}x{h_lat}x{w_lat} = {tokens} tokens | VSA rho "
              f"{args.sparsity} (topk {meta.topk}/{meta.num_tiles}) | ac {args.ac} | compile {args.compile}")
        print(f"{'per 5-step cycle':34s} {'s':>8s}")
        for key in sorted(timer.totals):
            print(f"  {key:32s} {timer.totals[key] / args.cycles:8.3f}")
        for key in sorted(phases):
            print(f"  {key:32s} {phases[key] / args.cycles:8.3f}")
        print(f"step times (s): {' '.join(f'{s:.2f}' for s in step_times)}")
        print(f"RESULT avg_step_s={avg:.3f} median_step_s={statistics.median(step_times):.3f} "
              f"peak_alloc_gib={torch.cuda.max_memory_allocated() / 2**30:.1f} "
              f"peak_reserved_gib={torch.cuda.max_memory_reserved() / 2**30:.1f} mfu={100 * mfu:.1f}%")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
