#!/usr/bin/env bash
# The GPU check (issue 28): every GPU path for a fixed number of steps on one CUDA GPU, then an exact-resume check.
# Fits in about 5 minutes on an H100. Results: benchmarks/results/gpu_check.json and a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -n "${VIRTUAL_ENV:-}" ]] || source .venv/bin/activate
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python benchmarks/gpu_check.py "$@"
