"""Training health on the toy (issue 20, acceptance 1): a healthy run never trips the guard, two collapses trip it.

    PYTHONPATH=$PWD python scripts/health_acceptance.py                  # outputs in ./health_acceptance (2-core CPU under load 15: healthy run 80 min, each collapse 10-20 min)
    PYTHONPATH=$PWD python scripts/health_acceptance.py --reuse          # keep the runs whose log has an exit status
    PYTHONPATH=$PWD python scripts/health_acceptance.py --smoke          # minutes: tiny data, a few steps (no gates)

1. healthy: `recipes/toy_sparse_distill.py` with the `make demo` settings (scripts/demo.py: data mode, the TOML's 900
   steps, an evaluation every 100 steps on 96 held-out captions) on the stored teacher `tests/assets/toy_teacher`,
   guard on (the TOML's `[health]`). Must exit 0 with no validation out of range.
2. collapses, each continued from that run's student (`model.student=<healthy>/student`) with one change and an
   evaluation every `--eval-every` steps: `lr_x100` (both learning rates x100), `frozen_critic` (critic learning rate
   0: the critic never updates, so nothing pulls the DMD gradient back towards the student's own distribution), or
   `guidance_50` (dmd.guidance = 50). Each must exit non-zero with UnhealthyRun naming a statistic, at most
   `health.patience` validations after the first one whose toy metrics fail the gates.
3. every run's `ckpt/last_healthy` (and the healthy run's final student) evaluated by scripts/eval_toy.py's code
   (data/toy_eval.py sample_rows: same held-out captions, noise seed and sampler; `--num` >= 96 clips) against the
   toy's gates: student-3 Fréchet <= 1.1 x teacher-50, conditioning accuracy >= 90 %.
Also the guard's cost: time/health_s / time/val_s at the healthy run's validations (issue 20 budget: <= 5 %).

The per-validation gates use the validation's own numbers (96 captions, the recipe's noise) against the teacher-50
samples of the same captions and noise, which the run made once as its health reference (<run>/health/reference-*.pt;
the healthy run's, at the demo's guidance). The guard's verdict per validation is recomputed from metrics.jsonl with
HealthGuard.out_of_range (the same code, the run's `[health]` table, its step-0 start); the trip, its step and the
statistics it named come from the run's log. Prints one table; writes acceptance.json. Exit status 1 if any check fails.
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import torch

from components.health import HealthConfig, HealthGuard
from components.metrics import MetricsLogger
from data.synthetic import ToySpec, evaluate_samples, make_split
from data.toy_eval import sample_rows

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "toy_sparse_distill.py"
FRECHET_GATE, ACCURACY_GATE = 1.1, 0.9  # student-3 Fréchet <= 1.1 x teacher-50; conditioning accuracy >= 90 %
# The smoke form: the CI test's tiny data and short runs; the gates are printed but not required.
SMOKE = ["data.num_train=64", "data.num_heldout=96", "data.source=clips", "optim.batch_size=4", "health.teacher_steps=8"]


def collapse_overrides(name: str, healthy_cfg: dict) -> list[str]:
    """The collapse-inducing change, relative to the healthy run's resolved config."""
    optim = healthy_cfg["optim"]
    if name == "lr_x100":
        return [f"optim.student_lr={100 * optim['student_lr']!r}", f"optim.critic_lr={100 * optim['critic_lr']!r}"]
    if name == "frozen_critic":  # AdamW at lr 0 changes nothing (its decoupled decay is lr x weight_decay too)
        return ["optim.critic_lr=0.0"]
    if name == "guidance_50":
        return ["dmd.guidance=50.0"]
    raise ValueError(name)


COLLAPSES = ("lr_x100", "frozen_critic", "guidance_50")


