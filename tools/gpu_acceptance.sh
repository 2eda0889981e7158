#!/usr/bin/env bash
# Every GPU acceptance measurement of the open issues, in one device call per machine kind, most important first, each
# step time-boxed so that a call cut short still returns what it measured (logs under $OUT).
#
#   bash tools/gpu_acceptance.sh single    # one H100: GPU tests, VSA bench, training step, inference, 1-GPU recipe
#   bash tools/gpu_acceptance.sh dual      # two H100s: SP/FSDP checks, DMD-step scaling, SP=2 step, 2-GPU recipe,
#                                          # the 14B block structure at reduced depth (SP=2, DP=2; issue 10's 2-GPU part)
#
# diffusers is not on the device image: carry cp312 wheels in .whl/ (see the device notes); they are installed here.
set -u
OUT=${OUT:-outputs/gpu_acceptance}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi -L | tee "$OUT/gpus.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpus.txt"

step() {  # step NAME SECONDS CMD...: run with a time box, keep the full log, show its last lines
  local name=$1 secs=$2
  shift 2
  echo "== $name" | tee -a "$OUT/summary.txt"
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $?" >>"$OUT/summary.txt"
  grep -E "RESULT|speedup|x /|ok$|FAIL|eff |frames/s|passed|failed|Error" "$OUT/$name.log" | tail -12 | tee -a "$OUT/summary.txt"
}

case "${1:-}" in
single)
  step gpu_tests 240 python3 -m pytest -q -m gpu tests
  step bench_attention 240 python3 tools/bench_attention.py
  step bench_train 300 python3 tools/bench_train.py --compile --ac selective --cycles 2 --profile "$OUT/train_profile.txt"
  step bench_inference 420 python3 tools/bench_inference.py --cases a,b,c --diffusers
  step tiny_data 120 python3 tools/make_tiny_data.py --out outputs/gpu_data --shape 16,20,56,104 --text-dim 4096 --rows 16
  step recipe_1gpu 400 torchrun --nproc_per_node 1 recipes/wan21_1_3b_sparse_distill.py \
    --toml tests/assets/gpu_1_3b_random.toml parallel.compile=false
  ;;
dual)
  step check_parallel 240 torchrun --nproc_per_node 2 tools/check_parallel_gpu.py --only sp,timing --steps 3
  step train_1gpu 200 env CUDA_VISIBLE_DEVICES=0 python3 tools/bench_train.py --compile --ac selective --cycles 1
  step train_hsdp2 220 torchrun --nproc_per_node 2 tools/bench_train.py --compile --ac selective --cycles 1 --dp-replicate 2
  step train_sp2 220 torchrun --nproc_per_node 2 tools/bench_train.py --compile --ac selective --cycles 1 --sp 2
  step tiny_data 120 python3 tools/make_tiny_data.py --out outputs/gpu_data --shape 16,20,56,104 --text-dim 4096 --rows 16
  step recipe_2gpu 400 torchrun --nproc_per_node 2 recipes/wan21_1_3b_sparse_distill.py \
    --toml tests/assets/gpu_1_3b_random.toml parallel.dp_replicate=2 parallel.compile=false run.name=gpu_random_2x
  step wan14b_sp2 200 torchrun --nproc_per_node 2 tools/bench_train.py --preset wan21_14b --layers 4 --sp 2 \
    --latent 21,60,104 --sparsity 0.9 --cycles 1
  step wan14b_dp2 200 torchrun --nproc_per_node 2 tools/bench_train.py --preset wan21_14b --layers 4 --dp-replicate 2 \
    --latent 21,60,104 --sparsity 0.9 --cycles 1
  ;;
*)
  echo "usage: bash tools/gpu_acceptance.sh single|dual" >&2
  exit 2
  ;;
esac
echo
cat "$OUT/summary.txt"
