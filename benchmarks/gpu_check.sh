#!/usr/bin/env bash
# One short device check (under 9 minutes on one GPU, compiled stages included): see benchmarks/gpu_check.py.
# On a machine with CUDA it uses NCCL and cuda:0; elsewhere gloo and the CPU (a dry run,
# e.g. `bash benchmarks/gpu_check.sh --hidden 128 --layers 4 --vocab 500 --seq 64`).
# With 4 or more GPUs it then runs benchmarks/bench_tensor_parallel.py under torchrun
# (pp 2 x tp 2, NCCL, one GPU per rank: pp2xtp2 against pp4, and the last stage's
# loss-parallel memory from the allocator's peak); NCCL refuses two ranks on one GPU, so
# with fewer GPUs it says so and skips it. FXPP_GPU_CHECK_TP=0 skips it too.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import fxpp" 2>/dev/null || pip install -q -e .
python benchmarks/gpu_check.py "$@"
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "${FXPP_GPU_CHECK_TP:-1}" = "0" ]; then
    echo "# bench_tensor_parallel: skipped (FXPP_GPU_CHECK_TP=0)"
elif [ "$gpus" -ge 4 ]; then
    json=${OUT:+--json $OUT/bench_tensor_parallel.json}
    PYTHONPATH=.:benchmarks timeout 420 torchrun --nproc-per-node 4 benchmarks/bench_tensor_parallel.py \
        --steps 5 --warmup 2 $json
else
    echo "# bench_tensor_parallel: needs 4 GPUs (one per rank: NCCL refuses two ranks on one GPU), found $gpus; skipped"
fi
