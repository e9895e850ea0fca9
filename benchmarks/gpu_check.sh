#!/usr/bin/env bash
# One short device check (under 9 minutes on one GPU, compiled stages included): see benchmarks/gpu_check.py.
# On a machine with CUDA it uses NCCL and cuda:0; elsewhere gloo and the CPU (a dry run,
# e.g. `bash benchmarks/gpu_check.sh --hidden 128 --layers 4 --vocab 500 --seq 64`).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import fxpp" 2>/dev/null || pip install -q -e .
python benchmarks/gpu_check.py "$@"
