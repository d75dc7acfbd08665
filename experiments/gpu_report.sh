#!/usr/bin/env bash
# The GPU report, one program on one NVIDIA GPU (at most 8 minutes on an H100): experiments/gpu_report.py's
# correctness (the Pallas GPU tests; bfloat16 errors of the fused and routed kernels against the reference),
# speed (N = 8192 against cuDNN, the routed path and the blockwise kernel) and memory (a [1, 1, T, S] bias at
# N = 4096). Writes docs/gpu_report.md and docs/gpu_report/report.json (rewritten after every cell). Arguments
# are passed on; PYTHON picks the interpreter (default python):
#
#   bash experiments/gpu_report.sh
#   bash experiments/gpu_report.sh --dry_run --out=/tmp/gpu_report/report.json   # any machine, tiny shapes
#
# It needs jax, numpy and the package, none of the training extras (ml_collections, tensorboardX).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" experiments/gpu_report.py "$@"
