"""The two-expert toy teacher (tests/assets/toy_experts/): two copies of the stored toy teacher fine-tuned on either side
of a timestep boundary, as Wan2.2-A14B's high-noise (t >= boundary) and low-noise experts; then its quality table
against the one-network teacher's.

    python scripts/make_toy_experts.py                     # fine-tune both (recipes/toy_teacher.py), store, compare
    python scripts/make_toy_experts.py --compare-only      # only the teacher rows of the stored pair vs the single one
    python scripts/make_toy_experts.py --compare-only --students outputs/toy_sparse_distill/RUN ...
                                                           # and a student-3 row per distillation run, named by its run

Layout written: <out>/transformer/ (high noise), <out>/transformer_2/ (low noise), the diffusers names of the
A14B folders, and <out>/experts.json with the boundary_ratio and how they were made. Distil them with
`recipes/toy_sparse_distill.py model.teacher=<out>/transformer model.teacher_2=<out>/transformer_2 model.boundary=0.875`.
The comparison samples both teachers with scripts/eval_toy.py's rows (same held-out captions and noise): teacher-50,
teacher-3, teacher-3-dmd.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

from attention.sdpa import sdpa_attention
from attention.vsa import vsa_attention, vsa_meta
from data.synthetic import ToySpec, evaluate_samples, make_split
from data.toy_eval import CHUNK, print_table, read_run, sample_rows, student_row
from models.wan_weights import load_pretrained

ROOT = Path(__file__).resolve().parent.parent

# Fine-tuning of each expert from the stored teacher (recipes/toy_teacher.py defaults otherwise: same data and seed).
# Half the pre-training LR: the copies start from a trained teacher and only specialise.
FINE_TUNE = ["optim.lr=5e-4", "run.threads=1", "run.log_every=100"]


def fine_tune(ranges: dict[str, tuple[float, float]], teacher: Path, steps: int) -> dict[str, Path]:
    """Both experts at once, one thread each; {run name: its export}."""
    procs = {}
    for name, (lo, hi) in ranges.items():
        cmd = [sys.executable, str(ROOT / "recipes/toy_teacher.py"), f"model.init={teacher}", f"flow.t_range=[{lo},{hi}]",
               f"optim.steps={steps}", f"run.name={name}", *FINE_TUNE]
        print("$", " ".join(cmd[1:]), flush=True)
        procs[name] = subprocess.Popen(cmd)
    failed = [name for name, proc in procs.items() if proc.wait() != 0]
    if failed:
        raise SystemExit(f"fine-tuning failed: {failed} (see outputs/toy_teacher/<name>/)")
    return {name: Path("outputs/toy_teacher") / name / "teacher" for name in procs}


def compare(single: Path | None, experts: Path, num: int, students: list[Path]) -> dict[str, dict[str, dict[str, float]]]:
    """eval_toy's teacher rows for the one-network teacher and for the pair, on the distillation recipe's data; the
    students' rows (one per run directory, labelled by its name) in the pair's table. single None: the pair only."""
    meta = json.loads((experts / "experts.json").read_text())
    cfg = tomllib.loads((ROOT / "recipes/toy_sparse_distill.toml").read_text())
    teachers = {"single": {"teacher": str(single)}} if single is not None else {}
    teachers["two experts"] = {"teacher": str(experts / "transformer"), "teacher_2": str(experts / "transformer_2"),
                               "boundary": meta["boundary_ratio"]}
    tables = {}
    for name, model in teachers.items():
        rows = {f"student-3 {Path(r).name}": (r, "student") for r in students} if name == "two experts" else {}
        tables[name] = sample_rows({**cfg, "model": model}, rows, num)
        print(f"\n{name}: {model}")
        print_table(tables[name])
    return tables


@torch.no_grad()
def student_rows(students: list[Path], num: int, seed: int = 1234) -> dict[str, dict[str, float]]:
    """Only the students' rows of eval_toy.sample_rows (the same held-out captions, noise and per-row generator, so the
    numbers equal that table's), without its teacher rows: the pair's are in the --compare-only table."""
    cfg = tomllib.loads((ROOT / "recipes/toy_sparse_distill.toml").read_text())
    data, steps = cfg["data"], cfg["dmd"]["steps"]
    spec = ToySpec(frames=data["frames"], height=data["height"], width=data["width"])
    _, heldout = make_split(spec, data["num_train"], data["num_heldout"], data["seed"])
    num = min(num, heldout.latents.shape[0])
    context, factors = heldout.context[:num], heldout.factors[:num]
    noise = torch.randn(heldout.latents[:num].shape, generator=torch.Generator().manual_seed(seed))
    table = {}
    for path in students:
        attn = read_run(path)["attn"]
        vsa = attn["student"] == "vsa"
        student = load_pretrained(Path(path) / "student", attn_fn=vsa_attention if vsa else sdpa_attention).eval()
        meta = vsa_meta(student.token_grid(noise.shape), attn["sparsity"], "cpu") if vsa else None
        fn, g = student_row(student, meta, steps), torch.Generator().manual_seed(seed + 1)
        chunks = [fn(noise[i:i + CHUNK], context[i:i + CHUNK], g) for i in range(0, num, CHUNK)]
        table[f"student-3 {Path(path).name}"] = evaluate_samples(torch.cat(chunks), factors, heldout)
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, default=ROOT / "tests/assets/toy_teacher", help="the one-network teacher")
    parser.add_argument("--out", type=Path, default=ROOT / "tests/assets/toy_experts")
    parser.add_argument("--boundary", type=float, default=0.875, help="boundary_ratio (Wan2.2-A14B T2V: 0.875)")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per expert")
    parser.add_argument("--num", type=int, default=240, help="held-out clips per row of the comparison")
    parser.add_argument("--compare-only", action="store_true", help="skip the fine-tuning; compare the stored pair")
    parser.add_argument("--students", type=Path, nargs="*", default=[], help="toy_sparse_distill runs to add as rows")
    parser.add_argument("--no-single", action="store_true", help="skip the one-network teacher's table")
    parser.add_argument("--students-only", action="store_true",
                        help="only the --students rows (eval_toy's numbers), no teacher rows")
    parser.add_argument("--json", type=Path, help="also write the two tables here")
    args = parser.parse_args(argv)
    if not 0 < args.boundary < 1:
        raise SystemExit(f"--boundary {args.boundary}: a ratio of the 1000 timesteps, in (0, 1)")
    if not (args.teacher / "config.json").is_file():
        raise SystemExit(f"--teacher {args.teacher}: no config.json there; pass an export of recipes/toy_teacher.py")
    if args.students_only:
        table = student_rows(args.students, args.num)
        for name, r in table.items():
            print(f"{name:<32}frechet {r['frechet']:.3f}  cond acc {100 * r['cond_acc']:.1f}%  "
                  f"motion {100 * r['motion']:.1f}%  temporal {r['temporal']:.3f}")
        if args.json:
            args.json.write_text(json.dumps(table, indent=2))
        return 0
    if not args.compare_only:
        done = fine_tune({"expert_high": (args.boundary, 1.0), "expert_low": (0.0, args.boundary)}, args.teacher,
                         args.steps)
        for src, dst in ((done["expert_high"], "transformer"), (done["expert_low"], "transformer_2")):
            shutil.rmtree(args.out / dst, ignore_errors=True)
            shutil.copytree(src, args.out / dst)
        (args.out / "experts.json").write_text(json.dumps({
            "boundary_ratio": args.boundary,
            "transformer": f"high noise: t >= {args.boundary * 1000:g}, fine-tuned on flow.t_range [{args.boundary}, 1]",
            "transformer_2": f"low noise: t < {args.boundary * 1000:g}, fine-tuned on flow.t_range [0, {args.boundary}]",
            "made_by": f"scripts/make_toy_experts.py --steps {args.steps} from {args.teacher.name}, "
                       f"recipes/toy_teacher.py {' '.join(FINE_TUNE)}",
        }, indent=2) + "\n")
    tables = compare(None if args.no_single else args.teacher, args.out, args.num, args.students)
    if args.json:
        args.json.write_text(json.dumps(tables, indent=2))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))
