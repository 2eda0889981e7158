"""LoRA Sparse-distill on one GPU with random real-size weights: peak reserved memory and s/step, next to the plan.

    python scripts/check_lora_gpu.py --part 14b_lora     # Wan2.1-14B recipe, LoRA rank 32, 77×448×832, VSA ρ = 0.9
    python scripts/check_lora_gpu.py --part 1_3b         # Wan2.1-1.3B recipe, LoRA rank 32 and full fine-tune
    python scripts/check_lora_gpu.py --part a14b_lora --init-only   # Wan2.2-A14B: write the two experts (~57 GB) ...
    python scripts/check_lora_gpu.py --part a14b_lora    # ... then train: LoRA rank 32, 81×480×832, two experts
    python scripts/check_lora_gpu.py --smoke             # every part with the tiny CPU config (tests/assets/tiny.toml)

Each part runs the recipe itself (a subprocess, one process) on synthetic latents of the training shape
(16×20×56×104; a14b_lora: 16×21×60×104, Wan2.2's 81×480×832: tools/make_tiny_data.py, written once under --out)
for --steps steps (student steps every 5th), with the health reference off (its 50-step teacher would dominate the
time), then prints one line per run: the last step's `mem/max_reserved_gib`, the median `time/step_s` of the steps
after the first two (compile / allocator warm-up), and tools/plan_memory.py's prediction for the same configuration.
Parts are separate so that each fits a 10-minute command. Disk: the 14B random weights are written once in bf16
(28.6 GB) and deleted once training has started, so the merged fp32 export at the end (57 GB) fits a 64 GiB disk.
a14b_lora (recipes/wan22_a14b_t2v_sparse_distill.py, random weights for both experts): the two bf16 experts are
57 GB together, written under <out>/<recipe>/a14b_lora/random_init (transformer/, transformer_2/; a few minutes,
so `--init-only` writes them in a command of their own, and a later run reuses them) and deleted once training has
started; the run ends without an export (run.export=false): its merged student would not fit the disk beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# Latents (C, T, H, W) of each training video shape (frames, height, width), Wan2.1 VAE.
GPU_SHAPES = {(77, 448, 832): "16,20,56,104", (81, 480, 832): "16,21,60,104"}
LORA_RANK = 32
# (name, recipe, plan_memory recipe, video (frames, height, width) as in the recipe's TOML, extra overrides); the 14B
# recipes' TOMLs already have ρ = 0.9 and full AC.
RUNS = {
    "14b_lora": [("14b_lora", "wan21_14b_sparse_distill", "wan21_14b", (77, 448, 832), [f"lora.rank={LORA_RANK}"])],
    "1_3b": [
        ("1_3b_lora", "wan21_1_3b_sparse_distill", "wan21_1.3b", (77, 448, 832), [f"lora.rank={LORA_RANK}"]),
        ("1_3b_full", "wan21_1_3b_sparse_distill", "wan21_1.3b", (77, 448, 832), []),
    ],
    "a14b_lora": [("a14b_lora", "wan22_a14b_t2v_sparse_distill", "wan22_t2v_a14b", (81, 480, 832),
                   [f"lora.rank={LORA_RANK}", "run.export=false"])],
}
PRESET = {"wan21_14b": "wan21_14b", "wan21_1.3b": "wan21_1.3b", "wan22_t2v_a14b": "wan22_t2v_a14b"}
# Random weights written in bf16 by this script before the run (sub-folder, seed): the recipe would write fp32.
BF16_INIT = {
    "wan21_14b": [("", 0)],
    "wan22_t2v_a14b": [("transformer", 0), ("transformer_2", 1)],  # the two experts differ
}


def make_data(out: Path, smoke: bool, video: tuple[int, int, int]) -> Path:
    name = "gpu_data" if video == (77, 448, 832) else "gpu_data_{}x{}x{}".format(*video)
    data = out / ("tiny_data" if smoke else name)
    if not (data / "pipeline").is_dir():
        shape = [] if smoke else ["--shape", GPU_SHAPES[video], "--text-dim", "4096", "--rows", "16"]
        subprocess.run([sys.executable, str(ROOT / "tools/make_tiny_data.py"), "--out", str(data), *shape], check=True)
    return data


def write_bf16_init(preset: str, out: Path, seed: int = 0) -> None:
    """Seeded random weights of `preset` in bf16 where the recipe looks for them (it keeps an existing folder)."""
    from models.wan import WAN_CONFIGS, WanModel
    from models.wan_weights import export_pretrained

    if out.exists():
        return
    with torch.device("meta"):
        model = WanModel(WAN_CONFIGS[preset])
    model.to_empty(device="cpu").to(torch.bfloat16)
    torch.manual_seed(seed)
    model.init_weights()
    export_pretrained(model, out)


def check_disk(preset: str, root: Path, subs: list[str]) -> None:
    """Fail before writing when the disk cannot hold the bf16 random weights still to be written."""
    from models.wan import WAN_CONFIGS
    from models.wan_weights import parameter_count

    todo = [sub for sub in subs if not (root / sub).exists()]
    need = 2 * parameter_count(WAN_CONFIGS[preset]) * len(todo)  # bytes, bf16
    existing = next(p for p in (root, *root.parents) if p.exists())  # creating root would make the writer skip it
    free = shutil.disk_usage(existing).free
    if need > free:
        raise SystemExit(f"{root}: {len(todo)} bf16 random {preset} model(s) need {need / 1e9:.1f} GB, the disk has "
                         f"{free / 1e9:.1f} GB free; free space (e.g. old runs under --out) or use a larger disk")


def free_init_when_training(run_dir: Path, stop: threading.Event) -> None:
    """Delete <run>/random_init once a training step is logged (the weights are in GPU memory by then)."""
    metrics = run_dir / "metrics.jsonl"
    while not stop.wait(5.0):
        if metrics.is_file() and '"loss/critic"' in metrics.read_text():
            shutil.rmtree(run_dir / "random_init", ignore_errors=True)
            return


def summarize(run_dir: Path) -> tuple[float, float, int]:
    """(peak reserved GiB, median s/step after the first two steps, steps logged)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if "time/step_s" in r}
    times = [steps[s]["time/step_s"] for s in sorted(steps) if s > 2] or [steps[s]["time/step_s"] for s in steps]
    return max(r["mem/max_reserved_gib"] for r in steps.values()), statistics.median(times), len(steps)


