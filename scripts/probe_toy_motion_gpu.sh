#!/usr/bin/env bash
# Issue 25: which toy teacher learns motion? One scripts/probe_toy_factors.py process per teacher size, all on one GPU,
# on the toy's own clips (travel 10, jitter 3). Prints the last three milestones of each: motion vs its frames-shuffled
# chance and the temporal distance say whether the teacher couples its frames (data/synthetic.py has the results).
#     OUT=/tmp/probe BUDGET=480 bash scripts/probe_toy_motion_gpu.sh
set -euo pipefail
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/probe_toy_motion}
mkdir -p "$OUT"
M="1000 2000 3000 4000 6000 8000 12000 16000 24000 32000"
declare -A V=(
  [demo_d48h1l2]="" [d48h2l4]="heads=2 layers=4" [d64h2l3]="dim=64 heads=2 layers=3"
  [d96h4l2]="dim=96 heads=4 ffn=256" [d96h4l3]="dim=96 heads=4 ffn=256 layers=3"
  [d128h4l4]="dim=128 heads=4 ffn=256 layers=4" [demo_shift1]="shift=1" [small_travel]="travel=4 jitter=8"
)
for k in "${!V[@]}"; do
  # shellcheck disable=SC2086
  python scripts/probe_toy_factors.py --factor brightness --steps 32000 --budget-s "${BUDGET:-480}" --milestones $M \
    --set ${V[$k]} > "$OUT/$k.jsonl" 2> "$OUT/$k.err" &
done
wait
OUT=$OUT python - <<'PY'
import glob, json, os
print(f"{'teacher':<14}{'step':>7}{'frechet':>9}{'motion':>8}{'chance':>8}{'temporal':>9}")
for path in sorted(glob.glob(os.path.join(os.environ["OUT"], "*.jsonl"))):
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    name = os.path.basename(path)[:-6]
    if not rows:
        print(f"{name:<14} no rows: see {path[:-6]}.err")
    for r in rows[-3:]:
        print(f"{name:<14}{r['step']:>7}{r['frechet']:>9}{r['motion']:>8}{r['motion_chance']:>8}{r['temporal']:>9}")
PY
