#!/usr/bin/env bash
# The toy on one GPU (issues 25 and 19): every step time-boxed, results in $OUT/summary.txt.
#   smoke    every CUDA path of the toy recipes at a few steps (teacher, data / data-free / LoRA students, eval_toy)
#   large    `scripts/demo.py --large`: the teacher that learns motion, its students and the quality table with gates
#   ablate   the motion ablations (scripts/ablate_toy_motion.py) on the large teacher, 8 variants at once
#   lora     the demo's LoRA row (data mode, all 240 captions) over seeds 0-2 and LORA_VARIANTS (base: the demo's
#            row; long: 1500 steps; slr2: twice the student LR; cos: cosine LR schedules), on the demo's stored
#            teacher (tests/assets/toy_teacher), with the full fine-tune beside it
#
#   OUT=/tmp/toy_gpu bash scripts/toy_gpu_study.sh smoke,large,lora     # the steps, in order ("&" runs two at once:
#   OUT=/tmp/toy_gpu bash scripts/toy_gpu_study.sh smoke,large&lora      #  large and lora share the GPU)
# A CUDA run draws its random numbers on the GPU, so its rows are not bitwise the CPU demo's.
set -uo pipefail
OUT=${OUT:-outputs/toy_gpu_study}
L=$OUT/logs  # every log, packed into $OUT/logs.tgz at the end
mkdir -p "$L"
export PYTHONPATH=$PWD OMP_NUM_THREADS=2
PY=${PY:-python}
S=$OUT/summary.txt
LARGE_TEACHER=${LARGE_TEACHER:-outputs/toy_teacher/large/teacher}

smoke() {
  local t=outputs/toy_teacher/smoke/teacher common=(run.device=cuda run.num_eval=8 health.action=warn run.eval_every=5)
  $PY recipes/toy_teacher.py run.name=smoke run.device=cuda optim.steps=20 run.num_eval=8 model.dim=128 \
    model.ffn_dim=256 model.num_heads=4 model.num_layers=4 &&
    $PY recipes/toy_sparse_distill.py model.teacher=$t run.name=smoke optim.steps=10 data.num_teacher_clips=48 \
      "${common[@]}" &&
    $PY recipes/toy_sparse_distill.py model.teacher=$t run.name=smoke_sim dmd.rollout=simulate optim.steps=10 \
      "${common[@]}" &&
    $PY recipes/toy_sparse_distill.py model.teacher=$t run.name=smoke_lora lora.rank=8 optim.steps=10 \
      data.num_teacher_clips=48 optim.scheduler=cosine_with_min_lr "${common[@]}" &&
    $PY scripts/eval_toy.py outputs/toy_sparse_distill/smoke{,_sim,_lora} --num 16 --device cuda
}

large() {  # with LARGE_TEACHER already there (an earlier call's export), the demo distills it instead of training
  if [ -f "$LARGE_TEACHER/config.json" ]; then $PY scripts/demo.py --large --teacher "$LARGE_TEACHER"
  else $PY scripts/demo.py --large; fi
}

ablate() {
  $PY scripts/ablate_toy_motion.py --device cuda --jobs 8 --teacher "$LARGE_TEACHER" --steps ${ABLATE_STEPS:-900} --eval-every ${ABLATE_EVAL:-300} \
    --num-eval 96 --teacher-clips ${ABLATE_CLIPS:-480} --json "$OUT/ablate.json" ${ABLATE_VARIANTS:-base base_sim guidance_0 \
    shift_1 steps_4 ratio_10 critic_lr_x4 dense}
}

lora() {
  local t=tests/assets/toy_teacher pids=() runs=()
  local lr=(lora.rank=8 lora.alpha=16 optim.student_lr=5e-4 optim.critic_lr=1e-3)
  declare -A v=([base]="" [long]="optim.steps=1500" [slr2]="optim.student_lr=1e-3"
                [cos]="optim.scheduler=cosine_with_min_lr optim.critic_scheduler=cosine_with_min_lr")
  for seed in 0 1 2; do
    for k in ${LORA_VARIANTS:-base long slr2}; do
      # shellcheck disable=SC2086
      $PY recipes/toy_sparse_distill.py model.teacher=$t run.name=lora_${k}_s$seed run.seed=$seed run.device=cuda \
        "${lr[@]}" ${v[$k]} > "$L/lora_${k}_s$seed.log" 2>&1 &
      pids+=($!) runs+=(outputs/toy_sparse_distill/lora_${k}_s$seed)
    done
  done
  $PY recipes/toy_sparse_distill.py model.teacher=$t run.name=full_s0 run.device=cuda > "$L/full_s0.log" 2>&1 &
  pids+=($!) runs+=(outputs/toy_sparse_distill/full_s0)
  wait "${pids[@]}"
  $PY scripts/eval_toy.py "${runs[@]}" --device cuda --json "$OUT/lora.json"
}

step() {  # name: run it time-boxed (what is left of BUDGET seconds), log it, note its status and time in the summary
  local t0=$SECONDS
  timeout $((${BUDGET:-560} - SECONDS)) bash -c "$(declare -f smoke large ablate lora); $1" > "$L/$1.log" 2>&1
  local rc=$?
  echo "== $1: rc $rc, $((SECONDS - t0)) s" >> "$S"
  tail -n "${TAIL:-40}" "$L/$1.log" >> "$S"
  return $rc
}

nvidia-smi -L > "$S"
$PY -c "import torch; print('torch', torch.__version__)" >> "$S"
export -f smoke large ablate lora
export PY OUT L LARGE_TEACHER
IFS=',' read -ra STEPS <<< "${1:-smoke,large}"
for s in "${STEPS[@]}"; do
  if [[ $s == *"&"* ]]; then  # two steps side by side
    step "${s%%&*}" & a=$!
    step "${s##*&}" & b=$!
    wait $a; wait $b
  else
    step "$s" || { [ "$s" = smoke ] && break; }
  fi
done
# what a later call needs, also after a step was cut short: the large teacher's export and the demo's table
[ -f outputs/toy_teacher/large/teacher/config.json ] && tar czf "$OUT/large_teacher.tgz" outputs/toy_teacher/large/teacher
[ -f outputs/toy_sparse_distill/large/demo.json ] && cp outputs/toy_sparse_distill/large/demo.json "$OUT/large_demo.json"
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
echo "== total $SECONDS s" >> "$S"