# ------------------------------------------------------------------------------------------------------------- runs
def launch(out: Path, name: str, overrides: list[str], reuse: bool) -> dict:
    """Run the toy recipe as `run.name=name` in `out` (one at a time, one thread); its merged stdout/stderr go to
    <out>/<name>.log, ending in a line `rc=N`. With `reuse`, a log that has that line stands for the run."""
    log, run_dir = out / f"{name}.log", out / "outputs" / "toy_sparse_distill" / name
    if reuse and log.is_file() and (m := re.search(r"^rc=(-?\d+)$", log.read_text(), re.MULTILINE)):
        print(f"reusing {run_dir} (exit status {m[1]}, {log})", flush=True)
        return {"name": name, "rc": int(m[1]), "log": log.read_text(), "run_dir": run_dir, "wall_s": None}
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: a fresh run starts from nothing
    cmd = [sys.executable, str(RECIPE), *overrides, f"run.name={name}", "run.threads=1"]
    print("$", " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=out, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - t0
    with open(log, "a") as f:
        f.write(f"rc={rc}\n")
    print(f"  exit status {rc} after {wall:.0f} s ({log})", flush=True)
    return {"name": name, "rc": rc, "log": log.read_text(), "run_dir": run_dir, "wall_s": wall}


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """step -> every value logged at that step (None, i.e. NaN/inf in the JSON, as NaN)."""
    steps: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        steps.setdefault(row["step"], {}).update({k: math.nan if v is None else v for k, v in row.items()})
    return dict(sorted(steps.items()))


def reference(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's health cache: the teacher's 50-step samples and the start student's, on the validation set."""
    paths = sorted((run_dir / "health").glob("reference-*.pt"))
    if len(paths) != 1:
        raise SystemExit(f"{run_dir / 'health'}: expected one reference-*.pt, found {len(paths)}")
    return torch.load(paths[0], weights_only=True)


def trip_of(log: str) -> dict | None:
    """The guard's stop from the run's log: its step, the statistics (or losses) it named, the message."""
    m = re.search(r"UnhealthyRun: (run unhealthy at step (\d+), .*)", log)
    if m is None:
        return None
    named = re.findall(r"health/(\w+) = ", m[1]) + re.findall(r"((?:loss|grad_norm)/\w+) = ", m[1])
    return {"step": int(m[2]), "named": named, "message": m[1]}


def validation_rows(run: dict, heldout, teacher50_frechet: float) -> list[dict]:
    """One row per validation (step 0: the start student, from the health cache): the toy's numbers, whether they
    meet the gates, and the guard's verdict (HealthGuard.out_of_range on the logged statistics)."""
    run_dir = run["run_dir"]
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    guard = HealthGuard(HealthConfig(**cfg["health"]), run_dir, MetricsLogger(run_dir, enabled=False), resume=False)
    metrics = read_metrics(run_dir)
    guard.start = {k: v for k, v in metrics.get(0, {}).items() if k.startswith("health/")}
    start = reference(run_dir)["start"]
    n = start.shape[0]
    scores0 = evaluate_samples(start, heldout.factors[:n], heldout)
    rows = []
    for step, values in metrics.items():
        if step == 0:
            values = {**values, "val/student_frechet": scores0["frechet"], "val/student_cond_acc": scores0["cond_acc"]}
        if "val/student_frechet" not in values:
            continue
        frechet, acc = values["val/student_frechet"], values["val/student_cond_acc"]
        stats = {k: v for k, v in values.items() if k.startswith("health/")}
        out = guard.out_of_range(stats) if step > 0 else []  # step 0 is where the ranges widen to
        rows.append({"step": step, "frechet": frechet, "ratio": frechet / teacher50_frechet, "cond_acc": acc,
                     "gates": frechet <= FRECHET_GATE * teacher50_frechet and acc >= ACCURACY_GATE,
                     "out": [r.split(" = ")[0].removeprefix("health/") for r in out],
                     "health_s": values.get("time/health_s"), "val_s": values.get("time/val_s")})
    return rows


# ------------------------------------------------------------------------------------------------------------ table
def fmt_verdict(row: dict, tripped: bool) -> str:
    text = "in range" if not row["out"] else "OUT: " + ", ".join(row["out"])
    return text + ("  -> TRIPPED" if tripped else "")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("health_acceptance"), help="working directory of the runs")
    parser.add_argument("--teacher", type=Path, default=ROOT / "tests" / "assets" / "toy_teacher")
    parser.add_argument("--collapses", nargs="+", choices=COLLAPSES, default=["lr_x100", "frozen_critic"])
    parser.add_argument("--collapse-steps", type=int, default=600, help="steps of a collapse run (it stops earlier)")
    parser.add_argument("--eval-every", type=int, default=25, help="validation interval of the collapse runs")
    parser.add_argument("--num", type=int, default=240, help="held-out clips for the last_healthy gate checks (>= 96)")
    parser.add_argument("--start", type=Path, default=None,
                        help="continue the collapses from this student export (a copy of one of the healthy run's"
                             " ckpt/step-NNNNNN, which rotation deletes) instead of the healthy run's student/")
    parser.add_argument("--pool", type=int, default=None,
                        help="data.num_teacher_clips of the collapse runs (default: the healthy run's 480; each run"
                             " generates its pool again, which costs as much as 480 clips x 100 teacher calls)")
    parser.add_argument("--reuse", action="store_true", help="keep runs whose <out>/<name>.log has an exit status")
    parser.add_argument("--smoke", action="store_true", help="tiny data, a few steps: checks the script, not the guard")
    args = parser.parse_args(argv)
    if not (args.teacher / "config.json").is_file():
        raise SystemExit(f"--teacher {args.teacher}: no config.json there; pass an export of recipes/toy_teacher.py")
    if args.num < 96 and not args.smoke:
        raise SystemExit(f"--num {args.num}: the gate checks need at least 96 held-out clips")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    common = [f"model.teacher={args.teacher.resolve()}", "dmd.rollout=data"]  # scripts/demo.py's data-mode student
    healthy_extra = []
    if args.smoke:
        common += SMOKE
        healthy_extra = ["optim.steps=8", "run.eval_every=4"]
        args.collapse_steps, args.eval_every, args.num = 8, 2, min(args.num, 96)

    t_start = time.perf_counter()
    healthy = launch(out, "healthy", [*common, *healthy_extra], args.reuse)
    if healthy["rc"] != 0:
        print(healthy["log"][-3000:])
        raise SystemExit(f"the healthy run exited {healthy['rc']} (log: {out / 'healthy.log'})")
    healthy_cfg = tomllib.loads((healthy["run_dir"] / "config.toml").read_text())
    runs = [healthy]
    start = (args.start or healthy["run_dir"] / "student").resolve()
    if not (start / "config.json").is_file():
        raise SystemExit(f"--start {start}: no config.json there; pass a student export (a toy run's ckpt/step-N)")
    pool = [] if args.pool is None else [f"data.num_teacher_clips={args.pool}"]
    for name in args.collapses:
        change = collapse_overrides(name, healthy_cfg)
        overrides = [*common, f"model.student={start}", f"optim.steps={args.collapse_steps}",
                     f"run.eval_every={args.eval_every}", *pool, *change]
        runs.append({**launch(out, name, overrides, args.reuse), "change": " ".join(change)})

    # teacher-50 on the validation set (96 captions, the recipe's noise): the healthy run's health reference
    data = healthy_cfg["data"]
    spec = ToySpec(frames=data["frames"], height=data["height"], width=data["width"])
    _, heldout = make_split(spec, data["num_train"], data["num_heldout"], data["seed"])
    t50 = reference(healthy["run_dir"])["teacher"]
    t50_val = evaluate_samples(t50, heldout.factors[: t50.shape[0]], heldout)
    checks: list[tuple[str, bool]] = []
    for run in runs:
        run["rows"] = validation_rows(run, heldout, t50_val["frechet"])
        run["trip"] = trip_of(run["log"])
        link = run["run_dir"] / "ckpt" / "last_healthy"
        run["last_healthy"] = link.resolve() if link.is_symlink() else None

    print("\nevaluating the last_healthy students (scripts/eval_toy.py's rows)", flush=True)
    students = {"healthy: final student": (healthy["run_dir"], "student")}  # {row: (run, its export)}
    for run in runs:
        if run["last_healthy"] is not None:
            export = run["last_healthy"].relative_to(run["run_dir"].resolve())  # ckpt/healthy/step-NNNNNN
            students[f"{run['name']}: last_healthy = {run['last_healthy'].name}"] = (run["run_dir"], str(export))
    evals = sample_rows(healthy_cfg, students, args.num)  # and eval_toy's other rows, not gated here
    t50_eval = evals["teacher-50"]["frechet"]

    # ---- the table
    width = 124
    print("\n" + "=" * width)
    print(f"teacher-50 on the validation set ({t50.shape[0]} captions): Fréchet {t50_val['frechet']:.3f}, "
          f"accuracy {100 * t50_val['cond_acc']:.1f} %; gates: Fréchet <= {FRECHET_GATE} x that, accuracy >= "
          f"{100 * ACCURACY_GATE:.0f} %")
    print(f"{'run':<15}{'step':>6}{'Fréchet':>10}{'÷ t-50':>8}{'acc':>8}  {'toy gates':<10}{'guard':<58}{'exit':>6}")
    print("-" * width)
    for run in runs:
        trip, rows = run["trip"], run["rows"]
        for row in rows:
            tripped = trip is not None and row["step"] == trip["step"]
            last = run["last_healthy"] is not None and run["last_healthy"].name == f"step-{row['step']:06d}"
            verdict = fmt_verdict(row, tripped) + ("  [last_healthy]" if last else "")
            rc = str(run["rc"]) if row is rows[-1] else ""
            print(f"{run['name']:<15}{row['step']:>6}{row['frechet']:>10.3f}{row['ratio']:>8.2f}"
                  f"{100 * row['cond_acc']:>7.1f}%  {'pass' if row['gates'] else 'FAIL':<10}{verdict:<58}{rc:>6}")
        if run.get("change"):
            resolved = tomllib.loads((run["run_dir"] / "config.toml").read_text())  # a reused run's own settings
            print(f"{'':<15}change: {run['change']}; continued from {resolved['model']['student']}, data pool "
                  f"{resolved['data']['num_teacher_clips']} teacher clips")
        if trip:
            print(f"{'':<15}stopped: {trip['message'][:width - 24]}...")
        print("-" * width)
    print(f"last_healthy evaluation ({args.num} held-out clips, eval_toy.py's noise and sampler): teacher-50 "
          f"Fréchet {t50_eval:.3f}, accuracy {100 * evals['teacher-50']['cond_acc']:.1f} %")
    for name in students:
        r = evals[name]
        ok = r["frechet"] <= FRECHET_GATE * t50_eval and r["cond_acc"] >= ACCURACY_GATE
        print(f"  {name:<42} Fréchet {r['frechet']:>7.3f} ({r['frechet'] / t50_eval:.2f} x t-50)  accuracy "
              f"{100 * r['cond_acc']:5.1f} %  gates {'pass' if ok else 'FAIL'}")
        checks.append((f"{name} meets the gates", ok))

    ratios = [r["health_s"] / r["val_s"] for r in healthy["rows"] if r["health_s"] and r["val_s"]]
    cost = sorted(ratios)[len(ratios) // 2] if ratios else math.nan
    print(f"guard cost at the healthy run's {len(ratios)} validations: time/health_s / time/val_s median "
          f"{100 * cost:.2f} %, max {100 * max(ratios, default=math.nan):.2f} %")
    print("=" * width)

    # ---- the checks
    patience = HealthConfig(**healthy_cfg["health"]).patience
    checks.insert(0, ("healthy: exit 0, every validation in range, no trip",
                      healthy["rc"] == 0 and healthy["trip"] is None and not any(r["out"] for r in healthy["rows"])
                      and "left its range" not in healthy["log"]))
    checks.insert(1, ("healthy: the final validation meets the gates", healthy["rows"][-1]["gates"]))
    checks.append((f"guard cost median <= 5 % of the validation step ({100 * cost:.2f} %)", cost <= 0.05))
    for run in runs[1:]:
        trip, rows = run["trip"], run["rows"]
        degraded = [i for i, r in enumerate(rows) if i > 0 and not r["gates"]]  # after the start (its own check)
        checks.append((f"{run['name']}: its start (step 0) meets the gates", rows[0]["gates"]))
        checks.append((f"{run['name']}: exit status non-zero ({run['rc']})", run["rc"] != 0))
        checks.append((f"{run['name']}: the guard stopped it naming a statistic",
                       trip is not None and bool(trip["named"])))
        checks.append((f"{run['name']}: the toy metrics fail the gates at a validation", bool(degraded)))
        if trip and degraded:
            tripped_at = next((i for i, r in enumerate(rows) if r["step"] == trip["step"]), len(rows))
            lag = tripped_at - degraded[0]
            text = (f"{run['name']}: tripped {lag} validation(s) after the first degraded one "
                    f"(step {rows[degraded[0]]['step']} -> {trip['step']}; allowed 0..{patience})")
            checks.append((text, 0 <= lag <= patience))
    for text, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")
    print(f"total {(time.perf_counter() - t_start) / 60:.1f} min")

    summary = {"teacher50_validation": t50_val, "evaluations": evals, "guard_cost_median": cost,
               "checks": dict(checks), "runs": [{k: (str(v) if isinstance(v, Path) else v) for k, v in run.items()
                                                 if k != "log"} for run in runs]}
    (out / "acceptance.json").write_text(json.dumps(summary, indent=2, default=str))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
