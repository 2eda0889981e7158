#!/usr/bin/env bash
# The GPU acceptance measurements (benchmarks, GPU checks, GPU tests, the recipe at real size) for one host layout,
# most important first, each step time-boxed so that a run cut short still leaves what it measured. Run from the
# repository root with the packages importable (`pip install -e .`); diffusers is needed only by the --diffusers
# comparisons and the GPU tests that use it.
#
#   bash scripts/gpu_acceptance.sh single    # one GPU: GPU tests, VSA bench, training step, inference, 1-GPU recipe
#   bash scripts/gpu_acceptance.sh dual      # two GPUs: SP/FSDP checks, DMD-step scaling, SP=2 step, 2-GPU recipe,
#                                            # the 14B block structure at reduced depth (SP=2, DP=2)
#   bash scripts/gpu_acceptance.sh quad      # four GPUs: the dual runs side by side, SP 4 checks
#   bash scripts/gpu_acceptance.sh compiled  # four GPUs: compiled training checked against eager, then timed
#   bash scripts/gpu_acceptance.sh single bench_train,recipe_1gpu   # only the named steps
#
# bench_train steps include writing real-size random weights once per --work folder and the recipe's final export.
# Results: $OUT/summary.txt (the result lines of every step), $OUT/gpus.txt, and every full log in $OUT/logs.tgz.
set -u
case "${1:-}" in
single | dual | quad | compiled) ;;
*)
  echo "usage: bash scripts/gpu_acceptance.sh single|dual|quad|compiled [STEP,...]" >&2
  exit 2
  ;;
esac
OUT=${OUT:-outputs/gpu_acceptance}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# NVLink multicast (NVLS) off: hosts that do not expose it would otherwise fail at NCCL/symmetric-memory init.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L | tee "$OUT/gpus.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpus.txt"

ONLY=${2:-}
LOGS=outputs/gpu_acceptance_logs  # every log; packed into $OUT/logs.tgz at exit
mkdir -p "$LOGS"
trap 'tar -czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null' EXIT
wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
summarize() {  # the step's exit status and the lines of its log that carry results
  [ -f "$LOGS/$1.rc" ] || return 0
  echo "== $1 (exit $(cat "$LOGS/$1.rc"))" | tee -a "$OUT/summary.txt"
  grep -E "FAILED|RESULT|speedup|x /|ok$|FAIL|eff |frames/s|passed|failed|Error|^step (1|5|10|12) | AC |norm fp64" "$LOGS/$1.log" |
    cut -c1-400 | tail -12 | tee -a "$OUT/summary.txt"
}
run_step() {  # run_step NAME SECONDS CMD...: run with a time box, log to $LOGS/NAME.log
  local name=$1 secs=$2
  shift 2
  wanted "$name" || return 0
  timeout "$secs" "$@" >"$LOGS/$name.log" 2>&1
  echo $? >"$LOGS/$name.rc"
}
step() { run_step "$@"; summarize "$1"; }
NAMES=()
chain() {  # chain GPUS "NAME SECONDS CMD..." ...: steps one after another on the GPUs listed, in the background
  local gpus=$1
  shift
  for spec in "$@"; do NAMES+=("${spec%% *}"); done
  (export CUDA_VISIBLE_DEVICES=$gpus; for spec in "$@"; do eval "run_step $spec"; done) &
}
collect() {  # wait for the chains, then summarize their steps in the order they were listed
  wait
  for name in "${NAMES[@]}"; do summarize "$name"; done
  NAMES=()
}

case "${1:-}" in
single)
  step check_speedups 200 python3 scripts/check_speedups_gpu.py
  step check_compile 290 python3 scripts/check_speedups_gpu.py --layers 6 --only "eager+none,compile+none,\
compile nofsdp+none,compile nocudnn+none,compile noreshard+none,compile attn-eager+none,compile fp32+none"
  step gpu_tests 240 python3 -m pytest -q -m gpu tests
  step bench_attention_sweep 200 python3 benchmarks/bench_attention.py --sweep --shapes 1.3B-480p --sparsity 0.9
  step bench_attention_pointer 150 env SPARSE_DISTILL_VSA_TMA=0 python3 benchmarks/bench_attention.py --shapes 1.3B-480p
  step bench_attention 240 python3 benchmarks/bench_attention.py --profile --bound
  step bench_optimizer 120 python3 benchmarks/bench_optimizer.py
  step bench_train 420 python3 benchmarks/bench_train.py --ac full --cycles 2
  step bench_train_attn 420 python3 benchmarks/bench_train.py --ac attention --cycles 2
  step bench_inference 420 python3 benchmarks/bench_inference.py --cases a,b,c --diffusers
  step bench_inference_compile 300 python3 benchmarks/bench_inference.py --cases a --compile --fp8 --profile
  step bench_inference_14b 570 python3 benchmarks/bench_inference.py --cases b --compile --fp8
  step bench_inference_14b_diffusers 540 python3 benchmarks/bench_inference.py --cases b --compile --fp8 --diffusers \
    --skip-ours-teacher
  step tiny_data 120 python3 tools/make_tiny_data.py --out outputs/gpu_data --shape 16,20,56,104 --text-dim 4096 --rows 16
  step recipe_1gpu 400 torchrun --nproc_per_node 1 recipes/wan21_1_3b_sparse_distill.py \
    --toml tests/assets/gpu_1_3b_random.toml
  step recipe_1gpu_eager 200 torchrun --nproc_per_node 1 recipes/wan21_1_3b_sparse_distill.py \
    --toml tests/assets/gpu_1_3b_random.toml parallel.compile=false parallel.activation_checkpointing=full \
    run.max_steps=2 run.name=gpu_random_eager
  ;;
