"""Ablations of the toy sparse-distill's motion (issue 25): one variable at a time, same seeds, shortened runs.

    python scripts/ablate_toy_motion.py base base_sim guidance_0 dense    # the variants to run, in order
    python scripts/ablate_toy_motion.py --list                            # every variant and its overrides
    python scripts/ablate_toy_motion.py --no-reference base guidance_0    # finished variants are read, not re-run
    python scripts/ablate_toy_motion.py --frame-dependence                # does the teacher's score couple frames?
    python scripts/ablate_toy_motion.py --device cuda --jobs 8 --teacher outputs/toy_teacher/large/teacher base ...
                                          # one GPU, 8 variants at once (the large teacher of scripts/demo.py --large)

Each variant is `recipes/toy_sparse_distill.py` from the stored demo teacher with the TOML's values plus the variant's
overrides, shortened (`--steps`, evaluations every `--eval-every` steps on `--num-eval` held-out captions, the health
guard off, one CPU thread, fewer teacher clips for data mode). Rows: the reference rows (teacher-50 and the teacher's
weights in the student's 3-step sampler, i.e. the student before training, on the same captions and noise as the
recipe's evaluation) then one row per variant with the last evaluation's motion (share of samples whose blob travels
as far as the held-out clips'), motion with frames shuffled between samples (what unrelated frames score), the temporal
distance (Fréchet of frame-to-frame change, `data/synthetic.py temporal_features`), Fréchet of clip features, accuracy
and wall seconds; `motion@k` lists motion at every evaluation. Runs go to outputs/toy_motion_ablation/<variant>/.

Measured 2026-12-02 (`--steps 200 --teacher-clips 96`, 2 shared CPU cores, so the wall seconds say little; base_sim
ran 300 steps): motion / chance / temporal / Fréchet / accuracy
    teacher-50 33.3 / 31.2 / 1.03 / 7.30 / 91.7 %      student at step 0 11.5 / 13.5 / 2.07 / 22.43 / 43.8 %
    base 17.7 / 39.6 / 0.76 / 21.18 / 77.1 % (motion@100 30)   base_sim 17.7 / 38.5 / 1.34 / 8.77 / 85.4 % (@100 27)
    guidance_0 19.8 / 45.8 / 0.73 / 14.89 / 79.2 % (@100 29)   steps_4 25.0 / 39.6 / 0.64 / 48.05 / 44.8 % (@100 26)
    dense 8.3 / 12.5 / 0.92 / 16.04 / 88.5 % (@100 10)
Every VSA student's frames keep the data's chance level (~40 %) while its motion falls below it with training: the
student couples its frames; the teacher (motion = chance) and its score (`--frame-dependence`: same frame-1 error on
clips and on clips with unrelated frames) hold no motion to transfer.

On the large teacher that learns motion (`scripts/demo.py --large`; one NVIDIA H200, torch 2.11.0+cu130, 2026-12-03,
`--device cuda --jobs 8 --steps 300 --eval-every 150 --teacher-clips 192`, 96 captions): motion / chance / temporal /
Fréchet / accuracy (motion@150)
    teacher-50 92.7 / 45.8 / 0.08 / 0.63 / 100 %         student at step 0 31.2 / 17.7 / 1.09 / 8.99 / 44.8 %
    base 50.0 / 24.0 / 0.43 / 1.49 / 96.9 % (27)         base_sim 90.6 / 49.0 / 0.12 / 3.74 / 99.0 % (82)
    guidance_0 49.0 / 24.0 / 0.58 / 2.92 / 87.5 % (24)   shift_1 30.2 / 15.6 / 0.65 / 2.31 / 96.9 % (15)
    steps_4 31.2 / 17.7 / 0.66 / 1.94 / 97.9 % (35)      ratio_10 33.3 / 16.7 / 0.65 / 3.62 / 79.2 % (25)
    critic_lr_x4 34.4 / 15.6 / 0.63 / 2.04 / 94.8 % (27) dense 74.0 / 34.4 / 0.34 / 2.60 / 94.8 % (42)
Every variant's motion rises with training from the step-0 student's 31 % (the demo's 900-step runs end at 94.6 %
data, 97.5 % data-free): the data-free rollout gets there fastest, the dense student faster than VSA at ρ = 0.5, the
uniform score timesteps (shift 1), a 4-step schedule, 10 critic updates per student update and a 4x critic LR slowest;
no variant freezes the blob. Motion is lost only where the teacher has none.
"""

