#!/usr/bin/env bash
# On a machine with a CUDA GPU: short bf16 DiffUNet training + DDIM-50 sampling, images/s, peak memory, full-plan time.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv || true
python benchmarks/gpu_check.py "$@"
