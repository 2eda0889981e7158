"""Quality table of the toy sparse-distill: teacher at 50 and 3 steps vs distilled 3-step students, on held-out data.

    python scripts/eval_toy.py outputs/toy_sparse_distill/demo outputs/toy_sparse_distill/demo_datafree [--num 192]
        [--json quality.json] [--ema] [--detail]

Each argument is a run directory of `recipes/toy_sparse_distill.py` (its `config.toml` names the teacher, the data,
the student's step list and VSA sparsity; `student/` is the export). The teacher comes from the first run. Every row
samples the same held-out captions from the same noise seed. Columns: Fréchet distance of clip features to the
held-out data (lower is better; `data/synthetic.py`), the distance relative to the 50-step teacher, the temporal
distance (Fréchet of frame-to-frame change features: centroid step and relative change of spread, peak and mass, in
units of the data's travel; frozen clips score ≈ 2, clips with unrelated frames ≈ 0.6), conditioning accuracy (colour,
brightness and size all decoded from the sample as the caption says), motion (the share of samples whose blob moves as
far as the held-out clips' do; `scripts/demo.py` gates it against teacher-50) and its chance level (the same samples
with frames shuffled between clips: what unrelated frames score; motion near it means the row's frames are unrelated,
far below it means frozen), and texture (the fine detail on the blob relative to the held-out clips', 1 = the data's:
pixel noise a few-step sampler leaves on the blob raises it, and with it the peak, mass and spread the distance reads).
Rows: teacher-50 (Euler + CFG, 100 network calls), teacher-3 (Euler + CFG on 3 steps, 6 calls), teacher-3-dmd
(the teacher in the student's sampler: same 3 timesteps, predict x0 and re-noise, CFG; 6 calls), student-3 (3 calls;
one row per run, named by its rollout mode and, for a LoRA run, its rank: `student-3 (data, LoRA r16)`; the JSON
gives each student row its run directory under "run" and its export under "export"; with `--ema` a run trained with
run.ema_decay > 0 also gets a row for its EMA export, `student-3 (data, EMA)`), and two floors: fresh clips (a new
draw of the data) and the same clips frozen (every frame the first).

`--detail` prints where each distance lies (the JSON always has it): its mean and covariance terms, the distance with
samples and held-out clips both blurred (pixel noise gone; ÷ teacher-50's, blurred alike), and the distance on each
feature group alone: position (centroids, velocity), shape (spread, peak, mass per frame), colour (channel mass).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from data.toy_eval import print_detail, print_table, read_run, sample_rows, student_rows

def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="toy_sparse_distill run directories")
    parser.add_argument("--num", type=int, default=240, help="held-out clips per row (240: the whole held-out set)")
    parser.add_argument("--json", type=Path, help="also write the table here")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the networks run")
    parser.add_argument("--detail", action="store_true",
                        help="also where each distance lies: mean / covariance terms, blurred, per feature group")
    parser.add_argument("--ema", action="store_true",
                        help="also a row for each run's EMA export (student_ema/, trained with run.ema_decay > 0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = read_run(args.runs[0])
    try:
        students = student_rows(args.runs, ema=args.ema)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    table = sample_rows(cfg, students, args.num, device=args.device)
    for label, (run, export) in students.items():
        table[label]["run"] = str(run)  # scripts/demo.py finds each run's row by its directory and export
        table[label]["export"] = export
    print_table(table)
    if args.detail:
        print()
        print_detail(table)
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
