"""Per-GPU memory plan of a DMD2 distillation step: every term explicit, in bytes, so it can be checked and adjusted.

    python tools/plan_memory.py --recipe wan21_1.3b --gpus 1                  # one H100, the whole table
    python tools/plan_memory.py --recipe wan21_14b --gpus 64 --sp 4 --dp-replicate 8
    python tools/plan_memory.py --summary                                      # the README table
    python tools/plan_memory.py --recipe wan21_14b --gpus 1 --sp 1 --lora 32   # LoRA: one base, two adapters
    python tools/plan_memory.py --recipe wan22_t2v_a14b --gpus 8 --sp 8       # two-expert teacher, one node

What is counted and what is not: parallel/memory.py.
"""

from __future__ import annotations

import argparse
import dataclasses

from parallel.memory import GIB, RECIPES, RMS_NORM_SAVED, plan


def print_plan(p: dict) -> None:
    r = p["recipe"]
    experts = f", teacher: {r.teacher_experts} experts" if r.teacher_experts > 1 else ""
    print(f"{r.model}: {r.gpus} GPUs, dp_replicate {r.dp_replicate} × dp_shard {p['dp_shard']} × sp {r.sp} "
          f"(FSDP shard group {p['shard']}); {r.frames}×{r.height}×{r.width} → {p['tokens']} tokens, "
          f"{p['local_tokens']} per rank; student attention {r.student_attn}{experts}")
    n = p["params"]
    if p.get("lora_rank"):
        print(f"LoRA rank {p['lora_rank']}: one base {n['student'] / 1e9:.3f} B (bf16, frozen), "
              f"each adapter {n['adapter'] / 1e6:.1f} M")
    else:
        print(f"params: student {n['student'] / 1e9:.3f} B, teacher/critic {n['teacher/critic'] / 1e9:.3f} B, "
              f"one block {n['block'] / 1e6:.1f} M")
    print(f"{'term':<66}{'GiB':>9}")
    for name, value in p["static"].items():
        print(f"{name:<66}{value / GIB:9.2f}")
    print(f"{'static total':<66}{sum(p['static'].values()) / GIB:9.2f}")
    for phase in ("student", "critic"):
        print(f"-- {phase} step")
        for name, value in p[phase]["terms"].items():
            print(f"  {name:<64}{value / GIB:9.2f}")
        for name, value in p[phase]["moments"].items():
            print(f"  at {name:<61}{value / GIB:9.2f}")
    for name, value in p["peaks"].items():
        print(f"{'PEAK ' + name + ' (static + largest moment)':<66}{value / GIB:9.2f}")


SUMMARY = [  # the README table
    ("wan21_1.3b", 1, 1, 1),
    ("wan21_1.3b", 64, 1, 64),
    ("wan21_14b", 64, 4, 8),
    ("wan22_ti2v_5b", 64, 1, 64),  # FastVideo's mesh for the 5B recipes (its slurm launchers)
    ("wan22_ti2v_5b", 64, 1, 8),  # sharded over the 8 GPUs of a node
]


def print_summary(rms_norm: str) -> None:
    print("| recipe | GPUs | dp_replicate × dp_shard × sp | tokens/rank | student step GiB | critic step GiB |")
    print("|---|---|---|---|---|---|")
    for name, gpus, sp, dp_replicate in SUMMARY:
        recipe = RECIPES[name]
        recipe = dataclasses.replace(recipe, gpus=gpus, sp=sp, dp_replicate=dp_replicate)
        p = plan(recipe, rms_norm=rms_norm)
        shape = f"{recipe.frames}×{recipe.height}×{recipe.width}"
        peaks = p["peaks"]
        print(f"| {name} {shape} | {gpus} | {dp_replicate} × {p['dp_shard']} × {sp} | {p['local_tokens']} "
              f"| {peaks['student step'] / GIB:.1f} | {peaks['critic step'] / GIB:.1f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="wan21_1.3b")
    parser.add_argument("--gpus", type=int, help="world size (default: the recipe's)")
    parser.add_argument("--sp", type=int, help="sequence-parallel size (default: the recipe's)")
    parser.add_argument("--dp-replicate", type=int, help="HSDP replicate size (default: the recipe's)")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--batch", type=int, default=1, help="samples per SP group")
    parser.add_argument("--student-attn", choices=["vsa", "dense"])
    parser.add_argument("--rms-norm", choices=sorted(RMS_NORM_SAVED), default="fused",
                        help="fused: CUDA (bf16 weights); composite: CPU autocast")
    parser.add_argument("--teacher-offload", action="store_true", help="teacher shards in host memory")
    parser.add_argument("--ema", action="store_true", help="run.ema_decay > 0: an fp32 EMA of the student")
    parser.add_argument("--summary", action="store_true", help="one line per standard configuration (README)")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="LoRA mode (the recipes' lora.rank): one frozen bf16 base + student/critic adapters")
    args = parser.parse_args(argv)
    if args.summary:
        print_summary(args.rms_norm)
        return
    r = RECIPES[args.recipe]
    gpus, sp = args.gpus or r.gpus, args.sp or r.sp
    dp_replicate = args.dp_replicate
    if dp_replicate is None:  # the recipe's mesh, or pure replication for another GPU count
        dp_replicate = r.dp_replicate if args.gpus is None else gpus // sp
    if args.lora < 0:
        parser.error(f"--lora {args.lora}: the rank must be >= 0 (0 = full fine-tune)")
    recipe = dataclasses.replace(r, frames=args.frames or r.frames, height=args.height or r.height,
                                 width=args.width or r.width, gpus=gpus, sp=sp, dp_replicate=dp_replicate,
                                 student_attn=args.student_attn or r.student_attn)
    print_plan(plan(recipe, args.batch, args.rms_norm, teacher_offload=args.teacher_offload, ema=args.ema,
                    lora_rank=args.lora))


if __name__ == "__main__":
    main()