import argparse
import concurrent.futures
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import torch

from attention.sdpa import sdpa_attention
from data.synthetic import ToySpec, evaluate_samples, make_split
from data.toy_eval import sample_student, sample_teacher
from losses.flow import add_noise, x0_from_velocity
from models.wan_weights import load_pretrained

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("outputs/toy_motion_ablation")
# One variable at a time against `base` (data mode) or `base_sim` (data-free); the TOML holds everything else.
VARIANTS = {
    "base": ["dmd.rollout=data"],
    "base_sim": ["dmd.rollout=simulate"],
    "guidance_0": ["dmd.rollout=data", "dmd.guidance=0.0"],  # real score: conditional teacher, no CFG
    "guidance_2": ["dmd.rollout=data", "dmd.guidance=2.0"],  # standard CFG scale 3
    "shift_1": ["dmd.rollout=data", "dmd.shift=1.0"],  # score timesteps uniform instead of shifted to high noise
    "window_low": ["dmd.rollout=data", "dmd.t_max=500"],  # score timesteps only in the low-noise half
    "window_high": ["dmd.rollout=data", "dmd.t_min=500"],  # score timesteps only in the high-noise half
    "steps_4": ["dmd.rollout=data", "dmd.steps=[1000,750,500,250]"],  # the student's schedule
    "steps_low": ["dmd.rollout=data", "dmd.steps=[1000,600,300]"],
    "ratio_10": ["dmd.rollout=data", "dmd.student_every=10"],  # critic updates per student update
    "ratio_2": ["dmd.rollout=data", "dmd.student_every=2"],
    "critic_lr_x4": ["dmd.rollout=data", "optim.critic_lr=8e-4"],
    "critic_dense": ["dmd.rollout=data", "attn.critic=dense"],  # no coarse gate in the critic
    "dense": ["dmd.rollout=data", "attn.student=sdpa"],  # dense student: the control for VSA
    "dense_sim": ["dmd.rollout=simulate", "attn.student=sdpa"],
    "sparsity_75": ["dmd.rollout=data", "attn.sparsity=0.75"],
}


