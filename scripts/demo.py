"""`make demo`: the toy sparse-distill end to end, then the quality table and its gates.

    python scripts/demo.py                  # teacher -> DMD2+VSA student (data mode) -> data-free student
                                            #   -> LoRA student (data mode) -> table; on a machine with a CUDA GPU
                                            #   the large toy (--large), else the CPU toy (--small)
    python scripts/demo.py --small          # the CPU toy (2-layer dim-48 teacher) even where a GPU is present
    python scripts/demo.py --nproc 2        # every recipe under torchrun --nproc_per_node 2 (gloo)
    python scripts/demo.py --quick --teacher tests/assets/toy_teacher
                                          # CI: the stored demo teacher, a short data-free student only
    python scripts/demo.py --large          # one GPU: the toy with a teacher large enough to learn motion; the
                                            #   three students train at once (--jobs 3)

Runs `recipes/toy_teacher.py`, `recipes/toy_sparse_distill.py` (dmd.rollout = data, then simulate, then data in LoRA
mode with the overrides in LORA_EXTRA) as subprocesses, then `scripts/eval_toy.py`. Gates (issue 4): the data-mode
student at 3 steps has distance ≤ 1.1× the 50-step teacher's and ≤ 0.5× the 3-step teacher's, conditioning accuracy
≥ 90 %, VSA sparsity ≥ 0.5; the data-free student beats the 3-step teacher; (issue 25) both full-fine-tune students
keep ≥ 0.8× teacher-50's motion; (issue 19) the LoRA student's distance ≤ 1.1× teacher-50's and conditioning
accuracy ≥ 90 %, its distance vs teacher-3 and its motion printed beside them, not gated. `--quick` gates the
data-free student's distance and, for motion, its temporal distance against frozen clips'. With `--strict`, exit
status 1 if a gate fails. Outputs under ./outputs/ (relative to the working
directory).
"""

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The CI-length pipeline: same recipes, fewer steps and fewer evaluation clips. (A teacher short enough for CI is no
# better than its own 3-step sampler on this data, so CI passes --teacher with the stored export of the demo teacher.)
QUICK_TEACHER = ["optim.steps=800", "run.num_eval=8"]
# Data-free only (no teacher data to generate), batch 8: half the step time of the TOML's 16 and, measured 2026-12-03
# (1 thread, 48 captions), distance 7.76 vs 8.78 and temporal 0.76 vs 0.97 at batch 16; 4.8 vs 8.4 min in all.
QUICK_DISTILL = ["optim.steps=300", "optim.batch_size=8", "run.num_eval=24"]
# The full demo's data-free run: fewer steps than the TOML's 900 (its gate is only "beats teacher-3"), to keep the
# whole demo under 20 minutes on 2 cores.
DATAFREE_EXTRA = ["optim.steps=600"]
# The LoRA row (issue 19): one frozen base, student and critic adapters, the data-mode run otherwise, 1500 steps. Rank 8
# is the best of ranks 8/16/48, gate lora/full and LR settings (recipes/toy_sparse_distill.toml [lora] has the
# numbers); adapters learn more slowly than the full fine-tune (at 900 steps seed 0 reached 8.51 / 89.2 %, a cosine
# decay or twice the student LR were worse), so the row trains 1500 steps: 6.07 / 94.2 % (2026-12-03, seed 0).
LORA_EXTRA = ["lora.rank=8", "lora.alpha=16", "optim.student_lr=5e-4", "optim.critic_lr=1e-3", "optim.steps=1500"]
# CI's motion gate (issue 25), "better than the frozen-motion baseline": the 300-step data-free student's temporal
# distance at most this share of frozen clips'. Measured 2026-12-02 (96 captions): frozen clips 2.00, the student before
# training 2.07, after 100 / 200 / 300 steps 0.89 / 0.70 / 1.34 (its blob sharpens and its steps spread). Not the
# issue's gate (motion >= 0.8 x teacher-50), which this toy's students do not meet: its teacher's frames are unrelated
# (recipes/toy_sparse_distill.toml [dmd]).
QUICK_TEMPORAL = 0.9
# `--large` (issue 25), one GPU (the default where one is present): a teacher that couples its frames. The CPU toy's
# 2-layer dim-48 teacher cannot (its motion is the chance level of unrelated frames, so there is no motion for DMD to
# keep); on the same clips a dim-128, 4-head (head dim 32), 4-layer teacher learns it (H200 probe, 2026-12-03: motion
# 0.81 vs chance 0.43 at 4210 steps, data/synthetic.py). About 10x the CPU toy's cost per step (on 2 CPU cores its
# data-free DMD step at batch 8 took 2.5 s), so a GPU run; data and gates are the CPU demo's.
# Measured on one NVIDIA H200 (torch 2.11.0+cu130; all 240 captions; Fréchet / accuracy / motion): `python
# scripts/demo.py` 6.9 min in all (2026-12-03: teacher 266 s, the three students at once 135 s, table 13 s); the
# student stage on a fresh export of that teacher (`--teacher`, 2026-12-04, 4.2 min, 64 clips per step): teacher-50
# 0.687 / 100 % / 94.2 %, student-3 data 1.52 / 99.6 % / 94.2 %, data-free 1.30 / 100 % / 97.1 %, LoRA r8 2.44 /
# 99.6 % / 97.1 %: every student keeps the teacher's motion and beats teacher-3 (5.45) by 2.2-4x, but the data and LoRA
# rows stay 2.2-3.6x this near-data teacher (fresh real clips: 0.28), so their "<= 1.1 x teacher-50" gates fail here.
# End to end at 64 clips per step (2026-12-05, 7.0 min: teacher 184 s, students at once 220 s): teacher-50 0.969,
# data 1.73, data-free 1.41, LoRA 1.45 — the same two gates fail. No setting tried closes it (training length, LR,
# batch, critic LR and update ratio, score shift and window, CFG, the student's schedule, a dense student, an EMA, a
# GAN term on pooled or per-token critic features): README Performance lists every run. What the gap is (2026-12-05,
# `scripts/eval_toy.py --detail`, seeds 0-2): the blobs' shape (spread, peak, mass alone: students 1.3-1.5, teacher-50
# 0.59), not pixel noise (blurred, the students stay 1.4-2.1x teacher-50); `teacher_gap` prints it under the gate.
LARGE_TEACHER = ["model.dim=128", "model.ffn_dim=256", "model.num_heads=4", "model.num_layers=4", "optim.steps=6000"]
# Every `--large` student: the DMD normaliser per clip (recipes/toy_sparse_distill.toml [dmd] normaliser has the runs)
# and FastVideo's 64 clips per step (its 1.3B and 5B distill scripts: 64 ranks of one clip; the TOML's 16 is the CPU
# toy's budget). One H200, one teacher export, 240 captions, 2026-12-04, 16 -> 64 clips, seeds 0 / 1 / 2: data-free
# 600 steps 1.13 / 2.12 / 3.34 -> 1.27 / 1.77 / 1.41 (mean 2.20 -> 1.48: the seed moves it 0.5 instead of 2.2), data
# 1800 decayed 1.88 / 1.69 -> 1.60 / 1.40, LoRA r8 1500 (seed 0) 2.54 -> 2.44; the `--teacher` demo 3.4 -> 4.2 min.
LARGE_DISTILL = ["dmd.normaliser=sample", "optim.batch_size=64"]
# `--large`'s data-mode student: 1800 steps with cosine LR decay (student and critic, to 0.1). At the TOML's 900
# constant steps its distance jumps between evaluations (one H200, 2026-12-03, 240 captions: 6.29 in the demo, 11.76
# at batch 64; 96-caption validations 1.5 -> 10.2 between steps 600 and 900: the blob grows brighter and more massive
# than the data's); decayed over 1800 steps it settles: 2.07 / 100 % / motion 94.6 % (900 decayed steps at batch 64:
# 2.59).
LARGE_DATA = ["optim.steps=1800", "optim.scheduler=cosine_with_min_lr", "optim.critic_scheduler=cosine_with_min_lr"]


def launcher(nproc: int) -> list[str]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    return torchrun if nproc > 1 else [sys.executable]


def run(cmd: list[str], nproc: int) -> None:
    print("$", " ".join(launcher(nproc)[1:] + cmd), flush=True)
    subprocess.run(launcher(nproc) + cmd, check=True)


def run_at_once(cmds: dict[str, list[str]], nproc: int, logs: dict[str, Path], poll: float = 5.0) -> dict[str, float]:
    """Every command at the same time (one GPU holds the toy's runs many times over), each one's output in its log;
    returns each one's wall time. A failed run raises with the tail of its log, after the others have finished."""
    procs, start, times = {}, time.perf_counter(), {}
    with contextlib.ExitStack() as files:  # every log closed once its run has ended
        for key, cmd in cmds.items():
            logs[key].parent.mkdir(parents=True, exist_ok=True)
            print("$", " ".join(launcher(nproc)[1:] + cmd), f"> {logs[key]}", flush=True)
            out = files.enter_context(open(logs[key], "w"))
            procs[key] = subprocess.Popen(launcher(nproc) + cmd, stdout=out, stderr=subprocess.STDOUT)
        while len(times) < len(procs):
            time.sleep(poll)
            for key, proc in procs.items():
                if key not in times and proc.poll() is not None:
                    times[key] = time.perf_counter() - start
                    print(f"{key}: finished ({'ok' if proc.returncode == 0 else f'exit {proc.returncode}'}) after "
                          f"{times[key]:.0f} s", flush=True)
    failed = [key for key, proc in procs.items() if proc.returncode != 0]
    if failed:
        tails = "\n".join(f"--- {logs[k]} (last lines)\n" + "\n".join(logs[k].read_text().splitlines()[-15:])
                          for k in failed)
        raise SystemExit(f"{tails}\ndemo: run(s) {failed} failed; their whole logs: " +
                         ", ".join(str(logs[k]) for k in failed))
    return times


def pick_toy(args: argparse.Namespace) -> int:
    """Sets args.large (the large toy where torch sees a CUDA GPU, unless --small or --quick); returns the number of
    students trained at once. Refuses contradicting flags before any work."""
    if args.quick and args.large:
        raise SystemExit("--quick and --large: choose one (the quick CI pipeline runs the demo's teacher on the CPU)")
    if args.small and args.large:
        raise SystemExit("--small and --large: choose one")
    if not (args.large or args.small or args.quick):
        import torch  # only for the choice: every run is a subprocess

        args.large = torch.cuda.is_available()
        print(f"demo: {'a CUDA GPU' if args.large else 'no CUDA GPU'} here -> the "
              f"{'large toy on the GPU (--small: the CPU toy)' if args.large else 'CPU toy'}", flush=True)
    jobs = args.jobs or (3 if args.large else 1)
    if jobs > 1 and args.nproc > 1:
        raise SystemExit(f"--jobs {jobs} with --nproc {args.nproc}: concurrent torchrun launches would share one "
                         "rendezvous port; pass --jobs 1")
    return jobs


def vsa_sparsity(run_dir: Path) -> float:
    """Realised fraction of kv tiles skipped per query tile, from the run's resolved config."""
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    if cfg["attn"]["student"] != "vsa":
        return 0.0
    data = cfg["data"]
    num_tiles = math.ceil(data["frames"] / 4) * math.ceil(data["height"] / 8) * math.ceil(data["width"] / 8)
    topk = min(max(math.ceil((1 - cfg["attn"]["sparsity"]) * num_tiles), 1), num_tiles)
    return 1 - topk / num_tiles


def row_of(table: dict, run_dir: Path) -> tuple[str, dict]:
    """eval_toy's row (name, scores) of one run directory's student export: each student row names its run."""
    return next((name, r) for name, r in table.items()
                if Path(r.get("run", "")).resolve() == run_dir.resolve() and r.get("export", "student") == "student")


def check_gates(table: dict, runs: dict[str, Path], sparsity: float, quick: bool) -> list[tuple[str, bool]]:
    free = row_of(table, runs["simulate"])[1]
    t50, t3 = table["teacher-50"]["frechet"], min(table["teacher-3"]["frechet"], table["teacher-3-dmd"]["frechet"])
    motion = table["teacher-50"]["motion"]  # issue 25: the students keep the teacher's motion
    if quick:  # CI: "distillation helps" and "the blob is not frozen"
        frozen = table["data (frozen clips)"]["temporal"]
        return [
            ("student-3 (data-free) distance < best teacher-3", free["frechet"] < t3),
            (f"student-3 (data-free) temporal distance <= {QUICK_TEMPORAL} x frozen clips'",
             free["temporal"] <= QUICK_TEMPORAL * frozen),
        ]
    student = row_of(table, runs["data"])[1]
    lora_name, lora = row_of(table, runs["lora"])
    return [
        ("student-3 (data) distance <= 1.1 x teacher-50", student["frechet"] <= 1.1 * t50),
        ("student-3 (data) distance <= 0.5 x best teacher-3", student["frechet"] <= 0.5 * t3),
        ("student-3 (data) conditioning accuracy >= 90 %", student["cond_acc"] >= 0.9),
        ("student-3 (data) motion >= 0.8 x teacher-50 motion", student["motion"] >= 0.8 * motion),
        (f"{lora_name} distance <= 1.1 x teacher-50", lora["frechet"] <= 1.1 * t50),  # issue 19's two gates
        (f"{lora_name} conditioning accuracy >= 90 %", lora["cond_acc"] >= 0.9),
        ("student VSA sparsity >= 0.5", sparsity >= 0.5),
        ("student-3 (data-free) distance < best teacher-3", free["frechet"] < t3),
        ("student-3 (data-free) motion >= 0.8 x teacher-50 motion", free["motion"] >= 0.8 * motion),
    ]


def lora_report(table: dict, runs: dict[str, Path]) -> list[str]:
    """The LoRA row against the data row's two gates that issue 19 does not set: distance vs teacher-3, and motion
    (issue 25's gate, which the CPU toy's students fail: its teacher's frames are unrelated)."""
    (name, lora), data = row_of(table, runs["lora"]), row_of(table, runs["data"])[1]
    t3 = min(table["teacher-3"]["frechet"], table["teacher-3-dmd"]["frechet"])
    distance = (f"{name} distance {lora['frechet']:.2f} = {lora['frechet'] / t3:.2f} x best teacher-3 (data row "
                f"{data['frechet'] / t3:.2f} x)")
    motion = (f"{name} motion {100 * lora['motion']:.1f} % (teacher-50 {100 * table['teacher-50']['motion']:.1f} %, "
              f"data row {100 * data['motion']:.1f} %)")
    return [distance, motion]


def teacher_gap(table: dict, runs: dict[str, Path]) -> str:
    """Where the data row's distance above a near-data teacher-50 lies (issue 25, the `--large` toy): in the blobs'
    shape or in pixel noise, from eval_toy's distance parts (data/synthetic.py `evaluate_samples`)."""
    t50, data = table["teacher-50"], row_of(table, runs["data"])[1]
    fresh = table["data (fresh clips)"]["frechet"]
    return (f"this teacher-50 ({t50['frechet']:.2f}) is near the data (fresh clips {fresh:.2f}); the data row's "
            f"distance lies in its blobs' shape (spread, peak and mass alone: {data['frechet_shape']:.2f} vs "
            f"teacher-50's {t50['frechet_shape']:.2f}), not in pixel noise (both blurred: "
            f"{data['frechet_blur'] / t50['frechet_blur']:.2f} x teacher-50). README Performance, \"The toy with a "
            "teacher that learns motion\", has every lever measured (issue 25)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=1, help="ranks per recipe (torchrun, gloo)")
    parser.add_argument("--quick", action="store_true", help="the shortened CI pipeline")
    parser.add_argument("--large", action="store_true",
                        help="one GPU: the larger teacher that learns motion (LARGE_TEACHER), every run on CUDA "
                             "(the default where torch sees a CUDA GPU)")
    parser.add_argument("--small", action="store_true", help="the CPU toy even where a GPU is present")
    parser.add_argument("--jobs", type=int, default=None,
                        help="students trained at once (default: 3 with --large, else 1)")
    parser.add_argument("--name", default=None, help="run name (default: demo, or quick with --quick)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a quality gate fails (tests use it)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads per process (run.threads; tests pass 1 beside another xdist worker)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="a toy teacher export to distill instead of training one (tests/assets/toy_teacher)")
    args = parser.parse_args(argv)
    jobs = pick_toy(args)
    name = args.name or ("quick" if args.quick else "large" if args.large else "demo")
    device = ["run.device=cuda"] if args.large else []
    teacher_extra = QUICK_TEACHER if args.quick else LARGE_TEACHER + device if args.large else []
    distill_extra = QUICK_DISTILL if args.quick else LARGE_DISTILL + device if args.large else []
    teacher_dir = args.teacher.resolve() if args.teacher else Path("outputs/toy_teacher") / name / "teacher"
    if args.teacher and not (teacher_dir / "config.json").is_file():
        raise SystemExit(f"--teacher {args.teacher}: no config.json there; pass an export of recipes/toy_teacher.py")
    runs = {"data": Path("outputs/toy_sparse_distill") / name,
            "simulate": Path("outputs/toy_sparse_distill") / f"{name}_datafree",
            "lora": Path("outputs/toy_sparse_distill") / f"{name}_lora"}
    # per run: its dmd.rollout and its overrides beyond the TOML
    extra = {"data": ("data", LARGE_DATA if args.large else []), "simulate": ("simulate", DATAFREE_EXTRA),
             "lora": ("data", LORA_EXTRA)}
    if args.quick:
        runs = {"simulate": runs["simulate"]}
        extra = {"simulate": ("simulate", [])}

    start = time.perf_counter()
    times = {}
    if not args.teacher:
        run([str(ROOT / "recipes/toy_teacher.py"), f"run.name={name}", f"run.threads={args.threads}", *teacher_extra],
            args.nproc)
        times["teacher"] = time.perf_counter() - start
    cmds = {key: [str(ROOT / "recipes/toy_sparse_distill.py"), f"model.teacher={teacher_dir}",
                  f"dmd.rollout={extra[key][0]}", f"run.name={run_dir.name}", f"run.threads={args.threads}",
                  *extra[key][1], *distill_extra] for key, run_dir in runs.items()}
    if jobs > 1:
        logs = {key: Path("outputs/toy_sparse_distill") / f"{run_dir.name}.log" for key, run_dir in runs.items()}
        t0 = time.perf_counter()
        times.update({f"distill ({key})": t for key, t in run_at_once(cmds, args.nproc, logs).items()})
        times["distill (at once)"] = time.perf_counter() - t0
    else:
        for key, cmd in cmds.items():
            t0 = time.perf_counter()
            run(cmd, args.nproc)
            times[f"distill ({key})"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = next(iter(runs.values()))
    out_json = first / "quality.json"
    eval_args = [*(str(r) for r in runs.values()), "--json", str(out_json), "--threads", str(args.threads),
                 "--device", "cuda" if args.large else "cpu"]
    if args.quick:
        eval_args += ["--num", "32"]
    run([str(ROOT / "scripts/eval_toy.py"), *eval_args], 1)
    times["evaluation"] = time.perf_counter() - t0
    total = time.perf_counter() - start

    table = json.loads(out_json.read_text())
    sparsity = vsa_sparsity(first)
    gates = check_gates(table, runs, sparsity, args.quick)
    print(f"\nwall time: total {total / 60:.1f} min (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")")
    print(f"student VSA sparsity: {sparsity:.2f}")
    for key, run_dir in runs.items():
        grids = sorted(run_dir.glob("samples/step-*/grid.mp4"))
        print(f"sample grid, {key} (data | teacher-50 | teacher-3 | student-3): {grids[-1].resolve()}")
    for text, ok in gates:
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")
    t50 = table["teacher-50"]
    if not args.large and not args.quick and t50["motion"] < t50["motion_chance"] + 0.1:
        print(f"  [INFO] teacher-50's motion {100 * t50['motion']:.1f} % is its chance level "
              f"({100 * t50['motion_chance']:.1f} %, frames shuffled between clips): this CPU toy's teacher has no "
              "motion for a student to keep; on a machine with a CUDA GPU `make demo` runs the toy whose teacher has")
    if args.large and not all(ok for text, ok in gates if "1.1 x teacher-50" in text):
        print(f"  [INFO] {teacher_gap(table, runs)}")
    if "lora" in runs:  # the data row's other two gates, for the LoRA row: reported, not gated (issue 19 sets two)
        for text in lora_report(table, runs):
            print(f"  [INFO] {text}")
    with open(first / "demo.json", "w") as f:
        json.dump({"table": table, "sparsity": sparsity, "times_s": times, "gates": dict(gates)}, f, indent=2)
    return 1 if args.strict and not all(ok for _, ok in gates) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