quad)  # four GPUs: 1-GPU and 2-GPU runs side by side on disjoint GPUs (each bench_train chain its own --work),
  # then SP 4 (the 14B recipe's layout)
  step tiny_data 120 python3 tools/make_tiny_data.py --out outputs/gpu_data --shape 16,20,56,104 --text-dim 4096 --rows 16
  chain 0 "check_compile 290 python3 scripts/check_speedups_gpu.py --layers 6 --only 'eager+none,compile+none,\
compile nofsdp+none,compile nocudnn+none,compile noreshard+none,compile attn-eager+none,compile fp32+none'" \
    "bench_train_attn 360 python3 benchmarks/bench_train.py --ac attention --cycles 2 --work outputs/bench_train_g0"
  chain 1 "recipe_1gpu 300 torchrun --nproc_per_node 1 --master_port 29510 recipes/wan21_1_3b_sparse_distill.py \
    --toml tests/assets/gpu_1_3b_random.toml" \
    "bench_train 360 python3 benchmarks/bench_train.py --ac full --cycles 2 --work outputs/bench_train_g1"
  chain 2,3 "recipe_2gpu 300 torchrun --nproc_per_node 2 --master_port 29520 recipes/wan21_1_3b_sparse_distill.py \
    --toml tests/assets/gpu_1_3b_random.toml parallel.dp_replicate=2 run.name=gpu_random_2x" \
    "train_sp2 360 python3 benchmarks/bench_train.py --nproc 2 --sp 2 --ac full --cycles 1 \
    --work outputs/bench_train_g23"
  collect
  step check_sp4 90 torchrun --nproc_per_node 4 scripts/check_parallel_gpu.py --only sp
  ;;
compiled)  # four GPUs: compiled training (mix-order reduction off, parallel/compile.py) checked against eager and
  # timed: gradients (GPU 0), 1-GPU step + recipe (GPU 1), HSDP 2 and SP 2 steps (GPUs 2,3)
  step tiny_data 120 python3 tools/make_tiny_data.py --out outputs/gpu_data --shape 16,20,56,104 --text-dim 4096 --rows 16
  chain 0 "check_compile 260 python3 scripts/check_speedups_gpu.py --layers 4 --only 'eager+none,compile+none,\
compile+full,compile+attention,compile mixorder+none,compile fp32+none'" \
    "train_compile_full 360 python3 benchmarks/bench_train.py --ac full --compile --cycles 2 \
    --work outputs/bench_train_g0"
  chain 1 "train_compile_attn 360 python3 benchmarks/bench_train.py --ac attention --compile --cycles 2 \
    --work outputs/bench_train_g1" \
    "recipe_1gpu_compiled 300 torchrun --nproc_per_node 1 --master_port 29510 recipes/wan21_1_3b_sparse_distill.py \
    --toml tests/assets/gpu_1_3b_random.toml parallel.activation_checkpointing=attention parallel.compile=true \
    run.name=gpu_random_compiled"
  chain 2,3 "train_hsdp2 360 python3 benchmarks/bench_train.py --nproc 2 --dp-replicate 2 --ac attention --compile \
    --cycles 2 --work outputs/bench_train_g23" \
    "train_sp2 360 python3 benchmarks/bench_train.py --nproc 2 --sp 2 --ac attention --compile --cycles 2 \
    --work outputs/bench_train_g23"
  collect
  ;;
dual)
  step check_parallel 240 torchrun --nproc_per_node 2 scripts/check_parallel_gpu.py --only sp,timing --steps 3
  step train_1gpu 360 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/bench_train.py --ac full --cycles 1
  step train_hsdp2 360 python3 benchmarks/bench_train.py --nproc 2 --dp-replicate 2 --ac full --cycles 1
  step train_sp2 360 python3 benchmarks/bench_train.py --nproc 2 --sp 2 --ac full --cycles 1
  step tiny_data 120 python3 tools/make_tiny_data.py --out outputs/gpu_data --shape 16,20,56,104 --text-dim 4096 --rows 16
  step recipe_2gpu 400 torchrun --nproc_per_node 2 recipes/wan21_1_3b_sparse_distill.py \
    --toml tests/assets/gpu_1_3b_random.toml parallel.dp_replicate=2 run.name=gpu_random_2x
  step wan14b_sp2 360 python3 benchmarks/bench_train.py --nproc 2 --sp 2 --preset wan21_14b --layers 4 \
    --latent 21,60,104 --sparsity 0.9 --cycles 1
  step wan14b_dp2 360 python3 benchmarks/bench_train.py --nproc 2 --dp-replicate 2 --preset wan21_14b --layers 4 \
    --latent 21,60,104 --sparsity 0.9 --cycles 1
  ;;
esac
echo
cat "$OUT/summary.txt"