def run_variant(name: str, args: argparse.Namespace) -> dict:
    """Train one variant (skipped when its run already finished) and return its row."""
    run_dir = OUT / name
    common = [f"model.teacher={args.teacher.resolve()}", f"run.name={name}", f"optim.steps={args.steps}",
              f"run.eval_every={args.eval_every}", f"run.num_eval={args.num_eval}", "run.threads=1",
              "health.action=off", f"data.num_teacher_clips={args.teacher_clips}", f"run.device={args.device}"]
    if not (run_dir / "student" / "config.json").is_file() or args.rerun:
        # the recipe writes under outputs/toy_sparse_distill/; move the run next to the other variants afterwards
        cmd = [sys.executable, str(ROOT / "recipes/toy_sparse_distill.py"), *common, *VARIANTS[name]]
        print("$", " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        src = Path("outputs/toy_sparse_distill") / name
        (src / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.0f}\n")
        OUT.mkdir(parents=True, exist_ok=True)
        if run_dir.exists():
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        src.rename(run_dir)
    return read_row(run_dir)


def read_row(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val/student_frechet" in r]
    last = evals[-1]
    wall = run_dir / "wall_s.txt"
    return {
        **{k.removeprefix("val/student_"): v for k, v in last.items() if k.startswith("val/student_")},
        "wall_s": float(wall.read_text()) if wall.is_file() else float("nan"),
        "motion_by_step": {r["step"]: r["val/student_motion"] for r in evals},
    }


@torch.no_grad()
def reference_rows(teacher_path: Path, num_eval: int, device: str = "cpu") -> dict[str, dict]:
    """teacher-50 and the student's starting point (teacher weights, student sampler, no CFG) on the recipe's
    evaluation captions and noise (`validate`: the first num_eval held-out clips, noise seed run.seed + 7)."""
    cfg = tomllib.loads((ROOT / "recipes/toy_sparse_distill.toml").read_text())
    data, dmd = cfg["data"], cfg["dmd"]
    spec = ToySpec(frames=data["frames"], height=data["height"], width=data["width"])
    _, heldout = make_split(spec, data["num_train"], data["num_heldout"], data["seed"])
    ctx, factors = heldout.context[:num_eval].to(device), heldout.factors[:num_eval]
    seed = cfg["run"]["seed"] + 7
    teacher = load_pretrained(teacher_path, attn_fn=sdpa_attention).eval().to(device)
    shape = heldout.latents[:num_eval].shape
    t50 = sample_teacher(teacher, ctx, shape, 50, dmd["shift"], dmd["guidance"], seed)
    init = sample_student(teacher, None, ctx, shape, dmd["steps"], seed)  # the student before training
    return {"teacher-50": evaluate_samples(t50, factors, heldout),
            "student at step 0": evaluate_samples(init, factors, heldout)}


@torch.no_grad()
def frame_dependence(model_path: Path, num: int = 96, seed: int = 3) -> None:
    """Does a network's denoiser use frame 0 to predict frame 1? Its frame-1 x0 error on held-out clips against the
    same clips whose frame 1 comes from another clip of the same caption (same marginals, no dependence between the
    frames), with the same noise. Equal errors: the score carries no motion for DMD to transfer."""
    spec = ToySpec()
    _, heldout = make_split(spec, 4800, 240, 0)
    x, ctx, factors = heldout.latents[:num], heldout.context[:num], heldout.factors[:num]
    unrelated = x.clone()
    for i in range(num):  # the next clip with the same caption (12 captions: one is always among 96)
        j = next(k for k in [*range(i + 1, num), *range(i)] if torch.equal(factors[k], factors[i]))
        unrelated[i, :, 1] = x[j, :, 1]
    model = load_pretrained(model_path, attn_fn=sdpa_attention).eval()
    g = torch.Generator().manual_seed(seed)
    for t_val in (200.0, 400.0, 600.0, 800.0, 950.0):
        noise, t = torch.randn(x.shape, generator=g), torch.full((num,), t_val)
        err = []
        for clips in (x, unrelated):
            x_t = add_noise(clips, noise, t)
            err.append(float((x0_from_velocity(x_t, model(x_t, t, ctx), t) - clips)[:, :, 1].square().mean()))
        print(f"t = {t_val:4.0f}: frame-1 x0 error, clips {err[0]:.4f}, frames unrelated {err[1]:.4f}", flush=True)


def print_table(rows: dict[str, dict]) -> None:
    print(f"{'variant':<20}{'motion':>8}{'chance':>8}{'temporal':>10}{'frechet':>9}{'acc':>7}{'wall s':>8}  motion@step")
    for name, r in rows.items():
        trace = " ".join(f"{k}:{100 * v:.0f}" for k, v in r.get("motion_by_step", {}).items())
        print(f"{name:<20}{100 * r['motion']:>7.1f}%{100 * r['motion_chance']:>7.1f}%{r['temporal']:>10.3f}"
              f"{r['frechet']:>9.2f}{100 * r['cond_acc']:>6.1f}%{r.get('wall_s', float('nan')):>8.0f}  {trace}")


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="*", help=f"variant names, in order: {', '.join(VARIANTS)}")
    parser.add_argument("--list", action="store_true", help="print the variants and their overrides")
    parser.add_argument("--teacher", type=Path, default=ROOT / "tests/assets/toy_teacher")
    parser.add_argument("--steps", type=int, default=300, help="critic steps per variant")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--num-eval", type=int, default=96)
    parser.add_argument("--teacher-clips", type=int, default=192, help="data mode: teacher samples to train on")
    parser.add_argument("--no-reference", action="store_true", help="skip the teacher-50 / step-0 rows")
    parser.add_argument("--rerun", action="store_true", help="train variants whose run already finished again")
    parser.add_argument("--json", type=Path, help="also write the table here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the variants run")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at once (one GPU holds many)")
    parser.add_argument("--frame-dependence", action="store_true",
                        help="only probe whether the teacher's denoiser uses frame 0 for frame 1 (`frame_dependence`)")
    args = parser.parse_args(argv)
    if args.frame_dependence:
        torch.set_num_threads(1)
        frame_dependence(args.teacher)
        return {}
    if args.list:
        for name, overrides in VARIANTS.items():
            print(f"{name:<14}{' '.join(overrides)}")
        return {}
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)} (or --list)")
    if not (args.teacher / "config.json").is_file():
        raise SystemExit(f"--teacher {args.teacher}: no config.json; pass an export of recipes/toy_teacher.py")
    torch.set_num_threads(1)
    rows = {} if args.no_reference else reference_rows(args.teacher, args.num_eval, args.device)
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {name: pool.submit(run_variant, name, args) for name in args.variants}
        for name, future in futures.items():
            rows[name] = future.result()
            print_table({name: rows[name]})  # progress: each row as it finishes
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