def planned_gib(model: str, lora: int, smoke: bool, video: tuple[int, int, int]) -> float | None:
    if smoke:
        return None
    from parallel.memory import GIB, RECIPES, plan

    frames, height, width = video  # one GPU, the run's shape; the rest (e.g. a two-expert teacher) as in RECIPES
    recipe = replace(RECIPES[model], frames=frames, height=height, width=width, gpus=1, sp=1, dp_replicate=1)
    return max(plan(recipe, lora_rank=lora)["peaks"].values()) / GIB


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=sorted(RUNS), action="append", help="default: all parts")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (checks the script)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (default 12, a14b_lora 6; smoke 3)")
    parser.add_argument("--init-only", action="store_true",
                        help="write the data and the bf16 random weights of the parts, then exit (no training)")
    parser.add_argument("--out", type=Path, default=Path("outputs/check_lora"))
    args = parser.parse_args(argv)
    results = []
    for part in args.part or sorted(RUNS):
        for name, recipe, model, video, extra in RUNS[part]:
            steps = args.steps or (3 if args.smoke else 6 if part == "a14b_lora" else 12)
            data = make_data(args.out, args.smoke, video)
            overrides = [
                f"model.base={data / 'pipeline'}", f"data.path={data / 'latents'}",
                f"data.negative_prompt={data / 'negative_prompt.safetensors'}", f"data.val_prompts={data / 'prompts'}",
                f"run.out_dir={args.out}", f"run.name={name}", f"run.max_steps={steps}", "run.log_every=1",
                "run.ckpt_every=0", "run.val_every=100000", "run.val_count=1", "health.action=off",
                "parallel.dp_replicate=1", "parallel.sp=1", *extra,
            ]
            toml = ["--toml", str(ROOT / "tests/assets/tiny.toml")] if args.smoke else [f"model.preset={PRESET[model]}"]
            run_dir = args.out / recipe / name
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a relaunch appends to it
            stop = threading.Event()
            if not args.smoke and model in BF16_INIT:
                check_disk(PRESET[model], run_dir / "random_init", [sub for sub, _ in BF16_INIT[model]])
                for sub, seed in BF16_INIT[model]:
                    t0 = time.perf_counter()
                    write_bf16_init(PRESET[model], run_dir / "random_init" / sub, seed)
                    print(f"random init {run_dir / 'random_init' / sub}: {time.perf_counter() - t0:.0f} s", flush=True)
                if args.init_only:
                    continue
                threading.Thread(target=free_init_when_training, args=(run_dir, stop), daemon=True).start()
            if args.init_only:
                continue
            cmd = [sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), *toml, *overrides]
            print("$", " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            stop.set()
            peak, step_s, n = summarize(run_dir)
            plan = planned_gib(model, LORA_RANK if any(e.startswith("lora.") for e in extra) else 0, args.smoke, video)
            results.append((name, peak, step_s, n, plan, time.perf_counter() - t0))
    print(f"\n{'run':<12}{'steps':>6}{'peak reserved GiB':>19}{'s/step':>9}{'planned GiB':>13}{'wall s':>8}")
    for name, peak, step_s, n, plan, wall in results:
        planned = f"{plan:.1f}" if plan is not None else "-"
        print(f"{name:<12}{n:>6}{peak:>19.2f}{step_s:>9.2f}{planned:>13}{wall:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
