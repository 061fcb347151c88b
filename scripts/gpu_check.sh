#!/usr/bin/env bash
# One-shot GPU check (issue 10): device and matmul peak, full shakespeare_char training, GPT-2 124M step,
# KV-cache sampling; a short table last. Uses the Python and packages it finds (no install, no network).
#   bash scripts/gpu_check.sh [--dry-run] [--out=DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
